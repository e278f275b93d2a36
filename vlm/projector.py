"""The projector: maps the encoder's patch tokens [.., N, D_vision] into the LM's embedding space.

`linear` (default) is one bias-free matrix, as in LLaVA-1 and the original MiniMind-V: cheap, and
enough when the LM is trained to read it. `mlp` is LLaVA-1.5's Linear-GELU-Linear, more capacity for
a frozen LM.

With `positions=N` a learned embedding per patch slot is added after the projection. The LM's
rotary positions only say how far a token is from the text that reads it, and a small encoder
trained from scratch keeps little of *where* a patch was in its output features: "where is the red
star?" then has to be read off token order alone (tiny: 0.23 on single objects, where a linear probe
on the same features gets 1.0).

With `shuffle=f` > 1 the projector first applies a pixel shuffle (space-to-depth, as nanoVLM and
Idefics3/SmolVLM do): each f x f block of neighbouring patches becomes one token whose feature is
the block's f*f patch features concatenated, so an image costs N / f^2 LM tokens and nothing the
encoder saw is dropped. The LM then attends over fewer, richer slots.

With `norm=True` an RMSNorm follows the projection, and `match_text_scale` (called when a VLM is
built around an LM) sets its gain, and the slot table's scale, to the RMS of the LM's own word
embeddings. Without it the projected tokens drift far above the words' scale (tiny: norm 90-117 vs
2.3), so inside the LM's residual stream an image token is almost all content: its layers barely
change it, and a slot embedding of the words' scale is 1% of it and unreadable (position 0.20,
chance level).

With `glance=True` one more token follows the local ones: a linear map of the *whole* patch grid,
flattened (the image at a glance, like the global thumbnail token of InternVL or SmolVLM), i.e. the
slot-specific linear readout that a ridge probe uses. Off in the pipeline: on tiny (3272 training
word images) the VLM read 0.29 of held-out words without it and 0.32 with it, VQA 0.62 vs 0.633,
within the noise of 300 questions, although a ridge probe of the same flattened grid reads 0.89.
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


class PixelShuffle(nn.Module):
    """`[.., N, D] -> [.., N / f^2, D * f^2]`: each f x f block of the square patch grid (row-major)
    becomes one token, its patches concatenated in row-major order; blocks stay row-major."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, n, d = x.shape
        f, side = self.factor, shuffled_side(n, self.factor)
        x = x.reshape(-1, side, f, side, f, d).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(*lead, side * side, f * f * d)


class WithGlance(nn.Module):
    """`[.., N, D] -> [.., N' + 1, H]`: the `local` tokens, then one token `W @ flatten(patches)`."""

    def __init__(self, local: nn.Module, num_patches: int, vision_dim: int, text_dim: int):
        super().__init__()
        self.local = local
        self.glance = nn.Linear(num_patches * vision_dim, text_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.local(x), self.glance(x.flatten(-2)).unsqueeze(-2)], dim=-2)


@torch.no_grad()
def match_text_scale(projector: nn.Module, word_embeddings: torch.Tensor) -> None:
    """Put a new projector's output on the scale of the LM's word embeddings: the RMSNorm gain (if
    any) and the slot table's std (if any) become the embeddings' RMS."""
    rms = float(word_embeddings.float().pow(2).mean().sqrt())
    for module in projector.modules():
        if isinstance(module, nn.RMSNorm):
            module.weight.fill_(rms)
        elif isinstance(module, AddPositions):
            module.table.normal_(0.0, rms)


def shuffled_side(num_patches: int, factor: int) -> int:
    """Blocks per side after a pixel shuffle by `factor`; an error unless the grid is square and divisible."""
    grid = round(num_patches ** 0.5)
    if grid * grid != num_patches or grid % factor:
        raise ValueError(f"pixel shuffle by {factor} needs a square patch grid whose side divides by {factor}; "
                         f"the encoder gives {num_patches} patches")
    return grid // factor


def build_projector(kind: str, vision_dim: int, text_dim: int, positions: int = 0, shuffle: int = 1,
                    norm: bool = False, glance_patches: int = 0) -> nn.Module:
    """`linear`: Linear(D_v, H, bias=False); `mlp`: Linear(D_v, H) -> GELU -> Linear(H, H);
    `shuffle` > 1 puts `PixelShuffle(shuffle)` first (input width D_v * shuffle^2); `glance_patches`
    = N > 0 wraps those in `WithGlance` (one more token from all N patches); `norm` appends
    `nn.RMSNorm(H)`; `positions` > 0 appends `AddPositions(positions, H)` last (the layers then sit in
    an nn.Sequential; `positions` counts the glance token too)."""
    width = vision_dim * shuffle * shuffle
    if kind == "linear":
        layers = [nn.Linear(width, text_dim, bias=False)]
    elif kind == "mlp":
        layers = [nn.Linear(width, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim)]
    else:
        raise ValueError(f"unknown projector type {kind!r} (expected 'linear' or 'mlp')")
    if shuffle > 1:
        layers.insert(0, PixelShuffle(shuffle))
    if glance_patches:
        local = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
        layers = [WithGlance(local, glance_patches, vision_dim, text_dim)]
    if norm:
        layers.append(nn.RMSNorm(text_dim, eps=1e-6))
    if positions:
        layers.append(AddPositions(positions, text_dim))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)
