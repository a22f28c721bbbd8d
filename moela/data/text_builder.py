"""``moela_text``: a tfds dataset of local text files, built offline in array_record format.

By default it holds the ``.py`` sources of the running interpreter's standard library
(``pydoc_data/topics.py`` is its prose; ~30 MB that every machine has, ``site-packages``
excluded). ``data.text_glob`` points it at any other files (comma-separated globs, ``**``
allowed). One file is one document. A file goes to ``validation`` when
crc32(relative path) % 100 < ``validation_percent`` (at least one file does), so the split is
deterministic and stable as files are added. Each source gets its own builder config (named
from the sources), built once into the tfds data dir and reused.

TensorFlow is never imported: records are written as array_record and read back by random
access through ``builder.as_data_source()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import logging
import os
import shutil
import sys
import sysconfig
import zlib
from pathlib import Path

import tensorflow_datasets as tfds

STDLIB_NAME = "stdlib"


class DataError(ValueError):
    """A data source that cannot be read or built; the message names it and what would be valid."""


@dataclasses.dataclass
class TextSourceConfig(tfds.core.BuilderConfig):
    patterns: tuple[str, ...] = ()
    root: str = ""
    validation_percent: int = 2


def stdlib_files() -> tuple[str, list[str]]:
    root = sysconfig.get_paths()["stdlib"]
    files = [
        f
        for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
        if f"{os.sep}site-packages{os.sep}" not in f
    ]
    return root, sorted(files)


def source_config(text_glob: str = "", validation_percent: int = 2) -> TextSourceConfig:
    """The builder config for a source: the stdlib when ``text_glob`` is empty."""
    if not text_glob:
        root = sysconfig.get_paths()["stdlib"]  # the name needs only the root: no glob of the stdlib here
        tag = "py" + "".join(sysconfig.get_python_version().split("."))
        return TextSourceConfig(
            name=f"{STDLIB_NAME}_{tag}_val{validation_percent}",
            patterns=(os.path.join(root, "**", "*.py"),),
            root=root,
            validation_percent=validation_percent,
            description="Python standard library sources",
        )
    patterns = tuple(str(Path(p.strip()).expanduser().absolute()) for p in text_glob.split(",") if p.strip())
    root = os.path.commonpath([os.path.dirname(p.split("*")[0]) for p in patterns])
    digest = f"{zlib.crc32('|'.join(patterns).encode()):08x}"
    return TextSourceConfig(
        name=f"files_{digest}_val{validation_percent}",
        patterns=patterns,
        root=root,
        validation_percent=validation_percent,
        description=f"text files {text_glob}",
    )


def list_files(cfg: TextSourceConfig) -> list[str]:
    if cfg.name.startswith(STDLIB_NAME):
        return stdlib_files()[1]
    files = sorted({f for p in cfg.patterns for f in glob.glob(p, recursive=True) if os.path.isfile(f)})
    if not files:
        raise DataError(
            f"data.text_glob matches no files: {', '.join(cfg.patterns)}; give a folder glob such as "
            "'/path/to/texts/**/*.txt' (comma-separated for several)"
        )
    return files


def split_files(files: list[str], root: str, validation_percent: int) -> tuple[list[str], list[str]]:
    def bucket(f: str) -> int:
        return zlib.crc32(os.path.relpath(f, root).encode()) % 100

    validation = [f for f in files if bucket(f) < validation_percent]
    if not validation and len(files) > 1:
        validation = [min(files, key=lambda f: (bucket(f), f))]
    chosen = set(validation)
    return sorted(f for f in files if f not in chosen), sorted(validation)


class MoelaText(tfds.core.GeneratorBasedBuilder):
    """Local text files as documents: features ``text`` and ``path`` (relative to the source root)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text files, one document each (moela's embedded default corpus).",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        train, validation = split_files(list_files(cfg), cfg.root, cfg.validation_percent)
        return {
            "train": self._generate_examples(train, cfg.root),
            "validation": self._generate_examples(validation, cfg.root),
        }

    def _generate_examples(self, files, root):
        for f in files:
            rel = os.path.relpath(f, root)
            with open(f, encoding="utf-8", errors="replace") as fh:
                yield rel, {"text": fh.read(), "path": rel}


def _new_paths(root: Path, target: Path) -> list[Path]:
    """The folders from ``root`` down to ``target`` that do not exist yet (outermost first)."""
    chain = [target, *target.parents]
    return [p for p in reversed(chain[: chain.index(root) + 1] if root in chain else chain) if not p.exists()]


@contextlib.contextmanager
def _quiet_tfds():
    """tfds announces a local build as a download ("Downloading and preparing dataset Unknown
    size ...") on stdout, warns through absl and draws its own bars: moela says one line instead."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    tfds.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.enable_progress_bar()
        absl.setLevel(level)


def build(text_glob: str = "", data_dir: str = "", validation_percent: int = 2, log=None) -> MoelaText:
    """The prepared builder for a source, building it on first use (one line through ``log``,
    default stderr). A build that fails leaves no folder behind that it created."""
    cfg = source_config(text_glob, validation_percent)
    with _quiet_tfds():
        builder = MoelaText(config=cfg, data_dir=data_dir or None, file_format="array_record")
        prepared = builder.is_prepared()
    if prepared:
        return builder
    files = list_files(cfg)  # a source that matches nothing stops here, before any folder is made
    size = sum(os.path.getsize(f) for f in files)
    target = Path(builder.data_dir)
    root = Path(builder.data_dir_root)
    created = _new_paths(root, target.parent) + [root / "downloads"] * (not (root / "downloads").exists())
    (log or (lambda line: print(line, file=sys.stderr, flush=True)))(
        f"building the moela_text dataset from {len(files)} files ({size / 1e6:.1f} MB under {cfg.root}) "
        f"in {target} ..."
    )
    try:
        with _quiet_tfds():
            builder.download_and_prepare()
    except BaseException:
        for path in reversed(created):
            shutil.rmtree(path, ignore_errors=True)
        raise
    return builder
