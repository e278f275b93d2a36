"""Drawing the scene images: one process (what `data.scenes` did) vs a pool over the CPU's cores.

`python bench/bench_scene_render.py [--images 8000] [--rounds 3] [--size 64]`

Samples `--images` training scenes of every kind (`data.scenes.sample_scene`, `TRAIN_KIND_WEIGHTS`),
then times drawing and saving them as PNGs into a temporary folder, by `_render_batch` in this
process (`serial`) and by `_render_all` (`pool`, what `write_scene_splits` now does). Contenders take
turns (the order rotates each round); each reports its median seconds, and the speedup is the median
of per-round ratios. Checks that both write byte-identical files. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from data.scenes import TRAIN_KIND_WEIGHTS, _kinds, _render_all, _render_batch, sample_scene, usable_cores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    rng = random.Random(0)
    scenes = [sample_scene(rng, "train", kind) for kind in _kinds(args.images, rng, TRAIN_KIND_WEIGHTS)]
    times: dict[str, list[float]] = {"serial": [], "pool": []}
    with tempfile.TemporaryDirectory() as tmp:
        def run(name: str) -> float:
            folder = Path(tmp) / name
            folder.mkdir(exist_ok=True)
            jobs = [(s, folder / f"{i:06d}.png") for i, s in enumerate(scenes)]
            t = time.perf_counter()
            (_render_batch if name == "serial" else _render_all)(jobs, args.size)
            return time.perf_counter() - t

        names = list(times)
        for r in range(args.rounds):
            for name in names[r % 2:] + names[:r % 2]:
                times[name].append(run(name))
        same = all((Path(tmp) / "serial" / f).read_bytes() == (Path(tmp) / "pool" / f).read_bytes()
                   for f in os.listdir(Path(tmp) / "serial"))
    print(json.dumps({
        "images": args.images, "size": args.size, "cores": usable_cores(),
        "serial_s": round(statistics.median(times["serial"]), 2), "pool_s": round(statistics.median(times["pool"]), 2),
        "speedup": round(statistics.median(s / p for s, p in zip(times["serial"], times["pool"])), 2),
        "identical_files": same}))


if __name__ == "__main__":
    main()
