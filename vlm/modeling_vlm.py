"""MiniMind-V: the MiniMind LM + a frozen open_clip ViT + a projector.

Forward order: token embedding -> the rows of the image placeholder ids (`<|image_pad|>`, N per
image) are overwritten by the N projected patch features of that image -> the plain causal LM.

Images travel *flat*: `pixel_values` `[I, 3, H, W]` (or precomputed `image_features` `[I, N, D]`
from `vlm.feature_cache`) hold every image of the batch, sample by sample, in the order their
`<image>` markers appear. That order is exactly the row-major order of the placeholder positions, so
one `masked_scatter` places all of them: no Python loop over samples or positions, any number of
images per sample, text-only samples simply contribute no rows (and no dummy image is needed).

The class *is* a `MiniMindForCausalLM` (same keys `model.*`, `lm_head.*`) with two more modules,
`vision` (frozen, `vision.visual.*`) and `projector`: an LM checkpoint loads into it unchanged
(`from_lm`), and `save_pretrained` writes one folder with the encoder weights included, which
`AutoModel.from_pretrained` loads after `import vlm` without looking anything up.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from .configuration_vlm import MiniMindVLMConfig
from .generation import fast_generate as lean_generate
from .modeling_minimind import _CACHE_FIELD, MiniMindForCausalLM
from .projector import build_projector, match_text_scale, shuffled_side
from .readout import ImageMemory, build_readout, readout_hook
from .vision import VisionEncoder


class MiniMindVLM(MiniMindForCausalLM):
    config_class = MiniMindVLMConfig
    config: MiniMindVLMConfig
    main_input_name = "input_ids"

    def __init__(self, config: MiniMindVLMConfig, vision: VisionEncoder | None = None):
        super().__init__(config)
        if vision is None:  # rebuild the architecture from the saved dicts (weights come from the checkpoint)
            if config.vision_model_cfg:
                vision = VisionEncoder.from_config(config.vision_model_name, config.vision_model_cfg,
                                                   config.vision_preprocess_cfg)
            else:
                vision = VisionEncoder.from_open_clip(config.vision_model_name)
        vision.feature_layer = config.vision_feature_layer
        self._describe_vision(config, vision)
        for module in vision.modules():  # open_clip initialised it (or a checkpoint will): HF must not re-init
            module._is_hf_initialized = True
        self.vision = vision
        self.projector = build_projector(config.projector_type, config.vision_hidden_size, config.hidden_size,
                                         positions=config.num_image_tokens if config.projector_positions else 0,
                                         shuffle=config.projector_shuffle, norm=config.projector_norm,
                                         glance_patches=vision.num_patches if config.projector_glance else 0)
        self.image_readout = build_readout(config.cross_attention_layers, config.hidden_size,
                                           config.num_attention_heads, config.rms_norm_eps)
        self.post_init()
        self.vision.requires_grad_(False)

    @staticmethod
    def _describe_vision(config: MiniMindVLMConfig, vision: VisionEncoder) -> None:
        """Record the encoder in the config; a config that disagrees with its encoder is an error."""
        f = config.projector_shuffle
        n, d = shuffled_side(vision.num_patches, f) ** 2 if f > 1 else vision.num_patches, vision.hidden_size
        n += int(config.projector_glance)
        for field, value in (("num_image_tokens", n), ("vision_hidden_size", d)):
            saved = getattr(config, field)
            if saved is not None and saved != value:
                raise ValueError(f"config.{field}={saved} but the vision encoder {vision.model_name} gives {value}")
            setattr(config, field, value)
        config.vision_model_name = vision.model_name
        config.vision_model_cfg = vision.model_cfg
        config.vision_preprocess_cfg = {k: list(v) if isinstance(v, tuple) else v
                                        for k, v in vision.preprocess_cfg.items()}

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_lm(cls, lm: MiniMindForCausalLM, vision: VisionEncoder, projector_type: str = "linear",
                vision_pretrained: str | None = None, projector_positions: bool = False,
                projector_shuffle: int = 1, projector_norm: bool = False,
                projector_glance: bool = False, image_attention: str = "causal",
                cross_attention_layers: list[int] | None = None) -> "MiniMindVLM":
        """A VLM around a trained LM (weights copied) and an encoder; only the projector (and any
        image read-out) is new.
        The encoder's `feature_layer` becomes the config's `vision_feature_layer`."""
        config = MiniMindVLMConfig.from_text_config(lm.config, projector_type=projector_type,
                                                    projector_positions=projector_positions,
                                                    projector_shuffle=projector_shuffle, projector_norm=projector_norm,
                                                    projector_glance=projector_glance, vision_pretrained=vision_pretrained,
                                                    image_attention=image_attention,
                                                    cross_attention_layers=cross_attention_layers,
                                                    vision_feature_layer=vision.feature_layer)
        model = cls(config, vision=vision)
        result = model.load_state_dict(lm.state_dict(), strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(("vision.", "projector.", "image_readout."))]
        if missing or result.unexpected_keys:
            raise ValueError(f"LM weights do not fit the VLM: missing {missing}, unexpected {result.unexpected_keys}")
        match_text_scale(model.projector, model.get_input_embeddings().weight)
        return model.to(next(lm.parameters()).device)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.vision.requires_grad_(False)  # loading creates fresh Parameters: freeze again
        return model

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    # -- images -> embeddings ---------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch tokens `[I, N, D]` of preprocessed images `[I, 3, H, W]` (frozen encoder, no grad)."""
        return self.vision(pixel_values)

    def project_images(self, pixel_values: torch.Tensor | None = None,
                       image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Projected patch features `[I, N, hidden]` from pixels or from cached encoder features
        (`[I, N * f^2, D]`: the encoder's patches, before the projector's pixel shuffle by f)."""
        if image_features is None:
            image_features = self.get_image_features(pixel_values)
        n = self.config.num_patch_tokens * self.config.projector_shuffle ** 2
        d = self.config.vision_hidden_size
        if image_features.dim() != 3 or tuple(image_features.shape[1:]) != (n, d):
            raise ValueError(f"image_features must be [images, {n}, {d}] for {self.config.vision_model_name}, "
                             f"got {list(image_features.shape)} (features of another encoder?)")
        weight = next(self.projector.parameters())
        return self.projector(image_features.to(device=weight.device, dtype=weight.dtype))

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings `[B, T, hidden]` with every placeholder row replaced by its patch feature.

        Raises ValueError when the placeholders do not hold exactly N slots for each image given
        (e.g. a prompt truncated through an image, or a marker without its image).
        """
        embeds = self.model.embed_tokens(input_ids)
        slots = input_ids == self.config.image_token_id
        n_images = 0 if pixel_values is None and image_features is None else \
            len(image_features if image_features is not None else pixel_values)
        check_image_slots(slots, n_images, self.config.num_image_tokens)
        if n_images == 0:
            return embeds
        projected = self.project_images(pixel_values, image_features)
        return embeds.masked_scatter(slots.unsqueeze(-1), projected.to(embeds.dtype))

    def image_memory(self, input_ids: torch.Tensor, embeds: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> ImageMemory | None:
        """What the image read-out attends to (the embedded prompt's image slots), or None without one."""
        if not self.config.cross_attention_layers:
            return None
        return ImageMemory.from_slots(embeds, input_ids == self.config.image_token_id, attention_mask)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                      keep: torch.Tensor | None = None):
        """`(final hidden states [B, T, hidden], MoE aux loss)` of a prompt with its images: what
        the training losses read, without computing every position's logits. `keep` ([B, T] bool): only
        those positions' states are needed (`MiniMindModel.forward`); the others come back as zeros."""
        embeds = self.embed_inputs(input_ids, pixel_values, image_features)
        readout = readout_hook(self.image_readout, self.image_memory(input_ids, embeds, attention_mask))
        hidden, _, aux = self.model(attention_mask=attention_mask, inputs_embeds=embeds,
                                    bidirectional_blocks=self.image_blocks(input_ids), cross_attention=readout,
                                    keep=keep)
        return hidden, aux

    def image_blocks(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """`[B, T]` image number (1, 2, ... within each row) of every placeholder id, 0 elsewhere: the
        blocks that attend bidirectionally; None when `config.image_attention` is causal."""
        if self.config.image_attention != "bidirectional":
            return None
        slots = input_ids == self.config.image_token_id
        rank = slots.long().cumsum(-1) - 1  # the slot's index among the row's slots
        return torch.where(slots, rank.div(self.config.num_image_tokens, rounding_mode="floor") + 1, 0)

    # -- forward / generation -----------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None, **kwargs):
        if past_key_values is None:  # transformers >= 5.24 passes the cache as `cache`
            past_key_values = kwargs.pop("cache", None)
        memory = getattr(past_key_values, "image_memory", None)  # the prompt's images, kept for decode steps
        if inputs_embeds is None and input_ids is not None:
            kwargs["bidirectional_blocks"] = self.image_blocks(input_ids)
            # Always through embed_inputs, even without images: placeholder ids without images are an error.
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_features)
            if pixel_values is not None or image_features is not None:
                memory = self.image_memory(input_ids, inputs_embeds, attention_mask)
            input_ids = None
        elif pixel_values is not None or image_features is not None:
            raise ValueError("pass images together with input_ids (their placeholder ids say where they go)")
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                              use_cache=use_cache, logits_to_keep=logits_to_keep,
                              cross_attention=readout_hook(self.image_readout, memory), **kwargs)
        cache = getattr(out, _CACHE_FIELD)
        if memory is not None and cache is not None:
            cache.image_memory = memory
        return out

    def prepare_inputs_for_generation(self, input_ids, *args, is_first_iteration: bool | None = False, **kwargs):
        """HF `generate`: images are spliced in at prefill only; decode steps are plain LM steps."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            inputs.pop("image_features", None)  # transformers already drops pixel_values after prefill
            inputs.pop("pixel_values", None)
        return inputs

    @torch.inference_mode()
    def fast_generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                      image_features: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                      **kwargs) -> torch.Tensor:
        """`vlm.generation.fast_generate` with the images spliced into the prompt; returns the new ids.

        Takes the same sampling/streaming arguments (`max_new_tokens`, `temperature`, `streamer`, ...).
        """
        embeds = self.embed_inputs(input_ids, pixel_values, image_features)
        return lean_generate(self, input_ids, attention_mask=attention_mask, inputs_embeds=embeds,
                             bidirectional_blocks=self.image_blocks(input_ids),
                             cross_attention=readout_hook(self.image_readout,
                                                          self.image_memory(input_ids, embeds, attention_mask)),
                             **kwargs)


def check_image_slots(slots: torch.Tensor, n_images: int, n_per_image: int) -> None:
    """Placeholder mask `[B, T]` must hold `n_images` whole runs of `n_per_image` slots (vectorised check)."""
    n_slots = int(slots.sum())
    if n_slots != n_images * n_per_image:
        raise ValueError(
            f"the input holds {n_slots} image placeholder ids (<|image_pad|>) but {n_images} image(s) were "
            f"given, which need {n_images} x {n_per_image} = {n_images * n_per_image}: every <image> needs "
            "exactly one image and its full run of placeholders (was the prompt truncated?)")
    if n_slots == 0:
        return
    # Each maximal run of slots in a row must be a whole number of images: a run cut short would
    # pair patch rows of one image with the slots of the next.
    starts = slots & ~torch.nn.functional.pad(slots[:, :-1], (1, 0), value=False)
    run_of_slot = starts.flatten().cumsum(0)[slots.flatten()] - 1
    lengths = torch.bincount(run_of_slot)
    if bool((lengths % n_per_image).any()):
        raise ValueError(f"image placeholder runs of lengths {lengths.tolist()} are not multiples of "
                         f"{n_per_image} (tokens per image): an image's run was cut")


def register_auto_classes() -> None:
    """`AutoConfig` / `AutoModel` / `AutoModelForImageTextToText` / `AutoModelForCausalLM` know MiniMind-V."""
    AutoConfig.register(MiniMindVLMConfig.model_type, MiniMindVLMConfig, exist_ok=True)
    for auto in (AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM):
        auto.register(MiniMindVLMConfig, MiniMindVLM, exist_ok=True)


register_auto_classes()
