"""One training step on the synthetic world's real batches: our packed step vs the padded HF-style one.

`python bench/bench_lm_step.py [--rounds 6] [--steps 20] [--threads 2] [--world DIR]`

Writes a `tiny` synthetic world and its tokenizer to a temporary folder (or reads `--world`), draws
20 batches of 16 pretrain documents and 20 of 16 SFT conversations + 3 replayed pretrain documents
(the `tiny` SFT mix), and times a full optimizer step (forward, backward, AdamW) of the `tiny` model:
- `hf_padded`: what a user writes with transformers: right-padded batch, `model(..., labels=).loss`
  (logits for every position, padding included);
- `packed256_full_logits`: documents packed into rows of 256 (our `pack_collate`), logits everywhere;
- `packed256`: the same rows, `causal_lm_loss` (LM head on supervised positions only);
- `packed128_all_positions`: rows of 128, every position through every layer, the LM head on the
  supervised ones only (our loss before the last layer learnt to skip the rest);
- `packed128`: rows of 128 (`--pack-len 128`, the `tiny` preset), `causal_lm_loss`: the last decoder
  layer runs at the supervised positions only (`keep`);
- `packed128_compiled`: the same with the decoder layers compiled (`--compile`, `Trainer.compile_blocks`);
- `packed128_compiled_bf16`: and under bf16 autocast (`--dtype bf16`; fast only on CPUs with AVX512-BF16/AMX).
Contenders take turns (order rotates each round); each reports its median ms per step, and ratios
are medians of per-round ratios against `hf_padded`. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from data.collate import pack_collate, pad_collate
from data.datasets import PretrainDataset, SFTDataset
from training.lm_stage import causal_lm_loss, supervised_head_loss
from training.presets import PRESETS
from training.trainer import compile_blocks
from vlm import MiniMindConfig, MiniMindForCausalLM
from vlm.modeling_minimind import _cpu_lacks_bf16_kernels
from vlm.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_timing import ms_per_step, take_turns  # noqa: E402


def full_logits_loss(model, batch: dict) -> torch.Tensor:
    """The transformers way: logits for every position, mean cross-entropy over the labelled ones."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch.get("position_ids"), labels=batch["labels"]).loss


def ours_loss(model, batch: dict) -> torch.Tensor:
    out = causal_lm_loss(model, batch)
    return out.loss_sum / out.count


def all_positions_loss(model, batch: dict) -> torch.Tensor:
    hidden, _, aux = model.model(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
    out = supervised_head_loss(model, hidden, batch["labels"], aux)
    return out.loss_sum / out.count


def bf16_loss(model, batch: dict) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return ours_loss(model, batch)


def make_world(folder: Path) -> Path:
    from data.synth.__main__ import main as synth_main
    from training.train_tokenizer import main as tok_main

    synth_main(["--out", str(folder), "--seed", "0", "--scale", "tiny", "--no-images"])
    tok_main(["--data", str(folder), "--out", str(folder / "tokenizer"), "--vocab-size", "2048",
              "--max-chars-per-file", "1000000"])
    return folder


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", help="an existing synthetic world folder with a tokenizer/ (default: write one)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=20, help="batches per contender per round")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(args.world) if args.world else make_world(Path(tmp) / "world")
        tok = load_tokenizer(world / "tokenizer")
        max_len = PRESETS["tiny"]["max_len"]
        pretrain = PretrainDataset(world / "pretrain.jsonl", tok, max_len)
        sft = SFTDataset(world / "sft.jsonl", tok, max_len)
        rng = random.Random(0)
        items = {"pretrain": [[pretrain[i] for i in rng.sample(range(len(pretrain)), 16)] for _ in range(args.steps)],
                 "sft": [[sft[i] for i in rng.sample(range(len(sft)), 16)]
                         + [pretrain[i] for i in rng.sample(range(len(pretrain)), 3)] for _ in range(args.steps)]}
    contenders = {  # name -> (collate, loss, compiled model?)
        "hf_padded": (pad_collate, full_logits_loss, False),
        "packed256_full_logits": (lambda b: pack_collate(b, max_len), full_logits_loss, False),
        "packed256": (lambda b: pack_collate(b, max_len), ours_loss, False),
        "packed128_all_positions": (lambda b: pack_collate(b, max_len, row_len=128), all_positions_loss, False),
        "packed128": (lambda b: pack_collate(b, max_len, row_len=128), ours_loss, False),
        "packed128_compiled": (lambda b: pack_collate(b, max_len, row_len=128), ours_loss, True),
        "packed128_compiled_bf16": (lambda b: pack_collate(b, max_len, row_len=128), bf16_loss, True),
    }
    models = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = MiniMindForCausalLM(MiniMindConfig(vocab_size=len(tok), **PRESETS["tiny"]["model"]))
        if compiled:
            compile_blocks(model)
        models[compiled] = (model, torch.optim.AdamW(model.parameters(), 1e-4, fused=True))

    report: dict = {"threads": args.threads, "rounds": args.rounds, "steps": args.steps,
                    "cpu_bf16_kernels": not _cpu_lacks_bf16_kernels()}
    names = list(contenders)
    for part, groups in items.items():
        batches = {k: [collate(g) for g in groups] for k, (collate, _, _) in contenders.items()}

        def step(k: str, n: int | None = None) -> float:
            _, loss, compiled = contenders[k]
            return ms_per_step(*models[compiled], batches[k][:n], loss)
        for k in names:
            step(k, 4)  # warm-up (the compiled ones compile here)
        ms = take_turns({k: (lambda k=k: step(k)) for k in names}, args.rounds)
        report[part] = {
            "median_ms_per_step": {k: round(statistics.median(v), 1) for k, v in ms.items()},
            "tokens_per_step": {k: round(sum(b["input_ids"].numel() for b in batches[k]) / len(groups), 1) for k in names},
            "speedup_vs_hf_padded": {k: round(statistics.median(h / o for h, o in zip(ms["hf_padded"], ms[k])), 2)
                                     for k in names[1:]},
            "speedup_packed128_vs_all_positions": round(statistics.median(
                a / o for a, o in zip(ms["packed128_all_positions"], ms["packed128"])), 2),
        }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
