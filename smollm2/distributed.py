"""Parallelism, applied from outside the model: torch.distributed set-up for torchrun (or anything
that sets RANK / WORLD_SIZE / LOCAL_RANK), `parallelize` (activation checkpointing, DDP / FSDP2,
compile), and whole-tensor state dicts whatever the world that wrote them."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from smollm2.config import TrainConfig
from smollm2.muon import parts


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> World:
    """Join the process group when launched by torchrun; a plain `python train.py` is a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), size)
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return world


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(world: World) -> torch.device:
    return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def parallelize(model: nn.Module, world: World, train: TrainConfig) -> nn.Module:
    """The module the training step calls, made from the plain model from outside it: activation
    checkpointing per block, then DDP or FSDP2 across processes, then torch.compile.

    `model` itself stays the handle for everything else (optimizer, state dicts, evaluation,
    generation): checkpointing and FSDP change it in place without renaming a parameter.
    """
    if train.grad_checkpointing:
        checkpoint_blocks(model)
    wrapped = wrap(model, world, train.parallel)
    return torch.compile(wrapped) if compiles(train, device_for(world)) else wrapped


def compiles(train: TrainConfig, device: torch.device) -> bool:
    """`train.compile: auto` compiles on CUDA, where Python overhead is what the card waits on; on a
    CPU compiling measured 0.98x eager and costs a minute of start-up."""
    return device.type == "cuda" if train.compile == "auto" else train.compile


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them (training only)."""
    for block in model.layers:
        plain_forward = block.forward

        def forward(*args, _block=block, _plain=plain_forward):
            if _block.training and torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False)
            return _plain(*args)

        block.forward = forward


def wrap(model: nn.Module, world: World, parallel: str) -> nn.Module:
    """DDP, or FSDP2's fully_shard, when there is more than one process."""
    if world.size == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [world.local_rank] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device_ids)


def is_sharded(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")  # what fully_shard adds


def no_sync(model: nn.Module, last_micro_step: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on all but the last micro-step."""
    if last_micro_step:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if is_sharded(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# Checkpoints hold whole tensors keyed as a single process keys them, whatever the world that wrote
# them: an FSDP run's checkpoint resumes in one process, or under DDP, and the other way round.


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Whole model and optimizer state dicts (on the CPU under FSDP; every rank must call this)."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, by_name = get_state_dict(model, list(parts(optimizer)), options=options)
    names = _optimizer_names(model, optimizer)
    index = {name: i for i, name in enumerate(names)}
    optimizer_state = {
        "state": {index[name]: value for name, value in by_name.get("state", {}).items() if name in index},
        "param_groups": [
            group | {"params": [index[name] for name in group["params"]]} for group in by_name.get("param_groups", [])
        ],
    }
    return model_state, optimizer_state


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a whole optimizer state dict (as full_state_dicts writes it) into a plain or sharded model's."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _optimizer_names(model, optimizer)
    by_name = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [group | {"params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(model, list(parts(optimizer)), by_name, options=StateDictOptions(full_state_dict=True))


def mean_across_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


@contextlib.contextmanager
def main_rank_first(world: World):
    """Rank 0 runs the block first (e.g. writes files); the other ranks run it once it is done."""
    if not world.is_main:
        barrier()
    yield
    if world.is_main:
        barrier()


def from_main_rank(value: float) -> float:
    """Rank 0's value on every rank (a measurement each rank made, so that they all decide alike)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.broadcast(tensor, src=0)
    return tensor.item()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
