"""One CLI: info, prepare, train, generate, export. It parses and calls; the work lives elsewhere."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from smollm2.config import Config, load_config
from smollm2.errors import UserError, os_error_line
from smollm2.generation import Sampling
from smollm2.model import SmolLM2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2), like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}\n")


def add_config_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-3 model.n_layers=4 (later values win)",
    )


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)
    parser.add_argument("--train_steps", type=int, required=True, help="optimizer steps to run (more, when resuming)")
    parser.add_argument("--checkpoint_path", help="resume from this checkpoint")
    parser.add_argument("--out_dir", default=".", help="run folder for checkpoints/, logs/, final/ (default: .)")


def read_config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_info(args: argparse.Namespace) -> None:
    config = read_config(args)
    print(parameter_report(config, args.config))


def parameter_report(config: Config, source: str) -> str:
    model_config = config.model
    with torch.device("meta"):
        model = SmolLM2(model_config)
    block = model.layers[0]

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    attention, mlp = count(block.self_attn), count(block.mlp)
    norms = count(block.input_layernorm) + count(block.post_attention_layernorm)
    head = 0 if model_config.tie_embeddings else count(model.lm_head)
    rows = [
        ("embeddings", count(model.embed_tokens)),
        ("per layer: attention", attention),
        ("per layer: mlp", mlp),
        ("per layer: norms", norms),
        ("per layer: total", attention + mlp + norms),
        (f"layers (x{model_config.n_layers})", count(model.layers)),
        ("final norm", count(model.norm)),
        ("lm head" + (" (tied to embeddings)" if model_config.tie_embeddings else ""), head),
    ]
    lines = [f"{source}: {model_config.describe()}"] + [f"  {name:<38}{value:>14,}" for name, value in rows]
    lines.append(f"total parameters: {model.num_parameters():,}")
    return "\n".join(lines)


def cmd_generate(args: argparse.Namespace) -> None:
    from smollm2.inference import load_for_inference, stream_text

    model, tokenizer = load_for_inference(args.checkpoint or args.model)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    for piece in stream_text(model, tokenizer, args.prompt, args.max_new_tokens, sampling, args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_export(args: argparse.Namespace) -> None:
    from smollm2.checkpoint import load_model_from_checkpoint
    from smollm2.hf import export_llama

    model, tokenizer = load_model_from_checkpoint(args.checkpoint)
    export_llama(model, args.out, tokenizer)
    print(f"wrote {args.out} (transformers: AutoModelForCausalLM.from_pretrained({str(args.out)!r}))")


def cmd_export_space(args: argparse.Namespace) -> None:
    from smollm2.space import export_space, push_space

    folder = export_space(args.run_dir, args.out)
    print(f"wrote {folder} (try it: python {folder / 'app.py'})")
    if args.push:
        print(f"pushed: {push_space(folder, args.push)}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from smollm2.data import prepare

    prepare(read_config(args), args.out_dir)


def cmd_train(args: argparse.Namespace) -> None:
    from smollm2.trainer import resume_command, train

    hint = resume_command(args.config, args.overrides, args.out_dir)
    train(read_config(args), args.train_steps, args.checkpoint_path, args.out_dir, hint)


# ---------------------------------------------------------------------------------------------
# Parsing


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="smollm2", description="SmolLM2: train, inspect and run small language models")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    info = commands.add_parser("info", help="print the parameter breakdown of a config")
    add_config_flags(info)
    info.set_defaults(run=cmd_info)

    prepare = commands.add_parser("prepare", help="train or load the tokenizer and tokenize the corpus")
    add_config_flags(prepare)
    prepare.add_argument("--out_dir", default=".", help="run folder (prepared data goes under data/)")
    prepare.set_defaults(run=cmd_prepare)

    train = commands.add_parser("train", help="train (or resume) a model")
    add_train_flags(train)
    train.set_defaults(run=cmd_train)

    generate = commands.add_parser("generate", help="continue a prompt")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a training checkpoint (checkpoints/step_N.pt)")
    source.add_argument("--model", help="a Hugging Face model folder (ours, or a downloaded SmolLM2)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max_new_tokens", type=int, default=100)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    generate.add_argument("--top_k", type=int, default=50, help="0 = off")
    generate.add_argument("--top_p", type=float, default=1.0)
    generate.add_argument("--repetition_penalty", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(run=cmd_generate)

    export = commands.add_parser("export", help="write a checkpoint as a transformers model folder")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--out", required=True)
    export.set_defaults(run=cmd_export)

    space = commands.add_parser("export-space", help="write a run as a Hugging Face Space folder (and push it)")
    space.add_argument(
        "--run", dest="run_dir", required=True, type=Path, help="the run folder (with final/ or checkpoints/)"
    )
    space.add_argument("--out", required=True, type=Path, help="the Space folder to write")
    space.add_argument("--push", metavar="REPO_ID", help="upload to this Space (user/name); needs a token")
    space.set_defaults(run=cmd_export_space)
    return parser


class Terminated(BaseException):
    """SIGTERM outside the training loop (which finishes its step and saves instead)."""


def _terminate(signum, frame) -> None:
    raise Terminated


def run(command: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Run a command; every way it can fail for the user's reasons ends in one line on stderr.

    Work in progress is written beside its target and swapped in, so an error or a signal here
    leaves every file as it was (the staging copies are removed on the way out).
    """
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        command(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine said no: a read-only folder, a full disk, a file for a folder
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left behind", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM): nothing half-written was left behind", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.run, args)


def train_main(argv: list[str] | None = None) -> int:
    """`python train.py ...`: the seed's entry point, the same as `smollm2 train ...`."""
    parser = ArgumentParser(prog="train.py", description="Train SmolLM2 (or resume from a checkpoint)")
    add_train_flags(parser)
    return run(cmd_train, parser.parse_args(argv))
