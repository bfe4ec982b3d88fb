"""Train a SEDD model on a text corpus: `train(config, run_dir)` and the `Trainer` behind it.

Objective (the paper's diffusion-weighted denoising score entropy, `sedd_core.losses.score_entropy_loss`): t ~ U(1e-3, 1) per
sequence, x_t from the forward process at sigma(t), loss = sum over positions of
dsigma/dt(t) * score entropy, averaged over the batch. AdamW with linear warm-up,
gradient clipping and an EMA of the weights; bfloat16 autocast on CUDA (the weights
stay float32), float32 on a CPU. A new run starts from the authors' initialisation
(`SEDD.authors_init`), or from a checkpoint's weights (`init`, fine-tuning).

The batch: `training.batch_size` rows per optimiser step over every rank and micro-batch. Each
step draws the whole batch (crops, diffusion times, noise) from seeded generators on every rank,
and each rank trains on its own rows (`distributed.Ranks`), in `training.accum` micro-batches,
under DistributedDataParallel when there are several ranks: a step is the same whatever the
number of ranks. Crops are random windows of the encoded text, or random `model.length` blocks of a
token folder (`corpus.py`). Held-out evaluation is `sedd eval`'s estimator (`sedd_core.elbo.elbo_draws`)
on fixed crops with fixed noise, on rank 0.

The run folder (`RUN_DIR`, laid out in `checkpoint.py`) is at once a model
`sedd_core.load` reads and a resumable run; only rank 0 writes it. Sample snapshots from the EMA
weights go to `samples/step_XXXXXXX.txt`, metrics to metrics.jsonl and the trackers (`tracking.py`).

The loop stops between two steps when `request_stop(signal)` was called (by the command line's
signal handlers, on any rank: the ranks agree before each step) and saves a checkpoint first.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import SEDDConfig
from ..elbo import elbo_draws
from ..files import atomic_write_text
from ..generation import GenerationError, generate
from ..graph import graph_from_config
from ..loading import LoadedModel, resolve_device
from ..losses import draw_times, score_entropy_loss
from ..model import SEDD
from ..noise import noise_from_config
from ..tokenizers import CharTokenizer, Tokenizer, load_gpt2, resolve_tokenizer
from .checkpoint import (
    CHECKPOINT_VERSION,
    EXPORT_DTYPES,
    META_CHECKPOINT,
    append_metrics,
    read_training_state,
    to_cpu,
    trim_metrics,
    write_checkpoint,
    write_train_config,
)
from .config import TrainConfig, load_train_config
from .corpus import InMemoryTokens, load_corpus
from .distributed import Ranks, micro_batch, replica_digest
from .ema import ExponentialMovingAverage
from .errors import TrainingError
from .progress import Meter, ProgressBar, format_duration
from .tracking import Trackers, open_trackers

__all__ = ["Ranks", "Trainer", "TrainingError", "make_tokenizer", "train"]

LN2 = math.log(2.0)


def make_tokenizer(config: TrainConfig, run_dir: Path | None = None,
                   gpt2_vocab: str | os.PathLike | None = None, resume: bool = False) -> Tokenizer:
    """The tokenizer of a new run, or (`resume`) the one the run folder holds. For GPT-2 the ranks come
    from RUN_DIR/gpt2.tiktoken (copied there by the first checkpoint), the `gpt2_vocab` file
    (SEDD_GPT2_VOCAB) or tiktoken's download, in that order."""
    if resume and run_dir is not None and (Path(run_dir) / "config.yaml").is_file():
        return resolve_tokenizer(config.vocab_tokens, Path(run_dir), config.tokenizer, gpt2_vocab)
    if config.tokenizer == "char":
        return CharTokenizer(model_max_length=config.model.length)
    return load_gpt2(run_dir, gpt2_vocab)


class Trainer:
    """One training run in `run_dir`; `run()` trains to `training.n_iters` and returns the final metrics.

    `run()` reads top-down: each step (`train_step`) is followed by the work that falls due
    (`evaluate_and_log`, `snapshot`, `checkpoint`), and a stop (the end, `request_stop`, Ctrl-C)
    ends with `_finish` or `_save_after_interrupt`. `ranks`: this process among the ranks of a
    data-parallel run (default: the only one). `init`: a loaded checkpoint to start a new run from
    (its network, graph, noise and tokenizer; `config_for_init` makes the matching config)."""

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
                 repo: str | None = None, device: str | torch.device | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None, gpt2_vocab: str | os.PathLike | None = None,
                 ranks: Ranks | None = None, init: LoadedModel | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.ranks = ranks or Ranks()
        main = self.ranks.main
        self.progress = progress and main
        self.log = (log or (lambda msg: tqdm.write(msg, file=sys.stderr))) if main else (lambda msg: None)
        t = config.training
        try:
            self.device = resolve_device(device)
        except ValueError as exc:
            raise TrainingError(str(exc)) from exc
        self.micro_batch = micro_batch(t.batch_size, self.ranks.world_size, t.accum)
        self.log(f"sedd train: {self.ranks.describe()}; device {self.device}; global batch {t.batch_size} = "
                 f"{self.ranks.world_size} rank(s) x {t.accum} micro-batch(es) x {self.micro_batch} rows of "
                 f"{config.model.length} tokens")
        self.length = config.model.length
        self.sedd_config: SEDDConfig = config.sedd_config()
        state = self._saved_state(resume)
        if init is not None and state is None:
            self.tokenizer = init.tokenizer
        else:
            self.tokenizer = make_tokenizer(config, self.run_dir, gpt2_vocab, resume=state is not None)
        self.graph = graph_from_config(self.sedd_config)
        self.noise = noise_from_config(self.sedd_config)

        self._build_model(init if state is None else None)
        self.data_generator = torch.Generator().manual_seed(t.seed)
        self.noise_generator = torch.Generator(device=self.device).manual_seed(t.seed + 1)
        self.step = 0
        self.elapsed_s = 0.0
        self.tokens_seen = 0
        self.last_eval: dict[str, Any] = {}
        self._load_data()
        if state is not None:
            self._load_state(state)
        self.net = self._data_parallel()
        self.pusher = None
        if repo and main:
            from .oxen_push import OxenPusher

            p = config.push
            self.pusher = OxenPusher(repo, host=p.host, scheme=p.scheme, branch=p.branch,
                                     background=p.background, log=self.log)
        self.trackers = Trackers()
        self.stop_requested: int | None = None
        self._phase = "idle"  # step | update | other | idle: what a Ctrl-C interrupts
        self._pushed_step = -1
        self.last_saved_step = -1
        self._last_eval_step = self._snapshot_step = -1

    def _build_model(self, init: LoadedModel | None) -> None:
        """The model (the authors' initialisation from training.seed, or `init`'s weights), AdamW and the EMA."""
        t = self.config.training
        torch.manual_seed(t.seed)
        model = SEDD(self.sedd_config)
        if init is None:
            model.authors_init()
        else:
            model.load_state_dict(init.model.state_dict(), strict=True)
            self.log(f"init: the weights of {init.source} ({init.layout} layout); a fresh optimizer")
        self.model = model.to(device=self.device, dtype=torch.float32)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay,
            fused=self.device.type == "cuda" or None)
        self.ema = ExponentialMovingAverage(self.model.parameters(), t.ema)

    def _data_parallel(self) -> torch.nn.Module:
        """The module a training step calls: the model, under DistributedDataParallel when there are several
        ranks (which checks that every rank starts from rank 0's weights)."""
        if not self.ranks.distributed:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        # a different dropout stream on each rank, from the seed, the rank and the step it starts at
        torch.manual_seed(self.config.training.seed + 1_000_003 * (self.ranks.rank + 1) + self.step)
        return DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                       else None, process_group=self.ranks.group)

    def _load_data(self) -> None:
        """The training and held-out tokens, and the fixed held-out crops every evaluation reads."""
        t = self.config.training
        self.train_data, self.valid_data = load_corpus(self.config.data, self.tokenizer, self.length, self.log)
        if self.device.type == "cuda" and isinstance(self.train_data, InMemoryTokens):
            self.train_data = self.train_data.to(self.device)
        eval_generator = torch.Generator().manual_seed(t.seed + 2)
        eval_bs = t.eval_batch_size or t.batch_size
        self.eval_batches = [self.valid_data.crops(eval_bs, eval_generator) for _ in range(t.eval_batches)]

    # ---- state -----------------------------------------------------------------------------------

    def _saved_state(self, resume: bool) -> dict | None:
        """The state to resume from, or None for a new run."""
        meta = self.run_dir / META_CHECKPOINT
        if not meta.is_file():
            if resume:
                self.log(f"note: {meta} does not exist yet; starting a new run in {self.run_dir}")
            return None
        if not resume:
            raise TrainingError(
                f"{self.run_dir} already holds a training run ({META_CHECKPOINT}); pass --resume to continue "
                "it, or choose another --out")
        return read_training_state(self.run_dir, self.config)

    def rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"torch": torch.get_rng_state(), "data_generator": self.data_generator.get_state(),
               "noise_generator": self.noise_generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def set_rng_state(self, rng: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(rng["torch"])
        self.data_generator.set_state(rng["data_generator"])
        if "noise_generator" in rng:
            self.noise_generator.set_state(rng["noise_generator"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def training_state(self) -> dict[str, Any]:
        """What checkpoints-meta/checkpoint.pth holds: plain tensors, dicts, lists and numbers only."""
        return {
            "model": to_cpu(self.model.state_dict()),
            "ema": self.ema.state_dict(),
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "step": int(self.step),
            "rng": to_cpu(self.rng_state()),
            "train_config": self.config.to_dict(),
            "elapsed_s": float(self.elapsed_s),
            "tokens_seen": int(self.tokens_seen),
            "world_size": self.ranks.world_size,
            "version": CHECKPOINT_VERSION,
        }

    def _load_state(self, state: dict) -> None:
        t = self.config.training
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the config may change these on resume
            group.update(betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)
        self.ema.load_state_dict(state["ema"])
        self.ema.decay = t.ema
        self.step = int(state["step"])
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        if "rng" in state:
            self.set_rng_state(state["rng"])
        if self.ranks.main:
            self.last_eval = trim_metrics(self.run_dir, self.step)
        self.log(f"resumed {self.run_dir} at step {self.step:,} (saved by {state.get('world_size', 1)} rank(s))")

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights as a plain state dict; parameters in training.export_dtype, buffers
        (the rotary inv_freq) left in float32."""
        dtype = EXPORT_DTYPES[self.config.training.export_dtype]
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        names = [name for name, _ in self.model.named_parameters()]
        for name, shadow in zip(names, self.ema.shadow_params):
            state[name] = shadow.detach().to(device="cpu", dtype=dtype).clone()
        return state

    def save(self, replicas: list[str] | None = None) -> None:
        """A checkpoint of this step (rank 0): the resumable state, then the loadable model folder.
        `replicas`: every rank's digest of its weights and EMA, kept in the resumable state."""
        state = self.training_state()
        if replicas is not None:
            state["replica_digests"] = replicas
        write_checkpoint(self.run_dir, state, self.export_state_dict(), self.config, self.tokenizer)
        self.last_saved_step = self.step

    def write_train_config(self) -> None:
        write_train_config(self.run_dir, self.config)

    # ---- one step, evaluation, samples --------------------------------------------------------

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def learning_rate(self, step: int) -> float:
        """Linear warm-up: lr * (step + 1) / warmup for the first `warmup` steps (step counts from 0)."""
        t = self.config.training
        return t.lr * min((step + 1) / t.warmup, 1.0) if t.warmup > 0 else t.lr

    def global_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's whole batch, the same on every rank: clean crops x0 (B, L), diffusion times (B,) and the
        noised x_t (B, L), drawn in the order `score_entropy_loss` draws them, on the device."""
        t = self.config.training
        x0 = self.train_data.crops(t.batch_size, self.data_generator).to(self.device, non_blocking=True)
        times = draw_times(t.batch_size, self.device, self.noise_generator)
        sigma, _ = self.noise(times)
        perturbed = self.graph.sample_transition(x0, sigma[:, None], generator=self.noise_generator)
        return x0, times, perturbed

    def train_step(self) -> torch.Tensor:
        """One optimiser step; returns this rank's mean loss per sequence (a 0-dim tensor on the device)."""
        t = self.config.training
        self.net.train()
        self._phase = "step"
        lr = self.learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x0, times, perturbed = self.global_batch()
        mine = self.ranks.rows(t.batch_size)
        total = torch.zeros((), device=self.device)
        for m in range(t.accum):
            rows = slice(mine.start + m * self.micro_batch, mine.start + (m + 1) * self.micro_batch)
            last = m == t.accum - 1
            with self.net.no_sync() if self.ranks.distributed and not last else nullcontext():  # one all-reduce
                with self.autocast():
                    loss = score_entropy_loss(self.net, self.graph, self.noise, x0[rows], t=times[rows],
                                              perturbed=perturbed[rows]).mean()
                (loss / t.accum).backward()
            total += loss.detach()
        # the gradients are the global batch's mean (DDP averages over ranks): so is their norm, on every rank
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or math.inf)
        self._phase = "update"
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model.parameters())
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self._phase = "idle"
        self._grad_norm = grad_norm.detach()
        return total / t.accum

    @property
    def tokens_per_step(self) -> int:
        """Tokens of the global batch, over all ranks."""
        return self.config.training.batch_size * self.length

    def evaluate(self) -> dict[str, float]:
        """The held-out ELBO bound of the EMA weights by `sedd eval`'s estimator, on the same crops with
        the same noise every time: valid_loss in nats per token, valid_bpc in bits per character (per
        token for GPT-2 models)."""
        t = self.config.training
        with self.ema.average_parameters(self.model), self.autocast():
            draws = elbo_draws(self.model, self.graph, self.noise, torch.cat(self.eval_batches), samples=1,
                               seed=t.seed + 3, batch_size=t.eval_batch_size or t.batch_size)
        valid_loss = draws.mean().item() / self.length
        return {"valid_loss": valid_loss, "valid_bpc": valid_loss / LN2}

    def loaded_model(self) -> LoadedModel:
        """The model in training as a LoadedModel, for the sampler."""
        return LoadedModel(model=self.model, graph=self.graph, noise=self.noise, tokenizer=self.tokenizer,
                           config=self.sedd_config, device=self.device, dtype=torch.float32, path=self.run_dir,
                           source=str(self.run_dir), layout="run")

    def _infill_prompt(self) -> tuple[str, str]:
        """The first and last quarter of the first held-out crop: a prompt the model never trained on."""
        row = self.eval_batches[0][0].tolist()
        quarter = max(1, self.length // 4)

        def clean(ids: list[int]) -> str:
            text = self.tokenizer.decode(ids)
            bad = set(self.tokenizer.unknown_characters(text)) | {"\ufffd"}
            return "".join(ch for ch in text if ch not in bad)

        return clean(row[:quarter]), clean(row[-quarter:])

    @torch.no_grad()
    def snapshot(self) -> Path:
        """A few unconditional samples and one infill from the EMA weights, into samples/step_XXXXXXX.txt
        and the trackers (rank 0)."""
        t = self.config.training
        lm = self.loaded_model()
        seed = t.seed + self.step
        lines = [f"# step {self.step}: EMA weights, {t.snapshot_steps} analytic steps, seed {seed}", ""]
        self.model.eval()
        with self.ema.average_parameters(self.model):
            if t.snapshot_samples:
                texts = generate(lm, num_samples=t.snapshot_samples, steps=t.snapshot_steps, seed=seed)
                for i, text in enumerate(texts):
                    lines += [f"=== sample {i} ===", text, ""]
            prefix, suffix = self._infill_prompt()
            try:
                infill = generate(lm, num_samples=1, steps=t.snapshot_steps, seed=seed, prefix=prefix,
                                  suffix=suffix)[0]
                lines += [f"=== infill: prefix {prefix!r}, suffix {suffix!r} ===", infill, ""]
            except GenerationError as exc:
                lines += [f"=== infill skipped: {exc} ===", ""]
        path = self.run_dir / "samples" / f"step_{self.step:07d}.txt"
        text = "\n".join(lines)
        atomic_write_text(path, text)
        self.trackers.text(self.step, "samples", text)
        self._snapshot_step = self.step
        return path

    # ---- pushing -----------------------------------------------------------------------------------

    def push(self, wait: bool = False) -> None:
        if self.pusher is None:
            return
        from .oxen_push import run_files

        files, once = run_files(self.run_dir, self.config.push.training_state)
        if self.pusher.push(self.run_dir, files, f"sedd train: step {self.step}", once=once, wait=wait):
            self._pushed_step = self.step

    # ---- the loop ------------------------------------------------------------------------------------

    def request_stop(self, signum: int) -> None:
        """Stop after the current step, with a checkpoint (what SIGINT and SIGTERM ask for: the command line's
        handlers call this). Safe to call from a signal handler."""
        self.stop_requested = signum
        self.log(f"received {signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                 "(Ctrl-C again to stop at once)")

    def _stop_agreed(self) -> int | None:
        """The signal that stops the run, when one rank (any) has been asked to stop; every rank asks in step."""
        signum = self.ranks.max_int(self.stop_requested or 0)
        if signum and self.stop_requested is None:
            self.stop_requested = signum  # another rank's signal
        return signum or None

    def run(self) -> dict[str, Any]:
        t = self.config.training
        self._begin()
        self._bar = ProgressBar(t.n_iters, self.step, self.length, self.device, self.progress)
        status = "finished"
        try:
            while self.step < t.n_iters and self._stop_agreed() is None:
                self._rng_before = self.rng_state()
                loss = self.train_step()
                self._window.add(loss, self.tokens_per_step, self._grad_norm)
                self._bar.update(loss, self.tokens_per_step)
                self._work_due()
            status = self._finish()
        except KeyboardInterrupt:
            status = "SIGINT"
            self._save_after_interrupt()
        finally:
            self._bar.close()
            self.trackers.close()
            if self.pusher is not None:
                self.pusher.close()
        return self._result(status)

    def _begin(self) -> None:
        """The run folder, its train_config.yaml, the trackers, the opening log line and the session's clocks."""
        t = self.config.training
        if self.ranks.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.write_train_config()
            self.trackers = open_trackers(self.config.track, self.run_dir, self.config.to_dict(),
                                          self.config.model.name, self.step, self.log)
        n_params = sum(p.numel() for p in self.model.parameters())
        tracked = ", ".join(self.trackers.names) or "none"
        self.log(f"model: {n_params:,} parameters, {self.config.tokenizer} tokens ({self.sedd_config.tokens}), "
                 f"{self.config.graph.type} graph, {self.config.noise.type} noise; batch {t.batch_size} of "
                 f"{self.length} tokens; tracking: metrics.jsonl, {tracked}; run folder {self.run_dir}")
        self.last_saved_step = self.step if (self.run_dir / META_CHECKPOINT).is_file() else -1
        self._start_step = self.step
        self._rng_before = None
        self._window = Meter(self.device)  # the steps since the last evaluation
        self._session_start = time.perf_counter()
        self._elapsed_at_start = self.elapsed_s

    def _update_elapsed(self) -> None:
        self.elapsed_s = self._elapsed_at_start + time.perf_counter() - self._session_start

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _work_due(self) -> None:
        """Evaluation, snapshot and checkpoint where this step is a multiple of their interval;
        their time does not count as training time."""
        t = self.config.training
        start = time.perf_counter()
        self._phase = "other"
        if self._due(t.eval_every):
            self.evaluate_and_log()
        if self._due(t.snapshot_every) and self.ranks.main:
            self.snapshot()
        if self._due(t.checkpoint_every):
            self.checkpoint()
        self._window.exclude_since(start)
        self._bar.exclude_since(start)
        self._phase = "idle"

    def _window_means(self) -> tuple[float | None, float | None]:
        """(training loss per token, gradient norm) of the steps since the last evaluation, averaged over the
        ranks (every rank must call this)."""
        if not self._window.steps:
            return None, None
        sums = self.ranks.mean(torch.stack([self._window.loss, self._window.grad_norm]))
        loss, grad_norm = sums.tolist()
        return loss / self._window.steps / self.length, grad_norm / self._window.steps

    def evaluate_and_log(self) -> None:
        """Evaluate, append a line to metrics.jsonl and the trackers (rank 0), log it, and open a new window
        of steps."""
        train_loss, grad_norm = self._window_means()
        if train_loss is not None and not math.isfinite(train_loss):
            raise TrainingError(
                f"the training loss is {train_loss} at step {self.step}; the last checkpoint "
                f"(step {self.last_saved_step}) is untouched. Lower training.lr or raise training.warmup "
                "and resume")
        tokens_per_s = self._window.tokens_per_s()
        self._last_eval_step = self.step
        if self.ranks.main:
            metrics = self.evaluate()
            self._update_elapsed()
            record = {"step": self.step, "train_loss": train_loss, **metrics, "tokens_per_s": tokens_per_s,
                      "elapsed_s": self.elapsed_s, "lr": self.learning_rate(max(self.step - 1, 0)),
                      "grad_norm": grad_norm, "world_size": self.ranks.world_size}
            append_metrics(self.run_dir, record)
            self.trackers.scalars(self.step, {k: v for k, v in record.items() if k not in ("step", "world_size")})
            self.last_eval = record
            shown = "-" if train_loss is None else f"{train_loss:.4f}"
            self.log(f"step {self.step:>7,} | train {shown} | valid {metrics['valid_loss']:.4f} nats/tok, "
                     f"{metrics['valid_bpc']:.4f} bits/{'char' if self.config.tokenizer == 'char' else 'token'} | "
                     f"{tokens_per_s:,.0f} tok/s | {format_duration(self.elapsed_s)}")
        self._window.reset()

    def _replica_digests(self) -> list[str] | None:
        """Every rank's digest of its weights and EMA, checked equal (every rank must call this); None on one
        rank."""
        if not self.ranks.distributed:
            return None
        mine = replica_digest([*self.model.parameters(), *self.ema.shadow_params])
        digests = self.ranks.gather(mine)
        if len(set(digests)) > 1:
            differ = [r for r, d in enumerate(digests) if d != digests[0]]
            raise TrainingError(
                f"at step {self.step} the weights or EMA of rank(s) {differ} differ from rank 0's; the last "
                f"checkpoint (step {self.last_saved_step}) is untouched. Resume from it")
        return digests

    def checkpoint(self, wait: bool = False) -> None:
        """Save (never over a good checkpoint with a diverged model) and push; rank 0 writes, every rank calls."""
        if self._window.steps:
            loss = float(self.ranks.mean(self._window.loss))
            if not math.isfinite(loss):
                raise TrainingError(
                    f"the training loss is not finite at step {self.step}; not saving over the checkpoint of step "
                    f"{self.last_saved_step}. Lower training.lr or raise training.warmup and resume")
        replicas = self._replica_digests()
        self._update_elapsed()
        if self.ranks.main:
            self.save(replicas)
            if replicas is not None:
                self.log(f"checkpoint at step {self.step:,}: weights and EMA identical on {len(replicas)} ranks")
        self.ranks.barrier()  # no rank goes on, or exits, before the checkpoint is on disk
        self.last_saved_step = self.step
        if self.ranks.main:
            self.push(wait=wait)

    def _finish(self) -> str:
        """After the loop: the last evaluation, snapshot and checkpoint not yet done; returns the status."""
        t = self.config.training
        status = "finished"
        if self.stop_requested is not None:
            status = signal.Signals(self.stop_requested).name
            if self.last_saved_step != self.step:
                self.checkpoint(wait=True)
            self.log(f"stopped at step {self.step:,} ({status}); continue with: "
                     f"sedd train --out {self.run_dir} --resume")
        elif self.step == self._start_step:
            self.log(f"the run is already at training.n_iters={t.n_iters}; raise it to train on "
                     f"(--set training.n_iters=...)")
        else:
            if self._last_eval_step != self.step:
                self.evaluate_and_log()
            if self._snapshot_step != self.step and t.snapshot_every > 0 and self.ranks.main:
                self.snapshot()
            if self.last_saved_step != self.step:
                self.checkpoint(wait=True)
        if self.pusher is not None and self._pushed_step != self.step:
            self.push(wait=True)  # the last scheduled push was skipped while another one ran
        return status

    def _save_after_interrupt(self) -> None:
        """Ctrl-C twice (or once outside the main thread): keep what is consistent, and say how to go on.
        Rank 0 saves its own state (no collective: other ranks may be anywhere)."""
        if self._phase == "update":
            self.log(f"interrupted while updating the weights; the checkpoint of step {self.last_saved_step} "
                     "stands")
            return
        if self._phase == "step" and self._rng_before is not None:
            self.set_rng_state(self._rng_before)  # the unfinished step is redone on resume, same data
            self.optimizer.zero_grad(set_to_none=True)
        if self.last_saved_step != self.step and self.ranks.main:
            self._update_elapsed()
            self.save()
        self.log(f"interrupted at step {self.step:,}; continue with: sedd train --out {self.run_dir} --resume")

    def _result(self, status: str) -> dict[str, Any]:
        self._update_elapsed()
        last = self.last_eval
        result = {"step": self.step, "eval_step": last.get("step"), "train_loss": last.get("train_loss"),
                  "valid_loss": last.get("valid_loss"), "valid_bpc": last.get("valid_bpc"),
                  "tokens_per_s": last.get("tokens_per_s"), "elapsed_s": self.elapsed_s,
                  "world_size": self.ranks.world_size, "status": status, "run_dir": str(self.run_dir)}
        if self.pusher is not None:
            result["pushes"] = len(self.pusher.commits)
            result["push_failures"] = len(self.pusher.failures)
        return result


def train(config: TrainConfig | str | os.PathLike | dict, run_dir: str | os.PathLike, resume: bool = False,
          repo: str | None = None, device: str | torch.device | None = None, *, progress: bool = True,
          log: Callable[[str], None] | None = None, gpt2_vocab: str | os.PathLike | None = None,
          ranks: Ranks | None = None, init: LoadedModel | None = None) -> dict[str, Any]:
    """Train (or with `resume`, continue) a SEDD model into `run_dir`; returns the final metrics:
    step, train_loss and valid_loss (nats per token), valid_bpc, tokens_per_s, elapsed_s, world_size and
    status ("finished", or the signal that stopped the run). `gpt2_vocab`: a gpt2.tiktoken file for
    GPT-2-token runs (copied into the run folder), instead of tiktoken's download. Installs no signal
    handler: call `Trainer.request_stop` from one (the command line does) to stop with a checkpoint."""
    if not isinstance(config, TrainConfig):
        config = load_train_config(config)
    return Trainer(config, run_dir, resume=resume, repo=repo, device=device, progress=progress, log=log,
                   gpt2_vocab=gpt2_vocab, ranks=ranks, init=init).run()
