"""Mixtures benchmark: prepare with 1 and 2 worker processes, the share of windows per source
against the weights, and the cost of document masks in training tokens/s on this CPU.

Prepare runs each measurement in a fresh process, so that its peak RSS (and its workers') is its
own; the corpus is generated under a temporary folder and removed afterwards. Prints a Markdown
section; `bench/run.py` collects it into BENCHMARKS.md.

    python bench/mixture_bench.py [--big_mb 200] [--steps 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_bench import make_corpus  # noqa: E402  (bench/ is a folder of scripts, not a package)

from smollm2.config import load_config  # noqa: E402
from smollm2.mixture import MixtureData, MixtureLoader, Source, SourceData, mixture_loader, prepare_mixture  # noqa: E402
from smollm2.model import SmolLM2  # noqa: E402
from smollm2.trainer import make_optimizer, optimizer_step  # noqa: E402

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


def run_json(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare_rows(big_mb: int) -> list[str]:
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
                r = run_json(PREPARE, str(corpus), str(tmp / f"prep-{megabytes}-{workers}"), tokenizer, str(workers))
                worker = f"{r['worker_rss'] / 2**20:,.0f} MiB" if workers > 1 else "(none)"
                rows.append(
                    f"| {r['bytes'] / 1e6:.0f} MB | {workers} | {r['seconds']:.1f} | "
                    f"{r['bytes'] / 1e6 / r['seconds']:.2f} | {r['tokens'] / r['seconds']:,.0f} | "
                    f"{r['rss'] / 2**20:,.0f} MiB | {worker} |"
                )
            corpus.unlink()
    return rows


def fake_sources(weights: list[float]) -> MixtureData:
    sizes = [1_000_003, 200_003, 50_003, 7_001, 2_003]  # unequal sizes: small sources repeat
    sources = [
        SourceData(Source(f"s{i}", f"s{i}", w, "text"), [np.zeros(sizes[i], dtype=np.uint16)], np.zeros(0), Path("."))
        for i, w in enumerate(weights)
    ]
    return MixtureData(tokenizer=None, sources=sources)


def share_rows(steps: int, batch_size: int) -> list[str]:
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
            plain, masked = (tokens / statistics.median(times[m][2:]) for m in (False, True))
            rows.append(
                f"| {config.train.batch_size} x {seq_len} | {documents:.1f} | {plain:,.0f} | {masked:,.0f} | "
                f"{masked / plain:.2f}x |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big_mb", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--mask_steps", type=int, default=20)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    shares = share_rows(args.steps, batch_size=16)
    masks = mask_rows(args.mask_steps)
    prepares = prepare_rows(args.big_mb)
    print("## Mixtures and document masks\n")
    load_after = os.getloadavg()[0]
    busy = max(load_before, load_after) > os.cpu_count()
    note = (
        "more runnable processes than cores: other work shared the machine, so the times are longer than "
        "an idle machine's"
        if busy
        else "an otherwise idle machine"
    )
    print(
        f"Command: `python bench/mixture_bench.py --big_mb {args.big_mb} --steps {args.steps} "
        f"--mask_steps {args.mask_steps}`. Load average (1 min) on this {os.cpu_count()}-core machine: "
        f"{load_before:.1f} at the start, {load_after:.1f} at the end ({note}).\n"
    )
    print(
        "Prepare (`prepare --workers N`) on a generated corpus (shuffled lines of input.txt), 32000-token BPE, one "
        "run each in a fresh process. With 1 worker the encoder's own threads use every core; with N, N processes "
        "encode one thread each while the main process reads and writes. Peak RSS: the main process's high-water "
        "mark, and the largest worker's resident set sampled every 0.1 s.\n"
    )
    print("| corpus | workers | seconds | MB/s | tokens/s | peak RSS, main | peak RSS, per worker |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(prepares))
    print(
        f"\nShare of windows per source over {args.steps:,} steps of 16 windows (the loader's own draw, "
        "sources of 1M, 200k, 50k, 7k and 2k tokens at 128 a window):\n"
    )
    print("| weights of | weights | measured share | largest difference | epochs per source |")
    print("|---|---|---|---:|---|")
    print("\n".join(shares))
    print(
        "\nDocument masks (`data.document_mask: true`) on this CPU: a training step (forward, backward, AdamW) "
        "of config/tiny-mix.yaml's model on its own batches, with and without document_ids, alternating; "
        f"medians of {args.mask_steps - 2} steps each, fp32.\n"
    )
    print("| micro-batch | documents a window | plain causal tokens/s | masked tokens/s | masked / plain |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(masks))


if __name__ == "__main__":
    main()
