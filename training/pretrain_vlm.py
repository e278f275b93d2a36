"""VLM pretraining: image-caption conversations teach the projector to map patch features into the LM.

`python -m training.pretrain_vlm --data DIR_OR_FILE --out DIR --init LM_OR_VLM_DIR --vision ENCODER
 [--freeze projector] [--projector linear|mlp] [--projector-positions 0|1] [--projector-norm 0|1] [--projector-glance 0|1]
 [--image-attention causal|bidirectional] [--cross-attention-layers I ...]
 [--preset tiny] ...`

--init: an LM checkpoint folder (a new VLM is built around it: LM weights copied, new projector)
or a MiniMind-V folder (continued as is; its own encoder is kept). --vision: an open_clip model
name (`ViT-B-16`, `minimind-clip-tiny`, with `--vision-pretrained TAG_OR_FILE` for its weights) or
a CLIP checkpoint folder written by `training.pretrain_clip`. --data: a folder holding this stage's
file (`vlm_pretrain.jsonl`; `vlm_sft.jsonl` for SFT) or a minimind-v `.jsonl` / `.parquet` or LLaVA
`.json` file; image paths are relative to --images (default: DATA/images).

The encoder is frozen, so its patch features are computed once into the feature cache
(`--feature-cache`, default DATA/feature_cache; `none` re-encodes every step) and read back in
every epoch and by the SFT stage. This module also holds what `training.sft_vlm` shares with it
(`run_vlm_stage`): the two stages differ only in data file and defaults.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import AutoConfig

from data.vlm_datasets import VLMDataset, open_source, vlm_collate
from training.cli import add_common_args, config_from_args
from training.lm_stage import resolve_data_file, supervised_head_loss, supervised_positions
from training.freeze import POLICIES, apply_freeze, trainable_predicate
from training.trainer import LossOutput, Trainer
from vlm import MiniMindForCausalLM
from vlm.configuration_vlm import IMAGE_ATTENTION, MiniMindVLMConfig, PROJECTOR_TYPES
from vlm.feature_cache import FeatureCache
from vlm.modeling_vlm import MiniMindVLM
from vlm.processor import VLMProcessor
from vlm.tokenizer import load_tokenizer
from vlm.vision import VisionEncoder

log = logging.getLogger(__name__)

STAGES = {  # per stage: default data file, freeze policy, and per-preset Trainer defaults
    "pretrain_vlm": dict(
        data_file="vlm_pretrain.jsonl", freeze="projector",
        presets={"micro": dict(max_steps=30, batch_size=8, lr=3e-3, warmup_steps=3),
                 # dtype `fast`: bf16 where the CPU has bf16 kernels (the pipeline's 800 steps: 74 s instead of 111 s)
                 "tiny": dict(max_steps=300, batch_size=16, lr=2e-3, warmup_steps=20, dtype="fast"),
                 "small": dict(epochs=1, batch_size=32, lr=1e-3, warmup_steps=100)}),
    "sft_vlm": dict(
        data_file="vlm_sft.jsonl", freeze="projector+first_last",
        presets={"micro": dict(max_steps=40, batch_size=8, lr=2e-3, warmup_steps=4),
                 # tiny: 3000 steps (with 9000 images, ~1.3 epochs of their 36k questions), not 2000: the VLM under-fits its own
                 # training questions; seed 42, one pretrained VLM: VQA 0.65 -> 0.693, unseen pairs 0.61 -> 0.71.
                 # A higher lr is worse held out: 2e-3 / 3e-3 gave VQA 0.62 / 0.55 (2026-12-05); so are batch 8 x 6000
                 # steps (0.65, 7.7 min), batch 32 x 1800 (0.633, 8.4 min) and a mix leaning to the hard kinds (0.68),
                 # though only the lr is clearly so: this recipe at --seed 1 / 2 gives 0.66 / 0.62 (unseen pairs 0.66 / 0.60).
                 # ema_decay 0.998 (the saved model is the weights' moving average) narrows that spread without moving
                 # its mean: SFT seeds 42 / 1 / 2 give VQA 0.68 / 0.65 / 0.65 (without: 0.693 / 0.66 / 0.617) and unseen
                 # pairs 0.67 / 0.66 / 0.64 (without: 0.71 / 0.66 / 0.60), means 0.66 / 0.66 either way.
                 # 2026-12-05, trimmed-text CLIP, seed 42 (0.673 with this preset): --dtype bf16 0.683 (unseen 0.72);
                 # rows of up to 4 questions about one image, the image computed once (exact, 1.25x a step; not kept),
                 # 6 rows x 4000 steps with bf16 + --compile in 6.1 min: 0.637 (unseen 0.64). Regularising for the unseen
                 # pairs does not help either: --weight-decay 0.1 0.66 (unseen 0.65), LM dropout 0.1 0.643 (unseen 0.65).
                 # With 36000 training images (data.scenes: 145k questions, each read at most once) more steps pay
                 # again: 4500 instead of 3000 gave VQA 0.692 vs 0.667 and unseen pairs 0.721 vs 0.683 (seed 42, all
                 # 600 held-out questions, 2026-12-05), for 2.1 more minutes. As data.scenes keeps them (the 9000 train images
                 # plus 27000 question-only ones, VLM pretraining unchanged): 0.667 / 0.691 against 0.632 / 0.656 before.
                 # dtype `fast` (bf16 where the CPU has bf16 kernels, fp32 elsewhere): this stage took 346 s in bf16 against
                 # 464-483 s in fp32; on the 2400-step CLIP, bf16 VLM stages gave VQA 0.773 / unseen pairs 0.805 (2026-12-06, seed 42).
                 # 7000 steps since the scenes' keyed answers and 8000 pair scenes (2026-12-06): the binding forms late.
                 # From scratch (seed 42) 4500 / 7000 steps gave VQA 0.777 / 0.818 (two-object questions 0.42 / 0.57);
                 # on runs/full_c25's pretrained VLM, 0.847 at 7000 (16000 pair scenes: 0.802 / 0.812 at 4500 / 7000).
                 # lr 5e-4 since 2026-12-07 (runs/ch42's data, from its pretrained VLM): VQA at seeds 42 / 1 / 2 0.870 /
                 # 0.843 / 0.852 against 0.848 / 0.818 / 0.858 at 1e-3 (mean 0.855 vs 0.842; counting 112 / 112 / 108 of
                 # 120 against 102 / 93 / 108); 2e-3 gave 0.732 at seed 42, 3e-4 0.828 / 0.855 / 0.857 (mean 0.847).
                 "tiny": dict(max_steps=7000, batch_size=16, lr=5e-4, warmup_steps=40, ema_decay=0.998, dtype="fast"),
                 "small": dict(epochs=2, batch_size=32, lr=3e-4, warmup_steps=100)}),
}
TEXT_BUDGET = 128  # default --max-len: the image tokens plus this many text tokens


def vlm_loss(model, batch: dict) -> LossOutput:
    """Summed next-token CE over supervised (assistant) tokens; images spliced in by the model."""
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values", "image_features")
              if batch.get(k) is not None}
    hidden, aux = model.hidden_states(inputs["input_ids"], inputs.get("attention_mask"), inputs.get("pixel_values"),
                                      inputs.get("image_features"), keep=supervised_positions(batch["labels"]).to(device))
    out = supervised_head_loss(model, hidden, batch["labels"], aux)
    out.metrics = {"images": float(len(inputs.get("image_features", inputs.get("pixel_values", ()))))}
    return out


# -- model -------------------------------------------------------------------------------------------
def load_encoder(vision: str, pretrained: str | None = None) -> VisionEncoder:
    """An open_clip name (+ optional tag/weights file) or a CLIP checkpoint folder."""
    if Path(vision).is_dir():
        return VisionEncoder.from_open_clip(pretrained=vision)
    return VisionEncoder.from_open_clip(vision, pretrained=pretrained)


def build_vlm(init: str, vision: str | None, vision_pretrained: str | None, projector: str,
              projector_positions: bool = False, projector_shuffle: int = 1,
              projector_norm: bool = False, projector_glance: bool = False,
              image_attention: str = "causal", vision_feature_layer: int | Sequence[int] = -1,
              cross_attention_layers: Sequence[int] = ()) -> MiniMindVLM:
    """Continue a MiniMind-V folder, or wrap an LM folder with the named encoder and a new projector."""
    config = AutoConfig.from_pretrained(init)
    if isinstance(config, MiniMindVLMConfig):
        if vision:
            log.warning("--init %s is already a VLM: its own encoder %s is kept, --vision %s ignored",
                        init, config.vision_model_name, vision)
        return MiniMindVLM.from_pretrained(init)
    if not vision:
        raise SystemExit(f"--init {init} is a language model: name the image encoder with --vision "
                         "(an open_clip name such as ViT-B-16, or a folder from training.pretrain_clip)")
    lm = MiniMindForCausalLM.from_pretrained(init)
    encoder = load_encoder(vision, vision_pretrained)
    encoder.feature_layer = vision_feature_layer
    return MiniMindVLM.from_lm(lm, encoder, projector,
                               vision_pretrained=vision_pretrained or (vision if Path(vision).is_dir() else None),
                               projector_positions=projector_positions, projector_shuffle=projector_shuffle,
                               projector_norm=projector_norm, projector_glance=projector_glance,
                               image_attention=image_attention, cross_attention_layers=list(cross_attention_layers))


# -- data --------------------------------------------------------------------------------------------
def build_dataset(model: MiniMindVLM, tokenizer, data_file: Path, images: str | None, cache_dir: str | None,
                  max_len: int, device: str = "cpu") -> VLMDataset:
    """The stage's dataset; with a cache dir the features are encoded now (on `device`) and reused."""
    source = open_source(data_file, images)
    encoder = model.vision
    if cache_dir is None:
        return VLMDataset(source, tokenizer, model.num_image_tokens, max_len, preprocess=encoder.preprocess)
    home = encoder.device
    cache = FeatureCache(cache_dir, encoder.to(device))
    try:
        return VLMDataset(source, tokenizer, model.num_image_tokens, max_len, feature_cache=cache)
    finally:
        encoder.to(home)
        cache.encoder = None  # training only reads features; keeps the encoder out of worker pickles


def encode_device(requested: str | None) -> str:
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


# -- CLI ---------------------------------------------------------------------------------------------
def build_parser(stage: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m training.{stage}", description=description)
    add_common_args(p)
    p.add_argument("--vision", help="open_clip model name or CLIP checkpoint folder (needed when --init is an LM)")
    p.add_argument("--vision-pretrained", help="open_clip pretrained tag or weights file for --vision NAME")
    p.add_argument("--vision-feature-layer", type=int, nargs="+", default=[-1],
                   help="for a new VLM: the encoder hidden state(s) used as patch tokens (-1 its output, -2 the "
                        "block before; several are concatenated)")
    p.add_argument("--projector", choices=PROJECTOR_TYPES, default="linear", help="for a new VLM (default: linear)")
    p.add_argument("--projector-positions", type=int, choices=(0, 1), default=0,
                   help="for a new VLM: 1 adds a learned embedding per patch slot to the projected features")
    p.add_argument("--projector-norm", type=int, choices=(0, 1), default=0,
                   help="for a new VLM: 1 puts an RMSNorm after the projection, at the LM's word-embedding scale")
    p.add_argument("--projector-glance", type=int, choices=(0, 1), default=0,
                   help="for a new VLM: 1 adds one image token, a linear map of the whole patch grid")
    p.add_argument("--projector-shuffle", type=int, default=1,
                   help="for a new VLM: pixel shuffle factor f; f x f neighbouring patches make one image token")
    p.add_argument("--image-attention", choices=IMAGE_ATTENTION, default="causal",
                   help="for a new VLM: bidirectional lets an image's tokens see each other (PaliGemma)")
    p.add_argument("--cross-attention-layers", type=int, nargs="*", default=[],
                   help="for a new VLM: decoder layers that get a cross-attention read-out into the image "
                        "tokens (Flamingo / Llama 3.2 Vision); trained under every freeze policy")
    p.add_argument("--freeze", choices=POLICIES, help=f"what trains (default: {STAGES[stage]['freeze']})")
    p.add_argument("--images", help="folder the image paths are relative to (default: DATA/images)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: --init)")
    p.add_argument("--max-len", type=int, help=f"tokens per sample (default: image tokens + {TEXT_BUDGET})")
    p.add_argument("--feature-cache", default=None,
                   help="feature cache folder (default: DATA/feature_cache); 'none': encode images every step")
    return p


def run_vlm_stage(stage: str, argv: list[str] | None, description: str,
                  extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
                  after: Callable[[argparse.Namespace, Path, dict], dict] | None = None,
                  prepare: Callable[[argparse.Namespace, Path], tuple[Path, int]] | None = None) -> dict:
    """Parse the flags, build model + dataset, train; `after(args, data_file, summary)` may add results.

    `prepare(args, data_file)` may return a rewritten training file and the extra text tokens its
    samples need; images and the feature cache are still found beside the original data file."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    spec = STAGES[stage]
    parser = build_parser(stage, description)
    if extra_args is not None:
        extra_args(parser)
    known, _ = parser.parse_known_args(argv)
    preset = known.preset or "tiny"
    if preset not in spec["presets"]:
        raise SystemExit(f"unknown preset {preset!r}; choose one of {sorted(spec['presets'])}")
    parser.set_defaults(**spec["presets"][preset], freeze=spec["freeze"])
    args = parser.parse_args(argv)
    if not args.init:
        raise SystemExit("--init is required: an LM checkpoint folder (or a MiniMind-V folder)")

    torch.manual_seed(args.seed)
    model = build_vlm(args.init, args.vision, args.vision_pretrained, args.projector, bool(args.projector_positions),
                      args.projector_shuffle, bool(args.projector_norm), bool(args.projector_glance),
                      args.image_attention, args.vision_feature_layer, args.cross_attention_layers)
    tok_dir = Path(args.tokenizer or args.init)
    tokenizer = load_tokenizer(tok_dir)
    data_file = resolve_data_file(args.data, spec["data_file"])
    cache_dir = None if (args.feature_cache or "").lower() == "none" else \
        (args.feature_cache or str(data_file.parent / "feature_cache"))
    images = args.images or str(data_file.parent / "images" if (data_file.parent / "images").is_dir() else data_file.parent)
    train_file, extra_text = prepare(args, data_file) if prepare is not None else (data_file, 0)
    max_len = args.max_len or model.num_image_tokens + TEXT_BUDGET + extra_text
    dataset = build_dataset(model, tokenizer, train_file, images, cache_dir, max_len, encode_device(args.device))
    apply_freeze(model, args.freeze)
    n_train = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    print(json.dumps({"stage": stage, "freeze": args.freeze, "trainable_params": n_train,
                      "total_params": sum(p.numel() for p in model.parameters()), "samples": len(dataset),
                      "skipped": len(dataset.skipped), "image_tokens": model.num_image_tokens,
                      "feature_cache": str(dataset.cache.dir) if dataset.cache else None}))
    processor = VLMProcessor.from_config(model.config, tokenizer)

    def save(m, out_dir):
        m = getattr(m, "module", m)
        m.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)

    trainer = Trainer(model, dataset, vlm_collate, vlm_loss, config_from_args(args),
                      trainable=trainable_predicate(args.freeze, model.config.num_hidden_layers), save_fn=save)
    summary = trainer.train()
    return after(args, data_file, summary) if after is not None else summary


def main(argv: list[str] | None = None) -> dict:
    return run_vlm_stage("pretrain_vlm", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main(sys.argv[1:])
