"""The flags every stage shares (ARCHITECTURE.md), and their translation into a `TrainConfig`.

A stage adds its own flags and sets per-preset defaults with `parser.set_defaults(...)`; the values
below are only the fallbacks when neither the preset nor the command line names one.
"""
from __future__ import annotations

import argparse

from training.trainer import TrainConfig


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("common training flags")
    g.add_argument("--data", required=True, help="a data folder (the synthetic world) or a data file")
    g.add_argument("--out", required=True, help="output folder: checkpoint, metrics.jsonl, loss.png, trainer_state/")
    g.add_argument("--init", help="start from this checkpoint folder instead of a fresh model")
    g.add_argument("--preset", default="tiny", help="named defaults from training/presets.py (micro, tiny, small)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--batch-size", type=int, default=8, help="per process and micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine to lr x --min-lr-ratio)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--save-every", type=int, default=200, help="write trainer_state/ every N steps and at the end (0: never)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--resume", action="store_true", help="continue from OUT/trainer_state/ (exact: weights, optimizer, data position, RNG)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="auto",
                   help="auto (bf16 on CUDA, fp32 on CPU), fast (auto, plus bf16 on a CPU with native bf16 "
                        "kernels: AVX512-BF16/AMX), fp32 or bf16 (autocast)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--ema-decay", type=float, default=0.0,
                   help="save an exponential moving average of the trained weights with this decay (0: off)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model's decoder blocks (a one-off compile, then faster steps)")
    g.add_argument("--wandb", metavar="PROJECT", help="also log to this Weights & Biases project")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(out=args.out, max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                       warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, clip=args.clip,
                       save_every=args.save_every, log_every=args.log_every, resume=args.resume,
                       device=args.device, dtype=args.dtype, seed=args.seed, wandb=args.wandb, ema_decay=args.ema_decay,
                       compile=args.compile,
                       progress=not args.no_progress)
