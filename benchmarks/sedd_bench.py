"""`sedd bench`: how fast sampling runs on this machine, against a naive loop and the hardware's own peak.

What it measures, all in one run on the same weights (a real model folder with --model, else a
synthetic model with random weights of a named --preset shape):

1. one request (1 sample) at --steps and --length: our generation path (`make_job` + `denoising_step`),
   in float32 and, on a CPU with native bf16 instructions, in bfloat16 too (without --dtype), against a
   naive loop that does what the authors' `pc_sampler` does: the full network output, the
   vocabulary-wide graph formulas (graph.py) at every position of every step, sampled with the authors'
   `sample_categorical`, one request at a time, analytic predictor, final denoise. The naive loop runs
   the authors' network code (`authors_forward`, the structure of their model/transformer.py) on our
   weights; a second baseline runs the same naive loop over our network (`model.forward`) so that the
   gain from the loop and the gain from the network can be told apart.
2. samples per second against rows per pass (one request of `rows` samples).
3. the network's achieved FLOP/s against this machine's measured matrix-multiply peak at the same dtype
   (best of several large square matmuls), at several tokens per pass, and the whole sampling loop's.
   FLOPs are counted analytically: 2 x (weights of the matmuls) per token, attention 4 x L x H per token
   per block, the per-row conditioning matmuls once per row, the output layer only where it is computed
   (in the sampling loop the last block's attention projection and MLP too: see FlopCount.sampling_loop).
4. peak memory per configuration: torch.cuda.max_memory_allocated above the memory held before the run
   on CUDA; on a CPU the growth of the process's peak resident set (VmHWM, reset through
   /proc/self/clear_refs before each configuration; ru_maxrss growth where that is unavailable).

The naive loop (benchmarks/naive.py) is a measuring stick, not part of the library API.
"""
from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch

from sedd_core.fast_model import FastSEDD
from sedd_core.generation import make_job
from sedd_core.loading import LoadedModel, load, resolve_device, resolve_dtype
from sedd_core.sampling import denoising_step

from .measure import FlopCount, MatmulPeak, PeakMemory, device_name, memory_method, stats, timed
from .naive import authors_forward, naive_generate
from .presets import PRESETS, synthetic_model

# ---------------------------------------------------------------------------------------------------
# Our path
# ---------------------------------------------------------------------------------------------------

def run_ours(lm: LoadedModel, rows: int, steps: int, length: int, seed: int = 0,
             fused: bool = False) -> tuple[torch.Tensor, int, int]:
    """One request of `rows` samples through the library's generation path (`fused`: the step maths
    as one compiled pass, see sampling.denoising_step).

    Returns (tokens, positions that got the output layer, network passes run): a step with no
    masked position left runs no pass."""
    job = make_job(lm, num_samples=rows, steps=steps, length=length, predictor="analytic", seed=seed)
    positions = passes = 0
    while not job.done:  # generation.iterate, keeping the count of output-layer positions
        work = denoising_step(lm.runner, lm.graph, lm.noise, [job], fused=fused)
        positions += work
        passes += work > 0
    return job.x, positions, passes


def bench_one_request(lm: LoadedModel, steps: int, length: int, repeats: int, naive_steps: int | None,
                      baselines: tuple[str, ...], log: Callable[[str], None],
                      others: dict[str, LoadedModel] | None = None) -> dict[str, Any]:
    """`others`: the same weights in other dtypes (name -> model), whose run of our path takes its turn in
    every repeat beside `lm`'s; the naive baselines run on `lm`."""
    device = lm.device
    others = others or {}
    naive_run_steps = steps if naive_steps is None else min(naive_steps, steps)
    scale = 1.0 if naive_run_steps >= steps else (steps + 1) / max(naive_run_steps, 1)
    networks = {"authors": authors_forward, "loop": lambda model, x, sigma: lm.runner(x, sigma)}  # loop: our network

    def naive(network):
        gen = torch.Generator(device=device).manual_seed(0)
        max_steps = None if naive_run_steps >= steps else naive_run_steps
        return lambda: naive_generate(lm.model, lm.graph, lm.noise, 1, length, steps, gen, network, max_steps)

    # warm up every path once (allocator, oneDNN primitives, cuBLAS handles)
    for model in (lm, *others.values()):
        run_ours(model, 1, min(steps, 2), length)
    for name in baselines:
        naive_generate(lm.model, lm.graph, lm.noise, 1, length, 2, None, networks[name], 1)
    ours_names = {f"ours_{name}": model for name, model in others.items()}
    times: dict[str, list[float]] = {"ours": [], **{name: [] for name in ours_names},
                                     **{name: [] for name in baselines}}
    for r in range(repeats):  # interleaved, so that load from other processes hits all paths alike
        times["ours"].append(timed(lambda seed=r: run_ours(lm, 1, steps, length, seed=seed), device)[0])
        for name, model in ours_names.items():
            times[name].append(timed(lambda seed=r, model=model: run_ours(model, 1, steps, length, seed=seed),
                                     device)[0])
        for name in baselines:
            times[name].append(timed(naive(networks[name]), device)[0] * scale)
        log(f"  one request, repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()))
    result: dict[str, Any] = {"rows": 1, "steps": steps, "length": length, "ours_s": stats(times["ours"])}
    labels = {"authors": "naive_s", "loop": "naive_our_network_s"}
    for name in baselines:
        result[labels[name]] = stats(times[name])
        result[f"speedup_{name}_median"] = statistics.median(times[name]) / statistics.median(times["ours"])
        result[f"speedup_{name}_min"] = min(times[name]) / min(times["ours"])
        # each repeat runs ours and the baseline back to back: the median of those ratios resists load drift
        result[f"speedup_{name}_paired"] = statistics.median(
            theirs / ours for theirs, ours in zip(times[name], times["ours"]))
    # our path in each dtype: the same entries, with the naive loop (in lm's dtype) as the yardstick
    result["by_dtype"] = {}
    for name, key in ((_dtype_name(lm.dtype), "ours"), *((name, f"ours_{name}") for name in others)):
        entry = {"ours_s": stats(times[key])}
        for baseline in baselines:
            entry[f"speedup_{baseline}_paired"] = statistics.median(
                theirs / ours for theirs, ours in zip(times[baseline], times[key]))
        entry["paired_vs_first_dtype"] = statistics.median(
            first / ours for first, ours in zip(times["ours"], times[key]))
        result["by_dtype"][name] = entry
    result["naive_steps_run"] = naive_run_steps
    result["naive_extrapolated"] = scale != 1.0
    if scale != 1.0:
        result["naive_note"] = (f"naive ran {naive_run_steps} of {steps} predictor steps; its time is scaled by "
                                f"(steps + 1) / {naive_run_steps} (every naive step costs the same)")
    return result


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bench_dtypes(dtype: str | None, device: torch.device) -> list[torch.dtype]:
    """The dtypes to time our path in: `dtype` alone when given; else float32 first (every section runs in
    it, as before) and, where `auto` picks another dtype on this device (bfloat16 on a CPU with native
    bf16 instructions), that one beside it in the one-request section; on CUDA the auto dtype alone."""
    if dtype is not None:
        return [resolve_dtype(dtype, device)]
    auto = resolve_dtype(None, device)
    if device.type == "cuda" or auto == torch.float32:
        return [auto]
    return [torch.float32, auto]


def bench_rows(lm: LoadedModel, rows_list: list[int], steps: int, length: int, repeats: int,
               peak: MatmulPeak | None, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Samples/s of one request of `rows` samples. The row counts take turns within each repeat,
    so that load from other processes on a shared machine hits every count alike."""
    device = lm.device
    count = FlopCount.of(lm.config)
    for rows in rows_list:
        run_ours(lm, rows, 1, length)  # warm up this shape
    times: dict[int, list[float]] = {rows: [] for rows in rows_list}
    rates: dict[int, list[float]] = {rows: [] for rows in rows_list}
    memory: dict[int, int | None] = {rows: None for rows in rows_list}
    for r in range(repeats):
        for rows in rows_list:
            with PeakMemory(device) as mem:
                seconds, (_, positions, passes) = timed(
                    lambda n=rows, seed=r: run_ours(lm, n, steps, length, seed=seed), device)
            times[rows].append(seconds)
            rates[rows].append(count.sampling_loop(rows, length, passes, positions) / seconds / 1e9)
            if mem.peak_bytes is not None:
                memory[rows] = max(memory[rows] or 0, mem.peak_bytes)
            if peak is not None:
                peak.sample()
        log(f"  rows, repeat {r + 1}/{repeats}: "
            + ", ".join(f"{rows}: {rows / times[rows][-1]:.2f}/s" for rows in rows_list))
    results = []
    for rows in rows_list:
        best = min(times[rows])
        results.append({"rows": rows, "wall_s": stats(times[rows]), "samples_per_s": rows / best,
                        "samples_per_s_median": rows / statistics.median(times[rows]),
                        "loop_gflops": max(rates[rows]), "peak_mem_bytes": memory[rows]})
    base = results[0] if results and results[0]["rows"] == 1 else None
    for entry in results:
        if base:
            entry["speedup_vs_1_row"] = entry["samples_per_s"] / base["samples_per_s"]
            entry["speedup_vs_1_row_median"] = entry["samples_per_s_median"] / base["samples_per_s_median"]
    return results


def bench_network(lm: LoadedModel, tokens_list: list[int], length: int, repeats: int,
                  peak: MatmulPeak | None, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One pass of the network with every position masked (the first step: output at every position)."""
    device, model = lm.device, lm.runner
    count = FlopCount.of(lm.config)
    results = []
    for tokens in tokens_list:
        rows = max(1, round(tokens / length))
        x = torch.full((rows, length), lm.mask_id if lm.mask_id is not None else 0, device=device)
        sigma = torch.full((rows,), 2.0, device=device)
        # as the sampler runs it: on a CPU in float32 the output goes to a buffer reused every step
        reuse = (lm.graph.absorb and device.type == "cpu" and lm.dtype == torch.float32
                 and hasattr(model, "log_score_at_index"))
        out = torch.empty(rows * length, lm.config.vocab_size, device=device) if reuse else None
        index = torch.arange(rows * length, device=device)

        def run(x=x, sigma=sigma, index=index, out=out):
            with torch.inference_mode():
                if out is not None:
                    return model.log_score_at_index(x, sigma, index, out=out)
                return model.log_score_at_index(x, sigma, index) if lm.graph.absorb else model(x, sigma)

        timed(run, device)  # warm up
        times = []
        with PeakMemory(device) as mem:
            for _ in range(max(repeats, 3)):
                times.append(timed(run, device)[0])
                if peak is not None:
                    peak.sample()
        flops = count.trunk(rows, length) + count.output(rows * length)
        entry = {"tokens": rows * length, "rows": rows, "time_s": stats(times), "gflops": flops / min(times) / 1e9,
                 "output_share_of_flops": count.output(rows * length) / flops, "peak_mem_bytes": mem.peak_bytes,
                 "reused_output_buffer_bytes": out.numel() * out.element_size() if out is not None else 0}
        results.append(entry)
        log(f"  network at {rows * length} tokens: {entry['gflops']:.1f} GFLOP/s")
    return results


def run_bench(args, load_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`args`: the `sedd bench` flags (sedd_cli/bench.py); `load_options`: keyword arguments of
    `sedd_core.load` for --model (the SEDD_* settings, as the server reads them)."""
    with torch.no_grad():  # local to this call: the caller's grad mode (a test process, training) stays as it was
        return _run_bench(args, load_options or {})


def _run_bench(args, load_options: dict[str, Any]) -> dict[str, Any]:
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else (lambda msg: None)
    device = resolve_device(args.device)
    dtype, *other_dtypes = bench_dtypes(args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.model and args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; use one of {', '.join(PRESETS)}")

    def model_in(kind: torch.dtype) -> LoadedModel:
        if args.model:
            found = load(args.model, device=device, dtype=kind, **load_options)
        else:
            found = synthetic_model(args.preset, device, kind, seed=args.seed, length=None)
        if args.compile:
            found.runner = FastSEDD(found.model, compile="freeze")
        return found

    lm = model_in(dtype)
    name = lm.name if args.model else args.preset
    others = {_dtype_name(kind): model_in(kind) for kind in other_dtypes}
    length = args.length or lm.length
    if not 1 <= length <= lm.length:
        raise SystemExit(f"sedd bench: --length must be between 1 and {lm.length}")
    sections = set(args.sections.split(","))
    rows_list = [int(r) for r in args.rows.split(",") if r.strip()]
    tokens_list = [int(t) for t in args.tokens.split(",") if t.strip()]
    baselines = tuple(b for b in args.baselines.split(",") if b)
    m = lm.config.model
    report: dict[str, Any] = {
        "device": str(device), "device_name": device_name(device), "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "model": {"name": name, "source": lm.source, "parameters": lm.parameters, "vocab_size": lm.config.vocab_size,
                  "hidden_size": m.hidden_size, "cond_dim": m.cond_dim, "n_blocks": m.n_blocks,
                  "n_heads": m.n_heads, "length": m.length},
        "steps": args.steps, "length": length, "predictor": "analytic", "repeats": args.repeats,
        "compile": bool(args.compile), "request_dtypes": [_dtype_name(dtype), *others],
        "memory_method": memory_method(device),
        "flop_counting": ("analytic: 2 x matmul weights per token (qkv, attn_out, mlp), attention 4 x L x H per "
                          "token per block, per-row conditioning matmuls once per row, output layer 2 x H x V "
                          "only at the positions where it is computed; in the sampling loop the last block's "
                          "attention projection and MLP only there too, and only the passes that ran"),
    }
    report["load_average_before"] = _load_average()
    peak = None
    if "flops" in sections or "rows" in sections:
        log(f"matmul peak ({args.peak_size}^2, {report['dtype']})...")
        peak = MatmulPeak(device, dtype, args.peak_size)
        peak.sample(5)
        log(f"  {peak.gflops:.1f} GFLOP/s")
    if "request" in sections:
        log(f"one request: ours vs naive ({', '.join(baselines)}), {args.steps} steps, length {length}...")
        report["one_request"] = bench_one_request(lm, args.steps, length, args.repeats, args.naive_steps,
                                                  baselines, log, others)
    if "rows" in sections:
        log("samples/s against rows per pass...")
        report["rows"] = bench_rows(lm, rows_list, args.steps, length, args.repeats, peak, log)
    if "flops" in sections:
        log("network FLOP/s against tokens per pass...")
        report["network"] = bench_network(lm, tokens_list, length, args.repeats, peak, log)
    if peak is not None:
        peak.sample(3)
        report["matmul_peak"] = peak.report()
        for entry in report.get("rows", []):
            entry["loop_peak_fraction"] = entry["loop_gflops"] / peak.gflops
        for entry in report.get("network", []):
            entry["peak_fraction"] = entry["gflops"] / peak.gflops
    report["load_average_after"] = _load_average()
    return report


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: on a shared machine, how much else was running."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def print_table(report: dict[str, Any], out=None) -> None:
    out = out or sys.stdout
    m = report["model"]
    print(f"sedd bench: {m['name']} ({m['parameters'] / 1e6:.2f}M params, V={m['vocab_size']}, H={m['hidden_size']}, "
          f"{m['n_blocks']} blocks, L={report['length']}) on {report['device_name']}, {report['dtype']}, "
          f"{report['threads']} threads, {report['steps']} steps, analytic", file=out)
    peak = report.get("matmul_peak")
    if peak:
        print(f"matmul peak ({peak['size']}^2, best of {peak['samples']} samples through the run): "
              f"{peak['gflops']:.1f} GFLOP/s (median {peak['median_gflops']:.1f})", file=out)
    if report.get("load_average_before") is not None:
        print(f"load average before / after: {report['load_average_before']} / {report['load_average_after']}",
              file=out)
    req = report.get("one_request")
    if req:
        print("\none request (1 sample)        min s    median s   speedup (median / min / paired)", file=out)
        for kind, entry in req.get("by_dtype", {report["dtype"]: {"ours_s": req["ours_s"]}}).items():
            paired = "   ".join(f"{entry[key]:.2f}x paired over {label}" for key, label in (
                ("speedup_authors_paired", "naive"), ("paired_vs_first_dtype", report["dtype"]))
                if key in entry and not (key == "paired_vs_first_dtype" and kind == report["dtype"]))
            print(f"  {'ours, ' + kind:<24} {entry['ours_s']['min']:8.3f}  {entry['ours_s']['median']:9.3f}   {paired}",
                  file=out)
        for key, label, name in (("naive_s", "naive (authors' loop)", "authors"),
                                 ("naive_our_network_s", "naive loop, our network", "loop")):
            if key in req:
                print(f"  {label:<24} {req[key]['min']:8.3f}  {req[key]['median']:9.3f}   "
                      f"{req[f'speedup_{name}_median']:.2f}x / {req[f'speedup_{name}_min']:.2f}x / "
                      f"{req[f'speedup_{name}_paired']:.2f}x", file=out)
        if req.get("naive_extrapolated"):
            print(f"  ({req['naive_note']})", file=out)
    if report.get("rows"):
        print("\nrows/pass  samples/s  median s  x 1 row (best / median)  loop GFLOP/s  of peak  peak MiB", file=out)
        for e in report["rows"]:
            print(f"{e['rows']:9d}  {e['samples_per_s']:9.2f}  {e['wall_s']['median']:8.3f}  "
                  f"{e.get('speedup_vs_1_row', float('nan')):7.2f} / {e.get('speedup_vs_1_row_median', float('nan')):5.2f}"
                  f"         {e['loop_gflops']:12.1f}  "
                  f"{e.get('loop_peak_fraction', float('nan')):7.0%}  {_mib(e['peak_mem_bytes']):>8}", file=out)
    if report.get("network"):
        print("\nnetwork: tokens/pass  rows  GFLOP/s  of peak  output FLOP share  peak MiB", file=out)
        for e in report["network"]:
            print(f"{e['tokens']:20d}  {e['rows']:4d}  {e['gflops']:7.1f}  {e.get('peak_fraction', float('nan')):7.0%}"
                  f"  {e['output_share_of_flops']:17.0%}  {_mib(e['peak_mem_bytes']):>8}", file=out)
        if any(e.get("reused_output_buffer_bytes") for e in report["network"]):
            print("(the output goes to a buffer reused from pass to pass, as the sampler does on a CPU; "
                  "peak MiB leaves it out)", file=out)
    print(f"\nFLOPs: {report['flop_counting']}.\nmemory: {report['memory_method']}.", file=out)
