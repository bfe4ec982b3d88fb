"""Resident memory of GPT-2-token training on token folders of two sizes (docs/training.md, "Memory").

For each size: writes synthetic English-like documents (JSON lines, words drawn from the GPT-2 vocabulary,
seeded), tokenizes them with `sedd data tokenize` (timed), then
  1. runs `sedd train` on the folder (a tiny GPT-2-vocabulary model, fixed steps) and samples the process's
     VmRSS every 0.1 s: the peak is what training holds, with the corpus memory-mapped;
  2. reads random model.length blocks through `TokenBlocks.crops` until it has read as many tokens as the
     corpus holds, and reports VmRSS before and after; then the same reads through one memory map kept open,
     to show what a map kept open would pile up.

    python scripts/train_memory.py --sizes-mb 20 200 --work /tmp/sedd-memory

Needs tests/data/vocab/gpt2.tiktoken (no network). Prints a Markdown table and one JSON line per size.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = ROOT / "tests" / "data" / "vocab" / "gpt2.tiktoken"


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def words() -> list[str]:
    from sedd_core.tokenizers import load_gpt2

    tok = load_gpt2(None, VOCAB)
    out = [tok.decode_token(i) for i in range(256, 20000)]
    return [w for w in out if w.startswith(" ") and w[1:].isalpha()]


def write_corpus(folder: Path, megabytes: int, vocabulary: list[str]) -> None:
    """JSON-lines documents of about 200 words, until about megabytes * 1.05 MB of uint16 tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(megabytes)
    target_tokens = int(megabytes * 1e6 / 2 * 1.05)
    tokens, part = 0, 0
    while tokens < target_tokens:
        with open(folder / f"part{part:03d}.jsonl", "w") as fh:
            for _ in range(5000):
                n = rng.randint(100, 300)
                fh.write(json.dumps({"text": "".join(rng.choices(vocabulary, k=n)).strip() + "."}) + "\n")
                tokens += n + 2  # each word is one token here; the period and EOS
        part += 1


def sedd(*args: str, env: dict[str, str]) -> list[str]:
    return [str(Path(sys.executable).parent / "sedd"), *args]


def train_peak(tokens: Path, run: Path, steps: int, env: dict[str, str]) -> tuple[float, float]:
    """(peak VmRSS in MB, seconds) of `sedd train` on the folder."""
    cmd = sedd("train", "--config", "tiny", "--data", str(tokens), "--out", str(run), "--no-progress", "--device",
               "cpu", "--set", "tokenizer=gpt2", "--set", "model.length=64", "--set", f"training.n_iters={steps}",
               "--set", "training.eval_every=0", "--set", "training.snapshot_every=0", "--set",
               "training.checkpoint_every=0", "--set", "track=none", env=env)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while proc.poll() is None:
        try:
            peak = max(peak, rss_mb(proc.pid))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.1)
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise SystemExit(f"sedd train failed:\n{err[-3000:]}")
    return peak, time.perf_counter() - start


def reader_sweep(tokens: Path) -> dict[str, float]:
    """VmRSS before and after reading as many tokens as the corpus holds, per-read maps vs one kept open."""
    import numpy as np
    import torch

    from sedd_core.training.token_file import TokenFolder

    folder = TokenFolder.open(tokens)
    blocks = folder.blocks("train", 1024)
    generator = torch.Generator().manual_seed(0)
    reads = max(1, blocks.n_blocks // 256)
    before = rss_mb()
    for _ in range(reads):
        blocks.crops(256, generator)
    after = rss_mb()
    table = np.memmap(blocks.file, dtype=blocks.dtype, mode="r", shape=(blocks.n_blocks, 1024))
    for _ in range(reads):  # the same reads through one map kept open: its pages count in RSS
        np.asarray(table[torch.randint(0, blocks.n_blocks, (256,), generator=generator).numpy()], dtype=np.int64)
    kept_open = rss_mb()
    del table
    return {"rss_before_mb": before, "rss_after_per_read_maps_mb": after, "rss_after_one_open_map_mb": kept_open,
            "tokens_read": reads * 256 * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sedd-memory"))
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    env = {**os.environ, "SEDD_GPT2_VOCAB": str(VOCAB), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    vocabulary = words()
    rows = []
    for size in args.sizes_mb:
        text, tokens = args.work / f"text-{size}mb", args.work / f"tokens-{size}mb"
        if not tokens.is_dir():
            write_corpus(text, size, vocabulary)
            start = time.perf_counter()
            subprocess.run(sedd("data", "tokenize", str(text), "--out", str(tokens), "--quiet", env=env), env=env,
                           check=True, stdout=subprocess.DEVNULL)
            tokenize_s = time.perf_counter() - start
        else:
            tokenize_s = float("nan")
        manifest = json.loads((tokens / "manifest.json").read_text())
        n = manifest["splits"]["train"]["tokens"]
        run = args.work / f"run-{size}mb"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        peak, seconds = train_peak(tokens, run, args.steps, env)
        row = {"corpus_mb": round(n * 2 / 1e6, 1), "tokens": n, "tokenize_s": round(tokenize_s, 1),
               "train_peak_rss_mb": round(peak, 1), "train_s": round(seconds, 1), "steps": args.steps,
               **{k: round(v, 1) for k, v in reader_sweep(tokens).items()},
               "loadavg": os.getloadavg()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| token file | tokens | sedd train peak RSS | reader RSS before -> after (per-read maps) | "
          "one map kept open |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['corpus_mb']} MB | {r['tokens']:,} | {r['train_peak_rss_mb']} MB | {r['rss_before_mb']} -> "
              f"{r['rss_after_per_read_maps_mb']} MB | {r['rss_after_one_open_map_mb']} MB |")


if __name__ == "__main__":
    main()
