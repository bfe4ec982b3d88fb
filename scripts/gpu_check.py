#!/usr/bin/env python
"""One prepared GPU check for the sampler: correctness on CUDA, speed, memory, and the engine under load.

Run on an NVIDIA GPU (made for an H100/H200, about 5 minutes; no network needed):

    python scripts/gpu_check.py --out gpu-check.json            # full check, sedd-medium shape
    python scripts/gpu_check.py --smoke --out /tmp/smoke.json     # tiny shapes, seconds, any device

Sections (each guarded: a failure is recorded and the next section runs; once --budget-s is spent the
remaining sections are skipped and say so):

  environment   device name, capability, torch / CUDA versions, flash-attn presence
  sdpa_backend  which SDPA kernel bf16 attention of the sedd-medium shape uses (flash / efficient / cudnn /
                math): each backend tried alone and timed, and the kernels the default call launches
  reference     the authors' reference vectors (SPEC section 6) on this device in float32 (tolerance 1e-3
                relative) and the bfloat16 path (finite; top tokens agree with float32)
  bench         `sedd bench` pieces on a sedd-medium-shaped model with random weights, bf16, length 1024,
                128 steps: samples/s at rows 1, 8, 32; one request against the naive loop (the naive
                loop runs --naive-steps steps and its time is scaled per step, said in the output);
                network FLOP/s against this card's measured bf16 matmul peak; peak memory
  engine        sedd_core.engine.Engine under load: 32 concurrent asyncio requests of 4 samples each,
                rows per pass, samples/s, p50/p95 latency

Everything goes to --out as JSON; a short table goes to stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the checkout's sedd_core, installed or not
bench = importlib.import_module("sedd_core.bench")


class Sections:
    """Runs named sections under a time budget; each one's result or error lands in the report."""

    def __init__(self, budget_s: float, out_path: Path | None):
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.out_path = out_path
        self.report: dict[str, Any] = {"sections": {}, "budget_s": budget_s}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if self.elapsed() > self.budget_s:
            self.report["sections"][name] = {"status": "skipped", "reason": f"budget of {self.budget_s:.0f} s spent"}
            print(f"[{name}] skipped: budget spent", flush=True)
            return
        began = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            result = fn()
            entry = {"status": "ok", "result": result}
        except Exception as exc:  # recorded; the next section still runs
            entry = {"status": "error", "error": f"{exc.__class__.__name__}: {exc}",
                     "traceback": traceback.format_exc(limit=8)}
            print(f"[{name}] error: {entry['error']}", flush=True)
        entry["seconds"] = round(time.perf_counter() - began, 2)
        self.report["sections"][name] = entry
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.save()

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed(), 2)
        if self.out_path is not None:
            self.out_path.write_text(json.dumps(self.report, indent=2, default=str))


# ---- sections --------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict[str, Any]:
    from sedd_core import model as model_module

    info: dict[str, Any] = {"torch": torch.__version__, "device": str(device),
                            "device_name": bench.device_name(device),
                            "flash_attn_installed": model_module.FLASH_ATTN_AVAILABLE}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        info["threads"] = torch.get_num_threads()
    return info


def sdpa_backend(device: torch.device, dtype: torch.dtype, batch: int, heads: int, length: int,
                 head_dim: int) -> dict[str, Any]:
    """Which SDPA kernels run for this shape, and how fast each is alone."""
    import torch.nn.functional as F

    q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype) for _ in range(3))
    result: dict[str, Any] = {"shape": [batch, heads, length, head_dim], "dtype": str(dtype), "backends": {}}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {**result, "note": "torch.nn.attention.sdpa_kernel unavailable in this PyTorch"}
    flops = 4 * batch * heads * length * length * head_dim
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v)
                seconds = _best_time(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats=10)
            err = ((out.float() - reference).abs().max() / reference.abs().max()).item()
            result["backends"][name.lower()] = {"ok": True, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12,
                                                "max_rel_err_vs_fp32": err}
        except Exception as exc:
            result["backends"][name.lower()] = {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"[:300]}
    # what the default dispatch picks: the kernels it launches
    if device.type == "cuda":
        try:
            kernels = _kernels_launched(lambda: F.scaled_dot_product_attention(q, k, v), device)
        except Exception as exc:
            result["default_choice_error"] = f"{exc.__class__.__name__}: {exc}"[:300]
            return result
        result["default_kernels"] = kernels[:12]
        text = " ".join(kernels).lower()
        result["default_choice"] = ("flash" if "flash" in text else "cudnn" if "cudnn" in text
                                    else "efficient" if ("fmha" in text or "efficient" in text or "mem_eff" in text)
                                    else "math")
    return result


def _kernels_launched(fn: Callable[[], Any], device: torch.device) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    names = set()
    for event in prof.events():
        if str(getattr(event, "device_type", "")).endswith("CUDA"):
            names.add(event.name)
    return sorted(names)


def reference_check(device: torch.device, reference_dir: Path) -> dict[str, Any]:
    """The authors' vectors on this device: float32 at 1e-3 relative, and the bf16 path's sanity."""
    from sedd_core.graph import graph_from_config
    from sedd_core.loading import load_network
    from sedd_core.noise import noise_from_config

    if not reference_dir.is_dir():
        return {"skipped": f"no reference vectors at {reference_dir} (pass --reference)"}
    out: dict[str, Any] = {}
    for name in ("absorb-a", "uniform-a"):
        folder = reference_dir / name
        if not folder.is_dir():
            out[name] = {"skipped": f"{folder} missing"}
            continue
        ref = torch.load(folder / "reference.pt", weights_only=True)
        x, sigma = ref["x"].to(device), ref["sigma"].to(device)
        model32, config, _ = load_network(folder / "oxen-layout", device, torch.float32)
        with torch.inference_mode():
            ours = model32(x, sigma).cpu()
        scale = ref["log_score"].abs().max()
        rel = ((ours - ref["log_score"]).abs().max() / scale).item()
        entry: dict[str, Any] = {"fp32_max_rel_err": rel, "fp32_ok": rel <= 1e-3}
        graph, noise = graph_from_config(config), noise_from_config(config)
        t = ref["step_t"][:, None].to(device)
        with torch.inference_mode():
            s = noise.total(t)
            dsigma = s - noise.total(t - ref["step_dt"].to(device))
            probs = graph.analytic_probs(x, model32(x, s[:, 0]).exp(), dsigma).cpu()
        rel_p = ((probs - ref["analytic_probs"]).abs().max() / ref["analytic_probs"].abs().max()).item()
        entry.update(analytic_probs_max_rel_err=rel_p, analytic_ok=rel_p <= 1e-3)
        model16, _, _ = load_network(folder / "oxen-layout", device, torch.bfloat16)
        with torch.inference_mode():
            low = model16(x, sigma).float().cpu()
        entry.update(bf16_finite=bool(torch.isfinite(low).all()),
                     bf16_top1_agreement=(low.argmax(-1) == ours.argmax(-1)).float().mean().item(),
                     bf16_max_rel_err=((low - ours).abs().max() / scale).item())
        out[name] = entry
    # the fast absorbing sampler step on this device against the vocabulary-wide formulas
    out["sampler_step"] = _sampler_step_check(device, reference_dir / "absorb-a")
    out["ok"] = all(v.get("fp32_ok", True) and v.get("analytic_ok", True) for v in out.values() if isinstance(v, dict))
    return out


def _sampler_step_check(device: torch.device, folder: Path) -> dict[str, Any]:
    from sedd_core.graph import graph_from_config
    from sedd_core.loading import load_network
    from sedd_core.noise import noise_from_config
    from sedd_core.sampling import Job, masked_log_probs

    if not folder.is_dir():
        return {"skipped": f"{folder} missing"}
    ref = torch.load(folder / "reference.pt", weights_only=True)
    model, config, _ = load_network(folder / "oxen-layout", device, torch.float32)
    graph, noise = graph_from_config(config), noise_from_config(config)
    x = ref["x"].to(device)
    steps = 16
    jobs = []
    for row, t in zip(x, ref["step_t"].tolist()):
        job = Job(x=row[None].clone(), steps=steps, predictor="analytic")
        job.grid = [t] * (steps + 1)
        jobs.append(job)
    ours = masked_log_probs(model, graph, noise, jobs).exp().cpu()
    t = ref["step_t"][:, None].to(device)
    dt = torch.full_like(t, (1 - 1e-5) / steps)
    with torch.inference_mode():
        s = noise.total(t)
        probs = graph.analytic_probs(x, model(x, s[:, 0]).exp(), s - noise.total(t - dt))
    expected = probs[x == graph.mask].clamp_min(0).cpu()
    err = ((ours - expected).abs().max() / expected.abs().max()).item()
    return {"max_rel_err": err, "ok": err <= 1e-3}


def bench_section(device: torch.device, dtype: torch.dtype, preset: str, steps: int, length: int | None,
                  rows_list: list[int], tokens_list: list[int], naive_steps: int, peak_size: int,
                  repeats: int, log: Callable[[str], None], compile_mode: str | None = None) -> dict[str, Any]:
    lm = bench.synthetic_model(preset, device, dtype)
    length = length or lm.length
    torch.set_grad_enabled(False)
    peak = bench.MatmulPeak(device, dtype, peak_size)
    peak.sample(5)
    log(f"  {dtype} matmul peak ({peak_size}^2): {peak.gflops / 1e3:.1f} TFLOP/s")
    out: dict[str, Any] = {"model": {"preset": preset, "parameters": lm.parameters, "length": length},
                           "dtype": str(dtype), "steps": steps}
    out["one_request"] = bench.bench_one_request(lm, steps, length, repeats, naive_steps, ("authors",), log)
    out["rows"] = bench.bench_rows(lm, rows_list, steps, length, 1, peak, log)
    out["network"] = bench.bench_network(lm, tokens_list, length, repeats, peak, log)
    if compile_mode:  # the same request through torch.compile ("reduce-overhead": CUDA graphs)
        lm.model.use_compiled_trunk(True, None if compile_mode == "freeze" else compile_mode)
        out["one_request_compiled"] = {"mode": compile_mode, **bench.bench_one_request(
            lm, steps, length, repeats, naive_steps, ("authors",), log)}
        lm.model.use_compiled_trunk(False)
    peak.sample(3)
    out["matmul_peak"] = peak.report()
    for entry in out["rows"]:
        entry["loop_peak_fraction"] = entry["loop_gflops"] / peak.gflops
    for entry in out["network"]:
        entry["peak_fraction"] = entry["gflops"] / peak.gflops
    out["memory_method"] = bench.memory_method(device)
    out["flop_counting"] = "analytic, as in `sedd bench` (see sedd_core/bench.py)"
    del lm
    return out


def engine_section(device: torch.device, dtype: torch.dtype, preset: str, requests: int, samples: int,
                   steps: int, max_rows: int, stream_every: int) -> dict[str, Any]:
    from sedd_core.engine import Engine, FinalOutput, StepOutput
    from sedd_core.generation import make_job

    lm = bench.synthetic_model(preset, device, dtype)
    passes: list[tuple[int, float]] = []

    class Observer:
        def on_pass(self, rows: int, seconds: float, positions: int) -> None:
            passes.append((rows, seconds))

        def on_request_end(self, outcome: str, samples: int, tokens: int, seconds: float) -> None:
            pass

    bench.run_ours(lm, min(max_rows, 4), 2, lm.length)  # warm up
    engine = Engine(lm, max_rows=max_rows, max_queue=max(64, requests), observer=Observer()).start()

    async def one(i: int) -> tuple[float, str]:
        job = make_job(lm, num_samples=samples, steps=steps, seed=i)
        submitted = time.perf_counter()
        submission = engine.submit(job, stream_every=stream_every)
        records = await submission.next_outputs()
        while isinstance(records[-1], StepOutput):
            records = await submission.next_outputs()
        return time.perf_counter() - submitted, "done" if isinstance(records[-1], FinalOutput) else "error"

    async def main():
        return await asyncio.gather(*(one(i) for i in range(requests)))

    began = time.perf_counter()
    try:
        results = asyncio.run(main())
    finally:
        engine.stop()
    wall = time.perf_counter() - began
    latencies = sorted(r[0] for r in results)
    done = sum(1 for r in results if r[1] == "done")

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, math.ceil(p * len(latencies)) - 1)]

    rows = [r for r, _ in passes]
    return {"preset": preset, "requests": requests, "samples_per_request": samples, "steps": steps,
            "max_rows": max_rows, "stream_every": stream_every, "completed": done, "wall_s": wall,
            "samples_per_s": done * samples / wall, "passes": len(passes),
            "rows_per_pass_mean": statistics.mean(rows) if rows else 0, "rows_per_pass_max": max(rows, default=0),
            "pass_ms_median": statistics.median(s for _, s in passes) * 1e3 if passes else None,
            "latency_p50_s": pct(0.50), "latency_p95_s": pct(0.95), "latency_max_s": latencies[-1]}


def _best_time(fn: Callable[[], Any], device: torch.device, repeats: int = 5) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        seconds, _ = bench.timed(fn, device)
        best = min(best, seconds)
    return best


# ---- output ---------------------------------------------------------------------------------------

def print_summary(report: dict[str, Any]) -> None:
    sections = report["sections"]
    print("\n==== gpu_check summary ====")
    for name, entry in sections.items():
        print(f"{name:<13} {entry['status']:<8} {entry.get('seconds', 0):7.1f} s"
              + (f"  {entry.get('error', entry.get('reason', ''))}" if entry["status"] != "ok" else ""))
    env = sections.get("environment", {}).get("result")
    if env:
        print(f"\ndevice: {env['device_name']}  torch {env['torch']}  flash-attn: {env['flash_attn_installed']}")
    sdpa = sections.get("sdpa_backend", {}).get("result")
    if sdpa:
        print(f"SDPA {sdpa['dtype']} {sdpa['shape']}: default {sdpa.get('default_choice', '?')}; " + ", ".join(
            f"{k} {v['ms']:.2f} ms" if v.get("ok") else f"{k} n/a" for k, v in sdpa.get("backends", {}).items()))
    ref = sections.get("reference", {}).get("result")
    if ref:
        for name in ("absorb-a", "uniform-a"):
            e = ref.get(name, {})
            if "fp32_max_rel_err" in e:
                print(f"reference {name}: fp32 rel err {e['fp32_max_rel_err']:.1e}, analytic {e['analytic_probs_max_rel_err']:.1e}, "
                      f"bf16 top-1 agreement {e['bf16_top1_agreement']:.1%}, finite {e['bf16_finite']}")
            elif e:
                print(f"reference {name}: {e}")
        step = ref.get("sampler_step", {})
        if "max_rel_err" in step:
            print(f"sampler step vs formulas: rel err {step['max_rel_err']:.1e}")
    b = sections.get("bench", {}).get("result")
    if b:
        peak = b["matmul_peak"]["gflops"]
        print(f"\nbench {b['model']['preset']} ({b['model']['parameters'] / 1e6:.0f}M, L={b['model']['length']}), "
              f"{b['dtype']}, {b['steps']} steps; matmul peak {peak / 1e3:.1f} TFLOP/s")
        req = b["one_request"]
        print(f"  one request: ours {req['ours_s']['min']:.3f} s, naive {req['naive_s']['min']:.3f} s -> "
              f"{req['speedup_authors_min']:.2f}x" + (" (naive extrapolated per step)" if req["naive_extrapolated"] else ""))
        compiled = b.get("one_request_compiled")
        if compiled:
            print(f"  one request, compiled ({compiled['mode']}): ours {compiled['ours_s']['min']:.3f} s -> "
                  f"{compiled['speedup_authors_min']:.2f}x the naive loop")
        for e in b["rows"]:
            print(f"  rows {e['rows']:3d}: {e['samples_per_s']:8.2f} samples/s, loop {e['loop_gflops'] / 1e3:6.1f} TFLOP/s "
                  f"({e['loop_peak_fraction']:.0%} of peak), peak mem {(e['peak_mem_bytes'] or 0) / 2**30:.2f} GiB")
        for e in b["network"]:
            print(f"  network {e['tokens']:6d} tokens: {e['gflops'] / 1e3:6.1f} TFLOP/s ({e['peak_fraction']:.0%} of peak), "
                  f"peak mem {(e['peak_mem_bytes'] or 0) / 2**30:.2f} GiB")
    eng = sections.get("engine", {}).get("result")
    if eng:
        print(f"\nengine: {eng['requests']} requests x {eng['samples_per_request']} samples, {eng['steps']} steps: "
              f"{eng['samples_per_s']:.2f} samples/s, rows/pass mean {eng['rows_per_pass_mean']:.1f} "
              f"(max {eng['rows_per_pass_max']}), p50 {eng['latency_p50_s']:.2f} s, p95 {eng['latency_p95_s']:.2f} s")
    print(f"\nelapsed {report.get('elapsed_s', 0):.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-check.json", help="where the JSON report goes")
    p.add_argument("--budget-s", type=float, default=290, help="skip the remaining sections once this is spent")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--reference", default=None,
                   help="folder of the reference vectors (default: ../shared/reference beside the repository)")
    p.add_argument("--preset", default=None, help="bench model shape (default sedd-medium; short12 with --smoke)")
    p.add_argument("--engine-preset", default=None, help="engine model shape (default: as --preset)")
    p.add_argument("--steps", type=int, default=None, help="bench steps (default 128; 4 with --smoke)")
    p.add_argument("--naive-steps", type=int, default=None, help="naive loop steps, scaled up (default 16)")
    p.add_argument("--engine-steps", type=int, default=None, help="engine request steps (default 32)")
    p.add_argument("--peak-size", type=int, default=None, help="square matmul for the peak (default 8192)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any device: checks the script in seconds")
    p.add_argument("--compile", default=None, metavar="MODE",
                   help="also time one request with the compiled trunk: reduce-overhead (CUDA graphs) or freeze")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    smoke = args.smoke
    preset = args.preset or ("short12" if smoke else "sedd-medium")
    engine_preset = args.engine_preset or preset
    steps = args.steps or (4 if smoke else 128)
    reference = Path(args.reference) if args.reference else REPO_ROOT.parent / "shared" / "reference"
    sections = Sections(args.budget_s, Path(args.out))
    sections.report.update(argv=sys.argv[1:], smoke=smoke, device=str(device), dtype=str(dtype))

    def log(msg: str) -> None:
        print(msg, flush=True)


    sections.run("environment", lambda: environment(device))
    if smoke:
        shape = (2, 4, 12, 32)
    else:
        m = bench.PRESETS[preset]
        shape = (8, m["n_heads"], m["length"], m["hidden_size"] // m["n_heads"])
    sections.run("sdpa_backend", lambda: sdpa_backend(device, dtype, *shape))
    sections.run("reference", lambda: reference_check(device, reference))
    sections.run("bench", lambda: bench_section(
        device, dtype, preset, steps, None, [1, 2] if smoke else [1, 8, 32],
        [24, 48] if smoke else [1024, 4096, 8192, 16384], args.naive_steps or (2 if smoke else 16),
        args.peak_size or (256 if smoke else 8192), 1 if smoke else 2, log, args.compile))
    sections.run("engine", lambda: engine_section(
        device, dtype, engine_preset, 4 if smoke else 32, 2 if smoke else 4, args.engine_steps or (4 if smoke else 32),
        8 if smoke else 32, 4 if smoke else 8))
    sections.save()
    print_summary(sections.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
