"""Evaluation: benchmarks through lm-evaluation-harness, and held-out text in bits per byte.

`SmolLM2Harness` is our model as an lm-eval model (registered as "smollm2"): log-likelihoods of
continuations, rolling log-likelihoods of whole texts, and greedy or sampled generation with our KV
cache, batched. The harness owns everything else: tasks, prompts, few-shot examples, metrics.

`text_metrics` scores a text file as a language model would continue it: loss per token,
perplexity and bits per byte. Bits per byte divide by the text's bytes, not its tokens, so models
with different tokenizers compare on the same text.

Data sets come from the local Hugging Face cache unless a download is asked for: a task whose data
is not there is one line, never a hang on a machine without network.

A task file is data, not code: its `!function`s and the metrics HF evaluate would load for it are
refused unless code is allowed, and its templates (doc_to_text, doc_to_target, doc_to_choice, ...)
always render in the bounded sandbox of template_sandbox.py (`sandboxed_templates`), which no template
gets out of, nor past its bounds of size and work.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jinja2
import lm_eval.api.metrics  # noqa: F401 - fills lm-eval's registry of its own metrics
import lm_eval.models  # noqa: F401 - lm-eval's own models first: it reads an empty registry as "import them"
import lm_eval.tasks
import lm_eval.utils
import torch
import yaml
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import metric_registry, register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.utils import (
    get_rolling_token_windows,
    handle_non_serializable,
    make_disjoint_window,
    simple_parse_args_string,
)

from smollm2.checkpoint import peek_checkpoint
from smollm2.config import TrainConfig
from smollm2.data import check_token_ids, read_meta, read_tokens
from smollm2.errors import CONTENT_ERRORS, UserError, error_reason, read_utf8, reading
from smollm2.files import inside_another, write_atomic
from smollm2.generation import Sampling, stream
from smollm2.metrics import EVAL_PREFIX
from smollm2.model import SmolLM2
from smollm2.run_folder import RunFolder
from smollm2.template_sandbox import MAX_RENDER_CHARS, BoundedEnvironment, BoundedTemplate
from smollm2.tokenizer import Tokenizer

OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
DEFAULT_MAX_GEN_TOKENS = 256  # lm-eval's default for generate_until tasks that set none


def stay_offline(download: bool = False) -> None:
    """Data sets from the local cache only (unless `download`), before datasets or the hub client
    read their settings; where they were imported already, their settings are set too."""
    if download:
        return
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        config = sys.modules["datasets.config"]
        config.HF_DATASETS_OFFLINE = config.HF_HUB_OFFLINE = True


def quiet_data_set_bars() -> None:
    """datasets draws a bar on stderr while it reads a task's data files into its cache the first
    time ("Generating test split"), and lm-eval while it builds a task's requests ("Building contexts",
    a bar without a title) and tokenizes them ("Tokenizing inputs"): not lines of ours, each over in a
    moment, so the commands turn them off (the tests do too)."""
    import datasets
    import lm_eval.api.task

    datasets.disable_progress_bars()
    for module in (lm_eval.api.task, lm_eval.api.model):  # each calls the tqdm it imported
        module.tqdm = undrawn_bar


def undrawn_bar(*args, **kwargs):
    """A tqdm that is never drawn, whatever `disable` its caller says (lm-eval passes False)."""
    from tqdm import tqdm

    return tqdm(*args, **(kwargs | {"disable": True}))


# ---------------------------------------------------------------------------------------------
# Scoring token windows: the one forward pass every measure here goes through


@torch.inference_mode()
def continuation_logprobs(model: SmolLM2, sequences: list[list[int]], scored: list[int]) -> list[torch.Tensor]:
    """The log-probabilities (scored[i], vocab) over the positions that predict the last
    `scored[i]` tokens of each sequence, given the tokens before them.

    Sequences (at most max_seq_len + 1 tokens) are right-padded into one batch: with causal
    attention, padding after a sequence changes nothing before it, so no mask is needed."""
    device = model.embed_tokens.weight.device
    inputs = [sequence[:-1] for sequence in sequences]
    batch = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long)
    for row, tokens in enumerate(inputs):
        batch[row, : len(tokens)] = torch.tensor(tokens)
    logits = model(batch.to(device))
    return [
        logits[row, len(tokens) - count : len(tokens)].float().log_softmax(dim=-1)
        for row, (tokens, count) in enumerate(zip(inputs, scored, strict=True))
    ]


def total_and_greedy(logprobs: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    """The summed log-probability of `targets` under (len(targets), vocab) log-probabilities, and
    whether every target was the likeliest token."""
    targets = torch.tensor(targets, device=logprobs.device)
    picked = logprobs.gather(1, targets[:, None]).squeeze(1)
    return float(picked.sum()), bool((logprobs.argmax(dim=-1) == targets).all())


def score(model: SmolLM2, sequences: list[list[int]], scored: list[int]) -> list[tuple[float, bool]]:
    """(summed log-probability, all greedy?) of the last `scored[i]` tokens of each sequence."""
    logprobs = continuation_logprobs(model, sequences, scored)
    return [
        total_and_greedy(rows, sequence[-count:])
        for rows, sequence, count in zip(logprobs, sequences, scored, strict=True)
    ]


def batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def score_windows(model: SmolLM2, windows: list[tuple[list[int], int]], batch_size: int) -> list[tuple[float, bool]]:
    """`score` over (sequence, scored) windows, batch_size at a time."""
    results = []
    for chunk in batched(windows, batch_size):
        results += score(model, [sequence for sequence, _ in chunk], [count for _, count in chunk])
    return results


def rolling_windows(tokens: list[int], prefix: int, window: int, stride: int) -> list[tuple[list[int], int]]:
    """A text's tokens as (sequence, scored) windows of at most `window` inputs that score every
    token once: the first window scores its tokens after `prefix`; each next one moves by `stride`
    tokens and scores those, seeing up to window - stride tokens before them."""
    pairs = get_rolling_token_windows(tokens, prefix, window, context_len=window - stride + 1)
    return [(context + predicted, len(predicted)) for context, predicted in map(make_disjoint_window, pairs)]


# ---------------------------------------------------------------------------------------------
# Held-out text


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--text {path}: " + ("a folder: give a text file" if path.is_dir() else "no such file"))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--text {path}: not UTF-8 text (byte {exc.start} is not)") from None
    if not text.strip():
        raise UserError(f"--text {path}: the file is empty")
    return text


def text_metrics(
    model: SmolLM2,
    tokenizer: Tokenizer,
    text: str,
    stride: int | None = None,
    batch_size: int = 4,
    window: int | None = None,
) -> dict[str, float]:
    """Loss per token, perplexity and bits per byte of `text`, every token scored once, in windows
    of `window` tokens (default: the model's context) moved by `stride` tokens (default: half the
    window); the first token is scored after the tokenizer's end-of-text token."""
    tokens = tokenizer.encode(text)
    return token_metrics(model, tokenizer, tokens, len(text.encode("utf-8")), stride, batch_size, window)


def token_metrics(
    model: SmolLM2,
    tokenizer: Tokenizer,
    tokens: list[int],
    n_bytes: int,
    stride: int | None = None,
    batch_size: int = 4,
    window: int | None = None,
) -> dict[str, float]:
    """text_metrics of text already tokenized: `tokens`, which spell `n_bytes` bytes of text."""
    context = model.config.max_seq_len
    window = context if window is None else window
    if not 2 <= window <= context:
        raise UserError(f"--window must be between 2 and the model's context ({context}), got {window}")
    stride = window // 2 if stride is None else stride
    if not 1 <= stride <= window:
        raise UserError(f"--stride must be between 1 and the window ({window} tokens), got {stride}")
    if tokenizer.eos_id is None:
        raise UserError("the tokenizer has no end-of-text token to score the text's first token after")
    windows = rolling_windows(tokens, tokenizer.eos_id, window, stride)
    total = sum(logprob for logprob, _ in score_windows(model, windows, batch_size))
    loss = -total / len(tokens)
    return {
        "tokens": len(tokens),
        "bytes": n_bytes,
        "window": window,
        "stride": stride,
        "loss_per_token": loss,
        "perplexity": math.exp(min(loss, 700)),
        "bits_per_byte": -total / (n_bytes * math.log(2)),
    }


def held_out_split(source: str | Path, tokenizer: Tokenizer) -> tuple[list[int], int, Path]:
    """The tokens of the held-out split of the run `source` belongs to, the bytes they spell and its
    file: the val.bin of the run's one prepared corpus, tokenized by `tokenizer`. End-of-text tokens
    stay (validation scores them: a document's end is part of its text); they spell no bytes."""
    run = RunFolder.containing(Path(source))
    if run is None:
        raise UserError(f"--split val: {source} is not in a run folder (RUN, RUN/final or RUN/checkpoints/step_N.pt)")
    folders = [folder for folder in sorted(run.data.glob("*")) if read_meta(folder) is not None]
    if len(folders) != 1:
        found = "no prepared corpus" if not folders else f"{len(folders)} prepared corpora (a mixture?)"
        raise UserError(f"--split val: {run.data} holds {found}; give --text FILE instead")
    meta = read_meta(folders[0])
    if meta.get("tokenizer_hash") != tokenizer.hash:
        raise UserError(f"--split val: {folders[0]} was tokenized by another tokenizer than the model's")
    if not meta["val_tokens"]:
        raise UserError(f"--split val: {folders[0]} has no held-out tokens (data.val_fraction was 0)")
    file = folders[0] / "val.bin"
    ids = read_tokens(file, meta["dtype"])
    vocabulary = f"the {tokenizer.id_limit} ids of the model's tokenizer"  # no more than its rows (model_source)
    check_token_ids(ids, f"--split val: {file}", tokenizer.id_limit, vocabulary)
    tokens = ids.tolist()
    text = tokenizer.decode([token for token in tokens if token != tokenizer.eos_id])
    return tokens, len(text.encode("utf-8")), file


def trained_length(source: str | Path) -> int | None:
    """The data.seq_len the run of `source` trained on (its checkpoint's, or the run's latest one's):
    positions past it were never trained, so --split val scores in windows of it by default."""
    run = RunFolder.containing(Path(source))
    checkpoint = Path(source) if Path(source).is_file() else run.latest_checkpoint() if run else None
    config = peek_checkpoint(checkpoint, "config") if checkpoint else None
    seq_len = config.get("data", {}).get("seq_len") if isinstance(config, dict) else None
    return seq_len if isinstance(seq_len, int) and seq_len >= 2 else None


# ---------------------------------------------------------------------------------------------
# The lm-eval model


@register_model("smollm2")
class SmolLM2Harness(TemplateLM):
    """Our model as an lm-eval model. `--model smollm2 --model_args checkpoint=CKPT` (or model=DIR;
    also precision=auto|fp32|bf16 and device) loads one through create_from_arg_*; the trainer
    gives the constructor the model it is training."""

    def __init__(self, model: SmolLM2, tokenizer: Tokenizer, batch_size: int = 8) -> None:
        super().__init__()
        if tokenizer.eos_id is None:
            raise UserError("the tokenizer has no end-of-text token, which lm-eval needs")
        self.network, self.tok = model.eval(), tokenizer
        self.batch_size = batch_size
        self._device = model.embed_tokens.weight.device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> SmolLM2Harness:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> SmolLM2Harness:
        from smollm2.inference import load_for_inference

        settings = {k: v for k, v in (additional_config or {}).items() if v is not None} | dict(arg_dict)
        sources = [settings[key] for key in ("checkpoint", "model") if settings.get(key)]
        if len(sources) != 1:
            raise UserError("the smollm2 lm-eval model takes one of checkpoint=CKPT or model=DIR")
        device = str(settings.get("device") or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's CLI asks for cuda by default
            device = "cpu"
        model, tokenizer = load_for_inference(sources[0], device, str(settings.get("precision", "auto")), pack=False)
        return cls(model, tokenizer, batch_size_from(settings.get("batch_size", 8)))

    # -- what TemplateLM asks of a model ------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.network.config.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(strings, context tokens, continuation tokens) -> (log-probability, greedy?) each; the
        context is cut from the left to fit the model's context; longest first, in batches.
        Requests that differ only in a one-token continuation (the choices of many multiple-choice
        tasks) share one forward pass, as in lm-eval's hf backend."""
        limit = self.max_length + 1
        collator = Collator(
            requests,
            sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
            group_by="contexts",
            group_fn=lambda r: r[1] + r[2][:-1],
        )
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            sequences = [(context + continuation)[-limit:] for _, context, continuation in chunk]
            logprobs = continuation_logprobs(self.network, sequences, [len(c) for _, _, c in chunk])
            for (strings, context, continuation), rows in zip(chunk, logprobs, strict=True):
                for shared_strings, shared_continuation, shared_rows in collator.get_cache(
                    strings, context, continuation, rows[None]
                ):
                    result = total_and_greedy(shared_rows[0], shared_continuation)
                    self.cache_hook.add_partial("loglikelihood", shared_strings, result)
                    results.append(result)
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood in disjoint windows of the model's context (lm-eval's
        convention for perplexity tasks: the stride is the whole context)."""
        results = []
        for (text,) in (request.args for request in requests):
            windows = rolling_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, self.max_length)
            total = sum(logprob for logprob, _ in score_windows(self.network, windows, self.batch_size))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations with our KV cache, batched by generation settings, cut at the stop strings."""
        eos = self.tok.decode([self.eot_token_id])  # a stop string too, as lm-eval's backends have it
        collator = Collator(
            [request.args for request in requests],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, request_settings = [context for context, _ in chunk], chunk[0][1]
            settings = normalize_gen_kwargs(dict(request_settings), DEFAULT_MAX_GEN_TOKENS)
            until = handle_stop_sequences(settings.pop("until", None), eos=eos)
            for context, text in zip(contexts, self.continue_texts(contexts, until, settings), strict=True):
                text = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", (context, request_settings), text)
                results.append(text)
        return collator.get_original(results)

    def continue_texts(self, contexts: list[str], until: list[str], settings: dict) -> list[str]:
        """Each context (cut from the left to leave room) continued until its end-of-text token, or
        until every row holds a stop string, or max_gen_toks new tokens. Special tokens are left out
        of the text, as lm-eval's hf backend leaves them out."""
        new_tokens = max(1, min(int(settings["max_gen_toks"]), self.max_length - 1))
        prompts = [self.tok_encode(c)[-(self.max_length - new_tokens) :] or [self.prefix_token_id] for c in contexts]
        produced: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        generator = torch.Generator(device=self._device).manual_seed(int(settings.get("seed", 1234)))
        sampling, eos = sampling_of(settings), self.eot_token_id
        for step in stream(self.network, prompts, new_tokens, sampling, eos_id=eos, generator=generator):
            for row, token in enumerate(step.tolist()):
                finished[row] = finished[row] or token == eos
                if not finished[row]:
                    produced[row].append(token)
            texts = [self.tok_decode(tokens) for tokens in produced]
            if all(done or any(stop in text for stop in until) for done, text in zip(finished, texts, strict=True)):
                break
        return [self.tok_decode(tokens) for tokens in produced]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.backend.decode(tokens, skip_special_tokens=True)


def batch_size_from(value) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise UserError(f"batch_size must be a whole number of sequences, got {value!r}") from None
    if size < 1:
        raise UserError(f"batch_size must be at least 1, got {size}")
    return size


def sampling_of(settings: dict) -> Sampling:
    """lm-eval's generation settings as ours: greedy unless do_sample with a temperature above 0."""
    temperature = float(settings.get("temperature") or 0.0)
    if not settings.get("do_sample") or temperature == 0:
        return Sampling(temperature=0)
    return Sampling(temperature, int(settings.get("top_k") or 0), float(settings.get("top_p") or 1.0))


# ---------------------------------------------------------------------------------------------
# Tasks


@dataclass
class Tasks:
    """lm-eval tasks by name or YAML config, each known to exist; their data is read when they run."""

    manager: TaskManager  # where names are looked up
    specs: list  # task names, and configs (dicts) of task YAML files
    files: tuple[Path, ...] = ()  # the task files given (named, and --include_path's), as given


@functools.cache
def task_manager(include_path: str | None, with_lm_eval_tasks: bool) -> TaskManager:
    """lm-eval's index of tasks; building the index of its own thousands takes seconds, so it is
    built once a process, and not at all when only task files are named."""
    return TaskManager(include_path=include_path, include_defaults=with_lm_eval_tasks)


def load_tasks(names: Iterable[str], include_path: str | None = None, allow_code: bool = False) -> Tasks:
    """lm-eval task names (or paths of task YAML files), each checked to exist; task files that run
    Python code (see `task_code`) are refused unless `allow_code`, before any of it is imported."""
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise UserError("--tasks names no task (e.g. --tasks hellaswag,arc_easy)")
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include_path {include_path}: no such folder")
    files = [name for name in names if name.endswith(".yaml")]
    for name in files:
        if not Path(name).is_file():
            raise UserError(f"task file {name}: no such file")
    check_task_files(files, include_path, allow_code)
    folder = str(Path(include_path).resolve()) if include_path is not None else None  # the cache's key: not cwd's
    manager = task_manager(folder, with_lm_eval_tasks=len(files) < len(names))
    for name in names:
        if name not in files and not manager.match_tasks([name]):
            raise UserError(
                f"unknown task {name!r} (`lm-eval ls tasks` lists them; a task of your own: its .yaml path)"
            )
    specs = [load_task_file(name) if name in files else name for name in names]
    given = [Path(name) for name in files] + (sorted(Path(include_path).rglob("*.yaml")) if include_path else [])
    return Tasks(manager, specs, tuple(given))


LM_EVAL_TASKS = Path(lm_eval.tasks.__file__).resolve().parent  # lm-eval's own tasks: installed code, trusted as such
CODE_FLAGS = "--allow_code (eval) or train.eval_allow_code: true (training)"


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads a task file as lm-eval does, but a `!function` tag is only noted, never imported."""

    functions: list[str]


def _note_function(loader: _TaskYamlLoader, node: yaml.Node) -> str:
    loader.functions.append(str(loader.construct_scalar(node)))
    return ""


_TaskYamlLoader.add_constructor("!function", _note_function)


def task_code(path: Path, strict: bool = True, seen: frozenset[Path] = frozenset()) -> str | None:
    """The first Python that loading a task file (or a file it includes) would run, said in words:
    a `!function NAME`, which lm-eval imports from beside the file, or what `settings_code` finds
    (a metric HF evaluate loads a Python script for, a prompt file read with yaml.full_load). None
    when there is none; lm-eval's own task files are not counted. `strict`: a file that is not a task
    file is one line, else skipped; one too large or too deep to walk (`check_task_shape`) is refused either way."""
    path = path.expanduser().resolve()
    if path in seen or path.is_relative_to(LM_EVAL_TASKS):
        return None  # an include cycle (lm-eval names it when it loads the task), or lm-eval's own file
    try:
        config, functions = read_task_file(path)
    except UserError as error:
        if strict or isinstance(error, TaskShapeError):  # lm-eval would read it all the same
            raise
        return None
    if functions:
        return f"!function {functions[0]}, imported from beside the file"
    code = settings_code(config)
    if code:
        return code
    includes = config.get("include")
    for include in includes if isinstance(includes, list) else [includes] if includes else []:
        found = task_code(path.parent / str(include), strict, seen | {path})
        if found:
            return found
    return None


def settings_code(settings: object) -> str | None:
    """The first Python that a task file's settings (a group's inline tasks too) would have run,
    said in words: a metric lm-eval hands to HF evaluate, whose evaluate.load imports a Python script
    for it (a path to one, or a module from the hub's cache): one not in lm-eval's registry of its
    own metrics, or one marked `hf_evaluate: true`; or a `use_prompt` from a YAML file, which lm-eval
    reads with yaml.full_load, a loader that builds Python objects."""
    if isinstance(settings, list):
        return next(filter(None, map(settings_code, settings)), None)
    if not isinstance(settings, dict):
        return None
    prompt = settings.get("use_prompt")
    if isinstance(prompt, str) and ".yaml" in prompt.split(":")[0]:
        return f"use_prompt {prompt}, read with yaml.full_load, which builds Python objects"
    metrics = settings.get("metric_list")
    for entry in metrics if isinstance(metrics, list) else []:
        name = entry.get("metric") if isinstance(entry, dict) else None
        if isinstance(name, str) and name and (entry.get("hf_evaluate") is True or name not in metric_registry):
            return f"metric {name}, loaded by HF evaluate"
    return next(filter(None, map(settings_code, settings.values())), None)


def read_task_file(path: Path) -> tuple[dict, list[str]]:
    """A task file's settings and the `!function` names in it (noted, not imported). Text nested
    deeper than Python recurses is one line (`errors.reading`); so is anything `check_task_shape` refuses."""
    if not path.is_file():
        raise UserError(f"task file {path}: no such file")
    loader = _TaskYamlLoader(read_utf8(path))
    loader.functions = []
    try:
        with reading(path, "an lm-eval task file"):
            node = loader.get_single_node()
            if node is not None:
                check_task_shape(node, path)
            config = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise UserError(f"task file {path}: not valid YAML ({where}{getattr(exc, 'problem', None) or exc})") from None
    finally:
        loader.dispose()
    if not isinstance(config, dict):
        raise UserError(f"task file {path}: expected a YAML mapping of task settings, got {type(config).__name__}")
    return config, loader.functions


# yaml.safe_load keeps an alias as one shared value, so nine aliases of nine aliases ... ("billion
# laughs") load at once, but every walk of the settings (ours for task code, lm-eval's) visits 9**9
# values, and an alias inside its own value is a loop. lm-eval's own 14,000 task files hold at most
# ~800 values, 8 levels deep: these bounds refuse none of them.
MAX_TASK_VALUES = 100_000
MAX_TASK_DEPTH = 64


class TaskShapeError(UserError):
    """A task file whose settings would be too large or too deep to walk, or a loop (`check_task_shape`)."""


def check_task_shape(node: yaml.Node, path: Path) -> None:
    """A task file's YAML, as its settings will be once its aliases are expanded: at most
    MAX_TASK_VALUES values, MAX_TASK_DEPTH levels deep, no alias inside its own value; one line otherwise."""
    _values_under(node, path, 1, {}, set())


def _values_under(node: yaml.Node, path: Path, depth: int, known: dict[int, tuple[int, int]], open_: set[int]) -> int:
    """The values `node` expands to, counting a shared (aliased) node each time it is used; `known`
    holds each node's (values, levels) once counted, so the walk is as long as the file, not as its expansion."""
    if id(node) in open_:
        raise TaskShapeError(f"task file {path}: an alias refers to itself (an anchor used inside its own value)")
    values, levels = known.get(id(node), (0, 0))
    if depth + levels - 1 > MAX_TASK_DEPTH or (not values and depth > MAX_TASK_DEPTH):
        raise TaskShapeError(f"task file {path}: nested deeper than {MAX_TASK_DEPTH} levels")
    if values:
        return values
    children = node.value if isinstance(node, yaml.SequenceNode) else []
    if isinstance(node, yaml.MappingNode):
        children = [item for pair in node.value for item in pair]
    open_.add(id(node))
    values = 1 + sum(_values_under(child, path, depth + 1, known, open_) for child in children)
    open_.discard(id(node))
    if values > MAX_TASK_VALUES:
        raise TaskShapeError(
            f"task file {path}: its aliases expand to more than {MAX_TASK_VALUES:,} values "
            "(lm-eval's own task files hold at most about 800): refusing to read it"
        )
    levels = 1 + max((known[id(child)][1] for child in children), default=0)
    known[id(node)] = (values, levels)
    return values


def check_task_files(files: list[str], include_path: str | None, allow_code: bool) -> None:
    """Named task files (and the files they include) must be task files; those, or any in
    --include_path, that would run Python code are refused unless `allow_code`."""
    candidates = [(Path(name), True) for name in files]
    if include_path is not None:
        candidates += [(path, False) for path in sorted(Path(include_path).rglob("*.yaml"))]
    for path, strict in candidates:
        code = task_code(path, strict)
        if code and not allow_code:
            raise UserError(f"task file {path} runs Python code ({code}): if you trust it, allow it with {CODE_FLAGS}")


UNKNOWN_TASK_KEY = re.compile(r"TaskConfig\.__init__\(\) got an unexpected keyword argument '([^']*)'")


def refuse_unknown_task_key(exc: TypeError, tasks: Tasks) -> None:
    """lm-eval builds a task as TaskConfig(**its settings), so a key it does not know (`foo: 1`) is a
    TypeError from deep inside it: refused in one line naming the key and the given task file (or a
    file it includes) that holds it. Any other TypeError is left to its caller to raise as it is."""
    match = UNKNOWN_TASK_KEY.search(str(exc))
    if match is None:
        return
    holder = next(filter(None, (file_with_key(path, match[1]) for path in tasks.files)), None)
    where = f"task file {holder}" if holder is not None else "a task file"
    raise UserError(f"{where}: unknown key {match[1]!r} (not a setting of an lm-eval task): remove or rename it")


def file_with_key(path: Path, key: str, seen: frozenset[Path] = frozenset()) -> Path | None:
    """`path` when its settings hold `key`, else the first file it includes that does (None: none)."""
    if path.resolve() in seen:
        return None
    try:
        config, _ = read_task_file(path)
    except UserError:  # not a task file: lm-eval built no task of it
        return None
    if key in config:
        return path
    includes = config.get("include")
    for include in includes if isinstance(includes, list) else [includes] if includes else []:
        found = file_with_key(path.parent / str(include), key, seen | {path.resolve()})
        if found is not None:
            return found
    return None


def load_task_file(name: str) -> dict:
    """lm-eval's reading of a task file (its !function code imported); its failures are one line."""
    try:
        return load_yaml(str(Path(name).absolute()), resolve_func=True)
    except (ValueError, ImportError, AttributeError, OSError, yaml.YAMLError) as exc:
        raise UserError(f"task file {name}: {error_reason(exc, 160)}") from None


def run_tasks(
    lm: TemplateLM, tasks: Tasks, limit: int | None = None, num_fewshot: int | None = None, log_samples: bool = False
) -> dict:
    """lm-eval's simple_evaluate over `tasks` (from load_tasks); a data set that is neither cached
    nor downloadable is one line."""
    from lm_eval import simple_evaluate

    with held_warnings():
        try:
            with quiet_git_hash(), sandboxed_templates():
                return simple_evaluate(
                    model=lm,
                    tasks=tasks.specs,
                    task_manager=tasks.manager,
                    limit=limit,
                    num_fewshot=num_fewshot,
                    log_samples=log_samples,
                    bootstrap_iters=1000,
                    verbosity="WARNING",
                )
        except OSError as exc:  # datasets' ConnectionError and FileNotFoundError among them
            raise data_error(exc) from None
        except TypeError as exc:
            refuse_unknown_task_key(exc, tasks)
            raise
        except LITERAL_ERRORS as exc:
            raise unreadable_rendering(exc) from None


# lm-eval reads a rendered doc_to_choice / doc_to_target that looks like a list with ast.literal_eval:
# text a template made nested too deeply for Python's parser fails there, not in the template.
LITERAL_ERRORS = (SyntaxError, RecursionError)


def unreadable_rendering(exc: BaseException) -> UserError:
    return UserError(
        f"a task template rendered text lm-eval could not read as a Python literal "
        f"({type(exc).__name__}: {error_reason(exc, 120)}): check its doc_to_choice / doc_to_target"
    )


class HeldWarnings(logging.Handler):
    """The warnings lm-eval logs while no handler of its own is set up (it sets one up only after
    building the tasks), which Python would print at once: held as lines."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logging.WARNING)
        self.logger, self.lines = logger, []

    def emit(self, record: logging.LogRecord) -> None:
        if self.logger.handlers == [self]:
            self.lines.append(record.getMessage())


@contextlib.contextmanager
def held_warnings() -> Iterator[None]:
    """lm-eval warns about a task file while it builds the task (a metric with no aggregation, say):
    those lines are held for the block, printed once it ends, and dropped when it ends in a refusal,
    whose one line is then all the user sees."""
    logger = logging.getLogger("lm_eval")
    held = HeldWarnings(logger)
    logger.addHandler(held)
    try:
        yield
    except UserError:
        held.lines.clear()
        raise
    finally:
        logger.removeHandler(held)
        for line in held.lines:
            print(line, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Task templates: rendered in a sandbox


# The text of one task prompt, at most. lm-eval keeps a prompt longer than the model's context (the model cuts
# it from the left), so the bound is not the context's but one far past any task's: 4,194,304 characters,
# about a million tokens, 512 times SmolLM2's 8,192, as for a chat template whose context is not known. All one
# rendering makes is 16 times that (64 M characters, a few hundred MB at worst); steps and time as a chat template's.
MAX_TASK_PROMPT_CHARS = MAX_RENDER_CHARS


class TaskTemplate(BoundedTemplate):
    """A task template of lm-eval's, rendered by TaskTemplates: a failure to render is one line naming it."""

    source = ""

    def render(self, *args, **kwargs) -> str:
        try:
            return super().render(*args, **kwargs)
        except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as exc:  # its code failed
            raise template_error(exc, self.source) from None


class TaskTemplates(BoundedEnvironment):
    """The bounded sandbox (template_sandbox.py), which refuses a template's reach for attributes that lead
    to Python (a function's __globals__, a class's __subclasses__), its changes to the data it is given,
    and every rendering past its bounds (MAX_TASK_PROMPT_CHARS of text, what it makes, steps, time)."""

    template_class = TaskTemplate
    subject = "a task template"
    chars = MAX_TASK_PROMPT_CHARS

    def from_string(self, source, globals=None, template_class=None) -> TaskTemplate:  # noqa: A002 - jinja2's name
        try:
            template = super().from_string(source, globals, template_class)
        except jinja2.TemplateError as exc:  # not a template (a syntax error)
            raise template_error(exc, str(source)) from None
        template.source = str(source)
        return template


ENVIRONMENT_OPTIONS = (  # what jinja2.Environment() takes, but for its extensions and async mode
    "block_start_string", "block_end_string", "variable_start_string", "variable_end_string",
    "comment_start_string", "comment_end_string", "line_statement_prefix", "line_comment_prefix",
    "trim_blocks", "lstrip_blocks", "newline_sequence", "keep_trailing_newline", "optimized", "undefined",
    "finalize", "autoescape", "loader", "auto_reload", "bytecode_cache",
)  # fmt: skip


def sandbox_of(environment: jinja2.Environment) -> TaskTemplates:
    """A bounded sandbox that renders as `environment` does: its options (lm-eval's StrictUndefined and
    keep_trailing_newline among them), extensions, filters (its regex_replace, bounded as the others are),
    tests and globals."""
    sandbox = TaskTemplates(
        **{option: getattr(environment, option) for option in ENVIRONMENT_OPTIONS},
        extensions=[type(extension) for extension in environment.extensions.values()],
        enable_async=environment.is_async,
    )
    sandbox.add_filters(environment.filters, {"regex_replace": regex_replaced_size})
    for name in ("tests", "globals", "policies"):
        getattr(sandbox, name).update(getattr(environment, name))
    return sandbox


def regex_replaced_size(string, pattern, repl, count=0) -> int:
    """At most what lm-eval's regex_replace (re.sub) makes: the string, the replacement's text at each
    match (one per character and one more, empty ones included), and at each backslash of it (a
    group) at most the text of the match, which all matches together hold at most once."""
    text, replacement = str(string), str(repl)
    return len(text) + (len(text) + 1) * len(replacement) + replacement.count("\\") * len(text)


def lm_eval_templates() -> jinja2.Environment:
    """The environment every template of lm-eval's tasks is rendered in: lm_eval.utils.env, which
    its apply_template reads at each call. An lm-eval that renders elsewhere is refused, in one line,
    rather than run with templates out of the sandbox."""
    environment = getattr(lm_eval.utils, "env", None)
    render = getattr(lm_eval.utils, "apply_template", None)
    names = getattr(getattr(render, "__code__", None), "co_names", ())
    if not isinstance(environment, jinja2.Environment) or "env" not in names:
        raise UserError(
            f"lm-eval {lm_eval.__version__} no longer renders its task templates through lm_eval.utils.env, "
            "the one smollm2 renders in a sandbox: install the lm-eval that requirements.txt names"
        )
    return environment


@contextlib.contextmanager
def sandboxed_templates() -> Iterator[None]:
    """For the block, lm-eval renders every task template (doc_to_text, doc_to_target, doc_to_choice,
    gen_prefix, fewshot templates, a prompt's) in the bounded sandbox, with its own options and filters;
    its environment is put back after. Always, --allow_code or not: allowed code is a `!function`,
    never a template. A template the sandbox refuses, or one that fails, is one line."""
    original = lm_eval_templates()
    lm_eval.utils.env = sandbox_of(original)
    try:
        yield
    finally:
        lm_eval.utils.env = original


def template_error(exc: Exception, template: str) -> UserError:
    shown = repr(template if len(template) <= 100 else template[:100] + "...")
    reason = error_reason(exc, 160).rstrip(".")
    if not isinstance(exc, jinja2.TemplateError):  # the template's own code failed: say how
        reason = f"{type(exc).__name__}: {reason}"
    if isinstance(exc, jinja2.exceptions.SecurityError):
        return UserError(
            f"a task template tried what templates may not ({reason}): {shown}; templates render in a sandbox, "
            f"and {CODE_FLAGS} allows !function code, never this"
        )
    return UserError(f"a task template could not be rendered ({reason}): {shown}")


@contextlib.contextmanager
def quiet_git_hash() -> Iterator[None]:
    """simple_evaluate records the git commit of the current folder by running `git describe`, whose
    "fatal: not a git repository" lands on the user's terminal outside a checkout. lm-eval has no
    setting for it, so its evaluator gets, for the call, the same lookup with git's stderr discarded."""
    import lm_eval.evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    def git_hash() -> str | None:
        try:
            found = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
            return found.stdout.strip()
        except (subprocess.CalledProcessError, OSError):
            return get_commit_from_path(os.getcwd())

    original = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original


def data_error(exc: OSError) -> UserError:
    if os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return UserError(
            f"a task's data set is not in the local Hugging Face cache ({error_reason(exc, 120)}): "
            "run again with --download on a machine with network"
        )
    return UserError(f"a task's data set could not be read or downloaded ({error_reason(exc, 160)})")


class TaskScores:
    """The config's train.eval_tasks at every evaluation of a run: train.eval_limit examples of each
    (the same ones each time), as eval/<task>/<metric> figures for metrics.jsonl, wandb and loss.png.
    Data sets come from the local cache only; they are read when this is made, before training."""

    def __init__(self, settings: TrainConfig) -> None:
        stay_offline()
        quiet_data_set_bars()  # the training console's lines only
        self.limit, self.batch_size = settings.eval_limit, settings.batch_size
        tasks = load_tasks(settings.eval_tasks, allow_code=settings.eval_allow_code)
        with held_warnings():
            try:
                with sandboxed_templates():  # building a task renders its first example's templates
                    self.tasks = tasks.manager.load(tasks.specs)
            except OSError as exc:
                raise data_error(exc) from None
            except TypeError as exc:
                refuse_unknown_task_key(exc, tasks)
                raise

    def run(self, model: SmolLM2, tokenizer: Tokenizer, autocast) -> dict[str, float]:
        harness = SmolLM2Harness(model, tokenizer, self.batch_size)
        with autocast(), sandboxed_templates():
            try:
                results = evaluate_quietly(harness, self.tasks, self.limit)
            except LITERAL_ERRORS as exc:
                raise unreadable_rendering(exc) from None
        return {f"{EVAL_PREFIX}{task}/{metric}": value for task, metric, value, _ in metric_rows(results)}


def evaluate_quietly(harness: SmolLM2Harness, tasks, limit: int) -> dict:
    """lm-eval's evaluate() over built tasks, quietly: no per-sample logs, no bootstrapped stderr."""
    from lm_eval.evaluator import evaluate

    return evaluate(harness, tasks, limit=limit, log_samples=False, bootstrap_iters=0, verbosity="ERROR")


def metric_rows(results: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) for every measure lm-eval reports, in its order."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if metric.endswith("_stderr") or metric == "sample_len" or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{_filter}")
            rows.append((task, metric, float(value), stderr if isinstance(stderr, (int, float)) else None))
    return rows


def format_table(rows: list[tuple[str, str, float, float | None]]) -> str:
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"

    lines = [f"{'task':<28}{'metric':<18}{'value':>12}{'stderr':>10}"]
    lines += [f"{task:<28}{metric:<18}{number(value):>12}{number(stderr):>10}" for task, metric, value, stderr in rows]
    return "\n".join(lines)


REPORT_FORMAT = "smollm2-eval/1"  # the first key of every --out report; no other writer puts it there
DIGEST_KEY = "sha256"  # the second: the SHA-256 of the report's bytes as written, with this value as zeros
UNSIGNED = f'"{DIGEST_KEY}": "{"0" * 64}"'
LARGEST_REPORT = 64 << 20  # bytes: a file larger than this is not read to see whether it is a report


def report_bytes(results: dict) -> bytes:
    """`results` as the JSON eval writes: headed by the format, then the digest of these very bytes
    (taken with the digest written as zeros), so a report proves it is as eval wrote it."""
    header = {"format": REPORT_FORMAT, DIGEST_KEY: "0" * 64}
    report = header | {key: value for key, value in results.items() if key not in header}
    text = json.dumps(report, indent=2, default=handle_non_serializable) + "\n"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return text.replace(UNSIGNED, f'"{DIGEST_KEY}": "{digest}"', 1).encode("utf-8")


def report_refusal(path: Path) -> str | None:
    """Why the existing file `path` may not be replaced by a report, or None: it is one eval wrote,
    byte for byte (or a copy of one). Any change (a note added, a value edited, the JSON reformatted)
    makes the file the user's."""
    foreign = "exists and is not results smollm2 wrote: give a new file name"
    if not path.is_file() or path.stat().st_size > LARGEST_REPORT:
        return foreign
    data = path.read_bytes()
    try:
        report = json.loads(data)
    except CONTENT_ERRORS:  # not JSON, nested too deeply
        return foreign
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        return foreign
    digest = report.get(DIGEST_KEY)
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        return foreign  # an older smollm2's report (no digest) cannot prove it is unchanged
    unsigned = data.replace(f'"{DIGEST_KEY}": "{digest}"'.encode(), UNSIGNED.encode(), 1)
    if hashlib.sha256(unsigned).hexdigest() != digest:
        return "is results smollm2 wrote, changed since smollm2 wrote it: refusing to replace it (give a new file name)"
    return None


def check_report_target(out: Path) -> None:
    """Refuse, in one line, an --out that is not a new file or an unchanged report of ours: one
    inside a folder smollm2 wrote for something else or a part of a run (a file there would block
    that run's resume), a symlink (never followed, nor replaced), a folder, a path through a file."""
    if out.is_symlink():
        raise UserError(f"--out {out} is a symlink: refusing to replace it (give a new file name)")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give a file name, e.g. results.json")
    blocked = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise UserError(f"--out {out}: {blocked} is a file, not a folder")
    refusal = report_refusal(out) if out.exists() else None
    if refusal:
        raise UserError(f"--out {out} {refusal}")
    where = inside_another(out)
    if where:
        raise UserError(f"--out {out} {where}: choose another file")


def write_results(path: str | Path, results: dict) -> None:
    """Write the report to `path`, checked again first: the file may have changed while eval ran."""
    check_report_target(Path(path))
    write_atomic(path, report_bytes(results))


# ---------------------------------------------------------------------------------------------
# `smollm2 eval`


def evaluate(
    source: str,
    tasks: str | None = None,
    text: str | None = None,
    stride: int | None = None,
    window: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    out: str | None = None,
    download: bool = False,
    precision: str = "auto",
    allow_code: bool = False,
    split: str | None = None,
) -> dict:
    """Evaluate a checkpoint or model folder on lm-eval tasks, a text file and/or its run's held-out
    split (`split="val"`); print the table, write the JSON to `out`. Every input is checked before
    the model is loaded, but for the split's tokenizer, which is the model's."""
    from smollm2.inference import load_for_inference

    stay_offline(download)
    if not tasks and not text and not split:
        raise UserError("nothing to evaluate: give --tasks NAMES, --text FILE and/or --split val")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 example per task, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num_fewshot must be 0 or more examples per prompt, got {num_fewshot}")
    batch_size = batch_size_from(batch_size)
    if out is not None:
        check_report_target(Path(out))
    chosen = load_tasks(tasks.split(","), include_path, allow_code) if tasks else None
    held_out = read_text(text) if text else None
    model, tokenizer = load_for_inference(source, precision=precision, pack=False)
    report: dict = {"model": str(source)}
    if chosen is not None:
        results = run_tasks(SmolLM2Harness(model, tokenizer, batch_size), chosen, limit, num_fewshot)
        print(format_table(metric_rows(results)))
        report |= {key: value for key, value in results.items() if key != "samples"}
    if held_out is not None:
        metrics = text_metrics(model, tokenizer, held_out, stride, batch_size, window)
        print(describe_text_metrics(text, metrics))
        report["text"] = {"file": str(text)} | metrics
    if split is not None:
        tokens, n_bytes, file = held_out_split(source, tokenizer)
        window = window or trained_length(source)
        metrics = token_metrics(model, tokenizer, tokens, n_bytes, stride, batch_size, window)
        print(describe_text_metrics(f"{file} (the run's held-out split)", metrics))
        report["split"] = {"file": str(file)} | metrics
    if out is not None:
        write_results(out, report)
        print(f"wrote {out}")
    return report


def describe_text_metrics(path: str, metrics: dict) -> str:
    return (
        f"{path}: {metrics['tokens']:,} tokens, {metrics['bytes']:,} bytes; windows of {metrics['window']} tokens, "
        f"stride {metrics['stride']}\n"
        f"  loss/token {metrics['loss_per_token']:.4f}  perplexity {metrics['perplexity']:.3f}  "
        f"bits/byte {metrics['bits_per_byte']:.4f}"
    )


def lm_eval_main() -> int:
    """`smollm2-lm-eval ...`: lm-eval's own command line (`run --model smollm2 --model_args
    checkpoint=CKPT --tasks ...`) with our model registered. lm-eval 0.4.13 finds models only in
    its own registry (its --include_path adds tasks, not models), so its `lm_eval` command cannot
    see a model defined outside its tree; this one imports ours first. It runs task code as lm-eval
    does, but its task templates render in the sandbox, as everywhere in smollm2."""
    from lm_eval.__main__ import cli_evaluate

    try:
        with sandboxed_templates():
            cli_evaluate()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
