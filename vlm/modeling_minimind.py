"""MiniMind: a small decoder-only LM (RMSNorm pre-norm, RoPE/YaRN, GQA via SDPA, SwiGLU or MoE).

Read top to bottom in forward order: norm -> rotary -> attention -> feed-forward (dense / MoE) ->
decoder layer -> model -> causal-LM head. The KV cache is any object with HF's
`update(k, v, layer_idx) -> (k_all, v_all)` and `get_seq_length()`: transformers' `DynamicCache`
for `generate()`, or `vlm.generation.StaticKVCache` for our lean decode loop.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .configuration_minimind import MiniMindConfig


def _mkldnn_bf16_probe() -> bool | None:
    """oneDNN's answer to "does this CPU run bf16 natively?", or None when the private probe is missing."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def cpu_has_bf16_kernels() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX through oneDNN); False when unknown.
    Without them PyTorch's bf16 GEMM and SDPA backward fall back to reference loops 5-70x slower than
    fp32 (measured on an AVX2 EPYC: a bf16 linear backward 700 ms vs 10 ms in fp32)."""
    return bool(_mkldnn_bf16_probe())


def _cpu_lacks_bf16_kernels() -> bool:
    return _mkldnn_bf16_probe() is False  # probe missing: trust PyTorch's own kernels


_EMULATE_BF16 = _cpu_lacks_bf16_kernels()


def _slow_cpu_bf16(x: torch.Tensor) -> bool:
    """Whether this op would run as bf16 on a CPU whose bf16 kernels are slow (autocast or bf16 weights)."""
    return _EMULATE_BF16 and x.device.type == "cpu" and (
        x.dtype == torch.bfloat16
        or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16))


class _Bf16LinearViaFp32(torch.autograd.Function):
    """`bf16(x) @ bf16(w).T` (bf16 operands, fp32 accumulation, bf16 result: what autocast's linear
    computes), run as an fp32 GEMM because that is 10-70x faster on CPUs without bf16 instructions.
    Gradients are rounded to bf16 as autocast's would be, then returned in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
            ctx.save_for_backward(xb, wb)
            ctx.dtypes = x.dtype, w.dtype
            return F.linear(xb.float(), wb.float()).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xb, wb = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        gx = gw = None
        with torch.autocast("cpu", enabled=False):
            g = grad.float()
            if ctx.needs_input_grad[0]:
                gx = (g @ wb.float()).to(torch.bfloat16).to(x_dtype)
            if ctx.needs_input_grad[1]:
                gw = (g.reshape(-1, g.shape[-1]).t() @ xb.reshape(-1, xb.shape[-1]).float()).to(torch.bfloat16).to(w_dtype)
        return gx, gw


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear` without bias, avoiding the slow CPU bf16 GEMM (same result up to summation order)."""
    if _slow_cpu_bf16(x):
        return _Bf16LinearViaFp32.apply(x, weight)
    return F.linear(x, weight)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state-dict keys) whose bias-free forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) if self.bias is not None else linear(x, self.weight)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float,
              is_causal: bool) -> torch.Tensor:
    """`scaled_dot_product_attention` with GQA; bf16 inputs on a CPU without bf16 kernels are attended
    in fp32 (its bf16 backward is ~5x slower there) and the result rounded back to bf16."""
    kw = dict(attn_mask=mask, dropout_p=dropout, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1])
    if not _slow_cpu_bf16(q):
        return F.scaled_dot_product_attention(q, k, v, **kw)
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).to(q.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and x.dtype == self.weight.dtype == torch.float32:
            # Inference: one ATen call instead of six Python-level ops, bit-identical to the lines below
            # (tested through generate); its backward is slower, so training keeps them.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 for stability under bf16 autocast, return in the input dtype.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_inv_freq(config: MiniMindConfig) -> tuple[torch.Tensor, float]:
    """Inverse RoPE frequencies, and the attention scale YaRN applies to cos/sin (1.0 without YaRN)."""
    scaling = config.rope_parameters
    dim, base = config.head_dim, scaling["rope_theta"]
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if scaling.get("rope_type", "default") != "yarn":
        return inv_freq, 1.0
    # YaRN (Peng et al. 2023): keep high-frequency dims, interpolate low-frequency ones, ramp between.
    factor = float(scaling["factor"])
    orig = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)

    def correction_dim(n_rot: float) -> float:
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim // 2 - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq, 0.1 * math.log(factor) + 1.0


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves: x [B, H, T, D], cos/sin [B, 1, T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention through `scaled_dot_product_attention` (flash/mem-efficient kernels)."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(config.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = Linear(config.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask, cache=None, keep=None):
        """`keep` ([B, T] bool, optional): return only those positions' outputs, `[N, hidden]`; every
        position still gives its keys and values."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = attention(q, k, v, mask, self.dropout if self.training else 0.0, is_causal=mask is None and t > 1)
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.resid_dropout(self.o_proj(out if keep is None else out[keep]))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts (+ optional always-on shared experts) with a load-balancing loss."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.top_k, self.n_experts = config.num_experts_per_tok, config.num_experts
        self.norm_topk_prob, self.alpha = config.norm_topk_prob, config.aux_loss_alpha
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(config.num_experts))
        self.shared_experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_shared_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(flat).float(), dim=-1)  # [N, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        # One gather/scatter per expert (E is small), no Python loop over tokens.
        for e, expert in enumerate(self.experts):
            token_idx, slot = (chosen == e).nonzero(as_tuple=True)
            if token_idx.numel():
                y = expert(flat[token_idx]) * weights[token_idx, slot, None].to(flat.dtype)
                out.index_add_(0, token_idx, y.to(out.dtype))
        for shared in self.shared_experts:
            out = out + shared(flat)
        # Switch-Transformer balance loss: E * sum_e(fraction routed to e * mean router prob of e).
        if self.training and self.alpha > 0:
            frac = F.one_hot(chosen, self.n_experts).float().sum(1).mean(0) / self.top_k
            aux = self.alpha * self.n_experts * (frac * probs.mean(0)).sum()
        else:
            aux = flat.new_zeros((), dtype=torch.float32)
        return out.view(shape), aux


class DecoderLayer(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, cos, sin, mask, cache=None, keep=None):
        """`keep` ([B, T] bool, optional): compute the layer's output at those positions only, returned
        flattened `[N, hidden]` (see `MiniMindModel.forward`)."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, keep)
        x = (x if keep is None else x[keep]) + h
        h = self.mlp(self.post_attention_layernorm(x))
        if isinstance(h, tuple):
            h, aux = h
            return x + h, aux
        return x + h, None


class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = MiniMindConfig
    config: MiniMindConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """HF loading, but a checkpoint whose keys or shapes do not match the config is an error.

        (A silent partial load, `strict=False`, cost peer users whole training runs.)
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {k: sorted(map(str, v)) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                    if (v := info.get(k))}
        if problems:
            raise ValueError(f"checkpoint {args[0] if args else ''} does not match {cls.__name__}'s config: {problems}")
        return (model, info) if want_info else model

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class MiniMindModel(MiniMindPreTrainedModel):
    """Embeddings + decoder stack + final norm; returns hidden states, the cache and the MoE aux loss."""

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # A plain attribute, not a buffer: it is derived from the config, never saved, and must not be
        # left uninitialised by from_pretrained's meta-device construction.
        self.inv_freq, self.rope_attention_scale = rope_inv_freq(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype):
        if self.inv_freq.device != position_ids.device:  # moved, or built on the meta device by from_pretrained
            self.inv_freq = rope_inv_freq(self.config)[0].to(position_ids.device)
        freqs = position_ids[:, None, :, None].float() * self.inv_freq  # [B, 1, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.rope_attention_scale
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    @staticmethod
    def attention_mask_4d(attention_mask: torch.Tensor | None, q_len: int, past: int, device,
                          documents: torch.Tensor | None = None,
                          bidirectional_blocks: torch.Tensor | None = None) -> torch.Tensor | None:
        """Boolean [B, 1, q, k] mask (True = attend), or None when plain causal attention suffices.

        `documents` [B, q] (packed rows, no cache): a document number per token; tokens attend only
        within their own document. `bidirectional_blocks` [B, q] (no cache): a block number per token
        (0: none); the tokens of one block also see each other's later tokens, as an image's patches
        do in PaliGemma and Gemma 3 (`token_type_ids`)."""
        if bidirectional_blocks is not None and not bool(bidirectional_blocks.any()):
            bidirectional_blocks = None
        if documents is None and bidirectional_blocks is None and \
                (attention_mask is None or bool(attention_mask.all())):
            if past == 0 or q_len == 1:
                return None  # SDPA's is_causal (or attend-to-all for a single new token)
            attention_mask = None
        k_len = past + q_len
        q_pos = torch.arange(past, k_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        allowed = (k_pos <= q_pos)[None, None]  # [1, 1, q, k] causal
        if documents is not None:
            allowed = allowed & (documents[:, None, :, None] == documents[:, None, None, :])
        if bidirectional_blocks is not None:
            if past:
                raise ValueError("bidirectional_blocks needs the whole prompt in one pass (no KV cache yet)")
            blocks = bidirectional_blocks[:, None]
            allowed = allowed | ((blocks[..., :, None] == blocks[..., None, :]) & (blocks[..., :, None] > 0))
        if attention_mask is None:
            return allowed
        keys = attention_mask[:, -k_len:].bool()[:, None, None, :]
        # The diagonal stays allowed so that a padding query never has an all-masked (NaN) row.
        return (allowed & keys) | (k_pos == q_pos)[None, None]

    @staticmethod
    def packed_documents(position_ids: torch.Tensor) -> torch.Tensor | None:
        """Document numbers [B, T] of packed rows (position ids restart at 0 where a document starts),
        or None when no row holds more than one document."""
        starts = position_ids == 0
        if not bool(starts[:, 1:].any()):
            return None
        return starts.long().cumsum(-1)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, bidirectional_blocks: torch.Tensor | None = None,
                cross_attention=None, keep: torch.Tensor | None = None):
        """`cross_attention(layer_idx, x, start) -> x`, if given, runs on the residual stream before each
        decoder layer and once more after the last (layer_idx = num_hidden_layers); `start` is the
        sequence index of x's first position. It is the VLM's image read-out.

        `keep` ([B, T] bool, optional): the positions whose hidden states the caller reads (a training
        loss: the supervised ones). The last layer then runs its attention output, o_proj and
        feed-forward at those positions only and the others come back as zeros: the kept positions'
        states are exact, since nothing after the last layer's attention mixes positions. An SFT or VQA
        batch supervises a quarter of its tokens or fewer, so this skips most of a layer. Ignored for
        MoE layers, whose balance loss counts every token."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        documents = None
        if position_ids is not None and past == 0 and t > 1:
            documents = self.packed_documents(position_ids)
        if position_ids is None:
            if attention_mask is not None and not bool(attention_mask.all()):
                # Left padding: positions count real tokens only, so a padded prompt equals an unpadded one.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=x.device)[None].expand(b, -1)
        cos, sin = self.rotary(position_ids, x.dtype if not torch.is_autocast_enabled(x.device.type)
                               else torch.get_autocast_dtype(x.device.type))
        mask = self.attention_mask_4d(attention_mask, t, past, x.device, documents, bidirectional_blocks)
        x = self.dropout(x)
        aux_total = None
        if keep is not None and (self.config.use_moe or bool(keep.all())):
            keep = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if cross_attention is not None:
                x = cross_attention(i, x, past)
            rows, aux = layer(x, cos, sin, mask, past_key_values, keep if i == last else None)
            if keep is not None and i == last:
                x = rows.new_zeros(x.shape)
                x[keep] = rows
            else:
                x = rows
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if cross_attention is not None:
            x = cross_attention(len(self.layers), x, past)
        return self.norm(x), past_key_values, aux_total


# transformers >= 5.24 names the output's KV cache `cache` (the old `past_key_values` still works, with a warning)
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        if past_key_values is None:  # transformers >= 5.24 passes the cache as `cache`
            past_key_values = kwargs.pop("cache", None)
        hidden, cache, aux = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                                        bidirectional_blocks=kwargs.pop("bidirectional_blocks", None),
                                        cross_attention=kwargs.pop("cross_attention", None))
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # Shift the labels, not the logits: a [B*T, V] slice of the logits would be copied.
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
            if aux is not None:
                loss = loss + aux
        cache = cache if use_cache or past_key_values is not None else None
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, logits=logits, **{_CACHE_FIELD: cache})
