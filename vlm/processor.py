"""VLMProcessor: chat messages (or text) + images -> `input_ids`, `attention_mask`, `pixel_values`.

Each `<image>` marker becomes exactly N `<|image_pad|>` ids (N = the encoder's patch count, read
from the model config), the model overwrites those rows with the image's patch features. Only the
marker makes a slot: a literal `@` (the placeholder's display form) is ordinary text, and a literal
`<|image_pad|>` typed into the text is refused, because it would silently claim a slot.

Images are preprocessed with open_clip's eval transform for the encoder (resize, centre crop,
normalise), after `vlm.images.load_image` made them safe RGB. `pixel_values` is flat
`[images, 3, H, W]`: all images of the batch, sample by sample, in marker order (what
`MiniMindVLM.forward` expects).

`save_pretrained(dir)` writes the tokenizer files plus `processor_config.json`;
`VLMProcessor.from_pretrained(dir)` and, after `import vlm`, `AutoProcessor.from_pretrained(dir)`
load it back (a VLM checkpoint folder without `processor_config.json` works too: N and the
preprocessing are then read from its `config.json`).
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from transformers import AutoProcessor, BatchFeature

from .configuration_vlm import MiniMindVLMConfig
from .images import ImageSource, load_image
from .tokenizer import IMAGE_ID, IMAGE_MARKER, IMAGE_TOKEN, load_tokenizer, render_chat

PROCESSOR_CONFIG = "processor_config.json"


def count_markers(text: str) -> int:
    return text.count(IMAGE_MARKER)


def expand_image_markers(text: str, num_image_tokens: int) -> str:
    """Each `<image>` -> N `<|image_pad|>`; a literal `<|image_pad|>` in the text is an error."""
    if IMAGE_TOKEN in text:
        raise ValueError(f"text contains the reserved token {IMAGE_TOKEN!r}; write {IMAGE_MARKER!r} where an image goes")
    return text.replace(IMAGE_MARKER, IMAGE_TOKEN * num_image_tokens)


def message_text(content) -> str:
    """Message content as text: a string, or HF-style parts `[{"type": "image"}, {"type": "text", "text": ...}]`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                parts.append(IMAGE_MARKER)
            elif kind == "text":
                parts.append(part.get("text", ""))
            else:
                raise ValueError(f"unknown message content part {part!r} (expected type 'image' or 'text')")
        return "".join(parts)
    raise TypeError(f"message content must be a string or a list of parts, got {type(content).__name__}")


class VLMProcessor:
    """Tokenizer + image preprocessing for MiniMind-V (see the module docstring)."""

    def __init__(self, tokenizer, num_image_tokens: int, preprocess_cfg: dict, image_token_id: int = IMAGE_ID):
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_token_id:
            raise ValueError(f"tokenizer maps {IMAGE_TOKEN} to {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, "
                             f"the model expects {image_token_id}")
        self.tokenizer = tokenizer
        self.num_image_tokens = int(num_image_tokens)
        self.image_token_id = image_token_id
        self.preprocess_cfg = dict(preprocess_cfg)
        known = {f.name for f in fields(PreprocessCfg)}
        cfg = PreprocessCfg(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in self.preprocess_cfg.items() if k in known})
        self.image_transform = image_transform_v2(cfg, is_train=False)

    @classmethod
    def from_config(cls, config: MiniMindVLMConfig, tokenizer) -> "VLMProcessor":
        return cls(tokenizer, config.num_image_tokens, config.vision_preprocess_cfg, config.image_token_id)

    # -- text ---------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The ChatML prompt of `messages` (content may be a string or HF-style parts)."""
        return render_chat([{**m, "content": message_text(m.get("content", ""))} for m in messages],
                           add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt with its `<image>` markers expanded to N placeholder ids each."""
        ids = self.tokenizer(expand_image_markers(text, self.num_image_tokens), add_special_tokens=False)["input_ids"]
        n_slots, n_markers = ids.count(self.image_token_id), count_markers(text)
        if n_slots != n_markers * self.num_image_tokens:  # the tokenizer does not treat the placeholder as special
            raise ValueError(f"tokenizer produced {n_slots} placeholder ids for {n_markers} <image> markers")
        return ids

    # -- images -------------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """`[I, 3, H, W]` for image paths / bytes / PIL images; `ImageError` names a bad one."""
        return torch.stack([self.image_transform(load_image(img)) for img in images])

    # -- both ---------------------------------------------------------------------------------------
    def __call__(self, text: str | list[str] | None = None, images=None, messages: list | None = None,
                 add_generation_prompt: bool = True, padding_side: str = "left",
                 return_tensors: str = "pt") -> BatchFeature:
        """Prompt(s) and their images -> `BatchFeature(input_ids, attention_mask[, pixel_values])`.

        One sample: `text="<image>\\nWhat is this?"` or `messages=[{...}]`, `images=[img]`.
        A batch: `text=[...]` or `messages=[[...], [...]]`, `images=[[imgs of 0], [imgs of 1]]`.
        `text` is used as given (a full prompt); `messages` are rendered with the chat template.
        Padding is on the left by default (what generation wants).
        """
        if return_tensors != "pt":
            raise ValueError("only return_tensors='pt' is supported")
        if (text is None) == (messages is None):
            raise ValueError("pass exactly one of text or messages")
        if messages is not None:
            batched = bool(messages) and isinstance(messages[0], list)
            prompts = [self.apply_chat_template(m, add_generation_prompt) for m in (messages if batched else [messages])]
        else:
            batched = isinstance(text, (list, tuple))
            prompts = list(text) if batched else [text]
        per_sample = _split_images(images, len(prompts), batched)
        rows, flat_images = [], []
        for i, (prompt, imgs) in enumerate(zip(prompts, per_sample)):
            if count_markers(prompt) != len(imgs):
                raise ValueError(f"sample {i}: {count_markers(prompt)} {IMAGE_MARKER} marker(s) but {len(imgs)} image(s)")
            rows.append(self.encode(prompt))
            flat_images.extend(imgs)
        out = self.pad(rows, padding_side)
        if flat_images:
            out["pixel_values"] = self.pixel_values(flat_images)
        return BatchFeature(out)

    def pad(self, rows: list[list[int]], padding_side: str = "left") -> dict[str, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            ids[i, sl], mask[i, sl] = torch.tensor(r, dtype=torch.long), 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **{"skip_special_tokens": True, **kwargs})

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, **{"skip_special_tokens": True, **kwargs})

    # -- persistence --------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, **kwargs) -> list[str]:
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        files = list(self.tokenizer.save_pretrained(str(out)))
        cfg = {"processor_class": type(self).__name__, "num_image_tokens": self.num_image_tokens,
               "image_token_id": self.image_token_id, "preprocess_cfg": self.preprocess_cfg}
        (out / PROCESSOR_CONFIG).write_text(json.dumps(cfg, indent=2, default=list) + "\n", encoding="utf-8")
        return files + [str(out / PROCESSOR_CONFIG)]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> "VLMProcessor":
        folder = Path(pretrained_model_name_or_path)
        tokenizer = load_tokenizer(folder)
        if (folder / PROCESSOR_CONFIG).is_file():
            cfg = json.loads((folder / PROCESSOR_CONFIG).read_text(encoding="utf-8"))
            return cls(tokenizer, cfg["num_image_tokens"], cfg["preprocess_cfg"], cfg.get("image_token_id", IMAGE_ID))
        if (folder / "config.json").is_file():
            return cls.from_config(MiniMindVLMConfig.from_pretrained(folder), tokenizer)
        raise FileNotFoundError(f"{folder}: neither {PROCESSOR_CONFIG} nor a MiniMind-V config.json")


def _split_images(images, n_samples: int, batched: bool) -> list[list]:
    """Normalise `images` to one list per sample."""
    if images is None:
        return [[] for _ in range(n_samples)]
    if not batched:
        return [list(images) if isinstance(images, (list, tuple)) else [images]]
    if len(images) != n_samples or not all(isinstance(x, (list, tuple)) for x in images):
        raise ValueError(f"for a batch of {n_samples} prompts pass images as {n_samples} lists (one per prompt)")
    return [list(x) for x in images]


AutoProcessor.register(MiniMindVLMConfig, VLMProcessor, exist_ok=True)
