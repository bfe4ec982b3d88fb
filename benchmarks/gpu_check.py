#!/usr/bin/env python
"""The GPU check: whole sampling runs of the SEDD-medium shape, the naive loop, and which speed-up paid.

    python -m benchmarks.gpu_check --out gpu-check.json          # CUDA, about 8 minutes on an H200
    python -m benchmarks.gpu_check --smoke --out /tmp/smoke.json  # tiny preset on the CPU, same code paths

--smoke compiles with TorchDynamo's eager backend (no code generation); add --compile-backend inductor
to run the real compiler on a CPU too (minutes on a small machine).

One run, one JSON report (--out, rewritten after every section) and a table on stdout. Sections, in
order of priority; once --budget-s is spent the rest are skipped and say so:

  environment  card, driver, torch / CUDA / cuDNN / Triton versions, flash-attn version or absence
  matmul_peak  the dtype's square-matmul peak (bf16 on CUDA), sampled again at the end of the run
  reference    the authors' reference vectors on this device (float32 at 1e-3, bf16 sanity), if found
  sdpa         which SDPA kernel bf16 attention of the model's shape gets, each backend timed alone
  runs         whole runs (--steps, analytic, final denoise) of one request of R rows, on a model of
               the preset's shape with random weights, in these configurations ("variants"):
                 eager         the library's defaults: eager network, unfused in-place step maths
                 fused         the step's max and sum of exponentials as one compiled pass (sampling.masked_stats)
                 no-flash      eager with flash-attn switched off (SDPA), only where it is installed
               Each point: samples/s, seconds per sample, network TFLOP/s counted as `sedd bench` counts
               them (benchmarks.measure.FlopCount.sampling_loop) and their fraction of the matmul peak,
               peak memory above the weights; the 2-step warm-up before it (compiles included) apart
  naive        the authors' loop (benchmarks.naive) on the same weights at 1 row
  identity     a seeded request's tokens alone and inside a full batch (other rows beside it)
  a10          peak memory of a 16-row run with the allocator capped at an A10's 23028 MiB
  graph_runs   graphs+fused and graphs: the network's trunk compiled with mode reduce-overhead (CUDA
               graphs) at fixed row buckets; a bucket's compile is not started with under 90 s left
  identity_best  the identity check with CUDA graphs and the fused step on
  paid         which speed-up paid: samples/s ratios of the variants at the smallest and largest rows
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: the checkout's packages, installed or not
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import measure, naive, presets  # noqa: E402
from benchmarks.sedd_bench import run_ours  # noqa: E402
from sedd_core import fast_model  # noqa: E402
from sedd_core.fast_model import FastSEDD  # noqa: E402
from sedd_core.generation import make_job  # noqa: E402
from sedd_core.sampling import denoising_step  # noqa: E402

A10_MIB = 23028  # what nvidia-smi reports as an A10's memory


class Sections:
    """Runs named sections under a time budget; each one's result or error lands in the report."""

    def __init__(self, budget_s: float, out_path: Path | None):
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.out_path = out_path
        self.report: dict[str, Any] = {"sections": {}, "budget_s": budget_s}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        return self.elapsed() > self.budget_s

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        if self.spent():
            self.report["sections"][name] = {"status": "skipped", "reason": f"budget of {self.budget_s:.0f} s spent"}
            print(f"[{name}] skipped: budget spent", flush=True)
            return None
        began = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        result = None
        try:
            result = fn()
            entry = {"status": "ok", "result": result}
        except Exception as exc:  # recorded; the next section still runs
            entry = {"status": "error", "error": f"{exc.__class__.__name__}: {exc}"[:2000],
                     "traceback": traceback.format_exc(limit=8)}
            print(f"[{name}] error: {entry['error']}", flush=True)
        entry["seconds"] = round(time.perf_counter() - began, 2)
        self.report["sections"][name] = entry
        self.save()
        return result

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed(), 2)
        if self.out_path is not None:
            self.out_path.write_text(json.dumps(self.report, indent=2, default=str))


# ---- environment -----------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "device_name": measure.device_name(device),
                            "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                            "triton": _version("triton"), "flash_attn": _version("flash-attn") or _version("flash_attn"),
                            "flash_attn_importable": fast_model.FLASH_ATTN_AVAILABLE}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(driver=_driver_version(), capability=f"{props.major}.{props.minor}",
                    memory_mib=props.total_memory // 2**20, sm_count=props.multi_processor_count,
                    flash_attn_usable=fast_model.flash_attn_usable(device, torch.bfloat16))
    else:
        info["threads"] = torch.get_num_threads()
    return info


# ---- switches ----------------------------------------------------------------------------------------

def set_cuda_graphs(lm, enabled: bool) -> None:
    """The network's trunk through torch.compile mode reduce-overhead (CUDA graphs per row bucket), or eager."""
    lm.runner = FastSEDD(lm.model, compile="reduce-overhead" if enabled else None)


_flash_usable = fast_model.flash_attn_usable


def set_flash(enabled: bool) -> list[str]:
    """flash-attn on (where installed and usable) or off (PyTorch SDPA), for every model of this process:
    every sedd_core module that holds `flash_attn_usable` gets the switch. Returns those modules."""
    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("sedd_core") and getattr(module, "flash_attn_usable", None) is not None:
            module.flash_attn_usable = _flash_usable if enabled else (lambda device, dtype: False)
            patched.append(name)
    return patched


@contextlib.contextmanager
def compile_backend(backend: str):
    """torch.compile with another backend than Inductor while inside (for --smoke: TorchDynamo's "eager"
    backend traces, guards and recompiles as on a GPU, without generating code, which takes minutes on
    a small CPU). Inductor's mode and options do not apply to other backends and are dropped."""
    if backend == "inductor":
        yield
        return
    original = torch.compile

    def compile_with(model=None, **kwargs):
        kwargs.pop("mode", None), kwargs.pop("options", None)
        return original(model, **{**kwargs, "backend": backend})

    torch.compile = compile_with
    try:
        yield
    finally:
        torch.compile = original


# ---- whole runs ----------------------------------------------------------------------------------------

class Runner:
    """Whole runs of one request at a row count, in a named configuration, with their measures."""

    def __init__(self, lm, steps: int, peak: measure.MatmulPeak, sections: Sections):
        self.lm, self.steps, self.peak, self.sections = lm, steps, peak, sections
        self.count = measure.FlopCount.of(lm.config)
        self.points: list[dict[str, Any]] = []
        self.compile_s: dict[str, float] = {}
        self.skipped: list[str] = []

    def warm(self, rows: int, fused: bool, label: str) -> float:
        """Two steps at this shape: compiles (the trunk's bucket, the fused step) happen here, timed."""
        seconds, _ = measure.timed(lambda: run_ours(self.lm, rows, 2, self.lm.length, fused=fused), self.lm.device)
        self.compile_s[f"{label}/{rows}"] = round(seconds, 2)
        return seconds

    def point(self, config: str, rows: int, fused: bool, seed: int = 0,
              min_left_s: float = 0) -> dict[str, Any] | None:
        """One whole run after a 2-step warm-up; None (left out) when less than min_left_s of the budget is left."""
        if self.sections.elapsed() > self.sections.budget_s - min_left_s:
            self.skipped.append(f"{config}/{rows}")
            return None
        lm = self.lm
        self.warm(rows, fused, config)
        with measure.PeakMemory(lm.device) as mem:
            seconds, (_, positions, passes) = measure.timed(
                lambda: run_ours(lm, rows, self.steps, lm.length, seed=seed, fused=fused), lm.device)
        self.peak.sample()
        flops = self.count.sampling_loop(rows, lm.length, passes, positions)
        entry = {"config": config, "rows": rows, "steps": self.steps, "seconds": seconds,
                 "samples_per_s": rows / seconds, "seconds_per_sample": seconds / rows,
                 "tflops": flops / seconds / 1e12, "peak_fraction": flops / seconds / 1e9 / self.peak.gflops,
                 "peak_mem_bytes": mem.peak_bytes, "passes": passes, "output_positions": positions}
        self.points.append(entry)
        print(f"  {config:<13} rows {rows:3d}: {seconds:8.3f} s, {entry['samples_per_s']:8.2f} samples/s, "
              f"{entry['tflops']:7.2f} TFLOP/s ({entry['peak_fraction']:.0%} of peak), "
              f"peak mem {(mem.peak_bytes or 0) / 2**30:.2f} GiB", flush=True)
        return entry

    def sweep(self, config: str, rows_list: list[int], fused: bool, min_left_s: float = 0) -> list[dict[str, Any]]:
        return [e for e in (self.point(config, rows, fused, min_left_s=min_left_s) for rows in rows_list)
                if e is not None]


def naive_section(lm, steps: int, naive_steps: int | None) -> dict[str, Any]:
    """The authors' loop at 1 row on the same weights; with naive_steps, a prefix timed and scaled."""
    run_steps = steps if naive_steps is None else min(naive_steps, steps)
    device = lm.device
    naive.naive_generate(lm.model, lm.graph, lm.noise, 1, lm.length, steps, None, naive.authors_forward, 1)  # warm up
    gen = torch.Generator(device=device).manual_seed(0)
    with measure.PeakMemory(device) as mem:
        seconds, _ = measure.timed(lambda: naive.naive_generate(
            lm.model, lm.graph, lm.noise, 1, lm.length, steps, gen, naive.authors_forward,
            None if run_steps >= steps else run_steps), device)
    scale = 1.0 if run_steps >= steps else (steps + 1) / run_steps
    return {"rows": 1, "steps": steps, "steps_run": run_steps, "seconds": seconds * scale,
            "extrapolated": scale != 1.0, "samples_per_s": 1 / (seconds * scale), "peak_mem_bytes": mem.peak_bytes}


def identity_section(lm, steps: int, batch_rows: int, fused: bool) -> dict[str, Any]:
    """A seeded request alone, then the same request beside another of batch_rows - 1 rows in every pass
    (in whatever configuration the model is in: identity_best runs with the CUDA-graph trunk on)."""
    def sample(with_others: bool):
        job = make_job(lm, num_samples=1, steps=steps, seed=1234)
        jobs = [job] + ([make_job(lm, num_samples=batch_rows - 1, steps=steps, seed=99)] if with_others else [])
        while not job.done:
            denoising_step(lm.runner, lm.graph, lm.noise, jobs, fused=fused)
        return job.x

    alone, batched = sample(False), sample(True)
    equal = (alone == batched).float().mean().item()
    return {"fused": fused, "cuda_graphs": lm.runner.compiled,
            "batch_rows": batch_rows, "tokens_identical": bool(torch.equal(alone, batched)),
            "fraction_of_tokens_equal": equal}


def a10_section(lm, steps: int, rows: int, fused: bool) -> dict[str, Any]:
    """Peak memory of a whole `rows`-row run with the allocator capped at an A10's memory."""
    device = lm.device
    out: dict[str, Any] = {"rows": rows, "fused": fused, "a10_mib": A10_MIB}
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        out["memory_fraction"] = fraction = min(1.0, A10_MIB * 2**20 / total)
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        run_ours(lm, rows, steps, lm.length, fused=fused)
        out["completed"] = True
    except torch.OutOfMemoryError as exc:
        out.update(completed=False, error=str(exc)[:500])
    finally:
        if device.type == "cuda":
            out["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            out["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        else:
            out["note"] = "no allocator cap on a CPU: the run's code path only"
    return out


def paid(points: list[dict[str, Any]], naive_result: dict[str, Any] | None) -> dict[str, Any]:
    """Samples/s ratios that say which speed-up paid, at each row count both configurations ran."""
    by = {(e["config"], e["rows"]): e["samples_per_s"] for e in points}
    out: dict[str, Any] = {}
    for label, with_, without in (("fused step", "fused", "eager"), ("CUDA graphs", "graphs", "eager"),
                                  ("fused step on top of CUDA graphs", "graphs+fused", "graphs"),
                                  ("CUDA graphs on top of the fused step", "graphs+fused", "fused"),
                                  ("all (graphs+fused vs eager)", "graphs+fused", "eager"),
                                  ("flash-attn (eager vs no-flash)", "eager", "no-flash")):
        ratios = {rows: by[(with_, rows)] / by[(without, rows)] for (config, rows) in by
                  if config == with_ and (without, rows) in by}
        if ratios:
            out[label] = {str(rows): round(r, 3) for rows, r in sorted(ratios.items())}
    if naive_result:
        best = max((e for e in points if e["rows"] == 1), key=lambda e: e["samples_per_s"], default=None)
        if best:
            out["one request vs the naive loop"] = {"config": best["config"],
                                                    "speedup": best["samples_per_s"] / naive_result["samples_per_s"]}
    return out


# ---- checks kept from the earlier GPU scripts ----------------------------------------------------------

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


def _best_time(fn: Callable[[], Any], device: torch.device, repeats: int = 5) -> float:
    fn()
    return min(measure.timed(fn, device)[0] for _ in range(repeats))


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



# ---- output ------------------------------------------------------------------------------------------

def print_summary(report: dict[str, Any]) -> None:
    sections = report["sections"]
    print("\n==== gpu_check summary ====")
    for name, entry in sections.items():
        print(f"{name:<12} {entry['status']:<8} {entry.get('seconds', 0):7.1f} s"
              + (f"  {entry.get('error', entry.get('reason', ''))}" if entry["status"] != "ok" else ""))
    env = sections.get("environment", {}).get("result")
    if env:
        print(f"\n{env['device_name']}  driver {env.get('driver')}  torch {env['torch']}  CUDA {env['cuda']}  "
              f"flash-attn {env['flash_attn'] or 'not installed'}")
    peak = report.get("matmul_peak")
    if peak:
        print(f"matmul peak ({peak['size']}^2, {report['dtype']}): best {peak['gflops'] / 1e3:.1f} TFLOP/s, "
              f"median {peak['median_gflops'] / 1e3:.1f} ({peak['samples']} samples through the run)")
    points = report.get("points")
    if points:
        print(f"\nwhole runs ({report['steps']} steps, analytic, {report['preset']}):")
        print("config         rows   seconds  samples/s  s/sample  TFLOP/s  of peak  peak GiB")
        for e in points:
            print(f"{e['config']:<13} {e['rows']:5d}  {e['seconds']:8.3f}  {e['samples_per_s']:9.2f}  "
                  f"{e['seconds_per_sample']:8.3f}  {e['tflops']:7.2f}  {e['peak_fraction']:7.1%}  "
                  f"{(e['peak_mem_bytes'] or 0) / 2**30:8.2f}")
        print(f"warm-up (2 steps; compiles included) seconds: {report.get('compile_s')}")
    nv = sections.get("naive", {}).get("result")
    if nv:
        print(f"naive loop, 1 row: {nv['seconds']:.3f} s" + (" (extrapolated)" if nv["extrapolated"] else ""))
    for name in ("identity", "identity_best"):
        r = sections.get(name, {}).get("result")
        if r:
            print(f"{name}: fused={r['fused']}, graphs={r['cuda_graphs']}, alone vs in {r['batch_rows']} rows: identical {r['tokens_identical']} "
                  f"({r['fraction_of_tokens_equal']:.1%} of tokens equal)")
    a10 = sections.get("a10", {}).get("result")
    if a10:
        print(f"a10: {a10['rows']} rows under {a10['a10_mib']} MiB: completed {a10['completed']}, "
              f"peak allocated {a10.get('peak_allocated_mib', float('nan')):.0f} MiB" + (
                  f" ({a10['note']})" if "note" in a10 else ""))
    pay = sections.get("paid", {}).get("result")
    if pay:
        print("\nwhich speed-up paid (samples/s ratio per row count):")
        for label, value in pay.items():
            print(f"  {label}: {value}")
    print(f"\nelapsed {report.get('elapsed_s', 0):.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-check.json", help="where the JSON report goes")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip what remains once this is spent (default 420; 120 with --smoke)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--preset", default=None, help="model shape (default sedd-medium; short12 with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 128; 4 with --smoke)")
    p.add_argument("--rows", default=None, help="row counts (default 1,8,16,32; 1,2,4 with --smoke)")
    p.add_argument("--naive-steps", type=int, default=None,
                   help="time this many naive steps and scale (default: the whole run)")
    p.add_argument("--reference", default=None, help="folder of the reference vectors "
                   "(default: the repository's tests/data/reference)")
    p.add_argument("--no-graphs", action="store_true", help="leave out the CUDA-graph configurations")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; eager with --smoke, see compile_backend)")
    p.add_argument("--smoke", action="store_true", help="tiny preset on any device: the same code paths in seconds")
    args = p.parse_args(argv)
    backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    with compile_backend(backend):
        return _main(args, argv, backend)


def _main(args, argv, backend: str) -> int:

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    smoke = args.smoke
    preset = args.preset or ("short12" if smoke else "sedd-medium")
    steps = args.steps or (4 if smoke else 128)
    rows_list = [int(r) for r in (args.rows or ("1,2" if smoke else "1,8,16,32")).split(",")]
    ends = sorted({rows_list[0], rows_list[-1]})
    a10_rows = 2 if smoke else 16
    budget = args.budget_s if args.budget_s is not None else (120 if smoke else 420)
    reference = Path(args.reference) if args.reference else REPO_ROOT / "tests" / "data" / "reference"
    sections = Sections(budget, Path(args.out))
    sections.report.update(argv=sys.argv[1:] if argv is None else argv, smoke=smoke, device=str(device),
                           dtype=str(dtype).removeprefix("torch."), preset=preset, steps=steps,
                           compile_backend=backend,
                           flop_counting="benchmarks.measure.FlopCount.sampling_loop, as `sedd bench` counts",
                           memory_method=measure.memory_method(device))
    torch.set_grad_enabled(False)
    flash_installed = fast_model.flash_attn_usable(device, dtype)

    sections.run("environment", lambda: environment(device))
    peak = measure.MatmulPeak(device, dtype, 256 if smoke else 8192)
    sections.run("matmul_peak", lambda: (peak.sample(5), peak.report())[1])
    sections.run("reference", lambda: reference_check(device, reference))
    m = presets.PRESETS[preset]
    sections.run("sdpa", lambda: sdpa_backend(device, dtype, 8 if not smoke else 2, m["n_heads"], m["length"],
                                              m["hidden_size"] // m["n_heads"]))
    lm = presets.synthetic_model(preset, device, dtype)
    runner = Runner(lm, steps, peak, sections)

    def runs() -> dict[str, Any]:
        runner.sweep("eager", rows_list, fused=False)
        runner.sweep("fused", ends, fused=True)
        out: dict[str, Any] = {"flash_attn_usable": flash_installed}
        if flash_installed:
            out["flash_switch_modules"] = set_flash(False)
            try:
                runner.sweep("no-flash", ends, fused=False)
            finally:
                set_flash(True)
        return {**out, "points": list(runner.points)}

    def graph_runs() -> dict[str, Any]:
        set_cuda_graphs(lm, True)  # stays on for identity_best
        reserve = 0 if smoke else 90  # a bucket's compile: do not start one that cannot finish in the budget
        runner.sweep("graphs+fused", ends + [r for r in rows_list if r not in ends], fused=True, min_left_s=reserve)
        runner.sweep("graphs", ends, fused=False, min_left_s=reserve / 3)
        return {"points": [e for e in runner.points if e["config"].startswith("graphs")],
                "left_out_for_the_budget": list(runner.skipped)}

    sections.run("runs", runs)
    naive_result = sections.run("naive", lambda: naive_section(lm, steps, args.naive_steps))
    sections.run("identity", lambda: identity_section(lm, steps, rows_list[-1], fused=False))
    sections.run("a10", lambda: a10_section(lm, steps, a10_rows, fused=False))
    if args.no_graphs:
        sections.report["sections"]["graph_runs"] = {"status": "skipped", "reason": "--no-graphs"}
    else:
        sections.run("graph_runs", graph_runs)
        sections.run("identity_best", lambda: identity_section(lm, steps, rows_list[-1], fused=True))
        try:
            set_cuda_graphs(lm, False)
        except Exception as exc:  # the switch itself failed: graph_runs has recorded why
            sections.report["graphs_off_error"] = f"{exc.__class__.__name__}: {exc}"
    sections.report["compile_s"] = runner.compile_s
    sections.report["points_left_out_for_the_budget"] = runner.skipped
    sections.report["points"] = runner.points
    peak.sample(3)
    sections.report["matmul_peak"] = peak.report()
    for entry in runner.points:  # against the best peak sample of the whole run: conservative
        entry["peak_fraction"] = entry["tflops"] * 1e3 / peak.gflops
    sections.run("paid", lambda: paid(runner.points, naive_result))
    sections.save()
    print_summary(sections.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
