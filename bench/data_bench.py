"""Data pipeline benchmark: prepare throughput and peak memory, loader batches per second.

Each measurement runs in a fresh subprocess so that its peak RSS is its own. Prints a Markdown
section; `bench/run.py` collects it into BENCHMARKS.md.

    python bench/data_bench.py [--big_mb 100]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from report import run_json, spread

ROOT = Path(__file__).resolve().parents[1]

PREPARE = """
import json, resource, sys, time
from smollm2.config import config_from_dict
from smollm2.data import prepare
corpus, folder, tokenizer, vocab = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
raw = {"model": {"vocab_size": vocab}, "data": {"path": corpus, "tokenizer": tokenizer, "prepared_dir": folder}}
start = time.perf_counter()
data = prepare(config_from_dict(raw, "bench"), folder, quiet=True)
seconds = time.perf_counter() - start
tokens = data.meta["train_tokens"] + data.meta["val_tokens"]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "tokens": tokens, "bytes": data.meta["bytes"], "peak_rss": peak}))
"""

LOADER = """
import json, sys, time
import numpy as np
from smollm2.data import BatchLoader
tokens = np.memmap(sys.argv[1], dtype=np.uint16, mode="r")
loader = BatchLoader(tokens, batch_size=16, seq_len=512, seed=0)
next(loader)
start = time.perf_counter()
for _ in range(500):
    next(loader)
print(json.dumps({"batches_per_sec": 500 / (time.perf_counter() - start)}))
loader.close()
"""


def make_corpus(path: Path, megabytes: int) -> None:
    """A synthetic corpus of ~N MB: shuffled lines of input.txt, so the text stays realistic."""
    lines = (ROOT / "input.txt").read_text().splitlines(keepends=True)
    rng = random.Random(0)
    target = megabytes * 1_000_000
    written = 0
    with open(path, "w") as f:
        while written < target:
            block = rng.sample(lines, len(lines))
            text = "".join(block)
            f.write(text)
            written += len(text.encode())


def runs_of(runs: int, fn) -> dict[str, list[float]]:
    """Each figure `fn` returns, over `runs` calls."""
    results = [fn() for _ in range(runs)]
    return {k: [r[k] for r in results] for k in results[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big_mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = str(ROOT / "input.txt")
        n = [0]

        def prepare_run(corpus: str, tokenizer: str, vocab: int) -> dict:
            n[0] += 1
            return run_json(PREPARE, corpus, str(tmp / f"prep{n[0]}"), tokenizer, str(vocab))

        train_tok = runs_of(args.runs, lambda: prepare_run(small, "train", 32000))
        rows.append(("input.txt, train a 32000-token BPE + encode", train_tok))
        tokenizer = str(tmp / "prep1" / "tokenizer.json")
        encode_small = runs_of(args.runs, lambda: prepare_run(small, tokenizer, 32000))
        rows.append(("input.txt, encode with that tokenizer", encode_small))
        big = tmp / "big.txt"
        make_corpus(big, args.big_mb)
        encode_big = runs_of(args.runs, lambda: prepare_run(str(big), tokenizer, 32000))
        rows.append((f"{args.big_mb} MB synthetic corpus, encode", encode_big))
        train_bin = next(tmp.glob("prep*/train.bin"))
        loader = runs_of(args.runs, lambda: run_json(LOADER, str(train_bin)))
    print("## Data pipeline\n")
    print(
        f"`python bench/data_bench.py --big_mb {args.big_mb} --runs {args.runs}`: median (min-max) of {args.runs} "
        "runs; each run is a fresh process, peak RSS is the process's maximum resident set.\n"
    )
    print("| what | seconds | MB/s | tokens/s | tokens | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        rates = [(b / 1e6 / t, k / t) for b, k, t in zip(r["bytes"], r["tokens"], r["seconds"], strict=True)]
        print(
            f"| {name} | {spread(r['seconds'], '{:.2f}')} | {spread([m for m, _ in rates])} | "
            f"{spread([t for _, t in rates], '{:,.0f}')} | {r['tokens'][0]:,.0f} | "
            f"{spread([b / 2**20 for b in r['peak_rss']], '{:,.0f}')} |"
        )
    batches = loader["batches_per_sec"]
    print(
        f"\nLoader: {spread(batches, '{:,.0f}')} batches/s of 16 x 512 tokens "
        f"({spread([b * 16 * 512 for b in batches], '{:,.0f}')} tokens/s) from a memmap, with the prefetch thread.\n"
    )


if __name__ == "__main__":
    main()
