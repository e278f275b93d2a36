"""One CLIP training step on the scene captions: open_clip's forward vs our trimmed text tower.

`python bench/bench_clip_step.py [--rounds 6] [--steps 8] [--threads 2] [--batch 64]`

Draws `tiny` training scenes (`data.scenes`, captions in English and Chinese, as
`clip_pretrain.jsonl` mixes them), renders them, and times a full optimizer step (forward, backward,
AdamW) of `minimind-clip-tiny` with the stage's symmetric contrastive loss:
- `open_clip`: `model(images, texts)`: the text tower runs on every caption padded to the full
  context (64 tokens);
- `trimmed`: `training.pretrain_clip.clip_loss`: the same towers, the text batch cut to its longest
  caption first (`encode_text_trimmed`; same features, tested);
- on a CPU with bf16 kernels (AVX512-BF16/AMX, what `--dtype fast` checks), also `trimmed` under bf16
  autocast twice: `bf16_flash` (PyTorch's default attention kernel) and `bf16_math` (the Trainer's
  `forward_context`, which picks the math kernel under bf16 on a CPU), and `bf16_math_patch_dropout`:
  `bf16_math` with half of the image patches dropped at random in the vision tower's forward
  (FLIP; `training.pretrain_clip --patch-dropout 0.5`, off in the presets).
Contenders take turns (order rotates each round); each reports its median ms per step, and a
speedup is the median of per-round ratios. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import PatchDropout
from torch.nn.attention import SDPBackend, sdpa_kernel

from data.scenes import caption, sample_scene
from data.scenes_render import render
from training.pretrain_clip import clip_loss
from training.trainer import forward_context
from vlm.modeling_minimind import cpu_has_bf16_kernels
from vlm.vision import clip_eval_transform, load_clip

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_timing import ms_per_step, take_turns  # noqa: E402


def open_clip_loss(model, batch: dict) -> torch.Tensor:
    image_features, text_features, scale = model(batch["images"], batch["texts"])[:3]
    logits = scale * image_features @ text_features.T
    target = torch.arange(len(logits))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def ours_loss(model, batch: dict) -> torch.Tensor:
    out = clip_loss(model, batch)
    return out.loss_sum / out.count


def bf16_flash_loss(model, batch: dict) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        return ours_loss(model, batch)


def bf16_math_loss(model, batch: dict) -> torch.Tensor:
    with forward_context(torch.device("cpu"), torch.bfloat16):
        return ours_loss(model, batch)


def bf16_math_patch_dropout_loss(model, batch: dict) -> torch.Tensor:
    model.visual.patch_dropout = PatchDropout(0.5)  # no weights: switching it on for one forward is exact
    try:
        return bf16_math_loss(model, batch)
    finally:
        model.visual.patch_dropout = torch.nn.Identity()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=8, help="batches per contender per round")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_clip("minimind-clip-tiny")[0]
    preprocess, _ = clip_eval_transform(model)
    tokenizer = open_clip.get_tokenizer("minimind-clip-tiny")
    rng = random.Random(0)
    kinds = ["single", "pair", "count", "text", "chart"]
    batches = []
    for _ in range(args.steps):
        scenes = [sample_scene(rng, "train", rng.choice(kinds)) for _ in range(args.batch)]
        texts = [caption(s, rng.choice(["en", "zh"])) for s in scenes]
        batches.append({"images": torch.stack([preprocess(render(s, 64)) for s in scenes]), "texts": tokenizer(texts)})
    opt = torch.optim.AdamW(model.parameters(), 1e-4)

    contenders = {"open_clip": open_clip_loss, "trimmed": ours_loss}
    if cpu_has_bf16_kernels():
        contenders.update(bf16_flash=bf16_flash_loss, bf16_math=bf16_math_loss,
                          bf16_math_patch_dropout=bf16_math_patch_dropout_loss)
    for fn in contenders.values():
        ms_per_step(model, opt, batches, fn)  # warm-up
    ms = take_turns({k: (lambda fn=fn: ms_per_step(model, opt, batches, fn)) for k, fn in contenders.items()},
                    args.rounds)
    lengths = [int(b["texts"].ne(0).any(0).nonzero().max()) + 1 for b in batches]
    report = {"threads": args.threads, "batch": args.batch, "rounds": args.rounds, "steps": args.steps,
              "context": int(batches[0]["texts"].shape[1]), "trimmed_length_median": statistics.median(lengths),
              "median_ms_per_step": {k: round(statistics.median(v), 1) for k, v in ms.items()},
              "speedup_trimmed_vs_open_clip": round(statistics.median(o / t for o, t in zip(ms["open_clip"], ms["trimmed"])), 2)}
    if "bf16_math" in ms:
        report["speedup_bf16_math_vs_bf16_flash"] = round(
            statistics.median(f / m for f, m in zip(ms["bf16_flash"], ms["bf16_math"])), 2)
        report["speedup_bf16_math_vs_trimmed_fp32"] = round(
            statistics.median(t / m for t, m in zip(ms["trimmed"], ms["bf16_math"])), 2)
        report["speedup_patch_dropout_vs_bf16_math"] = round(
            statistics.median(m / d for m, d in zip(ms["bf16_math"], ms["bf16_math_patch_dropout"])), 2)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
