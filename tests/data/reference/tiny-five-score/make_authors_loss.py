"""Write authors_loss.json: the authors' `get_loss_fn(noise, graph, train=False)` on tiny-five's strings.

Runs the authors' own losses.py, graph_lib.py, noise_lib.py, catsample.py and model/utils.py from a
checkout of louaaron/Score-Entropy-Discrete-Diffusion (not part of this repository) over our DDiT
network: their model/transformer.py needs flash-attn, and our network reproduces their log scores
(tests/test_reference.py). Only the directory holding model/utils.py is put on the path, with an
empty model/__init__.py in place of theirs (which imports the flash-attn transformer).

    python make_authors_loss.py AUTHORS_DIR MODEL_DIR --draws 200000 --commit SHA > authors_loss.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from sedd_core.loading import load_network
from sedd_core.tokenizers import CharTokenizer

STRINGS = ["hello world!", "diffusion ok", "masked chars", "score ratios", "tiny dataset"]


def fixed_rows(loss_fn, model, graph, noise, x0: torch.Tensor, count: int) -> dict[str, list]:
    """A few rows at a drawn t and perturbation, passed to their loss explicitly: exact checks of ours."""
    t = (1 - 1e-3) * torch.rand(count) + 1e-3
    perturbed = graph.sample_transition(x0.expand(count, -1), noise(t)[0][:, None])
    with torch.no_grad():
        loss = loss_fn(model, x0.expand(count, -1), t=t, perturbed_batch=perturbed)
    return {"t": t.tolist(), "perturbed": perturbed.tolist(), "loss_nats": loss.tolist()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("authors_dir")
    p.add_argument("model_dir")
    p.add_argument("--draws", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=8, help="rows with their t and x_t written out, per string")
    p.add_argument("--commit", required=True)
    args = p.parse_args()
    sys.path.insert(0, args.authors_dir)
    import graph_lib
    import losses
    import noise_lib

    model, config, _ = load_network(Path(args.model_dir), torch.device("cpu"), torch.float32)
    graph = graph_lib.Absorbing(config.tokens)
    noise = noise_lib.LogLinearNoise()
    loss_fn = losses.get_loss_fn(noise, graph, train=False)
    tokenizer = CharTokenizer()
    torch.manual_seed(args.seed)
    results = {}
    for text in STRINGS:
        x0 = torch.tensor(tokenizer.encode(text))
        values = []
        with torch.no_grad():
            for start in range(0, args.draws, args.batch):
                rows = min(args.batch, args.draws - start)
                values.append(loss_fn(model, x0.expand(rows, -1)).double())
        values = torch.cat(values)
        results[text] = {"mean_nats": values.mean().item(),
                         "stderr_nats": (values.std() / math.sqrt(len(values))).item(),
                         "rows": fixed_rows(loss_fn, model, graph, noise, x0, args.rows)}
        print(text, results[text], file=sys.stderr)
    print(json.dumps({
        "what": "mean over draws of the authors' get_loss_fn(noise, graph, train=False)(model, x0): "
                "t ~ U(1e-3, 1), x_t from the absorbing forward process, sum over positions of "
                "dsigma/dt * score entropy; nats per 12-character string",
        "authors_repository": "https://github.com/louaaron/Score-Entropy-Discrete-Diffusion",
        "authors_commit": args.commit, "model": "tiny-five (tests/data/reference/tiny-five)",
        "network": "sedd_core.model.SEDD (theirs needs flash-attn; ours matches their log scores)",
        "device": "cpu", "dtype": "float32", "draws_per_string": args.draws, "torch_seed": args.seed,
        "command": "python tests/data/reference/tiny-five-score/make_authors_loss.py AUTHORS_DIR "
                   f"MODEL_DIR --draws {args.draws} --seed {args.seed} --commit {args.commit}",
        "torch_version": torch.__version__, "strings": results,
    }, indent=2))


if __name__ == "__main__":
    main()
