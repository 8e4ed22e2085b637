"""The SmolLM2 family's presets: exact parameter counts and the published models' transformers layout."""

import pytest
import torch
import transformers

from smollm2.config import load_config
from smollm2.hf import from_llama_config, to_hf_state_dict, to_llama_config
from smollm2.model import SmolLM2

# The architecture fields of each published model's config.json (HuggingFaceTB/SmolLM2-*), as published.
PUBLISHED = {
    "config/smollm2-135m.yaml": (
        134_515_008,
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9),
        dict(num_key_value_heads=3, rope_theta=100000.0),
    ),
    "config/smollm2-360m.yaml": (
        361_821_120,
        dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15),
        dict(num_key_value_heads=5, rope_theta=100000.0),
    ),
    "config/smollm2-1.7b.yaml": (
        1_711_376_384,
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32),
        dict(num_key_value_heads=32, rope_theta=130000.0),
    ),
}
SHARED = dict(vocab_size=49152, rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True)


@pytest.mark.parametrize("path", PUBLISHED)
def test_preset_is_the_published_model(path):
    total, shape, attention = PUBLISHED[path]
    config = load_config(path).model
    llama = to_llama_config(config)
    assert {key: llama[key] for key in shape | attention | SHARED} == shape | attention | SHARED
    assert from_llama_config(llama, path) == config
    with torch.device("meta"):
        assert SmolLM2(config).num_parameters() == total


@pytest.mark.parametrize("path", PUBLISHED)
def test_preset_has_transformers_layout(path):
    """Every tensor's name and shape is the one transformers' LlamaForCausalLM has for the published model."""
    config = load_config(path).model
    with torch.device("meta"):
        ours = to_hf_state_dict(SmolLM2(config))
        theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_llama_config(config)))
    expected = {name: tuple(t.shape) for name, t in theirs.state_dict().items() if name != "lm_head.weight"}
    assert {name: tuple(t.shape) for name, t in ours.items()} == expected
    assert sum(p.numel() for p in theirs.parameters()) == PUBLISHED[path][0]
