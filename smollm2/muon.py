"""Muon for the hidden matrices, AdamW for the rest, as one optimizer the trainer steps and saves.

Muon orthogonalizes each matrix's momentum (Newton-Schulz), so it needs the whole matrix: under
FSDP2 a parameter is a DTensor holding a row shard, and `GatheringMuon` gathers the update, runs
Newton-Schulz on the whole matrix on every rank, and keeps its own rows. The elementwise parts run
on the shards, exactly as torch.optim.Muon runs them on whole tensors, so 1 and N processes agree.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.optim._muon import _adjust_lr

# torch's Muon scales each matrix's update to the RMS AdamW's would have (Moonshot's rule), so
# train.muon_lr lives on AdamW's scale and a recipe's learning rates compare directly.
ADJUST_LR = "match_rms_adamw"


def hidden_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The 2-D weights inside the transformer blocks (attention q/k/v/o, MLP): Muon's share.
    Embeddings, the head (tied or not), norms and biases are AdamW's."""
    return [(f"layers.{name}", p) for name, p in model.layers.named_parameters() if p.dim() == 2]


def adamw_groups(model: nn.Module, exclude: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW's groups of the parameters not in `exclude`: weight decay on matrices, none on
    norms, biases or the embedding (empty groups left out)."""
    taken = {id(p) for p in exclude}
    embedding = model.embed_tokens.weight
    rest = [p for p in model.parameters() if id(p) not in taken]
    decay = [p for p in rest if p.dim() >= 2 and p is not embedding]
    no_decay = [p for p in rest if p.dim() < 2 or p is embedding]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


class GatheringMuon(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz step sees whole matrices when parameters are FSDP2 shards,
    and runs in `ns_dtype`: the run's matmul precision (torch's always uses bf16).

    The update is torch's (its `_single_tensor_muon`, step for step); only the orthogonalization
    gathers (`full_tensor`) and cuts the result back to this rank's rows (`distribute_tensor`
    without communication: every rank computed the same whole matrix)."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **settings) -> None:
        super().__init__(params, **settings)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
        grad, buffer, momentum = param.grad, state["momentum_buffer"], group["momentum"]
        buffer.lerp_(grad, 1 - momentum)
        update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
        update = orthogonalized(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
        lr = group["lr"]
        param.mul_(1 - lr * group["weight_decay"])
        param.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))


def orthogonalized(
    update: torch.Tensor, coefficients: tuple, steps: int, eps: float, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Newton-Schulz on the whole matrix: gathered first when `update` is a DTensor shard."""
    if not hasattr(update, "full_tensor"):
        return newton_schulz(update, coefficients, steps, eps, dtype)
    from torch.distributed.tensor import distribute_tensor

    whole = newton_schulz(update.full_tensor(), coefficients, steps, eps, dtype)
    return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)


def newton_schulz(
    matrix: torch.Tensor, coefficients: tuple, steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration (bit for bit in bf16), in `dtype`: on a CPU
    whose bf16 matmuls are slower than fp32 (AVX-512 without AMX: 0.5x), bf16 makes Muon's steps dearer."""
    a, b, c = coefficients
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.to(dtype).T if tall else matrix.to(dtype)  # iterate on the smaller Gram matrix
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1 (not in place: in fp32, x may be the momentum)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class MuonWithAdamW:
    """Two optimizers the trainer treats as one: `param_groups` (Muon's, then AdamW's) for the
    schedule, `step`, `zero_grad`, and one state dict numbered as a single optimizer numbers its
    parameters, so a checkpoint holds one optimizer state whatever the world that wrote it."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.optimizers = [muon, adamw]

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for optimizer in self.optimizers for p, s in optimizer.state.items()}

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for optimizer in self.optimizers:
            part = optimizer.state_dict()
            state |= {index + offset: value for index, value in part["state"].items()}
            groups += [group | {"params": [i + offset for i in group["params"]]} for group in part["param_groups"]]
            offset += sum(len(group["params"]) for group in part["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        counts = [len(optimizer.param_groups) for optimizer in self.optimizers]
        if len(groups) != sum(counts):
            raise ValueError(f"{len(groups)} parameter groups saved, Muon and AdamW have {sum(counts)}")
        for optimizer, start, count in zip(self.optimizers, (0, counts[0]), counts, strict=True):
            mine = groups[start : start + count]
            indices = [i for group in mine for i in group["params"]]
            renumber = {old: new for new, old in enumerate(indices)}
            optimizer.load_state_dict(
                {
                    "state": {renumber[i]: state_dict["state"][i] for i in indices if i in state_dict["state"]},
                    "param_groups": [group | {"params": [renumber[i] for i in group["params"]]} for group in mine],
                }
            )


def parts(optimizer) -> Iterator[torch.optim.Optimizer]:
    """The torch optimizers inside `optimizer` (itself, or a MuonWithAdamW's two)."""
    return iter(getattr(optimizer, "optimizers", [optimizer]))
