"""Reading prompts and writing completions for ``serve.py``: validation, tokenizers, JSONL output.

Each input line is one request. The rule: a line whose first non-blank character is ``{`` or
``[`` is JSON and must be an object with the fields of ``FIELDS``; any other line is plain text,
the whole line being the prompt (to send text that starts with ``{`` or ``[``, wrap it as
``{"prompt": ...}``). Blank lines are skipped. Lines are read as bytes and decoded one at a time
(UTF-8; a byte-order mark at the start of the file is dropped), so a line that cannot become a
request (not UTF-8, a NUL byte, longer than ``MAX_LINE_BYTES``, malformed JSON, a bad field) gets
an error record ``{"id", "index", "error"}`` and never stops the others.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moela.configs.loader import unique_keys
from moela.configs.schema import ServeConfig
from moela.inference.scheduler import Request

FIELDS = ("id", "prompt", "tokens", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
MAX_LINE_BYTES = 4 << 20  # one request line; longer lines are refused, not tokenised
BOM = b"\xef\xbb\xbf"


@dataclass
class Problem:
    """An input line that cannot be served, and why."""

    id: str
    index: int
    error: str

    def record(self) -> dict:
        return {"id": self.id, "index": self.index, "error": self.error}


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (through the ``tokenizers`` package), with the same
    interface as ``data.tokenizer.Tokenizer``: encode, decode, eos_id."""

    def __init__(self, path: Path, eos_id: int):
        from tokenizers import Tokenizer as _Tokenizer

        self.path, self._tok, self.eos_id = str(path), _Tokenizer.from_file(str(path)), eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(directory: str | Path, override: str | None = None):
    """The checkpoint's tokenizer: ``tokenizer.model`` (sentencepiece, what train.py saves) or
    ``tokenizer.json`` (Hugging Face, what ``model.hf_import`` copies), or ``override``; None if
    there is none (then requests must give ``tokens``)."""
    from moela.data import tokenizer as sp

    directory = Path(directory)
    path = Path(override) if override else None
    if path is None:
        path = next((directory / n for n in ("tokenizer.model", "tokenizer.json") if (directory / n).is_file()), None)
    if path is None:
        return None
    if path.suffix == ".json":
        eos = -1
        cfg_file = path.with_name("tokenizer_config.json")
        hf = HFTokenizer(path, -1)
        if cfg_file.is_file():
            token = json.loads(cfg_file.read_text()).get("eos_token")
            token = token.get("content") if isinstance(token, dict) else token
            eos = hf._tok.token_to_id(token) if token else None
        hf.eos_id = -1 if eos is None else eos
        return hf
    return sp.load(path)


def _check_number(value, name: str, kind, ok, valid: str) -> str | None:
    finite = not isinstance(value, float) or math.isfinite(value)
    if isinstance(value, bool) or not isinstance(value, kind) or not finite:
        return f"'{name}' must be {valid}; got {value!r}"
    return None if ok(value) else f"'{name}' must be {valid}; got {value!r}"


def read_lines(path: str | Path) -> list[bytes]:
    """The raw lines of a prompts file (no line ends; a BOM at the start dropped). One clear
    ``ValueError`` if the file cannot be read at all; nothing is decoded here."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--prompts '{path}' is a directory; give a file with one request per line")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read --prompts '{path}': {e.strerror or e}") from None
    if data.startswith(BOM):
        data = data[len(BOM) :]
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def decode_line(raw: bytes, index: int) -> str | Problem:
    """One raw line as text, or the Problem that keeps it from being a request."""
    if len(raw) > MAX_LINE_BYTES:
        return Problem(str(index), index, f"line of {len(raw)} bytes exceeds the limit of {MAX_LINE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Problem(
            str(index), index, f"line is not valid UTF-8: byte 0x{raw[e.start]:02x} at byte offset {e.start}"
        )
    if "\x00" in text:
        return Problem(str(index), index, f"line holds a NUL byte at character {text.index(chr(0))}")
    return text


def _json_fields(text: str, index: int) -> dict | Problem:
    """A JSON request line (the rule in the module docstring) as its fields, or why not."""
    try:
        value = json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as e:
        return Problem(str(index), index, f"malformed JSON: {e}")
    except ValueError as e:  # a duplicate field, found at any depth
        return Problem(str(index), index, f"malformed request: {e}")
    except RecursionError:
        return Problem(str(index), index, "malformed JSON: nested too deeply")
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        return Problem(
            str(index),
            index,
            f"a line starting with '{{' or '[' is JSON and must be an object like {{\"prompt\": \"...\"}}; got {kind}",
        )
    return value


def parse_line(line: str | bytes, index: int, defaults: ServeConfig, tokenizer) -> Request | Problem | None:
    """One input line -> a Request, a Problem, or None for a blank line."""
    text = decode_line(line, index) if isinstance(line, bytes) else line.rstrip("\r\n")
    if isinstance(text, Problem):
        return text
    rid = str(index)
    if not text.strip():
        return None
    if not text.lstrip().startswith(("{", "[")):
        fields: dict[str, Any] = {"prompt": text}
    else:
        fields = _json_fields(text, index)
        if isinstance(fields, Problem):
            return fields
        if "id" in fields:
            rid = fields["id"]
            if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
                return Problem(str(index), index, f"'id' must be a non-empty string or an integer; got {rid!r:.80}")
            rid = str(rid)
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        return Problem(rid, index, f"unknown field(s) {', '.join(unknown)}; valid: {', '.join(FIELDS)}")
    if ("prompt" in fields) == ("tokens" in fields):
        return Problem(rid, index, "give exactly one of 'prompt' (text) or 'tokens' (a list of token ids)")
    checks = [
        ("max_tokens", int, lambda v: v >= 1, "an integer >= 1"),
        ("temperature", (int, float), lambda v: v >= 0, "a number >= 0"),
        ("top_p", (int, float), lambda v: 0 < v <= 1, "a number in (0, 1]"),
        ("top_k", int, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
        ("seed", int, lambda v: 0 <= v < 2**32, "an integer in [0, 2^32)"),
    ]
    for name, kind, ok, valid in checks:
        if name in fields:
            problem = _check_number(fields[name], name, kind, ok, valid)
            if problem:
                return Problem(rid, index, problem)
    stop = fields.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        return Problem(rid, index, "'stop' must be a non-empty string or a list of them")
    if "tokens" in fields:
        tokens = fields["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            return Problem(rid, index, "'tokens' must be a list of integer token ids")
    else:
        prompt = fields["prompt"]
        if not isinstance(prompt, str):
            return Problem(rid, index, "'prompt' must be a string")
        if not prompt:
            return Problem(rid, index, "empty prompt")
        if tokenizer is None:
            return Problem(
                rid,
                index,
                "text prompts need a tokenizer (the checkpoint has no tokenizer.model or "
                "tokenizer.json; pass --tokenizer, or give 'tokens')",
            )
        tokens = tokenizer.encode(prompt)
    if stop and tokenizer is None:
        return Problem(rid, index, "stop strings need a tokenizer to decode the output; pass --tokenizer")
    return Request(
        rid,
        list(tokens),
        int(fields.get("max_tokens", defaults.max_new_tokens)),
        float(fields.get("temperature", defaults.temperature)),
        int(fields.get("top_k", defaults.top_k)),
        float(fields.get("top_p", defaults.top_p)),
        int(fields.get("seed", defaults.seed)),
        tuple(stop),
        index,
    )


def read_done(path: Path) -> list[dict]:
    """Records already in ``path``; a torn last line from a crash is ignored."""
    done = []
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "id" in record:
            done.append(record)
    return done


def _key(record: dict) -> tuple[int, str]:
    """Records are ordered by input line; a duplicate id has its own line, so it never hides another."""
    return int(record.get("index", 0)), str(record["id"])


class OutputWriter:
    """Appends each record as it completes (flushed, so a crash keeps it), and at ``close``
    rewrites the file in input order (atomically, through a temporary file)."""

    def __init__(self, path: Path, existing: list[dict]):
        self.path = path
        self.records = {_key(r): r for r in existing}
        path.parent.mkdir(parents=True, exist_ok=True)
        if existing:  # drop a torn last line before appending
            self._rewrite(existing)
        self._file = open(path, "a")

    def write(self, record: dict) -> None:
        self.records[_key(record)] = record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, self.path)

    def close(self) -> None:
        self._file.close()
        self._rewrite([self.records[k] for k in sorted(self.records)])
