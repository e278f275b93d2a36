"""Supervised fine-tuning on `{"conversations": [...]}` jsonl; only assistant tokens are supervised.

`python -m training.sft --data DIR_OR_FILE --out DIR --init PRETRAINED_DIR [--preset tiny] ...`
"""
from __future__ import annotations

from data.datasets import SFTDataset
from training.lm_stage import run_lm_stage


def main(argv: list[str] | None = None) -> dict:
    return run_lm_stage("sft", SFTDataset, "sft.jsonl", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
