"""Chat and fine-tuning on the published SmolLM2-135M-Instruct (cached by scripts/fetch_instruct.py, no network):
our greedy reply is transformers', and a short SFT from it lowers the held-out loss and exports a
folder that transformers chats with."""

import json

import torch
import yaml

from smollm2 import chat, chat_template, sft
from smollm2.config import load_config
from smollm2.generation import Sampling
from smollm2.hf import load_pretrained
from smollm2.inference import load_for_inference
from smollm2.pretrained import resolve_init_from
from smollm2.trainer import train
from tests.helpers import INSTRUCT as FOLDER
from tests.helpers import ROOT, needs_instruct

pytestmark = needs_instruct()

MESSAGES = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
]


def test_greedy_chat_reply_equals_transformers_generate():
    import transformers

    model, tokenizer = load_for_inference(FOLDER, precision="fp32")
    ids = chat_template.prompt_ids(tokenizer, MESSAGES)
    ours = "".join(chat.stream_reply(model, tokenizer, ids, 24, Sampling(temperature=0)))
    theirs_tokenizer = transformers.AutoTokenizer.from_pretrained(FOLDER)
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    inputs = theirs_tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert inputs["input_ids"][0].tolist() == ids
    out = theirs_model.generate(**inputs, max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
    end = chat_template.end_of_turn_id(tokenizer)
    reply = out[: out.index(end)] if end in out else out
    assert ours == theirs_tokenizer.decode(reply)
    assert "Rome" in ours  # the real model, really loaded


def test_a_short_sft_from_the_published_weights_lowers_held_out_loss_and_exports(tmp_path, monkeypatch):
    import transformers

    lines = (ROOT / "examples" / "conversations.jsonl").read_text().splitlines()[:96]
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n")
    config = {
        "model": {"init_from": str(FOLDER)},
        "data": {"path": "chats.jsonl", "format": "chat", "seq_len": 96, "val_fraction": 0.1},
        "train": {"batch_size": 2, "lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 0, "eval_every": 100,
                  "eval_batches": 1, "predict_every": 100, "save_every": 100, "keep_last": 1, "prompts": ["Hi"],
                  "wandb": False, "precision": "fp32"},
    }  # fmt: skip
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    resolved = resolve_init_from(load_config("sft.yaml"))
    assert resolved.model.n_layers == 30 and resolved.data.tokenizer == str(FOLDER)
    data = sft.prepare(resolved, quiet=True)
    before_model, _ = load_pretrained(FOLDER)
    with torch.no_grad():
        batches = sft.eval_batches(data.val, 2, 96, 1)
        before = sum(before_model(**batch).item() for batch in batches) / len(batches)
    del before_model
    train(load_config("sft.yaml"), 2, None, "run")
    after = json.loads((tmp_path / "run" / "logs" / "summary.json").read_text())["final_val_loss"]
    assert after < before
    final = tmp_path / "run" / "final"
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    model = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    question = [{"role": "user", "content": "What is 4 plus 5?"}]
    inputs = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert tokenizer.decode(out).endswith("<|im_end|>")  # it stopped at the end of its turn
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(inputs["input_ids"][0])  # its template
