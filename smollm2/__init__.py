"""SmolLM2: a from-scratch PyTorch implementation of the SmolLM2 family and its training pipeline."""

from smollm2.config import Config, ModelConfig, load_config
from smollm2.model import SmolLM2

__all__ = ["Config", "ModelConfig", "SmolLM2", "load_config"]
__version__ = "0.1.0"
