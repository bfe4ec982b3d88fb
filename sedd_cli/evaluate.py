"""`sedd eval` (held-out bits per token of a text file) and `sedd score` (the ELBO bound of texts)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .options import add_model_args, load_model


def cmd_eval(args) -> int:
    from sedd_core.evaluate import held_out_bits

    lm = load_model(args)
    result = held_out_bits(lm, Path(args.data).read_text(), args.windows, args.batch_size, args.repeats, args.seed)
    result.update(model=lm.name, source=lm.source, data=str(args.data), tokenizer=lm.tokenizer.name)
    if args.json:
        print(json.dumps(result))
    else:
        unit = "character" if lm.tokenizer.name == "char" else "token"
        print(f"{result['bits_per_token']:.4f} ± {result['standard_error']:.4f} bits per {unit} (ELBO bound) "
              f"over {result['sequences']} windows of {lm.length} from {args.data}")
    return 0


def cmd_score(args) -> int:
    from tqdm import tqdm

    from sedd_core.evaluate import TextScores

    lm = load_model(args)
    scores = TextScores(lm, args.texts, args.samples, args.seed)
    with tqdm(total=scores.total_rows, desc="scoring", unit="row", file=sys.stderr, delay=1.0) as bar:
        results = scores.run(args.batch_size, bar.update)
    for result in results:
        if args.json:
            print(json.dumps({**result.to_dict(), "samples": args.samples, "seed": args.seed, "model": lm.name}),
                  flush=True)
        else:
            shown = result.text if len(result.text) <= 60 else result.text[:57] + "..."
            print(f"{shown!r}: {result.tokens} tokens, nll <= {result.nll_nats:.4f} ± {result.stderr_nats:.4f} "
                  f"nats, {result.bits_per_token:.4f} bits per token, perplexity <= {result.perplexity_bound:.4g}",
                  flush=True)
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("score", help="the ELBO bound on -log p(text) of each TEXT, with its standard error")
    add_model_args(p)
    p.add_argument("texts", nargs="+", metavar="TEXT", help="text to score (longer than the model's length: "
                                                          "consecutive windows, their bounds added)")
    p.add_argument("--samples", type=int, default=128, help="Monte-Carlo draws of the noise level per window "
                                                            "(default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="rows (window, draw) per forward pass "
                                                                "(default: by model size)")
    p.add_argument("--json", action="store_true", help="one JSON object per text per line on stdout")
    p.set_defaults(func=cmd_score)

    p = subparsers.add_parser("eval", help="held-out ELBO in bits per character/token on a text file")
    add_model_args(p)
    p.add_argument("--data", required=True, help="a text file (e.g. data/shakespeare/valid.txt)")
    p.add_argument("--windows", type=int, default=256, help="evenly spaced windows of the model's length")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="noise draws per window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
