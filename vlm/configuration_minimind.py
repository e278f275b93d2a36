"""MiniMindConfig: the hyperparameters of the MiniMind decoder-only language model."""
from __future__ import annotations

from transformers import PretrainedConfig


class MiniMindConfig(PretrainedConfig):
    """Dense or MoE MiniMind LM. Defaults are MiniMind's 26M model (vocab 6400, hidden 512, 8 layers).

    `rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}` enables
    YaRN for contexts longer than those seen in training (set it at inference time).
    """

    model_type = "minimind"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 6400,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 2,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 32768,
        rope_theta: float = 1e6,
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        rms_norm_eps: float = 1e-5,
        dropout: float = 0.0,
        hidden_act: str = "silu",
        initializer_range: float = 0.02,
        use_moe: bool = False,
        num_experts: int = 4,
        num_experts_per_tok: int = 1,
        n_shared_experts: int = 0,
        aux_loss_alpha: float = 0.01,
        norm_topk_prob: bool = True,
        tie_word_embeddings: bool = True,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        use_cache: bool = True,
        **kwargs,
    ):
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}")
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}")
        if use_moe and not 1 <= num_experts_per_tok <= num_experts:
            raise ValueError(f"num_experts_per_tok {num_experts_per_tok} must be in [1, num_experts={num_experts}]")
        # transformers 5 keeps all RoPE settings in one `rope_parameters` dict; `rope_theta` and
        # `rope_scaling` are accepted as the familiar shorthands for it.
        if rope_parameters is None:
            rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
            if rope_scaling:
                rope_parameters |= {k: v for k, v in rope_scaling.items() if k != "type"} | {"rope_type": "yarn"}
        if rope_parameters.get("rope_type", "default") not in ("default", "yarn"):
            raise ValueError(f"rope_parameters: rope_type must be 'default' or 'yarn', got {rope_parameters}")
        if rope_parameters.get("rope_type") == "yarn" and "factor" not in rope_parameters:
            raise ValueError(f"rope_parameters: YaRN needs a 'factor', got {rope_parameters}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        # SwiGLU width: 8/3 of hidden (same parameter count as a 4x GELU MLP), rounded up to 64.
        self.intermediate_size = intermediate_size or 64 * ((int(hidden_size * 8 / 3) + 63) // 64)
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = rope_parameters
        self.rms_norm_eps = rms_norm_eps
        self.dropout = dropout
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.use_moe = use_moe
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_shared_experts = n_shared_experts
        self.aux_loss_alpha = aux_loss_alpha
        self.norm_topk_prob = norm_topk_prob
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
