"""Named sizes: model shape, tokenizer vocabulary, synthetic-world scale and per-stage defaults.

`micro` checks the plumbing in a couple of minutes (CI); `tiny` learns the synthetic world on a
2-core CPU in about 20 minutes; `small` is MiniMind's 26M shape for a GPU or a long CPU run.
Every value here is only a default: the stage flags override it.
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    "micro": {
        "synth_scale": "micro",
        "vocab_size": 600,
        "max_len": 192,
        "model": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        "pretrain": dict(max_steps=40, batch_size=8, lr=3e-3, warmup_steps=4, pack=1),
        "sft": dict(max_steps=40, batch_size=8, lr=2e-3, warmup_steps=4, pack=1),
        "eval_limit": 16,
        "vqa_limit": 30,
    },
    "tiny": {
        "synth_scale": "tiny",
        "vocab_size": 2048,
        # the corpus is 11 draws of one world: a file's first 1M characters hold its whole vocabulary
        # (BPE on them: 0.2% more tokens on held-out text, 2.6 s instead of 5.9 s to train)
        "tokenizer_chars_per_file": 1_000_000,
        "max_len": 256,
        "model": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
        # 4000 + 2000 steps. Over one fixed corpus the facts were a coin flip at 3000 pretrain steps
        # (closed-book EM 0.333, 0.575, 0.658) and 0.617-0.783 at 4000. With fresh draws of the corpus
        # (the synth scale's pretrain_draws / sft_draws), seed 42: 4000 + 2000 gave closed-book 0.833,
        # context QA 0.845; fewer steps cost the reading: 3200 + 1500 -> 0.765, 3200 + 2000 -> 0.74,
        # 4000 + 1000 -> 0.73. Packing: same gradients, SFT 1.37x faster at 2 threads (561 -> 409 s)
        # pack_len 128: documents (pretrain <= 82 tokens, SFT <= 141) in rows of 128 instead of 256, since
        # a packed row's attention costs its whole width squared: `python bench/bench_lm_step.py` gives
        # 173.6 -> 162.1 ms a pretrain step and 217.6 -> 202.8 ms an SFT step
        "pretrain": dict(max_steps=4000, batch_size=16, lr=2e-3, warmup_steps=60, pack=1, pack_len=128),
        # replay: pretrain documents keep the facts alive through SFT, but too many cost reading: on the
        # 4000-step models, 0.3 vs 0.5 gave context-QA EM 0.795 vs 0.74 and 0.825 vs 0.75 at equal
        # closed-book EM (0.625 vs 0.617, 0.775 vs 0.783). With the drawn corpus (seed 42, one pretrained
        # model): 0.3 -> closed 0.833, context 0.845; 0.15 -> 0.817, 0.825; 0.1 -> 0.683, 0.83. 0.15 reads
        # 9% fewer tokens than 0.3.
        "sft": dict(max_steps=2000, batch_size=16, lr=1e-3, warmup_steps=30, replay_pretrain=0.15, pack=1,
                    pack_len=128),
        "eval_limit": 200,
        "vqa_limit": 600,  # all held-out questions (300 images x 2); the first 300 alone put text at 0.24 where all 600 give 0.41
    },
    "small": {
        "synth_scale": "small",
        "vocab_size": 6400,
        "max_len": 512,
        "model": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2),
        "pretrain": dict(epochs=2, batch_size=32, lr=5e-4, warmup_steps=200),
        "sft": dict(epochs=2, batch_size=32, lr=2e-4, warmup_steps=100),
        "eval_limit": 500,
        "vqa_limit": 500,
    },
}


def get_preset(name: str | None) -> dict:
    """The preset called `name` (default `tiny`), with a clear error for unknown names."""
    name = name or "tiny"
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
