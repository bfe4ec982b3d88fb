"""`sedd bench`: how fast sampling runs on this machine (benchmarks/sedd_bench.py measures; this is its
command line)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import UsageError
from .options import flags_given

# benchmarks.presets.PRESETS' names, written out so that building the parser imports no torch (a test
# keeps the two equal).
PRESET_NAMES = ("char-default", "char-6m-256", "short12", "gpt2-small-trunk", "sedd-medium")


def cmd_bench(args) -> int:
    from app.settings import ModelSettings
    from benchmarks.sedd_bench import print_table, run_bench

    settings = ModelSettings(**flags_given(args, ("device", "dtype")))
    args.device, args.dtype = settings.device, settings.dtype
    args.compile = args.compile or settings.compile is not None
    try:
        report = run_bench(args, settings.load_options() | {"compile": None})
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a model source (folder, default, oxen:, hf:); "
                                                  "default: a synthetic model of --preset with random weights")
    p.add_argument("--preset", default="char-default", choices=PRESET_NAMES,
                   help="shape of the synthetic model (default char-default, the shipped model's shape)")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: $SEDD_DEVICE, else auto)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: $SEDD_DTYPE, else bf16 on "
                                                  "CUDA and on CPUs with native bf16, fp32 on other CPUs)")
    p.add_argument("--steps", type=int, default=128, help="denoising steps (default 128)")
    p.add_argument("--length", type=int, default=None, help="tokens per sample (default: the model's length)")
    p.add_argument("--rows", default="1,2,4,8,16,32", help="rows per pass to try (default 1,2,4,8,16,32)")
    p.add_argument("--tokens", default="512,1024,4096,8192", help="tokens per pass for the FLOP/s section")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (min and median shown)")
    p.add_argument("--naive-steps", type=int, default=None,
                   help="run the naive loop for this many steps only and scale its time (for slow devices)")
    p.add_argument("--baselines", default="authors,loop",
                   help="naive baselines: authors (their network code) and/or loop (the naive loop over ours)")
    p.add_argument("--sections", default="request,rows,flops", help="which of request,rows,flops to run")
    p.add_argument("--peak-size", type=int, default=2048, help="square matmul size for the peak (default 2048)")
    p.add_argument("--compile", action="store_true", help="torch.compile the trunk (shape buckets; see fast_model.py; "
                                                          "also on with SEDD_COMPILE)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: PyTorch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure sampling speed against a naive loop and the hardware peak")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
