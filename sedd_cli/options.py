"""Flags shared by the commands that load a model, and the one way they become `sedd_core.load` arguments."""
from __future__ import annotations

import argparse

from app.settings import ModelSettings

MODEL_FLAGS = ("model", "device", "dtype")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="folder, 'default', oxen:NAMESPACE/REPO or hf:REPO_ID "
                                                  "(default: $SEDD_MODEL or the shipped character model)")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: $SEDD_DEVICE, else auto)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: $SEDD_DTYPE, else bf16 "
                                                  "on CUDA and on CPUs with native bf16, fp32 on other CPUs)")


def flags_given(args: argparse.Namespace, names=MODEL_FLAGS) -> dict:
    """The flags the user set; they win over SEDD_* variables."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def model_settings(args: argparse.Namespace) -> ModelSettings:
    return ModelSettings(**flags_given(args))


def load_model(args: argparse.Namespace):
    """The model named by --model (or SEDD_MODEL), on --device as --dtype, with the SEDD_* load options."""
    from sedd_core.loading import load

    settings = model_settings(args)
    return load(settings.model, device=settings.device, dtype=settings.dtype, **settings.load_options())
