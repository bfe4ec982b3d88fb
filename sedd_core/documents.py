"""Documents to tokenize, read lazily from text files, JSON-lines files, folders of them, or Hugging Face
datasets (from the hub, streamed or not, or a dataset saved to disk with `save_to_disk`).

A `DocumentSource` yields pieces of text, each flagged when it ends a document: a text file is one
document, read in pieces of about 4 MB cut only after a newline that a non-space follows (GPT-2's
pre-tokeniser never joins across such a point, so the pieces encode as the whole would); a JSON-lines
line and a dataset row are one document each. Nothing is read before iteration, so a corpus of any size
streams through in bounded memory.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PIECE_CHARS = 1 << 22
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_BREAK = re.compile(r"\n(?=\S)")


class DocumentError(ValueError):
    """A source that cannot be read as documents; the message says what to fix."""


@dataclass
class DocumentSource:
    """Pieces of text `(text, ends_document)` in order; `documents` is their count when known in advance."""

    description: str
    documents: int | None
    _pieces: Callable[[], Iterator[tuple[str, bool]]]

    def __iter__(self) -> Iterator[tuple[str, bool]]:
        return self._pieces()


def text_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` in pieces of about `size` characters, cut only after a newline that a non-space follows."""
    out, start = [], 0
    while start < len(text):
        match = _BREAK.search(text, start + size) if start + size < len(text) else None
        end = match.end() if match else len(text)
        out.append(text[start:end])
        start = end
    return out


def _text_file(path: Path) -> Iterator[tuple[str, bool]]:
    """One document: the file in pieces, the last one flagged."""
    buffer = ""
    with open(path, encoding="utf-8") as fh:
        while block := fh.read(PIECE_CHARS):
            buffer += block
            cut = None
            for match in _BREAK.finditer(buffer, max(0, len(buffer) - len(block) - 1)):
                cut = match.end()
            if cut is not None and cut < len(buffer):
                yield buffer[:cut], False
                buffer = buffer[cut:]
    yield buffer, True


def _row_text(row: dict, column: str, where: str) -> str:
    if column not in row:
        raise DocumentError(f"{where} has no field {column!r}; it has {', '.join(map(repr, row)) or 'none'}: "
                            "name the text field with --column")
    text = row[column]
    if not isinstance(text, str):
        raise DocumentError(f"{where}: the field {column!r} holds {type(text).__name__}, not text")
    return text


def _jsonl_file(path: Path, column: str) -> Iterator[tuple[str, bool]]:
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DocumentError(f"{path}:{number} is not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DocumentError(f"{path}:{number} is not a JSON object")
            text = _row_text(row, column, f"{path}:{number}")
            if text:
                yield text, True


def files_of(path: Path) -> list[Path]:
    """A file, or the text and JSON-lines files anywhere under a folder (sorted)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
        if not found:
            raise DocumentError(f"the folder {path} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
        return found
    raise DocumentError(f"no such file or folder: {path}")


def _file_source(paths: list[Path], column: str) -> DocumentSource:
    files = [f for path in paths for f in files_of(path)]

    def pieces() -> Iterator[tuple[str, bool]]:
        for f in files:
            if f.suffix in JSONL_SUFFIXES:
                yield from _jsonl_file(f, column)
            else:
                yield from _text_file(f)

    text_files = [f for f in files if f.suffix not in JSONL_SUFFIXES]
    known = len(text_files) if len(text_files) == len(files) else None
    return DocumentSource(", ".join(map(str, paths)), known, pieces)


def _hf_source(name: str, *, split: str, column: str, config: str | None, streaming: bool) -> DocumentSource:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("Hugging Face datasets need the `datasets` package: pip install 'sedd-serve[data]'") from exc
    local = Path(name).expanduser()
    if local.is_dir():  # written by Dataset.save_to_disk / DatasetDict.save_to_disk
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DocumentError(f"the dataset in {local} has no split {split!r}; it has {', '.join(ds)}")
            ds = ds[split]
        if streaming:
            ds = ds.to_iterable_dataset()
    else:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    columns = ds.column_names
    if columns is not None and column not in columns:
        raise DocumentError(f"hf:{name} [{split}] has no column {column!r}; columns: {', '.join(columns)}; "
                            "name the text column with --column")
    known = None if streaming else len(ds)

    def pieces() -> Iterator[tuple[str, bool]]:
        for number, row in enumerate(ds):
            text = _row_text(row, column, f"hf:{name} [{split}] row {number}")
            if text:
                yield text, True

    mode = ", streamed" if streaming else ""
    return DocumentSource(f"hf:{name} [{split}{mode}]", known, pieces)


def document_source(specs: list[str], *, column: str = "text", split: str = "train", hf_config: str | None = None,
                    streaming: bool = False) -> DocumentSource:
    """Documents of `specs`: paths of text / JSON-lines files and folders, or one `hf:DATASET` (a hub name
    or a folder written by `save_to_disk`)."""
    if not specs:
        raise DocumentError("no source of text given")
    hf = [s for s in specs if str(s).startswith("hf:")]
    if hf:
        if len(specs) > 1:
            raise DocumentError("an hf: dataset is tokenized on its own; give it without other sources")
        return _hf_source(str(hf[0])[3:], split=split, column=column, config=hf_config, streaming=streaming)
    return _file_source([Path(s).expanduser() for s in specs], column)
