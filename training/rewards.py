"""Rule-based rewards for GRPO and the format metrics of reasoning distillation.

No reward model: the synthetic questions are verifiable (arithmetic, a fact stated in a passage),
so the reward is whether the answer is exactly right, plus whether the response follows the
`<think>...</think><answer>...</answer>` format. Rules cannot be reward-hacked by style the way a
small learned reward model can.
"""
from __future__ import annotations

import re

from training.evaluate import normalize_answer

THINK_ANSWER = re.compile(r"^\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*$", re.S)
_ANSWER = re.compile(r"<answer>(?P<answer>.*?)</answer>", re.S)


def follows_format(text: str) -> bool:
    """Exactly one think block then one answer block, nothing else around them."""
    m = THINK_ANSWER.match(text)
    return m is not None and "<think>" not in m["think"] and "<answer>" not in m["answer"]


def extract_answer(text: str) -> str:
    """The content of the first `<answer>` block; the whole text when there is none (plain SFT style)."""
    m = _ANSWER.search(text)
    if m:
        return m["answer"]
    return text.split("</think>")[-1] if "</think>" in text else text


def answer_reward(text: str, answer: str) -> float:
    """1.0 when the extracted answer equals the reference after normalisation, else 0.0."""
    return float(normalize_answer(extract_answer(text)) == normalize_answer(answer))


def format_reward(text: str) -> float:
    return float(follows_format(text))


def total_reward(text: str, answer: str, format_weight: float = 0.2) -> float:
    """In [0, 1]: (1 - w) * correct + w * well-formatted. Correctness dominates so that a model
    cannot reach a high reward by format alone."""
    return (1.0 - format_weight) * answer_reward(text, answer) + format_weight * format_reward(text)
