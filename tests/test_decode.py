"""Decoding in each precision: int8 weights, the measured choice of `--precision auto`, and the KV cache
against recomputing the whole sequence, on small random models (exact or bounded) and on the published
SmolLM2-135M-Instruct where it is cached (quality)."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from smollm2.cli import main
from smollm2.cpu_packing import Int8Linear, can_pack, pack_for_cpu_inference, quantize_for_cpu_inference
from smollm2.generation import Sampling, generate
from smollm2.hardware import choose_decode_precision, decode_step_seconds
from smollm2.hf import write_model_folder
from smollm2.inference import decode_candidates, load_for_inference, stream_text
from smollm2.model import KVCache, SmolLM2
from smollm2.tokenizer import train_tokenizer
from tests.conftest import small_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from fetch_instruct import cache_folder  # noqa: E402

pytestmark = pytest.mark.skipif(not can_pack(SmolLM2(small_config())), reason="this torch has no oneDNN")
GREEDY = Sampling(temperature=0)
PROMPTS = ([[1, 2, 3, 4, 5, 6, 7], [9, 8]], [[5, 4, 3]])  # padded rows, then a lone prompt (no mask)


def test_int8_linear_holds_each_row_to_half_a_step_of_its_own_scale():
    linear = torch.nn.Linear(64, 48, bias=False)
    quantized = Int8Linear(linear)
    q, scales = quantized.weight_int8, quantized.scales
    assert q.dtype == torch.int8 and scales.shape == (48,)
    assert torch.equal(q.abs().amax(dim=1), torch.full((48,), 127, dtype=torch.int8))  # each row's largest is +-127
    dequantized = q.float() * scales[:, None]
    assert ((dequantized - linear.weight.detach()).abs() <= scales[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 5, 64).bfloat16()
    expected = x.float() @ dequantized.T
    out = quantized.to(torch.bfloat16)(x)
    assert out.shape == (3, 5, 48) and out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() <= 0.02 * expected.abs().max()  # bf16 rounding of x, scales, sums


def test_int8_model_is_bf16_around_int8_weights_and_leaves_the_model_alone():
    model = SmolLM2(small_config(tie_embeddings=True)).eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    int8 = quantize_for_cpu_inference(model)
    assert int8.embed_tokens.weight.dtype == torch.bfloat16 and isinstance(int8.lm_head, Int8Linear)
    assert int8.layers[0].self_attn.qkv_proj.weight_int8.shape == (64 + 2 * 32, 64)  # q, k, v fused
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, before[name]), name
    with pytest.raises(ValueError, match="quantized from an fp32 model"):
        quantize_for_cpu_inference(model.to(torch.bfloat16))


def reference_and_precisions(tied: bool) -> tuple[SmolLM2, dict[str, SmolLM2]]:
    model = SmolLM2(small_config(tie_embeddings=tied)).eval()
    copy = SmolLM2(small_config(tie_embeddings=tied)).eval()
    copy.load_state_dict(model.state_dict())
    paths = decode_candidates(copy) | {"int8": quantize_for_cpu_inference(model)}
    return model, paths


@pytest.mark.parametrize("tied", [True, False])
def test_every_precision_follows_fp32(tied):
    """fp32 paths: the same greedy tokens. bf16 and int8 on a random model: logits within 5% of the
    largest fp32 logit (bf16 keeps 8 bits of mantissa, int8 ~7 per row); their greedy text is checked
    against fp32 on the published weights below, where logits are far apart enough to mean something."""
    model, paths = reference_and_precisions(tied)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        reference = model(ids)
        for name, path in paths.items():
            logits = path(ids)
            assert logits.dtype == (torch.float32 if name.startswith("fp32") else torch.bfloat16), name
            error = (logits.float() - reference).abs().max()
            assert error <= (1e-5 if name.startswith("fp32") else 0.05) * reference.abs().max(), name
    for prompts in PROMPTS:
        expected = generate(model, prompts, 24, sampling=GREEDY)
        for name in ("fp32", "fp32 packed"):
            assert generate(paths[name], prompts, 24, sampling=GREEDY) == expected, name


@pytest.mark.parametrize("name", ["fp32", "fp32 packed", "bf16", "bf16 packed", "int8"])
def test_the_kv_cache_decodes_as_recomputing_everything(name):
    """The preallocated (static) cache against no cache at all, each step recomputing the sequence."""
    _, paths = reference_and_precisions(tied=True)
    for prompts in PROMPTS:
        cached = generate(paths[name], prompts, 20, sampling=GREEDY)
        assert cached == generate(paths[name], prompts, 20, sampling=GREEDY, use_cache=False), name


def test_auto_takes_bf16_only_when_whole_steps_are_clearly_faster():
    cpu, config = torch.device("cpu"), small_config()
    close = {"fp32": 0.02, "fp32 packed": 0.01, "bf16": 0.03, "bf16 packed": 0.0095, "int8": 0.001}
    chosen = choose_decode_precision("auto", config, cpu, close)
    assert (chosen.key, chosen.packed, chosen.name) == ("fp32", True, "fp32 packed")  # bf16 only 1.05x; int8 never
    assert "fp32 packed 100.0" in chosen.reason and "bf16 packed 105.3" in chosen.reason
    clear = close | {"bf16 packed": 0.008}
    assert choose_decode_precision("auto", config, cpu, clear).name == "bf16 packed"  # 1.25x
    assert choose_decode_precision("auto", config, cpu, close | {"fp32": 0.005}).name == "fp32"
    assert choose_decode_precision("auto", config, cpu).name == "fp32 packed"  # unmeasured: scoring, not decoding
    assert choose_decode_precision("int8", config, cpu).key == "int8"


def test_auto_chooses_one_of_the_decodings_it_measured_and_keeps_the_choice(tmp_path):
    tokenizer = train_tokenizer(["ROMEO: But soft, what light through yonder window breaks? " * 20], 300)
    write_model_folder(SmolLM2(small_config(vocab_size=300, max_seq_len=64)), tmp_path / "model", tokenizer)
    before = {path: path.read_bytes() for path in (tmp_path / "model").iterdir()}
    model, _ = load_for_inference(tmp_path / "model", precision="auto")
    chosen = model.decode_precision
    assert chosen.name in ("fp32", "fp32 packed", "bf16", "bf16 packed")
    assert chosen.reason.startswith("auto: fastest decoding here (fp32 ")
    for name in ("fp32 ", "fp32 packed ", "bf16 ", "bf16 packed "):
        assert name in chosen.reason
    dtype = torch.float32 if chosen.key == "fp32" else torch.bfloat16
    assert model.embed_tokens.weight.dtype == dtype
    assert (type(model).__name__ == "PackedSmolLM2") == chosen.packed
    assert {path: path.read_bytes() for path in (tmp_path / "model").iterdir()} == before
    int8, _ = load_for_inference(tmp_path / "model", precision="int8")
    assert int8.decode_precision.key == "int8" and isinstance(int8.lm_head, Int8Linear)
    plain, _ = load_for_inference(tmp_path / "model", precision="bf16", pack=False)  # scoring: unpacked, said so
    assert plain.decode_precision.name == "bf16" and type(plain) is SmolLM2


def test_generate_takes_precision_int8(tmp_path, capsys):
    tokenizer = train_tokenizer(["ROMEO: But soft, what light through yonder window breaks? " * 20], 300)
    write_model_folder(SmolLM2(small_config(vocab_size=300, max_seq_len=64)), tmp_path / "model", tokenizer)
    int8, tokenizer = load_for_inference(tmp_path / "model", precision="int8")
    expected = "".join(stream_text(int8, tokenizer, "ROMEO:", 6, GREEDY))
    argv = ["generate", "--model", str(tmp_path / "model"), "--prompt", "ROMEO:", "--max_new_tokens", "6"]
    assert main([*argv, "--temperature", "0", "--precision", "int8"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n" and err == ""


@pytest.mark.parametrize("tied", [True, False])
def test_the_decode_step_is_forward_bitwise_in_every_precision(tied):
    """Generation's inner loop (PackedSmolLM2.decode_step, fewer operations) against the model's forward
    on the same cache: the same logits bit for bit, step after step, at batch 1 and 3."""
    model = SmolLM2(small_config(tie_embeddings=tied)).eval()
    bf16 = SmolLM2(small_config(tie_embeddings=tied)).eval().to(torch.bfloat16)
    paths = {
        "fp32": pack_for_cpu_inference(model),
        "bf16": pack_for_cpu_inference(bf16),
        "int8": quantize_for_cpu_inference(model),
    }
    for name, packed in paths.items():
        dtype = packed.embed_tokens.weight.dtype
        for batch in (1, 3):
            ids = torch.randint(0, model.config.vocab_size, (batch, 12))
            caches = [KVCache(model.config, batch, 12, "cpu", dtype) for _ in range(2)]
            with torch.inference_mode():
                for cache in caches:
                    packed(ids[:, :5], cache=cache)
                for position in range(5, 12):
                    expected = packed(ids[:, position : position + 1], cache=caches[0])
                    assert torch.equal(packed.decode_step(ids[:, position : position + 1], caches[1]), expected), name
                    assert caches[1].length == caches[0].length == position + 1
                assert torch.equal(caches[0].keys[1], caches[1].keys[1]), name


def test_the_users_weights_go_packed_or_plain_as_measured():
    cpu, config = torch.device("cpu"), small_config()
    plain_faster = choose_decode_precision("fp32", config, cpu, {"fp32": 0.01, "fp32 packed": 0.02})
    assert (plain_faster.name, plain_faster.reason) == (
        "fp32",
        "chosen; the faster here (fp32 100.0, fp32 packed 50.0 steps/s)",
    )
    assert choose_decode_precision("bf16", config, cpu, {"bf16": 0.02, "bf16 packed": 0.01}).name == "bf16 packed"
    assert choose_decode_precision("bf16", config, cpu).name == "bf16 packed"  # unmeasured: scoring


def model_folder(tmp_path: Path) -> Path:
    tokenizer = train_tokenizer(["ROMEO: But soft, what light through yonder window breaks? " * 20], 300)
    write_model_folder(SmolLM2(small_config(vocab_size=300, max_seq_len=64)), tmp_path / "model", tokenizer)
    return tmp_path / "model"


def test_a_measured_choice_is_remembered_for_this_machine_and_shape(tmp_path, monkeypatch):
    folder, choices = model_folder(tmp_path), Path(os.environ["SMOLLM2_DECODE_CHOICES"])
    first = load_for_inference(folder, precision="auto")[0].decode_precision
    stored = json.loads(choices.read_text())
    assert stored["kind"] == "smollm2 decode choices" and len(stored["choices"]) == 1
    entry = next(iter(stored["choices"].values()))
    assert (entry["key"], entry["packed"], entry["reason"]) == (first.key, first.packed, first.reason)

    def no_measuring(models, steps=3):
        raise AssertionError("measured again")

    monkeypatch.setattr("smollm2.inference.decode_step_seconds", no_measuring)
    again = load_for_inference(folder, precision="auto")[0]
    assert (again.decode_precision.name, type(again).__name__ == "PackedSmolLM2") == (first.name, first.packed)
    assert again.decode_precision.reason.startswith(first.reason + "; measured 20")
    assert again.decode_precision.reason.endswith(f"remembered in {choices}")
    with pytest.raises(AssertionError, match="measured again"):  # other weights, another choice
        load_for_inference(folder, precision="bf16")
    torch.set_num_threads(1)  # another machine, as far as decoding knows
    with pytest.raises(AssertionError, match="measured again"):
        load_for_inference(folder, precision="auto")


def test_a_choices_file_that_is_not_ours_is_left_alone(tmp_path):
    folder, choices = model_folder(tmp_path), Path(os.environ["SMOLLM2_DECODE_CHOICES"])
    for content in (b"my notes, not JSON", b'{"kind": "something else", "choices": {}}'):
        choices.write_bytes(content)
        chosen = load_for_inference(folder, precision="auto")[0].decode_precision
        assert chosen.reason.startswith("auto: fastest decoding here (") and "remembered" not in chosen.reason
        assert choices.read_bytes() == content


def test_decode_steps_are_timed_for_every_candidate():
    model = SmolLM2(small_config()).eval()
    seconds = decode_step_seconds({"a": model, "b": pack_for_cpu_inference(model)}, steps=2)
    assert set(seconds) == {"a", "b"} and all(0 < s < math.inf for s in seconds.values())


FOLDER = cache_folder()


@pytest.mark.skipif(not (FOLDER / "model.safetensors").is_file(), reason=f"no SmolLM2-135M-Instruct in {FOLDER}")
def test_int8_keeps_the_published_models_quality():
    """Measured (bench/decode_precision.py): int8's perplexity on input.txt within 2% of fp32's, and its
    greedy reply to this prompt the same as fp32's for its first 12 tokens."""
    fp32, tokenizer = load_for_inference(FOLDER, precision="fp32")
    int8, _ = load_for_inference(FOLDER, precision="int8")
    text = tokenizer.encode((ROOT / "input.txt").read_text()[:12_000])[:513]
    window = torch.tensor([text])
    with torch.inference_mode():
        losses = [
            torch.nn.functional.cross_entropy(m(window[:, :-1])[0].float(), window[0, 1:]).item() for m in (fp32, int8)
        ]
    assert math.exp(losses[1]) == pytest.approx(math.exp(losses[0]), rel=0.02)
    prompt = tokenizer.encode("The capital of France is")
    a, b = (generate(m, [prompt], 12, sampling=GREEDY)[0] for m in (fp32, int8))
    assert tokenizer.decode(a).strip().startswith("Paris")
    assert a == b
