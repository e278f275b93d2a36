"""VLM supervised fine-tuning on image questions and answers, then held-out VQA exact match.

`python -m training.sft_vlm --data DIR_OR_FILE --out DIR --init VLM_OR_LM_DIR
 [--freeze projector+first_last] [--eval-n 200] ...`

Same flags as `training.pretrain_vlm` (this stage is that one with `vlm_sft.jsonl` and the
`projector+first_last` freeze policy by default; the feature cache written there is reused here).
After training, `--eval-n` questions of DATA/eval/vqa.jsonl (held-out scenes, some with unseen
attribute combinations) are answered greedily and scored by exact match: `OUT/vqa.json` holds
`vlm.vqa_acc`, and the same per question type, per language and on unseen combinations.

`--turns-per-image N` (N > 1, a .jsonl DATA) trains on multi-turn conversations holding up to N
questions about the same image (`data.vlm_datasets.group_by_image`), written to
`OUT/vlm_sft_grouped.jsonl`: each forward pass then supervises several answers, not one.
Evaluation still asks one question per image.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

from data.vlm_datasets import group_by_image
from training.evaluate import normalize_answer
from training.pretrain_vlm import run_vlm_stage
from vlm.modeling_vlm import MiniMindVLM
from vlm.processor import VLMProcessor
from vlm.tokenizer import EOS_ID


def _prompt_of(row: dict) -> list[dict]:
    """The conversation up to (without) its last assistant answer."""
    turns = row["conversations"]
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    return turns[:last]


@torch.inference_mode()
def evaluate_vqa(model: MiniMindVLM, processor: VLMProcessor, rows: list[dict], image_root: Path,
                 batch_size: int = 16, max_new_tokens: int = 16) -> tuple[dict[str, float], list[dict]]:
    """Greedy answers to `rows` (`conversations` + `image` + `answer` [+ `type`, `lang`, `unseen_combo`]).

    Returns flat metrics (`vlm.vqa_acc`, `vlm.vqa_acc.type.<t>`, `vlm.vqa_acc.lang.<l>`, per scene
    `vlm.vqa_acc.kind.<k>` where rows say their `kind`, `vlm.vqa_acc.unseen_combo`, `vlm.vqa_n`) and the
    per-question samples.
    """
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    samples = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = processor(messages=[_prompt_of(r) for r in chunk],
                          images=[[image_root / p.strip() for p in r["image"].split(",")] for r in chunk])
        device = next(model.parameters()).device
        new = model.fast_generate(batch["input_ids"].to(device), pixel_values=batch["pixel_values"].to(device),
                                  attention_mask=batch["attention_mask"].to(device),
                                  max_new_tokens=max_new_tokens, eos_token_id=EOS_ID)
        for row, ids in zip(chunk, new.tolist()):
            ids = ids[:ids.index(EOS_ID)] if EOS_ID in ids else ids
            output = processor.decode(ids)
            ok = normalize_answer(output) == normalize_answer(row["answer"])
            groups = ["all", f"type.{row.get('type', 'unknown')}", f"lang.{row.get('lang', 'unknown')}"]
            if row.get("kind"):  # the scene's kind: two-object scenes are where attribute binding is tested
                groups.append(f"kind.{row['kind']}")
            if row.get("unseen_combo"):
                groups.append("unseen_combo")
            for g in groups:
                hits[g].append(ok)
            samples.append({"question": row["conversations"][-2]["content"], "answer": row["answer"],
                            "output": output, "correct": ok, "type": row.get("type"), "kind": row.get("kind"),
                            "lang": row.get("lang"),
                            "unseen_combo": bool(row.get("unseen_combo"))})
    metrics = {"vlm.vqa_acc" if g == "all" else f"vlm.vqa_acc.{g}": round(sum(v) / len(v), 4)
               for g, v in sorted(hits.items())}
    metrics["vlm.vqa_n"] = len(rows)
    return metrics, samples


def read_vqa(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


# per preset: questions about one image per training conversation (1: one question per sample).
# tiny measured 8 below 1: VQA 0.44 (1400 steps, lr 2e-3) and 0.43 (500 steps, twins together) vs 0.48
TURNS_PER_IMAGE = {"micro": 1, "tiny": 1, "small": 1}
TURN_BUDGET = 48  # text tokens per extra question turn (the longest tiny scene Q+A is 42 with the Han-split tokenizer)


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-n", type=int, default=200,
                        help="held-out VQA questions (DATA/eval/vqa.jsonl) answered after training (0: skip)")
    parser.add_argument("--turns-per-image", type=int, default=None,
                        help="up to N questions about one image per training conversation "
                             f"(default per preset: {TURNS_PER_IMAGE})")


def _grouped_data(args: argparse.Namespace, data_file: Path) -> tuple[Path, int]:
    """With --turns-per-image N > 1: the data grouped by image, written to OUT, and the text room the
    extra turns need (or the later answers would be cut off); else the data file unchanged."""
    turns = args.turns_per_image or TURNS_PER_IMAGE.get(args.preset or "tiny", 1)
    if turns <= 1:
        return data_file, 0
    if data_file.suffix != ".jsonl":
        raise SystemExit(f"--turns-per-image needs a .jsonl data file, got {data_file}")
    rows = [json.loads(line) for line in data_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    grouped = Path(args.out) / "vlm_sft_grouped.jsonl"
    grouped.parent.mkdir(parents=True, exist_ok=True)
    tmp = grouped.with_name(f"{grouped.name}.{os.getpid()}.tmp")  # DDP ranks each write, none reads a torn file
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in group_by_image(rows, turns)),
                   encoding="utf-8")
    os.replace(tmp, grouped)
    return grouped, TURN_BUDGET * (turns - 1)


def _evaluate_after(args: argparse.Namespace, data_file: Path, summary: dict) -> dict:
    vqa_file, out = data_file.parent / "eval" / "vqa.jsonl", Path(args.out)
    is_main = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                   and torch.distributed.get_rank() != 0)
    if not (is_main and args.eval_n > 0 and vqa_file.is_file() and (out / "config.json").is_file()):
        return summary
    model = MiniMindVLM.from_pretrained(out)
    processor = VLMProcessor.from_pretrained(out)
    image_root = Path(args.images) if args.images else data_file.parent / "images"
    metrics, samples = evaluate_vqa(model, processor, read_vqa(vqa_file, args.eval_n), image_root)
    (out / "vqa.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    with open(out / "vqa_samples.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    print(json.dumps(metrics))
    return {**summary, **metrics}


def main(argv: list[str] | None = None) -> dict:
    return run_vlm_stage("sft_vlm", argv, __doc__.splitlines()[0], extra_args=_add_flags, after=_evaluate_after,
                         prepare=_grouped_data)


if __name__ == "__main__":
    main(sys.argv[1:])
