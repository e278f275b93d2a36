"""How much can GRPO gain from a model? `python -m training.grpo_headroom --data WORLD --init DIR [-k 8]`.

GRPO sharpens what a policy's own samples already get right; it does not teach a skill that no
sample shows. So before (or instead of) an RL run, measure on the held-out verifiable questions
(`grpo_eval` + `reason_eval`, the ones `training.posttrain_pipeline` scores GRPO on), per finer kind
(`data.synth_posttrain.question_kind`):

- `greedy`: exact match of greedy answers (what the GRPO figure scores);
- `sampled`: mean exact match of k answers sampled at `--temperature` (GRPO's objective);
- `pass@k`: share of questions at least one of the k samples answers right;
- passage questions also get `guess`, the exact match of a random pick among the passage's values of
  the asked attribute (`data.synth_posttrain.passage_options`), and `sampled_given_option`, the share
  of sampled answers naming one of those values that name the right one. When that is no better
  than `guess` the policy does not read the passage: the samples that are right are lucky picks,
  and rewarding them teaches no lookup.

Two ceilings of the greedy exact match follow: `pass@k` (every question some sample solves becomes
right: the usual loose bound of sharpening) and `no_lookup` (the same for arithmetic, passage
questions of each kind at the better of its greedy rate and `guess`: what is left if the lookup does
not form). Each is also given as the GRPO reward, `(1 - w) * EM + w * format`, with every answer
well formatted.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from data.synth_posttrain import passage_options, question_kind
from training.evaluate import normalize_answer
from training.posttrain_pipeline import generate_texts, grpo_heldout_items, load_init
from training.rewards import answer_reward, extract_answer, format_reward


def headroom(model, tokenizer, items: list[dict], k: int = 8, temperature: float = 1.0, seed: int = 0,
             max_new_tokens: int = 96, format_weight: float = 0.2) -> dict:
    """Per-kind and overall figures (see the module docstring) for `items` ({"messages", "answer", "kind"})."""
    if not items:
        raise ValueError("no held-out items to measure")
    greedy = generate_texts(model, tokenizer, items, max_new_tokens)
    sampled = generate_texts(model, tokenizer, [it for it in items for _ in range(k)], max_new_tokens, temperature, seed)
    return headroom_from_texts(items, greedy, sampled, k, temperature, format_weight)


def headroom_from_texts(items: list[dict], greedy: list[str], sampled: list[str], k: int, temperature: float = 1.0,
                        format_weight: float = 0.2) -> dict:
    """The figures from one greedy answer and k sampled answers per item (`sampled` item-major)."""
    if len(greedy) != len(items) or len(sampled) != k * len(items):
        raise ValueError(f"{len(items)} items need {len(items)} greedy and {k * len(items)} sampled answers, "
                         f"got {len(greedy)} and {len(sampled)}")
    rows: dict[str, list[dict]] = defaultdict(list)
    for i, it in enumerate(items):
        question = it["messages"][-1]["content"]
        draws = sampled[i * k:(i + 1) * k]
        right = [answer_reward(t, it["answer"]) for t in draws]
        row = {"greedy": answer_reward(greedy[i], it["answer"]), "format": format_reward(greedy[i]),
               "sampled": sum(right) / k, "pass": max(right)}
        if it["kind"] == "passage":
            options = [normalize_answer(o) for o in passage_options(question)]
            row["guess"] = options.count(normalize_answer(it["answer"])) / len(options)
            named = [r for t, r in zip(draws, right) if normalize_answer(extract_answer(t)) in options]
            row["named"], row["named_right"] = len(named), sum(named)
        rows[question_kind(question, it["kind"])].append(row)

    def summary(group: list[dict]) -> dict:
        n = len(group)
        out = {"n": n, **{key: sum(r[key] for r in group) / n for key in ("greedy", "sampled", "pass")}}
        out["no_lookup"] = out["pass"]
        if all("guess" in r for r in group):
            named = sum(r["named"] for r in group)
            out["guess"] = sum(r["guess"] for r in group) / n
            out["sampled_given_option"] = sum(r["named_right"] for r in group) / named if named else None
            # per kind, not per question: a question the greedy answer got right by a lucky pick is no skill
            out["no_lookup"] = max(out["greedy"], out["guess"])
        return out

    kinds = {name: summary(group) for name, group in sorted(rows.items())}
    every = [r for group in rows.values() for r in group]
    total = summary(every)
    total["no_lookup"] = sum(s["n"] * s["no_lookup"] for s in kinds.values()) / len(every)
    w = format_weight
    result = {"k": k, "temperature": temperature, "kinds": kinds,
              "all": total,
              "reward_greedy": sum((1 - w) * r["greedy"] + w * r["format"] for r in every) / len(every),
              "reward_ceiling_pass_at_k": (1 - w) * total["pass"] + w,
              "reward_ceiling_no_lookup": (1 - w) * total["no_lookup"] + w}
    result["gain_ceiling_pts"] = {name: 100 * (result[f"reward_ceiling_{name}"] - result["reward_greedy"])
                                  for name in ("pass_at_k", "no_lookup")}
    return result


def format_table(result: dict) -> str:
    lines = [f"| kind | n | greedy | sampled (T={result['temperature']:g}) | pass@{result['k']} | guess | "
             "sampled, given a passage value |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in [*result["kinds"].items(), ("all", result["all"])]:
        guess = f"{s['guess']:.3f}" if "guess" in s else ""
        given = f"{s['sampled_given_option']:.3f}" if s.get("sampled_given_option") is not None else ""
        lines.append(f"| {name} | {s['n']} | {s['greedy']:.3f} | {s['sampled']:.3f} | {s['pass']:.3f} | {guess} | {given} |")
    gain = result["gain_ceiling_pts"]
    lines.append(f"\nGRPO reward, greedy: {result['reward_greedy']:.4f}; ceilings: pass@{result['k']} "
                 f"{result['reward_ceiling_pass_at_k']:.4f} (+{gain['pass_at_k']:.1f} pts), no lookup "
                 f"{result['reward_ceiling_no_lookup']:.4f} (+{gain['no_lookup']:.1f} pts)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m training.grpo_headroom", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="world folder (its posttrain/grpo_eval.jsonl and reason_eval.jsonl)")
    p.add_argument("--init", required=True, help="model folder (the GRPO starting point: the reasoning model)")
    p.add_argument("-k", "--samples", type=int, default=8, help="answers sampled per question")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (GRPO's: 1.0)")
    p.add_argument("--limit", type=int, default=None, help="questions per held-out file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.samples < 1 or args.temperature <= 0:
        p.error("--samples must be >= 1 and --temperature > 0")
    world = Path(args.data)
    items = grpo_heldout_items(world, args.limit)
    if not items:
        p.error(f"--data {world}: no posttrain/grpo_eval.jsonl or reason_eval.jsonl (see data.synth_posttrain)")
    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_init(args.init)
    result = headroom(model, tokenizer, items, args.samples, args.temperature, args.seed)
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
