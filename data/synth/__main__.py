"""`python -m data.synth --out DIR [--seed S] [--scale micro|tiny|small]`: write the synthetic world."""
from __future__ import annotations

import argparse
import json

from data.synth import generate
from data.synth.scales import SCALES


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data.synth", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    args = p.parse_args(argv)
    manifest = generate(args.out, args.seed, args.scale)
    print(json.dumps(manifest, indent=2))
    return manifest


if __name__ == "__main__":
    main()
