"""VLM SFT training tokens/s with a warm feature cache vs. the same run encoding images every step.

`python bench/bench_feature_cache.py [--vision ViT-B-16] [--preset tiny] [--batch-size 8] [--rounds 6]`

Both contenders run the real VLM SFT step on the same synthetic scenes (`data.scenes`, micro scale)
and the same model (LM shape from `training/presets.py`, the `--vision` encoder at random init,
linear projector, the SFT default freeze policy `projector+first_last`): build the batch from the
dataset (`data.vlm_datasets.VLMDataset` + `vlm_collate`), forward, backward, AdamW step.
- `uncached`: each item decodes and preprocesses its image and the frozen encoder runs every step;
- `cached`: the features were written to a `vlm.feature_cache.FeatureCache` beforehand (warm), each
  item reads its fp16 features from the memory map.
Tokens are all input tokens of the batch (image placeholders included). The machine is shared, so
the contenders alternate one step each per round (order rotating) after one warm-up step each;
figures are medians, the ratio is the median of per-round ratios. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import vlm
from data.vlm_datasets import VLMDataset, open_source, vlm_collate
from training.freeze import apply_freeze
from training.presets import get_preset
from training.pretrain_vlm import vlm_loss
from vlm.feature_cache import FeatureCache
from vlm.modeling_vlm import MiniMindVLM
from vlm.vision import VisionEncoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_timing import micro_scene_world  # noqa: E402


def step(model, optimizer, dataset, indices) -> tuple[float, int]:
    """One training step on `indices`; returns (seconds, input tokens)."""
    t0 = time.perf_counter()
    batch = vlm_collate([dataset[i] for i in indices])
    out = vlm_loss(model, batch)
    (out.loss_sum / max(out.count, 1)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, int(batch["attention_mask"].sum())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vision", default="ViT-B-16", help="open_clip model name (random init)")
    p.add_argument("--preset", default="tiny", help="LM shape from training/presets.py")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = micro_scene_world(root, 600)
        torch.manual_seed(0)
        lm = vlm.MiniMindForCausalLM(vlm.MiniMindConfig(vocab_size=len(tok), **get_preset(args.preset)["model"]))
        model = MiniMindVLM.from_lm(lm, VisionEncoder.from_open_clip(args.vision))
        apply_freeze(model, "projector+first_last")
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        model.train()

        source = open_source(root / "world" / "vlm_sft.jsonl")
        max_len = model.num_image_tokens + 128
        t0 = time.perf_counter()
        cache = FeatureCache(root / "cache", model.vision)
        cached = VLMDataset(source, tok, model.num_image_tokens, max_len, feature_cache=cache)
        fill_s = time.perf_counter() - t0
        uncached = VLMDataset(source, tok, model.num_image_tokens, max_len, preprocess=model.vision.preprocess)

        contenders = {"cached": cached, "uncached": uncached}
        g = torch.Generator().manual_seed(0)
        times: dict[str, list[float]] = {k: [] for k in contenders}
        tokens: dict[str, list[int]] = {k: [] for k in contenders}
        for r in range(args.rounds + 1):
            indices = torch.randint(len(cached), (args.batch_size,), generator=g).tolist()
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in order:
                secs, n = step(model, optimizer, contenders[name], indices)
                if r > 0:  # round 0 warms both paths up
                    times[name].append(secs)
                    tokens[name].append(n)
        tps = {k: [n / s for n, s in zip(tokens[k], times[k])] for k in contenders}
        ratios = [c / u for c, u in zip(tps["cached"], tps["uncached"])]
        result = {
            "bench": "vlm_sft_feature_cache",
            "vision": args.vision, "image_tokens": model.num_image_tokens, "lm_preset": args.preset,
            "batch_size": args.batch_size, "rounds": args.rounds, "threads": args.threads,
            "tokens_per_step": statistics.median(tokens["cached"]),
            "cached_tokens_per_s": round(statistics.median(tps["cached"]), 1),
            "uncached_tokens_per_s": round(statistics.median(tps["uncached"]), 1),
            "ratio_cached_vs_uncached": round(statistics.median(ratios), 2),
            "cache_fill_s": round(fill_s, 1), "cache_images": len(cache),
            "target_ratio": 3.0,
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
