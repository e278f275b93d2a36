"""Held-out evaluation of a language model: `python -m training.evaluate --model DIR --data DIR`.

Prints one JSON object with flat metric names (`lm.ppl`, `lm.context_qa_em`, `lm.closed_qa_em`,
`lm.format_ok`, each also per language as `...{.en,.zh}`), reading the synthetic world's
`eval/lm_heldout.jsonl`, `eval/context_qa.jsonl` and `eval/closed_qa.jsonl`. For a MiniMind-V
checkpoint and a scenes folder: VQA exact match (`vlm.vqa_acc`, per question type and language, and
on attribute combinations unseen in training) from `eval/vqa.jsonl`.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlm import MiniMindForCausalLM
from vlm.generation import fast_generate
from vlm.tokenizer import BOS_TOKEN, EOS_ID, EOS_TOKEN, PAD_ID, load_tokenizer, render_chat

_CJK = re.compile(r"[\u4e00-\u9fff]")
_EDGE_PUNCT = " \t\n\"'“”‘’「」《》.。!！?？,，;；:："


def language_of(text: str) -> str:
    return "zh" if _CJK.search(text) else "en"


def normalize_answer(text: str) -> str:
    """Lower-case, collapse spaces, drop quotes and punctuation at the ends (both languages)."""
    return re.sub(r"\s+", " ", text.strip(_EDGE_PUNCT).lower())


def runaway_repetition(ids: list[int], n: int = 3, limit: int = 4) -> bool:
    """True when some n-gram occurs `limit` or more times: the classic small-model loop."""
    grams = Counter(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
    return bool(grams) and max(grams.values()) >= limit


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


@torch.inference_mode()
def perplexity(model, tokenizer, texts: list[str], max_len: int = 512, batch_size: int = 16) -> dict[str, float]:
    """exp(mean next-token NLL) over documents, overall and per language."""
    nll, count = defaultdict(float), defaultdict(int)
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        enc = [tokenizer(BOS_TOKEN + t + EOS_TOKEN, add_special_tokens=False).input_ids[:max_len] for t in chunk]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), PAD_ID)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(enc):
            ids[r, :len(e)], mask[r, :len(e)] = torch.tensor(e), 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * mask[:, 1:]
        for r, t in enumerate(chunk):
            for key in ("all", language_of(t)):
                nll[key] += losses[r].sum().item()
                count[key] += int(mask[r, 1:].sum())
    return {k: math.exp(nll[k] / count[k]) for k in nll}


@torch.inference_mode()
def generate_answers(model, tokenizer, items: list[dict], max_new_tokens: int = 48, batch_size: int = 16,
                     temperature: float = 0.0, generator: torch.Generator | None = None) -> list[list[int]]:
    """Answers (token ids, up to and including the end token) for each item's `messages`: greedy, or
    sampled at `temperature` > 0 (from `generator`, for a reproducible draw)."""
    outputs = []
    for i in tqdm(range(0, len(items), batch_size), desc="generate", leave=False):
        prompts = [tokenizer(render_chat(it["messages"], add_generation_prompt=True), add_special_tokens=False).input_ids
                   for it in items[i:i + batch_size]]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), PAD_ID)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
        new = fast_generate(model, ids, max_new_tokens, attention_mask=mask, eos_token_id=EOS_ID,
                            temperature=temperature, generator=generator)
        for row in new.tolist():
            end = row.index(EOS_ID) + 1 if EOS_ID in row else len(row)
            outputs.append(row[:end])
    return outputs


def qa_metrics(name: str, items: list[dict], generations: list[list[int]], tokenizer) -> dict[str, float]:
    """Exact match and format adherence, overall and per language."""
    hits, fmt, n = defaultdict(int), defaultdict(int), defaultdict(int)
    for it, ids in zip(items, generations):
        text = tokenizer.decode([t for t in ids if t != EOS_ID], skip_special_tokens=True)
        ok_format = bool(ids) and ids[-1] == EOS_ID and not runaway_repetition(ids)
        match = normalize_answer(text) == normalize_answer(it["answer"])
        for key in ("", "." + it.get("lang", language_of(it["answer"]))):
            n[key] += 1
            hits[key] += match
            fmt[key] += ok_format
    out = {f"lm.{name}_em{k}": hits[k] / n[k] for k in n}
    out |= {f"lm.{name}_format_ok{k}": fmt[k] / n[k] for k in n}
    return out


def evaluate(model_dir: str | Path, data_dir: str | Path, limit: int | None = None,
             max_new_tokens: int = 48, samples_out: Path | None = None,
             tasks: tuple[str, ...] = ("ppl", "context_qa", "closed_qa")) -> dict[str, float]:
    model = MiniMindForCausalLM.from_pretrained(str(model_dir)).eval()
    tokenizer = load_tokenizer(model_dir)
    eval_dir = Path(data_dir) / "eval"
    metrics: dict[str, float] = {}
    heldout = eval_dir / "lm_heldout.jsonl"
    if "ppl" in tasks and heldout.is_file():
        ppl = perplexity(model, tokenizer, [r["text"] for r in read_jsonl(heldout, limit)])
        metrics |= {("lm.ppl" if k == "all" else f"lm.ppl.{k}"): v for k, v in ppl.items()}
    samples = []
    fmt_total, fmt_n = 0.0, 0
    for name in (t for t in tasks if t != "ppl"):
        path = eval_dir / f"{name}.jsonl"
        if not path.is_file():
            continue
        items = read_jsonl(path, limit)
        gens = generate_answers(model, tokenizer, items, max_new_tokens)
        m = qa_metrics(name, items, gens, tokenizer)
        metrics |= m
        fmt_total += m[f"lm.{name}_format_ok"] * len(items)
        fmt_n += len(items)
        samples += [{"set": name, "prompt": it["messages"][-1]["content"], "answer": it["answer"],
                     "output": tokenizer.decode(g, skip_special_tokens=True)} for it, g in zip(items, gens)]
    if fmt_n:
        metrics["lm.format_ok"] = fmt_total / fmt_n
    if samples_out is not None:
        with open(samples_out, "w", encoding="utf-8") as fh:
            for s in samples:
                fh.write(json.dumps(s, ensure_ascii=False) + "\n")
    return dict(sorted(metrics.items()))


def is_vlm_checkpoint(model_dir: str | Path) -> bool:
    config = Path(model_dir) / "config.json"
    return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("model_type") == "minimind-v"


def evaluate_vlm(model_dir: str | Path, data_dir: str | Path, limit: int | None = None,
                 samples_out: Path | None = None) -> dict[str, float]:
    """VQA exact match on DATA/eval/vqa.jsonl (images under DATA/images), overall, per type and language."""
    from training.sft_vlm import evaluate_vqa, read_vqa
    from vlm import MiniMindVLM, VLMProcessor

    vqa = Path(data_dir) / "eval" / "vqa.jsonl"
    if not vqa.is_file():
        raise SystemExit(f"--data: {vqa} does not exist (a scenes folder written by data.scenes_render)")
    model = MiniMindVLM.from_pretrained(str(model_dir)).eval()
    metrics, samples = evaluate_vqa(model, VLMProcessor.from_pretrained(str(model_dir)), read_vqa(vqa, limit),
                                    Path(data_dir) / "images")
    if samples_out is not None:
        with open(samples_out, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint folder (model + tokenizer); a MiniMind-V folder gets VQA")
    p.add_argument("--data", required=True, help="synthetic world folder (with eval/), or a scenes folder for a VLM")
    p.add_argument("--limit", type=int, default=None, help="at most this many items per eval file")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--samples", type=Path, default=None, help="write prompts, answers and outputs here (jsonl)")
    args = p.parse_args(argv)
    if is_vlm_checkpoint(args.model):
        metrics = evaluate_vlm(args.model, args.data, args.limit, args.samples)
    else:
        metrics = evaluate(args.model, args.data, args.limit, args.max_new_tokens, args.samples)
    print(json.dumps(metrics, indent=2, ensure_ascii=False))
    return metrics


if __name__ == "__main__":
    main()
