"""Token folders: a corpus encoded once (`sedd data tokenize`) and read by training through a memory map.

    manifest.json   format, tokenizer, dtype, and per split its file, token and document counts, source
                    and sha256
    train.bin       the token ids, one after another (uint16 while the vocabulary fits, as nanoGPT's
                    train.bin; else uint32)
    valid.bin       held-out text, when it was given (--valid)

The recipe is the authors' for GPT-2 corpora (their `data.py`, after jcpeterson/openwebtext): each
document's tokens followed by the end-of-text token (50256), documents concatenated in order; training
cuts the concatenation into blocks of `model.length` tokens (`TokenBlocks`) and reads random blocks. A
character tokenizer has no end-of-text token: its documents end with a blank line instead.

Encoding runs in worker threads (tiktoken's encoder releases the GIL), in bounded batches, so memory
stays flat however large the corpus; the manifest is written last and the folder appears complete under
its name or not at all.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from ..documents import DocumentSource, text_pieces
from ..files import atomic_folder
from ..tokenizers import GPT2_EOT, CharTokenizer, Tokenizer
from .errors import TrainingError

MANIFEST = "manifest.json"
FORMAT = "sedd-tokens"
VERSION = 1
CHAR_DOCUMENT_END = "\n\n"
BATCH_CHARS = 1 << 20  # text per job handed to a worker


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_ids(tokenizer: Tokenizer, text: str) -> tuple[np.ndarray, int]:
    """(the ids of `text` as int32, how many characters became [UNK]). GPT-2 text may hold
    `<|endoftext|>` as the end-of-text token."""
    if isinstance(tokenizer, CharTokenizer):
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(max(int(codes.max(initial=0)) + 1, 128), CharTokenizer.UNK, dtype=np.int32)
        for i, ch in enumerate(tokenizer.chars):
            if ord(ch) < len(table):
                table[ord(ch)] = i + 2
        ids = table[codes]
        return ids, int((ids == CharTokenizer.UNK).sum())
    special = {"<|endoftext|>"}
    pieces = text_pieces(text)
    if len(pieces) <= 1:
        return np.asarray(tokenizer.encoding.encode(text, allowed_special=special), dtype=np.int32), 0
    encoded = tokenizer.encoding.encode_batch(pieces, allowed_special=special)
    return np.fromiter((i for piece in encoded for i in piece), dtype=np.int32), 0


def document_end(tokenizer: Tokenizer) -> list[int]:
    """The ids that close a document: GPT-2's end-of-text token, or a character model's blank line."""
    if isinstance(tokenizer, CharTokenizer):
        return encode_ids(tokenizer, CHAR_DOCUMENT_END)[0].tolist()
    return [GPT2_EOT]


def tokenizer_entry(tokenizer: Tokenizer) -> dict[str, Any]:
    """What the manifest records of the tokenizer, and what training checks its own against."""
    entry: dict[str, Any] = {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                             "document_end": document_end(tokenizer)}
    if isinstance(tokenizer, CharTokenizer):
        entry["char_ords"] = [ord(c) for c in tokenizer.chars]
    return entry


# ---- writing ----------------------------------------------------------------------------------------


@dataclass
class _Split:
    tokens: int = 0
    documents: int = 0
    unknown: int = 0


def _batches(source: DocumentSource) -> Iterator[list[tuple[str, bool]]]:
    batch, chars = [], 0
    for text, end in source:
        batch.append((text, end))
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_batch(tokenizer: Tokenizer, end_ids: list[int], dtype: np.dtype,
                  batch: list[tuple[str, bool]]) -> tuple[np.ndarray, int, int]:
    """(ids of the batch with each finished document closed, documents finished, [UNK] characters)."""
    parts, documents, unknown = [], 0, 0
    for text, end in batch:
        ids, bad = encode_ids(tokenizer, text)
        parts.append(ids)
        unknown += bad
        if end:
            parts.append(np.asarray(end_ids, dtype=np.int32))
            documents += 1
    return (np.concatenate(parts) if parts else np.zeros(0, np.int32)).astype(dtype), documents, unknown


def _write_split(source: DocumentSource, tokenizer: Tokenizer, fh: BinaryIO, name: str, workers: int,
                 progress: bool) -> dict[str, Any]:
    dtype = token_dtype(tokenizer.vocab_size)
    end_ids = document_end(tokenizer)
    digest = hashlib.sha256()
    split = _Split()
    of = f"/{source.documents:,}" if source.documents is not None else ""
    bar = tqdm(desc=f"tokenize {name}", unit="tok", unit_scale=True, file=sys.stderr, disable=not progress,
               dynamic_ncols=True, mininterval=0.5)

    def write(job: Future) -> None:
        ids, documents, unknown = job.result()
        data = ids.tobytes()
        fh.write(data)
        digest.update(data)
        split.tokens += len(ids)
        split.documents += documents
        split.unknown += unknown
        bar.update(len(ids))
        bar.set_postfix(documents=f"{split.documents:,}{of}", refresh=False)

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sedd-tokenize") as pool:
            pending: deque[Future] = deque()
            for batch in _batches(source):
                pending.append(pool.submit(_encode_batch, tokenizer, end_ids, dtype, batch))
                while len(pending) > 2 * workers:  # bounded: the corpus never sits in memory
                    write(pending.popleft())
            while pending:
                write(pending.popleft())
    finally:
        bar.close()
    if split.tokens == 0:
        raise TrainingError(f"{source.description} holds no text to tokenize")
    return {"file": f"{name}.bin", "tokens": split.tokens, "documents": split.documents,
            "unknown_characters": split.unknown, "sha256": digest.hexdigest(), "source": source.description}


def write_token_folder(out: str | os.PathLike, train: DocumentSource, tokenizer: Tokenizer, *,
                       valid: DocumentSource | None = None, workers: int | None = None, progress: bool = True,
                       force: bool = False, command: str | None = None) -> dict[str, Any]:
    """Tokenize `train` (and `valid`) into the token folder `out`; returns the manifest."""
    out = Path(out)
    if (out / MANIFEST).exists() and not force:
        raise TrainingError(f"{out} already holds a token folder ({MANIFEST}); pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise TrainingError(f"{out} exists and is not a folder")
    workers = max(1, workers or os.cpu_count() or 1)
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "tokenizer": tokenizer_entry(tokenizer),
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "recipe": "each document's tokens, then document_end; documents concatenated in order; training reads "
                  "blocks of model.length tokens",
        "source": train.description, "splits": {}, "command": command,
    }

    def fill(folder: Path) -> None:
        for name, source in (("train", train), ("valid", valid)):
            if source is None:
                continue
            with open(folder / f"{name}.bin", "wb") as fh:
                manifest["splits"][name] = _write_split(source, tokenizer, fh, name, workers, progress)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    if force and out.is_dir():
        shutil.rmtree(out)
    atomic_folder(out, fill)
    return manifest


# ---- reading ----------------------------------------------------------------------------------------


def is_token_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclass(frozen=True)
class TokenFolder:
    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenFolder:
        """The folder's manifest, checked against its files' sizes."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainingError(f"could not read {path / MANIFEST} ({exc}); tokenize again with sedd data "
                                "tokenize") from exc
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise TrainingError(f"{path / MANIFEST} is not a {FORMAT} version {VERSION} manifest")
        folder = cls(path, manifest)
        for name, split in manifest["splits"].items():
            file = path / split["file"]
            expected = split["tokens"] * folder.dtype.itemsize
            size = file.stat().st_size if file.is_file() else None
            if size != expected:
                raise TrainingError(f"{file} has {size} bytes where the manifest's {split['tokens']:,} {name} tokens "
                                    f"take {expected}; the folder is incomplete: tokenize again")
        return folder

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    def tokens(self, split: str) -> int:
        return int(self.manifest["splits"][split]["tokens"]) if split in self.manifest["splits"] else 0

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Refuse a corpus encoded with another vocabulary than the run's."""
        theirs, ours = self.manifest["tokenizer"], tokenizer_entry(tokenizer)
        if any(theirs.get(key) != ours.get(key) for key in ("name", "vocab_size", "char_ords")):
            raise TrainingError(
                f"{self.path} was tokenized for the {theirs.get('name')} tokenizer ({theirs.get('vocab_size')} "
                f"tokens) but this run uses the {ours['name']} tokenizer ({ours['vocab_size']} tokens); tokenize the "
                "text again for this model, or train the model the corpus was made for")

    def blocks(self, split: str, length: int, start: int = 0, count: int | None = None) -> TokenBlocks:
        total = self.tokens(split)
        count = total - start if count is None else count
        return TokenBlocks(self.path / self.manifest["splits"][split]["file"], self.dtype, start, count, length)


class TokenBlocks:
    """`count` tokens from `start` of a token file, cut into blocks of `length`; `crops` reads random blocks
    through a memory map opened for the read and closed after it (as nanoGPT's get_batch does), so the
    pages read never pile up in the process's resident memory."""

    def __init__(self, file: Path, dtype: np.dtype, start: int, count: int, length: int):
        self.file, self.dtype, self.start, self.count, self.length = Path(file), np.dtype(dtype), start, count, length
        self.n_blocks = count // length

    def __len__(self) -> int:
        return self.count

    def crops(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(batch, length) long: blocks drawn uniformly (with replacement) from the CPU `generator`."""
        index = torch.randint(0, self.n_blocks, (batch,), generator=generator).numpy()
        table = np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.start * self.dtype.itemsize,
                          shape=(self.n_blocks, self.length))
        try:
            return torch.from_numpy(np.asarray(table[index], dtype=np.int64))
        finally:
            del table
