"""A model transform for faster generation on CPU: linear weights prepacked for oneDNN (beside
`distributed.parallelize`, the transform for training on many devices).

Decoding one token at a time multiplies every weight matrix by a single row, so its speed is the
speed at which weights stream from memory. On the CPUs we measured, MKL's matrix-vector path
reaches about half the memory bandwidth that oneDNN reaches with weights reordered once into its
blocked layout (bench/model_bench.py, BENCHMARKS.md). This is what torch.compile's "freezing" does
for CPU inference; doing it directly keeps generation free of compilation and of shape guards.

Packing leaves the model as it was and makes a new one, a PackedSmolLM2: SmolLM2's forward over
layers whose attention and MLP hold packed weights, q/k/v and gate/up fused into one matrix each.
It shares the embedding and the norms with the model it was made from (frozen), so once that model
is dropped its linear weights are freed; only a tied output head, which is also the embedding, costs
a packed copy. It is for inference only (fp32 or bf16 weights, no gradients); num_parameters() counts the model it
was made from, and state_dict() is refused, since the linear weights are no longer parameters.

With `int8=True` the linear weights are quantized instead (`Int8Linear`: int8 with one scale per output
channel, taken from the fp32 weights) and multiplied by torch's int8 weight-only kernel; the rest of the
model then runs in bf16, the activation dtype that kernel is fast with (fp32 activations measured ~10x
slower here). A quarter of fp32's bytes per token: decoding reads every weight once per token.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from smollm2.config import ModelConfig
from smollm2.model import MLP, Attention, KVCache, SmolLM2, apply_rope, rope_cos_sin


def can_pack(model: SmolLM2) -> bool:
    """oneDNN packing helps fp32 and bf16 weights on a CPU."""
    weight = model.embed_tokens.weight
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
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


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 rows times one scale per row (symmetric, per output channel);
    several linears of one input become one W. x in bf16: the kernel's fast path on a CPU."""

    def __init__(self, *linears: nn.Linear) -> None:
        super().__init__()
        weight = torch.cat([linear.weight.detach().float() for linear in linears])
        scales = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight_int8", (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)  # cast with the model (to bf16, the kernel's activation dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = torch._weight_int8pack_mm(rows, self.weight_int8, self.scales.to(x.dtype))
        return out.view(*x.shape[:-1], out.shape[-1])


Linear = Callable[..., nn.Module]  # PackedLinear or Int8Linear: one module from one or more nn.Linear


class PackedAttention(Attention):
    """Attention with q, k and v from one packed matrix: one matmul where there were three."""

    def __init__(self, attention: Attention, linear: Linear = PackedLinear) -> None:
        with torch.device("meta"):  # an Attention's settings, and linears without weights that go below
            super().__init__(attention.config, attention.layer_index)
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = linear(attention.q_proj, attention.k_proj, attention.v_proj)
        self.o_proj = linear(attention.o_proj)
        self.sizes = [linear.out_features for linear in (attention.q_proj, attention.k_proj, attention.v_proj)]

    def forward(self, x, cos, sin, mask, cache) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        return self.o_proj(self.attend(q, k, v, cos, sin, mask, cache))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`forward` for one token per row (x: B, 1, hidden) after the cached ones, in fewer operations:
        with a single position, the fused projection's output is already (B, heads, 1, head_dim), so q, k
        and v are views of it, and q and k are rotated together in one pass."""
        batch, rotated = x.shape[0], self.n_heads + self.n_kv_heads
        qkv = self.qkv_proj(x).view(batch, rotated + self.n_kv_heads, 1, self.head_dim)
        qk = apply_rope(qkv[:, :rotated], cos, sin)
        keys, values = cache.update(self.layer_index, qk[:, self.n_heads :], qkv[:, rotated:])
        out = self._kernel(qk[:, : self.n_heads], keys, values, None, False)
        return self.o_proj(out.reshape(batch, 1, -1))


class PackedMLP(MLP):
    """The MLP with packed weights; swiglu's gate and up from one matrix."""

    def __init__(self, mlp: MLP, config: ModelConfig, linear: Linear = PackedLinear) -> None:
        with torch.device("meta"):  # an MLP's settings, and linears without weights that go below
            super().__init__(config)
        if self.swiglu:
            del self.gate_proj, self.up_proj
            self.gate_up_proj = linear(mlp.gate_proj, mlp.up_proj)
        else:
            self.up_proj = linear(mlp.up_proj)
        self.down_proj = linear(mlp.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.swiglu:
            return super().forward(x)  # down(gelu(up(x))), up and down packed
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class PackedSmolLM2(SmolLM2):
    """SmolLM2's forward over packed layers and head, made from a model that it leaves as it was."""

    def __init__(self, model: SmolLM2, linear: Linear = PackedLinear) -> None:
        # The model's modules, copied over its own tensors (parameters detached and frozen): every
        # attribute of a SmolLM2, and no weight copied yet. No SmolLM2.__init__: it would allocate.
        shared = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
        shared |= {id(b): b for b in model.buffers()} | {id(model.config): model.config}
        vars(self).update(copy.deepcopy(vars(model), shared))
        self.parameters_before_packing = model.num_parameters()
        for layer in self.layers:
            layer.self_attn = PackedAttention(layer.self_attn, linear)
            layer.mlp = PackedMLP(layer.mlp, self.config, linear)
        self.lm_head = linear(self.lm_head)
        self.eval()

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`forward`'s logits for one token per row after the cached ones, bitwise (tests/test_decode.py),
        with the per-layer bookkeeping cut to what one position needs (`PackedAttention.decode`):
        at batch 1 each operation costs microseconds whatever its size, and a step makes hundreds."""
        x = self.embed_tokens(tokens)
        positions = torch.arange(cache.length, cache.length + 1, device=tokens.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.layers:
            x = x + layer.self_attn.decode(layer.input_layernorm(x), cos, sin, cache)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        cache.length += 1
        return self.lm_head(self.norm(x))

    def num_parameters(self) -> int:
        return self.parameters_before_packing  # the model's it was made from, the packed ones included

    def state_dict(self, *args, **kwargs):
        raise TypeError(
            "a packed model holds its linear weights in oneDNN's layout, not as parameters: "
            "take the state_dict of the model it was packed from"
        )


def pack_for_cpu_inference(model: SmolLM2) -> SmolLM2:
    """`model` packed for CPU inference (a new PackedSmolLM2; `model` is left as it was), or `model`
    itself where oneDNN can't help or it is packed already."""
    if isinstance(model, PackedSmolLM2) or not can_pack(model):
        return model
    return PackedSmolLM2(model)


def quantize_for_cpu_inference(model: SmolLM2) -> SmolLM2:
    """`model` (fp32) with int8 linear weights and everything else in bf16: a new PackedSmolLM2 of
    Int8Linear layers; `model` is left as it was."""
    if model.embed_tokens.weight.dtype != torch.float32:
        raise ValueError("int8 weights are quantized from an fp32 model")
    return PackedSmolLM2(model, Int8Linear).to(torch.bfloat16)
