"""GGUF: a model and its tokenizer as the one file llama.cpp, ollama and LM Studio run.

Written with the `gguf` package (the format's own Python writer) as llama.cpp's "llama"
architecture: the SmolLM2 family is Llama (RMSNorm, SwiGLU, GQA, RoPE). The tokenizer goes in as
llama.cpp's byte-level BPE ("gpt2"): tokens, their types, merges, special ids, the chat template,
and the name of the pre-tokenizer llama.cpp applies: the one whose splitting equals ours.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch

from smollm2.config import ModelConfig
from smollm2.errors import UserError, refusal_while
from smollm2.files import clean_leftovers, inside_another, staged_file
from smollm2.hf import llama_incompatibility
from smollm2.model import SmolLM2
from smollm2.tokenizer import Tokenizer

ARCH = "llama"
# The weight encodings --outtype offers: how 2-D weights are stored (1-D norms stay f32), and the
# file type GGUF records for it.
OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# Proof that a file is ours (and so may be replaced): no other writer puts this key in a GGUF.
MARKER_KEY = "smollm2.export"
MARKER = "smollm2-gguf/1"

T = gguf.MODEL_TENSOR
TOP_TENSORS = {"embed_tokens.weight": T.TOKEN_EMBD, "norm.weight": T.OUTPUT_NORM, "lm_head.weight": T.OUTPUT}
LAYER_TENSORS = {
    "input_layernorm.weight": T.ATTN_NORM,
    "self_attn.q_proj.weight": T.ATTN_Q,
    "self_attn.k_proj.weight": T.ATTN_K,
    "self_attn.v_proj.weight": T.ATTN_V,
    "self_attn.o_proj.weight": T.ATTN_OUT,
    "post_attention_layernorm.weight": T.FFN_NORM,
    "mlp.gate_proj.weight": T.FFN_GATE,
    "mlp.up_proj.weight": T.FFN_UP,
    "mlp.down_proj.weight": T.FFN_DOWN,
}


# ---------------------------------------------------------------------------------------------
# Checks, before anything is loaded or written


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")


def check_target(out: Path) -> None:
    """Refuse, in one line, an --out that is not a new file or a GGUF smollm2 wrote."""
    where = inside_another(out)
    if where:
        raise UserError(f"--out {out} {where}: choose another file")
    if out.is_symlink():
        raise UserError(f"--out {out} is a symlink: refusing to replace it (give a new file name)")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give a file name, e.g. {out / 'model.gguf'}")
    blocked = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise UserError(f"--out {out}: {blocked} is a file, not a folder")
    if out.exists() and not is_our_gguf(out):
        raise UserError(f"--out {out} exists and is not a GGUF smollm2 wrote: refusing to replace it (give a new name)")


def is_our_gguf(path: Path) -> bool:
    """A GGUF that carries our marker: a file some other tool wrote, or any other file, is not."""
    try:
        field = gguf.GGUFReader(path).get_field(MARKER_KEY)
        return field is not None and field.contents() == MARKER
    except Exception:  # the reader raises what numpy and struct raise on a file that is no GGUF
        return False


def require_gguf_shape(config: ModelConfig) -> None:
    problem = llama_incompatibility(config)
    if problem:
        raise UserError(f"cannot export to GGUF: {problem} has no llama.cpp equivalent (needs rmsnorm + swiglu)")


# ---------------------------------------------------------------------------------------------
# The tokenizer as llama.cpp reads it


def llama_cpp_pre_tokenizer(spec: dict) -> str:
    """The name of llama.cpp's pre-tokenizer that splits text as `spec` (tokenizer.json's
    pre_tokenizer) does, or one line saying there is none.

    ByteLevel alone (use_regex, no prefix space) is GPT-2's regex: llama.cpp's "gpt-2". "smollm"
    splits digits off first, which HF does only with a Digits(individual_digits) step before
    ByteLevel; without that step "smollm" differs from HF where whitespace runs before a digit
    ("x  1": "smollm" makes one token of both spaces, GPT-2's regex does not)."""
    steps = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    digits = [{"type": "Digits", "individual_digits": True}]
    if is_plain_byte_level(steps[-1:]):
        if steps[:-1] == []:
            return "gpt-2"
        if steps[:-1] == digits:
            return "smollm"
    raise UserError(f"cannot export to GGUF: llama.cpp has no pre-tokenizer equal to ours ({json.dumps(spec)})")


def is_plain_byte_level(steps: list[dict]) -> bool:
    step = steps[0] if steps else {}
    return step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space")


def check_bpe(spec: dict) -> None:
    """llama.cpp's "gpt2" tokenizer is byte-level BPE with nothing around it: refuse anything else."""
    model = spec.get("model") or {}
    problems = [
        f"model {model.get('type')}" if model.get("type") != "BPE" else "",
        "a normalizer" if spec.get("normalizer") else "",
        f"decoder {(spec.get('decoder') or {}).get('type')}"
        if (spec.get("decoder") or {}).get("type") != "ByteLevel"
        else "",
        "byte_fallback" if model.get("byte_fallback") else "",
        "ignore_merges" if model.get("ignore_merges") else "",
        "subword affixes" if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") else "",
    ]
    problem = ", ".join(p for p in problems if p)
    if problem:
        raise UserError(f"cannot export to GGUF: the tokenizer is not plain byte-level BPE ({problem})")


def token_table(tokenizer: Tokenizer, rows: int) -> tuple[list[str], list[int]]:
    """Every row of the embedding as a token and its type; rows the tokenizer never produces are
    "[PAD<id>]", unused (llama.cpp needs one token per row)."""
    added = tokenizer.backend.get_added_tokens_decoder()
    by_id = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    tokens, types = [], []
    for i in range(rows):
        if i in added:
            kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            tokens.append(added[i].content)
        elif i in by_id:
            kind = gguf.TokenType.NORMAL
            tokens.append(by_id[i])
        else:
            kind = gguf.TokenType.UNUSED
            tokens.append(f"[PAD{i}]")
        types.append(int(kind))
    return tokens, types


def merges(spec: dict) -> list[str]:
    """BPE merges as "left right" (tokenizer.json holds pairs, or such strings in older files)."""
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, rows: int) -> None:
    spec = json.loads(tokenizer.backend.to_str())
    check_bpe(spec)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(llama_cpp_pre_tokenizer(spec.get("pre_tokenizer") or {}))
    tokens, types = token_table(tokenizer, rows)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges(spec))
    add_special_tokens(writer, tokenizer)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def add_special_tokens(writer: gguf.GGUFWriter, tokenizer: Tokenizer) -> None:
    """bos, eos, unk and pad as our tokenizer names them; a chat turn ends at <|im_end|> (as the
    transformers export's generation_config says). Nothing is added to a prompt: we add nothing."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    ids = {name: vocab.get(token) for name, token in tokenizer.special_tokens.items()}
    ids["eos_token"] = tokenizer.eos_id
    setters = {
        "bos_token": writer.add_bos_token_id,
        "eos_token": writer.add_eos_token_id,
        "unk_token": writer.add_unk_token_id,
        "pad_token": writer.add_pad_token_id,
    }
    for name, setter in setters.items():
        if ids.get(name) is not None:
            setter(ids[name])
    end_of_turn = vocab.get("<|im_end|>") if tokenizer.chat_template else None
    if end_of_turn is not None:
        writer.add_eot_token_id(end_of_turn)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


# ---------------------------------------------------------------------------------------------
# The architecture and the weights


def add_architecture(writer: gguf.GGUFWriter, config: ModelConfig, name: str, outtype: str) -> None:
    writer.add_name(name)
    writer.add_string(MARKER_KEY, MARKER)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_file_type(OUTTYPES[outtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def gguf_name(name: str) -> str:
    """Our parameter name -> llama.cpp's tensor name."""
    if name in TOP_TENSORS:
        return gguf.TENSOR_NAMES[TOP_TENSORS[name]] + ".weight"
    _, block, rest = name.split(".", 2)
    return gguf.TENSOR_NAMES[LAYER_TENSORS[rest]].format(bid=int(block)) + ".weight"


def interleave_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection from our RoPE layout to llama.cpp's.

    We (like transformers) rotate dimension i with i + head_dim/2; llama.cpp's llama rotates
    neighbours (2i, 2i+1). Reordering each head's rows to 0, d/2, 1, d/2+1, ... makes the two agree:
    the attention scores, and so the model, are unchanged."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def gguf_tensors(model: SmolLM2) -> Iterator[tuple[str, torch.Tensor]]:
    """Each weight under its llama.cpp name, in llama.cpp's layout; a tied head is not repeated
    (llama.cpp uses token_embd when output.weight is absent)."""
    config = model.config
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        if name.endswith("q_proj.weight"):
            tensor = interleave_rope(tensor, config.n_heads)
        elif name.endswith("k_proj.weight"):
            tensor = interleave_rope(tensor, config.n_kv_heads)
        yield gguf_name(name), tensor.detach().float().cpu()


def encode(tensor: torch.Tensor, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A weight as stored: norms (1-D) in f32, like llama.cpp's converter; a row Q8_0 cannot
    split into blocks of 32 stays f32."""
    qtype = OUTTYPES[outtype][0]
    data = tensor.numpy()
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.ndim == 1 or data.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F32
    return gguf.quants.quantize(data, qtype), qtype


# ---------------------------------------------------------------------------------------------
# The file


def export_gguf(
    model: SmolLM2, tokenizer: Tokenizer | None, out: str | Path, outtype: str = "f32", name: str = ""
) -> None:
    """Write `model` and `tokenizer` to `out` as a GGUF, through a temporary name renamed into place;
    an existing `out` is replaced only when smollm2 wrote it."""
    out = Path(out)
    check_outtype(outtype)
    check_target(out)
    require_gguf_shape(model.config)
    if tokenizer is None:
        raise UserError("cannot export to GGUF: the model has no tokenizer beside it (llama.cpp needs one)")
    clean_leftovers(out.parent, {out.name})  # a killed export of the same file
    writer = gguf.GGUFWriter(None, ARCH)
    add_architecture(writer, model.config, name or out.stem, outtype)
    add_tokenizer(writer, tokenizer, model.config.vocab_size)
    for tensor_name, tensor in gguf_tensors(model):
        data, qtype = encode(tensor, outtype)
        writer.add_tensor(tensor_name, data.view(WrittenThroughFile), raw_dtype=qtype)
    try:
        with staged_file(out) as tmp:
            try:
                writer.write_header_to_file(tmp)
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()
    except OSError as exc:
        raise refusal_while(exc, f"writing {out}") from None


class WrittenThroughFile(np.ndarray):
    """A weight whose `tofile` (what the GGUF writer calls) writes through the Python file object.
    numpy's own writes with C stdio, and a short write there loses its errno: a full disk read
    "196608 requested and 180576 written" instead of "no space left on device"."""

    def tofile(self, file, sep: str = "", format: str = "%s") -> None:  # noqa: A002 - numpy's signature
        file.write(np.ascontiguousarray(self).data.cast("B"))
