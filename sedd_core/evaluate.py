"""`sedd eval`: the held-out diffusion ELBO of a model on a text file, in bits per character/token.

The diffusion-weighted score entropy of a sequence estimates an upper bound on -log p(x0)
(the paper's ELBO), so loss / (length * ln 2) bounds the bits per token. It is a Monte-Carlo
estimate over t and the forward noise: we report the mean and its standard error.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .loading import LoadedModel
from .losses import score_entropy_loss


def evenly_spaced_windows(ids: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """`count` windows of `length` tokens spread evenly over `ids` (deterministic)."""
    if len(ids) < length:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the model's length {length}")
    starts = torch.linspace(0, len(ids) - length, count).long()
    return ids[starts[:, None] + torch.arange(length)]


@torch.inference_mode()
def elbo_draws(model, graph, noise, ids: torch.Tensor, samples: int, seed: int = 0, batch_size: int = 64,
               progress=None) -> torch.Tensor:
    """(W, samples) draws of the bound, in nats, for the windows `ids` (W, L) of the model's length;
    the model runs in eval mode and is put back in its mode afterwards. (The interface of the shared
    estimator the "scoring" branch brings; this stand-in keeps the trainer's use working until then.)"""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    draws = []
    training = model.training
    model.eval()
    try:
        for _ in range(samples):
            for start in range(0, len(ids), batch_size):
                x0 = ids[start:start + batch_size].to(device)
                draws.append(score_entropy_loss(model, graph, noise, x0, generator=generator).double().cpu())
                if progress is not None:
                    progress(len(x0))
    finally:
        model.train(training)
    return torch.cat(draws).reshape(samples, len(ids)).T


@torch.inference_mode()
def held_out_bits(lm: LoadedModel, text: str, windows: int = 256, batch_size: int = 32,
                  repeats: int = 1, seed: int = 0) -> dict[str, float]:
    ids = torch.tensor(lm.tokenizer.encode(text), dtype=torch.long)
    x0_all = evenly_spaced_windows(ids, lm.length, windows)
    generator = torch.Generator(device=lm.device).manual_seed(seed)
    per_sequence = []
    batches = [x0_all[i:i + batch_size] for i in range(0, windows, batch_size)] * repeats
    for x0 in tqdm(batches, desc="eval", unit="batch", file=sys.stderr):
        loss = score_entropy_loss(lm.model, lm.graph, lm.noise, x0.to(lm.device), generator=generator)
        per_sequence += (loss.float() / lm.length / math.log(2)).tolist()
    values = torch.tensor(per_sequence, dtype=torch.float64)
    return {"bits_per_token": values.mean().item(),
            "standard_error": (values.std() / math.sqrt(len(values))).item(),
            "sequences": len(values), "length": lm.length}


def cmd_eval(args) -> int:
    from .cli import load_model

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


def add_cli(subparsers) -> None:
    from .cli import _add_model_args

    p = subparsers.add_parser("eval", help="held-out ELBO in bits per character/token on a text file")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="a text file (e.g. data/shakespeare/valid.txt)")
    p.add_argument("--windows", type=int, default=256, help="evenly spaced windows of the model's length")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="noise draws per window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
