"""model.init_from: a run that starts from published or earlier weights.

The source (a transformers Llama folder such as a downloaded SmolLM2, a run's final/, or a
checkpoint .pt) gives the architecture, the tokenizer and the weights; nothing else of it is
taken (a fresh optimizer and schedule, step 0). `--checkpoint_path` is another thing: the whole
state of a run, continued.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from smollm2.checkpoint import Checkpoint
from smollm2.config import Config, ConfigError, ModelConfig, model_config_from_dict, validate
from smollm2.errors import UserError
from smollm2.model_source import ModelSource, open_tokenizer

FREE_KEYS = ("init_from", "attention", "init_std")  # the kernel is the machine's choice; init_std is unused


def source_architecture(path: Path) -> ModelConfig:
    """The architecture the weights at `path` were made with, or one line saying it is not a model."""
    if not path.exists():
        raise UserError(f"model.init_from: {path} does not exist (a model folder or a checkpoint .pt)")
    return ModelSource.open(path, "model.init_from").config()


def resolve_init_from(config: Config, resume: Checkpoint | None = None, checkpoint: str | None = None) -> Config:
    """The config with the architecture and tokenizer of model.init_from; a config that says otherwise
    (a model key set to another value, another tokenizer) is refused in one line. A resumed run
    (`resume`, read from `checkpoint`) takes both from its checkpoint: the source may be gone."""
    if not config.model.init_from:
        return config
    spec = str(Path(config.model.init_from).expanduser())  # a config file may say ~/...
    if resume is None:
        source, tokenizer = source_architecture(Path(spec)), resolve_tokenizer(config, spec)
    else:
        source, tokenizer = resumed_source(config, spec, resume, str(checkpoint))
    for key in sorted(config.model_keys_set - set(FREE_KEYS)):
        ours, theirs = getattr(config.model, key), getattr(source, key)
        if not same_value(ours, theirs):
            raise ConfigError(
                f"model.{key}={ours!r} in {config.source} contradicts model.init_from {spec} ({key}={theirs!r}): "
                f"the architecture comes from the weights; leave model.{key} out"
            )
    model = dataclasses.replace(source, init_from=spec, attention=config.model.attention)
    data = dataclasses.replace(config.data, tokenizer=tokenizer)
    resolved = dataclasses.replace(config, model=model, data=data)
    validate(resolved, f"{config.source} (with model.init_from {spec})")
    return resolved


def same_value(ours: object, theirs: object) -> bool:
    """Equal, numbers within a relative 1e-6: a float32 copy (a GGUF conversion's 9.999999747e-06)
    is the same norm_eps as a config's 1e-05."""
    if isinstance(ours, float) or isinstance(theirs, float):
        return (
            isinstance(ours, (int, float))
            and isinstance(theirs, (int, float))
            and math.isclose(ours, theirs, rel_tol=1e-6)
        )
    return ours == theirs


def resumed_source(config: Config, spec: str, resume: Checkpoint, checkpoint: str) -> tuple[ModelConfig, str]:
    """The architecture and tokenizer of a resumed init_from run: its checkpoint's, not the source's."""
    started_from = resume.config["model"].get("init_from")
    if started_from is None or str(Path(started_from).expanduser()) != spec:
        raise ConfigError(
            f"model.init_from {spec} in {config.source}: the checkpoint's run started from "
            f"{started_from or 'scratch'}; a resume continues the checkpoint's weights, so keep its model.init_from"
        )
    ours = config.data.tokenizer
    if resume.tokenizer is None:  # a checkpoint older than tokenizers in checkpoints: the source must still be there
        return source_architecture(Path(spec)), resolve_tokenizer(config, spec)
    if ours not in ("train", spec, resume.config.get("data", {}).get("tokenizer")):
        if open_tokenizer(ours).hash != resume.tokenizer_hash:
            raise ConfigError(
                f"data.tokenizer {ours} in {config.source} is not the tokenizer of the run it resumes: "
                "leave data.tokenizer out (or train) to keep the checkpoint's"
            )
    return model_config_from_dict(resume.config["model"], checkpoint), checkpoint


def resolve_tokenizer(config: Config, spec: str) -> str:
    """data.tokenizer becomes the source's; one given that is another tokenizer is refused."""
    ours = config.data.tokenizer
    theirs = open_tokenizer(spec)
    if ours != "train" and ours != spec and open_tokenizer(ours).hash != theirs.hash:
        raise ConfigError(
            f"data.tokenizer {ours} in {config.source} is not the tokenizer of model.init_from {spec}: "
            "leave data.tokenizer out (or train) to use the weights' own"
        )
    return spec


def initial_weights(spec: str) -> dict[str, torch.Tensor]:
    """The state dict of SmolLM2 at model.init_from (only the weights)."""
    return ModelSource.open(spec, "model.init_from").weights()
