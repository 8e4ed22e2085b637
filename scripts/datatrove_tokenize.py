"""Tokenize a folder of .jsonl or .parquet files with datatrove, into a folder that `data.sources`
trains on without re-tokenizing. Locally with --tasks processes, or on a Slurm cluster.

    python scripts/datatrove_tokenize.py --input corpus/ --tokenizer runs/mine/data/input-2048/tokenizer.json \\
        --out tokenized/ --tasks 8
    python scripts/datatrove_tokenize.py ... --tasks 512 --slurm PARTITION   # one task per job of the array
    python scripts/datatrove_tokenize.py ... --resume   # finish the tasks an interrupted run left undone

--out must be a new or empty folder; datatrove's logs go to OUT/logs unless --logs says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smollm2.cli import ArgumentParser, run
from smollm2.datatrove_io import check_tokenize_folders, tokenize_steps


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="folder of .jsonl or .parquet files")
    parser.add_argument("--tokenizer", required=True, help="the run's tokenizer.json")
    parser.add_argument("--out", required=True, help="output folder, new or empty (a data.sources path)")
    parser.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    parser.add_argument("--text_key", default="text")
    parser.add_argument("--tasks", type=int, default=1, help="shards of the input, one output file each")
    parser.add_argument("--slurm", metavar="PARTITION", help="run the tasks as a Slurm job array")
    parser.add_argument("--logs", help="datatrove's logs (default: OUT/logs): which tasks are done")
    parser.add_argument("--resume", action="store_true", help="finish the unfinished tasks of the run in --out")
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error(f"--tasks must be at least 1, got {args.tasks}")
    args.logs = args.logs or str(Path(args.out) / "logs")
    return args


def tokenize(args: argparse.Namespace) -> None:
    check_tokenize_folders(Path(args.input), Path(args.out), Path(args.logs), args.resume)
    steps = tokenize_steps(args.input, args.tokenizer, args.out, args.format, args.text_key)
    if args.slurm:
        from datatrove.executor import SlurmPipelineExecutor

        executor = SlurmPipelineExecutor(
            steps, tasks=args.tasks, time="4:00:00", partition=args.slurm, logging_dir=args.logs, job_name="tokenize"
        )
    else:
        from datatrove.executor import LocalPipelineExecutor

        executor = LocalPipelineExecutor(steps, tasks=args.tasks, logging_dir=args.logs)
    executor.run()


def main(argv: list[str] | None = None) -> int:
    return run(tokenize, parse(argv))


if __name__ == "__main__":
    sys.exit(main())
