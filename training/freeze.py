"""Which parameters of MiniMind-V train in a stage (`--freeze POLICY`).

- `projector`: the projector only: the LM learns nothing, it is taught to *read* the image
  features (VLM pretraining default, minimind-v's `freeze_llm=2`);
- `projector+first_last`: the projector and the first and last decoder layers (VLM SFT default,
  minimind-v's `freeze_llm=1`): the LM adapts to image tokens at both ends while most of its
  text skills stay untouched;
- `projector+last`: the projector and the last decoder layer (the original MiniMind-V pretrain);
- `all_lm`: the projector and the whole LM, embeddings included.

The projector and the image read-out (`vlm.readout`, when the VLM has one) train under every
policy; the vision encoder is frozen under every policy (it is not even given to the optimizer).
Parameter names are matched with any DDP `module.` prefix removed.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

POLICIES = ("projector", "projector+first_last", "projector+last", "all_lm")


def trainable_predicate(policy: str, num_layers: int) -> Callable[[str, nn.Parameter], bool]:
    """`(name, param) -> bool` for the Trainer's `trainable=` argument."""
    if policy not in POLICIES:
        raise ValueError(f"unknown freeze policy {policy!r}; choose one of {POLICIES}")
    layers = {"projector+first_last": {0, num_layers - 1}, "projector+last": {num_layers - 1}}.get(policy, set())
    prefixes = tuple(f"model.layers.{i}." for i in sorted(layers))

    def trainable(name: str, param: nn.Parameter | None = None) -> bool:
        name = name.removeprefix("module.")
        if name.startswith("vision."):
            return False
        if name.startswith(("projector.", "image_readout.")):
            return True
        if policy == "all_lm":
            return True
        return bool(prefixes) and name.startswith(prefixes)

    return trainable


def apply_freeze(model: nn.Module, policy: str) -> list[str]:
    """Set `requires_grad` by the policy; returns the names of the trainable parameters."""
    keep = trainable_predicate(policy, model.config.num_hidden_layers)
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name, p))
        if p.requires_grad:
            names.append(name)
    return names
