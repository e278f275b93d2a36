"""`python -m data.synth --out DIR [--seed S] [--scale micro|tiny|small] [--parts world,scenes,posttrain] [--no-images]`.

world:     entities, pretrain documents, SFT instructions, preference pairs, held-out eval splits (DIR/)
scenes:    rendered images with captions and VQA for CLIP and the VLM stages (DIR/scenes/)
posttrain: LoRA new-domain facts, preference pairs, reasoning traces, verifiable questions (DIR/posttrain/)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from data.synth import generate
from data.synth.scales import SCALES

PARTS = ("world", "scenes", "posttrain")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data.synth", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    p.add_argument("--no-images", action="store_true",
                   help="scenes: captions and questions only; render the images later (only the vision stages need them)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"--parts: unknown part(s) {sorted(unknown)}; choose from {','.join(PARTS)}")
    manifest: dict = {}
    if "world" in parts:
        manifest = generate(args.out, args.seed, args.scale)
    if "scenes" in parts:
        from data.scenes import write_scene_splits
        manifest["scenes"] = write_scene_splits(Path(args.out) / "scenes", seed=args.seed, scale=args.scale,
                                                images=not args.no_images)
    if "posttrain" in parts:  # reads the world's entities, so it comes after it
        from data.synth_posttrain import write_posttrain_splits
        manifest["posttrain"] = write_posttrain_splits(args.out, args.seed, args.scale)
    print(json.dumps(manifest, indent=2, ensure_ascii=False))
    return manifest


if __name__ == "__main__":
    main()
