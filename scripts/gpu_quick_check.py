"""One short prepared CUDA check (run on a lent GPU): SDPA/flash-attn, bf16, the reference vectors on CUDA,
and the sampling step of a SEDD-medium-shaped model (random weights) against the naive full-vocabulary loop.

Prints a table and writes JSON to --out. Step times are averaged over a few steps from the all-masked
state (the most expensive point of a run: every position needs the output layer) and turned into
samples/s for a 128-step run by multiplying by 129 updates; that is a lower bound on real throughput.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sedd_core.config import SEDDConfig
from sedd_core.fast_model import FLASH_ATTN_AVAILABLE, FastSEDD
from sedd_core.graph import graph_from_config
from sedd_core.model import SEDD
from sedd_core.noise import noise_from_config
from sedd_core.sampling import Job, denoising_step


def timed(fn, reps):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def matmul_peak(dtype=torch.bfloat16, n=8192):
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n**3 / timed(lambda: a @ b, 10)


def medium(dtype):
    cfg = SEDDConfig.from_dict({"tokens": 50257, "model": {"hidden_size": 1024, "cond_dim": 128, "length": 1024,
                                "n_blocks": 24, "n_heads": 16, "scale_by_sigma": True, "dropout": 0.0}})
    torch.manual_seed(0)
    model = SEDD(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    inv = model.rotary_emb.inv_freq.clone()
    model = model.to("cuda", dtype).eval()
    model.rotary_emb.inv_freq = inv.cuda()
    return cfg, model


def network_flops(cfg, tokens, out_positions):
    h, L = cfg.model.hidden_size, cfg.model.length
    per_token_block = 2 * (3 * h * h + h * h + 8 * h * h) + 4 * L * h
    return tokens * cfg.model.n_blocks * per_token_block + out_positions * 2 * h * cfg.vocab_size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--steps-timed", type=int, default=4)
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "flash_attn_importable": FLASH_ATTN_AVAILABLE}
    print(json.dumps(res))
    res["bf16_matmul_peak_tflops"] = matmul_peak() / 1e12
    print("bf16 matmul peak TFLOP/s", round(res["bf16_matmul_peak_tflops"], 1), flush=True)

    # SDPA backend: does the flash kernel accept our shapes in bf16?
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(1, 16, 1024, 64, device="cuda", dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        res["sdpa_flash_kernel"] = True
    except Exception as exc:
        res["sdpa_flash_kernel"] = f"no: {exc}"

    # reference vectors on CUDA
    try:
        ref_root = Path(__file__).resolve().parents[1] / "shared_ref"
        from sedd_core.loading import load_network
        out = {}
        for name in ("absorb-a", "uniform-a"):
            ref = torch.load(ref_root / name / "reference.pt", weights_only=True)
            for dtype in (torch.float32, torch.bfloat16):
                model, _, _ = load_network(ref_root / name / "oxen-layout", torch.device("cuda"), dtype)
                with torch.no_grad():
                    ls = model(ref["x"].cuda(), ref["sigma"].cuda()).float().cpu()
                rel = ((ls - ref["log_score"]).abs().max() / ref["log_score"].abs().max()).item()
                out[f"{name}/{str(dtype)[6:]}"] = rel
        res["reference_log_score_rel_err"] = out
        print("reference rel err", out, flush=True)
    except Exception as exc:
        res["reference_log_score_rel_err"] = f"failed: {exc}"

    cfg, model = medium(torch.bfloat16)
    graph, noise = graph_from_config(cfg), noise_from_config(cfg)
    params = sum(p.numel() for p in model.parameters())
    runner = FastSEDD(model)  # what the server samples through
    res["medium_parameters"] = params
    peak = res["bf16_matmul_peak_tflops"] * 1e12
    rows_out = []
    for rows in [int(r) for r in args.rows.split(",")]:
        torch.cuda.reset_peak_memory_stats()
        x = torch.full((rows, 1024), cfg.tokens, device="cuda")
        gen = torch.Generator(device="cuda").manual_seed(0)
        job = Job(x=x, steps=128, generator=gen)

        def one(job=job, x=x):
            job.x = x
            job.step_index = 0
            denoising_step(runner, graph, noise, [job])
        one()
        t = timed(one, args.steps_timed)
        flops = network_flops(cfg, rows * 1024, rows * 1024)
        row = {"rows": rows, "step_s_all_masked": t, "samples_per_s_128_steps": rows / (129 * t),
               "network_tflops": flops / t / 1e12, "fraction_of_peak": flops / t / peak,
               "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}
        rows_out.append(row)
        print(row, flush=True)
    res["ours"] = rows_out

    # the naive loop: full output, full-vocabulary analytic maths everywhere, one request
    x = torch.full((1, 1024), cfg.tokens, device="cuda")
    t_grid = torch.tensor([[0.5]], device="cuda")

    def naive():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            sigma = noise.total(t_grid)
            score = model(x, sigma[:, 0]).float().exp()
            probs = graph.analytic_probs(x, score, sigma - noise.total(t_grid - 1 / 128))
            gumbel = 1e-10 - (torch.rand_like(probs) + 1e-10).log()
            return (probs / gumbel).argmax(dim=-1)
    naive()
    torch.cuda.reset_peak_memory_stats()
    tn = timed(naive, args.steps_timed)
    res["naive_rows1_step_s"] = tn
    res["naive_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    res["speedup_vs_naive_rows1_all_masked"] = tn / rows_out[0]["step_s_all_masked"]
    print("naive step s", tn, "ratio", res["speedup_vs_naive_rows1_all_masked"], flush=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
