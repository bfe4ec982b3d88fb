"""A run's input: the training and held-out text as token ids, and random crops of them.

The text comes from `sedd_core.data` (files and folders, or a Hugging Face dataset); this
module encodes it with the run's tokenizer, holds out part of it when no held-out text is
given, and cuts the crops a training step reads.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..data import load_hf_dataset_text, read_text_corpus, resolve_text_files
from ..tokenizers import CharTokenizer, Tokenizer
from .config import DataSection
from .errors import TrainingError

_CHUNK_BREAK = re.compile(r"\n(?=\S)")


def _chunks(text: str, size: int = 1 << 20) -> list[str]:
    """Pieces of about `size` characters, cut only after a newline that a non-space follows:
    GPT-2's pre-tokeniser never joins across such a point, so encoding the pieces separately
    gives the same ids as encoding the whole."""
    out, start = [], 0
    while start < len(text):
        match = _CHUNK_BREAK.search(text, start + size) if start + size < len(text) else None
        end = match.end() if match else len(text)
        out.append(text[start:end])
        start = end
    return out


def encode_text(tokenizer: Tokenizer, text: str) -> tuple[torch.Tensor, int]:
    """(ids as an int32 tensor, how many characters became [UNK])."""
    if isinstance(tokenizer, CharTokenizer):
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(max(int(codes.max(initial=0)) + 1, 128), CharTokenizer.UNK, dtype=np.int32)
        for i, ch in enumerate(tokenizer.chars):
            if ord(ch) < len(table):
                table[ord(ch)] = i + 2
        ids = table[codes]
        return torch.from_numpy(ids), int((ids == CharTokenizer.UNK).sum())
    pieces = tokenizer.encoding.encode_batch(_chunks(text), allowed_special={"<|endoftext|>"})
    ids = np.fromiter((i for piece in pieces for i in piece), dtype=np.int32)
    return torch.from_numpy(ids), 0


def _read_files(files: list[Path]) -> str:
    try:
        return read_text_corpus(files)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"could not read {', '.join(map(str, files))}: {exc}") from exc


def _read_text(d: DataSection) -> tuple[str, str, str | None, str | None]:
    """(training text, where it came from, held-out text or None, where that came from)."""
    if d.hf_dataset:
        try:
            train_text = load_hf_dataset_text(d.hf_dataset, d.hf_train_split, d.hf_column)
            valid_text = (load_hf_dataset_text(d.hf_dataset, d.hf_valid_split, d.hf_column)
                          if d.hf_valid_split else None)
        except (ImportError, KeyError) as exc:
            raise TrainingError(str(exc)) from exc
        valid_source = f"hf:{d.hf_dataset} [{d.hf_valid_split}]" if valid_text is not None else None
        return train_text, f"hf:{d.hf_dataset} [{d.hf_train_split}]", valid_text, valid_source
    if not d.train:
        raise TrainingError("no training text: pass --data PATH (or set data.train / data.hf_dataset)")
    try:
        train_files, beside = resolve_text_files(d.train)
        valid_files = resolve_text_files(d.valid)[0] if d.valid else beside
    except (OSError, ValueError) as exc:
        raise TrainingError(str(exc)) from exc
    train_text = _read_files(train_files)
    valid_text = _read_files(valid_files) if valid_files else None
    return (train_text, ", ".join(map(str, train_files)), valid_text,
            ", ".join(map(str, valid_files)) if valid_files else None)


def load_corpus(d: DataSection, tokenizer: Tokenizer, length: int, log: Callable[[str], None]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, held-out ids), both int32 on the CPU, each at least `length` tokens long."""
    train_text, source, valid_text, valid_source = _read_text(d)
    train_ids, unknown = encode_text(tokenizer, train_text)
    if unknown:
        log(f"note: {unknown:,} characters of the training text are outside the vocabulary and became [UNK]")
    if valid_text is not None:
        valid_ids, unknown = encode_text(tokenizer, valid_text)
        if unknown:
            log(f"note: {unknown:,} held-out characters are outside the vocabulary and became [UNK]")
    else:
        n_valid = max(length, int(len(train_ids) * d.valid_fraction))
        if len(train_ids) - n_valid < length:
            raise TrainingError(
                f"the corpus has {len(train_ids):,} tokens: too few to hold out {n_valid:,} for evaluation and "
                f"still train on crops of {length}; give more text, a held-out file (--valid) or a shorter "
                "model.length")
        valid_ids, train_ids = train_ids[-n_valid:].clone(), train_ids[:-n_valid].clone()
        valid_source = f"the last {d.valid_fraction:.0%} of the training text"
    for name, ids in (("training", train_ids), ("held-out", valid_ids)):
        if len(ids) < length:
            raise TrainingError(f"the {name} text has {len(ids):,} tokens, fewer than model.length={length}")
    log(f"data: train {len(train_ids):,} tokens from {source}; held out {len(valid_ids):,} from {valid_source}")
    return train_ids, valid_ids


def random_crops(ids: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, length) long windows of `ids` at uniformly random starts drawn from the CPU `generator`."""
    starts = torch.randint(0, len(ids) - length + 1, (batch,), generator=generator)
    index = starts[:, None] + torch.arange(length)
    return ids[index.to(ids.device)].long()
