"""The projector: maps the encoder's patch tokens [.., N, D_vision] into the LM's embedding space.

`linear` (default) is one bias-free matrix, as in LLaVA-1 and the original MiniMind-V: cheap, and
enough when the LM is trained to read it. `mlp` is LLaVA-1.5's Linear-GELU-Linear, more capacity for
a frozen LM.

With `positions=N` a learned embedding per patch slot is added after the projection. The LM's
rotary positions only say how far a token is from the text that reads it, and a small encoder
trained from scratch keeps little of *where* a patch was in its output features: "where is the red
star?" then has to be read off token order alone (tiny: 0.23 on single objects, where a linear probe
on the same features gets 1.0).
"""
from __future__ import annotations

import torch
from torch import nn


class AddPositions(nn.Module):
    """`x [.., N, H] + table[N, H]`: one learned vector per patch slot."""

    def __init__(self, num_positions: int, dim: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(num_positions, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table.to(x.dtype)


def build_projector(kind: str, vision_dim: int, text_dim: int, positions: int = 0) -> nn.Module:
    """`linear`: Linear(D_v, H, bias=False); `mlp`: Linear(D_v, H) -> GELU -> Linear(H, H);
    `positions` > 0 appends `AddPositions(positions, H)` (the layers then sit in an nn.Sequential)."""
    if kind == "linear":
        layers = [nn.Linear(vision_dim, text_dim, bias=False)]
    elif kind == "mlp":
        layers = [nn.Linear(vision_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim)]
    else:
        raise ValueError(f"unknown projector type {kind!r} (expected 'linear' or 'mlp')")
    if positions:
        layers.append(AddPositions(positions, text_dim))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)
