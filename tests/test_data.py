import contextlib
import json
import random
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from smollm2.config import UserError, config_from_dict
from smollm2.data import BatchLoader, eval_batches, prepare, resolve_sources
from smollm2.parallel_encode import encode_pieces
from smollm2.tokenizer import load_tokenizer, train_tokenizer

PLAY = "".join(
    f"{name}:\nWhat light through yonder window breaks, {i}?\nIt is the east, and Juliet is the sun.\n\n"
    for i, name in enumerate(["ROMEO", "JULIET", "NURSE", "MERCUTIO"] * 60)
)


def config_for(path, **data):
    raw = {
        "model": {"n_layers": 1, "hidden_size": 32, "n_heads": 2, "intermediate_size": 64, "vocab_size": 400},
        "data": {"path": str(path), "seq_len": 16, "val_fraction": 0.1} | data,
    }
    return config_from_dict(raw, "test")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([PLAY], vocab_size=400)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_tokenizer_round_trips_any_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_larger_than_model_vocab_is_an_error(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match="400 tokens, more than model.vocab_size=100"):
        load_tokenizer(tmp_path / "tokenizer.json", vocab_size=100)
    assert load_tokenizer(tmp_path, vocab_size=1000).hash == tokenizer.hash  # a folder works too


def test_small_corpus_reports_the_vocab_it_reached(capsys):
    train_tokenizer(["abc abc"], vocab_size=5000)
    assert "supports" in capsys.readouterr().err


def test_token_files_equal_direct_encoding(tmp_path):
    corpus = tmp_path / "play.txt"
    corpus.write_text(PLAY)
    data = prepare(config_for(corpus, val_fraction=0.0), tmp_path, quiet=True)
    expected = data.tokenizer.encode(PLAY) + [data.tokenizer.eos_id]
    assert data.train.dtype == np.uint16
    assert np.array_equal(np.asarray(data.train), expected)
    assert len(data.val) == 0


def random_words(n_bytes: int, seed: int = 0) -> str:
    """Lines of words drawn at random: any 17 tokens in a row occur once, so a window is found by its tokens."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(300)]
    lines = []
    while sum(len(line) + 1 for line in lines) < n_bytes:
        lines.append(" ".join(rng.choices(words, k=rng.randint(6, 12))))
    return "\n".join(lines) + "\n"


def test_validation_split_is_whole_pieces_and_disjoint(tmp_path, monkeypatch):
    """The corpus's pieces (as prepare encodes them) go whole to train.bin or val.bin, and no token of any
    window the trainer's loader hands out over an epoch lies in a piece of the validation split."""
    import smollm2.data
    from smollm2.mixture import corpus_loader

    pieces = []

    def recording(*args, **kwargs):
        for piece, ids in encode_pieces(*args, **kwargs):
            pieces.append(np.asarray(ids))
            yield piece, ids

    monkeypatch.setattr(smollm2.data, "encode_pieces", recording)
    corpus = tmp_path / "words.txt"
    corpus.write_text(random_words(80_000))  # ~80 pieces of 1 KB
    config = config_for(corpus)
    data = prepare(config, tmp_path, quiet=True)
    train, val = np.asarray(data.train), np.asarray(data.val)
    stream = np.concatenate(pieces)  # the corpus's tokens in order
    assert len(train) + len(val) == len(stream) == len(data.tokenizer.encode(corpus.read_text())) + 1

    in_val = np.zeros(len(stream), dtype=bool)  # where each piece went, found by its tokens
    train_at = []  # the corpus position of each token of train.bin
    cursor = {"train": 0, "val": 0}
    start = 0
    for ids in pieces:
        matches = [name for name, tokens in (("train", train), ("val", val))
                   if np.array_equal(tokens[cursor[name] : cursor[name] + len(ids)], ids)]  # fmt: skip
        assert len(matches) == 1, f"the piece at token {start} is not whole in exactly one split: {matches}"
        cursor[matches[0]] += len(ids)
        if matches[0] == "val":
            in_val[start : start + len(ids)] = True
        else:
            train_at.extend(range(start, start + len(ids)))
        start += len(ids)
    assert cursor == {"train": len(train), "val": len(val)}
    val_pieces = int(np.sum(np.diff(in_val.astype(int)) == 1)) + int(in_val[0])
    assert val_pieces >= 4 and 0.05 < in_val.mean() < 0.2  # spread over the corpus, not one block

    width = config.data.seq_len + 1
    where = {}
    for position, window in enumerate(np.lib.stride_tricks.sliding_window_view(train, width)):
        where.setdefault(window.tobytes(), []).append(position)
    loader = corpus_loader(data, config, 0, 1, "cpu")
    seen = set()
    try:
        for _ in range(loader.batches_per_epoch):
            batch = next(loader)
            windows = torch.cat([batch["input_ids"], batch["targets"][:, -1:]], dim=1).numpy().astype(train.dtype)
            for window in windows:
                found = where.get(window.tobytes(), [])
                assert len(found) == 1, f"a training window is {len(found)} places in train.bin: {window.tolist()}"
                corpus_positions = np.asarray(train_at[found[0] : found[0] + width])
                assert not in_val[corpus_positions].any(), f"a training window overlaps validation: {corpus_positions}"
                seen.add(found[0])
    finally:
        loader.close()
    assert len(seen) == loader.batches_per_epoch * loader.batch_size  # an epoch: every window once
    meta = json.loads((data.folder / "meta.json").read_text())
    assert meta["train_tokens"] == len(data.train) and meta["tokenizer_hash"] == data.tokenizer.hash


def test_reuse_and_rebuild(tmp_path, capsys):
    corpus = tmp_path / "play.txt"
    corpus.write_text(PLAY)
    config = config_for(corpus)
    first = prepare(config, tmp_path)
    assert "reusing" not in capsys.readouterr().out
    built = {p.name: p.stat().st_mtime_ns for p in first.folder.iterdir()}
    again = prepare(config, tmp_path)
    tokens = f"{len(first.train):,} train / {len(first.val):,} val tokens"
    assert capsys.readouterr().out == f"data: reusing {first.folder} ({tokens})\n"
    assert {p.name: p.stat().st_mtime_ns for p in again.folder.iterdir()} == built  # read, not rewritten
    corpus.write_text(PLAY + "EPILOGUE:\nThe end.\n")
    rebuilt = prepare(config, tmp_path)
    assert "reusing" not in capsys.readouterr().out
    assert rebuilt.meta["bytes"] == first.meta["bytes"] + len("EPILOGUE:\nThe end.\n")


def test_folder_of_jsonl_and_text(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(PLAY)
    lines = [json.dumps({"text": "JULIET:\nO Romeo, Romeo!\n"}) for _ in range(50)]
    (tmp_path / "corpus" / "b.jsonl").write_text("\n".join(lines) + "\n")
    data = prepare(config_for(tmp_path / "corpus"), tmp_path, quiet=True)
    eos = data.tokenizer.eos_id
    all_tokens = np.concatenate([data.train, data.val])
    assert int((all_tokens == eos).sum()) == 1 + 50  # one per document


def test_jsonl_with_another_text_field_through_set(tmp_path):
    texts = [PLAY[i * 500 : (i + 1) * 500] for i in range(20)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"id": i, "content": t}) + "\n" for i, t in enumerate(texts)))
    raw = config_for(tmp_path / "c.jsonl", val_fraction=0.0).to_dict()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [sys.executable, "-m", "smollm2", "prepare", "--config", "c.yaml", "--set", "data.text_field=content"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (folder,) = (tmp_path / "data").iterdir()
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    expected = [token for t in texts for token in tokenizer.encode(t) + [tokenizer.eos_id]]
    assert np.fromfile(folder / "train.bin", dtype=np.uint16).tolist() == expected
    assert json.loads((folder / "meta.json").read_text())["fingerprint"]["text_field"] == "content"


def test_a_missing_text_field_names_it_and_how_to_set_it(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": PLAY}) + "\n")
    config = config_for(tmp_path / "c.jsonl", text_field="body", prepared_dir=str(tmp_path / "prepared"))
    message = (
        f"{tmp_path / 'c.jsonl'}:1: no string field 'body' "
        "(its string fields: content; choose the field with --set data.text_field=content)"
    )
    with pytest.raises(UserError) as raised:
        prepare(config, tmp_path, quiet=True)
    assert str(raised.value) == message
    assert not (tmp_path / "prepared").exists()


def test_parquet_with_another_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2], "body": [PLAY[:3000], PLAY[3000:6000]]}), tmp_path / "c.parquet")
    data = prepare(config_for(tmp_path / "c.parquet", text_field="body", val_fraction=0.0), tmp_path, quiet=True)
    eos = data.tokenizer.eos_id
    assert data.train.tolist() == data.tokenizer.encode(PLAY[:3000]) + [eos] + data.tokenizer.encode(
        PLAY[3000:6000]
    ) + [eos]
    with pytest.raises(UserError) as raised:
        prepare(config_for(tmp_path / "c.parquet"), tmp_path / "other", quiet=True)
    assert str(raised.value) == (
        f"{tmp_path / 'c.parquet'}: no string column 'text' (its string columns: body; "
        "choose the column with --set data.text_field=body)"
    )


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [PLAY[:2000], PLAY[2000:4000]] * 10
    pq.write_table(pa.table({"text": texts}), tmp_path / "c.parquet")
    data = prepare(config_for(tmp_path / "c.parquet"), tmp_path, quiet=True)
    expected = [t for text in texts for t in [*data.tokenizer.encode(text), data.tokenizer.eos_id]]
    assert len(data.val) > 0  # the split holds out pieces of the rows
    assert sorted([*data.train.tolist(), *data.val.tolist()]) == sorted(expected)  # every row's tokens, once


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "missing.txt", "does not exist"),
        (lambda d: d / "*.nothing", "matches no file"),
        (lambda d: _write(d / "empty.txt", b""), "is empty"),
        (lambda d: _write(d / "blank.txt", b"  \n\n \t\n"), "empty or only whitespace"),
        (lambda d: _write(d / "short.txt", b"ROMEO: hi\n"), "fewer than one window"),
        (lambda d: _write(d / "bad.jsonl", b'{"text": "ok"}\n{"text": broken\n'), r"bad.jsonl:2: not valid JSON"),
        (
            lambda d: _write(d / "notext.jsonl", b'{"body": "ok", "n": 1}\n'),
            r"notext.jsonl:1: no string field 'text' \(its string fields: body; choose the field with --set "
            r"data.text_field=body\)$",
        ),
        (lambda d: _write(d / "bad.parquet", b"PAR1 this is not parquet"), "not a readable parquet"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_nothing_half_written(tmp_path, setup, message):
    path = setup(tmp_path)
    config = config_for(path, prepared_dir=str(tmp_path / "prepared"))
    with pytest.raises(UserError, match=message):
        prepare(config, tmp_path, quiet=True)
    assert not (tmp_path / "prepared").exists()
    assert not list(tmp_path.glob("prepared.tmp-*"))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_a_failed_rebuild_keeps_the_previous_files(tmp_path):
    corpus = tmp_path / "play.txt"
    corpus.write_text(PLAY)
    config = config_for(corpus, prepared_dir=str(tmp_path / "prepared"))
    before = np.asarray(prepare(config, tmp_path, quiet=True).train).copy()
    corpus.write_text("  \n")
    with pytest.raises(UserError):
        prepare(config, tmp_path, quiet=True)
    assert np.array_equal(np.fromfile(tmp_path / "prepared" / "train.bin", dtype=np.uint16), before)


def test_undecodable_bytes_are_replaced_and_counted(tmp_path, capsys):
    corpus = _write(tmp_path / "latin1.txt", PLAY.encode() + b"caf\xe9 \xff\n")
    data = prepare(config_for(corpus), tmp_path, quiet=True)
    assert data.meta["undecodable_bytes"] == 2
    assert "replaced 2 undecodable" in capsys.readouterr().err


def test_resolve_sources_glob_sorted(tmp_path):
    for name in ["b.txt", "a.txt"]:
        _write(tmp_path / name, b"x")
    assert [p.name for p in resolve_sources(str(tmp_path / "*.txt"))] == ["a.txt", "b.txt"]


TOKENS = np.arange(10_000, dtype=np.uint16)


def test_loader_resumes_exactly():
    uninterrupted = BatchLoader(TOKENS, batch_size=4, seq_len=32, seed=3)
    expected = [next(uninterrupted) for _ in range(200)]  # crosses several epochs (78 per epoch)
    first = BatchLoader(TOKENS, batch_size=4, seq_len=32, seed=3)
    got = [next(first) for _ in range(77)]
    state = first.state_dict()
    first.close()
    resumed = BatchLoader(TOKENS, batch_size=4, seq_len=32, seed=3)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(123)]
    for batch, wanted in zip(got, expected, strict=True):
        assert batch.keys() == wanted.keys() == {"input_ids", "targets"}
        assert all(np.array_equal(batch[name], wanted[name]) for name in batch)


def test_targets_are_inputs_shifted_by_one():
    batch = next(BatchLoader(TOKENS, batch_size=2, seq_len=16, seed=0))
    x, y = batch["input_ids"], batch["targets"]
    assert np.array_equal(x[:, 1:], y[:, :-1]) and x.shape == (2, 16)


def test_an_epoch_visits_each_window_once_and_epochs_reshuffle():
    loader = BatchLoader(TOKENS, batch_size=4, seq_len=32, seed=1)
    per_epoch = loader.batches_per_epoch
    epoch0 = np.concatenate([loader.window_starts(s) for s in range(per_epoch)])
    epoch1 = np.concatenate([loader.window_starts(s) for s in range(per_epoch, 2 * per_epoch)])
    assert len(set(epoch0.tolist())) == len(epoch0) == per_epoch * 4
    assert not np.array_equal(epoch0, epoch1)


def test_ranks_get_disjoint_windows():
    ranks = [BatchLoader(TOKENS, batch_size=4, seq_len=32, seed=1, rank=r, world_size=3) for r in range(3)]
    for step in range(ranks[0].batches_per_epoch):
        seen = [set(r.window_starts(step).tolist()) for r in ranks]
        assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_too_little_data_for_a_batch():
    with pytest.raises(UserError, match="fewer than one global micro-batch"):
        BatchLoader(np.arange(100, dtype=np.uint16), batch_size=8, seq_len=32, seed=0)


def test_eval_batches_are_fixed_and_cover_short_splits():
    batches = eval_batches(TOKENS[:50], batch_size=4, seq_len=32, max_batches=3)
    assert len(batches) == 1 and batches[0]["input_ids"].shape == (1, 32)
    short = eval_batches(TOKENS[:10], batch_size=4, seq_len=32, max_batches=3)
    assert short[0]["input_ids"].shape == (1, 9)


# ---------------------------------------------------------------------------------------------
# Pieces cut at any character boundary: every corpus gets its validation share

LINES = {
    "lf": "The quick brown fox jumps over the lazy dog {}.\n",
    "crlf": "The quick brown fox jumps over the lazy dog {}.\r\n",
    "cyrillic": "Съешь же ещё этих мягких французских булок, да выпей чаю {}.\n",
    "cjk": "敏捷的棕色狐狸跳过了懒狗，然后跑进了森林{}。\n",
    "one line": "The quick brown fox jumps over the lazy dog {}. ",
    "cjk one line": "敏捷的棕色狐狸跳过了懒狗然后跑进了森林{}。",
}


def _corpus(kind: str, size: int = 400_000) -> str:
    line = LINES[kind]
    lines, total, i = [], 0, 0
    while total < size:
        lines.append(line.format(i % 10))
        total += len(lines[-1].encode())
        i += 1
    return "".join(lines)


@pytest.mark.parametrize("kind", list(LINES))
def test_every_corpus_gets_its_validation_share(tmp_path, kind):
    text = _corpus(kind)
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(text.encode())
    data = prepare(config_for(corpus, val_fraction=0.1), tmp_path, quiet=True)
    total = len(data.train) + len(data.val)
    assert abs(len(data.val) / total - 0.1) <= 0.001  # within 1% of val_fraction
    direct = len(data.tokenizer.encode(text)) + 1
    if kind == "cjk one line":  # no whitespace at all: a cut may split what the pre-tokenizer keeps whole
        assert direct <= total <= direct + 2 * data.meta["pieces"]
    else:  # cut where the pre-tokenizer cuts anyway: the same tokens as the whole text's
        assert total == direct
    assert data.meta["undecodable_bytes"] == 0


@pytest.mark.parametrize("kind", list(LINES))
def test_pieces_stay_bounded_on_any_text(tmp_path, kind):
    from smollm2.data import read_pieces

    text = _corpus(kind, 200_000)
    (tmp_path / "c.txt").write_bytes(text.encode())
    pieces = list(read_pieces([tmp_path / "c.txt"], 4096, {}, "text"))
    assert "".join(p.text for p in pieces) == text
    assert max(len(p.text.encode()) for p in pieces) <= 2 * 4096
    assert len(pieces) >= 200_000 // (2 * 4096)


def test_data_prepared_by_an_older_format_is_rebuilt(tmp_path, capsys):
    corpus = tmp_path / "play.txt"
    corpus.write_text(PLAY)
    config = config_for(corpus)
    folder = prepare(config, tmp_path, quiet=True).folder
    meta = json.loads((folder / "meta.json").read_text())
    meta["fingerprint"]["format"] = 1
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / ".smollm2").write_text('{"kind": "data"}\n')  # as an older smollm2 marked it: no file records
    prepare(config, tmp_path)
    assert "reusing" not in capsys.readouterr().out
    assert json.loads((folder / "meta.json").read_text())["fingerprint"]["format"] == 2


# ---------------------------------------------------------------------------------------------
# The order is a function of the window's place in the run: any batch size continues it

SEQ = 30  # 333 windows of TOKENS: an epoch ends inside a micro-batch of 4 or 8


def _windows(loader: BatchLoader, steps: int) -> list[int]:
    """The windows of the next `steps` micro-batches (a window of TOKENS starts at its number x SEQ)."""
    return [int(start) // SEQ for _ in range(steps) for start in next(loader)["input_ids"][:, 0]]


def test_every_epoch_visits_every_window_once():
    loader = BatchLoader(TOKENS, batch_size=4, seq_len=SEQ, seed=5)
    seen = _windows(loader, 250)  # 1000 windows: three epochs of 333 and one more
    loader.close()
    assert loader.n_windows == 333
    for epoch in range(3):
        assert sorted(seen[epoch * 333 : (epoch + 1) * 333]) == list(range(333))
    assert seen[:333] != seen[333:666]


@pytest.mark.parametrize(("before", "after"), [(4, 8), (8, 4), (3, 5)])
def test_resume_with_another_batch_size_goes_on_at_the_next_window(before, after):
    uninterrupted = BatchLoader(TOKENS, batch_size=1, seq_len=SEQ, seed=5)
    whole = _windows(uninterrupted, 1000)
    uninterrupted.close()
    first = BatchLoader(TOKENS, batch_size=before, seq_len=SEQ, seed=5)
    got = _windows(first, 360 // before)  # past the end of the first epoch
    state = first.state_dict()
    first.close()
    resumed = BatchLoader(TOKENS, batch_size=after, seq_len=SEQ, seed=5)
    resumed.load_state_dict(state)
    got += _windows(resumed, 400 // after)  # and past the end of the second
    resumed.close()
    assert got == whole[: len(got)]


def test_an_epoch_order_is_drawn_once():
    from smollm2.data import _epoch_order

    loader = BatchLoader(TOKENS, batch_size=4, seq_len=SEQ, seed=6)
    _epoch_order.cache_clear()
    for step in range(3 * loader.batches_per_epoch):
        loader.window_starts(step)
    assert _epoch_order.cache_info().misses == 3


def test_a_checkpoint_of_data_prepared_the_old_way_is_refused(tmp_path, monkeypatch, capsys):
    from smollm2 import cli
    from smollm2.trainer import train
    from tests.helpers import CORPUS, refused, tiny_config

    (tmp_path / "input.txt").write_text(CORPUS)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_config()))
    monkeypatch.chdir(tmp_path)
    train(config_from_dict(tiny_config(), "tiny.yaml"), 2, None, ".")
    path = tmp_path / "checkpoints" / "step_2.pt"
    state = torch.load(path, weights_only=True)
    assert state["loader"]["data_format"] == 2
    del state["loader"]["data_format"], state["loader"]["windows"]  # as the loader of data format 1 saved it
    torch.save(state, path)
    capsys.readouterr()
    argv = ["--config", "tiny.yaml", "--train_steps", "2", "--checkpoint_path", str(path)]
    refused(capsys, tmp_path, cli.train_main, argv, "data format 1, now 2")


# ---------------------------------------------------------------------------------------------
# A run without validation says so, in one line


@pytest.mark.parametrize(
    ("fraction", "said"),
    [
        (
            0.0001,
            "data.val_fraction=0.0001 held out 0 token(s), too few for a window of 2 "
            "(more text or a larger data.val_fraction gives one)",
        ),
        (0.0, "data.val_fraction is 0"),
    ],
)
def test_a_text_run_without_validation_says_so(tmp_path, capsys, fraction, said):
    from smollm2.mixture import validation_batches

    corpus = _write(tmp_path / "play.txt", PLAY.encode())
    config = config_for(corpus, val_fraction=fraction)
    data = prepare(config, tmp_path, quiet=True)
    capsys.readouterr()
    assert validation_batches(data, config) == {"": ([], 1.0)}
    assert capsys.readouterr().err == f"warning: no validation set: {said}; this run logs no val_loss\n"


def test_a_chat_run_too_small_for_its_validation_share_says_so(tmp_path, capsys):
    from smollm2 import sft

    talk = {"messages": [{"role": "user", "content": "Hi, 你好?"}, {"role": "assistant", "content": "Привет!"}]}
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(talk) for _ in range(4)) + "\n")
    config = config_for(tmp_path / "chats.jsonl", format="chat", seq_len=64)
    data = sft.prepare(config, tmp_path, quiet=True)
    capsys.readouterr()
    assert sft.validation_sets(data, config) == {"": ([], 1.0)}
    assert capsys.readouterr().err == (
        "warning: no validation set: data.val_fraction=0.1 of 4 conversation(s) holds none out "
        "(it takes the first from 5); this run logs no val_loss\n"
    )


# ---------------------------------------------------------------------------------------------
# Durability


@pytest.mark.parametrize("name", ["train.bin", "val.bin"])
def test_a_truncated_token_file_is_never_reused(tmp_path, capsys, name):
    corpus = _write(tmp_path / "play.txt", PLAY.encode())
    config = config_for(corpus)
    first = prepare(config, tmp_path, quiet=True)
    whole = (first.folder / name).read_bytes()
    (first.folder / name).write_bytes(whole[:-2])  # one token short
    with pytest.raises(UserError, match=f"holds files smollm2 did not write \\({name}, changed since smollm2 wrote it"):
        prepare(config, tmp_path)  # the marker records what we wrote: a changed file is not provably ours
    assert (first.folder / name).read_bytes() == whole[:-2]
    (first.folder / ".smollm2").write_text('{"kind": "data"}\n')  # an older smollm2's folder, as a crash left it
    again = prepare(config, tmp_path)
    assert "reusing" not in capsys.readouterr().out
    assert (again.folder / name).read_bytes() == whole


def test_the_token_files_are_on_disk_before_the_folder_is_swapped_in(tmp_path, monkeypatch):
    import os

    from smollm2 import data as data_module

    synced, swapped = [], []
    real_fsync, real_build = os.fsync, data_module.build_folder

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    def build_folder(*args):
        with real_build(*args) as staging:
            yield staging
            swapped.append(list(synced))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(data_module, "build_folder", contextlib.contextmanager(build_folder))
    prepare(config_for(_write(tmp_path / "play.txt", PLAY.encode())), tmp_path, quiet=True)
    assert {"train.bin", "val.bin"} <= set(swapped[0])


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab \n\r\t\u00a0\u3000中я😀")), max_size=200))
def test_pieces_of_any_text_join_back_to_it_whole_characters_and_bounded(tmp_path_factory, text):
    from smollm2.data import read_pieces

    path = tmp_path_factory.mktemp("any") / "c.txt"
    path.write_bytes(text.encode())
    bad: dict[str, int] = {}
    pieces = list(read_pieces([path], 8, bad, "text"))
    assert "".join(p.text for p in pieces) == text and not bad
    assert all(len(p.text.encode()) <= 16 for p in pieces)
