"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys follow PEFT (``base_model.model.<path>.lora_A.weight`` ...; the table ``_SUFFIXES`` is the one mapping).
lorakit adds its metadata to the safetensors header (format version, lorakit version, a fingerprint of the base
model). Loading validates everything (config fields, key set, shapes, fingerprint) before the model is touched,
and never unpickles anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit import peft_types, peft_variants, quant, trainable_tokens
from lorakit._finite import all_finite
from lorakit._fs import atomic_write_bytes
from lorakit.config import _RESIDUAL_INITS, LoraConfig, clipped, listed, shown
from lorakit.errors import LorakitError
from lorakit.inject import (_base_modules, _matches, _per_layer, _weight_read_raw, adapter_hosts, adapter_names,
                            find_modules_to_save, find_param_targets, find_targets, inject, output_head_names,
                            peft_resolves_differently, saved_by, unwrap)
from lorakit.layers import LoraEmbedding, LoraLayer, ModulesToSave
from lorakit.mha_lora import FILE_INFIXES, MhaLora
from lorakit.models.hub_cache import hub_cache_snapshot, looks_like_hub_id
from lorakit.param_lora import ParamLora, file_key_prefixes, parameter_layout
from lorakit.resized_vocab import base_copy_path, resized_copies
from lorakit.token_rows import TOKEN_DELTA, TokenRows, check_indices

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = "1"
PREFIX = "base_model.model."
PICKLED_NAMES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
MAX_CONFIG_BYTES = 1 << 20  # a PEFT adapter_config.json is a few KB (the server's limit, lorakit.serve.pool, too)
# peft's inits that rewrite the base (W -> W - s B0 A0) when an adapter is created, and again, from the same original
# W, when PeftModel.from_pretrained loads the file: deterministic (an SVD, a QR), so lorakit can repeat them on load
BASE_REWRITES = ("pissa", "olora")

# (linear form attribute, PEFT key suffix for linear layers, for embeddings)
_SUFFIXES = {
    "lora_A": ("lora_A.weight", "lora_embedding_A"),
    "lora_B": ("lora_B.weight", "lora_embedding_B"),
    "magnitude": ("lora_magnitude_vector", "lora_magnitude_vector"),
    "lora_bias": ("lora_B.bias", "lora_embedding_B.bias"),  # peft's lora_bias (never on embeddings, in peft either)
}
_FINGERPRINT_CONFIG_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "tie_word_embeddings", "n_embd", "n_layer", "n_head", "n_inner",
)


# -- fingerprint ---------------------------------------------------------------------------------------------------
def base_fingerprint(model: nn.Module) -> str:
    """A hash of the base's architecture (key config fields) and of its parameter names and shapes (not values).

    Adapters and lorakit wrappers are left out and quantized weights count with their dense shape, so the same
    base gives the same fingerprint with or without adapters, dense or quantized.
    """
    model = unwrap(model)  # torch.compile / DDP: the wrapper's name is no part of the base
    entries: list[str] = []
    config = getattr(model, "config", None)
    if config is not None:
        values = config.to_dict() if hasattr(config, "to_dict") else vars(config)
        text_config = values.get("text_config") if isinstance(values.get("text_config"), dict) else {}
        for key in _FINGERPRINT_CONFIG_KEYS:
            value = values.get(key, text_config.get(key))
            if value is not None:
                entries.append(f"config.{key}={value}")
    modules = _base_modules(model)
    for path, host in adapter_hosts(model).items():
        if isinstance(host, ModulesToSave):  # the submodules of a module trained whole (a DBRX experts block, a
            # RoBERTa classifier head) are the base's too: left out, its adapter was "made for another base model"
            modules.update({f"{path}.{name}": child for name, child in host.base_layer.named_modules()
                            if name and not re.search(r"(^|\.)(adapters|copies|base_layer)(\.|$)", name)})
    for path, module in modules.items():
        # bitsandbytes' packed 4-bit weight made a BitsAndBytesConfig model "another base model" than its own
        packed = quant.holds_bnb_weight(module)
        if quant.is_quantized(module) or packed:
            # the dense original's parameter shape ((in, out) for a Conv1D), so the NF4 and dense models agree
            entries.append(f"{path}.weight:{list(quant.weight_param_shape(module))}")
        for name, parameter in module.named_parameters(recurse=False):
            if packed and name == "weight":
                continue
            entries.append(f"{path + '.' if path else ''}{name}:{list(parameter.shape)}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]


# -- save ----------------------------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, adapter: str = "default") -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The adapter's tensors under PEFT's key names, and its config (PiSSA adapters converted to plain LoRA form)."""
    model = unwrap(model)  # torch.compile / DDP: keys by the inner model's paths, its LoraConfig (see unwrap)
    configs = getattr(model, "lorakit_configs", {})
    if adapter not in adapter_names(model):
        if not adapter_names(model):  # after merge_and_unload the update lives in the weights
            raise LorakitError(f"unknown adapter {adapter!r}; this model has: (no adapters). After merge_and_unload it is "
                               "a plain model: save it whole with model.save_pretrained(folder)")
        raise LorakitError(f"unknown adapter {adapter!r}; this model has: {', '.join(adapter_names(model))}")
    config = configs.get(adapter) or LoraConfig()
    tensors: dict[str, torch.Tensor] = {}
    pissa = False
    for path, host in adapter_hosts(model).items():
        if isinstance(host, ModulesToSave):
            if adapter in host.copies:
                for name, tensor in host.copies[adapter].state_dict().items():
                    tensors[f"{PREFIX}{path}.{name}"] = tensor.detach()
            continue
        if adapter not in host.adapters:
            continue
        if isinstance(host, ParamLora):  # peft's nested ParamWrapper keys: <path>[.base_layer...].lora_A.weight
            infixes = FILE_INFIXES if isinstance(host, MhaLora) else file_key_prefixes(host, adapter)
            for name, infix in infixes.items():
                tensors[f"{PREFIX}{path}{infix}.lora_A.weight"] = host.adapters[adapter][name].lora_A.detach()
                tensors[f"{PREFIX}{path}{infix}.lora_B.weight"] = host.adapters[adapter][name].lora_B.detach()
            continue
        lora = host.adapters[adapter]
        slot = 1 if isinstance(host, LoraEmbedding) else 0
        lora_A, lora_B = lora.lora_A.detach(), lora.lora_B.detach()
        if lora.pissa_init is not None:  # W_res + s B A == W + s [B, -B0] [A; A0]: a plain LoRA of rank 2r on W
            pissa = True
            lora_A = torch.cat([lora_A, lora.pissa_init[0]], dim=0)
            lora_B = torch.cat([lora_B, -lora.pissa_init[1]], dim=1)
        tensors[f"{PREFIX}{path}.{_SUFFIXES['lora_A'][slot]}"] = lora_A
        tensors[f"{PREFIX}{path}.{_SUFFIXES['lora_B'][slot]}"] = lora_B
        if lora.magnitude is not None:
            tensors[f"{PREFIX}{path}.{_SUFFIXES['magnitude'][slot]}"] = lora.magnitude.detach()
        if lora.lora_bias is not None:
            tensors[f"{PREFIX}{path}.{_SUFFIXES['lora_bias'][slot]}"] = lora.lora_bias.detach()
    if pissa:
        config = _doubled_rank(config)
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, config


def _doubled_rank(config: LoraConfig) -> LoraConfig:
    """Same scaling at twice the rank: alpha x2 for LoRA, x sqrt(2) for rsLoRA."""
    factor = math.sqrt(2) if config.variant in ("rslora", "rsdora") else 2.0
    return config.replace(
        r=2 * config.r, alpha=config.alpha * factor, init="default",
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
    )


def _check_folder_argument(folder: Any, function: str, wanted: str) -> None:
    """A ``folder`` argument that is no path: a model object (a PeftModel given where its folder was meant) or
    None was a bare TypeError from inside pathlib."""
    if not isinstance(folder, (str, os.PathLike)):
        raise LorakitError(f"{function} takes {wanted} as a path, not {type(folder).__name__}"
                           + (" (to save a peft model's adapter, call its save_pretrained(folder); to use it here, "
                              "give that folder)" if hasattr(folder, "peft_config") else ""))


def save_adapter(model: nn.Module, folder: str | os.PathLike, adapter: str = "default", base_name: str | None = None) -> Path:
    """Write ``adapter`` to ``folder`` as PEFT does (both files written atomically). Returns the folder."""
    from safetensors.torch import save as safetensors_bytes

    if isinstance(folder, str) and not folder.strip():  # "" (an unset variable) is Path("."): the current folder
        raise LorakitError("the adapter folder is empty (''); give the folder to write, e.g. 'my-adapter'")
    _check_folder_argument(folder, "save_adapter", "the folder to write")
    model = unwrap(model)  # torch.compile / DDP wrapper: saved as the model inside it (see unwrap)

    from lorakit import __version__

    tensors, config = adapter_state_dict(model, adapter)
    tensors.update(resized_copies(model, PREFIX))  # a vocabulary load_adapter resized: its rows go with the adapter
    if peft_resolves_differently(model, config.target_modules):
        # peft 0.21 re-reads a string target ("all-linear", a regex) on transformers-5 MoE models (Mixtral, Qwen3-MoE)
        # as also covering the fused experts and the router, and "all-linear" on Mamba as covering the layers lorakit
        # skips (then refuses out_proj): it would add LoRA there (missing-key warnings, more to train) or fail. The
        # adapted modules by path load as exactly this adapter in both libraries.
        config = config.replace(target_modules=sorted(
            path for path, host in adapter_hosts(model).items()
            if isinstance(host, (LoraLayer, MhaLora)) and adapter in host.adapters))
        _warn_peft_remaps(model, config.target_modules)
    _warn_peft_renames(model, tensors)
    has_conv1d = any(quant.from_conv1d(h.base_layer) for h in adapter_hosts(model).values() if isinstance(h, LoraLayer))
    base_name = base_name or getattr(model, "lorakit_base_name", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    peft_config = config.to_peft_dict(base_model_name_or_path=base_name or None, fan_in_fan_out=has_conv1d,
                                      task_type=task_type(model, adapter))
    metadata = {"format": "pt", "lorakit_format": FORMAT_VERSION, "lorakit_version": __version__,
                "lorakit_base_fingerprint": base_fingerprint(model)}
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise LorakitError(f"{folder} exists and is not a folder; choose another output path")
    # top-level keys sorted, but rank_pattern / alpha_pattern keep their order: the first matching pattern wins
    # (PEFT's rule too), so sorting them could give a module another rank when the file is read back
    config_text = json.dumps(dict(sorted(peft_config.items())), indent=2) + "\n"
    created = [parent for parent in (folder, *folder.parents) if not os.path.lexists(parent)]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_pair(folder, safetensors_bytes(tensors, metadata=metadata), config_text)
    except BaseException as error:  # the atomic writes left nothing half; the folders made for them go too
        for parent in created:
            try:
                parent.rmdir()
            except OSError:  # not made after all, or something else was put there meanwhile
                break
        if not isinstance(error, OSError):
            raise
        # a path under a file, no permission, a full disk
        raise LorakitError(f"cannot save the adapter to {folder}: {error.strerror or error}; choose a folder you can "
                           "write") from None
    return folder


def _write_pair(folder: Path, weights: bytes, config_text: str) -> None:
    """Write an adapter's two files so that ``folder`` holds the new pair or, after any failure (a full disk, a failed
    rename, Ctrl-C), the previous one: new weights beside an old config would load silently with the old alpha.

    The config is written to a temporary file first; the weights are replaced atomically, a hard link keeping the
    previous ones; the config is renamed last. On a failure after the weights were replaced the previous weights
    are put back (or, where the file system has no hard links, the stale config is removed, so the folder is
    refused as incomplete instead of loading wrong)."""
    import tempfile
    import uuid

    from lorakit._fs import publish_mode

    weights_path, config_path = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    fd, name = tempfile.mkstemp(prefix=f".{CONFIG_NAME}.", suffix=".tmp", dir=folder)
    config_tmp, backup, replaced = Path(name), None, False
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(config_text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        if os.path.lexists(weights_path):
            backup = folder / f".{WEIGHTS_NAME}.{uuid.uuid4().hex}.old"
            try:
                os.link(weights_path, backup, follow_symlinks=False)
            except (OSError, NotImplementedError):  # no hard links here (FAT, some network file systems, Windows)
                backup = None
        existed = os.path.lexists(weights_path)
        atomic_write_bytes(weights_path, weights)
        replaced = True
        publish_mode(config_tmp)
        os.replace(config_tmp, config_path)
    except BaseException:
        if backup is not None:
            os.replace(backup, weights_path)  # the previous weights, beside the previous config
        elif replaced and not existed:
            weights_path.unlink(missing_ok=True)
        elif replaced:
            config_path.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)
        raise
    finally:
        if backup is not None:
            backup.unlink(missing_ok=True)


def _warn_peft_remaps(model: nn.Module, paths: list[str]) -> None:
    """peft (0.21) reads some layer names of transformers-5 MoE models as transformers 4's per-expert layers and
    turns them into LoRA on the fused experts: on DeepSeek-V3, GLM-4-MoE, OLMoE, ... an adapted shared expert or
    dense MLP (``gate_proj`` / ``up_proj`` / ``down_proj``) would be dropped when peft loads the file. Said once
    here, from the installed peft's own table (nothing when peft is absent or has no such table)."""
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    except Exception:  # no peft, or one without the conversion: nothing to warn about
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    renamed = _MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type), {})
    clashing = sorted({path.rsplit(".", 1)[-1] for path in paths} & set(renamed))
    if clashing:
        warnings.warn(f"peft re-maps {', '.join(clashing)} on {model_type} models to the fused MoE experts, so "
                      f"peft.PeftModel.from_pretrained would load this adapter without its {', '.join(clashing)} "
                      "layers (lorakit loads, merges and serves it whole); for a file peft reads exactly, train with "
                      f"--exclude {' '.join(clashing)}", stacklevel=3)


def _warn_peft_renames(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """peft (0.21) passes an adapter's keys through transformers' checkpoint conversion for the model type, whose
    renames are written for original checkpoints: some also match keys of today's layout and move them where no
    layer is (Laguna's ``mlp.shared_expert.`` pattern renames ``mlp.shared_experts.gate_proj``, Inkling 2's
    ``sconv.weight_proj`` gets a ``.weight`` inserted), so peft loads the file without those layers, silently. Said
    once here, from the installed peft's own conversion (nothing when peft is absent or converts nothing)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        if get_checkpoint_conversion_mapping(model_type) is None:  # nothing to convert (and no peft import to pay)
            return
        from peft.utils.peft_types import PeftType
        from peft.utils.transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers

        class _Config:  # all the conversion reads of peft's config
            peft_type = PeftType.LORA

        kept = convert_peft_adapter_state_dict_for_transformers(model, _Config(), dict(tensors))
    except Exception:  # transformers 4, no peft, one without this conversion, or one failing on this model: nothing to say
        return
    moved = sorted({_per_layer(_strip(key).split(".lora_")[0]) for key in tensors
                    if ".lora_" in key and key not in kept})
    if moved:
        warnings.warn(f"peft's conversion of {model_type} checkpoints renames the keys of {', '.join(moved)}, so "
                      f"peft.PeftModel.from_pretrained would load this adapter without those layers (lorakit loads, "
                      f"merges and serves it whole); for a file peft reads exactly, train with --exclude "
                      f"{' '.join(moved)}", stacklevel=3)


# peft's task wrappers make these heads modules-to-save copies on load (so they cannot hold LoRA tensors)
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def task_type(model: nn.Module, adapter: str | None = None) -> str | None:
    """peft's ``task_type`` for this model, from its transformers class name (None: any other model).

    peft wraps the base in the class the task names; a causal-LM wrapper on a classifier fails on load. When
    ``adapter`` puts LoRA on the task's head (lorakit's "all-linear" includes a classifier), None: peft's task
    wrapper would replace that head by a modules-to-save copy and fail on its LoRA tensors. Layers inside the head
    count too (RoBERTa's ``classifier.dense`` / ``classifier.out_proj``): peft copies every module whose path ends with
    a head's name, so it copies ``classifier`` and found no place for their LoRA tensors (a KeyError)."""
    task = _class_task(model)
    heads = _TASK_HEADS.get(task or "", ())

    def in_head(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:end]).endswith(heads) for end in range(1, len(parts) + 1))

    if adapter is not None and heads and any(
            isinstance(host, LoraLayer) and adapter in host.adapters and in_head(path)
            for path, host in adapter_hosts(model).items()):
        return None
    return task


_TASK_CLASSES = {"SEQ_CLS": "SequenceClassification", "TOKEN_CLS": "TokenClassification", "QUESTION_ANS": "QuestionAnswering"}


def _task_hint(model: nn.Module, adapter_file: "AdapterFile") -> str:
    """'; it was saved from a ...ForSequenceClassification model ...' when the file's task_type is one of peft's
    task heads and this model is not of that kind ('' otherwise): its head copy (``score``, ``classifier``) then
    names a module this model lacks, and the fix is the model class, not the file."""
    task = adapter_file.raw_config.get("task_type") if isinstance(adapter_file.raw_config, dict) else None
    kind = _TASK_CLASSES.get(task) if isinstance(task, str) else None
    if kind is None or _class_task(model) == task:
        return ""
    return (f"; its task_type {task} says it was saved from a ...For{kind} model, and this one is a "
            f"{type(model).__name__}: load the base with transformers' AutoModelFor{kind}")


def _class_task(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForConditionalGeneration") and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"  # T5, BART; a vision-language ...ForConditionalGeneration is a causal LM
    for suffixes, task in ((("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"), "CAUSAL_LM"),
                           (("ForSequenceClassification",), "SEQ_CLS"), (("ForTokenClassification",), "TOKEN_CLS"),
                           (("ForQuestionAnswering",), "QUESTION_ANS")):
        if name.endswith(suffixes):
            return task
    return None


# -- read ----------------------------------------------------------------------------------------------------------
@dataclass
class AdapterFile:
    """A validated adapter folder: its config, tensors (PEFT keys) and lorakit metadata (empty if made by PEFT).

    ``read_adapter`` reads each file once, so these are exactly the bytes it checked; ``load_adapter`` accepts this
    object, so a caller that checked an adapter loads what it checked even if the files change afterwards.
    """

    folder: Path
    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    raw_config: dict[str, Any]
    file_bytes: int | None = None  # size of the weights file when it was read

    @property
    def size_bytes(self) -> int:
        return self.file_bytes if self.file_bytes is not None else (self.folder / WEIGHTS_NAME).stat().st_size

    @property
    def base_rewrite(self) -> str | None:
        """``"pissa"`` / ``"olora"`` when peft rewrote the base with that init, ``"kasa"`` when KaSA truncated it (see
        ``_plain_form``), else None."""
        if peft_types.peft_type(self.raw_config):  # AdaLoRA's config is a LoraConfig, but its SVD layers never run
            return None  # LoRA's inits or KaSA: peft leaves the base as it is (the other types have no such fields)
        if "kasa_config" in peft_variants.chosen(self.raw_config):
            return "kasa"
        init = self.raw_config.get("init_lora_weights") if isinstance(self.raw_config, dict) else None
        return init.lower() if isinstance(init, str) and init.lower() in BASE_REWRITES else None

    @property
    def token_field(self) -> str:
        """The config's field of trained token rows: LoRA's ``trainable_token_indices``, or ``token_indices`` of
        peft's TrainableTokens method (``lorakit.trainable_tokens``)."""
        rows_only = trainable_tokens.is_trainable_tokens(self.raw_config)
        return trainable_tokens.FIELD if rows_only else "trainable_token_indices"

    @property
    def token_indices(self) -> list[int] | dict[str, list[int]] | None:
        """The trained token rows' ids (``token_field``, validated by ``read_adapter``); loaded as modules-to-save
        copies."""
        value = self.raw_config.get(self.token_field) if isinstance(self.raw_config, dict) else None
        return value or None

    @property
    def bias_mode(self) -> str:
        """peft's ``bias`` option: with "all" / "lora_only" the file may hold bias copies (checked by ``plan_load``)."""
        bias = self.raw_config.get("bias") if isinstance(self.raw_config, dict) else None
        return bias if isinstance(bias, str) else "none"

    @property
    def base_name(self) -> str | None:
        name = self.raw_config.get("base_model_name_or_path") if isinstance(self.raw_config, dict) else None
        return name if isinstance(name, str) and name else None


def _close_folder(folder: Path) -> Path | None:
    """A folder beside ``folder`` whose name is close to its name (a typo), else None."""
    import difflib

    try:
        names = ([e.name for e in os.scandir(folder.parent) if e.is_dir() and not e.name.startswith(".")]
                 if folder.parent.is_dir() else [])
    except OSError:  # unreadable: no suggestion
        return None
    close = difflib.get_close_matches(folder.name, names, n=1, cutoff=0.75)  # 0.75: mien for mine
    return folder.parent / close[0] if close else None


def read_adapter(folder: str | os.PathLike, max_bytes: int | None = None, follow_symlinks: bool = True) -> AdapterFile:
    """Read and validate an adapter folder without touching any model. Never unpickles.

    Each file is opened once and read whole (what is validated is what is returned). ``max_bytes`` caps the weights
    file; ``adapter_config.json`` is capped at ``MAX_CONFIG_BYTES``. ``follow_symlinks=False`` refuses a folder or
    file that is a symbolic link (``O_NOFOLLOW``, checked by the open itself, so it cannot be swapped in between):
    for folders others can write to, such as a server's. The default follows them, as the Hugging Face hub cache
    (files linked to blobs) needs.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir() and looks_like_hub_id(str(folder)) and not folder.parent.is_dir():
        # an org/name id that `hf download org/name` put in the Hugging Face cache, as --model reads one (peft's
        # from_pretrained takes the id too); nothing is downloaded
        folder = hub_cache_snapshot(str(folder), holding=CONFIG_NAME) or folder
    if folder.is_file() and folder.name in (CONFIG_NAME, WEIGHTS_NAME, *PICKLED_NAMES):
        raise LorakitError(f"{folder} is a file of an adapter; pass the folder that holds it: {folder.parent}")
    if not folder.is_dir():
        close = _close_folder(folder)  # a typo: runs/mine/adpater
        if close is not None:
            raise LorakitError(f"adapter folder {folder} does not exist; did you mean {close}?")
        # org/name, unless org is a local folder: runs/nope is a path, not a Hub id to download
        hub = re.fullmatch(r"[\w.-]+/[\w.-]+", str(folder)) is not None and not folder.parent.is_dir()
        from lorakit._fs import backslash_hint, broken_link

        if broken_link(folder):  # adapters/orders -> a run since deleted: not just "does not exist"
            raise LorakitError(f"adapter folder {folder} is {broken_link(folder)}")
        slashed = backslash_hint(folder)  # runs\mine\adapter from a config file written on Windows
        if slashed:
            raise LorakitError(f"adapter folder {folder} does not exist{slashed}")
        raise LorakitError(f"adapter folder {folder} does not exist (expected {CONFIG_NAME} and {WEIGHTS_NAME} inside)" + (
            f"; lorakit reads local folders: download a hub adapter first (hf download {folder} --local-dir DIR)"
            if hub else ""))
    weights = folder / WEIGHTS_NAME
    _refuse_broken_entry(weights, follow_symlinks)
    if not weights.is_file():
        named = _natural_sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file())
        if named:  # peft saves an adapter that is not named "default" into a subfolder of its name
            raise LorakitError(f"{folder} holds adapters in subfolders ({listed(named)}); pass one of them, "
                               f"e.g. {folder / _example(named)}")
        # a run's checkpoints (lorakit: step-N/adapter; Trainer output_dir of checkpoint-N/adapter folders)
        nested = _natural_sorted(p.name for p in folder.iterdir() if (p / "adapter" / CONFIG_NAME).is_file())
        if nested:
            raise LorakitError(f"{folder} holds checkpoints ({listed(nested)}); pass one's adapter folder, e.g. "
                               f"{folder / _example(nested) / 'adapter'}")
        pickled = [n for n in PICKLED_NAMES if (folder / n).exists()]
        if pickled:  # torch.load(weights_only=True) refuses code, so a user who trusts the file can convert it once
            # each tensor copied whole: peft's pickle keeps the views it saved (ensure_weight_tying's head LoRA is the
            # embedding's transposed; a tied copy shares storage), which safetensors refuses to write as they are
            raise LorakitError(f"{folder / pickled[0]} is a pickled checkpoint; lorakit never unpickles files. Convert it once "
                               f"where you trust it: python -c \"import torch, safetensors.torch as st; st.save_file({{k: "
                               f"v.contiguous().clone() for k, v in torch.load('{folder / pickled[0]}', weights_only=True)"
                               f".items()}}, '{weights}')\" (or re-save from peft: model.save_pretrained(dir), safetensors "
                               "by default)")
        raise LorakitError(f"{weights} not found; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}{_other_files(folder)}")
    config_path = folder / CONFIG_NAME
    _refuse_broken_entry(config_path, follow_symlinks)
    if not config_path.is_file():
        raise LorakitError(f"{config_path} not found; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    folder_fd = None if follow_symlinks else _open(folder, follow_symlinks, None, directory=True)
    try:
        weights_fd = _open(weights, follow_symlinks, folder_fd)
        try:
            config_fd = _open(config_path, follow_symlinks, folder_fd)
        except BaseException:
            os.close(weights_fd)
            raise
    finally:
        if folder_fd is not None:
            os.close(folder_fd)
    with os.fdopen(weights_fd, "rb") as weights_handle, os.fdopen(config_fd, "rb") as config_handle:
        size = os.fstat(weights_fd).st_size
        if max_bytes is not None and size > max_bytes:
            raise LorakitError(f"{weights} is {size:,} bytes, over the limit of {max_bytes:,}")
        raw_config = _read_config(config_path, config_handle)
        # no target_modules (peft would guess them from the model type): read after the tensors, which name them
        config = _parse_config(raw_config, config_path) if _names_targets(raw_config) and not (
            peft_types.peft_type(raw_config) or trainable_tokens.is_trainable_tokens(raw_config)
        ) else None  # AdaLoRA, VeRA, LoHa, TrainableTokens: their config comes with the tensors
        _check_layout(weights, weights_handle, size)
        data = _read_exactly(weights, weights_handle, size)
    from safetensors.torch import load as safetensors_load

    try:
        tensors = safetensors_load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = dict(json.loads(data[8:8 + header_len]).get("__metadata__") or {})
    except Exception as error:  # safetensors raises its own error type for malformed files
        raise LorakitError(f"{weights} is not a valid safetensors file ({type(error).__name__}: "
                           f"{clipped(str(error), 200)}); it may be truncated: save the adapter again") from None
    del data  # the tensors hold their own copies
    not_float = [k for k, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        raise LorakitError(f"{weights}: tensor {clipped(not_float[0])} has dtype {tensors[not_float[0]].dtype}; adapter "
                           "weights are floating point")
    # float8 and narrower: no NaN check, no matmul on most devices, and never written by peft or lorakit
    narrow = [k for k, t in tensors.items() if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64)]
    if narrow:
        raise LorakitError(f"{weights}: tensor {clipped(narrow[0])} has dtype {tensors[narrow[0]].dtype}; adapter "
                           "weights must be float32, float16 or bfloat16: convert them (tensor.float()) and save again")
    if peft_types.peft_type(raw_config):  # before the empty check: AdaLoRA's fully pruned modules are (0, in)
        lora_config, tensors = peft_types.to_lora(raw_config, tensors, str(config_path))
        config = _parse_config(lora_config, config_path)
    elif trainable_tokens.is_trainable_tokens(raw_config):  # token rows alone, as a LoRA file's (no LoRA layer)
        config, tensors = trainable_tokens.to_lora_form(raw_config, tensors, str(config_path))
    empty = [k for k, t in tensors.items() if t.numel() == 0]
    if empty:  # DeepSpeed ZeRO-3 / FSDP ranks hold shards: a save that did not gather them writes shape (0,) tensors
        raise LorakitError(f"{weights}: tensor {clipped(empty[0])} is empty (shape {tuple(tensors[empty[0]].shape)}; "
                           f"{len(empty)} of {len(tensors)} tensors are): it was saved from a sharded training run "
                           "(DeepSpeed ZeRO-3, FSDP) without gathering the weights; save the adapter again from gathered "
                           "weights (DeepSpeed: stage3_gather_16bit_weights_on_model_save true, or zero_to_fp32 on the "
                           "checkpoint)")
    bad = [k for k, t in tensors.items() if not all_finite(t)]
    if bad:
        raise LorakitError(f"{weights}: tensor {clipped(bad[0])} holds NaN or Inf; the adapter is broken")
    if config is None:
        config = _parse_config({**raw_config, "target_modules": _targets_from_keys(tensors, weights)}, config_path)
    return AdapterFile(folder, config, tensors, metadata, raw_config, size)


def _natural_sorted(names) -> list[str]:
    """checkpoint-2 before checkpoint-10."""
    return sorted(names, key=lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)])


def _example(names: list[str]) -> str:
    """The folder to suggest: the latest of numbered checkpoints (checkpoint-N, step-N), else the first."""
    return names[-1] if all(re.search(r"\d", n) for n in names) else names[0]


def _refuse_broken_entry(path: Path, follow_symlinks: bool = True) -> None:
    """A dangling symbolic link (a hub cache whose blob never finished downloading) or a folder where an adapter
    file goes, named as such instead of "not found". Without ``follow_symlinks`` (a server's folders) any link is
    refused without saying where it points (``_open`` refuses one swapped in after this check)."""
    if not follow_symlinks and path.is_symlink():  # even a dangling one: it is there, so "not found" would mislead
        raise LorakitError(f"{path} is a symbolic link, refused here (follow_symlinks=False): put the adapter's files "
                           "themselves there")
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
            loop = False
        except OSError as error:
            loop = error.errno == errno.ELOOP
        if loop:
            raise LorakitError(f"{path} is a symbolic link that leads back to itself (a loop of links); put the adapter "
                               "file itself there")
        raise LorakitError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist (an unfinished "
                           "download?); download the adapter again")
    if path.is_dir():
        raise LorakitError(f"{path} is a folder; it must be the file itself")
    if path.exists() and not path.is_file():  # a pipe or a device (a link to /dev/zero): "not found" would mislead
        raise LorakitError(f"{path} is not a regular file (a pipe, socket or device); it must be the file itself")


def _names_targets(raw_config: Any) -> bool:
    """Whether the config can be parsed before the tensors are read: it names its targets, or it is not LoRA's (a
    prompt-tuning config names none, and is refused by its peft_type before its tensors are looked at)."""
    if not isinstance(raw_config, dict):
        return True
    peft_type = raw_config.get("peft_type", "LORA")
    if not (isinstance(peft_type, str) and peft_type.upper() == "LORA"):
        return True
    return raw_config.get("target_modules") not in (None, [], "") or bool(
        raw_config.get("target_parameters"))  # the parameters (and no module) are the targets


def _targets_from_keys(tensors: dict[str, torch.Tensor], weights: Path) -> list[str]:
    """The module paths that hold LoRA tensors (exact paths, so they match only those modules)."""
    paths = set()
    for key in tensors:
        for suffixes in _SUFFIXES.values():
            for suffix in (suffixes[0], suffixes[1]):
                if key.endswith("." + suffix):
                    paths.add(_strip(key)[: -len(suffix) - 1])
    if not paths:
        raise LorakitError(f"{weights.parent / CONFIG_NAME} names no target_modules and {weights.name} holds no LoRA tensors "
                           "(keys ending in lora_A.weight); add target_modules to the config")
    return sorted(paths)


def _parse_config(raw_config: Any, config_path: Path) -> LoraConfig:
    """``LoraConfig.from_peft_dict`` plus the options only a whole folder can settle, accepted here and applied by
    ``load_adapter``: a pissa / olora base rewrite (others refused), bias="all"/"lora_only" (``plan_load`` checks the
    bias tensors), trainable_token_indices (checked here, loaded as copies) and ensure_weight_tying."""
    rewrite = None
    if isinstance(raw_config, dict):
        init = raw_config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
            rewrite = init.lower()
            if rewrite not in BASE_REWRITES:  # pissa_niter_K (a randomized SVD), corda, loftq, lora_ga: data or chance
                raise LorakitError(
                    f"{config_path}: init_lora_weights={shown(init)} rewrote the base weights in a way lorakit cannot repeat "
                    "(randomized or data-dependent), and A and B belong to that rewritten base: load the adapter on the base "
                    "saved with it after setting init_lora_weights to true in this file, or re-save it from peft with "
                    "save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a LoRA for the original model")
        if raw_config.get("bias") in ("all", "lora_only"):
            raw_config = {**raw_config, "bias": "none"}
        tokens = raw_config.get("trainable_token_indices")
        if tokens not in (None, [], {}):  # loaded as whole copies of the embedding (``_token_copies``)
            check_indices(tokens, str(config_path), "trainable_token_indices")
            raw_config = {**raw_config, "trainable_token_indices": None}
        # VeLoRA, KaSA, ...: checked here, converted to plain LoRA by load_adapter
        raw_config = peft_variants.check_options(raw_config, str(config_path))
        if raw_config.get("ensure_weight_tying") is True:  # the tied head's LoRA is in the file too (see fitted_config)
            raw_config = {**raw_config, "ensure_weight_tying": False}
        for field in ("rank_pattern", "alpha_pattern"):  # peft matches their keys as regular expressions
            patterns = raw_config.get(field)
            for key in patterns if isinstance(patterns, dict) else ():
                try:
                    re.compile(str(key))
                except re.error as error:
                    raise LorakitError(f"{config_path}: {field} key {shown(key)} is not a valid regular expression "
                                       f"({error}); peft reads these keys as patterns of module names") from None
    try:
        with warnings.catch_warnings():
            if rewrite:  # from_peft_dict warns that the base was rewritten: load_adapter takes care of it
                warnings.filterwarnings("ignore", message=".*rewrites the base weights", category=UserWarning)
            return LoraConfig.from_peft_dict(raw_config, source=str(config_path))
    except RecursionError:  # a field nested hundreds deep: deep enough for some check to recurse
        raise LorakitError(f"{config_path} is nested too deeply; a PEFT adapter_config.json is a flat object") from None


def internal_names_note(folder: Path) -> str | None:
    """When a model folder's weights carry lorakit's internal names (``q_proj.base_layer.weight``,
    ``q_proj.adapters.default.lora_A``): what it is and how to recover its adapter. transformers' own
    ``save_pretrained`` wrote such folders for an injected model before ``inject`` hooked it (lorakit.hf_trainer);
    None for any other folder. Reads the files' headers only."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                key = next((k for k in handle.keys() if ".base_layer." in k or ".adapters." in k), None)
        except Exception:  # an unreadable file is the loader's to report
            continue
        if key is not None:
            return (f"{folder} is a whole model saved with lorakit's internal names (e.g. {key!r}) by "
                    "model.save_pretrained on an injected model, with no adapter_config.json; to recover its adapter, "
                    "load the original base, lorakit.inject the same LoraConfig, then model.load_state_dict("
                    f"safetensors.torch.load_file({str(path)!r}), strict=False) and lorakit.save_adapter(model, dir) "
                    "(save_pretrained on an injected model now writes that adapter folder itself)")
    return None


def _other_files(folder: Path) -> str:
    """What the folder holds instead of an adapter, said when it is something else users pass by mistake."""
    names = {p.name for p in folder.iterdir()}
    if "config.json" in names and any(n.startswith(("model", "pytorch_model")) for n in names):
        note = internal_names_note(folder)
        if note is not None:
            return "; " + note
        return ("; this is a whole model's folder (config.json and model weights): load it with lorakit.load_base(folder), "
                "or on the command line as --model, with no --adapter (a merged model holds its adapter already)")
    if "adapters.safetensors" in names:
        return ("; it holds adapters.safetensors, MLX-LM's adapter format (other key names and scaling): convert it to "
                "PEFT's format first")
    others = sorted(n for n in names if n.endswith(".safetensors"))
    return f"; it holds {listed(others)}" if others else ""


def _open(path: Path, follow_symlinks: bool, folder_fd: int | None, directory: bool = False) -> int:
    """A read-only descriptor of the regular file (or folder) ``path``; with ``follow_symlinks=False`` the open
    itself refuses a symbolic link as the last component, and opens relative to ``folder_fd`` when given."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    flags |= 0 if directory else getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in must not block the open
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    relative = folder_fd is not None and os.open in os.supports_dir_fd
    try:
        fd = os.open(path.name if relative else path, flags, dir_fd=folder_fd if relative else None)
    except OSError as error:
        if not follow_symlinks and path.is_symlink():  # ELOOP, or ENOTDIR for a folder
            raise LorakitError(f"{path} is a symbolic link, refused here (follow_symlinks=False): put the adapter's "
                               "files themselves there") from None
        raise LorakitError(f"{path} cannot be opened: {error.strerror}") from None
    kind = os.fstat(fd).st_mode
    if not (stat.S_ISDIR(kind) if directory else stat.S_ISREG(kind)):
        os.close(fd)
        raise LorakitError(f"{path} is not a regular {'folder' if directory else 'file'}")
    return fd


def _read_exactly(path: Path, handle, size: int) -> bytes:
    data = handle.read(size + 1)
    if size == 0 and data:  # /proc and /sys files: no size on disk, made up when read; reading again changes nothing
        raise LorakitError(f"{path} reports a size of 0 bytes but has content when read (a /proc or /sys file?); it must "
                           "be the adapter file itself")
    if len(data) != size:
        raise LorakitError(f"{path} changed while it was read ({size:,} bytes expected, {len(data):,} read); try again")
    return data


def _read_config(path: Path, handle) -> Any:
    """Parse ``adapter_config.json`` from an open file, refusing it over ``MAX_CONFIG_BYTES`` before reading it."""
    size = os.fstat(handle.fileno()).st_size
    if size > MAX_CONFIG_BYTES:
        raise LorakitError(f"{path} is {size:,} bytes, over the limit of {MAX_CONFIG_BYTES:,} (a PEFT adapter config is "
                           "a few KB)")
    data = _read_exactly(path, handle, size)
    if not data.strip():
        raise LorakitError(f"{path} is empty (an interrupted copy or download?); save or copy the adapter again")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(data) > 1 and b"\x00" in data[:2]):
        raise LorakitError(f"{path} is UTF-16 text (Windows PowerShell's default for '>' and Out-File); save it as UTF-8, "
                           "which peft and lorakit read")
    try:
        return json.loads(data.decode("utf-8-sig"))  # -sig: a BOM from a Windows editor
    except RecursionError:
        raise LorakitError(f"{path} is nested too deeply to be an adapter config") from None
    except json.JSONDecodeError as error:
        raise LorakitError(f"{path} is not valid JSON: {clipped(str(error).split(';')[0], 160)}{_json_hint(error)}") from None
    except ValueError as error:  # UnicodeDecodeError, an integer of thousands of digits
        raise LorakitError(f"{path} is not valid JSON: {clipped(str(error).split(';')[0], 160)}") from None


def _json_hint(error: json.JSONDecodeError) -> str:
    """What JSON5-style habits (comments, trailing commas) look like to ``json``: said in words, with the line."""
    line = error.doc.splitlines()[error.lineno - 1] if error.lineno <= len(error.doc.splitlines()) else ""
    if line.lstrip().startswith(("//", "/*", "#")):
        return f" (line {error.lineno} is a comment; JSON has no comments: delete it)"
    before = error.doc[: error.pos].rstrip()
    if before.endswith(",") and error.doc[error.pos: error.pos + 1] in ("}", "]"):
        return " (a trailing comma before a closing bracket; JSON allows none: delete it)"
    return ""


def _check_layout(path: Path, handle, size: int) -> None:
    """Before a weights file is read whole: its safetensors header must be sane and describe exactly ``size`` bytes
    (8 + header + the end of the last tensor), so a file padded far past its tensors (a sparse file of gigabytes, a
    copy appended to an old file) is refused without reading it. Reads only the header; leaves ``handle`` at 0.
    A header that does not parse is left to safetensors to describe."""
    prefix = _read_exactly(path, handle, 0) if size == 0 else handle.read(min(size, 64))  # 0: a /proc file?
    _check_header(path, prefix, size)
    header_len = int.from_bytes(prefix[:8], "little")
    handle.seek(8)
    try:
        header = json.loads(handle.read(header_len))
        described = 8 + header_len + max((int(entry["data_offsets"][1]) for key, entry in header.items()
                                          if key != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, OverflowError):
        described = None  # (OverflowError: an offset of Infinity, which Python's json reads as a float)
    handle.seek(0)
    if described is not None and described != size:
        raise LorakitError(f"{path} is not a valid safetensors file: it is {size:,} bytes, but its header describes "
                           f"{described:,} ({'truncated' if size < described else 'other data after the tensors'}); save "
                           "the adapter again")


def _check_header(path: Path, data: bytes, size: int | None = None) -> None:
    """The safetensors header must be a sane length and lie inside the file (cheap check before parsing); ``data``
    is the file or its first bytes, ``size`` the file's size (default: ``len(data)``)."""
    size = len(data) if size is None else size
    if data.startswith(b"version https://git-lfs"):  # a clone without git-lfs: the pointer, not the weights
        raise LorakitError(f"{path} is a Git LFS pointer ({size} bytes), not the weights: run git lfs pull in that "
                           "repository, or download the adapter with hf download REPO --local-dir DIR")
    if size < 8:
        raise LorakitError(f"{path} is truncated ({size} bytes); save the adapter again")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > 100_000_000 or 8 + header_len > size:
        raise LorakitError(f"{path} is not a valid safetensors file (header of {header_len} bytes in a {size}-byte "
                           "file); it may be truncated: save the adapter again")


# -- load ----------------------------------------------------------------------------------------------------------
def _strip(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def plan_load(model: nn.Module, adapter_file: AdapterFile, check_base: bool = True) -> dict[tuple[str, str], torch.Tensor]:
    """Match the file's tensors to this model: ``{(module path, attribute): tensor}``. Changes nothing.

    Raises on another base's fingerprint, missing or unexpected keys, and wrong shapes.
    """
    config = fitted_config(model, adapter_file)
    made_for = f" ({CONFIG_NAME} names the base {shown(adapter_file.base_name)})" if adapter_file.base_name else ""
    fingerprint = adapter_file.metadata.get("lorakit_base_fingerprint")
    if check_base and fingerprint and fingerprint != base_fingerprint(model):
        raise LorakitError(f"{adapter_file.folder} was made for another base model (fingerprint {shown(fingerprint)}, this model "
                           f"{base_fingerprint(model)}); load it on the model it was trained on{made_for}")
    try:
        targets = find_targets(model, config)
        saved = find_modules_to_save(model, config)
        params = find_param_targets(model, config)
    except LorakitError as error:  # say which file, and which base it names (or which kind of model)
        raise LorakitError(f"{adapter_file.folder}: {error}{_task_hint(model, adapter_file) or made_for}") from None
    base_modules = _base_modules(model)
    plan: dict[tuple[str, str], torch.Tensor] = {}
    unexpected: list[str] = []
    tokens = _token_copies(model, adapter_file)
    renamed = _layout_renamer(model)
    for path, weight in tokens.items():  # the rest of each copy's state (a head's bias) is the base's own
        plan.update({(path, name): value for name, value in base_modules[path].state_dict().items()})
        plan[(path, "weight")] = weight
    param_keys = _param_keys(params)
    attention = {path: module for path, module in targets.items() if isinstance(module, nn.MultiheadAttention)}
    param_keys.update(_attention_keys(attention))
    if attention:
        _warn_newer_attention_format(adapter_file)
    targets = {path: module for path, module in targets.items() if path not in attention}
    inert = inert_raw_targets(model, adapter_file)
    for key, tensor in adapter_file.tensors.items():
        if key.endswith(TOKEN_DELTA) and tokens:
            continue
        if inert and _strip(key).rsplit(".", 2)[0] in inert and key.endswith((".lora_A.weight", ".lora_B.weight")):
            continue  # a zero LoRA on a layer its parent reads directly: it acts nowhere (inert_raw_targets)
        path, attr = param_keys.get(_strip(key), (None, ""))
        if path is None:
            path, attr = _match_key(_strip(key), targets, saved)
        if path is None and renamed is not None:  # saved with an older transformers layout (Llava, Gemma3, ...)
            path, attr = _match_key(renamed(_strip(key)), targets, saved)
        if path is None and "_orig_mod." in key:  # peft on a torch.compile'd base: its wrapper's name in every key
            plain = _strip(key).replace("_orig_mod.", "")
            path, attr = param_keys.get(plain) or _match_key(plain, targets, saved)
        if path is None:
            if adapter_file.base_rewrite and _is_rewritten_base_copy(_strip(key), tensor, targets, config,
                                                                     adapter_file.base_rewrite):
                continue  # peft's copy of a base it rewrote (pissa on lm_head): the plain form needs the original
            if _is_unchanged_base_copy(_strip(key), tensor, base_modules, adapter_file.folder):
                continue  # PEFT saves full embedding copies next to embedding adapters; equal to ours: harmless
            if _is_second_trained_copy(_strip(key), tensor, adapter_file.tensors):
                continue  # the modules_to_save copy that <path>.weight holds, saved again by save_embedding_layers
            if adapter_file.bias_mode != "none" and _is_unchanged_bias(_strip(key), tensor, base_modules, adapter_file):
                continue  # bias="all"/"lora_only" saves the biases; untrained ones (or none at all) change nothing
            unexpected.append(key)
            continue
        if attr == "magnitude" and config.variant not in ("dora", "rsdora"):  # peft would drop it: not DoRA any more
            raise LorakitError(f"{adapter_file.folder}: {clipped(key)} is a DoRA magnitude, but {CONFIG_NAME} has no "
                               "use_dora: true; set it if the adapter was trained with DoRA (peft would drop these "
                               "tensors and run plain LoRA)")
        if attr == "lora_bias" and not config.lora_bias:  # peft would drop it (its lora_B has no bias then)
            raise LorakitError(f"{adapter_file.folder}: {clipped(key)} is a bias of lora_B, but {CONFIG_NAME} has no "
                               "lora_bias: true; set it if the adapter was trained with lora_bias (peft would drop these "
                               "tensors and run the adapter without them)")
        if (path, attr) in plan:  # the same tensor twice, e.g. under an old and a new transformers layout
            raise LorakitError(f"{adapter_file.folder}: {clipped(key)} is a second tensor for {path} {attr}; keep one")
        plan[(path, attr)] = tensor
    if unexpected:
        hint = _unselected_hint(config, unexpected, base_modules) or _wrapped_hint(model, unexpected, base_modules)
        raise LorakitError(f"{adapter_file.folder}: unexpected tensor keys for this model and config: {listed(unexpected)}"
                           f"{hint or made_for}")
    missing: list[str] = []
    for path, module in targets.items():
        out_features, in_features = quant.linear_shape(module)
        if isinstance(module, nn.Embedding):
            out_features, in_features = in_features, out_features  # linear form: (dim, num)
        rank = config.rank_for(path)
        expected = {"lora_A": (rank, in_features), "lora_B": (out_features, rank)}
        if config.variant in ("dora", "rsdora"):
            expected["magnitude"] = (out_features,)
        if config.lora_bias:
            expected["lora_bias"] = (out_features,)
        slot = 1 if isinstance(module, nn.Embedding) else 0
        for attr, shape in expected.items():
            tensor = plan.get((path, attr))
            key = f"{PREFIX}{path}.{_SUFFIXES[attr][slot]}"
            if tensor is None:
                missing.append(key)
            elif tuple(tensor.shape) != shape:
                vocab_side = attr == ("lora_A" if isinstance(module, nn.Embedding) else "lora_B") and (
                    isinstance(module, nn.Embedding) or path in output_head_names(model))
                raise LorakitError(f"{adapter_file.folder}: {key} has shape {shown(tuple(tensor.shape))}, but module {path} "
                                   f"needs {shape}; {_shape_cause(tensor, shape, attr, adapter_file, model, vocab_side)}{made_for}")
    for key, (path, attr) in param_keys.items():
        name, _, which = attr.rpartition(".")
        module = base_modules[path]
        if path in attention:  # in_proj (E -> 3E), out_proj (E -> E); one rank for both
            experts, in_features, rank = 1, module.embed_dim, config.rank_for(path)
            out_features = module.embed_dim * (3 if name == "in_proj_weight" else 1)
            what = f"the nn.MultiheadAttention {path} ({name}, rank {rank})"
        else:
            experts, in_features, out_features, _ = parameter_layout(module, module._parameters[name])
            rank = params[path][name][0]
            what = f"parameter {path}.{name} ({experts} expert(s), rank {rank})"
        shape = (rank * experts, in_features) if which == "lora_A" else (out_features, rank * experts)
        tensor = plan.get((path, attr))
        if tensor is None:
            missing.append(PREFIX + key)
        elif tuple(tensor.shape) != shape:
            raise LorakitError(f"{adapter_file.folder}: {PREFIX}{key} has shape {shown(tuple(tensor.shape))}, but {what} "
                               f"needs {shape}; the adapter was made for a different model or rank{made_for}")
    for path, module in saved.items():
        for name, parameter in module.state_dict().items():
            tensor = plan.get((path, name))
            key = f"{PREFIX}{path}.{name}"
            if tensor is None:
                missing.append(key)
            elif tuple(tensor.shape) != tuple(parameter.shape):
                raise LorakitError(f"{adapter_file.folder}: {key} has shape {shown(tuple(tensor.shape))}, but this model's "
                                   f"{path}.{name} is {tuple(parameter.shape)}"
                                   f"{_resized_hint(model, tuple(tensor.shape), tuple(parameter.shape))}")
    if missing:
        linear_factors = any(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in missing)
        converted = "" if linear_factors else _conversion_hint(adapter_file)
        raise LorakitError(f"{adapter_file.folder}: missing tensor keys: {listed(missing)} ({len(missing)} in all)"
                           f"{converted or made_for}")
    if check_base:  # only once every shape fits: the warning says so, and a refusal above names the base already
        _warn_other_base_name(model, adapter_file)
    return plan


def _resized_hint(model: nn.Module, saved: tuple[int, ...], ours: tuple[int, ...]) -> str:
    """For a copy whose rows differ from this model's vocabulary size (an embedding or output head trained after
    ``resize_token_embeddings``): say to resize the base first; '' for any other shape mismatch."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if len(saved) == len(ours) == 2 and saved[1] == ours[1] and saved[0] != ours[0] == vocab:
        return (f"; the adapter was trained on a resized vocabulary of {saved[0]} tokens: resize the base "
                f"(model.resize_token_embeddings({saved[0]})) first, or load the base it was saved with")
    return ""


def _param_keys(params: dict[str, dict[str, tuple[int, float]]]) -> dict[str, tuple[str, str]]:
    """File key (without the prefix) -> (module path, "<parameter>.lora_A" / ".lora_B") for target_parameters, in
    peft's nesting: the module's last adapted parameter at ``<path>.lora_A.weight``, earlier ones one
    ``.base_layer`` deeper each (see ``lorakit.param_lora.file_key_prefixes``)."""
    keys = {}
    for path, chosen in params.items():
        names = list(chosen)
        for index, name in enumerate(names):
            infix = ".base_layer" * (len(names) - 1 - index)
            for which in ("lora_A", "lora_B"):
                keys[f"{path}{infix}.{which}.weight"] = (path, f"{name}.{which}")
    return keys


def _warn_newer_attention_format(adapter_file: AdapterFile) -> None:
    """lorakit reads LoRA on nn.MultiheadAttention as peft 0.21 runs it, out_proj's update added twice
    (lorakit.mha_lora); a file from a later peft may come from a release that adds it once (huggingface/peft PR
    #3774), and would then run with twice its out_proj update here: said once."""
    made_by = adapter_file.raw_config.get("peft_version") if isinstance(adapter_file.raw_config, dict) else None
    numbers = re.match(r"(\d+)\.(\d+)", made_by) if isinstance(made_by, str) else None
    if numbers and (int(numbers.group(1)), int(numbers.group(2))) > (0, 21):
        warnings.warn(f"{adapter_file.folder} was saved by peft {made_by}; lorakit runs LoRA on nn.MultiheadAttention "
                      "as peft 0.21 does (out_proj's update added twice): if this peft adds it once, the outputs "
                      "differ from peft's; compare with PeftModel.from_pretrained before relying on them",
                      UserWarning, stacklevel=4)


def _attention_keys(attention: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """File key (without the prefix) -> (module path, "<part>.lora_A" / ".lora_B") for LoRA on nn.MultiheadAttention
    modules, in peft's names: ``<path>.lora_A.weight`` (in_proj), ``<path>.base_layer.out_proj.lora_A.weight``."""
    return {f"{path}{infix}.{which}.weight": (path, f"{part}.{which}")
            for path in attention for part, infix in FILE_INFIXES.items() for which in ("lora_A", "lora_B")}


def _layout_renamer(model: nn.Module):
    """transformers' renamings from older checkpoint layouts of this model class (``language_model.model.layers``
    of Llava before transformers 4.52 is ``model.language_model.layers`` now), as a key -> key function, or None.

    peft applies them when it loads an adapter; only the renamings are used here (the converters that fuse MoE
    experts have no LoRA counterpart in lorakit), and only for keys that do not match as they are."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers 4.x: the model class's own key_mapping (regex -> replacement), as peft uses
        mapping = getattr(model, "_checkpoint_conversion_mapping", None)
        if not isinstance(mapping, dict) or not mapping:
            return None

        def rename_4x(key: str) -> str:
            for pattern, replacement in mapping.items():  # the first pattern that matches, as transformers 4.x does
                try:
                    renamed, count = re.subn(pattern, replacement, key)
                except re.error:
                    return key
                if count:
                    return renamed
            return key

        return rename_4x
    if not isinstance(model, PreTrainedModel):
        return None
    try:
        renamings = [w for w in get_model_conversion_mapping(model) if isinstance(w, WeightRenaming)]
    except Exception:  # an internal API of transformers: when it changes, keys are matched as they are
        return None
    if not renamings:
        return None

    def rename(key: str) -> str:
        try:
            return rename_source_key(key, renamings, [])[0]
        except Exception:
            return key

    return rename


def _shape_cause(tensor: torch.Tensor, shape: tuple[int, ...], attr: str, adapter_file: AdapterFile,
                 model: nn.Module, vocab_side: bool = False) -> str:
    """Why a tensor has the wrong shape: a rank the config does not state, a resized vocabulary (``vocab_side``:
    the factor's other side is the vocabulary, as lora_A's of an embedding, lora_B's of an output head), or another
    model."""
    rank_dim = {"lora_A": 0, "lora_B": 1}.get(attr)
    got = tuple(tensor.shape)
    if rank_dim is not None and len(got) == 2 and got[1 - rank_dim] == shape[1 - rank_dim]:
        missing = "" if "r" in adapter_file.raw_config else " (it has no 'r', so peft's default 8 applies)"
        return (f"the tensors have rank {got[rank_dim]}, the config says {shape[rank_dim]}{missing}: fix r / rank_pattern "
                f"in {CONFIG_NAME}")
    if vocab_side and len(got) == 2 and got[rank_dim] == shape[rank_dim]:  # the rank fits: the vocabulary differs?
        other = 1 - rank_dim
        hint = _resized_hint(model, (got[other], 0), (shape[other], 0))
        if hint:
            return hint[2:]
    return "the adapter was made for a different model or rank"


def _short_name(name: str) -> str:
    """``meta-llama/Llama-3.2-1B``, ``/models/Llama-3.2-1B/`` and a hub cache path all give ``llama-3.2-1b``."""
    parts = [p for p in name.replace("\\", "/").split("/") if p and not (len(p) == 40 and all(c in "0123456789abcdef" for c in p))]
    parts = [p for p in parts if p != "snapshots"]
    last = parts[-1] if parts else name
    return re.sub(r"(-unsloth)?(-bnb)?-[48]bit$", "", last.rsplit("--", 1)[-1].lower())  # unsloth's quantized copies


def _same_folder(a: str, b: str) -> bool:
    """Whether the names ``a`` and ``b`` are paths to one existing folder (a symlinked model folder, or a relative
    and an absolute path to it)."""
    try:
        return os.path.samefile(os.path.expanduser(a), os.path.expanduser(b))
    except (OSError, ValueError):  # a name that is no local path (an org/name id), or a path too long
        return False


def _warn_other_base_name(model: nn.Module, adapter_file: AdapterFile) -> None:
    """Warn when the file names another base than this model's (the shapes fit, so nothing else can tell). Names are
    compared by their last part, and one that extends the other (a base and its ``-Instruct``) passes."""
    ours = getattr(model, "lorakit_base_name", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    theirs = adapter_file.base_name
    if not (isinstance(ours, str) and ours and theirs):
        return
    ours_short, theirs_short = _short_name(ours), _short_name(theirs)
    if _same_folder(ours, theirs):  # models/current -> Llama-3.2-1B: one folder by two names (a link), not another base
        return
    if not (ours_short.startswith(theirs_short) or theirs_short.startswith(ours_short)):  # "x" and "x-instruct": quiet
        warnings.warn(f"{adapter_file.folder}: {CONFIG_NAME} names the base {shown(theirs)}, this model is {shown(ours)}; the "
                      "shapes fit, but an adapter on another base than it was trained on gives wrong outputs",
                      UserWarning, stacklevel=4)


def inert_raw_targets(model: nn.Module, adapter_file: AdapterFile) -> list[str]:
    """Paths of linear layers whose LoRA in the file is exactly zero (B A == 0) and whose parent reads their weight
    directly instead of calling them: peft's "all-linear" wraps ``nn.MultiheadAttention.out_proj`` (which
    ``F.multi_head_attention_forward`` gets as a tensor), where the LoRA never acts in peft's forward and never gets
    a gradient, so B keeps its zero init. Such a LoRA changes nothing in peft's forward nor in its merge, so lorakit
    leaves it out. A non-zero one is refused: peft's forward ignores it while peft's merge_and_unload adds it."""
    modules = _base_modules(model)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter_file.tensors.items():
        for attr in ("lora_A", "lora_B"):
            suffix = f".{_SUFFIXES[attr][0]}"
            if key.endswith(suffix):
                found.setdefault(_strip(key)[: -len(suffix)], {})[attr] = tensor
    inert = []
    for path, pair in found.items():
        module = modules.get(path)
        if module is None or len(pair) != 2 or not quant.is_linear_like(module) or not _weight_read_raw(modules, path):
            continue
        lora_A, lora_B = pair["lora_A"].double(), pair["lora_B"].double()
        if lora_A.ndim != 2 or lora_B.ndim != 2 or lora_B.shape[1] != lora_A.shape[0]:
            continue  # the shape checks of plan_load say what is wrong
        if torch.count_nonzero(lora_B @ lora_A):
            parent_path, _, name = path.rpartition(".")
            parent = type(modules[parent_path]).__name__
            hint = (f", or adapt the attention module itself (target_modules naming {parent_path.rsplit('.', 1)[-1]!r}: "
                    "LoRA on its in_proj and out_proj, peft's lora.MultiheadAttention)"
                    if isinstance(modules[parent_path], nn.MultiheadAttention) else "")
            raise LorakitError(f"{adapter_file.folder}: {path} holds a non-zero LoRA, but {parent} passes {name}.weight "
                               f"to its computation without calling {name}, so peft's model ignores this LoRA while "
                               "peft's merge_and_unload adds it; lorakit cannot match both: train the adapter again "
                               f"without {name!r}{hint}")
        inert.append(path)
    return inert


def fitted_config(model: nn.Module, adapter_file: AdapterFile) -> LoraConfig:
    """The file's config for this model: ``modules_to_save`` names this model lacks, with no tensors in the file,
    are dropped, as peft does (peft's SEQ_CLS task saves ["classifier", "score"]; a model has one of them)."""
    config = adapter_file.config
    if isinstance(adapter_file.raw_config, dict) and adapter_file.raw_config.get("ensure_weight_tying") is True:
        # peft adds the LoRA of the head tied to a targeted embedding (or the reverse) and saves both, equal by the
        # tie; its target list does not name the partner, so the file's keys say what to adapt
        config = _tied_partner_patterns(model, adapter_file, config).replace(
            target_modules=_targets_from_keys(adapter_file.tensors, adapter_file.folder / WEIGHTS_NAME), exclude_modules=None)
        if config.modules_to_save:
            config = config.replace(modules_to_save=_tied_partners(model, adapter_file, config.modules_to_save))
    inert = inert_raw_targets(model, adapter_file)
    if inert:  # out of the targets, so the refusal of raw-read targets does not apply to what changes nothing
        excluded = config.exclude_modules
        if isinstance(excluded, str):
            excluded = "|".join([f"(?:{excluded})", *(re.escape(path) for path in inert)])
        else:
            excluded = list(dict.fromkeys([*(excluded or []), *inert]))
        config = config.replace(exclude_modules=excluded)
    config = _without_absent_moe_parameters(model, config)
    copies = list(_token_copies(model, adapter_file, weights=False))
    if copies:  # whole copies of the embedding (and its tied head) with the trained rows: same outputs as peft's
        config = config.replace(modules_to_save=list(dict.fromkeys((config.modules_to_save or []) + copies)))
    if not config.modules_to_save:
        return config
    paths = [p for p in _base_modules(model) if p]
    keys = [_strip(k) for k in adapter_file.tensors]
    kept = [name for name in config.modules_to_save
            if any(saved_by(p, [name]) for p in paths)
            or any(k.startswith(name + ".") or f".{name}." in k for k in keys)]  # still refused if the file has it
    return config if kept == config.modules_to_save else config.replace(modules_to_save=kept or None)


# the target_parameters peft 0.21 writes in place of transformers 4's MoE layer names (the router ``gate`` and the
# experts' ``gate_proj`` / ``up_proj`` / ``down_proj``, or Mixtral's ``w1`` / ``w3`` / ``w2``) on every model type its
# conversion table lists
_PEFT_MOE_PARAMETERS = ("gate.weight", "gate_up_proj", "down_proj")


def _without_absent_moe_parameters(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` without the target_parameters entries peft's MoE conversion added that name no parameter of this
    model: peft writes ``gate.weight`` for the router of every model of those types, also where the router's weight
    has another name (Hunyuan MoE's ``gate.wg``) or where no layer has experts, and skips the entry when it matches
    nothing; the file holds no tensor for it. Refused before as "matched no parameter". Kept when nothing else
    would be left to adapt (the refusal then names the entry)."""
    if not config.target_parameters:
        return config
    from lorakit.param_lora import matches_parameter

    keys = [f"{path}.{name}" for path, module in _base_modules(model).items() if path
            for name, _ in module.named_parameters(recurse=False)]
    kept = [t for t in config.target_parameters
            if t not in _PEFT_MOE_PARAMETERS or any(matches_parameter(key, [t]) for key in keys)]
    if kept == config.target_parameters or not (kept or config.target_modules):
        return config
    return config.replace(target_parameters=kept or None)


def _tied_partner_patterns(model: nn.Module, adapter_file: AdapterFile, config: LoraConfig) -> LoraConfig:
    """With ``ensure_weight_tying``, peft gives the head tied to a targeted embedding (or the reverse) the embedding's
    A and B (transposed), so the file's rank for it is the embedding's, while its scaling is computed from its own
    path's rank_pattern / alpha_pattern entries (``r`` and ``lora_alpha`` when none matches). A rank_pattern on the
    embedding alone thus gives the head a rank the config does not name (its LoRA was refused as "the config says
    4"). The partner gets pattern entries of its own, first (the first match wins): the file's rank, and the alpha
    that gives peft's scaling at that rank."""
    modules = _base_modules(model)
    ranks = {_strip(key)[: -len(".lora_A.weight")]: tensor.shape[0] for key, tensor in adapter_file.tensors.items()
             if key.endswith(".lora_A.weight") and tensor.dim() == 2}
    embeddings = {id(m.weight) for m in modules.values() if isinstance(m, nn.Embedding)}
    rank_pattern, alpha_pattern = {}, {}
    for path, rank in ranks.items():
        module = modules.get(path)
        if (isinstance(module, nn.Embedding) or id(getattr(module, "weight", None)) not in embeddings
                or rank == config.rank_for(path)):
            continue
        key = "^" + re.escape(path)  # peft's rule wraps a key as (.*\.)?(KEY)$: this one matches the whole path only
        peft_rank, alpha = config.rank_for(path), config.alpha_for(path)
        ratio = math.sqrt(rank / peft_rank) if config.variant in ("rslora", "rsdora") else rank / peft_rank
        rank_pattern[key], alpha_pattern[key] = rank, alpha * ratio
    if not rank_pattern:
        return config
    return config.replace(rank_pattern={**rank_pattern, **config.rank_pattern},
                          alpha_pattern={**alpha_pattern, **config.alpha_pattern})


def _tied_in_file(model: nn.Module, adapter_file: AdapterFile, config: LoraConfig) -> list[str]:
    """With ``ensure_weight_tying``: the paths of modules sharing one weight (an embedding and its tied head) that
    ``config`` adapts or copies each (``fitted_config`` reads both from the file); [] otherwise."""
    if not (isinstance(adapter_file.raw_config, dict) and adapter_file.raw_config.get("ensure_weight_tying") is True):
        return []
    modules = _base_modules(model)
    by_weight: dict[int, list[str]] = {}
    for path in {**find_targets(model, config), **find_modules_to_save(model, config)}:
        weight = getattr(modules[path], "weight", None)
        if isinstance(weight, torch.Tensor):
            by_weight.setdefault(id(weight), []).append(path)
    return next((sorted(paths) for paths in by_weight.values() if len(paths) > 1), [])


def _tied_partners(model: nn.Module, adapter_file: AdapterFile, names: list[str]) -> list[str]:
    """``modules_to_save`` plus the modules tied to a saved one whose copy the file holds: with ensure_weight_tying
    peft trains one copy of a tied embedding for the embedding and its head (it rewrites ["lm_head"] as the
    embedding) and saves it under both paths; lorakit loads each as a copy (equal values, so the same outputs)."""
    modules = _base_modules(model)
    keys = {_strip(key) for key in adapter_file.tensors}
    saved = [path for path in modules if path and saved_by(path, names)]
    partners = [other for path in saved if isinstance(getattr(modules[path], "weight", None), torch.Tensor)
                for other, module in modules.items()
                if other and other not in saved and getattr(module, "weight", None) is modules[path].weight
                and f"{other}.weight" in keys]
    return list(dict.fromkeys([*names, *partners]))


def _token_copies(model: nn.Module, adapter_file: AdapterFile, weights: bool = True) -> dict[str, TokenRows | None]:
    """peft's trainable tokens: ``{module path: its trained rows}`` for each embedding with a
    ``token_adapter.trainable_tokens_delta`` and each module whose weight is tied to it (peft ties the output head's
    rows to the embedding's); each loads as a whole copy of the module with those rows written into it. Checks
    indices and shapes; empty when the file has no trainable tokens. ``weights=False``: the paths only (values None)."""
    indices_spec = adapter_file.token_indices
    deltas = {_strip(k)[: -len(TOKEN_DELTA)]: t for k, t in adapter_file.tensors.items() if k.endswith(TOKEN_DELTA)}
    if not deltas and not indices_spec:
        return {}
    where = f"{adapter_file.folder}: {adapter_file.token_field}"
    if not deltas or not indices_spec:
        raise LorakitError(f"{where}: {CONFIG_NAME} and {WEIGHTS_NAME} disagree (one has trained token rows, the other "
                           f"not){(not deltas and _conversion_hint(adapter_file)) or '; save the adapter again with peft'}")
    base_modules = _base_modules(model)
    lora_paths = {_strip(key).split(".lora_", 1)[0] for key in adapter_file.tensors if ".lora_" in key}
    copies: dict[str, TokenRows | None] = {}
    for path, delta in deltas.items():
        module = base_modules.get(path)
        if not isinstance(module, (nn.Embedding, nn.Linear)):  # rows of an embedding, or of an output head (out, in)
            raise LorakitError(f"{where}: {PREFIX}{clipped(path)}{TOKEN_DELTA} names no embedding or output head of this "
                               "model")
        if isinstance(module, nn.Linear) and module.bias is not None:  # peft runs F.linear(x, W) without it
            raise LorakitError(f"{where}: {path} has a bias, which peft's trainable tokens leave out of the layer's "
                               "output; lorakit cannot repeat that: merge the adapter with peft (merge_and_unload) and "
                               "load the merged model")
        if isinstance(indices_spec, dict):
            names = [n for n in indices_spec if path == n or path.endswith("." + n)]
            if not names:
                raise LorakitError(f"{where} names {listed(indices_spec)}, not {path}")
            indices = indices_spec[names[0]]
        else:
            indices = indices_spec
        weight = module.weight
        if tuple(delta.shape) != (len(indices), weight.shape[1]) or max(indices) >= weight.shape[0]:
            resized = (f"; ids past its {weight.shape[0]} rows come from a resized vocabulary: resize the base "
                       f"(model.resize_token_embeddings(N), N above {max(indices)}: the size it was trained with) first"
                       if max(indices) >= weight.shape[0] else "")
            raise LorakitError(f"{where}: {path} has a delta of shape {shown(tuple(delta.shape))} for {len(indices)} token "
                               f"ids up to {max(indices)}; this model's {path} is {tuple(weight.shape)}{resized}")
        # the file's LoRA tensors say what is adapted: target_modules may name the embedding while peft left it out
        # (layers_to_transform keeps only modules with a layer index, so a file with token rows there is peft's own)
        if path in lora_paths:
            raise LorakitError(f"{where}: {path} is also a LoRA target; lorakit cannot put trained token rows and LoRA on "
                               "one embedding: merge the adapter with peft (merge_and_unload) and load the merged model")
        # the rows alone: the copy the load writes them into is the base's already (no second (vocab, dim) weight)
        trained = TokenRows(torch.tensor(indices), delta, tuple(weight.shape)) if weights else None
        # an embedding's rows are also those of every module sharing its weight (a tied head); a head's own rows are
        # its own: peft ties the head's token layer to the embedding's, never the reverse (rows trained on the head
        # alone of a tied model leave the embedding the base's). A tied head with a delta of its own in the file has
        # rows of its own: peft ties it only when both get the same ids, and saves one delta then; with other ids it
        # wraps each alone (the head's copies of the embedding's rows stay the base's), so the embedding's rows must
        # not land there (they did whenever the embedding's key came after the head's: safetensors' order is random)
        spread = isinstance(module, nn.Embedding)
        for other, tied in base_modules.items():
            if other == path or (other and spread and other not in deltas and getattr(tied, "weight", None) is weight):
                if other in lora_paths:
                    # (a module tied to the embedding: peft's merge_and_unload adds the rows and the LoRA into the
                    # one weight both share, so its merged model has other logits; no advice to merge it)
                    raise LorakitError(f"{where}: {other} is also a LoRA target; lorakit cannot put trained token rows "
                                       f"and LoRA on one module, and peft's merge_and_unload adds both into the weight "
                                       f"{other} shares with {path} (a model with other logits): run this adapter with "
                                       "peft (PeftModel.from_pretrained)")
                copies[other] = trained
    return copies


def _same_values(ours: torch.Tensor, saved: torch.Tensor) -> bool:
    """A base tensor peft saved beside the adapter is this model's, exactly or as its 16-bit rounding: peft writes it
    in the training dtype (float32), and the same base loaded in bfloat16 / float16 (CUDA's default) holds it rounded,
    as does a float32 model read from a folder that stores it in bfloat16 (an NF4 folder's embedding). A float32 model
    with float32 values must match exactly: a small trained change is still a change."""
    ours = ours.detach().cpu()
    if torch.equal(ours, saved.to(ours.dtype)) or torch.equal(ours.to(saved.dtype), saved):
        return True
    for narrow in (torch.bfloat16, torch.float16):  # ours holds 16-bit values: the saved copy rounded the same way
        held = ours.to(narrow)
        if torch.equal(held.to(ours.dtype), ours) and torch.equal(saved.to(narrow), held):
            return True
    return False


def _is_second_trained_copy(key: str, tensor: torch.Tensor, tensors: dict[str, torch.Tensor]) -> bool:
    """peft's save_embedding_layers beside a modules_to_save copy of that embedding / head also writes the wrapper's
    own state: ``<path>.modules_to_save.<name>``, the trained copy the file holds as ``<path>.<name>`` already. True
    when it is that tensor again (another one is left to refuse as unexpected)."""
    path, found, name = key.partition(".modules_to_save.")
    other = tensors.get(f"{PREFIX}{path}.{name}") if found else None
    return other is not None and torch.equal(other, tensor)


def _is_unchanged_bias(key: str, tensor: torch.Tensor, base_modules: dict[str, nn.Module], adapter_file: AdapterFile) -> bool:
    """A bias peft saved (``<path>.bias``, ``<path>.base_layer.bias`` on a target): True when it equals this model's;
    a trained one is refused by name (lorakit keeps base biases frozen)."""
    if not key.endswith(".bias"):
        return False
    path = key[: -len(".bias")].removesuffix(".base_layer")
    bias = getattr(base_modules.get(path), "bias", None)
    if not isinstance(bias, torch.Tensor) or bias.shape != tensor.shape:
        return False
    if _same_values(bias, tensor):
        return True
    raise LorakitError(f"{adapter_file.folder}: {PREFIX}{clipped(key)} is a trained bias (peft bias="
                       f"{shown(adapter_file.bias_mode)}); lorakit keeps base biases frozen and cannot apply it: merge the "
                       "adapter with peft (merge_and_unload) and load the merged model")


def _conversion_hint(adapter_file: AdapterFile) -> str:
    """Why a file of lora_A / lora_B weights alone lacks the tensors its config asks for (DoRA magnitudes, an
    embedding's LoRA, modules_to_save copies, trained token rows), or "" when it holds other tensors too.

    peft's ``save_pretrained(..., path_initial_model_for_weight_conversion=...)`` turns a PiSSA / OLoRA / CorDA adapter
    into a plain LoRA for the original base ([B, -B0] [A; A0]) and writes only the linear layers' lora_A / lora_B:
    the rest of the adapter is lost (peft's own load of the file then fails on a copy, or runs the embedding without
    its LoRA and DoRA with magnitudes re-made from the base). lorakit's refusal of a CorDA or pissa_niter adapter
    suggests that conversion, so the refusal of its output says what it dropped and what to load instead."""
    keys = adapter_file.tensors
    if not keys or not all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in keys):
        return ""
    return ("; the file holds only the lora_A / lora_B weights of linear layers, as peft's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) writes them: that conversion (PiSSA / OLoRA / CorDA to plain "
            "LoRA) drops DoRA magnitudes, LoRA on embeddings, modules_to_save copies and trained token rows, and peft's "
            "own load of the result runs without them too; load the adapter saved without the conversion (lorakit "
            "loads init_lora_weights 'pissa' and 'olora' on the original base itself, others on the base peft rewrote)")


def _unselected_hint(config: LoraConfig, keys: list[str], base_modules: dict[str, nn.Module]) -> str:
    """When every unexpected key is a LoRA tensor of a linear / embedding layer this model has, which the config's
    target_modules (with exclude_modules, layers_to_transform, modules_to_save) does not select (a config edited by
    hand, or copied from another run): say so, and what to change. peft's from_pretrained loads such a folder without
    those tensors (its adapter then runs without their update), so the file and the config must agree first.
    '' for any other key (another model's paths, peft's in-memory names)."""
    suffixes = [s for pair in _SUFFIXES.values() for s in dict.fromkeys(pair + (pair[0] + ".weight",))]
    paths = []
    for key in keys:
        key = _strip(key)
        path = next((key[: -len(s) - 1] for s in suffixes if key.endswith("." + s)), None)
        module = base_modules.get(path) if path else None
        if not (quant.is_linear_like(module) or isinstance(module, nn.Embedding)):
            return ""
        paths.append(path)
    others = [name for name in ("exclude_modules", "layers_to_transform", "modules_to_save")
              if getattr(config, name, None) not in (None, [], "")]
    targets = config.target_modules
    named = targets == "all-linear" or bool(targets) and all(_matches(path, targets) for path in paths)
    fix = (f"edit {' / '.join(others)} in {CONFIG_NAME} to keep them" if named and others else
           f"add {listed(sorted({path.rsplit('.', 1)[-1] for path in paths}))} to target_modules in {CONFIG_NAME}")
    which = f"target_modules {shown(config.target_modules)}" + (f" with {' / '.join(others)}" if others else "")
    return (f"; they are LoRA tensors of {listed(sorted(set(paths)))}, which {CONFIG_NAME} leaves out ({which}): the "
            f"weights and the config disagree (peft would load the adapter without them). If it was trained on them, "
            f"{fix}")


_IN_MEMORY_KEY = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save)"
                            r"\.(?!weight$)([^.]+)(\.weight)?$")


def _wrapped_hint(model: nn.Module, keys: list[str], base_modules: dict[str, nn.Module]) -> str:
    """When the keys name this model's modules under another root (saved from LlamaModel, loaded into
    LlamaForCausalLM, or the reverse), say which module to load into; or when they are peft's in-memory names."""
    named = next((m for m in map(_IN_MEMORY_KEY.search, keys) if m), None)
    if named:
        return (f"; they carry peft's adapter name {named.group(2)!r} (model.state_dict() names, not the file format): "
                "save the adapter with peft's save_pretrained, or with save_file(get_peft_model_state_dict(model), ...)")
    path = _strip(keys[0]).split(".lora_", 1)[0]
    inner = [p[: -len(path) - 1] for p in base_modules if p.endswith("." + path)]
    if len(inner) == 1:
        return (f"; they name modules of this model's {inner[0]!r}: pass that submodule "
                f"(lorakit.load_adapter(model.{inner[0]}, folder)) or load the base class the adapter was saved from")
    parts = path.split(".")
    for start in range(1, len(parts)):
        if ".".join(parts[start:]) in base_modules:
            return (f"; they were saved from a model that holds this one as {'.'.join(parts[:start])!r}: load that model "
                    "class (such as AutoModelForCausalLM) and the adapter into it")
    return ""


def _plain_form(model: nn.Module, plan: dict[tuple[str, str], torch.Tensor], config: LoraConfig,
                method: str) -> tuple[dict[tuple[str, str], torch.Tensor], LoraConfig]:
    """A pissa / olora / KaSA adapter as a plain LoRA of rank 2r on the original base: the same weights peft gets.

    peft made (A0, B0) from W (pissa: the top-r singular triplets; olora: the first r columns of Q and rows of R in
    W = Q R; KaSA: the r smallest singular triplets, which it drops), set the base to W - s B0 A0, and saved A, B for that base; ``PeftModel.from_pretrained`` repeats the
    init on the original W. W - s B0 A0 + s B A == W + s [B, -B0] [A; A0], so the base stays untouched (other
    adapters, ``disable_adapters`` and serving keep the real base). Embeddings keep their weights in peft, so
    theirs are padded with zeros to the doubled rank. Scaling is unchanged (``_doubled_rank``).
    """
    out = dict(plan)
    base_modules = _base_modules(model)
    for path, module in find_targets(model, config).items():
        lora_A, lora_B = plan[(path, "lora_A")], plan[(path, "lora_B")]  # (r, in), (out, r)
        rank, scale = config.rank_for(path), config.scaling_for(path)
        if isinstance(module, nn.Embedding):
            out[(path, "lora_A")] = torch.cat([lora_A, torch.zeros_like(lora_A)])
            out[(path, "lora_B")] = torch.cat([lora_B, torch.zeros_like(lora_B)], dim=1)
            continue
        weight = getattr(base_modules.get(path), "weight", None)
        tied = [other for other, m in base_modules.items() if other and other != path and isinstance(weight, torch.Tensor)
                and getattr(m, "weight", None) is weight]
        if tied:  # peft rewrote the one tensor both use: the embedding reads W - s B0 A0 too, which no LoRA on
            # this layer gives (peft's own merge_and_unload is off on tied weights as well)
            what = "KaSA's truncation" if method == "kasa" else f"init_lora_weights={method!r}"
            raise LorakitError(f"{path}: {what} rewrote its base weight, which {path} shares with {tied[0]} (tied "
                               f"weights), so peft changed {tied[0]} too; lorakit repeats the rewrite as a LoRA on "
                               f"{path} alone and cannot match that: run this adapter with peft (PeftModel.from_pretrained)")
        lora_A0, lora_B0 = _init_factors(path, quant.dense_weight(module, torch.float32).float(), rank, scale, method)
        out[(path, "lora_A")] = torch.cat([lora_A.float(), lora_A0])
        out[(path, "lora_B")] = torch.cat([lora_B.float(), -lora_B0], dim=1)
    return out, _doubled_rank(config)


def _init_factors(path: str, weight: torch.Tensor, rank: int, scale: float, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's starting ``(A0 (r, in), B0 (out, r))`` for ``weight (out, in)`` float32: the base it leaves is
    ``weight - scale * B0 @ A0``."""
    if rank > min(weight.shape):
        raise LorakitError(f"{path}: rank {rank} is above min{tuple(weight.shape)}; {method} cannot make that adapter")
    if method == "pissa":  # peft's pissa_init: sqrt(S / s) on both sides
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        root = (S[:rank] / scale).sqrt()
        return root.unsqueeze(1) * Vh[:rank], U[:, :rank] * root.unsqueeze(0)
    if method == "kasa":  # KaSA's truncation: the r smallest singular triplets leave the base (s B0 A0 of them)
        if rank >= min(weight.shape):
            raise LorakitError(f"{path}: KaSA's rank {rank} must be below min{tuple(weight.shape)} (peft refuses it too)")
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        return Vh[-rank:], U[:, -rank:] * (S[-rank:] / scale).unsqueeze(0)
    Q, R = torch.linalg.qr(weight)  # peft's olora_init
    return R[:rank], Q[:, :rank]


def _is_rewritten_base_copy(key: str, tensor: torch.Tensor, targets: dict[str, nn.Module], config: LoraConfig,
                            method: str) -> bool:
    """peft's ``save_embedding_layers`` copy (``<path>.base_layer.weight``; "auto" saves one for a target named
    lm_head, embed_tokens, ...) of a linear target whose base a pissa / olora / KaSA init rewrote: it holds the
    rewritten ``W - s B0 A0``, not this model's W, and peft's load writes it back over the base it rewrites the same
    way. lorakit runs the plain form on the original W (``_plain_form``), so a copy equal to that rewrite (to the
    file's rounding) changes nothing; any other copy is left to ``_is_unchanged_base_copy`` to refuse."""
    path = key[: -len(".base_layer.weight")] if key.endswith(".base_layer.weight") else None
    module = targets.get(path) if path else None
    if not isinstance(module, nn.Linear) or tuple(tensor.shape) != tuple(module.weight.shape):
        return False
    weight = module.weight.detach().float().cpu()
    lora_A0, lora_B0 = _init_factors(path, weight, config.rank_for(path), config.scaling_for(path), method)
    rewritten = weight - config.scaling_for(path) * lora_B0 @ lora_A0
    tolerance = max(8 * torch.finfo(tensor.dtype).eps, 1e-5) if tensor.is_floating_point() else 0.0
    return torch.allclose(tensor.float(), rewritten, rtol=tolerance, atol=tolerance * float(weight.abs().max()))


def _match_key(key: str, targets: dict[str, nn.Module], saved: dict[str, nn.Module]) -> tuple[str | None, str]:
    for attr, suffixes in _SUFFIXES.items():
        for suffix in dict.fromkeys(suffixes + (suffixes[0] + ".weight",)):
            if key.endswith("." + suffix):
                path = key[: -len(suffix) - 1]
                if path in targets:
                    return path, attr
    for path, module in saved.items():
        # only a tensor the module has: anything else under its path is an unexpected key, not a KeyError later
        if key.startswith(path + ".") and key[len(path) + 1:] in module.state_dict():
            return path, key[len(path) + 1:]
    return None, ""


def _is_unchanged_base_copy(key: str, tensor: torch.Tensor, base_modules: dict[str, nn.Module], folder: Path) -> bool:
    """A full copy of a base embedding / output head that PEFT saved (``save_embedding_layers``; as
    ``<path>.base_layer.weight`` when the module holds an adapter, ``.token_adapter.base_layer.weight`` beside trained
    token rows, ``.original_module.weight`` beside a modules_to_save copy, ``<path>.weight`` otherwise): True when it
    equals this model's weight. A copy that differs (a resized or retrained vocabulary) is refused by name."""
    path, _ = base_copy_path(key) or ("", "")
    module = base_modules.get(path)
    weight = getattr(module, "weight", None)
    if not isinstance(module, (nn.Embedding, nn.Linear)) or not isinstance(weight, torch.Tensor):
        return False
    path = f"{path}.weight"
    if weight.shape != tensor.shape:
        raise LorakitError(f"{folder}: {PREFIX}{key} is a full copy of {path} with shape {shown(tuple(tensor.shape))}, "
                           f"but this model's is {tuple(weight.shape)}; the adapter was trained on a vocabulary resized to "
                           f"{tensor.shape[0]} tokens: load it on the resized base it was saved with, or on a base holding no "
                           "other adapters (load_adapter resizes that one and takes these weights)")
    if not _same_values(weight, tensor):
        raise LorakitError(f"{folder}: {PREFIX}{key} is a full copy of {path} (peft's save_embedding_layers) that differs "
                           "from this model's; load the adapter on the base it was trained with, or re-save it from peft "
                           "with save_embedding_layers=False if the base is the same")
    return True


def load_adapter(model: nn.Module, folder: str | os.PathLike | AdapterFile, adapter: str = "default",
                 trainable: bool = False, check_base: bool = True, max_bytes: int | None = None,
                 follow_symlinks: bool = True, resize_vocabulary: bool = True) -> str:
    """Load a PEFT-format adapter folder into ``model`` (a plain base or one holding other adapters).

    ``folder`` may also be what ``read_adapter`` returned: then nothing is read again, so a caller that checked
    the files (a server) loads exactly what it checked. ``max_bytes`` and ``follow_symlinks``: see ``read_adapter``.
    The layers the adapter needs are injected, its tensors copied in, and it becomes the active adapter.
    Every check runs first; on any error the model is left exactly as it was. Returns the adapter's name.

    Folders saved by peft load with the logits ``peft.PeftModel.from_pretrained`` gives, including: pissa / olora
    inits (as a plain LoRA of rank 2r on the untouched base), ``trainable_token_indices`` (modules-to-save copies
    of the embedding and its tied head; for inference only), ``ensure_weight_tying``, SEQ_CLS's ``modules_to_save``,
    ``bias="all"/"lora_only"`` when the saved biases are the base's, and VeLoRA / MonteCLoRA / QA-LoRA / BD-LoRA /
    KaSA adapters as the plain LoRA each equals when it runs (``lorakit.peft_variants``; not with trainable=True), as
    are peft_type AdaLoRA, VeRA, LoHa and LoKr adapters (``lorakit.peft_types``); peft's TrainableTokens adapters
    load as their token rows alone (``lorakit.trainable_tokens``). Options lorakit cannot reproduce are
    refused in one line that names them. An adapter trained on a resized vocabulary (peft's whole saved embedding
    and head with more rows) resizes a base holding no adapters to it and takes the saved weights, as peft's load
    over a resized base does (a warning says so); ``resize_vocabulary=False`` refuses it instead (a shared base).
    """
    if not isinstance(folder, AdapterFile):
        _check_folder_argument(folder, "load_adapter", "the adapter's folder (or a Hub id in the local cache)")
    model = unwrap(model)  # torch.compile / DDP wrapper: loaded into the model inside it (see unwrap)
    if isinstance(folder, AdapterFile):
        adapter_file = folder
        if max_bytes is not None and adapter_file.size_bytes > max_bytes:
            raise LorakitError(f"{adapter_file.folder / WEIGHTS_NAME} is {adapter_file.size_bytes:,} bytes, over the "
                               f"limit of {max_bytes:,}")
    else:
        adapter_file = read_adapter(folder, max_bytes=max_bytes, follow_symlinks=follow_symlinks)
    if adapter in adapter_names(model):
        raise LorakitError(f"the model already has an adapter named {adapter!r}; pass another name or delete it first")
    if trainable and adapter_file.token_indices:  # the copies have no mask: training would change every row
        raise LorakitError(f"{adapter_file.folder}: {adapter_file.token_field} {shown(adapter_file.token_indices)} load as whole "
                           "copies of the embedding (and of the head tied to it), so trainable=True would train all their "
                           "rows, not only these tokens as peft does; load it with trainable=False to run it, or continue "
                           "its training with peft")
    from lorakit._regex_guard import check_regexes
    from lorakit.moe_legacy import convert_legacy_experts
    from lorakit.vlm_text import text_model_adapter

    # before any match on module names: a catastrophic pattern would hang here for good (re has no timeout)
    check_regexes(adapter_file.config, [p for p in _base_modules(model) if p], str(adapter_file.folder / CONFIG_NAME))
    adapter_file = text_model_adapter(model, adapter_file)  # a vision-language model's file on its text model
    adapter_file = convert_legacy_experts(model, adapter_file)  # transformers 4's per-expert LoRA -> fused experts
    adapter_file = peft_variants.to_plain_lora(model, adapter_file, trainable)  # VeLoRA, KaSA, ... as plain LoRA
    resized = None
    if resize_vocabulary and not adapter_names(model):  # other adapters may hold LoRA on the rows it would change
        from lorakit.resized_vocab import take_resized_vocabulary

        resized = take_resized_vocabulary(model, adapter_file)
    elif not resize_vocabulary:  # a shared base (lorakit serve's): the library's fixes below are not the user's
        _refuse_resized_vocabulary(model, adapter_file)
    try:
        _load_checked(model, adapter_file, adapter, trainable, check_base)
    except BaseException:
        if resized is not None:  # the model is left as it was: its own embedding and head back
            resized.undo(model)
        raise
    for line in resized.lines(adapter_file.folder) if resized else []:
        warnings.warn(line, stacklevel=2)
    return adapter


def _refuse_resized_vocabulary(model: nn.Module, adapter_file: AdapterFile) -> None:
    """Refuse, for a base that is not to be resized (``resize_vocabulary=False``: one many adapters share, as in
    ``lorakit serve``), an adapter whose saved embedding / head copies have more rows than the model's, saying
    what its user can do: serve the adapter merged into its base, which ``lorakit merge`` resizes."""
    from lorakit.resized_vocab import _saved_copies

    copies = _saved_copies(model, adapter_file.tensors, PREFIX)
    if copies:
        rows = max(tensor.shape[0] for tensor in copies.values())
        own = model.get_input_embeddings().weight.shape[0] if hasattr(model, "get_input_embeddings") else "fewer"
        raise LorakitError(f"{adapter_file.folder} was trained on a vocabulary resized to {rows} tokens (its saved "
                           f"{' and '.join(sorted(copies))}; this base has {own}), and a base shared by other adapters "
                           "is never resized for one of them: merge the adapter into the base it was trained on "
                           "(lorakit merge --model BASE --adapter ADAPTER --out MERGED, which resizes it) and serve "
                           "the merged model on its own (lorakit serve --model MERGED)")


def _load_checked(model: nn.Module, adapter_file: AdapterFile, adapter: str, trainable: bool, check_base: bool) -> None:
    """load_adapter's checks and load, once the base has the adapter's vocabulary."""
    plan = plan_load(model, adapter_file, check_base=check_base)
    config = fitted_config(model, adapter_file)
    tied = _tied_in_file(model, adapter_file, config) if trainable else []
    if tied:  # lorakit's two LoRAs (or copies) would each get their own gradients: training would untie them
        raise LorakitError(f"{adapter_file.folder}: with ensure_weight_tying peft trains one update shared by the tied "
                           f"{' and '.join(tied)}; lorakit loads them as separate ones (same outputs), so trainable=True "
                           "would train them apart; load it with trainable=False to run it, or continue its training "
                           "with peft")
    if adapter_file.base_rewrite:  # as peft's from_pretrained, which repeats the init on the original base
        try:
            plan, config = _plain_form(model, plan, config, adapter_file.base_rewrite)
        except LorakitError as error:  # which folder, as the other refusals say
            raise LorakitError(f"{adapter_file.folder}: {error}") from None
    inject(model, config, adapter=adapter, trainable=trainable)
    try:
        hosts = adapter_hosts(model)
        with torch.no_grad():
            for (path, attr), tensor in plan.items():
                host = hosts[path]
                if isinstance(host, ModulesToSave):
                    target = host.copies[adapter].state_dict()[attr]
                elif isinstance(host, ParamLora):
                    name, _, which = attr.rpartition(".")
                    target = getattr(host.adapters[adapter][name], which)
                else:
                    target = getattr(host.adapters[adapter], attr)
                if isinstance(tensor, TokenRows):  # trained token rows of a fresh copy of the base module
                    tensor.write(target)
                    continue
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    except BaseException:
        from lorakit.adapters import delete_adapter

        delete_adapter(model, adapter)
        raise
