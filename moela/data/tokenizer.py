"""The sentencepiece tokenizer: trained on the training split when no model is given
(cached next to the dataset), or loaded from any ``.model`` file.

Ids are explicit: pad 0, unk 1, bos 2, eos 3 in the models we train. Settings suit code as
well as prose: identity normalisation, whitespace kept (runs of spaces become pieces), and
byte fallback, so any text round-trips and newlines are the ``<0x0A>`` byte token.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from moela.data.text_builder import DataError

PAD, UNK, BOS, EOS = 0, 1, 2, 3


@dataclass(frozen=True)
class Tokenizer:
    path: str
    processor: spm.SentencePieceProcessor

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def pad_id(self) -> int:
        return max(self.processor.pad_id(), 0)

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode(list(ids))


def load(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"sentencepiece model '{path}' not found (data.tokenizer_model)")
    processor = spm.SentencePieceProcessor()
    try:
        processor.load(str(path))
    except (OSError, RuntimeError) as e:
        raise DataError(f"'{path}' is not a sentencepiece model: {e}") from None
    tok = Tokenizer(str(path), processor)
    if tok.eos_id < 0:
        raise DataError(f"sentencepiece model '{path}' has no eos piece; documents are joined with eos")
    return tok


def train(
    lines: Iterable[str], out_path: str | Path, vocab_size: int, model_type: str = "bpe", max_chars: int = 20_000_000
) -> Tokenizer:
    """Train on ``lines`` (in order, up to ``max_chars``) and write ``out_path`` (a ``.model``)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def sample():
        used = 0
        for line in lines:
            if not line.strip():
                continue
            used += len(line)
            if used > max_chars:
                return
            yield line

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sample(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=8192,
            pad_id=PAD,
            unk_id=UNK,
            bos_id=BOS,
            eos_id=EOS,
            num_threads=2,
            minloglevel=2,
            character_coverage=0.9995,
        )
    except RuntimeError as e:
        raise DataError(f"sentencepiece training failed (vocab {vocab_size}, {model_type}): {e}") from None
    tmp = out_path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out_path)  # atomic: a killed run never leaves half a tokenizer behind
    return load(out_path)


def cached_path(dataset_dir: Path, vocab_size: int, model_type: str) -> Path:
    return Path(dataset_dir) / f"tokenizer_{model_type}_{vocab_size}.model"
