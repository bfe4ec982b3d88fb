"""One denoising step on the CPU, timed: the whole step of two preset shapes, and the step's draw alone.

For before/after comparisons of the sampler (docs/benchmarks-sampling.md, "Exact draws"): run it from
two checkouts in turns, each with its own sedd_core on the path, and compare the medians:

    PYTHONPATH=BEFORE_DIR python scripts/bench_step.py --label before
    PYTHONPATH=.          python scripts/bench_step.py --label after

Cases (analytic predictor, one row, 128 steps, float32, 2 threads unless --threads):
  char-default@k   the `char-default` preset (98 characters, length 128), the whole step, at step k of 128
                   with the share of positions still masked that the schedule gives at that step
  gpt2@k           `gpt2-small-trunk` (GPT-2 vocabulary, length 256), the whole step, likewise
  draw-V@N         the step with a stand-in network (V real tokens) that copies fixed log scores (a long-tailed
                   clean-token distribution scaled by the score's time factor): the step's maths and
                   draw alone, V + 1 columns at N masked positions

Prints one line per case: label, case, median and min milliseconds per step over --repeats, wall clock
and CPU time of the process (steadier on a shared machine; with --threads 1 it is the step's work), and
the load averages before the run. Uses only `Job`, `denoising_step` and `log_score_at_index`, which both
sides of a comparison have.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from benchmarks.presets import synthetic_model
from sedd_core.fast_model import FastSEDD
from sedd_core.sampling import Job, denoising_step, time_grid


class StandInNetwork:
    """Copies fixed log scores (N, V + 1) for the first N masked positions: the network's cost is one copy."""

    def __init__(self, vocab: int, positions: int, sigma: float, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(positions, vocab, generator=gen) * 3  # a long tail over the vocabulary
        clean = torch.log_softmax(logits, dim=-1)
        time_factor = -math.log(math.expm1(sigma))  # s_y = p(x0 = y | xt) / (e^sigma - 1) (absorbing graph)
        self.log_score = torch.cat([clean + time_factor, torch.zeros(positions, 1)], dim=1)

    def log_score_at_index(self, x, sigma, index, out=None, row_of=None):
        n = len(index)
        if out is None:
            return self.log_score[:n].clone()
        return out.copy_(self.log_score[:n])


def masked_share(steps: int, k: int) -> float:
    """The share of positions still masked at step k under the log-linear schedule: about t."""
    return float(time_grid(steps)[k])


CONTROLS: dict = {}  # --controls: the sampling controls of every job (a checkout that has them)


def make_job_at(mask_id: int, length: int, steps: int, k: int, masked: int | None, seed: int) -> Job:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, mask_id, (1, length), generator=gen)
    count = masked if masked is not None else max(1, round(length * masked_share(steps, k)))
    x[0, torch.randperm(length, generator=gen)[:count]] = mask_id
    extra = {}
    if CONTROLS:
        from sedd_core.controls import SamplingControls

        extra["controls"] = SamplingControls(**CONTROLS)
    job = Job(x=x, steps=steps, predictor="analytic", generator=gen, **extra)
    job.step_index = k
    return job


def time_case(runner, graph, noise, mask_id, length, steps, k, masked, repeats) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU (process) milliseconds of each step. On a shared machine the CPU time is the
    steadier figure: it counts the work, not the waits for a core."""
    wall, cpu = [], []
    for r in range(repeats):
        job = make_job_at(mask_id, length, steps, k, masked, seed=r)
        start, start_cpu = time.perf_counter(), time.process_time()
        denoising_step(runner, graph, noise, [job])
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="run")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="char-default@1,char-default@64,gpt2@1,gpt2@64,draw-98@128,"
                                           "draw-50257@16,draw-50257@256")
    parser.add_argument("--controls", default="", help="sampling controls for every job, e.g. "
                                                        "'temperature=0.7,top_p=0.9,top_k=50' (this checkout's)")
    args = parser.parse_args()
    for item in filter(None, args.controls.split(",")):
        name, value = item.split("=")
        CONTROLS[name] = int(value) if name == "top_k" else float(value)
    torch.set_num_threads(args.threads)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    steps = 128
    models = {}
    for case in args.cases.split(","):
        name, at = case.split("@")
        if name.startswith("draw-"):
            vocab, positions = int(name.split("-")[1]), int(at)
            preset = "short12" if vocab < 1000 else "gpt2-small-trunk"
            lm = models.setdefault(preset, synthetic_model(preset, torch.device("cpu"), torch.float32,
                                                           length=None if vocab < 1000 else 256))
            k = 1
            sigma = float(lm.noise.total(torch.tensor(masked_share(steps, k))))
            runner = StandInNetwork(vocab, positions, sigma)
            length = max(positions, lm.length)
            time_case(runner, lm.graph, lm.noise, lm.graph.mask, length, steps, k, positions, 2)  # warm up
            wall, cpu = time_case(runner, lm.graph, lm.noise, lm.graph.mask, length, steps, k, positions,
                                  args.repeats)
        else:
            preset = "char-default" if name == "char-default" else "gpt2-small-trunk"
            lm = models.setdefault(preset, synthetic_model(preset, torch.device("cpu"), torch.float32))
            runner = FastSEDD(lm.model)
            k = int(at)
            time_case(runner, lm.graph, lm.noise, lm.graph.mask, lm.length, steps, k, None, 2)  # warm up
            wall, cpu = time_case(runner, lm.graph, lm.noise, lm.graph.mask, lm.length, steps, k, None, args.repeats)
        print(f"{args.label:8s} {case:16s} wall median {statistics.median(wall):8.3f} min {min(wall):8.3f} ms | "
              f"cpu median {statistics.median(cpu):8.3f} min {min(cpu):8.3f} ms  (load {load})", flush=True)


if __name__ == "__main__":
    main()
