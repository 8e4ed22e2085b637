import json

import pytest
import torch
import transformers

from smollm2.config import UserError
from smollm2.generation import Sampling, generate
from smollm2.hf import export_llama, from_hf_state_dict, load_pretrained, to_hf_state_dict, to_llama_config
from smollm2.model import SmolLM2
from smollm2.tokenizer import train_tokenizer
from tests.conftest import small_config

CONFIGS = {
    "gqa-untied": small_config(),
    "mha-tied": small_config(n_kv_heads=4, tie_embeddings=True),
    "mqa-theta": small_config(n_kv_heads=1, rope_theta=100000.0, norm_eps=1e-6),
}


def llama_from(config) -> transformers.LlamaForCausalLM:
    hf_config = transformers.LlamaConfig(**to_llama_config(config))
    return transformers.LlamaForCausalLM(hf_config).eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_ours_to_transformers_logits_agree(name):
    config = CONFIGS[name]
    ours = SmolLM2(config).eval()
    theirs = llama_from(config)
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert not unexpected
    assert missing in ([], ["lm_head.weight"])  # tied: transformers re-ties it
    ids = torch.randint(0, config.vocab_size, (2, 24))
    torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_to_ours_logits_agree(name):
    config = CONFIGS[name]
    theirs = llama_from(config)
    ours = SmolLM2(config).eval()
    ours.load_state_dict(from_hf_state_dict(theirs.state_dict(), config))
    ids = torch.randint(0, config.vocab_size, (2, 24))
    torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tokenizer():
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n" * 50
    return train_tokenizer([text], vocab_size=300)


def test_export_loads_in_transformers_and_generates_the_same_tokens(tmp_path, tokenizer):
    config = small_config(vocab_size=300, tie_embeddings=True)
    ours = SmolLM2(config).eval()
    export_llama(ours, tmp_path, tokenizer)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompt = "ROMEO:\nBut soft"
    ids = tokenizer.encode(prompt)
    assert hf_tokenizer(prompt)["input_ids"] == ids
    expected = theirs.generate(
        torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(ids) :].tolist()
    assert generate(ours, [ids], 16, sampling=Sampling(temperature=0))[0] == expected


def test_load_pretrained_round_trip(tmp_path, tokenizer):
    model = SmolLM2(small_config(vocab_size=300)).eval()
    export_llama(model, tmp_path, tokenizer)
    loaded, loaded_tokenizer = load_pretrained(tmp_path)
    assert loaded.config == model.config
    assert loaded_tokenizer.hash == tokenizer.hash
    ids = torch.randint(0, 300, (1, 10))
    assert torch.equal(loaded.eval()(ids), model(ids))


def test_load_a_transformers_saved_model(tmp_path):
    """What a user with the real SmolLM2-135M folder does: load it and keep going."""
    config = small_config(tie_embeddings=True, n_kv_heads=1)
    theirs = llama_from(config)
    theirs.save_pretrained(tmp_path)
    ours, _ = load_pretrained(tmp_path)
    ids = torch.randint(0, config.vocab_size, (1, 12))
    torch.testing.assert_close(ours.eval()(ids), theirs(ids).logits, atol=1e-4, rtol=0)
    ours.train()
    ours(ids, ids).backward()  # trainable
    assert ours.embed_tokens.weight.grad is not None


def test_export_refuses_configs_llama_cannot_express(tmp_path):
    model = SmolLM2(small_config(norm="layernorm", mlp="gelu"))
    with pytest.raises(UserError, match="model.norm=layernorm"):
        export_llama(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_exported_config_is_plain_json(tmp_path, tokenizer):
    export_llama(SmolLM2(small_config(vocab_size=300)), tmp_path, tokenizer)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["num_key_value_heads"] == 2 and raw["eos_token_id"] == tokenizer.eos_id
