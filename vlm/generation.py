"""Lean decoding for our own serving: a preallocated KV cache and one model step per token.

`model.generate()` (transformers) is the compatible path; `fast_generate` skips its per-token
machinery (logits processors, stopping criteria objects, cache bookkeeping, mask rebuilding), which
dominates the cost of small models on CPU. Both give identical greedy outputs (tested).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .modeling_minimind import MiniMindForCausalLM


class StaticKVCache:
    """Keys/values for all layers in one preallocated tensor; HF's `update`/`get_seq_length` contract."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_layers, self.max_len, self.length = n_layers, max_len, 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, cache_kwargs=None):
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer_idx, :, :, start:end] = k
        self.v[layer_idx, :, :, start:end] = v
        if layer_idx == self.n_layers - 1:
            self.length = end  # every layer of this step has written its rows
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


def sample_next(logits: torch.Tensor, seen: torch.Tensor | None, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, repetition_penalty: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token per row of `logits` [B, V]; `seen` [B, S] are the ids the penalty applies to."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        # CTRL-style penalty, as in transformers: shrink positive logits, grow negative ones.
        prev = logits.gather(1, seen)
        logits = logits.scatter(1, seen, torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty))
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


@torch.inference_mode()
def fast_generate(
    model: MiniMindForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int = 128,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | None = None,
    streamer=None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decode up to `max_new_tokens` after a (left-padded) prompt; returns the new ids [B, <=N].

    Finished rows (after `eos_token_id`) keep emitting eos so the batch stays rectangular.
    `streamer` is anything with HF's `put(ids)`/`end()` (e.g. `TextIteratorStreamer`).
    `inputs_embeds` (e.g. with image features spliced in) replaces the prompt's token embeddings.
    """
    cfg = model.config
    core = model.model
    b, t = input_ids.shape
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    param = next(model.parameters())
    cache = StaticKVCache(cfg.num_hidden_layers, b, cfg.num_key_value_heads, t + max_new_tokens, cfg.head_dim,
                          param.device, torch.get_autocast_dtype(param.device.type)
                          if torch.is_autocast_enabled(param.device.type) else param.dtype)
    padded = attention_mask is not None and not bool(attention_mask.all())
    if padded:
        mask = torch.cat([attention_mask, attention_mask.new_ones(b, max_new_tokens)], dim=1)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        mask, positions = None, torch.arange(t, device=input_ids.device)[None].expand(b, -1)
    hidden, _, _ = core(None if inputs_embeds is not None else input_ids,
                        mask[:, :t] if padded else None, positions, cache, inputs_embeds)
    logits = model.lm_head(hidden[:, -1])
    next_pos = positions[:, -1:] + 1
    seen = input_ids
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    out = []
    for step in range(max_new_tokens):
        tok = sample_next(logits, seen, temperature, top_k, top_p, repetition_penalty, generator)
        if eos is not None:
            tok = torch.where(done, torch.full_like(tok, eos), tok)
            done |= tok == eos
        out.append(tok)
        if streamer is not None:
            streamer.put(tok.cpu())
        if on_token is not None:
            on_token(tok)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if repetition_penalty != 1.0:
            seen = torch.cat([seen, tok[:, None]], dim=1)
        hidden, _, _ = core(tok[:, None], mask[:, : t + step + 1] if padded else None, next_pos, cache)
        logits = model.lm_head(hidden[:, -1])
        next_pos = next_pos + 1
    if streamer is not None:
        streamer.end()
    return torch.stack(out, dim=1) if out else input_ids.new_zeros(b, 0)
