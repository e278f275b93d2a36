"""The projector: maps the encoder's patch tokens [.., N, D_vision] into the LM's embedding space.

`linear` (default) is one bias-free matrix, as in LLaVA-1 and the original MiniMind-V: cheap, and
enough when the LM is trained to read it. `mlp` is LLaVA-1.5's Linear-GELU-Linear, more capacity for
a frozen LM.
"""
from __future__ import annotations

from torch import nn


def build_projector(kind: str, vision_dim: int, text_dim: int) -> nn.Module:
    """`linear`: Linear(D_v, H, bias=False); `mlp`: Linear(D_v, H) -> GELU -> Linear(H, H)."""
    if kind == "linear":
        return nn.Linear(vision_dim, text_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(vision_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))
    raise ValueError(f"unknown projector type {kind!r} (expected 'linear' or 'mlp')")
