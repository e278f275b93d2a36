"""Shared by the training-step benches: time full optimizer steps of contenders that take turns."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch


def ms_per_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list,
                loss_fn: Callable[[torch.nn.Module, object], torch.Tensor]) -> float:
    """Mean milliseconds of one step (forward, backward, optimizer) over `batches`."""
    t0 = time.perf_counter()
    for b in batches:
        loss_fn(model, b).backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - t0) / len(batches) * 1e3


def take_turns(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each round runs every contender once, the order rotated by one each round (so no contender always
    runs first, on a cold cache, or last); returns each contender's timing per round."""
    names = list(runs)
    ms: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            ms[k].append(runs[k]())
    return ms


def micro_scene_world(root: Path, vocab_size: int):
    """Write `data.scenes`' micro-scale scenes to `root/world` and train a tokenizer on them
    (`root/tok`); returns the tokenizer. The VLM benches' data."""
    from data.scenes import write_scene_splits
    from training.train_tokenizer import main as train_tokenizer
    from vlm.tokenizer import load_tokenizer

    write_scene_splits(root / "world", seed=0, scale="micro")
    train_tokenizer(["--data", str(root / "world"), "--out", str(root / "tok"), "--vocab-size", str(vocab_size)])
    return load_tokenizer(root / "tok")
