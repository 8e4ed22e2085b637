import pytest
import torch

from smollm2.inference import PackedLinear, can_pack, pack_for_cpu_inference
from smollm2.model import Sampling, SmolLM2
from tests.conftest import small_config

pytestmark = pytest.mark.skipif(not can_pack(SmolLM2(small_config())), reason="this torch has no oneDNN")


@pytest.mark.parametrize(("norm", "mlp", "tied"), [("rmsnorm", "swiglu", True), ("layernorm", "gelu", False)])
def test_packed_model_gives_the_same_logits_and_greedy_tokens(norm, mlp, tied):
    model = SmolLM2(small_config(norm=norm, mlp=mlp, tie_embeddings=tied)).eval()
    packed = SmolLM2(model.config)
    packed.load_state_dict(model.state_dict())
    pack_for_cpu_inference(packed)
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), model(ids), rtol=1e-5, atol=1e-5)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8]]
    greedy = Sampling(temperature=0)
    assert packed.generate(prompts, 16, sampling=greedy) == model.generate(prompts, 16, sampling=greedy)


def test_packing_replaces_every_linear_and_fuses_projections():
    model = pack_for_cpu_inference(SmolLM2(small_config(n_heads=4, n_kv_heads=2)))
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    attention = model.layers[0].self_attn
    assert isinstance(attention.fused_qkv, PackedLinear)
    assert attention.fused_qkv.packed.shape == (64 + 2 * 32, 64)  # q: 4 heads x 16, k and v: 2 heads x 16
    assert model.layers[0].mlp.fused_gate_up.packed.shape == (2 * 128, 64)
    assert not any(p.requires_grad for p in model.parameters())


def test_packing_leaves_non_fp32_models_alone():
    model = SmolLM2(small_config()).to(torch.bfloat16)
    assert pack_for_cpu_inference(model) is model
    assert isinstance(model.lm_head, torch.nn.Linear)
