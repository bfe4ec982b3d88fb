"""A run's input: the training and held-out tokens, and the random crops a step reads of them.

Two kinds of input. Text (files and folders, or a Hugging Face dataset, through `sedd_core.data`) is
encoded with the run's tokenizer when the run starts and held in memory; crops start anywhere. A token
folder written by `sedd data tokenize` (`token_file.py`) is read through a memory map, in blocks of
`model.length` tokens, so memory stays flat whatever the corpus's size. Without held-out text the last
`data.valid_fraction` of the training tokens is held out.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from ..data import load_hf_dataset_text, read_text_corpus, resolve_text_files
from ..tokenizers import Tokenizer
from .config import DataSection
from .errors import TrainingError
from .token_file import TokenFolder, encode_ids, is_token_folder


class Tokens(Protocol):
    """Token ids a run reads: `len()` of them, and `crops(batch, generator)` -> (batch, length) long."""

    def __len__(self) -> int: ...

    def crops(self, batch: int, generator: torch.Generator) -> torch.Tensor: ...


class InMemoryTokens:
    """Encoded text in a tensor (on the training device, for CUDA); crops start at any token."""

    def __init__(self, ids: torch.Tensor, length: int):
        self.ids, self.length = ids, length

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device) -> InMemoryTokens:
        return InMemoryTokens(self.ids.to(device), self.length)

    def crops(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return random_crops(self.ids, batch, self.length, generator)


def encode_text(tokenizer: Tokenizer, text: str) -> tuple[torch.Tensor, int]:
    """(ids as an int32 tensor, how many characters became [UNK])."""
    ids, unknown = encode_ids(tokenizer, text)
    return torch.from_numpy(ids), unknown


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
                ) -> tuple[Tokens, Tokens]:
    """(training tokens, held-out tokens), each at least `length` tokens long: a token folder's memory map
    when `data.train` names one, else the text encoded in memory (on the CPU)."""
    if len(d.train) == 1 and is_token_folder(d.train[0]):
        return _token_folder(d, tokenizer, length, log)
    if any(is_token_folder(path) for path in d.train):
        raise TrainingError("a token folder (sedd data tokenize) is trained on alone: give it as the only --data")
    train_text, source, valid_text, valid_source = _read_text(d)
    train_ids, unknown = encode_text(tokenizer, train_text)
    if unknown:
        log(f"note: {unknown:,} characters of the training text are outside the vocabulary and became [UNK]")
    if valid_text is not None:
        valid_ids, unknown = encode_text(tokenizer, valid_text)
        if unknown:
            log(f"note: {unknown:,} held-out characters are outside the vocabulary and became [UNK]")
    else:
        n_valid = _held_out(len(train_ids), length, d.valid_fraction)
        valid_ids, train_ids = train_ids[-n_valid:].clone(), train_ids[:-n_valid].clone()
        valid_source = f"the last {d.valid_fraction:.0%} of the training text"
    for name, ids in (("training", train_ids), ("held-out", valid_ids)):
        if len(ids) < length:
            raise TrainingError(f"the {name} text has {len(ids):,} tokens, fewer than model.length={length}")
    log(f"data: train {len(train_ids):,} tokens from {source}; held out {len(valid_ids):,} from {valid_source}")
    return InMemoryTokens(train_ids, length), InMemoryTokens(valid_ids, length)


def _held_out(total: int, length: int, fraction: float) -> int:
    n_valid = max(length, int(total * fraction))
    if total - n_valid < length:
        raise TrainingError(
            f"the corpus has {total:,} tokens: too few to hold out {n_valid:,} for evaluation and still train on "
            f"crops of {length}; give more text, a held-out file (--valid) or a shorter model.length")
    return n_valid


def _token_folder(d: DataSection, tokenizer: Tokenizer, length: int, log: Callable[[str], None]
                  ) -> tuple[Tokens, Tokens]:
    folder = TokenFolder.open(d.train[0])
    folder.check_tokenizer(tokenizer)
    if d.valid:
        raise TrainingError("data.valid does not apply to a token folder: tokenize held-out text into it with "
                            "sedd data tokenize --valid, or leave it out to hold out data.valid_fraction")
    total = folder.tokens("train")
    if folder.tokens("valid"):
        train, valid = folder.blocks("train", length), folder.blocks("valid", length)
        valid_source = f"{folder.path}/valid.bin"
    else:
        n_valid = _held_out(total, length, d.valid_fraction)
        train = folder.blocks("train", length, 0, total - n_valid)
        valid = folder.blocks("train", length, total - n_valid, n_valid)
        valid_source = f"the last {d.valid_fraction:.0%} of {folder.path}/train.bin"
    for name, blocks in (("training", train), ("held-out", valid)):
        if blocks.n_blocks < 1:
            raise TrainingError(f"the {name} tokens of {folder.path} ({len(blocks):,}) are fewer than "
                                f"model.length={length}")
    log(f"data: train {len(train):,} tokens ({train.n_blocks:,} blocks of {length}) memory-mapped from "
        f"{folder.path}/train.bin; held out {len(valid):,} from {valid_source}")
    return train, valid


def random_crops(ids: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, length) long windows of `ids` at uniformly random starts drawn from the CPU `generator`."""
    starts = torch.randint(0, len(ids) - length + 1, (batch,), generator=generator)
    index = starts[:, None] + torch.arange(length)
    return ids[index.to(ids.device)].long()
