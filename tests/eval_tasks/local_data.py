"""The local tasks' data: JSONL files beside this one, read without the network or a cache."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def read(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice(**kwargs) -> datasets.DatasetDict:
    return read("multiple_choice.jsonl")


def generation(**kwargs) -> datasets.DatasetDict:
    return read("generation.jsonl")


def texts(**kwargs) -> datasets.DatasetDict:
    return read("texts.jsonl")
