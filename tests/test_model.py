import pytest
import torch

import smollm2.model
from smollm2.config import load_config
from smollm2.distributed import checkpoint_blocks
from smollm2.generation import Sampling, generate, sample
from smollm2.model import SmolLM2, linear_cross_entropy
from tests.conftest import small_config


@pytest.mark.parametrize(
    ("path", "expected"),
    [("config/model_config.yaml", 134_125_056), ("config/smollm2-135m.yaml", 134_515_008)],
)
def test_preset_parameter_counts(path, expected):
    with torch.device("meta"):
        model = SmolLM2(load_config(path).model)
    assert model.num_parameters() == expected


def test_seed_preset_is_the_stated_architecture():
    m = load_config("config/model_config.yaml").model
    assert (m.n_layers, m.hidden_size, m.n_heads, m.intermediate_size, m.vocab_size) == (12, 768, 12, 3072, 32000)
    assert (m.norm, m.mlp, m.tie_embeddings) == ("layernorm", "gelu", False)


def test_no_biases_in_linear_layers_and_scaled_residual_init():
    config = small_config(n_layers=8, hidden_size=128, intermediate_size=256)
    model = SmolLM2(config)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    q_std = model.layers[0].self_attn.q_proj.weight.std().item()
    o_std = model.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(q_std - 0.02) < 0.002
    assert abs(o_std - 0.02 / 4) < 0.001  # 1/sqrt(2 * 8 layers)


def test_tied_head_shares_the_embedding():
    model = SmolLM2(small_config(tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = SmolLM2(small_config(tie_embeddings=False))
    vocab, hidden = 97, 64
    assert model.num_parameters() == untied.num_parameters() - vocab * hidden


@pytest.mark.parametrize("norm,mlp", [("rmsnorm", "swiglu"), ("layernorm", "gelu")])
def test_sdpa_matches_eager_reference(norm, mlp):
    config = small_config(norm=norm, mlp=mlp)
    model = SmolLM2(config).eval()
    ids = torch.randint(0, config.vocab_size, (3, 20))
    fast = model(ids)
    config.attention = "eager"
    reference = model(ids)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v, written out here, apart from the model's code; the
    grouped k and v heads shared by consecutive query heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    length = q.shape[2]
    future = torch.triu(torch.full((length, length), float("-inf")), diagonal=1)
    weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + future, dim=-1)
    return weights @ v


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flash_attn2"])
def test_each_attention_kernel_equals_the_written_out_reference(attention):
    config = small_config(n_heads=4, n_kv_heads=2, attention=attention)
    layer = smollm2.model.Attention(config, 0)
    q = torch.randn(2, 4, 12, config.head_dim)
    k, v = torch.randn(2, 2, 12, config.head_dim), torch.randn(2, 2, 12, config.head_dim)
    torch.testing.assert_close(layer._kernel(q, k, v, None, causal=True), reference_attention(q, k, v))


def test_flash_attn2_falls_back_to_sdpa_on_cpu(monkeypatch):
    model = SmolLM2(small_config(attention="eager")).eval()
    ids = torch.randint(0, 97, (2, 12))
    expected = model(ids)  # the model's eager attention, itself checked against the reference above
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        smollm2.model.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw)
    )
    model.config.attention = "flash_attn2"
    torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)
    assert len(calls) == model.config.n_layers  # one SDPA call per layer: the fallback, not eager


def test_causality_future_tokens_do_not_change_the_past():
    model = SmolLM2(small_config()).eval()
    ids = torch.randint(0, 97, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 97
    torch.testing.assert_close(model(ids)[:, :10], model(changed)[:, :10])


def test_gradient_checkpointing_gives_the_same_gradients():
    config = small_config()
    model = SmolLM2(config)
    ids = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(ids, targets).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    checkpoint_blocks(model)  # applied from outside the model, as the trainer does
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name


def test_loss_matches_cross_entropy_of_logits():
    model = SmolLM2(small_config()).eval()
    ids = torch.randint(0, 97, (2, 8))
    targets = torch.randint(0, 97, (2, 8))
    expected = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(model(ids, targets), expected)


def reference_loss_and_grads(hidden, weight, targets):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=-100)
    loss.backward()
    return loss, hidden.grad, weight.grad


@pytest.mark.parametrize("rows_per_chunk", [1000, 7, 1])
def test_chunked_linear_cross_entropy_matches_the_full_logits(monkeypatch, rows_per_chunk):
    vocab = 97
    monkeypatch.setattr(smollm2.model, "LOGITS_PER_CHUNK", rows_per_chunk * vocab)
    hidden, weight = torch.randn(30, 16), torch.randn(vocab, 16)
    targets = torch.randint(0, vocab, (30,))
    targets[[0, 5, 29]] = -100
    expected_loss, expected_hidden_grad, expected_weight_grad = reference_loss_and_grads(hidden, weight, targets)
    hidden.requires_grad_(), weight.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, targets)
    (2 * loss).backward()  # the upstream gradient scales both
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(hidden.grad, 2 * expected_hidden_grad)
    torch.testing.assert_close(weight.grad, 2 * expected_weight_grad)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), expected_loss)
        assert linear_cross_entropy(hidden, weight, torch.full_like(targets, -100)).item() == 0.0


def test_linear_cross_entropy_under_bf16_autocast_runs_the_matmuls_in_bf16():
    hidden, weight = torch.randn(12, 16, requires_grad=True), torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (12,))
    bf16_logits = (hidden.bfloat16() @ weight.bfloat16().t()).float()
    expected = torch.nn.functional.cross_entropy(bf16_logits, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)
    assert (hidden.grad.dtype, weight.grad.dtype) == (torch.float32, torch.float32)
    _, hidden_grad, weight_grad = reference_loss_and_grads(hidden, weight, targets)
    torch.testing.assert_close(hidden.grad, hidden_grad, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(weight.grad, weight_grad, atol=2e-2, rtol=2e-2)


def greedy_without_cache(model, prompt, steps):
    tokens = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([tokens]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def test_kv_cache_generation_equals_recomputation():
    model = SmolLM2(small_config()).eval()
    prompt = [5, 17, 3, 42, 8]
    greedy = Sampling(temperature=0)
    cached = generate(model, [prompt], 20, sampling=greedy)[0]
    recomputed = generate(model, [prompt], 20, sampling=greedy, use_cache=False)[0]
    assert cached == recomputed == greedy_without_cache(model, prompt, 20)


def test_batch_of_different_lengths_matches_one_at_a_time():
    model = SmolLM2(small_config()).eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [30, 31, 32, 33]]
    greedy = Sampling(temperature=0)
    batched = generate(model, prompts, 12, sampling=greedy)
    for prompt, out in zip(prompts, batched, strict=True):
        assert out == greedy_without_cache(model, prompt, 12)


def test_sampling_is_reproducible_with_a_seed_and_stops_at_eos():
    model = SmolLM2(small_config()).eval()
    settings = Sampling(temperature=1.0, top_k=10, top_p=0.9, repetition_penalty=1.3)
    runs = [
        generate(model, [[1, 2, 3]], 15, sampling=settings, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    first = runs[0][0][0]
    stopped = generate(
        model, [[1, 2, 3]], 15, sampling=settings, eos_id=first, generator=torch.Generator().manual_seed(7)
    )
    assert stopped == [[]]


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    context, valid = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    top2 = {int(sample(logits, context, valid, Sampling(1.0, top_k=2), gen)) for _ in range(200)}
    assert top2 == {0, 1}
    # softmax mass of token 0 is ~0.64: top_p 0.5 keeps it alone
    top_p = {int(sample(logits, context, valid, Sampling(1.0, top_p=0.5), gen)) for _ in range(50)}
    assert top_p == {0}


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    context = torch.tensor([[0, 2]])
    valid = torch.tensor([[True, False]])  # token 2 is padding: not penalised
    chosen = sample(logits, context, valid, Sampling(temperature=0, repetition_penalty=2.0), None)
    assert int(chosen) == 1


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex"])
def test_packed_documents_are_computed_as_if_each_were_alone(attention):
    torch.manual_seed(0)
    model = SmolLM2(small_config(attention=attention)).eval()
    lengths = [5, 1, 10]
    documents = [torch.randint(0, model.config.vocab_size, (1, n)) for n in lengths]
    packed = torch.cat(documents, dim=1)
    document_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        together = model(packed, document_ids=document_ids)
        alone = torch.cat([model(document) for document in documents], dim=1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    positions, mask = smollm2.model.document_layout(document_ids)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 0, *range(10)]]
    assert mask.shape == (1, 1, 16, 16) and mask[0, 0, 5].tolist() == [False] * 5 + [True] + [False] * 10


def test_flex_block_masks_give_the_dense_masks_logits_across_blocks():
    """Documents longer than flex_attention's 128-token blocks, and boundaries inside blocks: the
    block mask CUDA's `model.attention: flex` uses gives the dense mask's logits (forward only here:
    flex_attention has no backward on a CPU, where that setting keeps the dense mask)."""
    torch.manual_seed(0)
    model = SmolLM2(small_config(max_seq_len=512)).eval()
    lengths = [200, 7, 150, 3]
    ids = torch.randint(0, model.config.vocab_size, (2, sum(lengths)))
    document_ids = torch.cat([torch.full((2, n), i) for i, n in enumerate(lengths)], dim=1)
    document_ids[1, 100:] += 1  # another row, other cuts
    positions, blocks = smollm2.model.document_layout(document_ids, blocks=True)
    assert isinstance(blocks, smollm2.model.BlockMask)
    with torch.no_grad():
        dense = model(ids, document_ids=document_ids)
        flex = model(ids, positions=positions, mask=blocks)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_a_model_built_for_loading_draws_no_random_weights_and_holds_what_was_loaded():
    config = small_config(tie_embeddings=True)
    source = SmolLM2(config)
    drawing = {name: getattr(torch.nn.init, name) for name in ("normal_", "uniform_", "kaiming_uniform_")}
    rng = torch.get_rng_state()
    loaded = SmolLM2.with_weights(config, lambda model: model.load_state_dict(source.state_dict()))
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn: a fresh model draws ~170k normals
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(loaded.inv_freq, source.inv_freq)

    def refuse(model):
        raise ValueError("not these weights")

    with pytest.raises(ValueError, match="not these weights"):
        SmolLM2.with_weights(config, refuse)
    assert {name: getattr(torch.nn.init, name) for name in drawing} == drawing  # put back, even after a failure
    SmolLM2(config)
    assert not torch.equal(torch.get_rng_state(), rng)  # a model built to train draws its weights again
