"""MiniMindVLMConfig: the MiniMind LM's hyperparameters plus the vision encoder and the projector.

The config is flat (it *is* a `MiniMindConfig` with extra fields) because the VLM *is* the LM with
two modules added: an LM checkpoint's keys load into the VLM unchanged, and every LM tool that reads
`config.hidden_size`, `config.num_hidden_layers`, ... (`fast_generate`, LoRA) works on the VLM as is.

Vision fields:
- `vision_model_name`: the open_clip model name (`ViT-B-16`, `minimind-clip-tiny`, ...);
- `vision_model_cfg` / `vision_preprocess_cfg`: open_clip's architecture and preprocessing dicts,
  saved so that a checkpoint rebuilds its encoder without any lookup or download;
- `vision_pretrained`: where the encoder weights came from (an open_clip tag or a path), recorded
  for provenance; the weights themselves are stored in the checkpoint (`vision.*` keys);
- `projector_type` (`linear` / `mlp`) and `projector_positions` (a learned embedding per patch slot
  added to the projected features, see `vlm.projector`);
- `projector_norm`: an RMSNorm after the projection, its gain at the LM's word-embedding scale;
- `projector_shuffle` (f, default 1): pixel shuffle factor; f x f neighbouring patches make one token;
- `projector_glance`: one more image token, a linear map of the whole patch grid;
- `image_attention`: `causal` (every token sees only earlier ones) or `bidirectional` (an image's
  tokens also see each other, PaliGemma's prefix attention: a patch can compare itself with the
  patches after it, which relational questions such as "the shortest bar" need). Off in the
  pipeline: on tiny (seed 42, same LM and CLIP) VQA was 0.69 either way and the shortest bar 2 of 18.
  Ridge probes (`training.probe_vision --vlm`) read its colour at 0.93 from the projected image
  tokens, 0.77-0.78 from the image tokens' states in the LM and 0.52-0.55 at the answer position
  (causal; bidirectional 0.80-0.85 and 0.59-0.61): the answer fails to gather it either way.
  Only `input_ids` say where the images are: a forward from `inputs_embeds` alone is causal;
- `vision_feature_layer`: which of the encoder's hidden states becomes the patch tokens, as LLaVA's
  field: -1 its output (the default), -2 the block before the last, ...; a list concatenates them;
- `cross_attention_layers`: decoder layers that get a cross-attention read-out into the
  image tokens in front of them (`vlm.readout`, Flamingo / Llama 3.2 Vision); `num_hidden_layers`
  puts one after the last layer, before the final norm; empty: none;
- `vision_hidden_size` (D): read from the encoder; `num_image_tokens` (N): the encoder's patch count
  divided by f^2 (+ 1 with the glance token), the image tokens the LM sees; the processor writes N
  placeholder ids per `<image>`.
"""
from __future__ import annotations

from .configuration_minimind import MiniMindConfig
from .tokenizer import IMAGE_ID

PROJECTOR_TYPES = ("linear", "mlp")
IMAGE_ATTENTION = ("causal", "bidirectional")


class MiniMindVLMConfig(MiniMindConfig):
    model_type = "minimind-v"

    def __init__(
        self,
        vision_model_name: str = "minimind-clip-tiny",
        vision_model_cfg: dict | None = None,
        vision_preprocess_cfg: dict | None = None,
        vision_pretrained: str | None = None,
        vision_hidden_size: int | None = None,
        vision_feature_layer: int | list[int] = -1,
        num_image_tokens: int | None = None,
        projector_type: str = "linear",
        projector_positions: bool = False,
        projector_shuffle: int = 1,
        projector_norm: bool = False,
        projector_glance: bool = False,
        image_attention: str = "causal",
        image_token_id: int = IMAGE_ID,
        cross_attention_layers: list[int] | None = None,
        **kwargs,
    ):
        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {projector_type!r}")
        if image_attention not in IMAGE_ATTENTION:
            raise ValueError(f"image_attention must be one of {IMAGE_ATTENTION}, got {image_attention!r}")
        self.image_attention = image_attention
        self.vision_model_name = vision_model_name
        self.vision_model_cfg = vision_model_cfg
        self.vision_preprocess_cfg = vision_preprocess_cfg
        self.vision_pretrained = vision_pretrained
        self.vision_hidden_size = vision_hidden_size
        self.vision_feature_layer = vision_feature_layer if isinstance(vision_feature_layer, int) \
            else [int(x) for x in vision_feature_layer]
        self.num_image_tokens = num_image_tokens
        self.projector_type = projector_type
        self.projector_positions = projector_positions
        if int(projector_shuffle) < 1:
            raise ValueError(f"projector_shuffle must be >= 1, got {projector_shuffle}")
        self.projector_shuffle = int(projector_shuffle)
        self.projector_norm = bool(projector_norm)
        self.projector_glance = bool(projector_glance)
        self.image_token_id = image_token_id
        self.cross_attention_layers = sorted({int(i) for i in cross_attention_layers or ()})
        super().__init__(**kwargs)
        bad = [i for i in self.cross_attention_layers if not 0 <= i <= self.num_hidden_layers]
        if bad:
            raise ValueError(f"cross_attention_layers {bad}: a read-out goes before decoder layer 0.."
                             f"{self.num_hidden_layers - 1} or after the last ({self.num_hidden_layers})")

    @classmethod
    def from_text_config(cls, text_config: MiniMindConfig, **vision_kwargs) -> "MiniMindVLMConfig":
        """A VLM config that keeps every LM hyperparameter of `text_config`."""
        fields = text_config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "auto_map", "dtype", "torch_dtype"):
            fields.pop(key, None)
        return cls(**fields, **vision_kwargs)

    @property
    def num_patch_tokens(self) -> int:
        """Image tokens that come from patch blocks (all but the glance token)."""
        return self.num_image_tokens - int(self.projector_glance)
