"""Typed configuration: YAML sections -> dataclasses, `section.key=value` overrides, validation.

Every user mistake becomes a `ConfigError` (a `UserError`) whose one-line message names the key
and the file; the CLI turns it into a line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from smollm2.errors import UserError, error_reason, reading

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "TrainConfig", "UserError", "load_config"]

BYTE_LEVEL_ALPHABET = 256  # a trained byte-level BPE starts from every byte
SPECIAL_TOKEN_COUNT = 3  # <|endoftext|>, <|im_start|>, <|im_end|> (smollm2.tokenizer)
# Bounds that catch a mistyped size before any work (a 3-billion-token vocabulary would allocate
# terabytes after tokenizing): far above what this trainer is for, far below what breaks a machine.
MAX_VOCAB = 2**24
MAX_PARAMETERS = 10**11
MAX_POSITIONS = 2**21
MAX_MICRO_BATCH_TOKENS = 2**24
SEED_LIMIT = 2**63  # torch.manual_seed and numpy both take seeds in [0, 2**63)
COUNT_LIMIT = 2**63  # steps and counts are int64 in a checkpoint (numpy, torch): a larger one is no count of ours
# A YAML document's values counted through its aliases: a config has tens, an alias bomb 10**9 in 1 KB.
MAX_YAML_NODES = 100_000


class ConfigError(UserError):
    pass


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxdict, _SHOWN.maxset = 3, 4, 4, 4, 4
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 60, 60, 40
SHOWN_CHARACTERS = 160


def shown(value: Any) -> str:
    """`value` for an error message, at most SHOWN_CHARACTERS long: a few items of a few levels, a long
    text cut in the middle. It never walks the whole value, which YAML aliases can make 10**9 items
    from a file of 1 KB."""
    try:
        text = _SHOWN.repr(value)
    except ValueError:  # an integer of more digits than Python will print
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= SHOWN_CHARACTERS else text[: SHOWN_CHARACTERS - 4] + " ..."


@dataclass
class ModelConfig:
    n_layers: int = 12
    hidden_size: int = 768
    n_heads: int = 12
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head attention)
    intermediate_size: int = 3072
    vocab_size: int = 32000
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # flex: document masks as flex_attention block masks on CUDA (the dense mask with SDPA on a CPU)
    attention: Literal["sdpa", "eager", "flash_attn2", "flex"] = "sdpa"
    init_std: float = 0.02
    # Start from these weights (a transformers Llama folder, a final/ folder or a checkpoint .pt): the
    # architecture and tokenizer come from there (smollm2.pretrained).
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def architecture_rows(self) -> list[tuple[str, str]]:
        """The architecture in words, a row per part: the one description `info`, the Space card
        and the app all show."""
        return [
            ("architecture", f"decoder-only, {self.n_layers} layers x {self.hidden_size} wide, pre-norm {self.norm}"),
            (
                "attention",
                f"{self.n_heads} query heads, {self.n_kv_heads} key/value heads of {self.head_dim}, "
                f"rotary positions (theta {self.rope_theta:g})",
            ),
            ("feed-forward", f"{self.mlp}, {self.intermediate_size} hidden"),
            ("vocabulary", f"{self.vocab_size:,} BPE tokens, {'tied' if self.tie_embeddings else 'untied'} head"),
        ]

    def describe(self) -> str:
        return "; ".join(text for _, text in self.architecture_rows())


@dataclass
class DataConfig:
    path: str = "input.txt"
    tokenizer: str = "train"  # "train" or a path to tokenizer.json / a Hugging Face tokenizer folder
    text_field: str = "text"  # the field of a .jsonl record, or the column of a .parquet file, that holds the text
    seq_len: int = 512
    val_fraction: float = 0.1
    prepared_dir: str | None = None  # None = data/<corpus name>-<vocab size> under the run folder
    format: Literal["text", "chat"] = "text"  # chat: {"messages": [...]} per line, loss on the assistant's tokens
    # A weighted mixture instead of data.path: [{path, weight, text_field?, name?}, ...] (smollm2.mixture),
    # kept as written (a resume compares it, a checkpoint saves it); `mixture()` is the checked, typed list
    sources: list[dict] | None = None
    document_mask: bool = False  # attention and positions restart at each end-of-text token

    def mixture(self, where: str = "the config") -> list[Source]:
        """data.sources parsed and checked: one `Source` each, in the order written."""
        return parse_sources(self.sources, self.text_field, where)


@dataclass(frozen=True)
class Source:
    """One entry of data.sources, checked, with its defaults filled in."""

    name: str
    path: str
    weight: float
    text_field: str


@dataclass
class TrainConfig:
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    schedule: Literal["cosine", "wsd"] = "cosine"
    schedule_steps: int | None = None  # None = the first run's --train_steps
    decay_fraction: float = 0.2  # wsd: the share of the schedule spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    # muon: torch.optim.Muon for the blocks' 2-D matrices (smollm2.muon), AdamW above for the rest
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 4e-3  # on AdamW's scale (match_rms_adamw); the schedule scales it as it scales lr
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: Literal["auto", True, False] = "auto"  # auto: on for CUDA, off on a CPU (0.98x there, BENCHMARKS.md)
    grad_checkpointing: bool = False
    eval_every: int = 500
    eval_batches: int = 20
    eval_tasks: list[str] = field(default_factory=list)  # lm-eval tasks (names or .yaml files) at each evaluation
    eval_limit: int = 50  # examples of each eval task per evaluation: a sample, the same one every time
    predict_every: int = 500
    predict_tokens: int = 64
    save_every: int = 1000
    keep_last: int = 3
    prompts: list[str] = field(default_factory=lambda: ["ROMEO:", "First Citizen:\n"])
    wandb: bool = False
    wandb_project: str = "smollm2"
    parallel: Literal["ddp", "fsdp"] = "ddp"  # used under torchrun
    eval_allow_code: bool = False  # eval_tasks files may run Python (!function, evaluate metrics, use_prompt files)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str = "<defaults>"  # where the config came from, for error messages
    model_keys_set: frozenset[str] = frozenset()  # the model keys the file or --set gave (init_from checks them)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a dataclass field's type; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if not any(value == a and type(value) is type(a) for a in allowed):  # 1 is not true
            choices = ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)
            raise ConfigError(f"{where}: {shown(value)} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {shown(value)}")
        return [_coerce(v, item_type, where) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, str) and _looks_numeric(value):  # YAML 1.1 reads "1e-5" as a string
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: must be a finite number, got {shown(value)}")
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is dict:
        if isinstance(value, dict):
            return value
    type_name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{where}: expected {type_name}, got {shown(value)}")


def _build_section(cls: type, values: dict[str, Any], section: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{section}.{key} in {source}"
        if key not in known:
            raise ConfigError(f"unknown key {section}.{key} in {source}")
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.lr=1e-3' -> ('train', 'lr', 0.001).

    A key whose type is a string (data.path, data.tokenizer, model.init_from, ...) keeps the text
    exactly as given: YAML would read `shakespeare #es.txt` as `shakespeare` and a line break as a
    space. Any other value is read as YAML (numbers, booleans, lists, mappings), and refused where
    that reading would drop or fold what was written (a comment, a line break inside a string)."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"--set {shown(text)}: expected section.key=value, e.g. train.lr=1e-3")
    if section not in SECTIONS:
        raise ConfigError(f"--set {shown(text)}: unknown section {shown(section)} (model, data, train)")
    annotation = typing.get_type_hints(SECTIONS[section]).get(name)
    if annotation in STRING_TYPES:
        return section, name, _string_override(raw, may_unset=annotation is not str)
    if not raw.strip():
        return section, name, None
    value = _yaml_override(raw, text)
    if isinstance(value, str) and _looks_numeric(raw):  # YAML 1.1 reads "1e-3" as a string
        value = float(raw)
    return section, name, value


STRING_TYPES = (str, str | None)
UNSET = ("", "null", "~")  # what unsets a key that may be unset (data.prepared_dir, model.init_from), as in YAML


def _string_override(raw: str, may_unset: bool) -> str | None:
    """The text as given; nothing (None) only for an empty value, or `null` where the key may be unset."""
    if raw == "" or (may_unset and raw in UNSET):
        return None
    return raw


def _yaml_override(raw: str, text: str) -> Any:
    """`raw` read as YAML; text that is not YAML stays text (its key's type check says what is wrong)."""
    loader = yaml.SafeLoader(raw)
    try:
        node = loader.get_single_node()
        _refuse_huge_yaml(node, f"--set {shown(text)}")
        _refuse_lossy_reading(node, raw, text)
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError:
        return raw
    except RecursionError:
        raise ConfigError(f"--set {shown(text)}: the value is nested too deeply") from None
    finally:
        loader.dispose()


def _refuse_huge_yaml(node: yaml.Node | None, what: str) -> None:
    """Refuse a YAML document of more than MAX_YAML_NODES values counted through its aliases (an alias
    bomb: each error message, comparison or copy would walk all of them), or one that holds itself.
    Each node is counted once, with what it holds remembered: linear in the text, not in what it expands to."""
    sizes: dict[int, int] = {}  # id(node) -> its size expanded; -1 while it is being counted

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known == -1:
            raise ConfigError(f"{what}: a YAML value holds itself (an alias inside its own anchor)")
        if known is not None:
            return known
        sizes[id(node)] = -1
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_YAML_NODES:
                raise ConfigError(
                    f"{what}: more than {MAX_YAML_NODES:,} YAML values counted through its aliases (*name): "
                    "too large for a config (an alias bomb?)"
                )
        sizes[id(node)] = total
        return total

    if node is not None:
        size(node)


def _refuse_lossy_reading(node: yaml.Node | None, raw: str, text: str) -> None:
    """A YAML comment is dropped and a line break inside a string becomes a space: either would
    change the value without a word, so either is refused."""
    scalars = _scalar_nodes(node, [], set())
    spans = [(s.start_mark.index, s.end_mark.index) for s in scalars]
    comment = next((at for at, ch in enumerate(raw) if ch == "#" and not any(a <= at < b for a, b in spans)), None)
    if comment is not None:
        raise ConfigError(
            f"--set {shown(text)}: {shown(raw[comment:])} is a YAML comment, which would be dropped from the value: "
            'remove it, or put the text that holds it in quotes ("...")'
        )
    if any(s.style != "|" and "\n" in raw[s.start_mark.index : s.end_mark.index] for s in scalars):
        raise ConfigError(
            f"--set {shown(text)}: YAML reads a line break inside a string as a space; write it as \\n in double quotes"
        )


def _scalar_nodes(node: yaml.Node | None, found: list[yaml.ScalarNode], seen: set[int]) -> list[yaml.ScalarNode]:
    if node is None or id(node) in seen:
        return found
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        found.append(node)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _scalar_nodes(item, found, seen)
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _scalar_nodes(key, found, seen)
            _scalar_nodes(value, found, seen)
    return found


def _looks_numeric(raw: str) -> bool:
    try:
        float(raw)
    except ValueError:
        return False
    return True


def config_from_dict(raw: dict[str, Any], source: str, overrides: list[str] = ()) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections model, data, train")
    sections: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {shown(section)} in {source} (model, data, train)")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"section {shown(section)} in {source} must be a mapping")
        sections[section] = dict(values)
    for text in overrides:
        section, name, value = parse_override(text)
        sections.setdefault(section, {})[name] = value
    where = source + (" (with --set)" if overrides else "")
    config = Config(
        **{name: _build_section(cls, sections.get(name, {}), name, where) for name, cls in SECTIONS.items()},
        source=source,
        model_keys_set=frozenset(sections.get("model", {})),
    )
    _expand_home(config, where)
    validate(config, where)
    return config


# The keys that name a file or folder (and data.sources' paths, train.eval_tasks' files).
PATH_KEYS = (("model", "init_from"), ("data", "path"), ("data", "tokenizer"), ("data", "prepared_dir"))


def _expand_home(config: Config, where: str) -> None:
    for section, name in PATH_KEYS:
        values = getattr(config, section)
        value = getattr(values, name)
        if isinstance(value, str):
            setattr(values, name, home_path(value, f"{section}.{name} in {where}"))
    tasks = config.train.eval_tasks
    config.train.eval_tasks = [home_path(task, f"train.eval_tasks in {where}") for task in tasks]


def home_path(path: str, at: str) -> str:
    """`path` with a leading ~ or ~user made that home folder, as a shell does (a shell leaves the ~ of
    `--set data.path=~/x` as it is); one that names no user is refused, never made a folder named ~."""
    if not path.startswith("~"):
        return path
    expanded = os.path.expanduser(path)
    if expanded.startswith("~"):
        raise ConfigError(f"{at}: {shown(path)} starts with ~ but names no home folder; write the folder out")
    return expanded


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with reading(path, "a smollm2 config"):  # YAML nested too deeply, a number too large for a float, ...
        try:
            raw = _load_yaml(path.read_text(encoding="utf-8"), path) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML ({error_reason(exc)})") from None
        return config_from_dict(raw, str(path), overrides)


def _load_yaml(text: str, path: Path) -> Any:
    """yaml.safe_load, but a key given twice in one mapping is refused (safe_load keeps the last, silently)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_huge_yaml(node, str(path))
        _refuse_duplicate_keys(node, "", path, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node: yaml.Node, where: str, path: Path, seen: set[int]) -> None:
    if id(node) in seen:  # an alias met again (recursive aliases included)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and key.tag != "tag:yaml.org,2002:merge":
                if name in keys:
                    raise ConfigError(f"{path}: duplicate key {where}{name} (given twice; keep one)")
                keys.add(name)
            _refuse_duplicate_keys(value, f"{where}{name}." if name is not None else where, path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, where, path, seen)


def model_config_from_dict(raw: Any, source: str) -> ModelConfig:
    """A model section alone (a checkpoint's, a model folder's), type-checked and validated."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of model settings")
    config = _build_section(ModelConfig, raw, "model", source)
    if config.init_from is not None:
        config.init_from = home_path(config.init_from, f"model.init_from in {source}")
    validate_model(config, source)
    return config


def validate_model(model: ModelConfig, where: str) -> None:
    for name in (
        "n_layers",
        "hidden_size",
        "n_heads",
        "n_kv_heads",
        "intermediate_size",
        "vocab_size",
        "max_seq_len",
        "norm_eps",
        "rope_theta",
        "init_std",
    ):
        _positive("model", name, getattr(model, name), where)
    if model.hidden_size % model.n_heads:
        raise ConfigError(
            f"model.hidden_size in {where}: {model.hidden_size} is not divisible by model.n_heads={model.n_heads}"
        )
    if model.n_heads % model.n_kv_heads:
        raise ConfigError(
            f"model.n_kv_heads in {where}: model.n_heads={model.n_heads} is not divisible by "
            f"n_kv_heads={model.n_kv_heads}"
        )
    if model.head_dim % 2:
        raise ConfigError(
            f"model.n_heads in {where}: head dim {model.head_dim} (hidden_size / n_heads) must be even for RoPE"
        )
    _check_sizes(model, where)


def _check_sizes(model: ModelConfig, where: str) -> None:
    if model.vocab_size > MAX_VOCAB:
        raise ConfigError(
            f"model.vocab_size in {where}: {model.vocab_size:,} tokens is more than {MAX_VOCAB:,} "
            "(the largest tokenizers in use have about 256,000)"
        )
    if model.max_seq_len > MAX_POSITIONS:
        raise ConfigError(
            f"model.max_seq_len in {where}: {model.max_seq_len:,} positions is more than {MAX_POSITIONS:,} "
            "(the rotary tables hold every position)"
        )
    parameters = approximate_parameters(model)
    if parameters > MAX_PARAMETERS:
        raise ConfigError(
            f"model in {where}: about {parameters:,} parameters, more than {MAX_PARAMETERS:,} "
            f"({MAX_PARAMETERS * 4 // 10**9} GB of fp32 weights before the optimizer's state)"
        )


def approximate_parameters(model: ModelConfig) -> int:
    """The weight matrices' parameters, for the size bound only (norms left out); the exact count,
    from the model's own modules, is smollm2.model.parameter_count."""
    kv = model.n_kv_heads * (model.hidden_size // model.n_heads)
    attention = 2 * model.hidden_size * model.hidden_size + 2 * model.hidden_size * kv
    mlp = (3 if model.mlp == "swiglu" else 2) * model.hidden_size * model.intermediate_size
    heads = 1 if model.tie_embeddings else 2
    return model.n_layers * (attention + mlp) + heads * model.vocab_size * model.hidden_size


def _positive(section: str, name: str, value: float, where: str) -> None:
    if value <= 0:
        raise ConfigError(f"{section}.{name} in {where}: must be positive, got {shown(value)}")


def validate(config: Config, where: str) -> None:
    """Every value checked before anything is written: ranges, and what the values must agree on."""
    model, data, train = config.model, config.data, config.train
    validate_model(model, where)
    _positive("data", "seq_len", data.seq_len, where)
    if data.seq_len > model.max_seq_len:
        raise ConfigError(f"data.seq_len in {where}: {data.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    if not data.text_field:
        raise ConfigError(f"data.text_field in {where}: must name a field, e.g. text")
    if not 0 <= data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction in {where}: must be in [0, 1), got {shown(data.val_fraction)}")
    if data.sources is not None:
        if data.format == "chat":
            raise ConfigError(
                f"data.sources in {where}: mixtures are of text; data.format: chat reads conversations from data.path"
            )
        data.mixture(where)
    for name in (
        "batch_size",
        "grad_accum",
        "lr",
        "muon_lr",
        "eval_every",
        "eval_batches",
        "eval_limit",
        "predict_every",
        "predict_tokens",
        "save_every",
        "keep_last",
    ):
        _positive("train", name, getattr(train, name), where)
    if train.batch_size * data.seq_len > MAX_MICRO_BATCH_TOKENS:
        raise ConfigError(
            f"train.batch_size in {where}: {train.batch_size:,} x data.seq_len {data.seq_len:,} is "
            f"{train.batch_size * data.seq_len:,} tokens a micro-batch, more than {MAX_MICRO_BATCH_TOKENS:,} "
            "(for larger batches raise train.grad_accum)"
        )
    for name in ("min_lr", "warmup_steps", "weight_decay", "muon_weight_decay", "grad_clip"):
        if getattr(train, name) < 0:
            raise ConfigError(f"train.{name} in {where}: must not be negative, got {shown(getattr(train, name))}")
    if train.schedule_steps is not None:
        _positive("train", "schedule_steps", train.schedule_steps, where)
        if train.schedule_steps >= COUNT_LIMIT:
            raise ConfigError(
                f"train.schedule_steps in {where}: must be below 2**63 (a checkpoint holds it as int64), "
                f"got {shown(train.schedule_steps)}"
            )
    if not 0 <= train.decay_fraction <= 1:
        raise ConfigError(f"train.decay_fraction in {where}: must be in [0, 1], got {shown(train.decay_fraction)}")
    for name in ("beta1", "beta2", "muon_momentum"):
        if not 0 <= getattr(train, name) < 1:
            raise ConfigError(f"train.{name} in {where}: must be in [0, 1), got {shown(getattr(train, name))}")
    if not 0 <= train.seed < SEED_LIMIT:
        raise ConfigError(f"train.seed in {where}: must be in [0, 2**63), got {shown(train.seed)}")
    smallest_vocab = BYTE_LEVEL_ALPHABET + SPECIAL_TOKEN_COUNT
    if data.tokenizer == "train" and model.vocab_size < smallest_vocab:
        raise ConfigError(
            f"model.vocab_size in {where}: a trained byte-level tokenizer needs at least {smallest_vocab} "
            f"tokens (256 bytes + {SPECIAL_TOKEN_COUNT} special), got {shown(model.vocab_size)}"
        )
    if train.min_lr > train.lr:
        raise ConfigError(f"train.min_lr in {where}: {train.min_lr} is above train.lr={train.lr}")


# ---------------------------------------------------------------------------------------------
# data.sources

SOURCE_KEYS = ("path", "weight", "text_field", "name")


def parse_sources(raw: object, default_text_field: str, where: str) -> list[Source]:
    """data.sources: a non-empty list of {path, weight[, text_field, name]}, checked."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"data.sources in {where}: expected a list of {{path, weight}} mappings")
    sources = [_parse_source(item, f"data.sources[{i}] in {where}", default_text_field) for i, item in enumerate(raw)]
    if not any(s.weight > 0 for s in sources):
        raise ConfigError(f"data.sources in {where}: the weights are all zero; give at least one a positive weight")
    if not math.isfinite(sum(s.weight for s in sources)):
        raise ConfigError(
            f"data.sources in {where}: the weights add up to more than a number holds (past 1.8e308); "
            "scale them down: only their ratios count"
        )
    names = [s.name for s in sources]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise ConfigError(f"data.sources in {where}: two sources are named {shown(twice)}; give one a name: key")
    return sources


def _parse_source(item: object, at: str, default_text_field: str) -> Source:
    if not isinstance(item, dict):
        raise ConfigError(f"{at}: expected a mapping {{path, weight}}, got {shown(item)}")
    unknown = sorted(set(item) - set(SOURCE_KEYS))
    if unknown:
        raise ConfigError(f"{at}: unknown key {shown(unknown[0])} ({', '.join(SOURCE_KEYS)})")
    path, weight = item.get("path"), item.get("weight")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{at}: path must name a file, folder or glob")
    if isinstance(weight, str) and _looks_numeric(weight):  # YAML 1.1 reads "1e-2" as a string
        weight = float(weight)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ConfigError(f"{at}: weight must be a finite number, got {shown(weight)}")
    if weight < 0:
        raise ConfigError(f"{at}: weight must not be negative, got {shown(weight)}")
    text_field = item.get("text_field", default_text_field)
    name = item.get("name", _default_name(path))
    for key, value in (("text_field", text_field), ("name", name)):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{at}: {key} must be a non-empty string, got {shown(value)}")
    if not re.fullmatch(r"[\w.-]+", name):
        raise ConfigError(f"{at}: name {shown(name)} may hold only letters, digits, '_', '-' and '.'")
    return Source(name=name, path=home_path(path, f"{at}: path"), weight=float(weight), text_field=text_field)


def _default_name(path: str) -> str:
    stem = Path(path.rstrip("/").replace("*", "all")).stem
    return re.sub(r"[^\w.-]", "-", stem) or "source"
