"""One CLI: info, prepare, train, generate, eval, export. It parses and calls; the work lives elsewhere."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from smollm2.config import COUNT_LIMIT, Config, load_config
from smollm2.errors import UserError, one_line, os_error_line
from smollm2.files import missing_folders, remove_empty_folders
from smollm2.generation import Sampling
from smollm2.model import parameter_breakdown
from smollm2.run_folder import RunFolder

if TYPE_CHECKING:
    from smollm2.model_source import ModelSource


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help, and descriptions and epilogs kept as written (examples
    keep their lines). No default is shown where there is none to show: None, False or []."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is False or (isinstance(default, list) and not default):
            return action.help or ""
        return super()._get_help_string(action) or ""


Subcommands = argparse._SubParsersAction  # what add_subparsers returns (argparse names no public type)


def examples(*commands: str) -> str:
    return "examples:\n" + "\n".join(f"  {command}" for command in commands)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2), like every other user error; help
    shows the defaults and ends with examples."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {one_line(message)}\n")


def add_config_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config file, e.g. config/tiny.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-3 model.n_layers=4 (later values win; a string key "
        "such as data.path keeps the text as given, other values are read as YAML)",
    )


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)
    parser.add_argument(
        "--train_steps", type=step_count, required=True, help="optimizer steps to run (more, when resuming)"
    )
    parser.add_argument("--checkpoint_path", help="resume from this checkpoint (checkpoints/step_N.pt), exactly")
    parser.add_argument("--out_dir", default=".", help="run folder for checkpoints/, logs/, final/")


def step_count(text: str) -> int:
    """--train_steps: a whole number a checkpoint can hold (its step and schedule are int64); the
    trainer refuses 0 and below in words of its own."""
    steps = int(text)
    if steps >= COUNT_LIMIT:
        raise argparse.ArgumentTypeError(f"must be below 2**63 (a checkpoint holds its steps as int64), got {text}")
    return steps


step_count.__name__ = "int"  # what argparse names in "invalid int value: 'x'"


def train_examples(command: str) -> str:
    return examples(
        f"{command} --config config/tiny.yaml --train_steps 600 --out_dir runs/mine --set train.lr=1e-3",
        f"{command} --config config/tiny.yaml --train_steps 50 --out_dir runs/mine "
        "--checkpoint_path runs/mine/checkpoints/step_600.pt",
    )


def read_config(args: argparse.Namespace) -> Config:
    from smollm2.pretrained import resolve_init_from

    return resolve_init_from(load_config(args.config, args.overrides))


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_info(args: argparse.Namespace) -> None:
    config = read_config(args)
    print(parameter_report(config, args.config))


def parameter_report(config: Config, source: str) -> str:
    model_config = config.model
    parts = parameter_breakdown(model_config)
    rows = [
        ("embeddings", parts["embeddings"]),
        ("per layer: attention", parts["attention"]),
        ("per layer: mlp", parts["mlp"]),
        ("per layer: norms", parts["norms"]),
        ("per layer: total", parts["layer"]),
        (f"layers (x{model_config.n_layers})", model_config.n_layers * parts["layer"]),
        ("final norm", parts["final norm"]),
        ("lm head" + (" (tied to embeddings)" if model_config.tie_embeddings else ""), parts["head"]),
    ]
    lines = [f"{source}: {model_config.describe()}"] + [f"  {name:<38}{value:>14,}" for name, value in rows]
    lines.append(f"total parameters: {parts['total']:,}")
    return "\n".join(lines)


def cmd_generate(args: argparse.Namespace) -> None:
    from smollm2.inference import load_for_inference, stream_text

    model, tokenizer = load_for_inference(args.checkpoint or args.model, precision=args.precision)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    produce = stream_text
    if args.chat:  # the chat template's jinja2 is start-up that only --chat pays
        from smollm2.chat import single_reply

        produce = single_reply
    for piece in produce(model, tokenizer, args.prompt, args.max_new_tokens, sampling, args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args: argparse.Namespace) -> None:
    from smollm2.chat import chat_loop
    from smollm2.inference import load_for_inference

    model, tokenizer = load_for_inference(args.checkpoint or args.model, precision=args.precision)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    chat_loop(model, tokenizer, args.system, args.max_new_tokens, sampling, args.seed)


def cmd_eval(args: argparse.Namespace) -> None:
    from smollm2.evaluation import evaluate, quiet_data_set_bars

    quiet_data_set_bars()
    evaluate(
        args.checkpoint or args.model,
        tasks=args.tasks,
        text=args.text,
        stride=args.stride,
        window=args.window,
        limit=args.limit,
        batch_size=args.batch_size,
        num_fewshot=args.num_fewshot,
        include_path=args.include_path,
        out=args.out,
        download=args.download,
        precision=args.precision,
        allow_code=args.allow_code,
        split=args.split,
    )


def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "gguf":
        return export_gguf_main(args)
    if args.model or args.outtype:
        flag = "--model" if args.model else "--outtype"
        raise UserError(f"{flag} is for --format gguf; --format hf exports a checkpoint: give --checkpoint")
    from smollm2.checkpoint import check_export_folder
    from smollm2.hf import export_llama
    from smollm2.model_source import ModelSource

    model, tokenizer = ModelSource.checkpoint_file(args.checkpoint).load()
    check_export_folder(args.out, args.checkpoint)
    export_llama(model, args.out, tokenizer)
    print(f"wrote {args.out} (transformers: AutoModelForCausalLM.from_pretrained({str(args.out)!r}))")


def export_gguf_main(args: argparse.Namespace) -> None:
    from smollm2.gguf_export import check_outtype, check_target, export_gguf
    from smollm2.model_source import ModelSource

    outtype = args.outtype or "f32"
    check_outtype(outtype)
    check_target(Path(args.out))  # before the model is read: a refusal costs nothing
    source = (
        ModelSource.checkpoint_file(args.checkpoint) if args.checkpoint else ModelSource.open(args.model, "--model")
    )
    model, tokenizer = source.load()
    export_gguf(model, tokenizer, args.out, outtype, name=gguf_model_name(source))
    print(f"wrote {args.out} ({outtype}; llama.cpp: llama-cli -m {args.out})")


def gguf_model_name(source: ModelSource) -> str:
    """The name llama.cpp, ollama and LM Studio show: the run's (with the step of a checkpoint), else the folder's."""
    if source.run is None:
        return source.path.resolve().name
    run = source.run.root.resolve().name
    return f"{run} {source.path.stem}" if source.is_checkpoint else run


def cmd_export_space(args: argparse.Namespace) -> None:
    from smollm2.space import check_repo_id, export_space, push_space

    if args.push:
        check_repo_id(args.push)  # before anything is written
    folder = export_space(args.run_dir, args.out)
    print(f"wrote {folder} (try it: python {folder / 'app.py'})")
    if args.push:
        print(f"pushed: {push_space(folder, args.push)}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from smollm2.trainer import data_pipeline

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not 1 <= args.workers <= cores:  # each worker holds a tokenizer and batches in flight: 500 would exhaust memory
        raise UserError(f"--workers must be between 1 and this machine's {cores} CPU cores, got {args.workers}")
    config = read_config(args)
    # The folders prepare creates on the way to its own, removed again (only if empty) when it fails.
    created = missing_folders(RunFolder(args.out_dir).data, Path(config.data.prepared_dir or "."))
    try:
        data_pipeline(config).prepare(config, args.out_dir, workers=args.workers)
    except BaseException:
        remove_empty_folders(*created)
        raise


def cmd_train(args: argparse.Namespace) -> int:
    from smollm2.trainer import resume_command, train

    hint = resume_command(args.config, args.overrides, args.out_dir)
    stopped_by = train(read_config(args), args.train_steps, args.checkpoint_path, args.out_dir, hint)
    # Stopped by Ctrl-C / SIGTERM: saved and resumable, but not finished: 130 / 143, so `train && export` stops.
    return 128 + stopped_by if stopped_by else 0


# ---------------------------------------------------------------------------------------------
# Parsing


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="smollm2",
        description="SmolLM2: train, inspect and run small language models",
        epilog=examples("python -m smollm2 train --help", "python -m smollm2 info --config config/tiny.yaml"),
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    add_info(commands)
    add_prepare(commands)
    add_train(commands)
    add_generate(commands)
    add_chat(commands)
    add_eval(commands)
    add_export(commands)
    add_export_space(commands)
    return parser


def add_command(commands: Subcommands, name: str, summary: str, epilog: str) -> ArgumentParser:
    return commands.add_parser(name, help=summary, description=summary, epilog=epilog)


def add_info(commands: Subcommands) -> None:
    info = add_command(
        commands,
        "info",
        "print the parameter breakdown of a config",
        examples(
            "python -m smollm2 info --config config/smollm2-135m.yaml",
            "python -m smollm2 info --config config/tiny.yaml --set model.n_layers=8",
        ),
    )
    add_config_flags(info)
    info.set_defaults(run=cmd_info)


def add_prepare(commands: Subcommands) -> None:
    prepare = add_command(
        commands,
        "prepare",
        "train or load the tokenizer and tokenize the corpus",
        examples(
            "python -m smollm2 prepare --config config/tiny.yaml --out_dir runs/mine",
            "python -m smollm2 prepare --config config/tiny.yaml --set data.path=corpus.jsonl data.text_field=content",
        ),
    )
    add_config_flags(prepare)
    prepare.add_argument("--out_dir", default=".", help="run folder (prepared data goes under data/)")
    prepare.add_argument(
        "--workers", type=int, default=1, help="processes that tokenize (default 1: one process, threads inside)"
    )
    prepare.set_defaults(run=cmd_prepare)


def add_train(commands: Subcommands) -> None:
    train = add_command(commands, "train", "train (or resume) a model", train_examples("python -m smollm2 train"))
    add_train_flags(train)
    train.set_defaults(run=cmd_train)


def add_generate(commands: Subcommands) -> None:
    generate = add_command(
        commands,
        "generate",
        "continue a prompt (prints the continuation only)",
        examples(
            'python -m smollm2 generate --checkpoint runs/mine/checkpoints/step_600.pt --prompt "ROMEO:"',
            'python -m smollm2 generate --model runs/mine/final --prompt "ROMEO:" --temperature 0 --max_new_tokens 200',
        ),
    )
    add_model_flags(generate)
    generate.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user's message)")
    generate.add_argument(
        "--chat", action="store_true", help="render the prompt as a user message with the model's chat template"
    )
    add_sampling_flags(generate, temperature=0.8)
    generate.set_defaults(run=cmd_generate)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a training checkpoint (checkpoints/step_N.pt)")
    source.add_argument("--model", help="a model folder: a run's final/, an export, or a downloaded SmolLM2")


def add_sampling_flags(parser: argparse.ArgumentParser, temperature: float) -> None:
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        default=100,
        help="tokens to generate at most; the model's context may cut it shorter",
    )
    parser.add_argument("--temperature", type=float, default=temperature, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top_k", type=int, default=50, help="sample from the k likeliest tokens; 0 = off")
    parser.add_argument(
        "--top_p", type=float, default=1.0, help="sample from the likeliest tokens that make up p of the mass; 1 = off"
    )
    parser.add_argument(
        "--repetition_penalty", type=float, default=1.0, help="damp tokens already in the text by this; 1 = off"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed, the same text")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "int8"],
        default="auto",
        help="weights for decoding; auto: on a CPU the fastest of fp32 and bf16 in decode steps measured at "
        "load; int8: weight-only, per-channel scales, bf16 activations (CPU)",
    )


def add_chat(commands: Subcommands) -> None:
    chat = add_command(
        commands,
        "chat",
        "talk to a model in the terminal (its chat template; /reset, /quit; Ctrl-C stops a reply)",
        examples(
            "python -m smollm2 chat --model ~/.cache/smollm2/SmolLM2-135M-Instruct",
            'python -m smollm2 chat --checkpoint runs/sft/checkpoints/step_300.pt --system "You are terse."',
        ),
    )
    add_model_flags(chat)
    chat.add_argument("--system", help="a system message that starts the conversation")
    add_sampling_flags(chat, temperature=0.7)
    chat.set_defaults(run=cmd_chat)


def add_eval(commands: Subcommands) -> None:
    evaluate = add_command(
        commands,
        "eval",
        "score a model on lm-evaluation-harness tasks and/or held-out text (bits per byte)",
        examples(
            "python -m smollm2 eval --model runs/mine/final --tasks hellaswag,arc_easy --limit 200 --out results.json",
            "python -m smollm2 eval --checkpoint runs/mine/checkpoints/step_600.pt --text held_out.txt",
            "python -m smollm2 eval --checkpoint runs/mine/checkpoints/step_600.pt --split val",
            "python -m smollm2 eval --model runs/mine/final --tasks tests/eval_tasks/multiple_choice.yaml --allow_code",
        ),
    )
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a training checkpoint (checkpoints/step_N.pt)")
    source.add_argument("--model", help="a model folder: a run's final/, an export, or a downloaded SmolLM2")
    evaluate.add_argument("--tasks", help="lm-eval task names or task .yaml files, comma-separated")
    evaluate.add_argument("--text", help="a UTF-8 text file: loss per token, perplexity and bits per byte")
    evaluate.add_argument(
        "--split",
        choices=["val"],
        help="the held-out split of the model's own run (RUN/data/*/val.bin), scored as --text scores a file",
    )
    evaluate.add_argument(
        "--window",
        type=int,
        help="tokens a window holds (default: --text, the model's context; --split val, the length the run trained on)",
    )
    evaluate.add_argument("--stride", type=int, help="--text: tokens each window moves on (default: half the window)")
    evaluate.add_argument("--limit", type=int, help="examples per task at most (default: all)")
    evaluate.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass")
    evaluate.add_argument("--num_fewshot", type=int, help="examples in each prompt (default: the task's, mostly 0)")
    evaluate.add_argument("--include_path", help="a folder of your own lm-eval task .yaml files")
    evaluate.add_argument("--out", help="write the results as JSON to this file")
    evaluate.add_argument(
        "--download", action="store_true", help="fetch data sets missing from the Hugging Face cache (needs network)"
    )
    evaluate.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="weights; auto: bf16 on CUDA, fp32 on a CPU",
    )
    evaluate.add_argument(
        "--allow_code",
        action="store_true",
        help="let task files run Python (lm-eval's !function, metrics HF evaluate loads, use_prompt YAML files): "
        "only for tasks you trust; templates render in a sandbox either way",
    )
    evaluate.set_defaults(run=cmd_eval)


def add_export(commands: Subcommands) -> None:
    export = add_command(
        commands,
        "export",
        "write a model as a transformers model folder, or as a GGUF file for llama.cpp, ollama, LM Studio",
        examples(
            "python -m smollm2 export --checkpoint runs/mine/checkpoints/step_600.pt --out runs/mine/hf",
            "python -m smollm2 export --model runs/mine/final --format gguf --out mine.gguf --outtype q8_0",
        ),
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="the training checkpoint (checkpoints/step_N.pt)")
    source.add_argument("--model", help="--format gguf: a model folder or run folder (final/, a downloaded SmolLM2)")
    export.add_argument(
        "--out", required=True, help="hf: the model folder to write (new, empty, or an earlier export); gguf: the file"
    )
    export.add_argument(
        "--format", choices=["hf", "gguf"], default="hf", help="hf: transformers folder; gguf: one llama.cpp file"
    )
    export.add_argument(
        "--outtype",
        choices=["f32", "bf16", "q8_0"],
        help="--format gguf: how weights are stored (default f32, exact; bf16 half the size; q8_0 about a quarter)",
    )
    export.set_defaults(run=cmd_export)


def add_export_space(commands: Subcommands) -> None:
    space = add_command(
        commands,
        "export-space",
        "write a run as a Hugging Face Space folder (and push it)",
        examples(
            "python -m smollm2 export-space --run runs/demo --out runs/demo-space",
            "python -m smollm2 export-space --run runs/demo --out runs/demo-space --push you/smollm2-demo",
        ),
    )
    space.add_argument(
        "--run", dest="run_dir", required=True, type=Path, help="the run folder (with final/ or checkpoints/)"
    )
    space.add_argument("--out", required=True, type=Path, help="the Space folder to write")
    space.add_argument("--push", metavar="REPO_ID", help="upload to this Space (user/name); needs a token")
    space.set_defaults(run=cmd_export_space)


class Terminated(BaseException):
    """SIGTERM outside the training loop (which finishes its step and saves instead)."""


def _terminate(signum, frame) -> None:
    raise Terminated


def run(command: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command; every way it can fail for the user's reasons ends in one line on stderr.

    Work in progress is written beside its target and swapped in, so an error or a signal here
    leaves every file as it was (the staging copies are removed on the way out).
    """
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = command(args) or 0
    except UserError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine said no: a read-only folder, a full disk, a file for a folder
        print(f"error: {one_line(os_error_line(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left behind", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM): nothing half-written was left behind", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.run, args)


def train_main(argv: list[str] | None = None) -> int:
    """`python train.py ...`: the seed's entry point, the same as `smollm2 train ...`."""
    parser = ArgumentParser(
        prog="train.py",
        description="Train SmolLM2 (or resume from a checkpoint)",
        epilog=train_examples("python train.py"),
    )
    add_train_flags(parser)
    return run(cmd_train, parser.parse_args(argv))
