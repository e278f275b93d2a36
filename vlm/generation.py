"""Lean decoding for our own serving: a preallocated KV cache and one model step per token.

`model.generate()` (transformers) is the compatible path; `fast_generate` skips its per-token
machinery (logits processors, stopping criteria objects, cache bookkeeping, mask rebuilding), which
dominates the cost of small models on CPU. Both give identical greedy outputs (tested).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .modeling_minimind import FeedForward, MiniMindForCausalLM, _slow_cpu_bf16


class StaticKVCache:
    """Keys/values for all layers in one preallocated tensor; HF's `update`/`get_seq_length` contract.

    A layer's keys and values sit side by side on the head axis (`kv[l, :, :n_kv]` keys, `kv[l, :, n_kv:]`
    values; `k`/`v` are views), so the lean decode step stores both with a single copy.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype):
        self.kv = torch.zeros((n_layers, batch, 2 * n_kv_heads, max_len, head_dim), device=device, dtype=dtype)
        self.k, self.v = self.kv[:, :, :n_kv_heads], self.kv[:, :, n_kv_heads:]
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


def decode_weights(model: MiniMindForCausalLM) -> list[torch.Tensor | None]:
    """The weights in decode layout, cached on the model until a parameter changes (moved or updated).

    Matrices are stored transposed, [in, out]: a one-row GEMM reads them ~30% faster on CPU than
    `F.linear`'s [out, in] (measured; decoding a small model is bound by streaming its weights).
    q/k/v and gate/up are concatenated, so each is one GEMM, and the RMSNorm gain that precedes a GEMM
    is folded into its rows (`(x * g) @ W == x @ (g[:, None] * W)`), times sqrt(hidden) (see
    `LeanDecoder.rms`). Per layer: wqkv, wo, wgu, wd (wgu/wd None for MoE layers, which run their own
    module on the normalised input), the scaled norm2 gain for those; then the LM head.
    """
    try:
        key = tuple((p.data_ptr(), p._version) for p in model.parameters())
    except RuntimeError:  # inference tensors keep no version counter: rebuild on every call
        key = None
    cached = model.__dict__.get("_decode_weights")
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    root = model.config.hidden_size ** 0.5
    with torch.no_grad():
        weights = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            dense = isinstance(mlp, FeedForward)
            g1, g2 = layer.input_layernorm.weight[:, None] * root, layer.post_attention_layernorm.weight * root
            weights += [(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).t() * g1).contiguous(),
                        attn.o_proj.weight.t().contiguous(),
                        (torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t() * g2[:, None]).contiguous() if dense else None,
                        mlp.down_proj.weight.t().contiguous() if dense else None,
                        None if dense else g2]
        weights.append((model.lm_head.weight.t() * (model.model.norm.weight[:, None] * root)).contiguous())
    model.__dict__["_decode_weights"] = (key, weights)  # a plain attribute: never saved, never moved
    return weights


class LeanDecoder:
    """The model's one-token decode step with the per-op overhead stripped (it dominates small models).

    The arithmetic of `MiniMindModel.forward` on one new position, in fewer, larger ops (results equal
    to float rounding, tested): one GEMM for q/k/v and one for gate/up on weights in decode layout
    (`decode_weights`); residual adds fused into the output GEMMs (`addmm`); RoPE for the whole
    generation precomputed, applied to q, k and v in one go (v's rows hold cos=1, sin=0, an exact
    identity) so that k and v go into the cache with one copy. fp32 or CUDA, no autocast, eval mode:
    `fast_generate` uses the modules themselves otherwise.
    """

    def __init__(self, model: MiniMindForCausalLM, cache: StaticKVCache, positions: torch.Tensor, dtype: torch.dtype,
                 cross_attention: Callable | None = None):
        core, cfg = model.model, model.config
        self.cross_attention = cross_attention
        self.embed, self.eps_sum = core.embed_tokens.weight, cfg.rms_norm_eps * cfg.hidden_size
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        w = decode_weights(model)
        self.layers = [(*w[5 * i: 5 * i + 5], layer.mlp) for i, layer in enumerate(core.layers)]
        self.lm_head = w[-1]
        self.cache = cache
        self.kv = list(cache.kv)  # per-layer views, [B, 2 * n_kv, max_len, D]
        # cos/sin for every step: [steps, B, heads, 1, D], q and k heads rotated, v heads untouched.
        # rotate_half(x) * sin == roll(x, D/2) * [-sin, sin] exactly (only a sign moves).
        cos, sin = core.rotary(positions, dtype)  # [B, 1, steps, D]
        half = self.head_dim // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        rot, keep = self.n_heads + self.n_kv, self.n_kv
        cos = torch.cat([cos.expand(-1, rot, -1, -1), torch.ones_like(cos).expand(-1, keep, -1, -1)], dim=1)
        sin = torch.cat([sin.expand(-1, rot, -1, -1), torch.zeros_like(sin).expand(-1, keep, -1, -1)], dim=1)
        self.cos, self.sin = cos.permute(2, 0, 1, 3)[:, :, :, None], sin.permute(2, 0, 1, 3)[:, :, :, None]

    def step(self, tok: torch.Tensor, step: int, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, V] for the new tokens `tok` [B] at generation step `step` (key_mask: [B, 1, 1, K])."""
        b, nh, nkv, hd = tok.shape[0], self.n_heads, self.n_kv, self.head_dim
        cos, sin, pos = self.cos[step], self.sin[step], self.cache.length
        if key_mask is not None:
            key_mask = key_mask[..., : pos + 1]
        # In-place ops on fresh intermediates wherever possible: allocation is a visible share of a
        # tiny op's cost on CPU.
        x = F.embedding(tok, self.embed)  # [B, H]: the residual stream (a fresh tensor)
        for i, ((wqkv, wo, wgu, wd, gain2, mlp), kv) in enumerate(zip(self.layers, self.kv)):
            if self.cross_attention is not None:  # the VLM's image read-out (a module call: rare, not lean)
                x = self.cross_attention(i, x[:, None], pos)[:, 0].contiguous()
            qkv = torch.mm(self.rms(x), wqkv).view(b, nh + 2 * nkv, 1, hd)
            rotated = qkv.roll(hd // 2, dims=-1)
            qkv.mul_(cos).addcmul_(rotated, sin)
            kv.narrow(2, pos, 1).copy_(qkv[:, nh:])
            keys = kv.narrow(2, 0, pos + 1)
            out = F.scaled_dot_product_attention(qkv[:, :nh], keys[:, :nkv], keys[:, nkv:], attn_mask=key_mask,
                                                 enable_gqa=nkv != nh)
            x.addmm_(out.reshape(b, nh * hd), wo)
            if wgu is None:
                x.add_(mlp(self.rms(x) * gain2)[0])
            else:
                gate, up = torch.mm(self.rms(x), wgu).chunk(2, dim=-1)
                x.addmm_(F.silu(gate).mul_(up), wd)
        if self.cross_attention is not None:
            x = self.cross_attention(len(self.layers), x[:, None], pos)[:, 0].contiguous()
        self.cache.length = pos + 1
        return torch.mm(self.rms(x), self.lm_head)

    def rms(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm / sqrt(hidden), without its gain: x / sqrt(sum(x^2) + hidden * eps). The gain and
        sqrt(hidden) live in the next GEMM's weights; this is 4 cheap ops where `F.rms_norm` runs ~9."""
        return x * x.square().sum(-1, keepdim=True).add_(self.eps_sum).rsqrt_()


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


# The static cache is written in place, which blocks compiled for training (`--compile`) cannot trace: decode eagerly.
@torch.compiler.set_stance("force_eager")
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
    bidirectional_blocks: torch.Tensor | None = None,
    cross_attention: Callable | None = None,
) -> torch.Tensor:
    """Decode up to `max_new_tokens` after a (left-padded) prompt; returns the new ids [B, <=N].

    Finished rows (after `eos_token_id`) keep emitting eos so the batch stays rectangular.
    `streamer` is anything with HF's `put(ids)`/`end()` (e.g. `TextIteratorStreamer`).
    `inputs_embeds` (e.g. with image features spliced in) replaces the prompt's token embeddings;
    `bidirectional_blocks` [B, T] marks prompt tokens that see each other (an image's, see
    `MiniMindModel.attention_mask_4d`); `cross_attention` runs before every layer, in every step (see
    `MiniMindModel.forward`).
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
                        mask[:, :t] if padded else None, positions, cache, inputs_embeds,
                        bidirectional_blocks=bidirectional_blocks, cross_attention=cross_attention)
    logits = model.lm_head(hidden[:, -1])
    new_positions = positions[:, -1:] + torch.arange(1, max_new_tokens + 1, device=input_ids.device)
    # The lean step covers plain inference; dropout in training mode, autocast and slow-bf16 CPUs
    # (whose workaround lives in the modules) take the modules themselves.
    lean_ok = not (model.training and cfg.dropout > 0) and not torch.is_autocast_enabled(param.device.type) \
        and not _slow_cpu_bf16(param)
    lean = LeanDecoder(model, cache, new_positions, cache.kv.dtype, cross_attention) if lean_ok else None
    key_mask = mask.bool()[:, None, None, :] if padded else None  # [B, 1, 1, K]: the new token's keys
    seen = input_ids
    stop = eos is not None and eos >= 0  # a negative id never matches: no per-step check at all
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    out = []
    for step in range(max_new_tokens):
        tok = sample_next(logits, seen, temperature, top_k, top_p, repetition_penalty, generator)
        if stop:
            tok = torch.where(done, torch.full_like(tok, eos), tok)
            done |= tok == eos
        out.append(tok)
        if streamer is not None:
            streamer.put(tok.cpu())
        if on_token is not None:
            on_token(tok)
        if step == max_new_tokens - 1 or (stop and bool(done.all())):
            break
        if repetition_penalty != 1.0:
            seen = torch.cat([seen, tok[:, None]], dim=1)
        if lean is not None:
            logits = lean.step(tok, step, key_mask)
        else:
            hidden, _, _ = core(tok[:, None], mask[:, : t + step + 1] if padded else None,
                                new_positions[:, step:step + 1], cache, cross_attention=cross_attention)
            logits = model.lm_head(hidden[:, -1])
    if streamer is not None:
        streamer.end()
    return torch.stack(out, dim=1) if out else input_ids.new_zeros(b, 0)
