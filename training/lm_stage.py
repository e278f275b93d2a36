"""What the text stages (pretrain, SFT) share: CLI, model construction and the causal-LM loss.

Both stages are the shared Trainer plus: a dataset class, the masked next-token loss, and a folder
that holds model + tokenizer. `training.pretrain` and `training.sft` only pick the dataset.
"""
from __future__ import annotations

import argparse
import shutil
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from training.cli import add_common_args, config_from_args
from training.presets import get_preset
from training.trainer import LossOutput, Trainer
from vlm import MiniMindConfig, MiniMindForCausalLM
from vlm.tokenizer import load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def causal_lm_loss(model, batch: dict) -> LossOutput:
    """Summed next-token cross-entropy over supervised (label != -100) positions, plus the MoE aux loss.

    `model` is a `MiniMindForCausalLM` (its `.model` body and `.lm_head` are called apart)."""
    hidden, _, aux = model.model(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"),
                                 keep=supervised_positions(batch["labels"]))
    return supervised_head_loss(model, hidden, batch["labels"], aux)


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """`[B, T]` bool: the positions whose hidden state predicts a supervised token (label != -100 one
    step later), the body's `keep`: the last decoder layer runs only there, which leaves the states that
    `supervised_logits` reads exact."""
    return F.pad(labels[:, 1:] != -100, (0, 1))


def supervised_head_loss(model, hidden: torch.Tensor, labels: torch.Tensor, aux=None) -> LossOutput:
    """Next-token CE summed over supervised positions of the body's `hidden` states `[B, T, H]`.

    Only supervised positions reach the LM head and its vocab-wide softmax: SFT masks about three
    quarters of its tokens (prompt, passage), a VQA sample ~35 prompt tokens for ~2 answer ones."""
    ce, _ = supervised_token_ce(model, hidden, labels)
    return LossOutput(loss_sum=ce.sum(), count=len(ce), aux=aux)


def supervised_token_ce(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token CE, target id) of each supervised position, flattened; the LM head sees only those."""
    logits, targets = supervised_logits(model, hidden, labels)
    return F.cross_entropy(logits.float(), targets, reduction="none"), targets


def supervised_logits(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token logits `[N, V]`, target ids `[N]`) of the N supervised positions of `hidden` `[B, T, H]`."""
    labels = labels.to(hidden.device)[:, 1:]
    keep = labels != -100
    return model.lm_head(hidden[:, :-1][keep]), labels[keep]


def build_parser(stage: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m training.{stage}", description=description)
    add_common_args(p)
    p.add_argument("--tokenizer", help="tokenizer folder (default: --init, else DATA/tokenizer)")
    p.add_argument("--max-len", type=int, help="truncate samples to this many tokens (default: from preset)")
    p.add_argument("--moe", action="store_true", help="mixture-of-experts feed-forward for a new model")
    p.add_argument("--replay-pretrain", type=float, default=0.0,
                   help="SFT: mix in pretrain documents (DATA/pretrain.jsonl), this many per SFT sample, "
                        "so fine-tuning does not wash out the knowledge learned in pretraining")
    return p


def parse_with_preset(parser: argparse.ArgumentParser, stage: str, argv: list[str] | None):
    """Parse twice: the preset named on the command line supplies the defaults of the second pass."""
    known, _ = parser.parse_known_args(argv)
    preset = get_preset(known.preset)
    parser.set_defaults(**preset[stage], max_len=preset["max_len"])
    return parser.parse_args(argv), preset


def resolve_data_file(data: str | Path, name: str) -> Path:
    """DATA itself when it is a file, else DATA/NAME; a clear error when neither exists."""
    path = Path(data)
    path = path / name if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"--data: {path} does not exist (expected a data file or a folder holding {name})")
    return path


def copy_tokenizer(tok_dir: str | Path, out_dir: str | Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(tok_dir) / name).is_file():
            shutil.copy(Path(tok_dir) / name, Path(out_dir) / name)


def saver(tok_dir: str | Path):
    """Trainer save_fn: the HF folder plus the tokenizer, so the output is a complete checkpoint."""
    def save(model, out_dir):
        model.save_pretrained(out_dir)
        copy_tokenizer(tok_dir, out_dir)
    return save


def build_model(args, preset: dict, tokenizer) -> MiniMindForCausalLM:
    if args.init:
        return MiniMindForCausalLM.from_pretrained(args.init)
    cfg = MiniMindConfig(vocab_size=len(tokenizer), max_position_embeddings=max(args.max_len, 2048),
                         use_moe=args.moe, **preset["model"])
    return MiniMindForCausalLM(cfg)


def with_pretrain_replay(dataset, data_file: Path, tokenizer, args, wrap=None):
    """`dataset` plus `args.replay_pretrain` pretrain documents (DATA/pretrain.jsonl) per sample, when asked
    (`wrap`, if given, is applied to the replayed documents' dataset)."""
    replay_file = data_file.parent / "pretrain.jsonl"
    if not args.replay_pretrain or not replay_file.is_file() or replay_file == data_file:
        return dataset
    from torch.utils.data import ConcatDataset, Subset

    from data.datasets import PretrainDataset
    replay = PretrainDataset(replay_file, tokenizer, args.max_len)
    n = min(len(replay), int(args.replay_pretrain * len(dataset)))
    picked = torch.randperm(len(replay), generator=torch.Generator().manual_seed(args.seed))[:n].tolist()
    replayed = Subset(replay, picked)
    return ConcatDataset([dataset, wrap(replayed) if wrap else replayed])


def add_pack_args(parser: argparse.ArgumentParser) -> None:
    """`--pack` / `--pack-len`, for the stages that train on text samples (`make_collate` reads them)."""
    parser.add_argument("--pack", type=int, choices=(0, 1), default=0,
                        help="1: pack whole samples into rows of --max-len, each attending only to itself "
                             "(no padding compute; the same samples and targets per step as 0)")
    parser.add_argument("--pack-len", type=int, default=None,
                        help="with --pack 1: rows of this many tokens instead of --max-len (never narrower than "
                             "the longest sample); short samples train faster in short rows")


def make_collate(args: argparse.Namespace):
    """`pack_collate` into rows of `--pack-len` with `--pack 1`, else `pad_collate`."""
    from data.collate import pack_collate, pad_collate
    return partial(pack_collate, max_len=args.max_len, row_len=args.pack_len) if args.pack else pad_collate


def run_lm_stage(stage: str, dataset_cls, data_name: str, argv: list[str] | None, description: str) -> dict:
    parser = build_parser(stage, description)
    add_pack_args(parser)
    args, preset = parse_with_preset(parser, stage, argv)
    data_file = resolve_data_file(args.data, data_name)
    tok_dir = Path(args.tokenizer or args.init or Path(args.data if Path(args.data).is_dir() else data_file.parent) / "tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    torch.manual_seed(args.seed)
    model = build_model(args, preset, tokenizer)
    dataset = with_pretrain_replay(dataset_cls(data_file, tokenizer, args.max_len), data_file, tokenizer, args)
    trainer = Trainer(model, dataset, make_collate(args), causal_lm_loss, config_from_args(args), save_fn=saver(tok_dir))
    return trainer.train()
