"""One VLM SFT step: the last decoder layer at the answer positions only vs at every position.

`python bench/bench_vlm_sft_step.py [--rounds 6] [--steps 10] [--threads 2] [--batch-size 16]`

The `tiny` pipeline's VLM SFT step on `data.scenes` questions (micro scale; the questions and images
are the `tiny` kinds): the `tiny` LM shape, `minimind-clip-tiny` at random init behind a warm feature
cache (64 patch tokens a picture), the pipeline's freeze policy `all_lm` (the projector trains, the
gradient still flows back through every LM layer) and its `--dtype fast` (bf16 autocast with the math
attention kernel on a CPU with bf16 kernels, else fp32). Contenders, each a full step (forward,
backward, AdamW) on the same batches:
- `hf_full_logits`: what a transformers user writes, `model(**batch, labels=labels).loss`: every
  position through every layer and the LM head;
- `all_positions`: the body at every position, the LM head on the supervised ones only
  (`supervised_head_loss`, what our stages did before);
- `last_layer_kept`: `training.pretrain_vlm.vlm_loss`: the supervised positions passed as `keep`, so
  the last layer's attention output, o_proj and feed-forward run only where an answer token is
  predicted (`vlm.modeling_minimind.MiniMindModel.forward`; the same loss and gradients, tested).
Contenders take turns (order rotates each round); each reports its median ms per step, and ratios
are medians of per-round ratios. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import vlm
from data.vlm_datasets import VLMDataset, open_source, vlm_collate
from training.freeze import apply_freeze
from training.lm_stage import supervised_head_loss
from training.presets import get_preset
from training.pretrain_vlm import TEXT_BUDGET, vlm_loss
from training.trainer import forward_context
from vlm.feature_cache import FeatureCache
from vlm.modeling_minimind import cpu_has_bf16_kernels
from vlm.modeling_vlm import MiniMindVLM
from vlm.vision import VisionEncoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_timing import micro_scene_world, ms_per_step, take_turns  # noqa: E402


def all_positions_loss(model, batch: dict) -> torch.Tensor:
    hidden, aux = model.hidden_states(batch["input_ids"], batch["attention_mask"], image_features=batch["image_features"])
    out = supervised_head_loss(model, hidden, batch["labels"], aux)
    return out.loss_sum / out.count


def last_layer_kept_loss(model, batch: dict) -> torch.Tensor:
    out = vlm_loss(model, batch)
    return out.loss_sum / out.count


def hf_full_logits_loss(model, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 image_features=batch["image_features"], labels=batch["labels"]).loss


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=10, help="batches per contender per round")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = micro_scene_world(root, 2048)
        torch.manual_seed(0)
        lm = vlm.MiniMindForCausalLM(vlm.MiniMindConfig(vocab_size=len(tok), **get_preset("tiny")["model"]))
        model = MiniMindVLM.from_lm(lm, VisionEncoder.from_open_clip("minimind-clip-tiny"))
        apply_freeze(model, "all_lm")
        model.train()
        cache = FeatureCache(root / "cache", model.vision)
        dataset = VLMDataset(open_source(root / "world" / "vlm_sft.jsonl"), tok, model.num_image_tokens,
                             model.num_image_tokens + TEXT_BUDGET, feature_cache=cache)
        rng = random.Random(0)
        batches = [vlm_collate([dataset[i] for i in rng.sample(range(len(dataset)), args.batch_size)])
                   for _ in range(args.steps)]
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, fused=True)
    bf16 = cpu_has_bf16_kernels()

    def timed(loss_fn):
        def fn(m, b):
            with forward_context(torch.device("cpu"), torch.bfloat16 if bf16 else None):
                return loss_fn(m, b)
        return lambda: ms_per_step(model, optimizer, batches, fn)
    contenders = {"hf_full_logits": timed(hf_full_logits_loss), "all_positions": timed(all_positions_loss),
                  "last_layer_kept": timed(last_layer_kept_loss)}
    for run in contenders.values():
        run()  # warm-up
    ms = take_turns(contenders, args.rounds)
    supervised = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    report = {"threads": args.threads, "batch_size": args.batch_size, "rounds": args.rounds, "steps": args.steps,
              "dtype": "bf16" if bf16 else "fp32", "image_tokens": model.num_image_tokens,
              "supervised_share_of_tokens": round(supervised / tokens, 3),
              "median_ms_per_step": {k: round(statistics.median(v), 1) for k, v in ms.items()},
              "speedup_last_layer_kept_vs_all_positions": round(statistics.median(
                  a / k for a, k in zip(ms["all_positions"], ms["last_layer_kept"])), 2),
              "speedup_last_layer_kept_vs_hf_full_logits": round(statistics.median(
                  h / k for h, k in zip(ms["hf_full_logits"], ms["last_layer_kept"])), 2)}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
