"""Hugging Face interop: our model <-> a transformers Llama folder (config.json + safetensors).

Llama expresses the SmolLM2 family exactly when norm = rmsnorm and mlp = swiglu. Other configs
(the seed's LayerNorm + GELU) are saved in our own format: the same safetensors and a
`smollm2_config.json`, loadable by `load_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from smollm2.config import ModelConfig, model_config_from_dict
from smollm2.errors import UserError, error_reason, file_in_folder, read_json_file, reading
from smollm2.files import build_folder, check_replaceable, write_atomic
from smollm2.model import SmolLM2
from smollm2.tokenizer import Tokenizer, load_tokenizer

NATIVE_CONFIG = "smollm2_config.json"
# What an earlier smollm2 wrote into a model folder (before folders carried a marker).
MODEL_FILES = frozenset(
    {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        NATIVE_CONFIG,
        "tokenizer.json",
        "tokenizer_config.json",
    }
)


def llama_incompatibility(config: ModelConfig) -> str | None:
    if config.norm != "rmsnorm":
        return f"model.norm={config.norm}"
    if config.mlp != "swiglu":
        return f"model.mlp={config.mlp}"
    return None


def require_llama(config: ModelConfig) -> None:
    problem = llama_incompatibility(config)
    if problem:
        raise UserError(f"cannot export to transformers: {problem} has no Llama equivalent (needs rmsnorm + swiglu)")


def to_llama_config(config: ModelConfig, tokenizer: Tokenizer | None = None) -> dict:
    require_llama(config)
    eos_id = tokenizer.eos_id if tokenizer else None
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": config.init_std,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def from_llama_config(raw: dict, source: str) -> ModelConfig:
    """A transformers Llama config.json as our ModelConfig, type- and range-checked (ModelConfig's own
    validation) before anything is computed from it."""
    if raw.get("model_type") != "llama":
        raise UserError(f"{source}: model_type {raw.get('model_type')!r} is not supported (llama only)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"{source}: rope scaling {rope.get('rope_type')!r} is not supported")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise UserError(f"{source}: biases in linear layers are not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (silu only)")
    kv_heads = raw.get("num_key_value_heads")
    settings = {
        "n_layers": raw["num_hidden_layers"],
        "hidden_size": raw["hidden_size"],
        "n_heads": raw["num_attention_heads"],
        "n_kv_heads": raw["num_attention_heads"] if kv_heads is None else kv_heads,
        "intermediate_size": raw["intermediate_size"],
        "vocab_size": raw["vocab_size"],
        "norm": "rmsnorm",
        "norm_eps": raw.get("rms_norm_eps", 1e-6),
        "mlp": "swiglu",
        "rope_theta": rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
        "max_seq_len": raw.get("max_position_embeddings", 2048),
        "tie_embeddings": raw.get("tie_word_embeddings", False),
    }
    config = model_config_from_dict(settings, source)
    if raw.get("head_dim", config.head_dim) != config.head_dim:
        raise UserError(f"{source}: head_dim {raw['head_dim']!r} != hidden_size / heads is not supported")
    return config


def to_hf_state_dict(model: SmolLM2) -> dict[str, torch.Tensor]:
    """Our names with transformers' `model.` prefix; a tied head is stored once, as embeddings."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if not model.config.tie_embeddings:
                state[name] = tensor
        else:
            state[f"model.{name}"] = tensor
    # a model on the meta device (layout checks without memory) keeps its tensors there
    return {k: v.detach() if v.is_meta else v.detach().contiguous().cpu() for k, v in state.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    ours = {name.removeprefix("model."): tensor for name, tensor in state.items()}
    if config.tie_embeddings:
        ours.pop("lm_head.weight", None)
        ours["lm_head.weight"] = ours["embed_tokens.weight"]
    return ours


def save_pretrained(model: SmolLM2, folder: str | Path, tokenizer: Tokenizer | None = None) -> str:
    """Write the model (and tokenizer) to `folder`; 'llama' when transformers loads it, else 'native'."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Not save_file: since safetensors 0.8 it writes through a tempfile created 0600 (safetensors#782).
    # Bytes through write_atomic get the umask's mode (0644), like every other file of the folder.
    write_atomic(folder / "model.safetensors", save(to_hf_state_dict(model), metadata={"format": "pt"}))
    if llama_incompatibility(model.config) is None:
        _write_json(folder / "config.json", to_llama_config(model.config, tokenizer))
        generation = {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id} if tokenizer else {}
        end_of_turn = tokenizer.backend.token_to_id("<|im_end|>") if tokenizer and tokenizer.chat_template else None
        if end_of_turn is not None and end_of_turn != tokenizer.eos_id:  # a chat reply ends there too
            generation["eos_token_id"] = [tokenizer.eos_id, end_of_turn]
        _write_json(folder / "generation_config.json", generation)
        kind = "llama"
    else:
        _write_json(folder / NATIVE_CONFIG, dataclasses.asdict(model.config))
        kind = "native"
    if tokenizer is not None:
        tokenizer.save_hf(folder, model.config.max_seq_len)
    return kind


def write_model_folder(
    model: SmolLM2, folder: str | Path, tokenizer: Tokenizer | None = None, run_id: str | None = None
) -> str:
    """save_pretrained into a new folder built beside `folder` and swapped in: no stale file of an
    older model survives, and a folder smollm2 did not write is refused, not replaced. A run's
    final/ records the run's id in its marker."""
    folder = Path(folder)
    check_replaceable(folder, "model", "the model folder", MODEL_FILES)
    with build_folder(folder, "model", **({"run_id": run_id} if run_id else {})) as staging:
        kind = save_pretrained(model, staging, tokenizer)
    return kind


def export_llama(model: SmolLM2, folder: str | Path, tokenizer: Tokenizer | None = None) -> None:
    """Like write_model_folder, but refuses, in one line, a config transformers cannot load."""
    require_llama(model.config)
    write_model_folder(model, folder, tokenizer)


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> tuple[SmolLM2, Tokenizer | None]:
    """Load a transformers Llama folder (e.g. a downloaded SmolLM2-135M) or one of our own, with its
    tokenizer (refused when it has ids past the model's vocab_size)."""
    folder = Path(folder)
    model = load_model(folder)
    tokenizer = load_tokenizer(folder, model.config.vocab_size) if (folder / "tokenizer.json").is_file() else None
    return model.to(device), tokenizer


def load_model(folder: Path) -> SmolLM2:
    """The model of a model folder, its weights checked (`load_weights`)."""
    config = read_model_config(folder)
    state = from_hf_state_dict(read_weights(folder), config)
    return SmolLM2.with_weights(config, lambda model: load_weights(model, state, folder))


def load_weights(model: SmolLM2, weights: dict, source: str | Path) -> None:
    """Load a state dict from elsewhere (a model folder, a checkpoint) into `model`, or say in one line
    which tensor does not belong: a missing or unexpected name, another shape, or what `check_tensor`
    refuses."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    if missing or unexpected:
        raise UserError(
            f"{source}: the weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in weights.items():
        check_tensor(name, tensor, source)
        if tensor.shape != expected[name].shape:
            raise UserError(
                f"{source}: weight {name} has shape {list(tensor.shape)}, the config needs {list(expected[name].shape)}"
            )
    model.load_state_dict(weights)


def check_tensor(name: str, tensor: object, source: str | Path) -> None:
    """A weight from elsewhere is a tensor of finite floating point numbers: torch would cast integers
    or complex numbers silently, and NaN or infinity would surface only as a crash in sampling."""
    if not isinstance(tensor, torch.Tensor):
        raise UserError(f"{source}: weight {name} is not a tensor")
    if not tensor.is_floating_point():
        raise UserError(f"{source}: weight {name} is {str(tensor.dtype).removeprefix('torch.')}, not floating point")
    if not bool(torch.isfinite(tensor).all()):
        raise UserError(f"{source}: weight {name} holds values that are not finite (NaN or infinity)")


def read_model_config(folder: Path) -> ModelConfig:
    """The architecture of a model folder: our smollm2_config.json, or transformers' Llama config.json."""
    folder = Path(folder)
    if (folder / NATIVE_CONFIG).is_file():
        path = file_in_folder(folder, NATIVE_CONFIG)
        raw = read_json_file(path, "a smollm2 model config")
        with reading(path, "a smollm2 model config"):
            return model_config_from_dict(raw, str(path))
    if (folder / "config.json").is_file():
        path = file_in_folder(folder, "config.json")
        raw = read_json_file(path, "a Llama config")
        with reading(path, "a complete Llama config"):
            return from_llama_config(raw, str(path))
    raise UserError(f"{folder}: no config.json (not a Hugging Face model folder)")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder: model.safetensors, or the shards its index names (each a file
    inside the folder)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        index = file_in_folder(folder, index.name)
        weight_map = read_json_file(index, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index}: not a safetensors index (no weight_map of tensor names to shard files)")
        shards = list(weight_map.values())
        if not all(isinstance(shard, str) for shard in shards):
            raise UserError(f"{index}: not a safetensors index (a shard file name that is not a string)")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(shards)):
            tensors = _load_safetensors(file_in_folder(folder, shard, named_by=index))
            twice = sorted(state.keys() & tensors.keys())
            if twice:
                raise UserError(f"{index}: tensor {twice[0]} is in two shards (one is {shard})")
            state |= tensors
        return state
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"{folder}: no model.safetensors (only safetensors weights are read)")
    return _load_safetensors(file_in_folder(folder, "model.safetensors"))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for damaged files
        raise UserError(f"{path}: not a readable safetensors file ({error_reason(exc, 100)})") from None


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")
