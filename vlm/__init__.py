"""MiniMind-V models. `import vlm` registers them with transformers' Auto classes."""
from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_minimind import MiniMindConfig
from .modeling_minimind import MiniMindForCausalLM, MiniMindModel

AutoConfig.register(MiniMindConfig.model_type, MiniMindConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)

__all__ = ["MiniMindConfig", "MiniMindForCausalLM", "MiniMindModel"]
