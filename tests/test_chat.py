"""Chat templates, conversation tokens, packed SFT batches, model.init_from, and chatting (CLI and loop)."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from smollm2 import chat, chat_template, cli, sft
from smollm2.checkpoint import load_checkpoint
from smollm2.config import config_from_dict, load_config
from smollm2.errors import UserError
from smollm2.generation import Sampling
from smollm2.hf import load_pretrained, write_model_folder
from smollm2.model import SmolLM2
from smollm2.pretrained import resolve_init_from
from smollm2.tokenizer import CHATML_TEMPLATE, load_tokenizer, train_tokenizer
from smollm2.trainer import train
from tests.conftest import small_config
from tests.helpers import INSTRUCT, ROOT, metrics, refused, tiny_config

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "2 plus 2 is 4."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Opposite of hot?"},
        {"role": "assistant", "content": "Cold."},
        {"role": "user", "content": "And of big? ü"},
        {"role": "assistant", "content": "Small."},
    ],
]


@pytest.fixture(scope="module")
def tokenizer():
    lines = (ROOT / "examples" / "conversations.jsonl").read_text().splitlines()[:300]
    texts = [chat_template.render_template(CHATML_TEMPLATE, json.loads(line)["messages"]) for line in lines]
    return train_tokenizer(texts, 400)


@pytest.fixture(scope="module")
def hf_folder(tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_hf(folder, 256)
    return folder


# ---------------------------------------------------------------------------------------------
# Templates and tokens


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_our_chatml_renders_as_transformers_renders_it(hf_folder, generation_prompt):
    import transformers

    theirs = transformers.AutoTokenizer.from_pretrained(hf_folder)
    ours = load_tokenizer(hf_folder)
    assert ours.chat_template == CHATML_TEMPLATE  # saved with the tokenizer, read back
    for messages in CONVERSATIONS:
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert chat_template.render(ours, messages, generation_prompt) == expected
    assert chat_template.render(ours, CONVERSATIONS[0]) == (
        "<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n2 plus 2 is 4.<|im_end|>\n"
    )


@pytest.mark.skipif(not (INSTRUCT / "tokenizer.json").is_file(), reason=f"no published tokenizer in {INSTRUCT}")
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_the_published_instruct_template_renders_as_in_transformers(generation_prompt):
    import transformers

    theirs = transformers.AutoTokenizer.from_pretrained(INSTRUCT)
    ours = load_tokenizer(INSTRUCT)
    for messages in CONVERSATIONS:
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert chat_template.render(ours, messages, generation_prompt) == expected
        ids, _ = chat_template.encode_conversation(ours, messages)
        assert ids == theirs.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert "You are a helpful AI assistant named SmolLM" in chat_template.render(ours, CONVERSATIONS[0])
    tokens = "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}"  # what transformers hands a template
    ours.chat_template = tokens
    expected = theirs.apply_chat_template(CONVERSATIONS[0], chat_template=tokens, tokenize=False)
    assert (
        chat_template.render(ours, CONVERSATIONS[0]) == expected == "<|im_start|>|<|im_end|>|<|endoftext|>|<|im_end|>"
    )


def test_templates_get_transformers_globals_and_filters(tokenizer):
    template = "{{ messages | tojson }}{% if messages|length > 1 %}{{ raise_exception('one only') }}{% endif %}"
    tokenizer_with = type(tokenizer)(tokenizer.backend, chat_template=template)
    assert (
        chat_template.render(tokenizer_with, [{"role": "user", "content": "é<"}])
        == '[{"role": "user", "content": "é<"}]'
    )
    with pytest.raises(UserError, match="one only"):
        chat_template.render(tokenizer_with, CONVERSATIONS[0])


def test_only_assistant_tokens_and_their_end_marker_are_learnt(tokenizer):
    ids, is_assistant = chat_template.encode_conversation(tokenizer, CONVERSATIONS[1])
    assert ids == tokenizer.encode(chat_template.render(tokenizer, CONVERSATIONS[1]))
    learnt = [i for i, mine in zip(ids, is_assistant, strict=True) if mine]
    assert tokenizer.decode(learnt) == "Cold.<|im_end|>Small.<|im_end|>"
    targets = chat_template.training_targets(ids, is_assistant)
    assert len(targets) == len(ids) and targets[-1] == chat_template.IGNORE
    assert [t for t in targets if t != chat_template.IGNORE] == learnt


def test_packing_keeps_conversations_apart_and_ignores_padding():
    a = sft.Conversation(ids=[1, 2, 3], targets=[-100, 3, -100])
    b = sft.Conversation(ids=[4, 5], targets=[5, -100])
    c = sft.Conversation(ids=[6, 7, 8, 9], targets=[-100, -100, 9, -100])
    rows = sft.pack([a, b, c], seq_len=6, pad_id=0)
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]]
    assert rows.targets.tolist() == [[-100, 3, -100, 5, -100, -100], [-100, -100, 9, -100, -100, -100]]
    assert rows.document_ids.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 1, 1]]
    assert rows.trained_tokens == 3


def test_a_packed_row_computes_each_conversation_as_if_alone():
    model = SmolLM2(small_config()).eval()
    first, second = [5, 6, 7, 8], [9, 10, 11]
    rows = sft.pack([sft.Conversation(first, [-100] * 4), sft.Conversation(second, [-100] * 3)], 8, 0)
    batch = rows.batch([0])
    with torch.no_grad():
        packed = model(batch["input_ids"], document_ids=batch["document_ids"])
        alone = model(torch.tensor([second]))
    torch.testing.assert_close(packed[0, 4:7], alone[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Training on conversations


def chat_config(**train_changes) -> dict:
    config = tiny_config(prompts=["What is 2 plus 3?"], **train_changes)
    config["model"] |= {"max_seq_len": 96, "vocab_size": 400}
    config["data"] = {"path": "chats.jsonl", "format": "chat", "seq_len": 96, "val_fraction": 0.1}
    return config


@pytest.fixture
def chat_dir(tmp_path, monkeypatch):
    lines = (ROOT / "examples" / "conversations.jsonl").read_text().splitlines()[:200]
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "chat.yaml").write_text(yaml.safe_dump(chat_config()))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_sft_resume_is_bitwise_and_predictions_are_chat_replies(chat_dir):
    config = load_config("chat.yaml", ["train.schedule_steps=6"])
    train(config, 6, None, "full")
    train(config, 3, None, "split")
    train(config, 3, "split/checkpoints/step_3.pt", "split")
    full, split = metrics(chat_dir / "full"), metrics(chat_dir / "split")
    assert [r["loss"] for r in split[3:]] == [r["loss"] for r in full[3:]]
    a = load_checkpoint(chat_dir / "full/checkpoints/step_6.pt")["model"]
    b = load_checkpoint(chat_dir / "split/checkpoints/step_6.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full[0]["loss"] > full[-1]["loss"]
    samples = (chat_dir / "full" / "logs" / "samples.md").read_text()
    assert "What is 2 plus 3?" in samples and "<|im_start|>" not in samples
    _, tokenizer = load_pretrained(chat_dir / "full" / "final")
    assert tokenizer.chat_template == CHATML_TEMPLATE


def test_parquet_conversations_pack_as_the_same_jsonl_lines(chat_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = (chat_dir / "chats.jsonl").read_text().splitlines()
    pq.write_table(pa.table({"messages": [json.loads(line)["messages"] for line in lines]}), chat_dir / "chats.parquet")
    from_jsonl = sft.prepare(load_config("chat.yaml"), quiet=True)
    from_parquet = sft.prepare(load_config("chat.yaml", ["data.path=chats.parquet"]), quiet=True)
    assert from_parquet.tokenizer.hash == from_jsonl.tokenizer.hash
    for split in ("train", "val"):
        a, b = getattr(from_jsonl, split), getattr(from_parquet, split)
        assert (a.input_ids == b.input_ids).all() and (a.targets == b.targets).all() and len(a) > 0


def test_init_from_takes_weights_architecture_and_tokenizer_only(chat_dir):
    train(load_config("chat.yaml"), 3, None, "base")
    source, _ = load_pretrained(chat_dir / "base" / "final")
    (chat_dir / "ft.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"init_from": "base/final"},
                "data": chat_config()["data"],
                "train": chat_config(lr=1e-9, min_lr=0.0)["train"],
            }
        )
    )
    train(load_config("ft.yaml"), 1, None, "ft")
    rows = metrics(chat_dir / "ft")
    assert [r["step"] for r in rows] == [1]  # step 0, a fresh schedule
    state = load_checkpoint(chat_dir / "ft" / "checkpoints" / "step_1.pt")
    assert state["config"]["model"]["n_layers"] == 2 and state["config"]["data"]["tokenizer"] == "base/final"
    for name, tensor in source.state_dict().items():  # the source's weights, moved by lr 1e-9 at most
        torch.testing.assert_close(state["model"][name], tensor, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Mistakes


REPLY = {"role": "assistant", "content": "x"}
BAD_LINES = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}, REPLY]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi " * 200}, REPLY]}, "longer than data.seq_len=96"),
    ({"text": "hi"}, "no 'messages' field"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_conversations_are_one_line_and_write_nothing(chat_dir, capsys, line, message):
    with open(chat_dir / "chats.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    err = refused(
        capsys, chat_dir, cli.train_main, ["--config", "chat.yaml", "--train_steps", "2", "--out_dir", "run"], message
    )
    assert "chats.jsonl:201" in err
    assert not (chat_dir / "run").exists()


def test_init_from_that_is_not_a_model_or_contradicts_it_is_refused(chat_dir, capsys):
    train(load_config("chat.yaml"), 2, None, "base")
    argv = ["--config", "chat.yaml", "--train_steps", "2", "--out_dir", "run", "--set"]
    refused(capsys, chat_dir, cli.train_main, argv + ["model.init_from=chats.jsonl"], "not a readable checkpoint")
    refused(capsys, chat_dir, cli.train_main, argv + ["model.init_from=nowhere"], "does not exist")
    refused(capsys, chat_dir, cli.train_main, argv + ["model.init_from=base/final", "model.n_layers=3"],
            "model.n_layers=3 in chat.yaml contradicts model.init_from base/final (n_layers=2)")  # fmt: skip
    assert not (chat_dir / "run").exists()


# ---------------------------------------------------------------------------------------------
# Chatting


@pytest.fixture(scope="module")
def chat_model(tokenizer):
    torch.manual_seed(0)
    return SmolLM2(small_config(vocab_size=400, max_seq_len=96)).eval()


def test_history_keeps_to_the_context_dropping_the_oldest_exchanges(chat_model, tokenizer):
    conversation = chat.Conversation(chat_model, tokenizer, system="Be brief.", reply_tokens=20)
    for number in range(6):
        ids, dropped = conversation.prompt(f"What is {number} plus {number}?")
        assert len(ids) + 20 <= 96
        conversation.answered(f"{number} plus {number} is {2 * number}.")
    assert dropped > 0 and conversation.turns[0]["role"] == "user"
    assert chat_template.render(tokenizer, conversation.system + conversation.turns).startswith(
        "<|im_start|>system\nBe brief."
    )


def typed(*lines: str):
    """A terminal's input(): these lines, then end of input."""
    pending = list(lines)

    def read(prompt: str) -> str:
        if not pending:
            raise EOFError
        return pending.pop(0)

    return read, pending


def test_chat_loop_streams_replies_resets_and_quits(chat_model, tokenizer, capsys):
    greedy = Sampling(temperature=0)
    expected = "".join(chat.single_reply(chat_model, tokenizer, "What is 1 plus 1?", 12, greedy))
    read, pending = typed("What is 1 plus 1?", "/reset", "Spell 'river' backwards.", "/quit", "never read")
    out = io.StringIO()
    chat.chat_loop(chat_model, tokenizer, None, 12, greedy, read=read, out=out)
    assert out.getvalue().splitlines()[0] == f"assistant> {expected}"
    assert len(out.getvalue().splitlines()) == 2
    assert "(the conversation is forgotten)" in capsys.readouterr().err
    assert pending == ["never read"]  # /quit left


def test_a_mistyped_command_is_answered_and_not_sent(chat_model, tokenizer, capsys):
    read, pending = typed("/quit please", "/reset now", "/unknown", "/quit", "never read")
    out = io.StringIO()
    chat.chat_loop(chat_model, tokenizer, None, 12, Sampling(temperature=0), read=read, out=out)
    assert out.getvalue() == ""  # nothing went to the model
    err = capsys.readouterr().err.splitlines()
    names = ("/quit please", "/reset now", "/unknown")
    assert err[1:] == [f"unknown command {name!r}, not sent: the commands are /reset and /quit" for name in names]
    assert pending == ["never read"]


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(chat_model, tokenizer, monkeypatch):
    def interrupted(*args, **kwargs):
        yield "Hal"
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "stream_reply", interrupted)
    read, pending = typed("hi", "again")
    out = io.StringIO()
    chat.chat_loop(chat_model, tokenizer, None, 12, Sampling(temperature=0), read=read, out=out)
    assert out.getvalue() == "assistant> Hal [stopped]\nassistant> Hal [stopped]\n\n"  # the last: end of input
    assert pending == []


def test_chat_and_generate_chat_on_the_command_line(chat_dir):
    train(load_config("chat.yaml"), 2, None, "run")
    model = ["--model", "run/final", "--temperature", "0", "--max_new_tokens", "8"]
    chatted = subprocess.run([sys.executable, "-m", "smollm2", "chat", *model], input="What is 2 plus 3?\n/quit\n",
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    generated = subprocess.run([sys.executable, "-m", "smollm2", "generate", "--chat", "--prompt", "What is 2 plus 3?",
                                *model], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert chatted.returncode == 0 and generated.returncode == 0, chatted.stderr + generated.stderr
    assert f"assistant> {generated.stdout.rstrip(chr(10))}\n" in chatted.stdout


def test_an_empty_system_message_is_kept_and_one_too_long_is_refused_at_the_start(chat_model, tokenizer):
    conversation = chat.Conversation(chat_model, tokenizer, system="", reply_tokens=20)
    conversation.prompt("hi")  # an empty system message, not none: templates put a default in for none
    assert chat_template.render(tokenizer, conversation.system + conversation.turns).startswith(
        "<|im_start|>system\n<|im_end|>"
    )
    read, pending = typed("hi")
    with pytest.raises(
        UserError, match=r"^--system with the chat template is \d+ tokens, but the model's context is 96"
    ):
        chat.chat_loop(chat_model, tokenizer, "word " * 200, 12, Sampling(temperature=0), read=read)
    assert pending == ["hi"]  # refused before reading, not "the message is N tokens" for every message


def test_a_message_too_long_for_the_context_keeps_the_conversation(chat_model, tokenizer):
    conversation = chat.Conversation(chat_model, tokenizer, system=None, reply_tokens=20)
    conversation.prompt("What is 1 plus 1?")
    conversation.answered("2.")
    kept = list(conversation.turns)
    with pytest.raises(UserError, match="the message is"):
        conversation.prompt("word " * 200)
    assert conversation.turns == kept  # not silently forgotten on the way to the refusal


def test_init_from_compares_numbers_with_a_tolerance(tmp_path, tokenizer):
    """A GGUF conversion stores norm_eps as float32 (9.999999747e-06): still 1e-05 to a config."""
    float32_eps = float(torch.tensor(1e-5, dtype=torch.float32))
    assert float32_eps != 1e-5
    write_model_folder(SmolLM2(small_config(vocab_size=400, norm_eps=float32_eps)), tmp_path / "gguf", tokenizer)
    same = config_from_dict(
        {"model": {"init_from": str(tmp_path / "gguf"), "norm_eps": 1e-5}, "data": {"seq_len": 64}}, "published.yaml"
    )
    assert resolve_init_from(same).model.norm_eps == pytest.approx(1e-5, rel=1e-6)
    other = config_from_dict(
        {"model": {"init_from": str(tmp_path / "gguf"), "norm_eps": 1.1e-5}, "data": {"seq_len": 64}}, "published.yaml"
    )
    with pytest.raises(UserError, match="model.norm_eps=1.1e-05 in published.yaml contradicts"):
        resolve_init_from(other)


def test_a_chat_template_that_is_not_utf8_is_one_line(tmp_path, tokenizer, capsys):
    write_model_folder(SmolLM2(small_config(vocab_size=400)), tmp_path / "model", tokenizer)
    (tmp_path / "model" / "chat_template.jinja").write_bytes(b"{{ messages }}\xff\n")
    argv = ["generate", "--model", str(tmp_path / "model"), "--prompt", "hi", "--chat", "--max_new_tokens", "2"]
    refused(capsys, tmp_path, cli.main, argv, "chat_template.jinja: not UTF-8 text (byte 14 is not)")


def alone_tokens(tokenizer, message: str) -> int:
    return len(chat_template.prompt_ids(tokenizer, [{"role": "user", "content": message}]))


def test_a_reply_budget_that_leaves_no_room_keeps_the_conversation(chat_model, tokenizer):
    room = 96 - alone_tokens(tokenizer, "And 3 plus 3?")
    conversation = chat.Conversation(chat_model, tokenizer, system=None, reply_tokens=room)
    conversation.turns = [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2."}]
    ids, dropped = conversation.prompt("And 3 plus 3?")  # fits alone with its full reply budget: the rest goes
    assert (len(ids), dropped) == (96 - room, 2) and len(conversation.turns) == 1
    conversation.answered("6.")
    kept = list(conversation.turns)
    conversation.reply_tokens = room + 1  # now not even the message alone fits with room for the reply
    with pytest.raises(UserError, match=f"with room for a reply of {room + 1} tokens .* the conversation is kept "
                                        rf"\(a shorter message, or max_new_tokens {room} or less, fits\)"):  # fmt: skip
        conversation.prompt("And 3 plus 3?")
    assert conversation.turns == kept


def test_a_chat_whose_max_new_tokens_fills_the_context_is_refused_at_the_start(chat_model, tokenizer):
    read, pending = typed("hi")
    alone = alone_tokens(tokenizer, "")
    with pytest.raises(UserError, match=rf"^--max_new_tokens 96 leaves no room .* use at most {95 - alone}$"):
        chat.chat_loop(chat_model, tokenizer, None, 96, Sampling(temperature=0), read=read)
    assert pending == ["hi"]


def test_history_trimming_renders_the_conversation_a_logarithmic_number_of_times(chat_model, tokenizer, monkeypatch):
    history = [turn for n in range(500) for turn in ({"role": "user", "content": f"What is {n} plus {n}?"},
                                                     {"role": "assistant", "content": f"{2 * n}."})]  # fmt: skip
    question = {"role": "user", "content": "And 1?"}
    fitting = [
        s
        for s in range(0, len(history) + 1, 2)
        if len(chat_template.prompt_ids(tokenizer, [*history[s:], question])) <= 76
    ]
    renders = []
    monkeypatch.setattr(chat, "prompt_ids", lambda *args: renders.append(1) or chat_prompt_ids(*args))
    conversation = chat.Conversation(chat_model, tokenizer, system=None, reply_tokens=20)
    conversation.turns = list(history)
    ids, dropped = conversation.prompt("And 1?")
    assert dropped == fitting[0] and conversation.turns == [
        *history[fitting[0] :],
        {"role": "user", "content": "And 1?"},
    ]
    assert len(renders) <= 12  # 500 exchanges, most ruled out by their length; the old loop rendered 490 times


chat_prompt_ids = chat.prompt_ids


def test_a_message_longer_than_the_context_can_hold_is_refused_before_it_is_tokenized(chat_model, tokenizer):
    conversation = chat.Conversation(chat_model, tokenizer, system=None, reply_tokens=20)
    most = tokenizer.max_chars(95)
    assert len(tokenizer.encode("x" * most)) <= most  # no text of `most` characters or fewer is ruled out unseen
    with pytest.raises(
        UserError, match=f"^the message is 20,000,000 characters, more than the 95 tokens left .*at most {most:,}"
    ):
        conversation.prompt("x" * 20_000_000)


@pytest.mark.parametrize(
    ("template", "message"),
    [("{% for i in range(10**9) %}x{% endfor %}", "(OverflowError: Range too big."),
     ("{{ 1 / 0 }}", "(ZeroDivisionError: division by zero)"),
     ("{{ '%d' % messages[0]['content'] }}", "(TypeError: %d format: a real number is required, not str)")],
)  # fmt: skip
def test_a_chat_template_whose_code_fails_is_one_line(template, message):
    with pytest.raises(UserError, match=rf"^the chat template failed on the conversation {re.escape(message)}"):
        chat_template.render_template(template, [{"role": "user", "content": "hi"}])
