"""Training throughput on this machine's CPU: one rank against two gloo ranks under torchrun
(docs/training.md, "Throughput").

Each run is `sedd train --config default` (the bundled model's network: 5.4 M parameters, 128 characters) on
a synthetic character corpus, global batch 32, `--steps` steps, evaluation only at the last step, so the
tokens/s of metrics.jsonl is the training loop's alone. Settings, interleaved `--repeats` times:

    1 rank,  1 thread      (OMP_NUM_THREADS=1)
    1 rank,  2 threads     (OMP_NUM_THREADS=2: both cores to one process)
    2 ranks, 1 thread each (torchrun --nproc-per-node 2, gloo on loopback)

    python scripts/train_throughput.py --work /tmp/sedd-throughput

Prints one JSON line per run (with the load average before and after) and a Markdown table of medians.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = {"1 rank x 1 thread": (1, 1), "1 rank x 2 threads": (1, 2), "2 ranks x 1 thread": (2, 1)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_run(ranks: int, threads: int, corpus: Path, run: Path, steps: int) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    sedd = str(Path(sys.executable).parent / "sedd")
    args = ["train", "--config", "default", "--data", str(corpus), "--out", str(run), "--no-progress", "--device",
            "cpu", "--set", "training.batch_size=32", "--set", f"training.n_iters={steps}",
            "--set", f"training.eval_every={steps}", "--set", "training.snapshot_every=0",
            "--set", "training.checkpoint_every=0", "--set", "training.eval_batches=1", "--set", "track=none"]
    if ranks == 1:
        cmd = [sedd, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--local-addr", "127.0.0.1",
               "--no-python", sedd, *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo"}
    load_before = os.getloadavg()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-4000:])
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return {"ranks": ranks, "threads_per_rank": threads, "tokens_per_s": round(record["tokens_per_s"]),
            "steps": steps, "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sedd-throughput"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    corpus = args.work / "corpus.txt"
    if not corpus.is_file():
        import random

        rng = random.Random(0)
        words = ["the", "king", "and", "queen", "of", "night", "shall", "speak", "to", "my", "lord", "with", "love"]
        corpus.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(40000)))
    results: dict[str, list[int]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, (ranks, threads) in SETTINGS.items():
            row = one_run(ranks, threads, corpus, args.work / "run", args.steps)
            results[name].append(row["tokens_per_s"])
            print(json.dumps({"setting": name, **row}), flush=True)
    print("\n| setting | tokens/s (median of runs) | runs |")
    print("| --- | --- | --- |")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):,.0f} | {', '.join(f'{v:,}' for v in values)} |")


if __name__ == "__main__":
    main()
