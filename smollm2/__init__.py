"""SmolLM2: a from-scratch PyTorch implementation of the SmolLM2 family and its training pipeline."""

from __future__ import annotations

import importlib

# Imported on first use: a process that needs only part of the package (a `prepare --workers`
# encoder, the CLI's argument parsing) does not pay for torch (400 MB, seconds).
_EXPORTS = {"Config": "config", "ModelConfig": "config", "load_config": "config", "SmolLM2": "model"}

__all__ = ["Config", "ModelConfig", "SmolLM2", "load_config"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"smollm2.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'smollm2' has no attribute {name!r}")
