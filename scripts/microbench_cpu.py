"""The CPU micro-measurements behind docs/benchmarks-sampling.md, each one section of this script.

    python scripts/microbench_cpu.py SECTION [SECTION ...]      # or: all

Sections (float32, torch's threads unless --threads; every comparison interleaved in one process,
best and median of the repeats printed):
  noise           back-to-back 2048^2 matmuls: how much this machine's speed moves on its own
  matmul-shapes   the trunk's matmul shapes at 4096 rows against the 2048^2 product
  dispatch        PyTorch/Python overhead of one network pass: the char-default layout shrunk to hidden 32
  profile         where a 4096-token char-default pass spends its time (torch.profiler)
  last-block      the last block and the network at 8 of 128 positions masked, against full width
  rotary          rotary as four half-width passes against one complex product, at 1 and 32 rows
  onednn-shapes   first use of a new row count against a repeat: oneDNN's fused GELU and plain linear
  masked-fraction mean share of positions still masked per pass over a 128-step run
  compile         eager against compiled (Inductor freezing) trunk, at --rows (compiles first)
  request-ab      one request: eager, compiled and the naive loop in turns (--model, default: the bundled one)

`sedd bench` measures the end-to-end figures; this script isolates the parts.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import measure, naive, presets, sedd_bench  # noqa: E402
from sedd_core.fast_model import FastSEDD, linear_gelu, rotary_qk, rotary_qk_interleaved  # noqa: E402
from sedd_core.loading import LoadedModel, load  # noqa: E402
from sedd_core.model import SEDD  # noqa: E402

CPU = torch.device("cpu")


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each function, the functions taking turns so that load drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def show(times: dict[str, list[float]], unit: float = 1e3, label: str = "ms") -> None:
    for name, ts in times.items():
        print(f"  {name:<28} best {min(ts) * unit:9.3f} {label}   median {statistics.median(ts) * unit:9.3f} {label}")


def char_default() -> LoadedModel:
    return presets.synthetic_model("char-default", CPU, torch.float32)


def noise(args) -> None:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    rates = []
    for _ in range(40):
        start = time.perf_counter()
        a @ b
        rates.append(2 * 2048**3 / (time.perf_counter() - start) / 1e9)
    print(f"  40 back-to-back 2048^2 products: {min(rates):.0f} to {max(rates):.0f} GFLOP/s "
          f"(median {statistics.median(rates):.0f})")


def matmul_shapes(args) -> None:
    fns, flops = {}, {}
    for m, k, n in ((2048, 2048, 2048), (4096, 256, 768), (4096, 256, 1024), (4096, 1024, 256), (4096, 256, 256)):
        x, w = torch.randn(m, k), torch.randn(n, k)
        name = f"[{m} x {k}] @ [{k} x {n}]"
        fns[name] = lambda x=x, w=w: F.linear(x, w)
        flops[name] = 2 * m * k * n
    times = interleaved(fns, args.repeats)
    for name, ts in times.items():
        print(f"  {name:<26} best {flops[name] / min(ts) / 1e9:6.1f} GFLOP/s   "
              f"median {flops[name] / statistics.median(ts) / 1e9:6.1f}")


def dispatch(args) -> None:
    config = presets.preset_config("char-default")
    small = dataclasses.replace(config, model=dataclasses.replace(config.model, hidden_size=32, cond_dim=16,
                                                                  n_heads=1, length=8))
    model = FastSEDD(SEDD(small).eval())
    x, sigma, index = torch.randint(0, 98, (1, 8)), torch.tensor([0.7]), torch.arange(4)
    with torch.inference_mode():
        show(interleaved({"log_score_at_index, hidden 32": lambda: model.log_score_at_index(x, sigma, index)},
                         args.repeats * 100, warmup=20), 1e6, "us")


def _masked_input(lm, rows: int, masked: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, lm.mask_id, (rows, lm.length), generator=torch.Generator().manual_seed(0))
    index = torch.sort(torch.randperm(rows * lm.length, generator=torch.Generator().manual_seed(1))[:masked]).values
    x.view(-1)[index] = lm.mask_id
    return x, index


def profile(args) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    lm = char_default()
    x = torch.full((32, lm.length), lm.mask_id)
    sigma, index = torch.full((32,), 2.0), torch.arange(32 * lm.length)
    out = torch.empty(index.numel(), lm.config.vocab_size)
    with torch.inference_mode():
        for _ in range(2):
            lm.runner.log_score_at_index(x, sigma, index, out=out)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                lm.runner.log_score_at_index(x, sigma, index, out=out)
    groups = {"matmuls": ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise"),
              "attention (SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu",)}
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    counted = 0
    for name, keys in groups.items():
        share = sum(e.self_cpu_time_total for e in events if e.key in keys)
        counted += share
        print(f"  {name:<18} {share / total:5.0%} of the pass's self CPU time")
    print(f"  {'everything else':<18} {(total - counted) / total:5.0%}")


def last_block(args) -> None:
    lm = char_default()
    model, block = lm.runner, lm.runner.blocks[-1]
    x, index = _masked_input(lm, 1, 8)
    sigma = torch.tensor([0.7])
    with torch.inference_mode():
        hidden = torch.randn(1, lm.length, lm.config.model.hidden_size)
        c = F.silu(lm.model.sigma_map(sigma))
        rotary = model._rotary_tables(lm.length, CPU)

        def at_eight():
            mod, attended = block.attention_half(hidden, rotary, c)
            return block.at_positions(hidden, attended, mod, index, index // lm.length)

        show(interleaved({"last block, full width": lambda: block(hidden, rotary, c),
                          "last block, 8 positions": at_eight,
                          "its attention half only": lambda: block.attention_half(hidden, rotary, c),
                          "network, forward": lambda: model(x, sigma),
                          "network, 8 masked positions": lambda: model.log_score_at_index(x, sigma, index)},
                         args.repeats * 20))


def rotary(args) -> None:
    lm = char_default()
    cos, sin = lm.model.rotary_emb(lm.length, CPU)
    polar = torch.complex(cos, sin)
    heads = lm.config.model.n_heads
    for rows in (1, 32):
        qkv = torch.randn(rows, lm.length, 3, heads, lm.config.model.hidden_size // heads)
        with torch.inference_mode():
            print(f" rows {rows}:")
            show(interleaved({"four half-width passes": lambda qkv=qkv: rotary_qk(qkv, cos, sin),
                              "one complex product": lambda qkv=qkv: rotary_qk_interleaved(qkv, polar)},
                             args.repeats * 20), 1e6, "us")


def onednn_shapes(args) -> None:
    lm = char_default()
    linear = lm.model.blocks[0].mlp[0]
    with torch.inference_mode():
        for rows in (70, 90, 100, 128):
            row = []
            for name, fn in (("fused GELU", lambda h: linear_gelu(h, linear)),
                             ("plain linear", lambda h: F.linear(h, linear.weight, linear.bias))):
                h = torch.randn(rows, linear.in_features)
                first = time.perf_counter()
                fn(h)
                first = time.perf_counter() - first
                again = min(_seconds(fn, h) for _ in range(5))
                row.append(f"{name} first {first * 1e3:.2f} ms, again {again * 1e3:.2f} ms")
            print(f"  {rows:4d} rows: " + "; ".join(row))


def _seconds(fn: Callable[[torch.Tensor], object], arg: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def masked_fraction(args) -> None:
    for name, lm in (("char-default, random weights", char_default()),
                     (f"{args.model}, trained", load(args.model, device=CPU, dtype=torch.float32))):
        _, positions, passes = sedd_bench.run_ours(lm, 1, 128, lm.length, seed=3)
        print(f"  {name:<30} {positions / passes / lm.length:.1%} of positions masked per pass on average")


def compile_trunk(args) -> None:
    eager, compiled = char_default(), char_default()
    compiled.runner = FastSEDD(compiled.model, compile="freeze")
    x = torch.randint(0, eager.mask_id, (args.rows, eager.length))
    sigma = torch.full((args.rows,), 0.7)
    with torch.inference_mode():
        start = time.perf_counter()
        compiled.runner.trunk(x, sigma)
        print(f"  compiled {args.rows} rows in {time.perf_counter() - start:.1f} s")
        show(interleaved({"eager trunk": lambda: eager.runner.trunk(x, sigma),
                          "compiled trunk (freezing)": lambda: compiled.runner.trunk(x, sigma)},
                         max(10, args.repeats * 20 // args.rows)))


def request_ab(args) -> None:
    eager = load(args.model, device=CPU, dtype=torch.float32)
    compiled = load(args.model, device=CPU, dtype=torch.float32, compile="freeze")
    sedd_bench.run_ours(compiled, 1, 2, compiled.length)

    def naive_loop():
        naive.naive_generate(eager.model, eager.graph, eager.noise, 1, eager.length, 128,
                             torch.Generator().manual_seed(0), naive.authors_forward)

    times = interleaved({"eager": lambda: sedd_bench.run_ours(eager, 1, 128, eager.length),
                         "compiled": lambda: sedd_bench.run_ours(compiled, 1, 128, compiled.length),
                         "naive": naive_loop}, args.repeats, warmup=1)
    show(times, 1, "s")
    for name in ("eager", "compiled"):
        paired = statistics.median(n / o for n, o in zip(times["naive"], times[name]))
        print(f"  {name}: paired speedup over the naive loop {paired:.2f}x")


SECTIONS = {"noise": noise, "matmul-shapes": matmul_shapes, "dispatch": dispatch, "profile": profile,
            "last-block": last_block, "rotary": rotary, "onednn-shapes": onednn_shapes,
            "masked-fraction": masked_fraction, "compile": compile_trunk, "request-ab": request_ab}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sections", nargs="+", choices=[*SECTIONS, "all"])
    p.add_argument("--repeats", type=int, default=8, help="base repeat count (sections scale it)")
    p.add_argument("--rows", type=int, default=1, help="rows per pass for `compile`")
    p.add_argument("--model", default="default", help="model source for masked-fraction and request-ab")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {measure.device_name(CPU)}")
    for name in SECTIONS if "all" in args.sections else args.sections:
        print(f"\n{name}")
        SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
