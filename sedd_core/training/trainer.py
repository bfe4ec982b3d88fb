"""Train a SEDD model on a text corpus: `train(config, run_dir)` and the `Trainer` behind it.

Objective (SPEC section 4, `sedd_core.losses.score_entropy_loss`): t ~ U(1e-3, 1) per
sequence, x_t from the forward process at sigma(t), loss = sum over positions of
dsigma/dt(t) * score entropy, averaged over the batch. AdamW with linear warm-up,
gradient clipping and an EMA of the weights; bfloat16 autocast on CUDA (the weights
stay float32), float32 on a CPU. Training crops are random windows of `length`
tokens of the encoded corpus; held-out evaluation uses fixed crops and fixed noise.

The run folder (`RUN_DIR`) is at once a model `sedd_core.load` reads and a resumable run:

    checkpoint.pth            EMA weights, a plain state dict (training.export_dtype)
    config.yaml               SEDDConfig.to_dict() + `tokenizer`
    tokenizer_config.json     the character vocabulary (char models)
    checkpoints-meta/checkpoint.pth   model, ema, optimizer, step, rng, train_config
    train_config.yaml         the resolved training config
    metrics.jsonl             one line per evaluation
    samples/step_XXXXXXX.txt  sample snapshots from the EMA weights
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import SEDDConfig
from ..data import load_hf_dataset_text, read_text_corpus
from ..generation import GenerationError, generate
from ..graph import graph_from_config
from ..loading import LoadedModel, resolve_device
from ..losses import score_entropy_loss
from ..model import SEDD
from ..noise import noise_from_config
from ..tokenizers import CharTokenizer, Tokenizer, gpt2_vocab_file, load_gpt2
from .config import TrainConfig, dump_yaml, load_train_config
from .ema import ExponentialMovingAverage

LN2 = math.log(2.0)
META_CHECKPOINT = Path("checkpoints-meta") / "checkpoint.pth"
CHECKPOINT_VERSION = 1
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Model fields that change the weights' shapes or meaning: fixed for the life of a run.
FROZEN_ON_RESUME = ("tokens", "graph", "noise", "model.hidden_size", "model.cond_dim", "model.n_blocks",
                    "model.n_heads", "model.scale_by_sigma")


class TrainingError(ValueError):
    """Training cannot start or go on; the message says why and what to do."""


# ---- small utilities ---------------------------------------------------------------------------


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_torch_save(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _get(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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


# ---- data ---------------------------------------------------------------------------------------


def make_tokenizer(config: TrainConfig, run_dir: Path | None = None) -> Tokenizer:
    """The tokenizer; for GPT-2 the ranks come from RUN_DIR/gpt2.tiktoken (copied there by the first
    checkpoint), $SEDD_GPT2_VOCAB or tiktoken's download, in that order."""
    if config.tokenizer == "char":
        return CharTokenizer(model_max_length=config.model.length)
    return load_gpt2(run_dir)


def resolve_text_files(paths: list[str]) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files found beside them). A folder with a train.txt gives that
    file, and its valid.txt as held-out text (the layout of `sedd data shakespeare`); any other
    folder gives every *.txt directly inside it."""
    train, valid = [], []
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            if (path / "train.txt").is_file():
                train.append(path / "train.txt")
                if (path / "valid.txt").is_file():
                    valid.append(path / "valid.txt")
            else:
                found = sorted(path.glob("*.txt"))
                if not found:
                    raise TrainingError(f"the folder {path} holds no .txt files")
                train.extend(found)
        elif path.is_file():
            train.append(path)
        else:
            raise TrainingError(f"no such training file or folder: {path}")
    return train, valid


def _read_files(files: list[Path]) -> str:
    try:
        return read_text_corpus(files)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"could not read {', '.join(map(str, files))}: {exc}") from exc


_CHUNK_BREAK = re.compile(r"\n(?=\S)")


def _chunks(text: str, size: int = 1 << 20) -> list[str]:
    """Pieces of about `size` characters, cut only after a newline that a non-space follows:
    GPT-2's pre-tokeniser never joins across such a point, so encoding the pieces separately
    gives the same ids as encoding the whole."""
    out, start = [], 0
    while start < len(text):
        match = _CHUNK_BREAK.search(text, start + size) if start + size < len(text) else None
        end = match.end() if match else len(text)
        out.append(text[start:end])
        start = end
    return out


def encode_text(tokenizer: Tokenizer, text: str) -> tuple[torch.Tensor, int]:
    """(ids as an int32 tensor, how many characters became [UNK])."""
    if isinstance(tokenizer, CharTokenizer):
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(max(int(codes.max(initial=0)) + 1, 128), CharTokenizer.UNK, dtype=np.int32)
        for i, ch in enumerate(tokenizer.chars):
            if ord(ch) < len(table):
                table[ord(ch)] = i + 2
        ids = table[codes]
        return torch.from_numpy(ids), int((ids == CharTokenizer.UNK).sum())
    pieces = tokenizer.encoding.encode_batch(_chunks(text), allowed_special={"<|endoftext|>"})
    ids = np.fromiter((i for piece in pieces for i in piece), dtype=np.int32)
    return torch.from_numpy(ids), 0


def load_corpus(config: TrainConfig, tokenizer: Tokenizer, log: Callable[[str], None]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, held-out ids), both int32 on the CPU."""
    d = config.data
    length = config.model.length
    if d.hf_dataset:
        try:
            train_text = load_hf_dataset_text(d.hf_dataset, d.hf_train_split, d.hf_column)
            valid_text = (load_hf_dataset_text(d.hf_dataset, d.hf_valid_split, d.hf_column)
                          if d.hf_valid_split else None)
        except (ImportError, KeyError) as exc:
            raise TrainingError(str(exc)) from exc
        source = f"hf:{d.hf_dataset} [{d.hf_train_split}]"
        valid_source = f"hf:{d.hf_dataset} [{d.hf_valid_split}]" if valid_text is not None else None
    else:
        if not d.train:
            raise TrainingError("no training text: pass --data PATH (or set data.train / data.hf_dataset)")
        train_files, beside = resolve_text_files(d.train)
        valid_files = resolve_text_files(d.valid)[0] if d.valid else beside
        train_text = _read_files(train_files)
        valid_text = _read_files(valid_files) if valid_files else None
        source = ", ".join(map(str, train_files))
        valid_source = ", ".join(map(str, valid_files)) if valid_files else None

    train_ids, unknown = encode_text(tokenizer, train_text)
    if unknown:
        log(f"note: {unknown:,} characters of the training text are outside the vocabulary and became [UNK]")
    if valid_text is not None:
        valid_ids, unknown = encode_text(tokenizer, valid_text)
        if unknown:
            log(f"note: {unknown:,} held-out characters are outside the vocabulary and became [UNK]")
    else:
        n_valid = max(length, int(len(train_ids) * d.valid_fraction))
        if len(train_ids) - n_valid < length:
            raise TrainingError(
                f"the corpus has {len(train_ids):,} tokens: too few to hold out {n_valid:,} for evaluation and "
                f"still train on crops of {length}; give more text, a held-out file (--valid) or a shorter "
                "model.length")
        valid_ids, train_ids = train_ids[-n_valid:].clone(), train_ids[:-n_valid].clone()
        valid_source = f"the last {d.valid_fraction:.0%} of the training text"
    for name, ids in (("training", train_ids), ("held-out", valid_ids)):
        if len(ids) < length:
            raise TrainingError(f"the {name} text has {len(ids):,} tokens, fewer than model.length={length}")
    log(f"data: train {len(train_ids):,} tokens from {source}; held out {len(valid_ids):,} from {valid_source}")
    return train_ids, valid_ids


def random_crops(ids: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, length) long windows of `ids` at uniformly random starts drawn from the CPU `generator`."""
    starts = torch.randint(0, len(ids) - length + 1, (batch,), generator=generator)
    index = starts[:, None] + torch.arange(length)
    return ids[index.to(ids.device)].long()


# ---- the trainer -------------------------------------------------------------------------------


class Trainer:
    """One training run in `run_dir`; `run()` trains to `training.n_iters` and returns the final metrics."""

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
                 repo: str | None = None, device: str | torch.device | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None):
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
        self.tokenizer = make_tokenizer(config, self.run_dir)
        self.graph = graph_from_config(self.sedd_config)
        self.noise = noise_from_config(self.sedd_config)

        meta = self.run_dir / META_CHECKPOINT
        state = None
        if meta.is_file():
            if not resume:
                raise TrainingError(
                    f"{self.run_dir} already holds a training run ({META_CHECKPOINT}); pass --resume to continue "
                    "it, or choose another --out")
            try:
                state = torch.load(meta, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise TrainingError(f"could not read {meta} to resume ({exc.__class__.__name__}: {exc})") from exc
            self._check_resumable(state)
        elif resume:
            self.log(f"note: {meta} does not exist yet; starting a new run in {self.run_dir}")

        torch.manual_seed(t.seed)
        model = SEDD(self.sedd_config)
        authors_init(model)
        self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay,
            fused=self.device.type == "cuda" or None)
        self.ema = ExponentialMovingAverage(self.model.parameters(), t.ema)
        self.data_generator = torch.Generator().manual_seed(t.seed)
        self.noise_generator = torch.Generator(device=self.device).manual_seed(t.seed + 1)
        self.step = 0
        self.elapsed_s = 0.0
        self.tokens_seen = 0
        self.last_eval: dict[str, Any] = {}

        self.train_ids, self.valid_ids = load_corpus(config, self.tokenizer, self.log)
        if self.device.type == "cuda":
            self.train_ids = self.train_ids.to(self.device)
        eval_generator = torch.Generator().manual_seed(t.seed + 2)
        eval_bs = t.eval_batch_size or t.batch_size
        self.eval_batches = [random_crops(self.valid_ids, eval_bs, self.length, eval_generator)
                             for _ in range(t.eval_batches)]

        if state is not None:
            self._load_state(state)
        self.pusher = None
        if repo:
            from .oxen_push import OxenPusher

            p = config.push
            self.pusher = OxenPusher(repo, host=p.host, scheme=p.scheme, branch=p.branch,
                                     background=p.background, log=self.log)
        self._stop_signal: int | None = None
        self._phase = "idle"
        self._pushed_step = -1
        self.last_saved_step = -1

    # ---- state -----------------------------------------------------------------------------------

    def _check_resumable(self, state: dict) -> None:
        if not isinstance(state, dict) or not {"model", "ema", "optimizer", "step"} <= set(state):
            raise TrainingError(f"{self.run_dir / META_CHECKPOINT} is not a sedd training checkpoint")
        saved_cfg = state.get("train_config")
        if not isinstance(saved_cfg, dict):
            return
        saved = TrainConfig.from_dict(saved_cfg).sedd_config().to_dict()
        now = self.sedd_config.to_dict()
        changed = [f"{key}: {_get(saved, key)} -> {_get(now, key)}" for key in FROZEN_ON_RESUME
                   if _get(saved, key) != _get(now, key)]
        if TrainConfig.from_dict(saved_cfg).tokenizer != self.config.tokenizer:
            changed.append(f"tokenizer: {saved_cfg.get('tokenizer')} -> {self.config.tokenizer}")
        if changed:
            raise TrainingError(
                "the config does not match the run being resumed (" + "; ".join(changed) + "). Resume with "
                "the run's own train_config.yaml (leave out --config), or start a new run in another --out")

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
            "model": _to_cpu(self.model.state_dict()),
            "ema": self.ema.state_dict(),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "step": int(self.step),
            "rng": _to_cpu(self.rng_state()),
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
        self._trim_metrics()
        self.log(f"resumed {self.run_dir} at step {self.step:,}")

    def _trim_metrics(self) -> None:
        """Drop metric lines past the resumed step (written after the last checkpoint of a killed run)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= self.step:
                keep.append(line)
                self.last_eval = record
        atomic_write_text(path, "".join(line + "\n" for line in keep))

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
        """The resumable state first, then the loadable model folder; every file atomically."""
        run = self.run_dir
        atomic_torch_save(run / META_CHECKPOINT, self.training_state())
        atomic_torch_save(run / "checkpoint.pth", self.export_state_dict())
        model_config = self.sedd_config.to_dict()
        model_config["tokenizer"] = self.config.tokenizer
        atomic_write_text(run / "config.yaml", dump_yaml(model_config))
        if isinstance(self.tokenizer, CharTokenizer):
            atomic_write_text(run / "tokenizer_config.json", json.dumps(self.tokenizer.config_dict(), indent=2) + "\n")
        else:
            vocab = gpt2_vocab_file(None)
            if vocab is not None and not (run / "gpt2.tiktoken").is_file():
                atomic_write(run / "gpt2.tiktoken", lambda tmp: shutil.copyfile(vocab, tmp))
        self.write_train_config()
        self.last_saved_step = self.step

    def write_train_config(self) -> None:
        atomic_write_text(self.run_dir / "train_config.yaml", dump_yaml(self.config.to_dict()))

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
        self.tokens_seen += t.batch_size * t.accum * self.length
        self._phase = "idle"
        return total / t.accum

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss of the EMA weights on the same crops with the same noise every time.

        The diffusion-weighted score entropy per sequence is (an estimate of) an upper bound on
        -log p(x0) in nats (the ELBO of the paper), so loss / (length * ln 2) bounds the bits per
        character (per token for GPT-2 models)."""
        generator = torch.Generator(device=self.device).manual_seed(self.config.training.seed + 3)
        self.model.eval()
        total, count = 0.0, 0
        with self.ema.average_parameters(self.model):
            for batch in self.eval_batches:
                x0 = batch.to(self.device)
                with self.autocast():
                    loss = score_entropy_loss(self.model, self.graph, self.noise, x0, generator=generator)
                total += float(loss.float().sum())
                count += x0.shape[0]
        valid_loss = total / count / self.length
        return {"valid_loss": valid_loss, "valid_bpc": valid_loss / LN2}

    def loaded_model(self) -> LoadedModel:
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

    def _install_signal_handlers(self) -> dict[int, Any]:
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

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def run(self) -> dict[str, Any]:
        t = self.config.training
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.write_train_config()
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"model: {n_params:,} parameters, {self.config.tokenizer} tokens ({self.sedd_config.tokens}), "
                 f"{self.config.graph.type} graph, {self.config.noise.type} noise; device {self.device}; "
                 f"batch {t.batch_size}x{t.accum} of {self.length} tokens; run folder {self.run_dir}")
        self.last_saved_step = self.step if (self.run_dir / META_CHECKPOINT).is_file() else -1
        start_step = self.step
        last_eval_step = snapshot_step = -1
        window_loss = torch.zeros((), device=self.device)
        window_steps, window_start, window_other = 0, time.perf_counter(), 0.0
        window_tokens = 0
        bar_loss, bar_steps, bar_time = torch.zeros((), device=self.device), 0, time.perf_counter()
        tty = sys.stderr.isatty()
        bar = tqdm(total=t.n_iters, initial=self.step, desc="train", unit="step", file=sys.stderr,
                   disable=not self.progress, dynamic_ncols=True, mininterval=0.5 if tty else 30)
        previous = self._install_signal_handlers()
        session_start = time.perf_counter()
        elapsed_at_start = self.elapsed_s
        rng_before = None
        status = "finished"

        def eval_and_log() -> None:
            nonlocal window_loss, window_steps, window_start, window_other, window_tokens, last_eval_step
            now = time.perf_counter()
            train_loss = float(window_loss) / window_steps / self.length if window_steps else None
            if train_loss is not None and not math.isfinite(train_loss):
                raise TrainingError(
                    f"the training loss is {train_loss} at step {self.step}; the last checkpoint "
                    f"(step {self.last_saved_step}) is untouched. Lower training.lr or raise training.warmup "
                    "and resume")
            train_time = now - window_start - window_other
            tokens_per_s = window_tokens / train_time if window_tokens and train_time > 0 else 0.0
            metrics = self.evaluate()
            self.elapsed_s = elapsed_at_start + time.perf_counter() - session_start
            record = {"step": self.step, "train_loss": train_loss, **metrics, "tokens_per_s": tokens_per_s,
                      "elapsed_s": self.elapsed_s, "lr": self.learning_rate(max(self.step - 1, 0))}
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            self.last_eval = record
            last_eval_step = self.step
            shown = "-" if train_loss is None else f"{train_loss:.4f}"
            self.log(f"step {self.step:>7,} | train {shown} | valid {metrics['valid_loss']:.4f} nats/tok, "
                     f"{metrics['valid_bpc']:.4f} bits/{'char' if self.config.tokenizer == 'char' else 'token'} | "
                     f"{tokens_per_s:,.0f} tok/s | {format_duration(self.elapsed_s)}")
            window_loss = torch.zeros((), device=self.device)
            window_steps, window_tokens, window_other = 0, 0, 0.0
            window_start = time.perf_counter()

        def checkpoint(wait: bool = False) -> None:
            if window_steps and not math.isfinite(float(window_loss)):
                raise TrainingError(
                    f"the training loss is not finite at step {self.step}; not saving over the checkpoint of step "
                    f"{self.last_saved_step}. Lower training.lr or raise training.warmup and resume")
            self.elapsed_s = elapsed_at_start + time.perf_counter() - session_start
            self.save()
            self.push(wait=wait)

        try:
            while self.step < t.n_iters and self._stop_signal is None:
                rng_before = self.rng_state()
                loss = self.train_step()
                window_loss += loss
                bar_loss += loss
                window_steps += 1
                bar_steps += 1
                window_tokens += t.batch_size * t.accum * self.length
                bar.update(1)
                now = time.perf_counter()
                if self.progress and now - bar_time >= (1.0 if tty else 30.0):
                    bar.set_postfix(loss=f"{float(bar_loss) / bar_steps / self.length:.4f}",
                                    tok_s=f"{bar_steps * t.batch_size * t.accum * self.length / (now - bar_time):,.0f}",
                                    refresh=False)
                    bar_loss, bar_steps, bar_time = torch.zeros((), device=self.device), 0, time.perf_counter()
                other_start = window_other_start = time.perf_counter()
                self._phase = "other"
                if self._due(t.eval_every):
                    eval_and_log()  # opens a new window
                    window_other_start = time.perf_counter()
                if self._due(t.snapshot_every):
                    self.snapshot()
                    snapshot_step = self.step
                if self._due(t.checkpoint_every):
                    checkpoint()
                now = time.perf_counter()
                window_other += now - window_other_start  # evaluation, samples and saving are not training
                bar_time += now - other_start
                self._phase = "idle"
            if self._stop_signal is not None:
                status = signal.Signals(self._stop_signal).name
                if self.last_saved_step != self.step:
                    checkpoint(wait=True)
                self.log(f"stopped at step {self.step:,} ({status}); continue with: "
                         f"sedd train --out {self.run_dir} --resume")
            elif self.step == start_step:
                self.log(f"the run is already at training.n_iters={t.n_iters}; raise it to train on "
                         f"(--set training.n_iters=...)")
            else:
                if last_eval_step != self.step:
                    eval_and_log()
                if snapshot_step != self.step and t.snapshot_every > 0:
                    self.snapshot()
                if self.last_saved_step != self.step:
                    checkpoint(wait=True)
            if self.pusher is not None and self._pushed_step != self.step:
                self.push(wait=True)  # the last scheduled push was skipped while another one ran
        except KeyboardInterrupt:
            status = "SIGINT"
            if self._phase == "update":
                self.log(f"interrupted while updating the weights; the checkpoint of step {self.last_saved_step} "
                         "stands")
            else:
                if self._phase == "step" and rng_before is not None:
                    self.set_rng_state(rng_before)  # the unfinished step is redone on resume, same data
                    self.optimizer.zero_grad(set_to_none=True)
                if self.last_saved_step != self.step:
                    self.elapsed_s = elapsed_at_start + time.perf_counter() - session_start
                    self.save()
                self.log(f"interrupted at step {self.step:,}; continue with: sedd train --out {self.run_dir} --resume")
        finally:
            bar.close()
            for sig, old in previous.items():
                signal.signal(sig, old)
            if self.pusher is not None:
                self.pusher.close()
        self.elapsed_s = elapsed_at_start + time.perf_counter() - session_start
        result = {"step": self.step, "eval_step": self.last_eval.get("step"),
                  "train_loss": self.last_eval.get("train_loss"),
                  "valid_loss": self.last_eval.get("valid_loss"), "valid_bpc": self.last_eval.get("valid_bpc"),
                  "tokens_per_s": self.last_eval.get("tokens_per_s"), "elapsed_s": self.elapsed_s,
                  "status": status, "run_dir": str(self.run_dir)}
        if self.pusher is not None:
            result["pushes"] = len(self.pusher.commits)
            result["push_failures"] = len(self.pusher.failures)
        return result


def train(config: TrainConfig | str | os.PathLike | dict, run_dir: str | os.PathLike, resume: bool = False,
          repo: str | None = None, device: str | torch.device | None = None, *, progress: bool = True,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or with `resume`, continue) a SEDD model into `run_dir`; returns the final metrics:
    step, train_loss and valid_loss (nats per token), valid_bpc, tokens_per_s, elapsed_s and
    status ("finished", or the signal that stopped the run)."""
    if not isinstance(config, TrainConfig):
        config = load_train_config(config)
    return Trainer(config, run_dir, resume=resume, repo=repo, device=device, progress=progress, log=log).run()
