"""The one training loop every stage shares.

A stage supplies a model, a map-style dataset, a collate function and a loss function that returns
a *summed* loss with its count (tokens, pairs, sequences); the Trainer owns everything else:
device and bf16 autocast, gradient accumulation, clipping, a cosine schedule with warm-up, an optional
exponential moving average of the weights (`ema_decay`), `torch.compile` of the model's decoder
blocks (`compile`), DDP under `torchrun`, the progress bar,
`metrics.jsonl` + `loss.png`, optional wandb, and atomic checkpoints with exact `--resume`.

Exactness is the design rule. Gradients of the summed losses are accumulated over the micro-batches
of a step and over all ranks, then divided by the global count, so the update does not depend on
how a global batch is split into micro-batches or processes. The data order of every epoch is a
permutation drawn from (seed, epoch), and step `s` always reads the same slice of it, so a resumed
run reads exactly what the uninterrupted run would have read.

DDP is done by hand (one all-reduce of the flattened gradients per step) rather than by wrapping
the model in `DistributedDataParallel`: loss functions call model methods other than `forward`
(generation in GRPO, the two towers of CLIP), MoE layers leave experts unused in a batch, and
frozen parameters have no gradient at all; none of that needs special cases this way.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from vlm.modeling_minimind import cpu_has_bf16_kernels

STATE_DIR = "trainer_state"
log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    out: str
    max_steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: float = 1.0
    batch_size: int = 8  # per process and micro-batch; global batch = batch_size * grad_accum * world size
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.01
    clip: float = 1.0  # max global gradient norm; 0 disables clipping
    save_every: int = 0  # write trainer_state/ every N steps and at the end; 0: never (no resume)
    log_every: int = 10
    resume: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | fast | fp32 | bf16
    seed: int = 42
    wandb: str | None = None  # project name; None disables wandb
    ema_decay: float = 0.0  # > 0: keep an exponential moving average of the trained weights; the saved model is it
    compile: bool = False  # torch.compile the model's decoder blocks (see `compile_blocks`)
    progress: bool = True


@dataclass
class LossOutput:
    """What a stage's loss function returns for one micro-batch."""
    loss_sum: torch.Tensor  # summed over the `count` units of the micro-batch
    count: int  # tokens / pairs / sequences the sum runs over
    aux: torch.Tensor | None = None  # a mean auxiliary loss (MoE load balancing), weighted by count
    metrics: dict[str, float] = field(default_factory=dict)  # averaged over micro-batches and logged


LossFn = Callable[[torch.nn.Module, dict], LossOutput]


def to_device(batch: Any, device: torch.device) -> Any:
    """Moves every tensor in a (nested) batch; lists of strings and other values stay as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr`, then a cosine down to `lr * min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available (use --device cpu)")
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def forward_context(device: torch.device, autocast_dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to `autocast_dtype` (None: plain fp32); under bf16 on a CPU, attention also takes
    PyTorch's math kernel rather than its flash one, whose bf16 backward is slow at our short
    sequences: a `minimind-clip-tiny` step 1.38x faster (`bench/bench_clip_step.py`, 2 threads,
    AVX512-BF16), the `tiny` VLM SFT stage's 4500 steps 1.14x. In fp32 the flash kernel stays (there
    it is the faster one)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                           enabled=autocast_dtype is not None))
        if device.type == "cpu" and autocast_dtype == torch.bfloat16:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        yield


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    `auto`: bf16 on a CUDA device that supports it, else fp32. `fast`: also bf16 on a CPU with native
    bf16 kernels (AVX512-BF16 or AMX), where it is ~1.5x faster than fp32, and fp32 on other CPUs,
    where bf16 would be several times slower.
    """
    name = name.lower()
    if name in ("auto", "fast"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if name == "fast" and device.type == "cpu" and cpu_has_bf16_kernels() else None
    if name in ("fp32", "float32"):
        return None
    if name in ("bf16", "bfloat16"):
        return torch.bfloat16
    raise SystemExit(f"--dtype {name!r}: choose auto, fast, fp32 or bf16 (fp16 needs loss scaling and is not supported)")


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def compile_blocks(model: torch.nn.Module) -> list[str]:
    """`torch.compile` in place (`Module.compile`: parameter names and checkpoints stay as they are) the
    blocks a Hugging Face model names in `_no_split_modules` (our decoder layers, the VLM's too), with
    dynamic shapes so that batches of other lengths reuse the graph. Blocks rather than the model
    because stage losses call its parts (`model.model`, the projector), not only `forward`. A model
    that names none (open_clip's CLIP) is left as it is: compiling its blocks made the tiny CLIP step
    slower (82 vs 120 pairs/s). Returns the compiled modules' names."""
    kinds = {n for m in model.modules() for n in getattr(m, "_no_split_modules", None) or ()}
    blocks = [(name, m) for name, m in model.named_modules() if type(m).__name__ in kinds]
    for _, block in blocks:
        block.compile(dynamic=True)
    if not blocks:
        log.warning("--compile: %s names no blocks to compile (_no_split_modules); it runs eagerly",
                    type(model).__name__)
    return [name for name, _ in blocks]


class Trainer:
    """Trains `model` on `dataset` with `loss_fn`; see the module docstring for the guarantees.

    count_fn:  units of a batch for the normalisation, overriding `LossOutput.count` (e.g. GRPO's
               prompts x group size).
    trainable: `(name, param) -> bool`; parameters it rejects are frozen (requires_grad=False) and
               stay bit-identical. Without it, the parameters that already require grad train.
    save_fn:   `(model, out_dir)` writes the finished model (default: `model.save_pretrained`).
    """

    def __init__(self, model: torch.nn.Module, dataset: Sequence, collate_fn: Callable[[list], dict],
                 loss_fn: LossFn, config: TrainConfig, count_fn: Callable[[dict], int] | None = None,
                 trainable: Callable[[str, torch.nn.Parameter], bool] | None = None,
                 save_fn: Callable[[torch.nn.Module, str], None] | None = None):
        self.cfg, self.dataset, self.collate_fn, self.loss_fn = config, dataset, collate_fn, loss_fn
        self.count_fn, self.save_fn = count_fn, save_fn
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = _resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.autocast_dtype = _resolve_dtype(config.dtype, self.device)
        self.model = model.to(self.device)
        if config.compile:
            compile_blocks(model)
        if trainable is not None:
            for name, p in model.named_parameters():
                p.requires_grad_(bool(trainable(name, p)))
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters: the freeze policy leaves nothing to train")
        if self.world > 1:  # every rank starts from rank 0's weights
            for _, p in self.params:
                dist.broadcast(p.data, src=0)
        # Polyak/EMA averaging of the trained weights (as timm's ModelEmaV2): the finished model is the average,
        # which smooths out the noise of the last updates. Frozen parameters are not averaged: they stay as they are.
        self.ema = [p.detach().clone() for _, p in self.params] if config.ema_decay > 0 else None
        decay = [p for n, p in self.params if p.ndim >= 2]
        no_decay = [p for n, p in self.params if p.ndim < 2]  # norms and biases are not decayed
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused: one kernel for all parameters; on CPU it is 4x faster than torch's default per-tensor loop
        # (1.7 vs 6.7 ms an optimizer step for the tiny model, of a ~200 ms training step)
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.95),
                                           fused=True)
        self.global_batch = config.batch_size * config.grad_accum * self.world
        self.steps_per_epoch = max(1, len(dataset) // self.global_batch)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self.step = 0
        self._order, self._order_epoch = torch.empty(0, dtype=torch.long), -1  # see _epoch_order
        self.out = Path(config.out)
        self.is_main = self.rank == 0

    # ------------------------------------------------------------------ data order

    def _step_indices(self, step: int) -> list[list[int]]:
        """This rank's micro-batches (lists of dataset indices) for optimizer step `step`."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        n = len(self.dataset)
        perm = self._epoch_order(epoch)
        # modulo n: a dataset smaller than one global batch is cycled rather than leaving ranks empty
        chunk = perm[(pos * self.global_batch + torch.arange(self.global_batch)) % n]
        mine = chunk[self.rank::self.world].tolist()
        b = self.cfg.batch_size
        return [mine[i:i + b] for i in range(0, len(mine), b)]

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The data order of `epoch`, a function of the seed and the epoch only (so `--resume` replays
        it), drawn once per epoch: a fresh randperm every step cost 1.4 ms of a 100 ms VLM SFT step."""
        if self._order_epoch != epoch:
            generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
            self._order, self._order_epoch = torch.randperm(len(self.dataset), generator=generator), epoch
        return self._order

    # ------------------------------------------------------------------ one optimizer step

    def _train_step(self) -> dict[str, float]:
        for _, p in self.params:
            p.grad = None
        loss_sum, count, tokens, aux_sum = 0.0, 0, 0, 0.0
        metric_sums: dict[str, float] = {}
        micro = self._step_indices(self.step)
        for indices in micro:
            batch = to_device(self.collate_fn([self.dataset[i] for i in indices]), self.device)
            with forward_context(self.device, self.autocast_dtype):
                out = self.loss_fn(self.model, batch)
            n = int(self.count_fn(batch)) if self.count_fn is not None else int(out.count)
            total = out.loss_sum.float()
            if out.aux is not None:
                total = total + out.aux.float() * n
                aux_sum += float(out.aux.detach()) * n
            total.backward()
            loss_sum += float(out.loss_sum.detach())
            count += n
            tokens += self._tokens(batch, n)
            for k, v in out.metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
        stats = torch.tensor([loss_sum, float(count), float(tokens), aux_sum, float(len(micro))], dtype=torch.float64)
        metrics = torch.tensor(list(metric_sums.values()), dtype=torch.float64)
        if self.world > 1:
            self._all_reduce_grads()
            stats, metrics = stats.to(self.device), metrics.to(self.device)
            dist.all_reduce(stats)
            if len(metrics):
                dist.all_reduce(metrics)
            stats, metrics = stats.cpu(), metrics.cpu()
        loss_sum, count, tokens, aux_sum, n_micro = stats.tolist()
        grads = [p for _, p in self.params if p.grad is not None]
        scale = 1.0 / max(count, 1.0)
        if grads:
            torch._foreach_mul_([p.grad for p in grads], scale)
        if self.cfg.clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(grads, self.cfg.clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([g.grad.norm() for g in grads])))
        lr = lr_at(self.step, self.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.ema is not None:
            # warm-up as in timm: early on the average follows the weights, decay (1 + t) / (10 + t) until ema_decay
            decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p for _, p in self.params], 1.0 - decay)
        row = {"step": self.step + 1, "loss": loss_sum * scale, "lr": lr, "grad_norm": grad_norm,
               "count": int(count), "tokens": int(tokens)}
        if aux_sum:
            row["aux_loss"] = aux_sum * scale
        row.update({k: v / n_micro for k, v in zip(metric_sums, metrics.tolist())})
        return row

    @staticmethod
    def _tokens(batch: dict, count: int) -> int:
        if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
            return int(batch["attention_mask"].sum())
        if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
            return batch["input_ids"].numel()
        return count

    def _all_reduce_grads(self) -> None:
        """Sums the gradients of all ranks in one flat buffer (a rank without a gradient adds zeros)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for (_, p), g in zip(self.params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    # ------------------------------------------------------------------ checkpoints

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def save_state(self) -> None:
        """Writes trainer_state/ atomically: a fresh folder renamed over the old one."""
        final, tmp, old = self.out / STATE_DIR, self.out / f"{STATE_DIR}.tmp", self.out / f"{STATE_DIR}.old"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_model(self.model, str(tmp / "model.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            if self.ema is not None:
                save_file({n: t.contiguous() for (n, _), t in zip(self.params, self.ema)}, str(tmp / "ema.safetensors"))
        self._barrier()
        (tmp / f"rng_rank{self.rank}.json").write_text(json.dumps(_rng_state()))
        self._barrier()
        if self.is_main:
            state = {"step": self.step, "total_steps": self.total_steps, "world_size": self.world,
                     "global_batch": self.global_batch, "config": asdict(self.cfg)}
            (tmp / "state.json").write_text(json.dumps(state, indent=2))  # written last: marks a complete folder
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def load_state(self) -> bool:
        """Restores model, optimizer, step and RNG from trainer_state/ (or the .old folder a kill left)."""
        folder = next((f for f in (self.out / STATE_DIR, self.out / f"{STATE_DIR}.old")
                       if (f / "state.json").is_file()), None)
        if folder is None:
            if self.is_main:
                print(f"[trainer] --resume: no checkpoint in {self.out / STATE_DIR}, starting from step 0")
            return False
        state = json.loads((folder / "state.json").read_text())
        if state["global_batch"] != self.global_batch:
            raise SystemExit(f"--resume: {folder} was trained with a global batch of {state['global_batch']}, "
                             f"this run has {self.global_batch} (batch_size x grad_accum x processes); "
                             "the data position would not match")
        missing, unexpected = load_model(self.model, str(folder / "model.safetensors"), strict=True,
                                         device=str(self.device))
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True))
        if self.ema is not None:
            if not (folder / "ema.safetensors").is_file():
                raise SystemExit(f"--resume: {folder} holds no weight average; resume it without --ema-decay")
            saved = load_file(str(folder / "ema.safetensors"), device=str(self.device))
            for (n, _), t in zip(self.params, self.ema):
                t.copy_(saved[n])
        rng_file = folder / f"rng_rank{self.rank}.json"
        if rng_file.is_file():
            _set_rng_state(json.loads(rng_file.read_text()))
        self.step = int(state["step"])
        if self.is_main:
            print(f"[trainer] resumed from {folder} at step {self.step}/{self.total_steps}")
        return True

    def save_model(self) -> None:
        """The finished model: written to a scratch folder, then moved in, weights last."""
        if not self.is_main:
            return
        tmp = self.out / ".saving"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (self.save_fn or (lambda m, d: m.save_pretrained(d)))(self.model, str(tmp))
        for f in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".safetensors"):
            dest = self.out / f.name
            if f.is_dir():
                shutil.rmtree(dest, ignore_errors=True)
            os.replace(f, dest)
        tmp.rmdir()

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed + self.rank)
        random.seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self.load_state()
        metrics_path = self.out / "metrics.jsonl"
        if self.is_main and not cfg.resume and metrics_path.exists():
            metrics_path.unlink()  # a fresh run starts a fresh log
        if self.is_main and self.step > 0 and metrics_path.exists():  # drop rows a killed run logged after its checkpoint
            rows = [r for r in metrics_path.read_text().splitlines() if r.strip() and json.loads(r).get("step", 0) <= self.step]
            metrics_path.write_text("".join(r + "\n" for r in rows))
        run = self._wandb_run() if self.is_main else None
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.progress and self.is_main),
                   desc=self.out.name, dynamic_ncols=True)
        self.model.train()
        t_start, first_loss, last_row, window_tokens, t_window = time.perf_counter(), None, None, 0, time.perf_counter()
        total_tokens = 0
        with open(metrics_path, "a", encoding="utf-8") if self.is_main else _Null() as log:
            while self.step < self.total_steps:
                row = self._train_step()
                self.step += 1
                total_tokens += row["tokens"]
                window_tokens += row["tokens"]
                first_loss = row["loss"] if first_loss is None else first_loss
                last_row = row
                bar.update(1)
                if self.step % max(1, cfg.log_every) == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    row["tokens_per_s"] = window_tokens / max(now - t_window, 1e-9)
                    row["epoch"] = (self.step - 1) / self.steps_per_epoch
                    window_tokens, t_window = 0, now
                    if self.is_main:
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                        tok_s=f"{row['tokens_per_s']:.0f}")
                        if run is not None:
                            run.log(row, step=self.step)
                if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == self.total_steps):
                    self.save_state()
        bar.close()
        wall = time.perf_counter() - t_start
        if self.ema is not None:  # the finished model is the average, in memory as on disk
            with torch.no_grad():
                torch._foreach_copy_([p for _, p in self.params], self.ema)
        self.save_model()
        if self.is_main:
            plot_losses(metrics_path, self.out / "loss.png")
        if run is not None:
            run.finish()
        self._barrier()
        return {"steps": self.step, "total_steps": self.total_steps, "first_loss": first_loss,
                "final_loss": last_row["loss"] if last_row else None, "tokens": total_tokens, "wall_s": wall,
                "tokens_per_s": total_tokens / max(wall, 1e-9), "out": str(self.out)}

    def _wandb_run(self):
        if not self.cfg.wandb:
            return None
        try:
            import wandb
        except ImportError:
            print("[trainer] --wandb given but wandb is not installed (pip install wandb); logging to metrics.jsonl only")
            return None
        return wandb.init(project=self.cfg.wandb, name=self.out.name, config=asdict(self.cfg))


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def plot_losses(metrics_path: Path, png: Path) -> None:
    """loss (and lr) against step from metrics.jsonl; nothing when fewer than two points were logged."""
    rows = [json.loads(r) for r in metrics_path.read_text().splitlines() if r.strip()] if metrics_path.is_file() else []
    rows = [r for r in rows if "loss" in r]
    if len(rows) < 2:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:orange", alpha=0.5, label="lr")
    ax2.set_ylabel("lr")
    ax.set_title(png.parent.name)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
