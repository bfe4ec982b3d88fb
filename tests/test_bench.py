"""`sedd bench`: the report's shape, and that its naive baseline samples what our sampler samples.

No timing assertions here: speed is measured by `sedd bench` and written down in
docs/benchmarks-sampling.md, never asserted in a unit test.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import measure, naive, presets, sedd_bench
from sedd_core import sampling
from sedd_core.sampling import Job

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def short12():
    return presets.synthetic_model("short12", torch.device("cpu"), torch.float32, seed=3)


def test_cli_prints_a_json_report_with_the_documented_fields():
    out = subprocess.run([sys.executable, "-m", "sedd_cli", "bench", "--preset", "short12", "--steps", "4",
                          "--rows", "1,2", "--repeats", "1", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for key in ("device", "device_name", "dtype", "torch", "threads", "model", "steps", "length", "memory_method",
                "flop_counting", "matmul_peak", "one_request", "rows", "network", "load_average_before"):
        assert key in report, key
    assert report["dtype"] == "float32" and report["steps"] == 4 and report["length"] == 12
    assert report["model"]["parameters"] > 0 and report["model"]["vocab_size"] == 99
    assert report["matmul_peak"]["gflops"] > 0
    req = report["one_request"]
    for key in ("ours_s", "naive_s", "naive_our_network_s"):
        assert req[key]["min"] > 0 and req[key]["median"] >= req[key]["min"]
    assert req["speedup_authors_median"] > 0 and req["speedup_loop_median"] > 0
    assert req["speedup_authors_paired"] == pytest.approx(req["naive_s"]["median"] / req["ours_s"]["median"])  # 1 repeat
    assert req["naive_extrapolated"] is False
    assert [e["rows"] for e in report["rows"]] == [1, 2]
    for entry in report["rows"]:
        assert entry["samples_per_s"] > 0 and entry["loop_gflops"] > 0 and 0 < entry["loop_peak_fraction"]
        assert "peak_mem_bytes" in entry and "speedup_vs_1_row" in entry
    assert [e["tokens"] for e in report["network"]] == [516, 1020, 4092, 8196]  # whole rows of 12
    for entry in report["network"]:
        assert entry["gflops"] > 0 and entry["peak_fraction"] > 0 and 0 <= entry["output_share_of_flops"] < 1


def test_table_output_names_every_section(capsys):
    from sedd_cli.main import main

    assert main(["bench", "--preset", "short12", "--steps", "2", "--rows", "1", "--repeats", "1",
                 "--tokens", "24", "--baselines", "authors", "--quiet"]) == 0
    text = capsys.readouterr().out
    for words in ("one request", "naive (authors' loop)", "samples/s", "network", "matmul peak", "FLOPs:", "memory:"):
        assert words in text


def test_naive_baseline_and_our_path_both_sample_complete_texts(short12):
    gen = torch.Generator().manual_seed(11)
    theirs = naive.naive_generate(short12.model, short12.graph, short12.noise, 3, 12, 8, gen)
    ours, positions, passes = sedd_bench.run_ours(short12, 3, 8, 12, seed=11)
    for x in (theirs, ours):
        assert x.shape == (3, 12)
        assert not (x == short12.mask_id).any()
        assert ((0 <= x) & (x < short12.mask_id)).all()
    assert 36 <= positions <= 9 * 36  # every position once at least, never more than every step
    assert 1 <= passes <= 9 and positions <= passes * 36


def test_authors_network_code_equals_ours(short12):
    x = torch.randint(0, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    x[:, ::3] = short12.mask_id
    sigma = torch.tensor([0.05, 3.0])
    with torch.no_grad():
        ours, theirs = short12.model(x, sigma), naive.authors_forward(short12.model, x, sigma)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def _our_step_logits(lm, x, step_index, steps):
    """Our sampler's log probs at x's masked positions for one step (what its Gumbel-max draws from)."""
    job = Job(x=x.clone(), steps=steps, predictor="analytic")
    job.step_index = step_index
    return sampling.masked_log_probs(lm.model, lm.graph, lm.noise, [job])


def test_naive_loop_probs_at_masked_positions_equal_ours(short12):
    """Step by step, the naive loop's vocabulary-wide probs are our sampler's at every masked position."""
    steps, seen = 6, []
    naive.naive_generate(short12.model, short12.graph, short12.noise, 2, 12, steps, torch.Generator().manual_seed(4),
                         on_probs=lambda kind, x, probs: seen.append((kind, x.clone(), probs.clone())))
    assert [kind for kind, _, _ in seen] == ["analytic"] * steps + ["denoise"]
    for step_index, (kind, x, probs) in enumerate(seen):
        masked = x == short12.mask_id
        if not masked.any():
            continue
        ours = _our_step_logits(short12, x, step_index, steps).exp()
        expected = probs[masked]
        if kind == "denoise":  # the naive denoise drops the mask column; ours gives it probability 0
            assert torch.all(ours[:, -1] == 0)
            ours = ours[:, :-1]
        assert torch.allclose(ours, expected.clamp_min(0), rtol=1e-4, atol=1e-7), (kind, step_index)


def test_flop_count_of_a_small_shape_worked_by_hand():
    """Hidden H = 4, conditioning C = 2, 2 blocks, vocabulary V = 10, rows of L = 3 tokens; a FLOP is
    half a multiply-add.

    Per token and block: qkv 4x12 + out 4x4 + MLP 4x16 + 16x4 = 192 multiply-adds (384 FLOPs) and
    attention scores and values 2 x L x H = 24 (48 FLOPs): 432, so 864 for the two blocks.
    Per row: each block's adaLN C x 6H = 48 multiply-adds (96 FLOPs, 192 for two), the output layer's
    adaLN C x 2H = 16 (32), the sigma map 256 x C + C x C = 516 (1032): 1256.
    One row of 3 tokens: 3 x 864 + 1256 = 3848; two rows: 7696. Output layer at 2 positions:
    2 x H x V = 80 multiply-adds, 160 FLOPs.
    Two sampling passes over one row with the output at 2 positions in all: the last block's out and MLP
    (4x4 + 4x16 + 16x4 = 144 multiply-adds, 288 FLOPs) skip the other 2 x 3 - 2 = 4 positions:
    2 x 3848 - 4 x 288 + 160 = 6704."""
    count = measure.FlopCount(hidden=4, cond=2, blocks=2, vocab=10)
    assert count.trunk(1, 3) == 3848 and count.trunk(2, 3) == 7696
    assert count.output(2) == 160
    assert count.sampling_loop(1, 3, 2, 2) == 6704


def test_flop_count_reads_the_shape_from_the_config(short12):
    assert measure.FlopCount.of(short12.config) == measure.FlopCount(hidden=128, cond=64, blocks=3, vocab=99)


def test_peak_memory_is_measured_per_configuration():
    with measure.PeakMemory(torch.device("cpu")) as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert mem.peak_bytes is not None
    if mem.method.startswith("VmHWM"):
        assert mem.peak_bytes >= 32 * 2**20


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section_on_a_cpu(tmp_path, repo_root, reference):
    """benchmarks/gpu_check.py --smoke: the GPU check's code paths on a tiny preset (no timing asserted)."""
    out_file = tmp_path / "gpu-check.json"
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--budget-s", "900",
                          "--out", str(out_file), "--reference", str(reference)],
                         capture_output=True, text=True, timeout=600, cwd=repo_root)
    assert out.returncode == 0, out.stderr
    report = json.loads(out_file.read_text())
    sections = report["sections"]
    for name in ("environment", "matmul_peak", "reference", "sdpa", "runs", "naive", "identity", "a10",
                 "graph_runs", "identity_best", "paid"):
        assert sections[name]["status"] == "ok", (name, sections[name])
    assert "skipped" not in json.dumps(sections["reference"]), sections["reference"]
    env = sections["environment"]["result"]
    for key in ("device_name", "torch", "cuda", "flash_attn"):
        assert key in env, key
    assert report["matmul_peak"]["gflops"] > 0
    configs = {(e["config"], e["rows"]) for e in report["points"]}
    assert configs >= {("eager", 1), ("eager", 2), ("fused", 1), ("fused", 2), ("graphs+fused", 1),
                       ("graphs+fused", 2), ("graphs", 1), ("graphs", 2)}
    for entry in report["points"]:
        assert entry["steps"] == 4 and entry["samples_per_s"] > 0 and entry["peak_fraction"] > 0
        assert entry["seconds_per_sample"] == pytest.approx(entry["seconds"] / entry["rows"])
        assert "peak_mem_bytes" in entry
    assert sections["naive"]["result"]["samples_per_s"] > 0
    assert sections["identity_best"]["result"]["cuda_graphs"] is True
    for name in ("identity", "identity_best"):  # a seeded request alone and beside others: the same tokens
        assert sections[name]["result"]["tokens_identical"] is True, sections[name]["result"]
    assert sections["a10"]["result"]["completed"] is True
    paid = sections["paid"]["result"]
    assert {"fused step", "CUDA graphs", "one request vs the naive loop"} <= set(paid)
    assert "which speed-up paid" in out.stdout


def test_cpu_microbench_script_prints_its_measurements():
    """scripts/microbench_cpu.py is where docs/benchmarks-sampling.md's part measurements come from."""
    out = subprocess.run([sys.executable, "scripts/microbench_cpu.py", "dispatch", "rotary", "last-block",
                          "--repeats", "1"], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    for words in ("log_score_at_index, hidden 32", "one complex product", "last block, 8 positions",
                  "network, 8 masked positions"):
        assert words in out.stdout, words


def test_one_request_gets_a_bf16_row_beside_float32_on_a_cpu_with_native_bf16(monkeypatch, capsys):
    from sedd_cli.main import main
    from sedd_core import loading

    cpu = torch.device("cpu")
    monkeypatch.delenv("SEDD_DTYPE", raising=False)
    monkeypatch.setattr(loading, "cpu_bf16_support", lambda: "avx512_bf16")
    assert sedd_bench.bench_dtypes(None, cpu) == [torch.float32, torch.bfloat16]
    assert sedd_bench.bench_dtypes("bfloat16", cpu) == [torch.bfloat16]  # --dtype / SEDD_DTYPE: that one only
    assert main(["bench", "--preset", "short12", "--steps", "2", "--sections", "request", "--repeats", "1",
                 "--baselines", "authors", "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "float32" and report["request_dtypes"] == ["float32", "bfloat16"]
    rows = report["one_request"]["by_dtype"]
    assert list(rows) == ["float32", "bfloat16"]
    assert rows["float32"]["ours_s"] == report["one_request"]["ours_s"]
    assert rows["bfloat16"]["ours_s"]["min"] > 0 and rows["bfloat16"]["speedup_authors_paired"] > 0
    assert rows["bfloat16"]["paired_vs_first_dtype"] > 0

    monkeypatch.setattr(loading, "cpu_bf16_support", lambda: None)  # elsewhere: float32 alone, as before
    assert sedd_bench.bench_dtypes(None, cpu) == [torch.float32]
