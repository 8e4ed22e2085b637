"""What every benchmark script shares: the machine in words, median and spread, a measurement in a
fresh process. bench/ is a folder of scripts: they import this as `from report import ...` with
bench/ on sys.path (a script's own folder is on it when it is run)."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence


def machine() -> str:
    """The CPU, its threads and the software versions that move the figures."""
    import torch

    from smollm2.hardware import cpu_name

    threads = torch.get_num_threads()
    return f"{cpu_name()}, {threads} threads, torch {torch.__version__}, Python {platform.python_version()}"


def spread(values: Sequence[float], fmt: str = "{:,.1f}", suffix: str = "") -> str:
    """Median and (min-max) of repeated measurements; one value (or all alike as written) stands alone."""
    low, mid, high = (fmt.format(v) for v in (min(values), statistics.median(values), max(values)))
    return f"{mid}{suffix}" if low == high else f"{mid}{suffix} ({low}-{high})"


def run_json(code: str, *args: str) -> dict:
    """Run `code` in a fresh Python process (its peak memory its own); its last stdout line is JSON."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
