import pytest
import torch

from smollm2.config import ModelConfig


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def small_config(**changes) -> ModelConfig:
    """A SmolLM2-family config small enough for exact checks on a CPU in milliseconds."""
    base = dict(
        n_layers=2,
        hidden_size=64,
        n_heads=4,
        n_kv_heads=2,
        intermediate_size=128,
        vocab_size=97,
        norm="rmsnorm",
        mlp="swiglu",
        rope_theta=10000.0,
        max_seq_len=64,
        tie_embeddings=False,
    )
    return ModelConfig(**(base | changes))
