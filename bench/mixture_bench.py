"""Mixtures benchmark: prepare with 1 and 2 worker processes, the share of windows per source
against the weights, and the cost of document masks in training tokens/s on this CPU.

Prepare runs each measurement in a fresh process, so that its peak RSS (and its workers') is its
own; the corpus is generated under a temporary folder and removed afterwards. Prints a Markdown
section; `bench/run.py` collects it into BENCHMARKS.md.

    python bench/mixture_bench.py [--big_mb 200] [--runs 3] [--steps 10000] [--mask_steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from data_bench import make_corpus  # bench/ is a folder of scripts, on sys.path when one runs
from report import run_json, spread

from smollm2.config import load_config
from smollm2.mixture import (
    BLOCK,
    MixtureData,
    MixtureLoader,
    Source,
    SourceData,
    mixture_loader,
    prepare_mixture,
)
from smollm2.model import SmolLM2
from smollm2.trainer import make_optimizer, optimizer_step

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "config/tiny-mix.yaml": [0.7, 0.3],
    "SmolLM1-135M's published recipe": [0.70, 0.15, 0.08, 0.06, 0.01],
}

PREPARE = """
import json, sys, threading, time
import psutil
from smollm2.config import config_from_dict
from smollm2.data import prepare
corpus, folder, tokenizer, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
raw = {"model": {"vocab_size": 32000}, "data": {"path": corpus, "tokenizer": tokenizer, "prepared_dir": folder}}
worker_peak, done = [0], threading.Event()

def watch_workers():  # sampled: a worker's resident set, every 0.1 s
    while not done.wait(0.1):
        for child in psutil.Process().children():
            try:
                worker_peak[0] = max(worker_peak[0], child.memory_info().rss)
            except psutil.Error:
                pass

threading.Thread(target=watch_workers, daemon=True).start()
start = time.perf_counter()
data = prepare(config_from_dict(raw, "bench"), folder, quiet=True, workers=workers)
seconds = time.perf_counter() - start
done.set()
# VmHWM: this process's own high-water mark (ru_maxrss would carry the parent's over the exec)
own = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
tokens = data.meta["train_tokens"] + data.meta["val_tokens"]
result = {"seconds": seconds, "tokens": tokens, "bytes": data.meta["bytes"], "rss": own, "worker_rss": worker_peak[0]}
print(json.dumps(result))
"""

# What a prepare worker imports before its tokenizer: its resident set at that point, in a fresh process.
WORKER_IMPORTS = """
import json
import smollm2.parallel_encode
own = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"peak_rss": own}))
"""


def prepare_rows(big_mb: int, runs: int) -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer_run = run_json(PREPARE, str(ROOT / "input.txt"), str(tmp / "tok"), "train", "1")
        assert tokenizer_run["tokens"] > 0
        tokenizer = str(tmp / "tok" / "tokenizer.json")
        for megabytes in (big_mb // 4, big_mb):
            corpus = tmp / f"corpus-{megabytes}.txt"
            make_corpus(corpus, megabytes)
            for workers in (1, 2):
                folders = [tmp / f"prep-{megabytes}-{workers}-{run}" for run in range(runs)]
                rows.append(
                    prepare_row(
                        [run_json(PREPARE, str(corpus), str(f), tokenizer, str(workers)) for f in folders], workers
                    )
                )
            corpus.unlink()
    return rows


def prepare_row(results: list[dict], workers: int) -> str:
    seconds, size = [r["seconds"] for r in results], results[0]["bytes"]
    mib = "{:,.0f}"
    worker = spread([r["worker_rss"] / 2**20 for r in results], mib) if workers > 1 else "(none)"
    return (
        f"| {size / 1e6:.0f} MB | {workers} | {spread(seconds)} | "
        f"{spread([size / 1e6 / t for t in seconds], '{:.2f}')} | "
        f"{spread([r['tokens'] / r['seconds'] for r in results], mib)} | "
        f"{spread([r['rss'] / 2**20 for r in results], mib)} | {worker} |"
    )


def fake_sources(weights: list[float]) -> MixtureData:
    sizes = [1_000_003, 200_003, 50_003, 7_001, 2_003]  # unequal sizes: small sources repeat
    sources = [
        SourceData(Source(f"s{i}", f"s{i}", w, "text"), [np.zeros(sizes[i], dtype=np.uint16)], np.zeros(0), Path("."))
        for i, w in enumerate(weights)
    ]
    return MixtureData(tokenizer=None, sources=sources)


def share_rows(steps: int, batch_size: int) -> list[str]:
    """The loader's own draw against the weights. Over whole blocks of BLOCK windows the share is the
    weights' largest-remainder rounding to 1 / BLOCK by construction: this checks the draw, it does
    not measure chance."""
    rows = []
    for recipe, weights in RECIPES.items():
        loader = MixtureLoader(fake_sources(weights), batch_size=batch_size, seq_len=128, seed=1337)
        drawn = np.bincount(np.concatenate([loader.window_sources(s) for s in range(steps)]), minlength=len(weights))
        share = drawn / drawn.sum()
        epochs = ", ".join(str(e) for e in (drawn // np.array([w.count for w in loader.windows])).tolist())
        measured = ", ".join(f"{s:.4f}" for s in share)
        wanted = ", ".join(f"{w:.2f}" for w in weights)
        worst = np.abs(share - np.array(weights) / sum(weights)).max()
        rows.append(f"| {recipe} | {wanted} | {measured} | {worst:.4%} | {epochs} |")
    return rows


def mask_rows(steps: int) -> list[str]:
    """Training steps of config/tiny-mix.yaml's model on its own batches, with and without document_ids."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seq_len in (128, 512):
            config = load_config(ROOT / "config/tiny-mix.yaml", [f"data.seq_len={seq_len}", "data.document_mask=true"])
            config.data.sources = [{**s, "path": str(ROOT / s["path"])} for s in config.data.sources]
            data = prepare_mixture(config, tmp, quiet=True)
            loader = mixture_loader(data, config, 0, 1, "cpu")
            batches = [loader.batch(s) for s in range(steps)]
            documents = statistics.mean(float(b["document_ids"].max(dim=1).values.float().mean() + 1) for b in batches)
            torch.manual_seed(0)
            model = SmolLM2(config.model)
            optimizer = make_optimizer(model, config.train, torch.device("cpu"))
            times = {True: [], False: []}
            for step, batch in enumerate(batches):
                for masked in (False, True) if step % 2 else (True, False):  # alternate which goes first
                    inputs = batch if masked else {k: v for k, v in batch.items() if k != "document_ids"}
                    start = time.perf_counter()
                    model(**inputs).backward()
                    optimizer_step(model, optimizer, 1.0)
                    times[masked].append(time.perf_counter() - start)
            tokens = config.train.batch_size * seq_len
            plain, masked = ([tokens / t for t in times[m][2:]] for m in (False, True))  # two steps warm up
            ratios = [m / p for m, p in zip(masked, plain, strict=True)]  # steps timed next to each other
            rows.append(
                f"| {config.train.batch_size} x {seq_len} | {documents:.1f} | {spread(plain, '{:,.0f}')} | "
                f"{spread(masked, '{:,.0f}')} | {spread(ratios, '{:.2f}', 'x')} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big_mb", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3, help="prepare runs of each corpus and worker count")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--mask_steps", type=int, default=20)
    args = parser.parse_args()
    shares = share_rows(args.steps, batch_size=16)
    masks = mask_rows(args.mask_steps)
    prepares = prepare_rows(args.big_mb, args.runs)
    worker_imports = run_json(WORKER_IMPORTS)["peak_rss"] / 2**20
    print("## Mixtures and document masks\n")
    print(
        f"`python bench/mixture_bench.py --big_mb {args.big_mb} --runs {args.runs} --steps {args.steps} "
        f"--mask_steps {args.mask_steps}`.\n"
    )
    print(
        "Prepare (`prepare --workers N`) on a generated corpus (shuffled lines of input.txt), 32000-token BPE, "
        f"median (min-max) of {args.runs} runs, each in a fresh process. With 1 worker the encoder's own threads use "
        "every core; with N, N processes encode one thread each while the main process reads and writes. Peak RSS: "
        "the main process's high-water mark, and the largest worker's resident set sampled every 0.1 s.\n"
    )
    print("| corpus | workers | seconds | MB/s | tokens/s | peak RSS, main (MiB) | peak RSS, per worker (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(prepares))
    print(
        f"\nWhat a worker imports (`smollm2.parallel_encode`, in a fresh process): {worker_imports:,.0f} MiB peak RSS; "
        "its tokenizer and batches come on top.\n"
    )
    windows = args.steps * 16
    blocks = windows // BLOCK
    whole = f"{blocks:,} whole block{'s' * (blocks != 1)}" if windows % BLOCK == 0 else f"{windows / BLOCK:.1f} blocks"
    print(
        f"Share of windows per source over {args.steps:,} steps of 16 windows ({windows:,} windows: {whole} of "
        f"{BLOCK:,}), the loader's own draw, sources of 1M, 200k, 50k, 7k and 2k tokens at 128 a window. Not a "
        "measurement of chance: every block holds each source's share of its windows exactly (the weights times "
        f"{BLOCK:,}, largest remainder), so over whole blocks the difference is zero by construction; the table "
        "checks that the draw keeps it.\n"
    )
    print("| weights of | weights | drawn share | largest difference | epochs per source |")
    print("|---|---|---|---:|---|")
    print("\n".join(shares))
    print(
        "\nDocument masks (`data.document_mask: true`) on this CPU: a training step (forward, backward, AdamW) "
        "of config/tiny-mix.yaml's model on its own batches, with and without document_ids, taking turns step "
        f"by step; median (min-max) over {args.mask_steps - 2} steps each (the ratio: of the steps timed next to "
        "each other), fp32.\n"
    )
    print("| micro-batch | documents a window | plain causal tokens/s | masked tokens/s | masked / plain |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(masks))


if __name__ == "__main__":
    main()
