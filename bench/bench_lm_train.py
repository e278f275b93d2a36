"""Training throughput: our MiniMind LM vs `transformers.LlamaForCausalLM` of the identical shape.

`python bench/bench_lm_train.py [--preset tiny] [--batch-size 8] [--seq-len 256] [--steps 3] [--dtype bf16] [--threads 1]`

Both models get the same weights (our state-dict keys are Llama's; the logits are checked equal) and
train on the same random token batches with AdamW under `torch.autocast("cpu", bfloat16)`:
- `hf_llama`: the plain loop everyone writes (`loss = model(input_ids, labels=input_ids).loss`),
- `ours_loop`: the same loop on our model,
- `ours_trainer`: our model through the project's shared `training.trainer.Trainer` and the stages'
  `causal_lm_loss` (only when `training.trainer` exists).
The machine is shared and noisy, so the contenders take turns, one optimizer step each per round (the
order rotates), and each reports the median over rounds; ratios are the medians of the per-round
ratios (the steps compared ran seconds apart). Prints one JSON object.

Shape: `--preset` names a row of `training/presets.py` (`tiny` = the model a user trains on a
laptop CPU: vocab 2048, hidden 256, 4 layers, 4 heads / 2 KV heads, 256 tokens per sample).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from training.presets import get_preset
from vlm import MiniMindConfig, MiniMindForCausalLM


def build_twins(preset: str, vocab_size: int | None = None, max_len: int = 2048, seed: int = 0):
    """Our model and a HF Llama of the identical shape holding the same weights (logits checked)."""
    shape = get_preset(preset)
    cfg = MiniMindConfig(vocab_size=vocab_size or shape["vocab_size"], max_position_embeddings=max_len,
                         **shape["model"])
    torch.manual_seed(seed)
    ours = MiniMindForCausalLM(cfg)
    llama_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=max_len,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters=dict(cfg.rope_parameters),
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        attn_implementation="sdpa")
    llama = LlamaForCausalLM(llama_cfg)
    llama.load_state_dict(ours.state_dict())  # strict: same keys, same shapes
    ids = torch.randint(4, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        diff = (ours(ids).logits - llama(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"twin models disagree: max |logit diff| = {diff}")
    return ours, llama, {"logits_max_abs_diff": diff, "params": sum(p.numel() for p in ours.parameters()),
                         **{k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                            "num_attention_heads", "num_key_value_heads", "intermediate_size")}}


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")


def plain_loop(model, batches, dtype: str, lr: float = 3e-4):
    """The HF-style loop: AdamW, autocast, loss from `labels=`. Returns `step()` that runs one batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    it = iter(batches)

    def step() -> float:
        ids = next(it)
        with autocast(dtype):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def trainer_loop(model, batches, dtype: str, out: str):
    """Our model through the shared Trainer: each `step()` runs a fresh one-step Trainer on one batch."""
    from training.lm_stage import causal_lm_loss
    from training.trainer import TrainConfig, Trainer

    it = iter(batches)

    def collate(items):
        ids = torch.stack(items)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step() -> float:
        ids = next(it)
        cfg = TrainConfig(out=out, max_steps=1, batch_size=len(ids), dtype=dtype, device="cpu",
                          progress=False, log_every=1, save_every=0)
        summary = Trainer(model, list(ids), collate, causal_lm_loss, cfg, save_fn=lambda m, d: None).train()
        return float(summary.get("final_loss", float("nan")))

    return step


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="model shape from training/presets.py (default: tiny)")
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="measured rounds (each contender: one step per round)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast (default) or fp32")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared; default 1)")
    p.add_argument("--no-trainer", action="store_true", help="skip the shared-Trainer contender")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    ours, llama, shape = build_twins(args.preset, args.vocab_size, max(2048, args.seq_len))
    gen = torch.Generator().manual_seed(1)
    n_batches = args.steps + 1  # + warm-up
    batches = [torch.randint(4, shape["vocab_size"], (args.batch_size, args.seq_len), generator=gen)
               for _ in range(n_batches)]
    # Identical starting weights for every contender; each trains its own copy on the same batches.
    ours_state = {k: v.clone() for k, v in ours.state_dict().items()}
    steppers = {"hf_llama": plain_loop(llama, batches, args.dtype), "ours_loop": plain_loop(ours, batches, args.dtype)}
    notes = []
    tmp = tempfile.TemporaryDirectory()
    if not args.no_trainer:
        try:
            import training.trainer  # noqa: F401 - probe: the shared Trainer is being written concurrently
        except ImportError as err:
            notes.append(f"ours_trainer skipped: {err}")
        else:
            twin = MiniMindForCausalLM(ours.config)
            twin.load_state_dict(ours_state)
            steppers["ours_trainer"] = trainer_loop(twin, batches, args.dtype, tmp.name)

    times: dict[str, list[float]] = {k: [] for k in steppers}
    losses: dict[str, list[float]] = {k: [] for k in steppers}
    for r in range(n_batches):
        names = list(steppers)
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            t0 = time.perf_counter()
            try:
                losses[name].append(steppers[name]())
            except Exception as err:  # the concurrently written Trainer may not match this probe yet
                if name != "ours_trainer":
                    raise
                notes.append(f"ours_trainer failed: {type(err).__name__}: {err}")
                del steppers[name], times[name], losses[name]
                continue
            if r:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - t0)
    tmp.cleanup()
    names = list(steppers)

    tokens = args.batch_size * args.seq_len
    result = {
        "bench": "lm_train", "preset": args.preset, "dtype": args.dtype, "threads": args.threads,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "rounds": args.steps, "shape": shape,
        "tokens_per_s": {k: round(tokens / statistics.median(v), 1) for k, v in times.items()},
        "step_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "first_loss": {k: round(v[0], 4) for k, v in losses.items()},
    }
    for name in names[1:]:
        result[f"ratio_{name}_vs_hf_llama"] = round(statistics.median(
            h / o for h, o in zip(times["hf_llama"], times[name])), 2)
    if notes:
        result["notes"] = notes
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
