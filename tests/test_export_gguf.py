"""`export --format gguf`: the file llama.cpp (through llama-cpp-python) loads tokenizes as we do,
continues a prompt greedily as we do, and loses little at bf16 and q8_0; refusals leave every file
as it was. The llama.cpp tests skip, saying why, where llama-cpp-python is not installed
(requirements-dev.txt installs it)."""

import importlib.util
import math
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from tokenizers import pre_tokenizers

from smollm2 import cli
from smollm2.config import load_config
from smollm2.errors import UserError
from smollm2.generation import Sampling, generate
from smollm2.gguf_export import export_gguf, interleave_rope, is_our_gguf, llama_cpp_pre_tokenizer
from smollm2.hf import load_pretrained
from smollm2.model_source import ModelSource
from smollm2.tokenizer import Tokenizer
from smollm2.trainer import train
from tests.helpers import CORPUS, ROOT, leftovers, main_refused, snapshot, tiny_config

sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench"))
from fetch_instruct import cache_folder  # noqa: E402
from gguf_quality import llama_greedy, llama_nll, mean, our_nll  # noqa: E402  (bench/: scripts, not a package)

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed: pip install -r requirements-dev.txt (it builds llama.cpp)",
)
INSTRUCT = cache_folder()
needs_instruct = pytest.mark.skipif(
    not (INSTRUCT / "model.safetensors").is_file(),
    reason=f"the published SmolLM2-135M-Instruct is not cached in {INSTRUCT}: python scripts/fetch_instruct.py",
)

TEXTS = [
    "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.",
    "I'm sure you're right; we've seen they'll go, she'd say it's DON'T and YOU'LL.",
    "Привет, мир! Как дела? Всё хорошо.",
    "你好，世界。今天天气很好，我们去公园吧。",
    "emoji 🙂👍🏽🇫🇷 and ü, ñ, é, ß — “quotes” … ½ ² Ⅻ",
    'def square(x: int) -> int:\n    """Square."""\n    return x ** 2  # fast\n\n\tif a != b: print(f"{a!r}")\n',
    "a  b   c    d\n\n\n   e\t\t f      \n",
    "   leading spaces and trailing ones   ",
    "x  1, total:   42 and 1234567 or 3.14159; 1,000,000 on 2026-12-01",
    "line one\r\nline two\r\n\r\nline four\r\n",
    "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n",
]
NEW_TOKENS = 64


# ---------------------------------------------------------------------------------------------
# A tiny trained model (and its run), and llama.cpp


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A few steps of training in a folder of its own: run/checkpoints/step_N.pt and run/final/."""
    folder = tmp_path_factory.mktemp("gguf")
    (folder / "input.txt").write_text(CORPUS)
    config = tiny_config(save_every=100, eval_every=100, predict_every=100, lr=1e-2, warmup_steps=2)
    config["model"] |= {"hidden_size": 64, "intermediate_size": 128, "max_seq_len": 128}
    config["data"]["path"] = str(folder / "input.txt")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(config))
    train(load_config(str(folder / "tiny.yaml"), []), 12, None, str(folder / "run"))
    return folder


@pytest.fixture
def workspace(tiny_run, tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "ws"
    shutil.copytree(tiny_run, folder)
    (folder / "mine").mkdir()
    (folder / "mine" / "notes.txt").write_text("a week of notes\n")
    monkeypatch.chdir(folder)
    return folder


def checkpoint(folder: Path) -> Path:
    return next((folder / "run" / "checkpoints").glob("step_*.pt"))


@pytest.fixture
def llama():
    """Opens a GGUF in llama.cpp: keys and values cached in f32 (its default is f16), so that what is
    compared is the file's weights, and every position's logits kept (llama-cpp-python keeps none
    otherwise). Closed after the test."""
    from llama_cpp import GGML_TYPE_F32, Llama

    opened = []

    def open_gguf(path: Path) -> Llama:
        opened.append(
            Llama(
                str(path),
                n_ctx=512,
                n_threads=2,
                logits_all=True,
                type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32,
                verbose=False,
            )
        )
        return opened[-1]

    yield open_gguf
    for model in opened:
        model.close()


def our_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Our greedy decoding (KV cache, fp32), as `generate --temperature 0` runs it, without stopping at eos."""
    with torch.no_grad():
        return generate(model, [prompt], new_tokens, sampling=Sampling(temperature=0.0))[0]


# ---------------------------------------------------------------------------------------------
# The tiny trained model, through the CLI


def test_export_writes_a_gguf_with_our_marker_and_the_models_shape(workspace):
    assert cli.main(["export", "--checkpoint", str(checkpoint(workspace)), "--format", "gguf", "--out", "m.gguf"]) == 0
    reader = gguf.GGUFReader(workspace / "m.gguf")
    field = {name: reader.get_field(name).contents() for name in reader.fields if not name.startswith("GGUF.")}
    assert field["general.architecture"] == "llama" and field["smollm2.export"] == "smollm2-gguf/1"
    assert (field["llama.embedding_length"], field["llama.block_count"], field["llama.attention.head_count_kv"]) == (
        64,
        2,
        2,
    )
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "gpt-2"
    assert field["tokenizer.ggml.add_bos_token"] is False and field["general.file_type"] == 0
    assert len(field["tokenizer.ggml.tokens"]) == 320  # one token per embedding row
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied: the head is the embedding
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    assert not leftovers(workspace)


def test_q_and_k_rows_are_interleaved_for_llama_cpps_rope():
    rows = torch.arange(8.0)[:, None].expand(8, 3)  # 2 heads of 4: llama.cpp pairs (0, 2), (1, 3)
    assert interleave_rope(rows, heads=2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@needs_llama_cpp
@pytest.mark.parametrize("outtype", ["f32", "bf16", "q8_0"])
def test_llama_cpp_tokenizes_and_continues_as_we_do(workspace, llama, outtype):
    """The tiny trained model: llama.cpp's tokens equal ours on every text (special tokens parsed,
    as ours are), its text from ids equals ours, and at f32 its greedy continuation equals ours."""
    ckpt = checkpoint(workspace)
    argv = ["export", "--checkpoint", str(ckpt), "--format", "gguf", "--out", "m.gguf", "--outtype", outtype]
    assert cli.main(argv) == 0
    ours, tokenizer = ModelSource.checkpoint_file(ckpt).load()
    theirs = llama(workspace / "m.gguf")
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert theirs.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert theirs.detokenize(ids, special=True).decode() == tokenizer.decode(ids), text
    if outtype == "f32":
        prompt = tokenizer.encode("ROMEO:\nWhat say you")
        assert llama_greedy(theirs, prompt, NEW_TOKENS) == our_greedy(ours, prompt, NEW_TOKENS)
        ids = tokenizer.encode(CORPUS[-2000:])[: NEW_TOKENS * 2]  # every position's logits, RoPE far along
        theirs.reset()
        theirs.eval(ids)
        with torch.no_grad():
            expected = ours(torch.tensor([ids]))[0]
        torch.testing.assert_close(torch.from_numpy(theirs.scores[: len(ids)]), expected, atol=1e-4, rtol=1e-4)


@needs_llama_cpp
def test_a_tokenizer_that_splits_digits_first_exports_as_smollm(workspace, llama):
    """Digits(individual) before ByteLevel is llama.cpp's "smollm": the same tokens again."""
    ours, tokenizer = ModelSource.checkpoint_file(checkpoint(workspace)).load()
    backend = tokenizer.backend
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    export_gguf(ours, Tokenizer(backend), workspace / "digits.gguf")
    assert gguf.GGUFReader(workspace / "digits.gguf").get_field("tokenizer.ggml.pre").contents() == "smollm"
    theirs = llama(workspace / "digits.gguf")
    for text in TEXTS:
        assert theirs.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text), text


def test_only_pre_tokenizers_llama_cpp_splits_alike_are_named():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert llama_cpp_pre_tokenizer(byte_level) == "gpt-2"
    assert llama_cpp_pre_tokenizer({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    for other in (
        byte_level | {"add_prefix_space": True},
        byte_level | {"use_regex": False},
        {"type": "Whitespace"},
        {"type": "Sequence", "pretokenizers": [digits | {"individual_digits": False}, byte_level]},
    ):
        with pytest.raises(UserError, match="no pre-tokenizer equal to ours"):
            llama_cpp_pre_tokenizer(other)


# ---------------------------------------------------------------------------------------------
# The published SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def instruct():
    model, tokenizer = load_pretrained(INSTRUCT)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def instruct_ggufs(instruct, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("instruct")
    model, tokenizer = instruct
    paths = {outtype: folder / f"instruct-{outtype}.gguf" for outtype in ("f32", "bf16", "q8_0")}
    for outtype, path in paths.items():
        export_gguf(model, tokenizer, path, outtype)
    return paths


@needs_llama_cpp
@needs_instruct
def test_the_published_model_tokenizes_and_continues_in_llama_cpp_as_in_ours(instruct, instruct_ggufs, llama):
    ours, tokenizer = instruct
    theirs = llama(instruct_ggufs["f32"])
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert theirs.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert theirs.detokenize(ids, special=True).decode() == tokenizer.decode(ids), text
    prompt = tokenizer.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert llama_greedy(theirs, prompt, NEW_TOKENS) == our_greedy(ours, prompt, NEW_TOKENS)


# Mean negative log-likelihood (nats per token) of a passage of input.txt: bf16 and q8_0 weights
# may cost at most this much over f32 (perplexity at most 1% and 2% higher; bench/gguf_quality.py
# measured +0.0001 and +0.0077 on 1024 tokens); f32 equals ours to 1e-3.
NLL_COST = {"bf16": 0.01, "q8_0": 0.02}


@needs_llama_cpp
@needs_instruct
def test_bf16_and_q8_0_lose_little_against_f32_on_held_out_text(instruct, instruct_ggufs, llama):
    ours, tokenizer = instruct
    ids = tokenizer.encode((ROOT / "input.txt").read_text()[-6000:])[-400:]
    reference = mean([our_nll(ours, ids)])
    nll = {outtype: mean([llama_nll(llama(path), ids)]) for outtype, path in instruct_ggufs.items()}
    print({"ours": reference} | nll, {k: math.exp(v) for k, v in nll.items()})
    assert abs(nll["f32"] - reference) < 1e-3
    for outtype, cost in NLL_COST.items():
        assert nll[outtype] - nll["f32"] < cost, (outtype, nll)
    sizes = {outtype: path.stat().st_size for outtype, path in instruct_ggufs.items()}
    assert sizes["q8_0"] < 0.55 * sizes["bf16"] < 0.3 * sizes["f32"]


# ---------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, every file as it was


def export_argv(out: str, *more: str) -> list[str]:
    return ["export", "--checkpoint", "run/checkpoints/step_12.pt", "--format", "gguf", "--out", out, *more]


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("mine/notes.txt", "is not a GGUF smollm2 wrote"),
        ("mine", "is a folder"),
        ("input.txt/m.gguf", "input.txt is a file, not a folder"),
        ("run/final/m.gguf", "a model folder smollm2 wrote"),
        ("run/checkpoints/m.gguf", "a part of the run"),
    ],
)
def test_export_never_replaces_or_writes_into_what_is_not_its_own(workspace, capsys, out, message):
    main_refused(capsys, workspace, export_argv(out), message)


def test_a_gguf_some_other_tool_wrote_is_not_replaced(workspace, capsys):
    writer = gguf.GGUFWriter(workspace / "mine" / "theirs.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.ones((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert not is_our_gguf(workspace / "mine" / "theirs.gguf")
    main_refused(capsys, workspace, export_argv("mine/theirs.gguf"), "is not a GGUF smollm2 wrote")


def test_an_earlier_export_is_replaced(workspace):
    assert cli.main(export_argv("m.gguf")) == 0
    first = (workspace / "m.gguf").read_bytes()
    assert cli.main(export_argv("m.gguf", "--outtype", "q8_0")) == 0
    assert (workspace / "m.gguf").read_bytes() != first and is_our_gguf(workspace / "m.gguf")
    assert not leftovers(workspace)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "--checkpoint", "run/checkpoints/step_12.pt", "--out", "hf", "--outtype", "bf16"], "--outtype is"),
        (["export", "--model", "run/final", "--out", "hf"], "--model is for --format gguf"),
        (["export", "--model", "mine", "--format", "gguf", "--out", "m.gguf"], "no config.json, final/"),
    ],
)
def test_flags_that_do_not_fit_are_refused(workspace, capsys, argv, message):
    main_refused(capsys, workspace, argv, message)


def test_an_outtype_we_do_not_write_is_one_line(workspace):
    before = snapshot(workspace)
    argv = [sys.executable, "-m", "smollm2", *export_argv("m.gguf", "--outtype", "q4_k")]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--outtype: invalid choice: 'q4_k'" in result.stderr, result.stderr
    assert snapshot(workspace) == before


def test_a_model_llama_cpp_cannot_express_is_refused(workspace, capsys):
    config = tiny_config(norm="layernorm", mlp="gelu", save_every=2)
    config["data"]["path"] = str(workspace / "input.txt")
    (workspace / "seed.yaml").write_text(yaml.safe_dump(config))
    train(load_config("seed.yaml", []), 2, None, "seed")
    argv = ["export", "--checkpoint", "seed/checkpoints/step_2.pt", "--format", "gguf", "--out", "m.gguf"]
    main_refused(capsys, workspace, argv, "cannot export to GGUF: model.norm=layernorm")


def test_the_space_cards_gguf_commands_run_as_written(workspace):
    """The card's export line, run in the Space folder with the Space's own smollm2, writes the
    GGUF its llama.cpp and ollama lines name (beside the Space: nothing is added inside it)."""
    assert cli.main(["export-space", "--run", "run", "--out", "space"]) == 0
    card = (workspace / "space" / "README.md").read_text()
    export = next(line for line in card.splitlines() if line.startswith("python -m smollm2 export"))
    name = export.split("--out ../")[1]
    assert f"llama-cli -m {name}" in card and f'echo "FROM ./{name}" > Modelfile' in card
    before = snapshot(workspace / "space")
    result = subprocess.run([sys.executable, *export.split()[1:]], cwd=workspace / "space", capture_output=True)
    assert result.returncode == 0, result.stderr
    assert is_our_gguf(workspace / name) and snapshot(workspace / "space") == before
