"""The SmolLM2 network, top to bottom: norms, rotary embeddings, attention, MLP, block, loss, model.

Generation (the KV cache, sampling, the decoding loop) lives in smollm2.generation; here `forward`
merely takes a cache to fill.

Parameter names follow Hugging Face's Llama (`layers.0.self_attn.q_proj.weight`, ...), so that
conversion to and from transformers is a renaming of the prefix, nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from smollm2.config import ModelConfig

try:  # the flash-attn package: used on CUDA when installed and model.attention = flash_attn2
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - not installed on CPU machines
    flash_attn_func = None


# ---------------------------------------------------------------------------------------------
# Norms


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as Llama does, then cast back: bf16 variance loses too many bits.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings (the "rotate half" layout of Llama / transformers)


def rope_frequencies(config: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float32, device=device) / config.head_dim
    return 1.0 / (config.rope_theta**exponents)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (T) or (B, T) -> cos, sin broadcastable to (B, H, T, head_dim), computed in fp32.

    sin comes with its first half negated, so that rotating half is a roll (see apply_rope).
    """
    angles = positions.float()[..., None] * inv_freq
    cos = torch.cat((angles, angles), dim=-1).cos()
    sin = torch.cat((-angles, angles), dim=-1).sin()
    if positions.dim() == 2:  # one row of positions per sequence: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D): x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1).

    roll(x) = (x2, x1), and the sign lives in sin's first half: one op instead of four.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# ---------------------------------------------------------------------------------------------
# KV cache (decoding keeps each layer's keys and values here)


class KVCache:
    """Preallocated keys and values for every layer; `length` positions are filled."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device, dtype) -> None:
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype).unbind(0)  # a view per layer
        self.values = torch.zeros(shape, device=device, dtype=dtype).unbind(0)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]


# ---------------------------------------------------------------------------------------------
# Attention


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(self.attend(q, k, v, cos, sin, mask, cache))

    def attend(self, q, k, v, cos, sin, mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        """Projected q (B, T, heads * head_dim), k and v (B, T, kv_heads * head_dim) -> (B, T, heads *
        head_dim): split into heads, rotate, extend the cache, attend, and merge the heads again."""
        batch, length, _ = q.shape
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        # Without a mask every query sees the keys up to its own: the causal pattern for a chunk that
        # starts at position 0, and all keys for the single query of a cached decoding step.
        causal = mask is None and length > 1
        out = self._kernel(q, k, v, mask, causal)
        return out.transpose(1, 2).reshape(batch, length, -1)

    def _kernel(self, q, k, v, mask, causal: bool) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v over (B, H, T, D) heads, by the implementation the config names."""
        kind = self.config.attention
        if isinstance(mask, BlockMask):
            return flex_kernel(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        if kind == "flash_attn2" and flash_attn_func is not None and q.is_cuda and mask is None:
            # flash-attn wants (B, T, H, D) and handles grouped KV heads natively.
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return out.transpose(1, 2)
        if kind == "eager":
            return eager_attention(q, k, v, mask, causal)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
        )


_compiled_flex = None


def flex_kernel(on_cuda: bool):
    """flex_attention compiled once (its fused kernel, which skips the blocks a mask leaves empty) on
    CUDA; elsewhere its reference implementation, which is correct but slow (a CPU compiles it for minutes)."""
    global _compiled_flex
    if not on_cuda:
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def eager_attention(q, k, v, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """The reference: softmax(q k^T / sqrt(d)) v, written out."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.float().softmax(dim=-1).to(q.dtype) @ v


# ---------------------------------------------------------------------------------------------
# MLP and block


class MLP(nn.Module):
    """gelu: down(gelu(up(x))); swiglu: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------
# Loss: the head and the cross-entropy in one, chunk by chunk

LOGITS_PER_CHUNK = 2**26  # 256 MB of fp32 logits at a time, whatever the batch


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean cross-entropy(hidden @ weight.T, targets), ignoring targets of -100.

    The same value as F.cross_entropy on the full logits, without ever holding them: with 49k
    words a batch of 16k tokens has 3 GB of fp32 logits, and their gradient as much again. Each
    chunk's gradient is taken while its logits are at hand, so backward is a multiplication. A
    batch whose targets are all ignored has loss 0 (F.cross_entropy would give nan).
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets)
    return _chunked_cross_entropy(hidden, weight, targets, with_grads=False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets):
        loss, grad_hidden, grad_weight = _chunked_cross_entropy(hidden, weight, targets, with_grads=True)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # In place: no second 113 MB weight gradient (a second backward through it raises).
        return grad_hidden.mul_(grad_loss), grad_weight.mul_(grad_loss), None


def _chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, with_grads: bool):
    """hidden (N, d), weight (vocab, d), targets (N) -> loss, and d loss / d hidden, d loss / d weight."""
    device = hidden.device.type
    # The matmuls run in autocast's dtype when it is on, the softmax always in fp32, and the weight
    # gradient is summed over chunks in fp32; casts are explicit, so autocast is off inside.
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)
        counted = targets != -100
        count = counted.sum().clamp(min=1)
        safe_targets = targets.clamp(min=0)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if with_grads else None
        grad_weight = None
        rows = max(1, LOGITS_PER_CHUNK // weight.shape[0])
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            logits = (hidden_c[chunk] @ weight_c.t()).float()
            target_logit = logits.gather(1, safe_targets[chunk, None]).squeeze(1)
            # logsumexp by hand, in place: the exponentials are reused for the softmax below.
            row_max = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(row_max).exp_()
            row_sum = exps.sum(dim=-1, keepdim=True)
            log_total = (row_sum.log() + row_max).squeeze(1)
            loss += ((log_total - target_logit) * counted[chunk]).sum()
            if not with_grads:
                continue
            # d loss / d logits = (softmax - one_hot(target)) * weight of the row, i.e. 1 / count.
            row_weight = counted[chunk] / count
            grad_logits = exps.mul_(row_weight[:, None] / row_sum)
            grad_logits[torch.arange(grad_logits.shape[0], device=hidden.device), safe_targets[chunk]] -= row_weight
            grad_logits = grad_logits.to(dtype)
            grad_hidden[chunk] = grad_logits @ weight_c
            partial = grad_logits.t() @ hidden_c[chunk]
            grad_weight = partial.float() if grad_weight is None else grad_weight.add_(partial)
    grad_weight = grad_weight.to(weight.dtype) if with_grads else None
    return loss / count, grad_hidden, grad_weight


# ---------------------------------------------------------------------------------------------
# Windows that pack several documents


def document_layout(document_ids: torch.Tensor, blocks: bool = False) -> tuple[torch.Tensor, torch.Tensor | BlockMask]:
    """document_ids (B, T), equal along each document's run of tokens -> positions (B, T) that
    restart at 0 with each document, and the boolean mask (B, 1, T, T) that lets a token see the
    earlier tokens of its own document only: each document is computed as if it were alone.
    With `blocks`, the same mask as flex_attention's BlockMask (`document_block_mask`)."""
    length = document_ids.shape[1]
    index = torch.arange(length, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first_of_document = torch.where(starts, index, 0).cummax(dim=1).values
    if blocks:
        return index - first_of_document, document_block_mask(document_ids)
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    return index - first_of_document, (same_document & causal).unsqueeze(1)


def document_block_mask(document_ids: torch.Tensor) -> BlockMask:
    """The same pattern as `document_layout`'s mask, as flex_attention's block mask: blocks of 128 x 128
    that cross no document boundary are skipped or computed without a mask at all."""
    batch, length = document_ids.shape

    def same_document_causal(b, h, q_index, kv_index):
        return (document_ids[b, q_index] == document_ids[b, kv_index]) & (q_index >= kv_index)

    return create_block_mask(same_document_causal, batch, None, length, length, device=document_ids.device)


# ---------------------------------------------------------------------------------------------
# The model

INIT_FUNCTIONS = (
    "normal_",
    "uniform_",
    "kaiming_uniform_",
    "ones_",
    "zeros_",
)  # what nn.Linear, nn.Embedding and we draw with


class SmolLM2(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 / Llama init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
        std = self.config.init_std
        for name, param in self.named_parameters():
            if param.dim() == 1:
                nn.init.ones_(param) if name.endswith("weight") else nn.init.zeros_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(param, 0.0, std)
        self.inv_freq.copy_(rope_frequencies(self.config, self.inv_freq.device))

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab); with `targets`, the mean cross-entropy instead (ignore_index -100).

        positions (B, T) and a boolean mask (B, 1, T, keys) are needed only for padded batches and
        cached decoding; plain training passes neither and gets the causal fast path. document_ids
        (B, T) stand for both in windows that pack several documents: see `document_layout`.
        """
        if document_ids is not None:
            # flex_attention has no backward on a CPU (torch 2.13): there the dense mask serves
            blocks = self.config.attention == "flex" and document_ids.is_cuda
            positions, mask = document_layout(document_ids, blocks=blocks)
        if mask is None and cache is not None and cache.length > 0 and input_ids.shape[1] > 1:
            raise ValueError("several new tokens after cached ones need an explicit mask")
        x = self.embed_tokens(input_ids)
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x)
        return linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())

    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, 1, vocab) of one new token per row after the `cache.length` cached ones, every
        row at the same position (no padding): decoding's inner loop. Here it is `forward`; a model
        made for decoding (cpu_packing.PackedSmolLM2) does the same arithmetic with fewer operations."""
        return self(tokens, cache=cache)

    @classmethod
    def with_weights(cls, config: ModelConfig, load: Callable[[SmolLM2], None]) -> SmolLM2:
        """A model whose every weight `load` fills in (a checkpoint's, a model folder's), built without
        drawing random initial weights first: for 135M parameters that took 2 of a 5-second start-up
        here. torch.nn.init's functions do nothing while it is built, as in transformers' loading."""
        drawing = {name: getattr(nn.init, name) for name in INIT_FUNCTIONS}
        try:
            for name in INIT_FUNCTIONS:
                setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
            model = cls(config)
        finally:
            for name, function in drawing.items():
                setattr(nn.init, name, function)
        load(model)
        return model

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once


def parameter_breakdown(config: ModelConfig) -> dict[str, int]:
    """The parameters of each part of a model with this config, counted on one block without
    allocating anything: as fast for 300,000 layers as for 3. The head is 0 when tied."""

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        block = Block(config, 0)
        parts = {
            "embeddings": count(nn.Embedding(config.vocab_size, config.hidden_size)),
            "attention": count(block.self_attn),
            "mlp": count(block.mlp),
            "norms": count(block.input_layernorm) + count(block.post_attention_layernorm),
            "final norm": count(make_norm(config)),
            "head": 0 if config.tie_embeddings else config.vocab_size * config.hidden_size,
        }
    parts["layer"] = parts["attention"] + parts["mlp"] + parts["norms"]
    parts["total"] = parts["embeddings"] + config.n_layers * parts["layer"] + parts["final norm"] + parts["head"]
    return parts


def parameter_count(config: ModelConfig) -> int:
    """The parameters of a model with this config, counted without allocating it."""
    return parameter_breakdown(config)["total"]
