"""MiniMind-V models. `import vlm` registers them with transformers' Auto classes
(`AutoConfig`, `AutoModelForCausalLM`, `AutoModel`, `AutoProcessor`)."""
from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_minimind import MiniMindConfig
from .modeling_minimind import MiniMindForCausalLM, MiniMindModel

AutoConfig.register(MiniMindConfig.model_type, MiniMindConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)

from .configuration_vlm import MiniMindVLMConfig  # noqa: E402  (registers itself on import)
from .modeling_vlm import MiniMindVLM  # noqa: E402
from .processor import VLMProcessor  # noqa: E402

__all__ = ["MiniMindConfig", "MiniMindForCausalLM", "MiniMindModel", "MiniMindVLMConfig", "MiniMindVLM",
           "VLMProcessor"]
