"""Open a split of the configured dataset for random access: the embedded ``moela_text``
builder or any tfds dataset prepared in array_record format under ``data.data_dir``.

    source, directory = open_split(cfg.data, "train")
    text = document(source[i], cfg.data.text_field)
"""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from moela.configs.schema import DataConfig
from moela.data.text_builder import DataError, build

EMBEDDED = "moela_text"


def open_split(data: DataConfig, split: str):
    """(random-access source with ``len`` and ``__getitem__``, dataset directory for caches)."""
    if data.dataset == EMBEDDED:
        builder = build(data.text_glob, data.data_dir)
        sources = builder.as_data_source()
    else:
        try:
            builder = tfds.builder(data.dataset, data_dir=data.data_dir or None, file_format="array_record")
        except Exception as e:  # tfds raises DatasetNotFoundError and others with long texts
            raise DataError(
                f"data.dataset '{data.dataset}' is not a known tfds dataset ({type(e).__name__}); "
                f"use '{EMBEDDED}' (local text files) or a tfds name such as lm1b, c4/en"
            ) from None
        if not builder.is_prepared():
            raise DataError(
                f"tfds dataset '{data.dataset}' is not prepared under "
                f"'{builder.data_dir_root}'; prepare it in array_record format "
                "(tfds build --file_format=array_record) or set data.data_dir"
            )
        sources = builder.as_data_source()
    if split not in sources:
        raise DataError(f"dataset '{data.dataset}' has no split '{split}'; splits: {', '.join(sorted(sources))}")
    source = sources[split]
    if len(source) and data.text_field not in source[0]:
        raise DataError(
            f"data.text_field '{data.text_field}' is not a feature of '{data.dataset}'; "
            f"features: {', '.join(sorted(source[0]))}"
        )
    return source, Path(builder.data_dir)


def document(record: dict, field: str) -> str:
    value = record[field]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
