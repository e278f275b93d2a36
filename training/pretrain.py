"""Pretraining: next-token prediction on `{"text": ...}` jsonl.

`python -m training.pretrain --data DIR_OR_FILE --out DIR [--preset tiny] [--init DIR] ...`
(a folder as --data means DIR/pretrain.jsonl with the tokenizer in DIR/tokenizer).
"""
from __future__ import annotations

from data.datasets import PretrainDataset
from training.lm_stage import run_lm_stage


def main(argv: list[str] | None = None) -> dict:
    return run_lm_stage("pretrain", PretrainDataset, "pretrain.jsonl", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
