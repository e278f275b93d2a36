"""The frozen CLIP vision encoder of MiniMind-V, on open_clip.

`VisionEncoder` wraps any open_clip ViT (a built-in name such as `ViT-B-16`, our own
`minimind-clip-*` configs, or a saved checkpoint folder) and returns the *sequence of patch tokens*
`[B, N, D]` (CLS dropped, after the final LayerNorm), which the VLM projects into the LM's embedding
space: N = 196, D = 768 for ViT-B-16 at 224 px. The pooled, projected CLIP embeddings are available
too (`embed_images` / `embed_texts`), for image search in RAG.

The encoder is always frozen: parameters never require grad, `train()` keeps it in eval mode and
`forward` runs under `no_grad`. Only the vision tower is a registered submodule, so the VLM's
`state_dict` carries the vision weights but not CLIP's text tower (which `embed_texts` still uses).

Importing this module registers the configs in `vlm/clip_configs/` with open_clip:
`minimind-clip-micro` (32 px, 16 patches), `minimind-clip-tiny` (64 px, 64 patches, width 192) and
`minimind-clip-small` (128 px, 64 patches, width 384): small enough to train from scratch on a CPU
(`python -m training.pretrain_clip`). Their text towers use open_clip's bundled BPE tokenizer (works
offline) with a 64-token context, because Chinese captions cost ~3 BPE tokens per character.

Checkpoint folder (written by `save_clip_checkpoint`, open_clip's own `local-dir:` layout):
`open_clip_config.json` (`model_name`, `model_cfg`, `preprocess_cfg`) + `open_clip_model.safetensors`.
Load it with `VisionEncoder.from_open_clip(pretrained=DIR)`, `open_clip.create_model("local-dir:DIR")`
or, after `import vlm.vision`, `open_clip.create_model(name, pretrained=DIR/open_clip_model.safetensors)`.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable, Iterator, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import text_global_pool
from safetensors.torch import save_file
from torch import nn

from .images import ImageSource, load_image

CLIP_CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"
CHECKPOINT_CONFIG = "open_clip_config.json"
CHECKPOINT_WEIGHTS = "open_clip_model.safetensors"
DEFAULT_MODEL = "minimind-clip-tiny"


def register_clip_configs() -> list[str]:
    """Make our `clip_configs/*.json` known to open_clip (idempotent); returns their names."""
    names = sorted(p.stem for p in CLIP_CONFIG_DIR.glob("*.json"))
    if any(n not in open_clip.list_models() for n in names):
        open_clip.add_model_config(CLIP_CONFIG_DIR)
    return names


register_clip_configs()


def _model_from_cfg(model_cfg: dict) -> nn.Module:
    """An open_clip CLIP with random weights from a config dict (what `create_model` does, minus lookup)."""
    cfg = dict(model_cfg)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    return (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**cfg)


def clip_eval_transform(clip_model: nn.Module):
    """open_clip's eval preprocessing for `clip_model` (resize, center crop, normalise) and its config."""
    pp = open_clip.get_model_preprocess_cfg(clip_model)
    cfg = PreprocessCfg(**{f.name: pp[f.name] for f in fields(PreprocessCfg) if f.name in pp})
    return image_transform_v2(cfg, is_train=False), asdict(cfg)


def save_clip_checkpoint(model: nn.Module, model_name: str, model_cfg: dict, out_dir: str | Path) -> Path:
    """Write `model` as an open_clip `local-dir:` checkpoint folder; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    meta = {"model_name": model_name, "model_cfg": model_cfg, "preprocess_cfg": preprocess}
    (out / CHECKPOINT_CONFIG).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / CHECKPOINT_WEIGHTS), metadata={"format": "pt", "model_name": model_name})
    return out


def load_clip(model_name: str = DEFAULT_MODEL, pretrained: str | None = None, seed: int = 0):
    """Build an open_clip model; returns (model, resolved name, model_cfg, tokenizer id).

    `pretrained`: None (random init, seeded so that the same name always gives the same weights),
    a checkpoint folder (ours / open_clip `local-dir:`), a weights file, or an open_clip pretrained
    tag (which open_clip downloads: needs network).
    """
    if pretrained is not None and Path(pretrained).is_dir():
        model_name = f"local-dir:{Path(pretrained).resolve()}"
        pretrained = None
    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:"):])
        cfg_file = folder / CHECKPOINT_CONFIG
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{folder}: not a CLIP checkpoint folder (no {CHECKPOINT_CONFIG})")
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
        model = open_clip.create_model(model_name)
        return model, meta.get("model_name", folder.name), meta["model_cfg"], model_name
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; e.g. {DEFAULT_MODEL}, ViT-B-16")
    if pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(model_name)
    else:
        model = open_clip.create_model(model_name, pretrained=str(pretrained))
    return model, model_name, model_cfg, model_name


def encode_text_trimmed(model, text: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(text)` computed on the batch cut to its longest caption.

    open_clip pads every caption to the full context (64 tokens for our configs; the scene captions
    average 19) and runs the text tower on all of it. With a causal mask and end-of-text pooling the
    padding after a caption's last token cannot change its features, so cutting it off gives the
    same embeddings for less work. Other text towers (padding masks, class tokens, HF text models)
    take open_clip's own path."""
    plain = (isinstance(model, open_clip.CLIP) and getattr(model, "attn_mask", None) is not None
             and model.text_pool_type in ("argmax", "eos") and text.dim() == 2)
    if not plain:
        return model.encode_text(text)
    used = text.ne(0).any(0).nonzero()  # open_clip's tokenizers pad with 0; other pads just keep it all
    length = int(used.max()) + 1 if len(used) else 1
    text = text[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is None:
        return x
    return model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection


@contextmanager
def captured_outputs(modules, pick: Callable = lambda output: output) -> Iterator[dict[int, torch.Tensor]]:
    """`{k: pick(output)}` of the k-th module's latest forward, kept up to date inside the block."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, k=k: captured.__setitem__(k, pick(o)))
             for k, m in enumerate(modules)]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


class VisionEncoder(nn.Module):
    """Frozen open_clip vision tower: pixels `[B, 3, H, W]` -> patch tokens `[B, N, D]`."""

    def __init__(self, clip_model: nn.Module, model_name: str, model_cfg: dict | None = None,
                 tokenizer_id: str | None = None, feature_layer: int = -1):
        super().__init__()
        visual = clip_model.visual
        if not hasattr(visual, "output_tokens"):
            raise ValueError(f"{model_name}: vision tower {type(visual).__name__} cannot return patch tokens; "
                             "use an open_clip ViT config")
        visual.output_tokens = True  # forward returns (pooled, patch tokens)
        self.visual = visual
        self.model_name = model_name
        self.model_cfg = model_cfg
        # A tuple hides the full CLIP (text tower) from the module tree: not in state_dict/parameters.
        self._clip = (clip_model,)
        self._tokenizer_id = tokenizer_id or model_name
        self._tokenizer = None
        # preprocess_cfg is canonical (all keys): it is part of `identity`.
        self.preprocess, self.preprocess_cfg = clip_eval_transform(clip_model)
        self._identity: str | None = None
        self._shape: tuple[int, int] | None = None
        self.feature_layer = feature_layer
        clip_model.requires_grad_(False)
        clip_model.eval()

    @classmethod
    def from_open_clip(cls, model_name: str = DEFAULT_MODEL, pretrained: str | None = None,
                       device: str | torch.device = "cpu", seed: int = 0) -> "VisionEncoder":
        """Any open_clip model by name; weights from None (random), a tag, a file or a checkpoint folder."""
        model, name, cfg, tok = load_clip(model_name, pretrained, seed)
        return cls(model, name, cfg, tok).to(device)

    @classmethod
    def from_config(cls, model_name: str, model_cfg: dict, preprocess_cfg: dict | None = None) -> "VisionEncoder":
        """The architecture from a saved config dict, random weights (for loading a VLM's state dict)."""
        model = _model_from_cfg(model_cfg)
        if preprocess_cfg:
            open_clip.set_model_preprocess_cfg(model, preprocess_cfg)
        return cls(model, model_name, model_cfg)

    @property
    def feature_layer(self) -> int | list[int]:
        """Which hidden state(s) the patch tokens come from, counted as Hugging Face's `hidden_states`
        (LLaVA's `vision_feature_layer`): -1 the tower's output tokens (after its final norm, as
        open_clip returns them), -2 the output of the block before the last, 0 the patch embeddings;
        a list concatenates those states along the width."""
        return self._layers[0] if len(self._layers) == 1 else list(self._layers)

    @feature_layer.setter
    def feature_layer(self, layer: int | Sequence[int]) -> None:
        layers = [layer] if isinstance(layer, int) else list(layer)
        blocks = len(self.visual.transformer.resblocks)
        if not layers or any(not -blocks - 1 <= int(x) <= blocks for x in layers):
            raise ValueError(f"feature_layer {layer}: {self.model_name} has hidden states -{blocks + 1}..{blocks}")
        self._layers = tuple(int(x) if int(x) < 0 else int(x) - blocks - 1 for x in layers)  # one spelling each
        self._identity, self._shape = None, None

    # -- frozen by construction -------------------------------------------------------------------
    def train(self, mode: bool = True) -> "VisionEncoder":
        return super().train(False)  # a frozen encoder never enters train mode (dropout, patch dropout)

    # -- shape and identity -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.visual.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return size[0] if size[0] == size[1] else size

    def _token_shape(self) -> tuple[int, int]:
        if self._shape is None:
            v = self.visual
            if getattr(v, "attn_pool", None) is None and getattr(v, "pool_type", "") in ("tok", "avg") \
                    and hasattr(v, "grid_size"):
                self._shape = (int(v.grid_size[0] * v.grid_size[1]), int(v.transformer.width) * len(self._layers))
            else:  # unusual pooling: ask the model itself
                size = self.visual.image_size
                size = (size, size) if isinstance(size, int) else tuple(size)
                probe = torch.zeros(1, 3, *size, device=self.device, dtype=self.dtype)
                self._shape = tuple(self(probe).shape[1:])
        return self._shape

    @property
    def num_patches(self) -> int:
        """N: patch tokens per image (196 for ViT-B-16 at 224 px)."""
        return self._token_shape()[0]

    @property
    def hidden_size(self) -> int:
        """D: width of each patch token (768 for ViT-B-16)."""
        return self._token_shape()[1]

    @property
    def identity(self) -> str:
        """`name:hash` of the vision weights and preprocessing: a feature-cache key part.

        Computed once; the encoder is frozen, so its weights cannot change afterwards.
        """
        if self._identity is None:
            h = hashlib.sha256(json.dumps(self.preprocess_cfg, sort_keys=True, default=str).encode())
            for key, tensor in sorted(self.visual.state_dict().items()):
                h.update(key.encode())
                h.update(str(tensor.dtype).encode())
                h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            layer = "" if self._layers == (-1,) else "@" + ",".join(map(str, self._layers))
            self._identity = f"{self.model_name}{layer}:{h.hexdigest()[:16]}"
        return self._identity

    # -- encoding ------------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch tokens `[B, N, D]` for preprocessed pixels `[B, 3, H, W]` (no gradient)."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        if self._layers == (-1,):
            with torch.no_grad():
                return self.visual(pixel_values)[1]
        blocks = self.visual.transformer.resblocks
        # hidden state -k (k >= 2) is the output of block len - k + 1 counted from 1; the first is ln_pre's
        modules = {x: self.visual.ln_pre if x == -len(blocks) - 1 else blocks[len(blocks) + x]
                   for x in self._layers if x != -1}
        with captured_outputs(modules.values()) as captured, torch.no_grad():
            final = self.visual(pixel_values)[1]
        states = {x: captured[k] for k, x in enumerate(modules)}  # captured is keyed by position in modules
        n = final.shape[1]  # the patches are the last n tokens (a class token may come first)
        return torch.cat([final if x == -1 else states[x][:, -n:] for x in self._layers], dim=-1)

    def pixel_values(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """Load (safely) and preprocess images -> `[B, 3, H, W]`; raises `ImageError` naming a bad file."""
        return torch.stack([self.preprocess(load_image(src)) for src in images])

    def encode_images(self, images: Sequence[ImageSource], batch_size: int = 32) -> torch.Tensor:
        """Patch tokens `[B, N, D]` for image paths / bytes / PIL images."""
        out = [self(self.pixel_values(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.num_patches, self.hidden_size)

    def embed_images(self, images: Sequence[ImageSource], batch_size: int = 32) -> torch.Tensor:
        """L2-normalised pooled CLIP image embeddings `[B, E]` (float32), for image search."""
        out = []
        for i in range(0, len(images), batch_size):
            with torch.no_grad():
                pooled, _ = self.visual(self.pixel_values(images[i:i + batch_size]).to(self.device, self.dtype))
            out.append(F.normalize(pooled.float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised CLIP text embeddings `[B, E]` (float32), comparable with `embed_images`."""
        clip = self._clip[0].to(device=self.device, dtype=self.dtype)  # text tower follows the vision tower
        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self._tokenizer_id)
        out = []
        for i in range(0, len(texts), batch_size):
            with torch.no_grad():
                feats = encode_text_trimmed(clip, self._tokenizer(list(texts[i:i + batch_size])).to(self.device))
            out.append(F.normalize(feats.float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0)
