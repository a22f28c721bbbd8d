"""Loading presets, applying ``--set key=value`` overrides, and (de)serialising configs.

Every path into a :class:`~moela.configs.schema.Config` (a preset file, a command-line override,
a ``config.json`` written beside a checkpoint) goes through :func:`from_dict` /
:func:`apply_overrides` and then :func:`moela.configs.validate.validate`, so a wrong key, a
wrong type and an inconsistent combination all fail the same way: one
:class:`ConfigError` naming the dotted key and what would be valid. A ``config.json`` written
by an earlier version is brought up to date first (``moela.configs.migrate``).
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import importlib.util
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from moela.configs.migrate import migrate, moved_to
from moela.configs.schema import Config
from moela.configs.validate import ConfigError, validate

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _unknown_key(key: str, cls: type) -> ConfigError:
    new = moved_to(key)
    if new:
        return ConfigError(
            f"config key '{key}' has moved to '{new}' (how a model is computed is the runtime "
            "section, apart from what the model is)"
        )
    names = [f.name for f in dataclasses.fields(cls)]
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {', '.join(names)}")


def check_value(key: str, tp: Any, value: Any) -> Any:
    """Return ``value`` if it has type ``tp`` (ints are accepted for floats), else raise."""
    if get_origin(tp) is Literal:
        if value in get_args(tp) and type(value) is type(get_args(tp)[0]):
            return value
        raise ConfigError(f"config key '{key}' = {value!r} is not valid; expected {_describe(tp)}")
    if tp is float and type(value) is int:
        return float(value)
    if tp in (int, float, bool, str) and type(value) is tp:
        return value
    raise ConfigError(f"config key '{key}' = {value!r} has type {type(value).__name__}; expected {_describe(tp)}")


def parse_scalar(key: str, tp: Any, text: str) -> Any:
    """Parse a command-line string into the field's type."""
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise ConfigError(f"config key '{key}' = {text!r} is not valid; expected {_describe(tp)}")
    try:
        if tp is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
    except ValueError:
        pass
    raise ConfigError(f"config key '{key}' = {text!r} cannot be read as {_describe(tp)}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        got = repr(data) if len(repr(data)) <= 80 else repr(data)[:77] + "..."
        raise ConfigError(
            f"config section '{prefix.rstrip('.') or cls.__name__}' must be a mapping of its keys "
            f"({', '.join(_hints(cls))}), got {got}"
        )
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise _unknown_key(dotted, cls)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, dotted + ".")
        else:
            kwargs[key] = check_value(dotted, tp, value)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def check_types(cfg: Any, prefix: str = "") -> None:
    """Check the type of every field of a config built in Python (e.g. by a preset)."""
    for f in dataclasses.fields(cfg):
        tp = _hints(type(cfg))[f.name]
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, tp):
                raise ConfigError(f"config key '{prefix}{f.name}' must be a {tp.__name__}, got {value!r}")
            check_types(value, f"{prefix}{f.name}.")
        else:
            check_value(f"{prefix}{f.name}", tp, value)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.field=value`` strings, e.g. ``model.num_layers=4``."""
    for item in overrides:
        key, equals, text = item.partition("=")
        if not equals or not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. model.num_layers=4")
        cfg = _set(cfg, key.strip().split("."), text.strip(), key.strip())
    return cfg


def _set(node: Any, parts: list[str], text: str, full: str) -> Any:
    hints = _hints(type(node))
    head = parts[0]
    if head not in hints:
        raise _unknown_key(full, type(node))
    tp = hints[head]
    if dataclasses.is_dataclass(tp):
        if len(parts) == 1:
            names = ", ".join(f.name for f in dataclasses.fields(tp))
            raise ConfigError(f"config key '{full}' is a section; set one of its keys: {names}")
        return dataclasses.replace(node, **{head: _set(getattr(node, head), parts[1:], text, full)})
    if len(parts) > 1:
        raise ConfigError(f"config key '{full}': '{head}' is a value, not a section")
    return dataclasses.replace(node, **{head: parse_scalar(full, tp, text)})


PRESETS = Path(__file__).parent / "presets"


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as ``Type: message`` on one line, at most ``limit`` characters."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def find_file(name: str | os.PathLike, folder: Path, kind: str, error: type[Exception]) -> Path:
    """``name`` as a path to a ``.py`` file, or the bare name of one in ``folder``; else one ``error``
    listing the names there."""
    p = Path(name)
    if p.is_file():
        return p
    if not p.suffix and p.parent == Path(".") and (folder / f"{p.name}.py").is_file():
        return folder / f"{p.name}.py"
    if p.is_dir():
        raise error(f"{kind} '{name}' is a directory; give a .py file or a name")
    known = sorted(q.stem for q in folder.glob("[!_]*.py"))
    raise error(f"{kind} '{name}' not found: give a path to a .py file or one of: {', '.join(known)}")


def load_preset(path: str | os.PathLike) -> Config:
    """Import a preset file (or a bare preset name: ``moela/configs/presets/<name>.py``) and call ``get_config()``."""
    p = find_file(path, PRESETS, "config", ConfigError)
    return call_file(
        p,
        "get_config",
        Config,
        ConfigError,
        label=str(path),
        kind="config file",
        module_prefix="moela_preset",
        returns="moela.configs.Config",
    )


def call_file(
    p: Path,
    func: str,
    expected: type,
    error: type[Exception],
    *,
    label: str,
    kind: str,
    module_prefix: str,
    returns: str,
):
    """Import the Python file ``p`` and return ``func()``, which must be an ``expected``; every
    mistake (the file fails to import, lacks ``func``, returns something else) is one ``error``
    naming the file. Presets (``get_config``) and scaling families (``get_family``) load this way."""
    if p.suffix != ".py":
        raise error(f"{kind} '{label}' must be a Python file (.py) defining {func}()")
    spec = importlib.util.spec_from_file_location(f"{module_prefix}_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a broken file: report it, do not crash the CLI
        raise error(f"{kind} '{label}' failed to import: {one_line(e)}") from None
    if not callable(getattr(module, func, None)):
        raise error(f"{kind} '{label}' must define {func}() returning a {returns}")
    try:
        value = getattr(module, func)()
    except error:
        raise
    except Exception as e:
        raise error(f"{func}() in '{label}' raised {one_line(e)}") from None
    if not isinstance(value, expected):
        raise error(f"{func}() in '{label}' returned {type(value).__name__}, expected {returns}")
    return value


def load(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Preset + overrides, type-checked and validated: the one way tools get a config."""
    cfg = apply_overrides(load_preset(path), list(overrides))
    check_types(cfg)
    validate(cfg)
    return cfg


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads(..., object_pairs_hook=unique_keys)``: a key given twice in one object is a
    ValueError (json keeps the last one silently)."""
    counts = collections.Counter(k for k, _ in pairs)
    repeated = sorted(k for k, n in counts.items() if n > 1)
    if repeated:
        raise ValueError(f"duplicate key(s) {', '.join(repr(k) for k in repeated)} in one object")
    return dict(pairs)


def save_json(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def load_json(path: str | os.PathLike, log=None) -> Config:
    """A ``config.json``; one written by an earlier moela is migrated, and ``log`` (default: a line
    on stderr) is told which keys moved."""
    try:
        data = json.loads(Path(path).read_text(), object_pairs_hook=unique_keys)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"cannot read config '{path}': {one_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config '{path}' must hold a JSON object, got {type(data).__name__}")
    data, moved = migrate(data)
    if moved:
        (log or (lambda line: print(line, file=sys.stderr)))(
            f"note: '{path}' was written by an earlier moela; read with {', '.join(moved)}"
        )
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


MAX_STEPS_ENV = "MOELA_MAX_STEPS"


def cap_steps(cfg: Config, environ=os.environ) -> tuple[Config, str | None]:
    """``MOELA_MAX_STEPS=N`` in the environment caps a training run at N steps, shrinking the
    warmup and the logging, evaluation and checkpoint intervals to fit and evaluating on one
    batch: for checking that a command works end to end (the README's commands are tested this
    way, as PyTorch Lightning's ``fast_dev_run`` does), not for results.
    Returns the config and a line saying what changed (None when nothing did)."""
    text = environ.get(MAX_STEPS_ENV, "").strip()
    if not text:
        return cfg, None
    try:
        cap = int(text)
    except ValueError:
        cap = 0
    if cap < 1:
        raise ConfigError(f"{MAX_STEPS_ENV}={text!r} must be an integer >= 1 (or unset)")
    t = cfg.train
    if t.steps <= cap:
        return cfg, None
    train = dataclasses.replace(
        t,
        steps=cap,
        warmup_steps=min(t.warmup_steps, cap),
        log_every=min(t.log_every, cap),
        eval_every=min(t.eval_every, cap),
        checkpoint_every=min(t.checkpoint_every, cap),
        eval_batches=1,
    )
    note = f"{MAX_STEPS_ENV}={cap}: training {cap} of the config's {t.steps} steps"
    return dataclasses.replace(cfg, train=train), note


def add_cli_args(parser) -> None:
    """The shared ``--config`` / ``--set`` flags of every entry point."""
    parser.add_argument(
        "--config", required=True, help="a preset name (tiny, small, bench, ...) or a config file, e.g. my_config.py"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set model.num_layers=4 (repeatable)",
    )


def config_from_cli(parser, argv: list[str] | None = None):
    """Add the config flags, parse ``argv`` and load the config: (args, Config).

    A config mistake prints one ``error:`` line and exits with status 2, before any compute.
    """
    add_cli_args(parser)
    args = parser.parse_args(argv)
    try:
        return args, load(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
