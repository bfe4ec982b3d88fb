"""Train a SEDD model on a text corpus: `train(config, run_dir)` and the `Trainer` behind it.

Objective (SPEC section 4, `sedd_core.losses.score_entropy_loss`): t ~ U(1e-3, 1) per
sequence, x_t from the forward process at sigma(t), loss = sum over positions of
dsigma/dt(t) * score entropy, averaged over the batch. AdamW with linear warm-up,
gradient clipping and an EMA of the weights; bfloat16 autocast on CUDA (the weights
stay float32), float32 on a CPU. Training crops are random windows of `length`
tokens of the encoded corpus (`corpus.py`); held-out evaluation is `sedd eval`'s
estimator (`sedd_core.elbo.elbo_draws`) on fixed crops with fixed noise.

The run folder (`RUN_DIR`, laid out in `checkpoint.py`) is at once a model
`sedd_core.load` reads and a resumable run; sample snapshots from the EMA weights go to
`samples/step_XXXXXXX.txt`.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
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
from ..losses import score_entropy_loss
from ..model import SEDD
from ..noise import noise_from_config
from ..tokenizers import CharTokenizer, Tokenizer, load_gpt2
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
from .corpus import load_corpus, random_crops
from .ema import ExponentialMovingAverage
from .errors import TrainingError
from .progress import Meter, ProgressBar, format_duration

__all__ = ["Trainer", "TrainingError", "authors_init", "make_tokenizer", "train"]

LN2 = math.log(2.0)


def authors_init(model: SEDD) -> None:
    """The authors' initialisation on top of PyTorch's defaults (adaLN-Zero, as in DiT): the
    adaLN modulations of every block and of the output layer, and the output projection, start at
    zero, so each block starts as the identity and the first log score is the sigma scaling alone."""
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation.weight.zero_()
            block.adaLN_modulation.bias.zero_()
        out = model.output_layer
        out.adaLN_modulation.weight.zero_()
        out.adaLN_modulation.bias.zero_()
        out.linear.weight.zero_()
        out.linear.bias.zero_()


def make_tokenizer(config: TrainConfig, run_dir: Path | None = None,
                   gpt2_vocab: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer; for GPT-2 the ranks come from RUN_DIR/gpt2.tiktoken (copied there by the first
    checkpoint), the `gpt2_vocab` file (SEDD_GPT2_VOCAB) or tiktoken's download, in that order."""
    if config.tokenizer == "char":
        return CharTokenizer(model_max_length=config.model.length)
    return load_gpt2(run_dir, gpt2_vocab)


class Trainer:
    """One training run in `run_dir`; `run()` trains to `training.n_iters` and returns the final metrics.

    `run()` reads top-down: each step (`train_step`) is followed by the work that falls due
    (`evaluate_and_log`, `snapshot`, `checkpoint`), and a stop (the end, a signal, Ctrl-C)
    ends with `_finish` or `_save_after_interrupt`."""

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
                 repo: str | None = None, device: str | torch.device | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None, gpt2_vocab: str | os.PathLike | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
        t = config.training
        try:
            self.device = resolve_device(device)
        except ValueError as exc:
            raise TrainingError(str(exc)) from exc
        self.length = config.model.length
        self.sedd_config: SEDDConfig = config.sedd_config()
        self.tokenizer = make_tokenizer(config, self.run_dir, gpt2_vocab)
        self.graph = graph_from_config(self.sedd_config)
        self.noise = noise_from_config(self.sedd_config)
        state = self._saved_state(resume)

        self._build_model()
        self.data_generator = torch.Generator().manual_seed(t.seed)
        self.noise_generator = torch.Generator(device=self.device).manual_seed(t.seed + 1)
        self.step = 0
        self.elapsed_s = 0.0
        self.tokens_seen = 0
        self.last_eval: dict[str, Any] = {}
        self._load_data()
        if state is not None:
            self._load_state(state)
        self.pusher = None
        if repo:
            from .oxen_push import OxenPusher

            p = config.push
            self.pusher = OxenPusher(repo, host=p.host, scheme=p.scheme, branch=p.branch,
                                     background=p.background, log=self.log)
        self._stop_signal: int | None = None
        self._phase = "idle"  # step | update | other | idle: what a Ctrl-C interrupts
        self._pushed_step = -1
        self.last_saved_step = -1
        self._last_eval_step = self._snapshot_step = -1

    def _build_model(self) -> None:
        """The model with the authors' initialisation from training.seed, AdamW and the EMA."""
        t = self.config.training
        torch.manual_seed(t.seed)
        model = SEDD(self.sedd_config)
        authors_init(model)
        self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay,
            fused=self.device.type == "cuda" or None)
        self.ema = ExponentialMovingAverage(self.model.parameters(), t.ema)

    def _load_data(self) -> None:
        """The encoded corpus, and the fixed held-out crops every evaluation reads."""
        t = self.config.training
        self.train_ids, self.valid_ids = load_corpus(self.config.data, self.tokenizer, self.length, self.log)
        if self.device.type == "cuda":
            self.train_ids = self.train_ids.to(self.device)
        eval_generator = torch.Generator().manual_seed(t.seed + 2)
        eval_bs = t.eval_batch_size or t.batch_size
        self.eval_batches = [random_crops(self.valid_ids, eval_bs, self.length, eval_generator)
                             for _ in range(t.eval_batches)]

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
        self.last_eval = trim_metrics(self.run_dir, self.step)
        self.log(f"resumed {self.run_dir} at step {self.step:,}")

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights as a plain state dict; parameters in training.export_dtype, buffers
        (the rotary inv_freq) left in float32."""
        dtype = EXPORT_DTYPES[self.config.training.export_dtype]
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        names = [name for name, _ in self.model.named_parameters()]
        for name, shadow in zip(names, self.ema.shadow_params):
            state[name] = shadow.detach().to(device="cpu", dtype=dtype).clone()
        return state

    def save(self) -> None:
        """A checkpoint of this step: the resumable state, then the loadable model folder."""
        write_checkpoint(self.run_dir, self.training_state(), self.export_state_dict(), self.config,
                         self.tokenizer)
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

    def train_step(self) -> torch.Tensor:
        """One optimiser step; returns the batch's mean loss per sequence (a 0-dim tensor on the device)."""
        t = self.config.training
        self.model.train()
        self._phase = "step"
        lr = self.learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for _ in range(t.accum):
            x0 = random_crops(self.train_ids, t.batch_size, self.length, self.data_generator)
            with self.autocast():
                loss = score_entropy_loss(self.model, self.graph, self.noise, x0,
                                          generator=self.noise_generator).mean()
            (loss / t.accum).backward()
            total += loss.detach()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self._phase = "update"
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model.parameters())
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self._phase = "idle"
        return total / t.accum

    @property
    def tokens_per_step(self) -> int:
        t = self.config.training
        return t.batch_size * t.accum * self.length

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
        """A few unconditional samples and one infill from the EMA weights, into samples/step_XXXXXXX.txt."""
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
        atomic_write_text(path, "\n".join(lines))
        self._snapshot_step = self.step
        return path

    # ---- pushing -----------------------------------------------------------------------------------

    def push(self, wait: bool = False) -> None:
        if self.pusher is None:
            return
        files = ["config.yaml", "checkpoint.pth", "train_config.yaml", "metrics.jsonl"]
        once = set()
        if isinstance(self.tokenizer, CharTokenizer):
            files.append("tokenizer_config.json")
        elif (self.run_dir / "gpt2.tiktoken").is_file():
            files.append("gpt2.tiktoken")
            once.add("gpt2.tiktoken")
        if self.config.push.training_state:
            files.append(str(META_CHECKPOINT))
        samples = sorted(p.relative_to(self.run_dir).as_posix() for p in (self.run_dir / "samples").glob("*.txt"))
        files += samples
        once.update(samples)
        if self.pusher.push(self.run_dir, files, f"sedd train: step {self.step}", once=once, wait=wait):
            self._pushed_step = self.step

    # ---- the loop ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        t = self.config.training
        self._begin()
        self._bar = ProgressBar(t.n_iters, self.step, self.length, self.device, self.progress)
        previous = self._install_signal_handlers()
        status = "finished"
        try:
            while self.step < t.n_iters and self._stop_signal is None:
                self._rng_before = self.rng_state()
                loss = self.train_step()
                self._window.add(loss, self.tokens_per_step)
                self._bar.update(loss, self.tokens_per_step)
                self._work_due()
            status = self._finish()
        except KeyboardInterrupt:
            status = "SIGINT"
            self._save_after_interrupt()
        finally:
            self._bar.close()
            for sig, old in previous.items():
                signal.signal(sig, old)
            if self.pusher is not None:
                self.pusher.close()
        return self._result(status)

    def _begin(self) -> None:
        """The run folder, its train_config.yaml, the opening log line and the session's clocks."""
        t = self.config.training
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.write_train_config()
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"model: {n_params:,} parameters, {self.config.tokenizer} tokens ({self.sedd_config.tokens}), "
                 f"{self.config.graph.type} graph, {self.config.noise.type} noise; device {self.device}; "
                 f"batch {t.batch_size}x{t.accum} of {self.length} tokens; run folder {self.run_dir}")
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
        if self._due(t.snapshot_every):
            self.snapshot()
        if self._due(t.checkpoint_every):
            self.checkpoint()
        self._window.exclude_since(start)
        self._bar.exclude_since(start)
        self._phase = "idle"

    def evaluate_and_log(self) -> None:
        """Evaluate, append a line to metrics.jsonl, log it, and open a new window of steps."""
        train_loss = self._window.mean_loss(self.length)
        if train_loss is not None and not math.isfinite(train_loss):
            raise TrainingError(
                f"the training loss is {train_loss} at step {self.step}; the last checkpoint "
                f"(step {self.last_saved_step}) is untouched. Lower training.lr or raise training.warmup "
                "and resume")
        tokens_per_s = self._window.tokens_per_s()
        metrics = self.evaluate()
        self._update_elapsed()
        record = {"step": self.step, "train_loss": train_loss, **metrics, "tokens_per_s": tokens_per_s,
                  "elapsed_s": self.elapsed_s, "lr": self.learning_rate(max(self.step - 1, 0))}
        append_metrics(self.run_dir, record)
        self.last_eval = record
        self._last_eval_step = self.step
        shown = "-" if train_loss is None else f"{train_loss:.4f}"
        self.log(f"step {self.step:>7,} | train {shown} | valid {metrics['valid_loss']:.4f} nats/tok, "
                 f"{metrics['valid_bpc']:.4f} bits/{'char' if self.config.tokenizer == 'char' else 'token'} | "
                 f"{tokens_per_s:,.0f} tok/s | {format_duration(self.elapsed_s)}")
        self._window.reset()

    def checkpoint(self, wait: bool = False) -> None:
        """Save (never over a good checkpoint with a diverged model) and push."""
        if self._window.steps and not math.isfinite(float(self._window.loss)):
            raise TrainingError(
                f"the training loss is not finite at step {self.step}; not saving over the checkpoint of step "
                f"{self.last_saved_step}. Lower training.lr or raise training.warmup and resume")
        self._update_elapsed()
        self.save()
        self.push(wait=wait)

    def _finish(self) -> str:
        """After the loop: the last evaluation, snapshot and checkpoint not yet done; returns the status."""
        t = self.config.training
        status = "finished"
        if self._stop_signal is not None:
            status = signal.Signals(self._stop_signal).name
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
            if self._snapshot_step != self.step and t.snapshot_every > 0:
                self.snapshot()
            if self.last_saved_step != self.step:
                self.checkpoint(wait=True)
        if self.pusher is not None and self._pushed_step != self.step:
            self.push(wait=True)  # the last scheduled push was skipped while another one ran
        return status

    def _save_after_interrupt(self) -> None:
        """Ctrl-C twice (or once outside the main thread): keep what is consistent, and say how to go on."""
        if self._phase == "update":
            self.log(f"interrupted while updating the weights; the checkpoint of step {self.last_saved_step} "
                     "stands")
            return
        if self._phase == "step" and self._rng_before is not None:
            self.set_rng_state(self._rng_before)  # the unfinished step is redone on resume, same data
            self.optimizer.zero_grad(set_to_none=True)
        if self.last_saved_step != self.step:
            self._update_elapsed()
            self.save()
        self.log(f"interrupted at step {self.step:,}; continue with: sedd train --out {self.run_dir} --resume")

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGINT and SIGTERM stop the run after the current step (a second Ctrl-C at once)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if signum == signal.SIGINT and self._stop_signal is not None:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self._stop_signal = signum
            self.log(f"received {signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                     "(Ctrl-C again to stop at once)")

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
        return previous

    def _result(self, status: str) -> dict[str, Any]:
        self._update_elapsed()
        last = self.last_eval
        result = {"step": self.step, "eval_step": last.get("step"), "train_loss": last.get("train_loss"),
                  "valid_loss": last.get("valid_loss"), "valid_bpc": last.get("valid_bpc"),
                  "tokens_per_s": last.get("tokens_per_s"), "elapsed_s": self.elapsed_s,
                  "status": status, "run_dir": str(self.run_dir)}
        if self.pusher is not None:
            result["pushes"] = len(self.pusher.commits)
            result["push_failures"] = len(self.pusher.failures)
        return result


def train(config: TrainConfig | str | os.PathLike | dict, run_dir: str | os.PathLike, resume: bool = False,
          repo: str | None = None, device: str | torch.device | None = None, *, progress: bool = True,
          log: Callable[[str], None] | None = None, gpt2_vocab: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train (or with `resume`, continue) a SEDD model into `run_dir`; returns the final metrics:
    step, train_loss and valid_loss (nats per token), valid_bpc, tokens_per_s, elapsed_s and
    status ("finished", or the signal that stopped the run). `gpt2_vocab`: a gpt2.tiktoken file for
    GPT-2-token runs (copied into the run folder), instead of tiktoken's download."""
    if not isinstance(config, TrainConfig):
        config = load_train_config(config)
    return Trainer(config, run_dir, resume=resume, repo=repo, device=device, progress=progress, log=log,
                   gpt2_vocab=gpt2_vocab).run()
