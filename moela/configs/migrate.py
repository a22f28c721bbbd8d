"""Configs written by earlier versions of moela, brought up to the current schema.

Execution settings used to live inside ``model`` (and ``serve``); they are the ``runtime`` section
now, so a checkpoint's identity is ``model.*`` alone. A ``config.json`` written before the move
still loads: :func:`migrate` moves each old key to its new place and says which it moved. A
``--set`` of an old key name gets an error that names the new one (``moved_to``).
"""

from __future__ import annotations

import copy
from typing import Any

MOVED = {  # old dotted key -> new dotted key
    "model.attention.impl": "runtime.attention",
    "model.moe.impl": "runtime.grouped_matmul",
    "model.moe.block_rows": "runtime.grouped_block_rows",
    "model.moe.expert_dispatch": "runtime.expert_dispatch",
    "model.remat": "runtime.remat",
    "serve.attention_impl": "runtime.paged_attention",
}


def moved_to(key: str) -> str | None:
    """The current name of a key that has moved, or None."""
    return MOVED.get(key)


def _pop(tree: dict, dotted: str) -> tuple[bool, Any]:
    *parents, leaf = dotted.split(".")
    node = tree
    for name in parents:
        node = node.get(name)
        if not isinstance(node, dict):
            return False, None
    if leaf not in node:
        return False, None
    return True, node.pop(leaf)


def migrate(data: dict) -> tuple[dict, list[str]]:
    """(a copy of ``data`` in the current layout, ["old -> new", ...] for every key moved).

    A value already present at the new place wins over the old one (it was written later)."""
    data = copy.deepcopy(data)
    moved = []
    for old, new in MOVED.items():
        found, value = _pop(data, old)
        if not found:
            continue
        section, leaf = new.split(".")
        data.setdefault(section, {}).setdefault(leaf, value)
        moved.append(f"{old} -> {new}")
    return data, moved
