"""A seeded, bilingual (English/Chinese) fictional world in the MiniMind file formats.

`python -m data.synth --out DIR [--seed S] [--scale micro|tiny|small]` writes:

| file | format | what |
| --- | --- | --- |
| `pretrain.jsonl` | `{"text"}` | entity descriptions in varied phrasings/orders + training Q/A as text |
| `sft.jsonl` | `{"conversations"}` | closed-book QA, context QA (incl. not in the passage), multi-turn, descriptions |
| `dpo.jsonl` | `{"chosen", "rejected"}` | correct vs wrong / rambling / hallucinated answers |
| `eval/lm_heldout.jsonl` | `{"text", "lang"}` | documents never in pretrain (perplexity) |
| `eval/closed_qa.jsonl`, `eval/context_qa.jsonl` | `{"messages", "answer", "lang", "type"}` | held-out questions |
| `eval/dpo.jsonl` | `{"chosen", "rejected"}` | held-out preference pairs |
| `world.json`, `manifest.json` | | the entities and the held-out split; seed, scale, row counts |

Layout: `world.py` (entities + split) -> `items.py` (renderings, using `language.py`) -> `writers/`
(one module per task). Same seed and scale -> byte-identical files.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from data.synth.scales import get_scale
from data.synth.world import build_world
from data.synth.writers import WRITERS

FORMAT_VERSION = 1


def _dump(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def generate(out: str | Path, seed: int = 42, scale: str = "tiny") -> dict:
    """Write the world to `out`; returns the manifest (also written to out/manifest.json)."""
    out = Path(out)
    sc = get_scale(scale)
    world = build_world(seed, scale, sc)
    files: dict[str, list[dict]] = {}
    for write in WRITERS:
        for rel, rows in write(world, sc, seed).items():
            files.setdefault(rel, []).extend(rows)
    out.mkdir(parents=True, exist_ok=True)
    for rel, rows in sorted(files.items()):
        # Shuffled so that the first N lines of any file mix tasks and languages (eval --limit reads a prefix).
        random.Random(f"shuffle-{seed}-{rel}").shuffle(rows)
        _dump(out / rel, rows)
    (out / "world.json").write_text(json.dumps(world.to_json(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    manifest = {"format_version": FORMAT_VERSION, "seed": seed, "scale": scale,
                "files": {rel: len(rows) for rel, rows in sorted(files.items())},
                "entities": len(world.entities), "closed_eval_facts": len(world.closed_eval)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
