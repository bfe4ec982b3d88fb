#!/usr/bin/env python3
"""Where one request's time goes on a CPU, by kind of work: torch.profiler over one request (1 sample, 128
steps, the bundled model) per arm, after an unprofiled warm-up request.

    python scripts/profile_cpu_step.py                                   # float32, bfloat16, bfloat16+compile
    python scripts/profile_cpu_step.py --arm bfloat16 --threads 1 --rows 8 --steps 64
    PYTHONPATH=/tmp/sedd-bench-96bdb8c python scripts/profile_cpu_step.py --arm float32 --arm bfloat16   # old code

An arm is DTYPE, DTYPE+compile (SEDD_COMPILE's Inductor freezing) or DTYPE+compile-py (the same with
Inductor's Python wrapper instead of its C++ one, so that the profiler sees the graph's matmuls and attention
as calls of their own; with the C++ wrapper they count as "Inductor kernels"). Apart from that switch it uses
only `sedd_core.load` and `benchmarks.sedd_bench.run_ours`, so it profiles older checkouts too (PYTHONPATH). Per arm it prints the
request's wall time with and without the profiler, the operator calls per step, and self CPU time per step
in: matmuls (aten mm/addmm/bmm, oneDNN linear), attention (SDPA), layer norms, casts and copies
(to/_to_copy/copy_), Inductor's generated kernels (the self time of a compiled graph's call), dynamo
(guards, graph entry) and everything else; and how much of the request is the network's call
(`log_score_at_index`) against the rest of the step (the sampler's vocabulary-wide maths and the job's
bookkeeping). Self CPU time sums the threads, so with 2 threads it can exceed wall time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sedd_bench import run_ours  # noqa: E402
from sedd_core import load  # noqa: E402

CATEGORIES = {
    "matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "mkldnn::_linear_pointwise",
                "aten::linear", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention"),
    "layer norms": ("aten::native_layer_norm", "aten::layer_norm"),
    "casts, copies": ("aten::to", "aten::_to_copy", "aten::copy_"),
}
DYNAMO = ("TorchDynamo Cache Lookup", "Torch-Compiled Region", "Pregraph bytecode", "CompiledFunction",
          "AOTDispatcher Runtime Wrapper Prologue")


def category(key: str) -> str:
    if "CompiledFxGraph" in key:
        return "Inductor kernels"
    if key.startswith(DYNAMO):
        return "dynamo"
    for name, keys in CATEGORIES.items():
        if key in keys:
            return name
    return "other"


def profile_arm(arm: str, rows: int, steps: int) -> dict:
    dtype, _, compiled = arm.partition("+")
    start = time.perf_counter()
    lm = load("default", device="cpu", dtype=dtype, compile="freeze" if compiled else None)
    if compiled == "compile-py":
        lm.runner._inductor.pop("cpp_wrapper", None)
    run_ours(lm, rows, 2, lm.length)
    if compiled:
        lm.runner.warm(rows, lm.length)
    ready = time.perf_counter() - start
    inner = lm.runner.log_score_at_index

    def network_call(*args, **kwargs):
        with record_function("network call"):
            return inner(*args, **kwargs)

    lm.runner.log_score_at_index = network_call
    start = time.perf_counter()
    _, _, passes = run_ours(lm, rows, steps, lm.length, seed=1)
    plain = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run_ours(lm, rows, steps, lm.length, seed=1)
        profiled = time.perf_counter() - start
    events = prof.key_averages()
    by_category: dict[str, float] = {}
    calls = 0
    network = 0.0
    for event in events:
        if event.key == "network call":
            network = event.cpu_time_total
            continue
        calls += event.count
        kind = category(event.key)
        by_category[kind] = by_category.get(kind, 0.0) + event.self_cpu_time_total
    return {"arm": arm, "ready_s": ready, "wall_s": plain, "profiled_s": profiled, "passes": passes,
            "calls": calls, "by_category_us": by_category, "network_us": network, "dtype": str(lm.dtype)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", action="append", default=None, help="DTYPE, DTYPE+compile or DTYPE+compile-py "
                                                                 "(repeatable)")
    p.add_argument("--rows", type=int, default=1, help="samples in the request (default 1)")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: PyTorch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = args.arm or ["float32", "bfloat16", "bfloat16+compile"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          + ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
          + f", load average {os.getloadavg()}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(f"one request: {args.rows} sample(s), {args.steps} steps, the bundled model; per step = per request / "
          f"{args.steps + 1}")
    kinds = ["matmuls", "attention", "layer norms", "casts, copies", "Inductor kernels", "dynamo", "other"]
    print("| arm | request s (profiled) | network call, ms/step | rest of step, ms/step | op calls/step | "
          + " | ".join(f"{k}, ms/step" for k in kinds) + " |")
    print("|---|---|---|---|---|" + "---|" * len(kinds))
    for arm in arms:
        r = profile_arm(arm, args.rows, args.steps)
        per = args.steps + 1
        network = r["network_us"] / 1e3 / per
        rest = r["profiled_s"] * 1e3 / per - network
        cells = [f"{r['by_category_us'].get(k, 0.0) / 1e3 / per:.2f}" for k in kinds]
        print(f"| {arm} | {r['wall_s']:.3f} ({r['profiled_s']:.3f}) | {network:.2f} | {rest:.2f} | "
              f"{r['calls'] / per:.0f} | " + " | ".join(cells) + " |", flush=True)
    print(f"load average after {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
