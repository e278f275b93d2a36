"""Loader memory does not grow with file size: PretrainDataset on a 10 MB vs a 1 GB pretrain jsonl.

`python bench/bench_loader_memory.py [--big-mb 1024] [--items 300] [--keep DIR]`

Writes both files (lines of ~1 KB, synthetic-world text) to a temporary folder, then, in a fresh
subprocess per file (peak RSS cannot be reset inside one process), builds `PretrainDataset`, reads
`--items` random items and reports the peak RSS. Prints JSON with both peaks and the difference
(acceptance: < 200 MB extra for 1 GB). The temporary folder is deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL_MB = 10


def write_pretrain(path: Path, size_mb: int, seed: int = 0) -> int:
    """A pretrain jsonl of about size_mb MB; lines of 2-10 world documents (~1 KB). Returns the line count."""
    from data.synth.items import document
    from data.synth.scales import get_scale
    from data.synth.world import build_world

    world = build_world(seed, "tiny", get_scale("tiny"))
    rng = random.Random(seed)
    docs = [document(e, lang, rng) for e in world.entities for lang in ("en", "zh") for _ in range(3)]
    block = []
    for _ in range(4000):  # ~4 MB of distinct lines, repeated; the index does not care about repeats
        text = " ".join(rng.sample(docs, rng.randint(2, 10)))
        block.append(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    data = "".join(block).encode("utf-8")
    target, written, lines = size_mb * 1024 * 1024, 0, 0
    with open(path, "wb") as fh:
        while written < target:
            fh.write(data)
            written += len(data)
            lines += len(block)
    return lines


def measure(path: str, tokenizer_dir: str, items: int, max_len: int) -> dict:
    """Runs in the child process: index the file, read random items, report peak RSS."""
    from data.datasets import PretrainDataset
    from vlm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    ds = PretrainDataset(path, tok, max_len)
    t_index = time.perf_counter() - t0
    rng = random.Random(0)
    t0 = time.perf_counter()
    n_tokens = sum(len(ds[rng.randrange(len(ds))]["input_ids"]) for _ in range(items))
    t_items = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"records": len(ds), "index_s": round(t_index, 2), "items_per_s": round(items / t_items, 1),
            "tokens_read": n_tokens, "peak_rss_mb": round(peak / 1024, 1),
            "rss_before_dataset_mb": round(base / 1024, 1)}


def run_child(path: Path, tok_dir: Path, items: int, max_len: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--tokenizer", str(tok_dir), "--items", str(items),
           "--max-len", str(max_len)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--big-mb", type=int, default=1024)
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.tokenizer, args.items, args.max_len)))
        return {}

    from training.train_tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        tmp = Path(tmp)
        small, big = tmp / "small.jsonl", tmp / "big.jsonl"
        write_pretrain(small, SMALL_MB)
        t0 = time.perf_counter()
        write_pretrain(big, args.big_mb)
        t_write = time.perf_counter() - t0
        with open(small, encoding="utf-8") as fh:
            sample = [json.loads(next(fh))["text"] for _ in range(2000)]
        train_tokenizer(sample, tmp / "tok", vocab_size=2048)
        res_small = run_child(small, tmp / "tok", args.items, args.max_len)
        res_big = run_child(big, tmp / "tok", args.items, args.max_len)
        sizes = {"small_mb": round(small.stat().st_size / 2**20, 1), "big_mb": round(big.stat().st_size / 2**20, 1)}
    report = {
        "bench": "loader_memory", **sizes, "write_big_s": round(t_write, 1),
        "small": res_small, "big": res_big,
        "extra_peak_rss_mb": round(res_big["peak_rss_mb"] - res_small["peak_rss_mb"], 1),
        "target_extra_mb": 200,
    }
    report["ok"] = report["extra_peak_rss_mb"] < 200
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
