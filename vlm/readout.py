"""Cross-attention read-out: text positions look the image tokens up directly.

The `@` slots put an image *into* the sequence, and the LM's own attention has to find, for "what
colour is the star?", the patches where the star is and read their colour. Our tiny 4-layer LM never
learns that query-by-object lookup (two-object scenes stay at chance, see docs/experiments.md),
although a one-layer cross-attention queried by the shape word reads it off the same features.

So, as in Flamingo and Llama 3.2 Vision (`cross_attention_layers`), selected decoder layers get a
cross-attention block in front of them (or after the last one): queries from the text's residual
stream and its words, keys and values from the row's projected image tokens (the same vectors that
fill the `@` slots), output added through a projection that starts at zero, so a new block leaves
the LM's function unchanged. Keys carry no rotary position (a lookup by content; where a patch is
comes from the projector's slot table).

A position reads every image whose slots come before it in its row; image slots themselves and
text before the first image read nothing. The image keys and values are computed once per layer
and kept in `ImageMemory`, which decoding carries beside the KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .modeling_minimind import Linear, RMSNorm


@dataclass
class ImageMemory:
    """The image tokens of each row, gathered from the prompt's slots: `tokens` [B, M, H] (M: the
    most slots in a row; shorter rows padded), `index` [B, M] their sequence index, `valid` [B, M],
    `slots` [B, T] the prompt's slot mask, `text` [B, T] its real text tokens (not slots, not padding);
    `kv` caches each block's keys and values. `words` [B, L, H] is the running mean of the text's
    token embeddings at the positions of the current forward (`read_words`), whose sums carry over
    to the next decoding step."""
    tokens: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    slots: torch.Tensor
    text: torch.Tensor
    kv: dict = field(default_factory=dict)
    words: torch.Tensor | None = None
    word_sum: torch.Tensor | float = 0.0
    word_count: torch.Tensor | float = 0.0

    @classmethod
    def from_slots(cls, embeds: torch.Tensor, slots: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> "ImageMemory | None":
        """From the prompt's embeddings [B, T, H] (images spliced in), its slot mask [B, T] and
        padding mask; None when no row holds an image."""
        counts = slots.sum(-1)
        m = int(counts.max()) if slots.numel() else 0
        if m == 0:
            return None
        # A stable sort puts each row's slot positions first, in order: one gather, no loop.
        index = torch.sort((~slots).to(torch.int8), dim=-1, stable=True).indices[:, :m]
        valid = torch.arange(m, device=slots.device)[None] < counts[:, None]
        tokens = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
        text = ~slots if attention_mask is None else ~slots & attention_mask[:, -slots.shape[1]:].bool()
        return cls(tokens, index, valid, slots, text)

    def _in_prompt(self, mask: torch.Tensor, start: int, length: int, fill: bool) -> torch.Tensor:
        part = mask[:, start:start + length]
        return F.pad(part, (0, length - part.shape[1]), value=fill)

    def mask(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For queries at sequence indices start..start+length-1: the keys each may read, [B, 1, L, M],
        and whether it reads any, [B, L, 1]."""
        query = torch.arange(start, start + length, device=self.index.device)
        is_slot = self._in_prompt(self.slots, start, length, False)
        allowed = self.valid[:, None, :] & (self.index[:, None, :] < query[None, :, None]) & ~is_slot[..., None]
        return allowed[:, None], allowed.any(-1, keepdim=True)

    def read_words(self, embeds: torch.Tensor, start: int) -> None:
        """Set `words` from the token embeddings [B, L, H] at indices start..start+L-1 (what the first
        decoder layer receives); a step after the prompt extends the prompt's sums."""
        text = self._in_prompt(self.text, start, embeds.shape[1], True)[..., None].to(embeds.dtype)
        sums = self.word_sum + (embeds * text).cumsum(1)
        counts = self.word_count + text.cumsum(1)
        self.words = sums / counts.clamp(min=1)
        self.word_sum, self.word_count = sums[:, -1:], counts[:, -1:]


class ImageCrossAttention(nn.Module):
    """x + rms(x) * o(attention(q(norm(x)) + w(norm(words)), k(norm(images)), v(norm(images)))),
    queries and keys RMS-normalised per head, o zero at the start.

    `words` is the running mean of the text's token embeddings: the query knows the question's words
    directly (as InstructBLIP's instruction-aware Q-Former does), not only through the LM's state.
    On tiny (2026-12-06, `runs/full_c25`), an attention probe of the projected image tokens named the
    asked object's colour in fresh two-object scenes at 0.78 with the shape word's embedding as
    query, 0.75 with the mean of the prompt's token embeddings, and 0.46 (chance) with the VLM's
    final state at the answer position: that state does not say which object is asked about."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float = 1e-5):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.norm = RMSNorm(hidden_size, eps)
        self.image_norm = RMSNorm(hidden_size, eps)
        self.word_norm = RMSNorm(hidden_size, eps)
        self.q_proj = Linear(hidden_size, hidden_size, bias=False)
        self.w_proj = Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = Linear(hidden_size, hidden_size, bias=False)
        # QK-norm (as in OLMo 2 and Gemma 3): without it the logits grew until each head's softmax
        # was one-hot on a fixed image slot, the same for every image, and its gradient vanished.
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        # Zero output at the start (as LoRA's B matrix and ControlNet's zero convolutions): a new block
        # leaves the LM as it was, yet its weights get gradients from the first step. A tanh gate at 0
        # (Flamingo's) did not open here: its gradient through a random output projection averaged out
        # (gate 0.009 -> 0.012 in 400 steps of two-object questions) and nothing behind it learned.
        nn.init.zeros_(self.o_proj.weight)
        self.o_proj._is_hf_initialized = True

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, memory: ImageMemory) -> tuple[torch.Tensor, torch.Tensor]:
        cached = memory.kv.get(id(self))
        if cached is None:
            images = self.image_norm(memory.tokens)
            keys = self.k_norm(self._heads(self.k_proj(images)))
            cached = memory.kv[id(self)] = keys, self._heads(self.v_proj(images))
        return cached

    def forward(self, x: torch.Tensor, memory: ImageMemory, start: int) -> torch.Tensor:
        """x [B, L, H] at sequence indices start..start+L-1."""
        k, v = self.keys_values(memory)
        allowed, reads = memory.mask(start, x.shape[1])
        # A query with no key would make softmax NaN: let it see every key, then drop its output.
        q = self.q_norm(self._heads(self.q_proj(self.norm(x)) + self.w_proj(self.word_norm(memory.words.to(x.dtype)))))
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=allowed | ~reads[:, None])
        out = out.transpose(1, 2).reshape(x.shape) * reads
        # Written at the residual stream's own scale: the LM's late layers carry norms in the hundreds
        # (tiny: ~560 at the last layer, the token embeddings ~1), so a plain addition would be lost
        # under the final norm there and swamp the embeddings at layer 0.
        scale = x.float().pow(2).mean(-1, keepdim=True).sqrt().to(x.dtype)
        return x + scale * self.o_proj(out)


def build_readout(layers: list[int], hidden_size: int, num_heads: int, eps: float) -> nn.ModuleDict:
    """One block per listed decoder layer, keyed by the layer's index."""
    return nn.ModuleDict({str(i): ImageCrossAttention(hidden_size, num_heads, eps) for i in layers})


def readout_hook(readout: nn.ModuleDict, memory: ImageMemory | None):
    """`(layer_idx, x, start) -> x` for `MiniMindModel.forward`'s `cross_attention`, or None."""
    if memory is None or len(readout) == 0:
        return None

    def hook(layer_idx: int, x: torch.Tensor, start: int) -> torch.Tensor:
        if layer_idx == 0:  # x is still the token embeddings
            memory.read_words(x, start)
        key = str(layer_idx)
        return readout[key](x, memory, start) if key in readout else x

    return hook
