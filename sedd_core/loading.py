"""`sedd_core.load(source)`: one entry point for every checkpoint layout and source.

Layouts: Oxen (`checkpoint.pth` + `config.yaml`), Hugging Face (`config.json` +
`model.safetensors` / `pytorch_model.bin`, what the authors' `load_model.py` reads with
`from_pretrained`), and an authors' or our training run (`checkpoints-meta/checkpoint.pth` +
`.hydra/config.yaml`, EMA weights, as their `load_model_local` reads it).
Sources: one of those folders, `default` (the character model shipped in the
package), `oxen:NAMESPACE/REPO` or `hf:REPO_ID`.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from . import hub
from .config import ConfigError, SEDDConfig
from .fast_model import COMPILE_MODES, FastSEDD
from .graph import Graph, graph_from_config
from .model import SEDD, LayerNorm
from .noise import Noise, noise_from_config
from .tokenizers import Tokenizer, resolve_tokenizer

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# CPU instruction sets that multiply bfloat16 natively (oneDNN uses them for bf16 matmuls), best first.
# Without them PyTorch emulates bf16 with float32 instructions plus conversions: slower than float32.
CPU_BF16_INSTRUCTIONS = ("amx_bf16", "avx512_bf16")


class CheckpointError(ValueError):
    """A model folder that cannot be loaded; the message names the problem and the fix."""


@dataclass
class LoadedModel:
    """A network with what sampling needs around it. `model` is the plain network (training, state dicts);
    `runner` is what the sampler calls, the same function: a `FastSEDD` over `model` unless loaded with
    fast=False, then `model` itself."""

    model: SEDD
    graph: Graph
    noise: Noise
    tokenizer: Tokenizer
    config: SEDDConfig
    device: torch.device
    dtype: torch.dtype
    path: Path
    source: str
    layout: str
    runner: SEDD | FastSEDD | None = None  # None: a FastSEDD over `model`
    dtype_choice: str = "asked"  # how `dtype` was picked: "asked", or "auto: <why>" (choose_dtype)

    def __post_init__(self):
        if self.runner is None:
            self.runner = FastSEDD(self.model)

    @property
    def name(self) -> str:
        return self.config.model.name or self.path.name

    @property
    def length(self) -> int:
        return self.config.model.length

    @property
    def mask_id(self) -> int | None:
        return self.config.mask_id

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' was asked for but PyTorch sees no CUDA GPU; use device 'cpu'")
    return device


def cpu_bf16_support() -> str | None:
    """The instruction set with which this CPU multiplies bfloat16 natively ("amx_bf16" on Intel since
    Sapphire Rapids, "avx512_bf16" on AMD Zen 4 and Intel Cooper Lake and later), or None.

    Asked of PyTorch (cpuinfo, `torch.cpu.get_capabilities`; /proc/cpuinfo where this PyTorch lacks it),
    and only where its oneDNN runs bf16 matmuls on this CPU at all."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return None
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        capabilities = get_capabilities()
        found = [name for name in CPU_BF16_INSTRUCTIONS if capabilities.get(name)]
    else:  # pragma: no cover - PyTorch before get_capabilities
        try:
            flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            flags = set()
        found = [name for name in CPU_BF16_INSTRUCTIONS if name in flags]
    return found[0] if found else None


def choose_dtype(dtype: str | torch.dtype | None, device: torch.device) -> tuple[torch.dtype, str]:
    """(dtype, how it was picked). `None` or "auto": bfloat16 on CUDA; on a CPU bfloat16 where it has
    native bf16 instructions (`cpu_bf16_support`), float32 elsewhere (emulated bf16 is slower than float32);
    any other value is taken as asked."""
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16, "auto: bfloat16 on CUDA"
        if device.type == "cpu":
            found = cpu_bf16_support()
            if found:
                return torch.bfloat16, f"auto: this CPU has {found} (native bfloat16 matmuls)"
            return torch.float32, "auto: this CPU has no native bfloat16 instructions"
        return torch.float32, f"auto: float32 on {device.type}"
    if isinstance(dtype, torch.dtype):
        return dtype, "asked"
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[dtype], "asked"


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype of `choose_dtype`."""
    return choose_dtype(dtype, device)[0]


CPP_COMPILERS = ("g++", "c++", "clang++")  # what Inductor's CPU kernels are built with


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU kernels would be built with, or None when there is none."""
    for name in CPP_COMPILERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def resolve_compile(compile: str | None, device: torch.device) -> str | None:
    """FastSEDD's `compile`: "auto" is "freeze" (Inductor, weights frozen in) on a CPU with a C++ compiler,
    where the compiled step pays most (docs/benchmarks.md, CPU round three), and None (eager) elsewhere."""
    if compile != "auto":
        return compile
    return "freeze" if device.type == "cpu" and cpp_compiler() else None


def resolve_source(source: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None,
                   oxen_host: str | None = None) -> tuple[Path, str]:
    """A local folder for `source`, downloading hub sources into `cache_dir` (default ~/.cache/sedd) first."""
    text = str(source) if source is not None else "default"
    if text == "default":
        return DEFAULT_MODEL_DIR, text
    if text.startswith("oxen:"):
        return hub.fetch_oxen(text[len("oxen:"):], host=oxen_host, cache_dir=cache_dir), text
    if text.startswith("hf:"):
        return hub.fetch_hf(text[len("hf:"):], cache_dir=cache_dir), text
    path = Path(text).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"model source {text!r} is neither a folder nor a known source; "
            "use a folder path, 'default', 'oxen:NAMESPACE/REPO' or 'hf:REPO_ID'"
        )
    if not path.is_dir():
        path = path.parent
    return path, text


def detect_layout(path: Path) -> tuple[str, Path, Path]:
    """(layout, config file, weights file) of a model folder."""
    if (path / "checkpoint.pth").is_file() and (path / "config.yaml").is_file():
        return "oxen", path / "config.yaml", path / "checkpoint.pth"
    if (path / "config.json").is_file():
        for weights in ("model.safetensors", "pytorch_model.bin"):
            if (path / weights).is_file():
                return "hf", path / "config.json", path / weights
        raise CheckpointError(f"{path} has config.json but neither model.safetensors nor pytorch_model.bin")
    run_ckpt = path / "checkpoints-meta" / "checkpoint.pth"
    if run_ckpt.is_file():
        for cfg in (path / ".hydra" / "config.yaml", path / "config.yaml"):
            if cfg.is_file():
                return "run", cfg, run_ckpt
        raise CheckpointError(f"{path} has checkpoints-meta/checkpoint.pth but no .hydra/config.yaml")
    present = sorted(p.name for p in path.iterdir())[:12]
    raise CheckpointError(
        f"no SEDD checkpoint in {path} (it holds: {', '.join(present) or 'nothing'}). Expected checkpoint.pth + "
        "config.yaml (Oxen), config.json + model.safetensors (Hugging Face), or "
        "checkpoints-meta/checkpoint.pth + .hydra/config.yaml (training run)"
    )


def read_config(config_file: Path) -> SEDDConfig:
    text = config_file.read_text()
    data = json.loads(text) if config_file.suffix == ".json" else yaml.safe_load(text)
    try:
        return SEDDConfig.from_dict(data)
    except ConfigError as exc:
        raise CheckpointError(f"{config_file}: {exc}") from exc


def torch_load(path: Path, allow_pickle: bool = False) -> Any:
    """torch.load with weights_only=True; arbitrary pickles only where the operator opted in."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if allow_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        raise CheckpointError(
            f"{path} holds Python objects beyond tensors, which weights_only loading refuses "
            f"({str(exc).splitlines()[0]}). Loading it would run code from the file: only if you trust it, "
            "set SEDD_ALLOW_PICKLE=1 (or allow_pickle=True)"
        ) from exc


def read_state_dict(layout: str, weights: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(weights))
    data = torch_load(weights, allow_pickle)
    if layout == "run":
        if not isinstance(data, Mapping) or "model" not in data:
            raise CheckpointError(f"{weights} is not a training checkpoint (no `model` entry)")
        state = _strip_prefix(data["model"])
        ema = data.get("ema")
        if ema is not None:
            state = _with_ema(state, ema["shadow_params"])
        return state
    if isinstance(data, Mapping) and "model" in data and not any(isinstance(v, torch.Tensor) for v in data.values()):
        data = data["model"]
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{weights} is not a state dict")
    return _strip_prefix(data)


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def _with_ema(state: dict[str, torch.Tensor], shadow: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace parameters by the EMA shadow list, which follows model.parameters() order."""
    with torch.device("meta"):
        names = [n for n, _ in SEDD(_config_from_state(state)).named_parameters()]
    if len(names) != len(shadow):
        raise CheckpointError(f"EMA has {len(shadow)} tensors but the model has {len(names)} parameters")
    return {**state, **dict(zip(names, shadow))}


def _config_from_state(state: Mapping[str, torch.Tensor]) -> SEDDConfig:
    """Just enough of a config to enumerate parameter names (shapes do not matter on meta)."""
    n_blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    vocab, hidden = state["vocab_embed.embedding"].shape
    cond = state["sigma_map.mlp.0.weight"].shape[0]
    return SEDDConfig.from_dict({"tokens": vocab, "graph": {"type": "uniform"}, "model": {
        "hidden_size": hidden, "cond_dim": cond, "length": 1, "n_blocks": n_blocks, "n_heads": 1,
        "scale_by_sigma": False}})


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: Path) -> None:
    """Key by key and shape by shape, so a mismatch says exactly what differs."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs config {expected[k]}"
              for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:6])}")
        raise CheckpointError(
            f"the weights in {where} do not match its config: " + ". ".join(parts)
            + ". Check that config (tokens, hidden_size, n_blocks, graph type) belongs to these weights"
        )


def build_model(config: SEDDConfig, state: Mapping[str, torch.Tensor], device: torch.device,
                dtype: torch.dtype, where: Path) -> SEDD:
    with torch.device("meta"):
        model = SEDD(config)
    check_state_dict(model, state, where)
    model.load_state_dict(state, strict=True, assign=True)
    return to_precision(model, device, dtype).eval()


def to_precision(model: SEDD, device: torch.device, dtype: torch.dtype) -> SEDD:
    """`model` on `device` with its weights stored in `dtype`, once, at load: the matmul weights and the
    embedding. What the authors keep in float32 stays float32 in every dtype: the layer norms' weights
    (they normalise in float32) and the rotary frequencies; so no pass casts a weight."""
    inv_freq = model.rotary_emb.inv_freq.float()
    model.to(device=device, dtype=dtype)
    model.rotary_emb.inv_freq = inv_freq.to(device)
    for module in model.modules():
        if isinstance(module, LayerNorm):
            module.float()
    return model


def load_network(path: Path, device: torch.device, dtype: torch.dtype,
                 allow_pickle: bool = False) -> tuple[SEDD, SEDDConfig, str]:
    """The network of a local model folder, without its tokenizer: (model, config, layout)."""
    layout, config_file, weights = detect_layout(path)
    config = read_config(config_file)
    state = read_state_dict(layout, weights, allow_pickle)
    return build_model(config, state, device, dtype, path), config, layout


def load(source: str | os.PathLike | None = "default", device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, *, allow_pickle: bool = False,
         cache_dir: str | os.PathLike | None = None, gpt2_vocab: str | os.PathLike | None = None,
         oxen_host: str | None = None, fast: bool = True, compile: str | None = None) -> LoadedModel:
    """Load a SEDD model, its graph, noise schedule and tokenizer from any supported source.

    allow_pickle: load checkpoints that need full unpickling (runs code from the file: trusted files only).
    cache_dir: where hub sources are downloaded (default ~/.cache/sedd); oxen_host: the Oxen hub (default
    hub.oxen.ai); gpt2_vocab: a gpt2.tiktoken file for GPT-2 models whose folder has none.
    fast=False samples through the plain network (`model.SEDD`) instead of `fast_model.FastSEDD`;
    compile is FastSEDD's (None, "freeze" or a torch.compile mode), or "auto" (`resolve_compile`)."""
    if compile is not None and (not fast or compile not in (*COMPILE_MODES, "auto")):
        raise ValueError(f"compile={compile!r} needs fast=True and one of {', '.join(COMPILE_MODES)} or auto")
    path, source_text = resolve_source(source, cache_dir, oxen_host)
    device = resolve_device(device)
    compile = resolve_compile(compile, device)
    dtype, dtype_choice = choose_dtype(dtype, device)
    model, config, layout = load_network(path, device, dtype, allow_pickle)
    tokenizer = resolve_tokenizer(config.tokens, path, config.tokenizer, gpt2_vocab)
    runner = FastSEDD(model, compile=compile) if fast else model
    return LoadedModel(
        model=model, graph=graph_from_config(config), noise=noise_from_config(config), tokenizer=tokenizer,
        config=config, device=device, dtype=dtype, path=path, source=source_text, layout=layout, runner=runner,
        dtype_choice=dtype_choice,
    )
