"""Byte-level BPE: train one on a corpus with Hugging Face `tokenizers`, or load one from disk."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from smollm2.errors import UserError, error_reason, file_in_folder, read_json_file, read_utf8
from smollm2.files import write_atomic

END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_TEXT, "<|im_start|>", "<|im_end|>"]  # the ones SmolLM2 itself starts with
EOS_CANDIDATES = [END_OF_TEXT, "</s>", "<eos>"]
# ChatML, the format of SmolLM2-Instruct: what a tokenizer with <|im_start|> and <|im_end|> but no
# template of its own gets (smollm2.chat renders it).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Tokenizer:
    """A thin wrapper: encode, decode, the end-of-text id, a content hash, and export."""

    def __init__(
        self,
        backend: HFTokenizer,
        eos_token: str | None = None,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        vocab = backend.get_vocab()
        self.eos_token = eos_token or next((t for t in EOS_CANDIDATES if t in vocab), None)
        self.eos_id = vocab.get(self.eos_token) if self.eos_token else None
        # transformers' special_tokens_map (what a chat template sees); ours name end-of-text for each.
        ours = dict.fromkeys(("bos_token", "eos_token", "unk_token"), self.eos_token) if self.eos_token else {}
        self.special_tokens = special_tokens or ours
        speaks_chatml = "<|im_start|>" in vocab and "<|im_end|>" in vocab
        self.chat_template = chat_template or (CHATML_TEMPLATE if speaks_chatml else None)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @functools.cached_property
    def id_limit(self) -> int:
        """One past the largest id the tokenizer produces: the rows a model needs for it (a
        tokenizer.json may give a token an id past its count)."""
        return max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    @functools.cached_property
    def longest_token(self) -> int:
        """Characters in the vocabulary's longest token (byte-level: its bytes), special tokens included."""
        return max(map(len, self.backend.get_vocab(with_added_tokens=True)), default=1)

    def max_chars(self, tokens: int) -> int:
        """The most characters `tokens` tokens can hold: a text longer than this cannot encode to
        `tokens` tokens or fewer, so it is refused by its length alone, before it is tokenized (a
        20-million-character prompt took 17 s and 3.8 GB to tokenize only to be refused). A token holds
        at most `longest_token` bytes (byte-level) or characters, and a character is at least one byte.
        (A normalizer that deletes characters could let a longer text fit; none of SmolLM2's does.)"""
        return max(tokens, 0) * self.longest_token

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips character offsets: less memory and time for token ids alone.
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def save(self, path: Path) -> None:
        write_atomic(path, self.backend.to_str(pretty=True))

    def save_hf(self, folder: Path, max_length: int) -> None:
        """tokenizer.json plus the config files that `AutoTokenizer.from_pretrained` reads;
        `max_length` is the model's context (transformers warns past it, and truncates to it)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.save(folder / "tokenizer.json")
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_length,
            "clean_up_tokenization_spaces": False,
            "add_prefix_space": False,
        }
        tokenizer_config |= self.special_tokens
        if self.chat_template:
            tokenizer_config["chat_template"] = self.chat_template
        write_atomic(folder / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")


def train_tokenizer(texts: Iterable[str], vocab_size: int, notes: list[str] | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer: any UTF-8 text encodes, and decodes back exactly.
    notes: given, the note on a small vocabulary goes there (printed once the corpus is accepted), not to stderr."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    reached = backend.get_vocab_size()
    if reached < vocab_size:
        note = (
            f"note: the corpus supports {reached} BPE tokens, fewer than model.vocab_size={vocab_size}; "
            "the model keeps its size and the extra rows go unused"
        )
        if notes is None:
            print(note, file=sys.stderr)
        else:
            notes.append(note)
    return Tokenizer(backend)


def load_tokenizer(path: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """Load tokenizer.json or a Hugging Face folder holding one (e.g. a downloaded SmolLM2). A checkpoint's
    tokenizer is read above this module (`smollm2.model_source.open_tokenizer`)."""
    path = Path(path)
    file = file_in_folder(path, "tokenizer.json") if path.is_dir() else path
    return check_vocab_size(load_tokenizer_file(file), path, vocab_size)


def check_vocab_size(tokenizer: Tokenizer, path: str | Path, vocab_size: int | None) -> Tokenizer:
    """The tokenizer, refused when it has more tokens, or ids, than the model has rows: its ids would
    index past the embedding (generate and eval crash, a GGUF export drops them)."""
    if vocab_size is None:
        return tokenizer
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"tokenizer {path} has {tokenizer.vocab_size} tokens, more than model.vocab_size={vocab_size}")
    if tokenizer.id_limit > vocab_size:
        token = tokenizer.backend.id_to_token(tokenizer.id_limit - 1)
        raise UserError(
            f"tokenizer {path} gives {token!r} the id {tokenizer.id_limit - 1}, past model.vocab_size={vocab_size}"
        )
    return tokenizer


def load_tokenizer_file(file: Path) -> Tokenizer:
    """tokenizer.json, with the eos token and chat template of the transformers files beside it."""
    if not file.is_file():
        raise UserError(f"tokenizer not found: {file}")
    try:
        backend = HFTokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise UserError(f"{file}: not a valid tokenizer.json ({error_reason(exc, 120)})") from None
    folder = file.parent
    config_file = folder / "tokenizer_config.json"
    special_tokens = read_special_tokens(config_file)
    eos_token = special_tokens.get("eos_token")
    if eos_token is not None and backend.token_to_id(eos_token) is None:
        raise UserError(f"{config_file}: eos_token {eos_token!r} is not a token of {file}")
    return Tokenizer(backend, eos_token, read_chat_template(folder), special_tokens)


def read_tokenizer_config(config_file: Path) -> dict:
    """A transformers tokenizer_config.json ({} when there is none)."""
    if not (config_file.is_file() or config_file.is_symlink()):
        return {}
    path = file_in_folder(config_file.parent, config_file.name)
    return read_json_file(path, "a valid tokenizer_config.json")


def read_special_tokens(config_file: Path) -> dict[str, str]:
    """The bos, eos, unk and pad tokens of a transformers tokenizer_config.json (strings or AddedToken dicts)."""
    config = read_tokenizer_config(config_file)
    tokens = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and not isinstance(token, str):
            raise UserError(f"{config_file}: {name} must be a string, got {token!r}")
        if token is not None:
            tokens[name] = token
    return tokens


def read_chat_template(folder: Path) -> str | None:
    """A transformers folder's chat template, where transformers looks: chat_template.jinja first,
    then tokenizer_config.json's chat_template (a string, or named templates: the "default" one)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file() or jinja.is_symlink():
        return read_utf8(file_in_folder(folder, jinja.name))
    config_file = folder / "tokenizer_config.json"
    template = read_tokenizer_config(config_file).get("chat_template")
    if isinstance(template, list):
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    if template is not None and not isinstance(template, str):
        raise UserError(f"{config_file}: chat_template must be a string")
    return template
