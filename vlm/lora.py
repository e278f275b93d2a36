"""LoRA (Hu et al. 2021) for any of our models: `W x + (alpha / r) * B A dropout(x)` on chosen `nn.Linear`s.

Why our own and not a `peft` dependency at run time: the adapter is a few dozen lines, it must work
on the VLM (whose LM sits inside a larger module) and under `torch.compile`. Two choices matter:

- **Module replacement, not a patched `forward`.** Each targeted `nn.Linear` is swapped for a
  `LoRALinear` that *holds* it (`base_layer`), so the graph is ordinary modules that `torch.compile`
  traces; the peer (minimind `model_lora.py`) monkey-patches `forward` and only handles square layers.
- **peft's layout and file format.** Module names (`base_layer`, `lora_A.<adapter>`, `lora_B.<adapter>`),
  target matching (a list = exact name or dotted suffix, a string = regex full match, `"all-linear"`),
  scaling, initialisation and the saved folder (`adapter_model.safetensors` with
  `base_model.model.<path>.lora_A.weight` keys + `adapter_config.json`) follow `peft`, so an adapter we
  save is also a `peft` adapter and `PeftModel.from_pretrained(our_model, folder)` loads it.

Several adapters can live side by side in one model; one (or none) is active at a time.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    """Rank, scale and targets of one adapter. Field names are peft's `LoraConfig` names."""

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_peft_dict(self) -> dict:
        """adapter_config.json content: peft's keys, so `peft.LoraConfig` reads it unchanged."""
        return {**asdict(self), "peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none",
                "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
                "inference_mode": True, "modules_to_save": None}

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter config: peft_type {d.get('peft_type')!r} is not LORA")
        for key, want in (("use_dora", False), ("use_rslora", False), ("bias", "none"), ("fan_in_fan_out", False)):
            if d.get(key, want) != want:
                raise ValueError(f"adapter config: {key}={d[key]!r} is not supported (expected {want!r})")
        return cls(r=int(d["r"]), lora_alpha=float(d["lora_alpha"]), lora_dropout=float(d.get("lora_dropout", 0.0)),
                   target_modules=d["target_modules"], base_model_name_or_path=d.get("base_model_name_or_path"))


class LoRALinear(nn.Module):
    """An `nn.Linear` (any in/out size) plus zero or more named low-rank updates; one is active."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None  # folded into base_layer.weight right now

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float) -> None:
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        w = self.base_layer.weight
        self.lora_A[name] = nn.Linear(self.base_layer.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B[name] = nn.Linear(r, self.base_layer.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / r
        # peft's default: A like nn.Linear, B = 0, so a fresh adapter leaves the model unchanged.
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The dense update `scaling * B @ A`, shaped like the base weight [out, in]."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        wide = torch.promote_types(self.base_layer.weight.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
        return (b.to(wide) @ a.to(wide) * self.scaling[name]).to(self.base_layer.weight.dtype)

    def merge(self) -> None:
        if self.merged_adapter is not None or self.active_adapter is None:
            return
        with torch.no_grad():
            self.base_layer.weight += self.delta_weight(self.active_adapter)
        self.merged_adapter = self.active_adapter

    def unmerge(self) -> None:
        if self.merged_adapter is None:
            return
        with torch.no_grad():
            self.base_layer.weight -= self.delta_weight(self.merged_adapter)
        self.merged_adapter = None

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, for code that reads Linear weights directly (fused decoding in
        `vlm.generation`). Only defined when it *is* the effective weight: no adapter active, or the
        active one merged; otherwise such code would silently drop the adapter, so this is an error."""
        if self.active_adapter is not None and self.merged_adapter is None:
            raise RuntimeError("LoRALinear.weight read while an adapter is active but not merged: "
                               "call vlm.lora.merge_adapter(model) first (or read base_layer.weight)")
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        name = self.active_adapter
        if name is None or self.merged_adapter is not None:
            return y
        return y + self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A)}, active={self.active_adapter!r}, merged={self.merged_adapter!r}"


# ---------------------------------------------------------------- targets and injection

def _output_layer_names(model: nn.Module) -> set[str]:
    """Names of the output projection (lm_head): peft's "all-linear" leaves it alone, so do we."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {n for n, m in model.named_modules() if head is not None and m is head} | {"lm_head"}


def matches_target(name: str, targets: list[str] | str) -> bool:
    """peft's rule: a string is a regex that must match the whole name; a list entry matches the
    name exactly or as a dotted suffix (`"q_proj"` matches `model.layers.0.self_attn.q_proj`)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _is_lora_internal(name: str) -> bool:
    """The wrapped Linear and the A/B matrices inside a LoRALinear are never targets themselves."""
    return any(part in ("base_layer", "lora_A", "lora_B") for part in name.split("."))


def find_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Names of the `nn.Linear` modules (or already-wrapped `LoRALinear`s) these targets select."""
    skip = _output_layer_names(model) if targets == "all-linear" else set()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, LoRALinear)) or _is_lora_internal(name):
            continue
        if (name not in skip) if targets == "all-linear" else matches_target(name, targets):
            names.append(name)
    return names


def add_lora(model: nn.Module, config: LoRAConfig, adapter_name: str = "default", activate: bool = True) -> list[str]:
    """Add adapter `adapter_name` to every targeted Linear (wrapping it on first use); returns their names.

    Freezes nothing: pass `lora_trainable(adapter_name)` as the Trainer's `trainable`, or call
    `mark_only_lora_trainable`.
    """
    names = find_targets(model, config.target_modules)
    if not names:
        raise ValueError(f"LoRA target_modules {config.target_modules!r} match no nn.Linear in {type(model).__name__}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module)
            setattr(parent, child, module)
        module.add_adapter(adapter_name, config.r, config.lora_alpha, config.lora_dropout)
    configs = getattr(model, "lora_configs", {})
    configs[adapter_name] = config
    model.lora_configs = configs  # plain attribute: which adapters exist and how they were built
    if activate:
        set_active_adapter(model, adapter_name)
    return names


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def set_active_adapter(model: nn.Module, adapter_name: str | None) -> None:
    """Switch every LoRA layer to `adapter_name` (None = plain base model). Merged weights are
    unmerged first so switching never leaves another adapter folded in."""
    if adapter_name is not None and adapter_name not in getattr(model, "lora_configs", {}):
        raise KeyError(f"no adapter {adapter_name!r}; have {sorted(getattr(model, 'lora_configs', {}))}")
    for _, layer in lora_layers(model):
        layer.unmerge()
        layer.active_adapter = adapter_name if adapter_name in layer.lora_A else None


def lora_trainable(adapter_name: str = "default"):
    """`trainable(name, param)` predicate for the shared Trainer: only this adapter's A and B train."""
    def trainable(name: str, param: nn.Parameter) -> bool:
        return (f".lora_A.{adapter_name}." in name or f".lora_B.{adapter_name}." in name)
    return trainable


def mark_only_lora_trainable(model: nn.Module, adapter_name: str = "default") -> int:
    """Freeze everything except this adapter; returns the number of trainable parameters."""
    keep = lora_trainable(adapter_name)
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name, p))
        n += p.numel() if p.requires_grad else 0
    return n


def count_parameters(model: nn.Module, adapter_name: str | None = None) -> tuple[int, int]:
    """(base parameters, parameters of `adapter_name` or of all adapters); tied weights counted once."""
    seen, base, lora = set(), 0, 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if ".lora_A." in name or ".lora_B." in name:
            if adapter_name is None or f".lora_A.{adapter_name}." in name or f".lora_B.{adapter_name}." in name:
                lora += p.numel()
        else:
            base += p.numel()
    return base, lora


# ---------------------------------------------------------------- merge

def merge_adapter(model: nn.Module) -> None:
    """Fold the active adapter into the base weights (fast inference; `unmerge_adapter` undoes it)."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and put the plain `nn.Linear`s back: a normal model to save_pretrained."""
    for name, layer in lora_layers(model):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
    if hasattr(model, "lora_configs"):
        del model.lora_configs
    return model


# ---------------------------------------------------------------- save / load (peft format)

def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """This adapter's weights under peft's file keys: `base_model.model.<module>.lora_A.weight`."""
    out = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            out[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach().cpu().contiguous()
            out[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach().cpu().contiguous()
    return out


def save_adapter(model: nn.Module, out_dir: str | Path, adapter_name: str = "default") -> Path:
    """Write only the adapter: `adapter_model.safetensors` + `adapter_config.json` (a peft folder)."""
    if adapter_name not in getattr(model, "lora_configs", {}):
        raise KeyError(f"no adapter {adapter_name!r} to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model, adapter_name), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = model.lora_configs[adapter_name].to_peft_dict()
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return out


def read_adapter_config(adapter_dir: str | Path) -> LoRAConfig:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config (not a LoRA adapter folder?)")
    try:
        return LoRAConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid adapter config: {e}") from e


def load_adapter(model: nn.Module, adapter_dir: str | Path, adapter_name: str = "default", activate: bool = True) -> nn.Module:
    """Add the adapter saved in `adapter_dir` (ours or peft's) to `model` under `adapter_name`.

    Strict: a weight in the file that the model has no slot for, or a slot the file does not fill,
    is an error (a silent partial load looks like a working adapter that does nothing).
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: missing adapter weights")
    add_lora(model, config, adapter_name, activate=activate)
    state = load_file(str(weights_path))
    expected = adapter_state_dict(model, adapter_name)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path}: adapter does not fit the model: missing={missing[:5]} unexpected={unexpected[:5]}")
    for name, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        for part, mod in (("lora_A", layer.lora_A[adapter_name]), ("lora_B", layer.lora_B[adapter_name])):
            t = state[f"{_PEFT_PREFIX}{name}.{part}.weight"]
            if t.shape != mod.weight.shape:
                raise ValueError(f"{weights_path}: {name}.{part} has shape {tuple(t.shape)}, model expects {tuple(mod.weight.shape)}")
            with torch.no_grad():
                mod.weight.copy_(t)
    return model
