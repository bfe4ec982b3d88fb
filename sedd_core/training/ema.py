"""Exponential moving average of the weights, stored as the authors' trainer stores it.

`state_dict()` is {"decay", "num_updates", "shadow_params"}, the shadow parameters a list
in `model.parameters()` order: the `ema` entry of a `checkpoints-meta/checkpoint.pth`
that `sedd_core.load` (and the authors' code) sample from.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


class ExponentialMovingAverage:
    """shadow <- shadow - (1 - d) (shadow - param), d = min(decay, (1 + n) / (10 + n)) after n updates.

    The (1 + n) / (10 + n) ramp is the authors' (`use_num_updates=True`): early on the
    average follows the weights closely instead of remembering the random initialisation.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow_params = [p.detach().clone().float() for p in parameters]
        self._backup: list[torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        params = [p.detach().float() for p in parameters]
        if len(params) != len(self.shadow_params):
            raise ValueError(f"EMA tracks {len(self.shadow_params)} parameters, got {len(params)}")
        diffs = torch._foreach_sub(self.shadow_params, params)
        torch._foreach_mul_(diffs, 1.0 - decay)
        torch._foreach_sub_(self.shadow_params, diffs)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        for shadow, param in zip(self.shadow_params, parameters):
            param.copy_(shadow.to(param.dtype))

    @torch.no_grad()
    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self._backup = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        if self._backup is None:
            raise RuntimeError("restore() without store()")
        for saved, param in zip(self._backup, parameters):
            param.copy_(saved)
        self._backup = None

    @contextlib.contextmanager
    def average_parameters(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Within the block, `model` holds the EMA weights; the training weights come back after."""
        self.store(model.parameters())
        self.copy_to(model.parameters())
        try:
            yield model
        finally:
            self.restore(model.parameters())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow_params": [s.detach().clone().cpu() for s in self.shadow_params]}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow_params"]
        if len(shadow) != len(self.shadow_params):
            raise ValueError(f"the EMA state has {len(shadow)} tensors but the model has {len(self.shadow_params)}")
        for mine, theirs in zip(self.shadow_params, shadow):
            if mine.shape != theirs.shape:
                raise ValueError(f"EMA tensor of shape {tuple(theirs.shape)} where the model has {tuple(mine.shape)}")
        device = self.shadow_params[0].device if self.shadow_params else "cpu"
        self.shadow_params = [s.detach().to(device=device, dtype=torch.float32).clone() for s in shadow]
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
