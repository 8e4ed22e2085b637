"""Faster generation on CPU: linear weights prepacked for oneDNN.

Decoding one token at a time multiplies every weight matrix by a single row, so its speed is the
speed at which weights stream from memory. On the CPUs we measured, MKL's matrix-vector path
reaches about half the memory bandwidth that oneDNN reaches with weights reordered once into its
blocked layout (bench/model_bench.py, BENCHMARKS.md). This is what torch.compile's "freezing" does
for CPU inference; doing it directly keeps generation free of compilation and of shape guards.

The packed model is for inference only: fp32, no gradients, and its state_dict no longer holds the
linear weights (the originals are freed; only a tied output head, which is also the embedding,
costs a packed copy).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from smollm2.checkpoint import load_model_from_checkpoint
from smollm2.config import UserError
from smollm2.hf import load_pretrained
from smollm2.model import Sampling, SmolLM2
from smollm2.tokenizer import Tokenizer


def can_pack(model: SmolLM2) -> bool:
    weight = model.embed_tokens.weight
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """y = x W^T with W held in oneDNN's blocked layout; several linears of one input become one W."""

    def __init__(self, *linears: nn.Linear) -> None:
        super().__init__()
        weight = torch.cat([linear.weight.detach() for linear in linears])
        # The hint (1 row) picks the layout for decoding; longer inputs (the prompt) use it too.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def pack_for_cpu_inference(model: SmolLM2) -> SmolLM2:
    """Pack every linear of `model` in place, q/k/v and gate/up fused; a no-op where oneDNN can't help."""
    if not can_pack(model):
        return model
    model.eval().requires_grad_(False)
    for layer in model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        attention.fused_qkv = PackedLinear(attention.q_proj, attention.k_proj, attention.v_proj)
        del attention.q_proj, attention.k_proj, attention.v_proj
        attention.o_proj = PackedLinear(attention.o_proj)
        if mlp.swiglu:
            mlp.fused_gate_up = PackedLinear(mlp.gate_proj, mlp.up_proj)
            del mlp.gate_proj, mlp.up_proj
        else:
            mlp.up_proj = PackedLinear(mlp.up_proj)
        mlp.down_proj = PackedLinear(mlp.down_proj)
    model.lm_head = PackedLinear(model.lm_head)
    return model


# ---------------------------------------------------------------------------------------------
# Loading and streaming text, for `smollm2 generate` and the Space


def load_for_inference(source: str | Path, device: str = "cpu") -> tuple[SmolLM2, Tokenizer]:
    """A model and its tokenizer from a checkpoint (.pt), a run's final/ folder or a HF Llama folder."""
    path = Path(source)
    if path.is_file():
        model, tokenizer = load_model_from_checkpoint(path)
    elif path.is_dir():
        model, tokenizer = load_pretrained(path)
    else:
        raise UserError(f"{source}: no such checkpoint file or model folder")
    if tokenizer is None:
        raise UserError(f"{source}: no tokenizer found beside the model")
    model = model.to(device).eval()
    return pack_for_cpu_inference(model), tokenizer


def stream_text(
    model: SmolLM2,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    sampling: Sampling,
    seed: int = 0,
) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece, never splitting a multi-byte character."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ids = tokenizer.encode(prompt)
    if not ids and tokenizer.eos_id is not None:  # an empty prompt starts from end-of-text
        ids = [tokenizer.eos_id]
    if not ids:
        raise UserError("the prompt is empty and the tokenizer has no end-of-text token to start from")
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    max_new = min(max_new_tokens, model.config.max_seq_len - len(ids))
    produced: list[int] = []
    printed = ""
    for step in model.stream([ids], max_new, sampling, eos_id=tokenizer.eos_id, generator=generator):
        token = int(step[0])
        if token == tokenizer.eos_id:
            break
        produced.append(token)
        text = tokenizer.decode(produced)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(printed) :]
            printed = text
    rest = tokenizer.decode(produced)[len(printed) :]
    if rest:
        yield rest
