"""Contrastive pretraining of a small open_clip model from scratch on image-caption pairs.

`python -m training.pretrain_clip --data DIR_OR_JSONL --out DIR [--preset tiny] [--model minimind-clip-tiny]`

--data: a folder holding `clip_pretrain.jsonl` (what `data.scenes` writes) or a jsonl file whose rows
are `{"image", "caption"}` or minimind-v pretrain rows `{"conversations", "image"}` (the assistant
turn is the caption). Image paths are relative to --images (default: `DATA/images`).

The stage is the shared Trainer plus CLIP's symmetric InfoNCE loss over the in-batch pairs; with
`--hard-negatives 1` every caption also brings a copy with one attribute changed ("a small red
star" -> "a small red circle") as an extra negative for its image (NegCLIP-style); `--swap-share P`
makes that copy, for a share P of the two-object captions, the same words bound to the other object
("a red star ... and a blue circle ..." -> "a blue star ... and a red circle ..."). `--grey-copies P`
adds a grey copy of a share P of the images, captioned without colour words (`data.scenes`
captions only; bar charts excluded): shapes must then be seen apart from their colour, which is
what the held-out colour+shape pairs test. `--region-weight W` adds a RegionCLIP-style loss on
rows with `regions` (per-object boxes and captions, which `data.scenes` writes): each object's patch
tokens, pooled by box overlap, must pick that object's own caption among the batch's. It is off by
default: on the tiny scenes it cost 12% of the step time and left VQA where it was (0.777 vs 0.788,
docs/experiments.md). `--patch-dropout P` drops a share P of each training image's patches at random
(FLIP, open_clip's `PatchDropout`), `--unmasked-tail T` shows all of them again in the last share T of
the steps; the saved encoder always sees every patch. Off by default: on the tiny scenes (8x8 patches)
P 0.5 made a step 1.41x faster and cost 15 points of VQA (8 with T 0.25; docs/experiments.md).
A batch's loss is a mean over its pairs, so the stage
reports `loss_sum = loss * batch` with one unit per pair. Note: contrastive negatives come from one micro-batch, so unlike the LM stages a
larger --batch-size is not equivalent to --grad-accum (nor, under DDP, to more ranks).

Output: an open_clip checkpoint folder (`open_clip_config.json` + `open_clip_model.safetensors`,
see `vlm.vision`), plus the Trainer's metrics/plots, and `retrieval.json`: image->caption and
caption->image top-1 accuracy among `--eval-n` held-out scenes (DATA/eval/captions.jsonl), for
the trained model and for the same architecture at random init.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import PatchDropout
from torch.utils.data import Dataset

from data.scenes import colourless_caption, hard_negative
from training.cli import add_common_args, config_from_args
from training.trainer import LossOutput, Trainer
from vlm.images import load_image
from vlm.vision import VisionEncoder, clip_eval_transform, encode_text_trimmed, load_clip, save_clip_checkpoint

log = logging.getLogger(__name__)

CLIP_PRESETS: dict[str, dict] = {  # stage defaults per preset; the flags override them
    "micro": dict(model="minimind-clip-micro", max_steps=30, batch_size=32, lr=2e-3, warmup_steps=3),
    # tiny: the CLIP's training length moves the VLM more than anything tried on the VLM itself: its
    # features grow easier to read. Seed-42 scenes, held-out retrieval i2t en / zh and VQA (VLM recipe of
    # the pipeline): 400 -> 800 steps: i2t 0.62 / 0.65 -> 0.72 / 0.72, VQA 0.573 -> 0.61, shape 0.21 -> 0.44,
    # unseen pairs 0.58 -> 0.69 (ridge probes barely moved: shape 0.91 -> 0.95). 2026-12-06, seed-42 LM of
    # `runs/full_d3`, all 600 held-out questions, 800 -> 1600 -> 2400 steps: i2t 0.81 / 0.72 -> 0.81 / 0.80
    # -> 0.85 / 0.86, VQA 0.667 -> 0.743 -> 0.773, unseen pairs 0.691 -> 0.744 -> 0.805, shape 0.42 -> 0.62
    # -> 0.67, text 0.51 -> 0.68 -> 0.78. dtype `fast` (bf16 on a CPU with bf16 kernels, fp32 elsewhere)
    # pays for it: a step is 1.48x faster there (2.39 -> 3.54 it/s at 2 threads), 1600 steps took 444 s
    # instead of 670 s with the same VQA (0.747 vs 0.743), 2400 took 619 s. With the math attention kernel
    # under bf16 (`training.trainer.forward_context`, a step 1.38x faster) 3200 steps: i2t 0.91 / 0.93,
    # VQA 0.795, unseen 0.794, text 0.91 (the same LM and VLM recipe); at lr 2e-3 i2t fell to 0.76 / 0.77,
    # with binding-swap negatives (`--hard-negatives 1 --swap-share 1`) VQA 0.78, shape 0.63 (vs 0.69).
    "tiny": dict(model="minimind-clip-tiny", max_steps=3200, batch_size=64, lr=1e-3, warmup_steps=30, dtype="fast"),
    "small": dict(model="minimind-clip-small", epochs=8, batch_size=256, lr=5e-4, warmup_steps=200),
}
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on the learned temperature


def _caption_of(row: dict) -> str | None:
    if isinstance(row.get("caption"), str):
        return row["caption"]
    turns = [t for t in row.get("conversations") or [] if isinstance(t, dict) and t.get("role") == "assistant"]
    return turns[-1].get("content") if turns else None


def _regions_of(row: dict) -> tuple:
    """`regions: [{"box": [x0, y0, x1, y1] (fractions of the image), "caption"}]` -> ((box, caption), ...)."""
    out = []
    for k, region in enumerate(row.get("regions") or []):
        box, text = region.get("box"), region.get("caption")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            raise ValueError(f"regions[{k}].box must be [x0, y0, x1, y1], fractions with x0 < x1, y0 < y1")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"regions[{k}].caption must be a non-empty string")
        out.append((tuple(float(v) for v in box), text.strip()))
    return tuple(out)


def box_after_preprocess(box: tuple, size: tuple[int, int], resize_mode: str = "shortest") -> tuple:
    """A box in fractions of the original `size` (w, h) -> fractions of the square the encoder sees
    after open_clip's resize: `shortest` centre-crops, `longest` pads, `squash` stretches."""
    w, h = size
    if resize_mode == "squash" or w == h:
        return box
    side = min(w, h) if resize_mode == "shortest" else max(w, h)
    dx, dy = (side - w) / 2, (side - h) / 2  # negative: cropped away; positive: padding
    x0, y0, x1, y1 = ((box[0] * w + dx) / side, (box[1] * h + dy) / side,
                      (box[2] * w + dx) / side, (box[3] * h + dy) / side)
    return tuple(min(max(v, 0.0), 1.0) for v in (x0, y0, x1, y1))


class CaptionPairs(Dataset):
    """(image path, caption) rows of a jsonl file; bad rows and missing images are skipped with a warning.

    Preprocessed images are kept in memory (fp16: finer than the 8-bit pixels they came from) up to
    `cache_bytes`: an image returns with every caption it has and in every epoch, and decoding it is
    a tenth of a `tiny` step's time.
    """

    def __init__(self, jsonl: Path, image_root: Path, preprocess, grey_copies: float = 0.0,
                 cache_bytes: int = 2 << 30, resize_mode: str = "shortest"):
        self.image_root, self.preprocess, self.resize_mode = image_root, preprocess, resize_mode
        self.cache: dict[tuple[Path, bool], torch.Tensor] = {}
        self.cache_bytes_left = cache_bytes
        self.rows: list[tuple[Path, str, bool, tuple]] = []  # (image, caption, show in grey, regions)
        skipped = 0
        for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, text = row.get("image"), _caption_of(row)
                if not isinstance(image, str) or not text:
                    raise ValueError("needs an 'image' path and a 'caption' (or an assistant turn)")
                path = image_root / image
                if not path.is_file():
                    raise ValueError(f"image {path} not found")
                regions = _regions_of(row)
            except (ValueError, AttributeError, TypeError) as e:
                skipped += 1
                if skipped <= 5:
                    log.warning("%s:%d: skipped (%s)", jsonl, n, e)
                continue
            self.rows.append((path, text.replace("<image>", "").strip(), False, regions))
        if skipped:
            log.warning("%s: %d bad rows skipped, %d kept", jsonl, skipped, len(self.rows))
        # a fixed share of rows (chosen by a hash: same rows every run) also appear in grey
        # (without regions: their captions name colours)
        self.rows += [(path, grey, True, ()) for path, text, _, _ in list(self.rows)
                      if zlib.crc32(f"{path}|{text}".encode()) % 1000 < grey_copies * 1000
                      and (grey := colourless_caption(text)) is not None]
        if not self.rows:
            raise SystemExit(f"{jsonl}: no usable image-caption rows")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        path, text, grey, regions = self.rows[i]
        if (cached := self.cache.get((path, grey))) is None:
            image = load_image(path)
            # rounded to fp16 whether or not it is kept, so a cached image and a fresh one are the same
            pixels = self.preprocess(image.convert("L").convert("RGB") if grey else image).half()
            cached = (pixels, image.size)
            if self.cache_bytes_left >= pixels.nbytes:
                self.cache[(path, grey)] = cached
                self.cache_bytes_left -= pixels.nbytes
        pixels, size = cached
        return {"image": pixels.float(), "caption": text,
                "regions": [(box_after_preprocess(box, size, self.resize_mode), cap) for box, cap in regions]}


def make_collate(tokenizer, hard_negatives: bool = False, swap_share: float = 0.0):
    """Images + tokenised captions; with `hard_negatives`, the batch's one-attribute-off captions
    (`data.scenes.hard_negative`; a share `swap_share` of two-object ones swapped between the objects
    instead) are appended to `texts` after the B true ones. Rows with regions add `region_boxes`
    [R, 4], `region_image` [R] (which image), `region_texts` (the batch's distinct region captions,
    tokenised) and `region_target` [R] (each region's caption among them)."""
    def collate(items: list[dict]) -> dict:
        captions = [it["caption"] for it in items]
        if hard_negatives:
            # seeded by the batch's own text: the same batch gets the same negatives (exact resume)
            rng = random.Random(zlib.crc32("\n".join(captions).encode()))
            captions += [neg for c in captions if (neg := hard_negative(c, rng, swap_share=swap_share)) is not None]
        batch = {"images": torch.stack([it["image"] for it in items]), "texts": tokenizer(captions)}
        regions = [(i, box, text) for i, it in enumerate(items) for box, text in it.get("regions", ())]
        if regions:
            distinct = sorted({text for _, _, text in regions})
            batch |= {"region_boxes": torch.tensor([box for _, box, _ in regions], dtype=torch.float32),
                      "region_image": torch.tensor([i for i, _, _ in regions]),
                      "region_texts": tokenizer(distinct),
                      "region_target": torch.tensor([distinct.index(text) for _, _, text in regions])}
        return batch
    return collate


def box_weights(boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[R, 4] boxes (fractions) -> [R, gh * gw]: the share of each box's area on each patch (rows sum to 1)."""
    gh, gw = grid
    xs, ys = torch.arange(gw + 1, device=boxes.device) / gw, torch.arange(gh + 1, device=boxes.device) / gh
    # 1-d overlaps of each box with each patch column / row, then their outer product
    ox = (torch.minimum(boxes[:, 2:3], xs[None, 1:]) - torch.maximum(boxes[:, 0:1], xs[None, :-1])).clamp(min=0)
    oy = (torch.minimum(boxes[:, 3:4], ys[None, 1:]) - torch.maximum(boxes[:, 1:2], ys[None, :-1])).clamp(min=0)
    area = (oy[:, :, None] * ox[:, None, :]).flatten(1)
    return area / area.sum(1, keepdim=True).clamp(min=1e-12)


def make_clip_loss(region_weight: float = 0.0):
    """Symmetric contrastive loss of the batch; one unit per image-caption pair.

    `texts` may hold more rows than `images`: the extra rows are hard negatives, which compete in
    the image->text direction only (they have no image of their own).

    With `region_weight` > 0 and regions in the batch, each region's patch tokens, averaged by how
    much of the box each patch holds and projected as the pooled image is, must also pick that
    region's own caption among the batch's distinct region captions (RegionCLIP-style). Those include
    the other objects of the same picture, so a token cannot just describe the whole picture: the
    mean pool alone gives every patch the same gradient, and our tokens at one object read the
    other object's shape about as well as their own (`training.probe_vision`, pair probes).
    """
    def clip_loss(model, batch: dict) -> LossOutput:
        device = next(model.parameters()).device
        visual = model.visual
        out = visual(batch["images"].to(device))
        pooled, tokens = out if isinstance(out, tuple) else (out, None)
        image_features = F.normalize(pooled, dim=-1)
        text_features = F.normalize(encode_text_trimmed(model, batch["texts"].to(device)), dim=-1)
        logit_scale = model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        n = len(image_features)
        logits = logit_scale * image_features @ text_features.T  # [B, B + negatives]
        target = torch.arange(n, device=device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :n].T, target)) / 2
        with torch.no_grad():
            acc = (logits.argmax(dim=1) == target).float().mean()
        metrics = {"batch_i2t_acc": float(acc), "logit_scale": float(logit_scale.detach())}
        if region_weight > 0 and "region_boxes" in batch:
            if tokens is None or visual.proj is None:
                raise ValueError("region loss: the vision tower must return patch tokens and have a projection")
            grid = tuple(visual.grid_size)
            weights = box_weights(batch["region_boxes"].to(device), grid)  # [R, N]
            region = torch.einsum("rn,rnd->rd", weights.to(tokens.dtype), tokens[batch["region_image"].to(device)])
            region = F.normalize(region @ visual.proj, dim=-1)
            region_text = F.normalize(encode_text_trimmed(model, batch["region_texts"].to(device)), dim=-1)
            region_logits = logit_scale * region @ region_text.T  # [R, distinct captions]
            region_target = batch["region_target"].to(device)
            region_loss = F.cross_entropy(region_logits, region_target)
            loss = loss + region_weight * region_loss
            with torch.no_grad():
                metrics |= {"region_loss": float(region_loss),
                            "region_acc": float((region_logits.argmax(1) == region_target).float().mean())}
        return LossOutput(loss_sum=loss * n, count=n, metrics=metrics)
    return clip_loss


clip_loss = make_clip_loss()  # the plain image-caption loss


class DropoutUntil(torch.nn.Module):
    """`dropout` while `active()` holds, then the identity: patch dropout with an unmasked tail. The
    condition reads the Trainer's step, which `--resume` restores, so a resumed run switches at the
    same step."""

    def __init__(self, dropout: torch.nn.Module, active: Callable[[], bool]):
        super().__init__()
        self.dropout, self.active = dropout, active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x) if self.active() else x


# -- held-out retrieval ------------------------------------------------------------------------------
def retrieval_accuracy(encoder: VisionEncoder, rows: list[dict], image_root: Path, key: str = "caption") -> dict:
    """Top-1 image->caption and caption->image accuracy among `rows` (`{"image", key}`).

    A retrieved caption counts as correct when its text equals the image's own caption (two scenes
    may share a description), and likewise for a retrieved image.
    """
    captions = [r[key] for r in rows]
    img = encoder.embed_images([image_root / r["image"] for r in rows])
    txt = encoder.embed_texts(captions)
    sim = img @ txt.T
    i2t_hits = [captions[j] == captions[i] for i, j in enumerate(sim.argmax(dim=1).tolist())]
    t2i_hits = [captions[j] == captions[i] for i, j in enumerate(sim.argmax(dim=0).tolist())]
    report = {"i2t_top1": round(sum(i2t_hits) / len(rows), 4), "t2i_top1": round(sum(t2i_hits) / len(rows), 4),
              "n": len(rows)}
    unseen = [hit for hit, r in zip(i2t_hits, rows) if r.get("unseen_combo")]
    if unseen:  # images holding a colour+shape pair that never occurred in training
        report.update(unseen_i2t_top1=round(sum(unseen) / len(unseen), 4), unseen_n=len(unseen))
    return report


def evaluate_retrieval(checkpoint: Path, model_name: str, data_dir: Path, image_root: Path, n: int) -> dict:
    """Retrieval of the saved checkpoint vs. the same architecture at random init, per language."""
    file = data_dir / "eval" / "captions.jsonl"
    if not file.is_file():
        return {}
    rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()][:n]
    trained = VisionEncoder.from_open_clip(pretrained=str(checkpoint))
    random_init = VisionEncoder.from_open_clip(model_name)
    report = {"eval_file": str(file), "encoder": trained.identity}
    for lang, key in (("en", "caption"), ("zh", "caption_zh")):
        if all(key in r for r in rows):
            report[lang] = retrieval_accuracy(trained, rows, image_root, key)
            report[f"{lang}_random_init"] = retrieval_accuracy(random_init, rows, image_root, key)
    return report


# -- CLI ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.pretrain_clip", description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--model", help="open_clip model config name (default: from preset, minimind-clip-*)")
    p.add_argument("--images", help="folder the jsonl image paths are relative to (default: DATA/images)")
    p.add_argument("--hard-negatives", type=int, choices=(0, 1), default=0,
                   help="1: add one-attribute-off captions as extra negatives (default: from preset)")
    p.add_argument("--swap-share", type=float, default=0.0,
                   help="with --hard-negatives 1: share of two-object captions whose negative exchanges an "
                        "attribute between the objects ('a red star and a blue circle' -> 'a blue star and a "
                        "red circle') (default: from preset)")
    p.add_argument("--grey-copies", type=float, default=0.0,
                   help="share of rows also shown in grey with the colour words dropped (default: from preset)")
    p.add_argument("--region-weight", type=float, default=0.0,
                   help="weight of the region-caption loss on rows with `regions` (0: off) (default: from preset)")
    p.add_argument("--patch-dropout", type=float, default=0.0,
                   help="share of image patches dropped at random in each training forward (FLIP); the saved "
                        "encoder sees every patch (default: from preset)")
    p.add_argument("--unmasked-tail", type=float, default=0.0,
                   help="with --patch-dropout: share of the steps, at the end, that see every patch again "
                        "(FLIP's unmasked tuning) (default: from preset)")
    p.add_argument("--eval-n", type=int, default=100, help="held-out scenes in the retrieval check (0: skip)")
    return p


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    preset = known.preset or "tiny"
    if preset not in CLIP_PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose one of {sorted(CLIP_PRESETS)}")
    parser.set_defaults(**CLIP_PRESETS[preset])
    args = parser.parse_args(argv)

    data = Path(args.data)
    jsonl = data / "clip_pretrain.jsonl" if data.is_dir() else data
    if not jsonl.is_file():
        raise SystemExit(f"--data: {jsonl} does not exist (a jsonl file or a folder holding clip_pretrain.jsonl)")
    data_dir = jsonl.parent
    image_root = Path(args.images) if args.images else data_dir / "images"

    torch.manual_seed(args.seed)
    if args.init:  # continue from a checkpoint folder; its own config decides the architecture
        model, model_name, model_cfg, tok_id = load_clip(pretrained=args.init)
    else:
        model, model_name, model_cfg, tok_id = load_clip(args.model, None, seed=args.seed)
    model.output_dict = False
    if not 0 <= args.patch_dropout < 1:
        raise SystemExit(f"--patch-dropout {args.patch_dropout}: must be in [0, 1)")
    if args.patch_dropout > 0:
        if args.region_weight > 0:
            raise SystemExit("--patch-dropout and --region-weight: the region loss needs every patch token in place")
        # active in training mode only; the checkpoint's config does not carry it, so encoders loaded from it see all patches
        model.visual.patch_dropout = PatchDropout(args.patch_dropout)
    if not 0 <= args.unmasked_tail <= 1:
        raise SystemExit(f"--unmasked-tail {args.unmasked_tail}: must be in [0, 1]")
    if args.unmasked_tail > 0 and args.patch_dropout == 0:
        raise SystemExit("--unmasked-tail needs --patch-dropout: without it every step already sees every patch")
    if args.region_weight > 0:
        model.visual.output_tokens = True  # forward returns (pooled, patch tokens): the region loss reads the tokens
    # open_clip's eval transform, also for training: random crops or flips would change the
    # left/right/top answers of the scenes.
    preprocess, preprocess_cfg = clip_eval_transform(model)
    dataset = CaptionPairs(jsonl, image_root, preprocess, args.grey_copies,
                           resize_mode=preprocess_cfg.get("resize_mode", "shortest"))
    tokenizer = open_clip.get_tokenizer(tok_id)

    def save(m, out_dir):
        save_clip_checkpoint(getattr(m, "module", m), model_name, model_cfg, out_dir)

    collate = make_collate(tokenizer, bool(args.hard_negatives), args.swap_share)
    trainer = Trainer(model, dataset, collate, make_clip_loss(args.region_weight), config_from_args(args),
                      count_fn=lambda b: len(b["images"]), save_fn=save)
    if args.patch_dropout > 0 and args.unmasked_tail > 0:
        last_masked = round(trainer.total_steps * (1 - args.unmasked_tail))
        model.visual.patch_dropout = DropoutUntil(model.visual.patch_dropout, lambda: trainer.step < last_masked)
    summary = trainer.train()
    is_main = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                   and torch.distributed.get_rank() != 0)
    out = Path(args.out)
    if is_main and args.eval_n > 0 and (out / "open_clip_config.json").is_file():
        report = evaluate_retrieval(out, model_name, data_dir, image_root, args.eval_n)
        if report:
            (out / "retrieval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
            summary = {**summary, "retrieval": report}
            print(json.dumps({"retrieval": report}, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
