"""`sedd sample`, `sedd infill` and `sedd info`: the authors' run_sample.py and run_sample_cond.py."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import UsageError
from .options import add_model_args, load_model

# sedd_core.sampling.PREDICTORS, written out so that building the parser imports no torch (a test keeps
# the two equal).
PREDICTORS = ("analytic", "euler")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--steps", type=int, default=128, help="denoising steps (default 128)")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw (default 1)")
    p.add_argument("--length", type=int, default=None, help="tokens per sample (default: the model's length)")
    p.add_argument("--predictor", choices=PREDICTORS, default="analytic")
    p.add_argument("--seed", type=int, default=None, help="seed for a reproducible result")
    controls = p.add_argument_group("sampling controls", "how a revealed position picks its token (the clean-token "
                                    "distribution reshaped; the reveal rate follows the noise schedule)")
    controls.add_argument("--temperature", type=float, default=1.0,
                          help=">= 0 (default 1); 0 = deterministic: the most confident positions first, each "
                               "with its most likely token")
    controls.add_argument("--top-p", type=float, default=1.0,
                          help="0 < p <= 1 (default 1 = off): keep the most likely tokens that make up p")
    controls.add_argument("--top-k", type=int, default=0, help="integer >= 0 (default 0 = off): keep the k most "
                                                               "likely tokens")
    controls.add_argument("--min-p", type=float, default=0.0,
                          help="0 <= p <= 1 (default 0 = off): keep tokens at least p times as likely as the most "
                               "likely one")
    p.add_argument("--show-intermediate", action="store_true", help="print the text after every step (stderr)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample per line on stdout")


CONTROL_FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "min_p": "--min-p"}


def sampling_controls(args) -> dict:
    """The control flags as `make_job` arguments, checked against their ranges before any model loads."""
    from sedd_core.controls import ControlError, SamplingControls

    values = {name: getattr(args, name) for name in CONTROL_FLAGS}
    try:
        SamplingControls(**values)
    except ControlError as exc:
        raise UsageError(f"argument {CONTROL_FLAGS[exc.field]}: {exc}") from None
    return values


def run_generation(args, prefix: str = "", suffix: str = "", segments: list | None = None) -> int:
    from tqdm import tqdm

    from sedd_core import generation as gen

    controls = sampling_controls(args)
    lm = load_model(args)
    seed = gen.new_seed() if args.seed is None else args.seed
    job = gen.make_job(lm, num_samples=args.num_samples, steps=args.steps, length=args.length,
                       predictor=args.predictor, seed=seed, prefix=prefix, suffix=suffix, segments=segments,
                       **controls)
    start = time.perf_counter()
    with tqdm(total=args.steps + 1, desc="denoising", unit="step", file=sys.stderr) as bar:
        for state in gen.iterate(lm, job):
            bar.update(1)
            if args.show_intermediate:
                for i, text in enumerate(gen.decode_rows(lm, state.x, placeholder=True)):
                    bar.write(f"[step {state.step_index}/{args.steps + 1} sample {i}] {text!r}", file=sys.stderr)
    elapsed = time.perf_counter() - start
    texts = gen.decode_rows(lm, job.x)
    for i, text in enumerate(texts):
        if args.json:
            print(json.dumps({"index": i, "text": text, "seed": seed, "steps": args.steps,
                              "predictor": args.predictor, **controls, "model": lm.name}), flush=True)
        else:
            print(f"--- sample {i} (seed {seed}) ---\n{text}", flush=True)
    print(f"{len(texts)} sample(s) in {elapsed:.2f} s on {lm.device}", file=sys.stderr)
    return 0


def cmd_sample(args) -> int:
    return run_generation(args)


def parse_segments(text: str) -> list:
    try:
        segments = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--segments is not valid JSON ({exc.msg} at character {exc.pos}); write a "
                         "list such as '[\"ROMEO. \", 40, \".\\n\"]'") from None
    if not isinstance(segments, list):
        raise UsageError(f"--segments must be a JSON list of strings and integers, got {type(segments).__name__}")
    return segments


def cmd_infill(args) -> int:
    segments = None if args.segments is None else parse_segments(args.segments)
    return run_generation(args, prefix=args.prefix, suffix=args.suffix, segments=segments)


def cmd_info(args) -> int:
    from sedd_core.loading import cpu_bf16_support

    lm = load_model(args)
    info = {
        "source": lm.source, "folder": str(lm.path.resolve()), "layout": lm.layout, "name": lm.name,
        "config": lm.config.to_dict(), "tokenizer": lm.tokenizer.name, "vocab_size": lm.config.vocab_size,
        "length": lm.length, "parameters": lm.parameters, "device": str(lm.device), "dtype": str(lm.dtype),
        "dtype_choice": lm.dtype_choice, "cpu_bf16": cpu_bf16_support() if lm.device.type == "cpu" else None,
        "compiled": getattr(lm.runner, "compiled", False),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>12}: {value}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("sample", help="draw unconditional samples")
    add_generation_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("infill", help="fill the middle between a fixed prefix and suffix, or the gaps of --segments")
    add_generation_args(p)
    p.add_argument("--prefix", default="", help="text fixed at the start")
    p.add_argument("--suffix", default="", help="text fixed at the end")
    p.add_argument("--segments", default=None, help="the whole canvas as a JSON list: strings are kept exactly, "
                                                    "integers are gaps of that many tokens, e.g. "
                                                    "'[\"ROMEO. \", 40, \".\\n\"]' (not with --prefix/--suffix/--length)")
    p.set_defaults(func=cmd_infill)

    p = sub.add_parser("info", help="show the resolved model folder, config, tokenizer and size")
    add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
