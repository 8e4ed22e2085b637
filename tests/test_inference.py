import pytest
import torch

from smollm2.cpu_packing import PackedLinear, PackedSmolLM2, can_pack, pack_for_cpu_inference
from smollm2.generation import Sampling, generate
from smollm2.model import SmolLM2
from tests.conftest import small_config

pytestmark = pytest.mark.skipif(not can_pack(SmolLM2(small_config())), reason="this torch has no oneDNN")


@pytest.mark.parametrize(("norm", "mlp", "tied"), [("rmsnorm", "swiglu", True), ("layernorm", "gelu", False)])
def test_packed_model_gives_the_same_logits_and_greedy_tokens(norm, mlp, tied):
    model = SmolLM2(small_config(norm=norm, mlp=mlp, tie_embeddings=tied)).eval()
    packed = pack_for_cpu_inference(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), model(ids), rtol=1e-5, atol=1e-5)
    greedy = Sampling(temperature=0)
    for prompts in ([[1, 2, 3, 4, 5, 6, 7], [9, 8]], [[5, 4, 3]]):  # padded, then a lone prompt (no mask)
        assert generate(packed, prompts, 24, sampling=greedy) == generate(model, prompts, 24, sampling=greedy)


@pytest.mark.parametrize("tied", [True, False])
def test_packing_leaves_the_model_as_it_was(tied):
    model = SmolLM2(small_config(tie_embeddings=tied))  # in training mode, with gradients
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    count = model.num_parameters()
    modules = [(name, type(module)) for name, module in model.named_modules()]
    packed = pack_for_cpu_inference(model)
    assert packed is not model
    state = model.state_dict()
    assert list(state) == list(before)  # the same keys: transformers' Llama names, q/k/v and gate/up apart
    for name, tensor in before.items():
        assert torch.equal(state[name], tensor), name
    assert model.num_parameters() == count
    assert [(name, type(module)) for name, module in model.named_modules()] == modules
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied


@pytest.mark.parametrize("tied", [True, False])
def test_packed_model_counts_the_parameters_of_its_model_and_refuses_a_state_dict(tied):
    model = SmolLM2(small_config(tie_embeddings=tied))
    packed = pack_for_cpu_inference(model)
    assert isinstance(packed, PackedSmolLM2) and packed.config is model.config
    assert packed.num_parameters() == model.num_parameters()
    with pytest.raises(TypeError, match="state_dict of the model it was packed from"):
        packed.state_dict()
    # What it holds beside packed weights is the model's embedding and norms: shared, frozen.
    assert packed.embed_tokens.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    assert not packed.training and not any(p.requires_grad for p in packed.parameters())
    assert pack_for_cpu_inference(packed) is packed


def test_packing_replaces_every_linear_and_fuses_projections():
    model = pack_for_cpu_inference(SmolLM2(small_config(n_heads=4, n_kv_heads=2)))
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    attention = model.layers[0].self_attn
    assert isinstance(attention.qkv_proj, PackedLinear)
    assert attention.qkv_proj.packed.shape == (64 + 2 * 32, 64)  # q: 4 heads x 16, k and v: 2 heads x 16
    assert model.layers[0].mlp.gate_up_proj.packed.shape == (2 * 128, 64)


def test_packing_leaves_models_other_than_fp32_and_bf16_alone():
    model = SmolLM2(small_config()).to(torch.float16)
    assert pack_for_cpu_inference(model) is model
    assert isinstance(model.lm_head, torch.nn.Linear)


def test_bf16_packed_decoding_follows_fp32():
    """bf16 decoding picks fp32's greedy tokens. The model's next token is a fixed function of its last
    (the head reads each token's successor, the blocks' outputs scaled down but still there), so every
    greedy choice along the way is clear by far more than bf16 rounds its logits: equal tokens are owed,
    not luck."""
    model = SmolLM2(small_config()).eval()
    successor = torch.randperm(model.config.vocab_size)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.mul_(0.2)
            layer.mlp.down_proj.weight.mul_(0.2)
        model.lm_head.weight[successor] = model.embed_tokens.weight
    bf16_reference = SmolLM2(small_config()).eval()
    bf16_reference.load_state_dict(model.state_dict())
    bf16 = pack_for_cpu_inference(bf16_reference.to(torch.bfloat16))
    greedy, prompt = Sampling(temperature=0), [1, 2, 3]
    fp32_tokens = generate(model, [prompt], 40, sampling=greedy)[0]
    ids = torch.tensor([prompt + fp32_tokens])
    with torch.no_grad():
        fp32_logits, bf16_logits = model(ids)[0, len(prompt) - 1 : -1], bf16(ids)[0, len(prompt) - 1 : -1]
    assert bf16_logits.dtype == torch.bfloat16
    error = (bf16_logits.float() - fp32_logits).abs().max()
    top2 = fp32_logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 10 * error  # each of fp32's choices is clear
    assert len(set(fp32_tokens)) > 20  # a walk through the vocabulary, not one token repeated
    assert generate(bf16, [prompt], 40, sampling=greedy)[0] == fp32_tokens


@pytest.mark.parametrize(
    ("precision", "device", "dtype"),
    [("auto", "cpu", None), ("fp32", "cpu", None), ("bf16", "cpu", torch.bfloat16), ("auto", "cuda", torch.bfloat16)],
)
def test_decoding_precision_follows_the_choice(precision, device, dtype):
    from smollm2.hardware import choose_decode_precision

    assert choose_decode_precision(precision, small_config(), torch.device(device)).dtype == dtype
