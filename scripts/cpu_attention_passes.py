#!/usr/bin/env python3
"""The measurements behind docs/benchmarks.md, "Third session: a VM with twice the bf16 rate".

    python scripts/cpu_attention_passes.py attention   # one attention call: SDPA, flex, written out (us, error)
    python scripts/cpu_attention_passes.py error       # the network's log-score error against float32, per attention
    python scripts/cpu_attention_passes.py passes      # ms per pass of 8 staggered one-row jobs, fresh process
    python scripts/cpu_attention_passes.py setup       # a compiled Linear + GELU over new row counts, twice

Run with the server's wait policy (GOMP_SPINCOUNT=1000) on an otherwise idle machine; 2 torch threads.
"""
from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sedd_core import fast_model  # noqa: E402
from sedd_core.fast_model import FastSEDD, attend_unfused  # noqa: E402
from sedd_core.generation import make_job  # noqa: E402
from sedd_core.loading import load, load_network  # noqa: E402
from sedd_core.sampling import denoising_step  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def relative(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours.float() - expected).norm() / expected.norm()).item()


def attention(calls: int, dtype: torch.dtype) -> None:
    """One call of (8 rows, 4 heads, 128 positions, 64) in bf16, error against float32 attention on the same
    bf16 inputs; then the written-out attention compiled against SDPA at several sizes in `dtype`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    q, k, v = ((1.5 * torch.randn(8, 4, 128, 64)).bfloat16() for _ in range(3))
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())

    def math_backend():
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)

    def written_out_float32_scores():
        scores = torch.matmul(q.float() * 0.125, k.float().transpose(-1, -2))
        return torch.matmul(torch.softmax(scores, -1).bfloat16(), v)

    flex = torch.compile(flex_attention, dynamic=False)
    compiled = torch.compile(attend_unfused, dynamic=False)
    variants = {
        "SDPA, bf16": lambda: F.scaled_dot_product_attention(q, k, v),
        "SDPA in float32": lambda: F.scaled_dot_product_attention(q.float(), k.float(), v.float()),
        "SDPA math backend, bf16": math_backend,
        "flex_attention, compiled": lambda: flex(q, k, v),
        "written out, eager, bf16 scores": lambda: attend_unfused(q, k, v),
        "written out, eager, float32 scores": written_out_float32_scores,
        "written out, compiled (attend_unfused)": lambda: compiled(q, k, v),
    }
    print("| attention, 8 x 4 x 128 x 64 | us per call | error |\n|---|---|---|")
    for name, fn in variants.items():
        print(f"| {name} | {per_call_us(fn, calls):,.0f} | {relative(fn(), expected):.1e} |")
    print(f"\n| rows x heads x positions, {dtype} | SDPA us | written out, compiled, us |\n|---|---|---|")
    for rows, heads, length in ((1, 4, 128), (8, 4, 128), (8, 4, 64), (4, 4, 256), (1, 4, 512), (1, 12, 1024)):
        torch._dynamo.reset()
        compiled = torch.compile(attend_unfused, dynamic=False)
        q, k, v = (torch.randn(rows, heads, length, 64).to(dtype) for _ in range(3))
        n = max(10, calls * 8 * 128 * 128 // (rows * heads * length * length) // 4)
        sdpa_us = per_call_us(partial(F.scaled_dot_product_attention, q, k, v), n)
        print(f"| {rows} x {heads} x {length} | {sdpa_us:,.0f} | {per_call_us(partial(compiled, q, k, v), n):,.0f} |")


def error() -> None:
    """Log scores of FastSEDD in bf16 (eager) with SDPA and with the written-out attention, against the
    float32 network: 4 rows at sigma 0.05-10, every other position masked on absorbing models."""
    sdpa = fast_model.attend

    def written_out(q, k, v):
        batch, length = q.shape[:2]
        return attend_unfused(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2) \
            .reshape(batch, length, -1)

    folders = [ROOT / "sedd_core" / "default_model"] + [ROOT / "tests" / "data" / "reference" / name / "oxen-layout"
                                                        for name in ("absorb-a", "uniform-a")]
    print("| model | SDPA | written out |\n|---|---|---|")
    for folder in folders:
        full, config, _ = load_network(folder, torch.device("cpu"), torch.float32)
        half, _, _ = load_network(folder, torch.device("cpu"), torch.bfloat16)
        x = torch.randint(0, config.tokens, (4, config.model.length), generator=torch.Generator().manual_seed(0))
        if config.mask_id is not None:
            x[:, ::2] = config.mask_id
        sigma = torch.tensor([0.05, 1.0, 5.0, 10.0])
        with torch.no_grad():
            expected = full(x, sigma).float()
            finite = torch.isfinite(expected)
            errors = []
            for attention_fn in (sdpa, written_out):
                fast_model.attend = attention_fn
                errors.append(relative(FastSEDD(half)(x, sigma)[finite], expected[finite]))
            fast_model.attend = sdpa
        print(f"| {folder.parent.name if folder.name == 'oxen-layout' else 'bundled'} | {errors[0]:.3e} | "
              f"{errors[1]:.3e} |")


def passes(rounds: int) -> None:
    """ms per pass of 8 one-row jobs at staggered times (as a server's 8 clients), 128 passes per round, the
    first round in a fresh process: the compiled bf16 step as `make serve` runs it."""
    lm = load("default", device="cpu", dtype="bfloat16", compile="freeze")
    lm.runner.warm(16, lm.length)
    seeds = iter(range(10**6))
    for r in range(rounds):
        jobs = [make_job(lm, steps=64, seed=next(seeds)) for _ in range(8)]
        for i, job in enumerate(jobs):
            for _ in range(i * 8):
                denoising_step(lm.runner, lm.graph, lm.noise, [job])
        start = time.perf_counter()
        for _ in range(128):
            jobs = [job if not job.done else make_job(lm, steps=64, seed=next(seeds)) for job in jobs]
            denoising_step(lm.runner, lm.graph, lm.noise, jobs)
        print(f"round {r}: {(time.perf_counter() - start) / 128 * 1e3:.2f} ms per pass")


def setup() -> None:
    """oneDNN's setup for a new number of rows: a compiled bf16 Linear + GELU of the bundled model's MLP shape
    over 500 row counts, the first time and again."""
    layer = torch.nn.Linear(256, 1024).bfloat16().eval()
    fn = torch.compile(lambda x: F.gelu(layer(x), approximate="tanh"), dynamic=True)
    with torch.no_grad():
        fn(torch.randn(7, 256).bfloat16())
        for attempt in ("first time", "again"):
            start = time.perf_counter()
            for rows in range(100, 600):
                fn(torch.randn(rows, 256).bfloat16())
            print(f"{attempt}: {(time.perf_counter() - start) / 500 * 1e6:,.0f} us per call")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("attention", "error", "passes", "setup"))
    p.add_argument("--calls", type=int, default=300, help="attention: calls per timing at 8 x 4 x 128")
    p.add_argument("--rounds", type=int, default=4, help="passes: rounds of 128 passes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", help="attention: the dtype of the table of sizes")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "attention":
        attention(args.calls, getattr(torch, args.dtype))
    elif args.what == "error":
        error()
    elif args.what == "passes":
        passes(args.rounds)
    else:
        setup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
