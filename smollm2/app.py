"""The Gradio app (what a Space runs): talk to a model, and watch it learn.

    python app.py [--model PATH] [--logs DIR] [--host 127.0.0.1] [--port 7860]

The model is a run's final/ folder, a checkpoint (.pt) or a Hugging Face Llama folder; without
--model, $SMOLLM2_MODEL, else model/ beside app.py (an exported Space), else runs/demo/final.
The logs (metrics.jsonl, samples.md) come from --logs, $SMOLLM2_LOGS, or the model's run.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import NoReturn

import gradio as gr
import pandas as pd

from smollm2.chat import reply_after
from smollm2.chat_template import prompt_ids
from smollm2.cli import ArgumentParser, examples
from smollm2.errors import UserError, error_reason, one_line, os_error_line
from smollm2.generation import Sampling
from smollm2.inference import load_for_inference, stream_text
from smollm2.metrics import benchmark_points
from smollm2.space import DEFAULT_MODEL, RunRecord, logs_beside, opening_prompt, read_record, short_count

MAX_NEW_TOKENS = 512
# One request computes at a time (a CPU Space has few cores); this many more may wait their turn,
# and past that a request is turned away at once rather than left waiting without end.
QUEUE_SIZE = 16


def build_app(model_path: Path, logs: Path | None, precision: str = "fp32") -> gr.Blocks:
    model, tokenizer = load_for_inference(model_path, precision=precision)
    if tokenizer.chat_template:  # a template that fails (or renders nothing) is refused now, not at every message
        prompt_ids(tokenizer, [{"role": "user", "content": "hi"}], model.config.max_seq_len)
    record = read_record(model.config, model.num_parameters(), logs)
    # The most characters a prompt that fits the context can have: the browser stops typing there, and
    # the server refuses anything longer (an API call skips the browser) before tokenizing it.
    most = tokenizer.max_chars(model.config.max_seq_len - 1)
    generate = generator(model, tokenizer)

    with gr.Blocks(title="SmolLM2") as app:
        gr.Markdown(
            f"# SmolLM2, {short_count(record.parameters)} parameters\n{describe(record)}\n\n{limits(model, most)}"
        )
        with gr.Tab("Generate"):
            prompt = as_sent(
                gr.Textbox(
                    label="Prompt",
                    value=opening_prompt(model_path),
                    lines=3,
                    max_length=most,
                    info=f"at most {most:,} characters; the prompt and the new tokens share the model's "
                    f"{model.config.max_seq_len:,}-token context",
                )
            )
            with gr.Row():
                longest = longest_reply(model)
                max_new = lenient(gr.Slider(1, longest, value=min(120, longest), step=1, label="max new tokens"))
                temperature = lenient(gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="temperature (0 = greedy)"))
                top_k = lenient(gr.Slider(0, 200, value=50, step=1, label="top-k (0 = off)"))
                top_p = lenient(gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p (1 = off)"))
                seed = lenient(gr.Number(value=0, precision=0, label="seed"))
            button = gr.Button("Generate", variant="primary")
            output = gr.Textbox(label="Prompt and continuation", lines=14)
            button.click(generate, [prompt, max_new, temperature, top_k, top_p, seed], output, api_name="generate")
        if tokenizer.chat_template:
            with gr.Tab("Chat"):
                chat_tab(model, tokenizer, most)
        with gr.Tab("Training"):
            training_tab(record)
    return app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)


def generator(model, tokenizer):
    """The Generate tab's handler: the prompt and its continuation so far, at each new piece."""
    longest = longest_reply(model)

    def generate(prompt: str, max_new_tokens: float, temperature: float, top_k: float, top_p: float, seed: float):
        # An API call skips the browser's widgets: any input may be null, NaN, Infinity or 12.5.
        text = prompt = text_input(prompt, "prompt")
        max_new_tokens = reply_length(max_new_tokens, longest)
        top_k, seed = whole_number(top_k, "top_k"), whole_number(seed, "seed")
        temperature, top_p = number(temperature, "temperature"), number(top_p, "top_p")
        try:
            sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
            for piece in stream_text(model, tokenizer, prompt, max_new_tokens, sampling, seed):
                text += piece
                yield text
        except UserError as exc:
            raise refusal(str(exc)) from None

    return generate


def chat_responder(model, tokenizer):
    """The Chat tab's handler: the reply so far to a message after the history (smollm2.chat)."""
    longest = longest_reply(model)

    def respond(message: str, history: list[dict], max_new_tokens: float, temperature: float):
        if not text_input(message, "message"):  # an API call's null message arrives as "" (see the textbox)
            raise refusal("the message is missing or empty: send text")
        if history is not None and not isinstance(history, list):
            raise refusal("the history must be a list of messages")
        max_new_tokens, temperature = reply_length(max_new_tokens, longest), number(temperature, "temperature")
        try:
            sampling = Sampling(temperature=temperature, top_k=50)
            yield from reply_after(model, tokenizer, history or [], message, max_new_tokens, sampling)
        except UserError as exc:
            raise refusal(str(exc)) from None

    return respond


def longest_reply(model) -> int:
    return min(MAX_NEW_TOKENS, model.config.max_seq_len - 1)


def refusal(message: str) -> gr.Error:
    """What the browser shows for a refused request: one line, control characters escaped as the CLI
    escapes them (a template's raise_exception, or a path, may hold a newline or an escape sequence)."""
    return gr.Error(one_line(message))


def lenient(component):
    """An input whose own preprocessing would fail on a value an API call may send (null, NaN, Infinity:
    a traceback and {"error": null}) passes that value on as it is, for the handler to refuse in words."""
    preprocess = component.preprocess

    def checked(payload):
        if isinstance(payload, bool) or not isinstance(payload, (int, float)) or not math.isfinite(payload):
            return payload
        return preprocess(payload)

    component.preprocess = checked
    return component


def as_sent(textbox: gr.Textbox) -> gr.Textbox:
    """A textbox that passes on what an API call sent that is not text (a list, a number, null) as it
    is, for the handler to refuse in words: gradio would make ["a"] the text "['a']"."""
    preprocess = textbox.preprocess
    textbox.preprocess = lambda payload: preprocess(payload) if isinstance(payload, str) else payload
    return textbox


def message_as_sent(payload, preprocess):
    """The chat textbox's value for the handler: text as text, null as "" (gradio's chat fails on None
    before the handler runs), and anything else as a message whose content it is, which the chat keeps
    in its history as it is and the handler refuses in words (gradio would make ["a"] the text "['a']")."""
    if payload is None:
        return ""
    return preprocess(payload) if isinstance(payload, str) else {"content": payload}


def text_input(value, what: str) -> str:
    if not isinstance(value, str):
        raise refusal(f"the {what} is missing: send text" if value is None else f"the {what} must be text")
    return value


def number(value, name: str) -> float:
    """A float input as an API call may send it: null or a string is refused (NaN is Sampling's to refuse)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise refusal(f"{name} must be a number, got {'nothing' if value is None else repr(value)}")
    return float(value)


def whole_number(value, name: str) -> int:
    """An integer input (a slider with step 1, the seed): null, NaN, Infinity or 12.5 is refused, not truncated."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value % 1:
        got = "nothing" if value is None else repr(value)
        raise refusal(f"{name} must be a whole number, got {got}")
    return int(value)


def reply_length(value, longest: int) -> int:
    """max_new_tokens within the slider's range: an API call skips the slider, and the tokens a request
    may ask for are the work it costs."""
    tokens = whole_number(value, "max_new_tokens")
    if not 1 <= tokens <= longest:
        raise refusal(f"max_new_tokens must be in 1..{longest}, got {tokens}")
    return tokens


def limits(model, most: int) -> str:
    return (
        f"*Limits: a prompt or message of at most {most:,} characters; the oldest chat messages are dropped when "
        f"the conversation outgrows the {model.config.max_seq_len:,}-token context; one request runs at a time "
        f"and up to {QUEUE_SIZE} wait in line (when the line is full, try again shortly).*"
    )


def chat_tab(model, tokenizer, most: int) -> None:
    """A conversation through the model's chat template (smollm2.chat), replies streamed."""
    longest = longest_reply(model)
    textbox = gr.Textbox(max_length=most, placeholder=f"a message of at most {most:,} characters", render=False)
    preprocess = textbox.preprocess
    textbox.preprocess = lambda payload: message_as_sent(payload, preprocess)
    gr.ChatInterface(
        chat_responder(model, tokenizer),
        textbox=textbox,
        additional_inputs=[
            # half the context at most by default: a reply that takes all of it leaves no room for a message
            lenient(
                gr.Slider(
                    1, longest, value=max(1, min(128, longest // 2)), step=1, label="max new tokens", render=False
                )
            ),
            lenient(gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)", render=False)),
        ],
        api_name="chat",
    )


def describe(record: RunRecord) -> str:
    return f"A decoder-only transformer ({record.config.describe()}) trained with smollm2."


def training_tab(record: RunRecord) -> None:
    gr.Markdown("## The run\n\n" + record.summary_markdown())
    curves = loss_frame(record.metrics)
    if curves.empty:
        gr.Markdown("No training logs were found beside this model (logs/metrics.jsonl).")
    else:
        gr.LinePlot(curves, x="step", y="loss", color="split", title="Loss", height=320)
    benchmarks = benchmark_frame(record.metrics)
    if not benchmarks.empty:
        title = "Benchmarks (train.eval_tasks, train.eval_limit examples each)"
        gr.LinePlot(benchmarks, x="step", y="value", color="metric", title=title, height=320)
    if not record.predictions:
        gr.Markdown("No predictions were logged (logs/samples.md).")
        return
    by_step = {f"step {p.step}": p for p in record.predictions}
    gr.Markdown("## Predictions as it learned\n\nThe same prompts, sampled with the same seed, as training went on.")
    choice = gr.Radio(list(by_step), value=next(iter(by_step)), label="step")
    shown = gr.Markdown(predictions_markdown(by_step[choice.value]))
    choice.change(lambda name: predictions_markdown(by_step[name]), choice, shown, api_visibility="private")


def predictions_markdown(predictions) -> str:
    blocks = "\n\n".join(f"```text\n{text}\n```" for text in predictions.texts)
    return f"**step {predictions.step}** ({predictions.losses})\n\n{blocks}"


def loss_frame(metrics: list[dict]) -> pd.DataFrame:
    rows = [{"step": r["step"], "loss": r["loss"], "split": "train"} for r in metrics if "loss" in r]
    rows += [{"step": r["step"], "loss": r["val_loss"], "split": "val"} for r in metrics if "val_loss" in r]
    rows += [  # a mixture's sources, each its own line
        {"step": r["step"], "loss": value, "split": f"val {key.removeprefix('val_loss/')}"}
        for r in metrics
        for key, value in r.items()
        if key.startswith("val_loss/")
    ]
    return pd.DataFrame(rows, columns=["step", "loss", "split"])


def benchmark_frame(metrics: list[dict]) -> pd.DataFrame:
    rows = [
        {"step": step, "value": value, "metric": name}
        for name, points in benchmark_points(metrics).items()
        for step, value in points
    ]
    return pd.DataFrame(rows, columns=["step", "value", "metric"])


def default_model(app_folder: Path) -> Path:
    if os.environ.get("SMOLLM2_MODEL"):
        return Path(os.environ["SMOLLM2_MODEL"])
    if (app_folder / "model").is_dir():
        return app_folder / "model"
    return DEFAULT_MODEL


def main(argv: list[str] | None = None) -> None:
    app_folder = Path(sys.argv[0]).resolve().parent
    parser = ArgumentParser(
        description="SmolLM2: generate, and watch the training",
        epilog=examples(
            "python app.py --model runs/demo/final", "python app.py --model model --host 0.0.0.0 --port 7861"
        ),
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="final/ folder, checkpoint .pt or Hugging Face folder (default: $SMOLLM2_MODEL, else model/ "
        f"beside app.py, else {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--logs", type=Path, help="folder with metrics.jsonl and samples.md (default: $SMOLLM2_LOGS, else the run's)"
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to serve on, or $GRADIO_SERVER_NAME; 0.0.0.0 for every interface",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=os.environ.get("GRADIO_SERVER_PORT", "7860"),
        help="port to serve on, or $GRADIO_SERVER_PORT",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="weights for decoding; auto: bf16 where it measures faster on this machine",
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    model_path = args.model or default_model(app_folder)
    logs = args.logs or (Path(os.environ["SMOLLM2_LOGS"]) if os.environ.get("SMOLLM2_LOGS") else None)
    logs = logs or logs_beside(model_path)
    if not model_path.exists():
        fail(f"{model_path}: no model there (run `make demo` first, or pass --model)")
    try:
        app = build_app(model_path, logs, args.precision)
    except UserError as exc:
        fail(str(exc))
    except OSError as exc:  # an unreadable model file or folder
        fail(os_error_line(exc))
    try:
        app.launch(server_name=args.host, server_port=args.port)
    except OSError as exc:  # the port is taken, or the host is not this machine's
        fail(f"cannot serve on {args.host}:{args.port} ({error_reason(exc, 120)})")


def fail(message: str) -> NoReturn:
    """One line on stderr, as the CLI writes it (a newline in a path is shown \\n), and exit code 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(2)
