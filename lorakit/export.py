"""Export a merged model: a Hugging Face folder (safetensors, config, tokenizer) and, optionally, a GGUF file.

The folder loads with ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` alone (no lorakit). It is
written into a temporary folder next to the target and renamed into place, so a crash never leaves half a model.

Casting the merged weights to 16 bits rounds them, and a small adapter update can drown in that rounding
(unsloth#2142 and friends). ``delta_survival`` measures it per merge: with W the base weight, D the adapter's
update and c() the cast, the exported model carries c(W + D) - c(W) where D was meant, and

    lost share = ||(c(W + D) - c(W)) - D|| / ||D||      (summed over every merged layer)

is reported; above ``LOSS_WARNING`` the command warns, and a cast that would overflow (float16) is refused.
A 4-bit (NF4) base is dequantized before merging: the adapter trained on exactly those weights, and the packed
buffers mean nothing to transformers or llama.cpp.

GGUF (llama.cpp / Ollama): one small table per family (``GGUF_ARCHS``: llama.cpp's architecture, tensor names,
q/k rule, norm offset, extra metadata, what llama.cpp cannot run). Llama (and Mistral, which llama.cpp runs as
llama) has its q/k rows permuted as llama.cpp's ``convert_hf_to_gguf.py`` does (its rotary embedding pairs
neighbouring dimensions; transformers pairs the two halves); Qwen2 (q/k/v biases), Qwen3 (q/k norms), Phi-3 (fused
qkv and gate|up), Gemma 2 and Gemma 3 (norms stored as 1 + w) use NEOX-style rotary, which pairs the halves too, so
their rows stay as they are. The tokenizer comes from the HF tokenizer (byte-level BPE as ``gpt2``, BPE with byte
fallback as ``llama``). Scaled rotary embeddings are written as llama.cpp's converter writes them
(``gguf_rope_scaling``, from transformers 5's ``rope_parameters`` or 4's ``rope_scaling``): Llama 3.1's llama3 as a
``rope_freqs`` tensor of per-frequency divisors (``llama3_rope_factors``); linear (``rope.scaling.type`` / ``.factor``)
and yarn (plus ``.original_context_length`` and the ``yarn_*`` keys the config sets) for llama / mistral / qwen2 /
qwen3, linear for Gemma 3's global layers; Phi-3's longrope as ``rope_factors_long`` / ``rope_factors_short`` with
``.original_context_length`` and ``.attn_factor`` (``GGUF_ROPE_TYPES``). Before anything is written, llama.cpp's rope
arithmetic on those keys (``llama_cpp_rope``: what its loader reads, its yarn attention factor, ggml's rope_yarn) is
held against transformers' own rope init; a config llama.cpp would run differently is refused (dynamic NTK, which
llama.cpp lacks; yarn's beta_fast / beta_slow / attention_factor / mscale away from what llama.cpp's graphs assume,
which the converter copies but llama.cpp's loader does not read for these families).
transformers' own GGUF loader (``modeling_gguf_pytorch_utils``) undoes exactly these
rewrites when it reads the file back, which is how tests/test_gguf_architectures.py checks each family.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lorakit._finite import all_finite
from lorakit._fs import atomic_path, replace_folder, temp_dir
from lorakit._progress import slow_work
from lorakit.errors import LorakitError

LOSS_WARNING = 0.25
# shards of a written model folder: huggingface_hub's default and the Hub's habit, and what lorakit quantize writes
# (transformers 5's save_pretrained alone writes up to 50GB files)
MAX_SHARD_SIZE = "5GB"
GGUF_TYPES = ("f16", "q8_0")


# -- how much of the update survives the cast -------------------------------------------------------------------
@dataclass
class DeltaReport:
    layers: int
    delta_norm: float
    error_norm: float
    dtype: torch.dtype
    overflow: list[str] | None = None  # merged weights with values beyond ``dtype``'s range (it would become inf)

    @property
    def lost_share(self) -> float:
        return min(1.0, self.error_norm / self.delta_norm) if self.delta_norm > 0 else 0.0

    def __str__(self) -> str:
        name = str(self.dtype).replace("torch.", "")
        return (f"{self.layers} merged weights; share of the adapter's update kept after the cast to {name}: "
                f"{100 * (1 - self.lost_share):.2f}% (relative error {100 * self.lost_share:.2f}%)")


def delta_survival(model: nn.Module, adapter: str, dtype: torch.dtype) -> DeltaReport:
    """Measure, before merging, how much of adapter ``adapter``'s update the merged weights keep in ``dtype``."""
    from lorakit.inject import lora_layers
    from lorakit.param_lora import param_hosts

    def pairs():  # (path, float32 base, float32 merged) of every weight the adapter changes
        for path, layer in lora_layers(model).items():
            if adapter in layer.adapters and adapter not in layer.merged:
                yield path, layer.linear_weight(torch.float32), layer.merged_candidate(adapter)
        for path, host in param_hosts(model).items():  # target_parameters: MoE expert stacks, routers
            if adapter in host.adapters and adapter not in host.merged:
                for name, merged in host.merged_candidates(adapter).items():
                    yield f"{path}.{name}", host.parameter(name).detach().float(), merged

    delta_sq = error_sq = 0.0
    count = 0
    overflow = []
    layers = sum(adapter in layer.adapters and adapter not in layer.merged for layer in lora_layers(model).values())
    layers += sum(len(host.adapters[adapter]) for host in param_hosts(model).values()  # its parameters' LoRAs
                  if adapter in host.adapters and adapter not in host.merged)
    for path, base, merged in slow_work(pairs(), f"measuring the cast to {str(dtype).replace('torch.', '')}",
                                        "weight", total=layers):
        delta = merged - base
        cast = merged.to(dtype)
        if not all_finite(cast):
            overflow.append(path)
        kept = cast.float() - base.to(dtype).float()
        delta_sq += float(delta.double().pow(2).sum())
        error_sq += float((kept - delta).double().pow(2).sum())
        count += 1
    return DeltaReport(count, delta_sq ** 0.5, error_sq ** 0.5, dtype, overflow)


def _refuse_overflow(model: nn.Module, report: DeltaReport) -> None:
    """Refuse, before merging, an export whose cast to ``report.dtype`` would turn weights into inf (float16's
    largest value is 65504): the folder would load and generate NaN."""
    name = str(report.dtype).replace("torch.", "")
    bad = report.overflow[0] if report.overflow else None
    if bad is None and report.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max
        bad = next((key for key, t in model.state_dict().items()
                    if t.is_floating_point() and t.numel() and t.abs().max().item() > limit), None)
    if bad is not None:
        raise LorakitError(f"merged weights of {bad} exceed the {name} range (largest {torch.finfo(report.dtype).max:.6g})"
                           f" and would be saved as inf; export with --dtype bf16 or fp32 (nothing was merged)")


# -- the merged Hugging Face folder -------------------------------------------------------------------------------
def _untie_if_embedding_merged(model: nn.Module, adapter: str) -> None:
    """A tied output head shares the embedding's tensor; merging into the embedding would change the head too,
    which the unmerged model never did. Give the head its own copy first (and say so in the config)."""
    from lorakit.layers import LORA_HOSTS, LoraEmbedding

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, LORA_HOSTS):  # LoRA on the head too (peft's ensure_weight_tying): its own base layer
        head = head.base_layer
    if head is None:
        return
    for module in model.modules():
        if isinstance(module, LoraEmbedding) and adapter in module.adapters and module.base_layer.weight is head.weight:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            model.config.tie_word_embeddings = False
            text_config = getattr(model.config, "get_text_config", None)
            if callable(text_config):
                text_config().tie_word_embeddings = False


def merge_model(model: nn.Module, adapter: str, dtype: torch.dtype,
                keep_float32: bool = True) -> tuple[nn.Module, DeltaReport]:
    """Merge ``adapter`` into ``model`` (float32 math) and unwrap every lorakit layer; ``write_folder`` casts to
    ``dtype``.

    A 4-bit (NF4) base is dequantized to float32 first: the adapter was trained on exactly those dequantized
    weights, so merging into them keeps the trained model (merging into the NF4 storage would re-quantize and lose
    part of the update, and leave packed tensors that transformers and llama.cpp cannot read). Without
    ``keep_float32`` each 4-bit layer under the adapter is merged on its own and kept in ``dtype`` at once (see
    ``_merge_quantized_layers``): the same bits, without the whole model in float32."""
    from lorakit.merge import merge_and_unload
    from lorakit.quant.quantize import dequantize

    report = delta_survival(model, adapter, dtype)
    _refuse_overflow(model, report)  # before anything changes
    if not keep_float32:
        _merge_quantized_layers(model, adapter, dtype)
    dequantize(model, torch.float32)
    _untie_if_embedding_merged(model, adapter)
    merge_and_unload(model, adapter)
    return model, report


def _merge_quantized_layers(model: nn.Module, adapter: str, dtype: torch.dtype) -> None:
    """Merge ``adapter`` into each 4-bit layer that holds it, one layer at a time: the float32 merged weight (the
    exact dequantized weight plus the update, ``merged_candidate``, (out, in)) is cast to ``dtype`` into a dense twin
    of the layer. Bit for bit what dequantizing the whole model to float32, merging and casting gives, with one
    layer in float32 at a time instead of the whole model (a 70B from NF4 to bf16: 140 GB of memory, not 280).
    A layer holding another merged adapter is left to ``dequantize``, which refuses it."""
    from lorakit import quant
    from lorakit.inject import lora_layers
    from lorakit.quant.quantize import _dense_module

    for path, layer in lora_layers(model).items():
        base = layer.base_layer
        if adapter not in layer.adapters or layer.merged or not quant.is_quantized(base):
            continue
        candidate = layer.merged_candidate(adapter)
        layer.base_layer = _dense_module(base, dtype, path)  # its values are overwritten by the merge
        layer.merge(adapter, candidate=candidate, keep_original=False)
        del base, candidate  # the packed layer and the float32 weight go before the next layer's


# A base folder's license and notices (Llama's LICENSE + USE_POLICY.md, Gemma's, Apache NOTICE files), carried
# into a merged or 4-bit folder: most of these licenses ask for a copy with every redistribution of a derivative
NOTICE_FILES = ("LICENSE*", "LICENCE*", "License*", "license*", "USE_POLICY*", "NOTICE*", "Notice*", "COPYING*")
NOTICE_MAX_BYTES = 4 << 20  # a license is kilobytes; a bigger file matching the names is not one

# What a command's previous output may hold (``fnmatch`` patterns): with --overwrite that folder is replaced whole,
# so anything else in it (a user's notes, other models, a .git) makes it refuse instead of deleting them
OUTPUT_FILES = {
    "model": ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
              "special_tokens_map.json", "added_tokens.json", "chat_template.*", "vocab.*", "merges.txt", "*.model",
              "*.gguf", "preprocessor_config.json", "processor_config.json", ".DS_Store", *NOTICE_FILES),
    "adapter": ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", ".DS_Store"),
}


def check_output_folder(out: str | os.PathLike, flag: str = "--out", overwrite: bool = False,
                        protected: dict[str, str | os.PathLike] | None = None, allow_empty: bool = False,
                        replaces: str | None = None) -> Path:
    """Refuse, before any work, an output folder that cannot be written or would destroy an input or a user's files.

    ``out`` may not exist yet (its nearest existing parent must be a writable folder); if it exists it must be a
    folder, and without ``overwrite`` it is refused (unless it is empty and ``allow_empty``). ``protected`` maps a
    description ("the adapter folder") to an input path that ``out`` may not be, contain, or sit inside.
    ``replaces`` ("model" / "adapter", see ``OUTPUT_FILES``) is for outputs written beside ``out`` and renamed onto
    it (``replace_folder``): with ``overwrite`` an existing one may only hold what such an output holds, and the
    current folder (or one above it), a mount point and a parent without write permission are refused. Returns
    ``out`` with ``~`` expanded and a symbolic link followed (the output goes where the link points; the link stays).
    """
    given = out
    if not str(out).strip():  # --out "" (an unset shell variable): Path("") is the current folder
        raise LorakitError(f"{flag} is empty; give the output folder's name, e.g. {flag} merged")
    out = Path(out).expanduser()
    from lorakit._fs import broken_link

    dangling = broken_link(out)  # a traceback (RuntimeError: Symlink loop) or "cannot write: Not a directory"
    if dangling:
        raise LorakitError(f"{flag} {given} is {dangling}; remove the link or give another {flag}")
    if out.is_symlink() and out.is_dir():
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise LorakitError(f"{flag} {given} is a file; give a folder")
    empty = out.is_dir() and not any(out.iterdir())
    if out.is_dir() and not overwrite and not (allow_empty and empty):
        others = _other_files(out, replaces) if replaces is not None else []
        if others:  # --overwrite would be refused too (below): say so now, not after a second try
            raise LorakitError(f"{flag} {given} already exists and holds what {_a(replaces)} {replaces} folder does not "
                               f"({_shown(others)}); choose another {flag} (a new or empty folder)")
        raise LorakitError(f"{flag} {given} already exists; choose another {flag} or pass --overwrite")
    resolved = out.resolve()
    for what, path in (protected or {}).items():
        source = Path(path).expanduser().resolve()
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
            raise LorakitError(f"{flag} {given} is, holds or sits inside {what} {path}; choose a folder outside it")
    swapped = replaces is not None and out.is_dir()  # this folder will be renamed away and replaced
    if swapped and Path.cwd().resolve().is_relative_to(resolved):
        raise LorakitError(f"{flag} {given} is the current folder (or holds it); give a new folder, e.g. {flag} merged")
    if swapped and os.path.ismount(out):
        raise LorakitError(f"{flag} {given} is a mount point, and lorakit writes a folder beside {flag} and renames it "
                           f"into place; give a folder inside it, e.g. {flag} {Path(str(given)) / 'out'}")
    if swapped and not empty:
        _refuse_other_files(out, given, flag, replaces)
    parent = out if out.exists() else out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LorakitError(f"{flag} {given}: {parent} is a file, not a folder; choose another {flag}")
    # a replaced folder is renamed away (which needs write permission on it) and the new one made beside it
    for place in ((out, out.parent) if swapped else (parent,)):
        if not os.access(place, os.W_OK | os.X_OK):
            if _read_only(place):  # root passes every permission check: a read-only mount is what refuses
                raise LorakitError(f"{flag} {given}: cannot write in {place} ({os.strerror(errno.EROFS)}); choose "
                                   f"another {flag}")
            raise LorakitError(f"{flag} {given}: no permission to write in {place}; choose another {flag}")
    return out


def _read_only(place: Path) -> bool:
    """Whether ``place`` is on a file system mounted read-only (a CD image, a container's read-only volume)."""
    try:
        return bool(os.statvfs(place).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows) or unreadable: call it a permission problem
        return False


def leftover_note(out: str | os.PathLike, flag: str = "--out") -> str | None:
    """A note naming the hidden folders beside ``out`` that an earlier run left when it was killed (out of memory,
    SIGKILL) before renaming its output into place (``temp_dir`` / ``replace_folder`` names), or None. They can
    hold gigabytes nobody sees in ``ls``; they are named, not deleted (another run may be writing one now)."""
    import glob

    out = Path(out).expanduser()
    if not out.parent.is_dir():
        return None
    found = sorted(p for p in out.parent.glob(f".{glob.escape(out.name)}.*")
                   if p.is_dir() and not p.is_symlink() and p.name.endswith((".tmp", ".old")))
    if not found:
        return None
    size = sum(f.stat().st_size for p in found for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    return (f"note: {', '.join(str(p) for p in found)} beside {flag} {'is' if len(found) == 1 else 'are'} left from an "
            f"earlier run that was stopped before it finished ({size / 2**20:,.1f} MiB); delete {'it' if len(found) == 1 else 'them'} "
            "to free the space")


def _other_files(out: Path, kind: str) -> list[str]:
    """The entries of ``out`` a ``kind`` output never holds (folders end in '/')."""
    import fnmatch

    patterns = OUTPUT_FILES[kind]
    return sorted(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in out.iterdir()
                  if p.is_dir() or not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in patterns))


def _a(kind: str) -> str:
    return "an" if kind == "adapter" else "a"


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _refuse_other_files(out: Path, given, flag: str, kind: str) -> None:
    """With --overwrite, ``out`` is swapped out whole: refuse when it holds entries a ``kind`` output never holds."""
    others = _other_files(out, kind)
    if others:
        raise LorakitError(f"{flag} {given} holds what {_a(kind)} {kind} folder does not ({_shown(others)}); "
                           f"--overwrite replaces the whole folder and would delete them: move them out or choose "
                           f"another {flag}")


def write_failure(out: Path, error: OSError) -> str:
    """One line for an output folder that could not be written or swapped into place (``replace_folder``)."""
    kept = "; the existing folder is unchanged" if out.exists() else ""
    busy = (f" ({out} is a mount point or in use: give a folder inside it, e.g. {out / 'out'})"
            if error.errno == errno.EBUSY else "")
    return f"cannot write {out}: {error.strerror or error}{busy}{kept}"


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def export_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The weights dtype of a written folder: torch.float32 / bfloat16 / float16, or a name ("bf16", "float16",
    "torch.float32") as transformers and the CLI take them. Anything else is one line, before any merge."""
    found = _DTYPES.get(dtype.lower().removeprefix("torch.")) if isinstance(dtype, str) else dtype
    if found not in (torch.float32, torch.bfloat16, torch.float16):
        raise LorakitError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16 (or 'fp32', 'bf16', "
                           f"'fp16'), got {dtype!r}")
    return found


def shard_size(value: int | str, flag: str = "max_shard_size") -> int:
    """``value`` ("5GB", "500MB", "20KB", or a number of bytes) as bytes; one line naming the flag otherwise."""
    from huggingface_hub.serialization._base import parse_size_to_int

    text = str(value).strip().upper().replace(" ", "")
    if text[-1:] in ("K", "M", "G", "T"):  # "5G" as "5GB"
        text += "B"
    try:
        size = int(text) if text.isdigit() else parse_size_to_int(text)
    except ValueError:
        size = None
    if isinstance(value, bool) or size is None or size < 1:
        raise LorakitError(f"{flag} {value!r} is not a size; give bytes or a number with KB, MB, GB or TB, e.g. 5GB")
    return size


def write_folder(model: nn.Module, tokenizer, out: str | os.PathLike, dtype: torch.dtype, overwrite: bool = False,
                 extra_files=None, max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
    """Save ``model`` (cast to ``dtype``) and ``tokenizer`` as a Hugging Face folder at ``out``, atomically.

    Weights above ``max_shard_size`` (bytes, or "5GB" / "500MB") are split into shards with a
    ``model.safetensors.index.json``, as ``lorakit quantize`` writes them.

    ``extra_files(tmp_folder)`` may write more files (the GGUF) into the folder before it is renamed into place.
    An existing empty ``out`` is used; a non-empty one needs ``overwrite`` and may hold only a model folder's
    files (see ``check_output_folder``), since it is replaced whole. Files get the usual permissions (safetensors
    writes its files 0600).
    """
    from lorakit._fs import publish_mode, safetensors_os_errors

    out = _checked_out(model, out, overwrite)
    max_shard_size = shard_size(max_shard_size)
    dtype = export_dtype(dtype)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(out)
    except OSError as error:
        raise LorakitError(f"cannot write {out}: {error.strerror or error}; choose another --out") from None
    try:
        if extra_files is not None:
            extra_files(tmp)
        cast_for_saving(model, dtype)
        for attr in ("lorakit_base_name", "lorakit_configs"):
            if hasattr(model, attr):
                delattr(model, attr)
        with safetensors_os_errors():  # a full disk: safetensors' own error type, made the OSError handled below
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in ("config.json", "tokenizer_config.json"):
            drop_missing_code(tmp / name)
        from lorakit.models.text_part import keep_loadable

        # Llama 3.2 Vision's text model: the folder's config, which transformers reads, not its text class's own
        keep_loadable(model, loaded_from(model), tmp / "config.json")
        copy_notices(model, tmp)
        for path in tmp.iterdir():
            publish_mode(path)
        replace_folder(tmp, out)  # an existing folder (--overwrite) is swapped out only once this one is whole
    except OSError as error:  # a full disk, a quota, a file system that went away: nothing half-written is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise LorakitError(write_failure(out, error)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def float32_kept(model: nn.Module, dtype: torch.dtype) -> re.Pattern | None:
    """The tensor names transformers keeps in float32 when it loads ``model``'s class in ``dtype`` (its
    ``_keep_in_fp32_modules_strict`` for float16 and bfloat16, ``_keep_in_fp32_modules`` for float16 only: DeepSeek's
    and GLM-4-MoE's router weight and ``e_score_correction_bias``), as the regex transformers matches names with;
    None when there are none."""
    plan_of = getattr(model, "_get_dtype_plan", None)  # transformers 5: the very plan from_pretrained follows
    if callable(plan_of):
        try:
            patterns = [name for name, kept in plan_of(dtype).items() if kept == torch.float32]
        except Exception:  # a model class whose plan cannot be built: nothing known to keep
            patterns = []
    else:  # transformers 4.x: the same two lists, the same rule
        patterns = list(getattr(model, "_keep_in_fp32_modules_strict", None) or []) if dtype in (
            torch.float16, torch.bfloat16) else []
        patterns += list(getattr(model, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else []
    patterns = [p for p in patterns if isinstance(p, str) and p]
    return re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns)) if patterns else None


def cast_for_saving(model: nn.Module, dtype: torch.dtype) -> None:
    """``model.to(dtype)``, except the tensors transformers keeps in float32 in that dtype (:func:`float32_kept`),
    which stay float32 (from a float32 model they keep every bit). A plain cast wrote DeepSeek-V3's router bias
    (values like 3.0050, 3.0077, 3.0009: they pick the experts) as bfloat16, all 3.0 there, and transformers upcast
    the rounded values on load: the merged folder routed tokens to other experts than the model it came from."""
    kept = float32_kept(model, dtype)
    saved = {}
    if kept is not None:
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and kept.search(name):
                saved[name] = tensor.detach().to(torch.float32, copy=True)
    model.to(dtype)
    for name, value in saved.items():
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if attribute in owner._parameters:
            owner._parameters[attribute].data = value
        else:
            owner._buffers[attribute] = value


def _checked_out(model: nn.Module, out: str | os.PathLike, overwrite: bool) -> Path:
    """``out`` checked for ``write_folder`` (see there), and never the folder ``model`` was loaded from nor one
    inside it: with ``overwrite=True`` that would replace the base by the merged model."""
    given = Path(out).expanduser()
    if given.is_dir() and any(given.iterdir()) and not overwrite:
        raise LorakitError(f"{given} already exists; choose another folder or pass overwrite=True (CLI: --overwrite)")
    source = loaded_from(model)
    return check_output_folder(out, flag="out", overwrite=True, allow_empty=True, replaces="model",
                               protected={"the folder the model was loaded from": source} if source else None)


def loaded_from(model: nn.Module) -> Path | None:
    """The local folder ``model`` was loaded from (its ``name_or_path``), or None (built in memory, a Hub name)."""
    source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return Path(source) if isinstance(source, (str, os.PathLike)) and str(source) and Path(source).is_dir() else None


def copy_notices(model: nn.Module, folder: Path) -> list[str]:
    """Copy the license and notice files (``NOTICE_FILES``) of the folder ``model`` was loaded from into ``folder``.

    The source is the model's ``name_or_path`` when it is a local folder (a Hub cache snapshot's links are read
    through); nothing happens for a model built in memory. Regular files up to ``NOTICE_MAX_BYTES`` only. Returns
    the names copied."""
    import fnmatch

    source = loaded_from(model)
    if source is None:
        return []
    copied = []
    for path in sorted(Path(source).iterdir()):
        if not any(fnmatch.fnmatchcase(path.name, pattern) for pattern in NOTICE_FILES) or (folder / path.name).exists():
            continue
        try:
            if path.is_file() and path.stat().st_size <= NOTICE_MAX_BYTES:
                shutil.copyfile(path, folder / path.name)
                copied.append(path.name)
        except OSError:  # unreadable (a dangling cache link): the model itself loaded, so its files are not this one
            continue
    return copied


def drop_missing_code(path: Path) -> None:
    """Remove the ``auto_map`` entries of a written config whose module file is not in the folder.

    A Hub folder's auto_map (Phi-3 mini: configuration_phi3.modeling_phi3 for a model_type transformers has built
    in) is copied into the saved config, but lorakit built the model with transformers' own class and the .py files
    stay behind: from_pretrained(out, trust_remote_code=True) then failed for a file the folder lacks. A model of
    custom code (loaded by the caller with trust_remote_code) has its files saved beside, so its entries stay, as do
    references to another repository ("org/repo--module.Class").
    """
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not isinstance(auto_map, dict):
        return

    def present(reference) -> bool:
        names = [reference] if isinstance(reference, str) else [r for r in reference or () if isinstance(r, str)]
        return all("--" in name or (path.parent / f"{name.rsplit('.', 1)[0]}.py").is_file() for name in names)

    kept = {key: value for key, value in auto_map.items() if present(value)}
    if kept == auto_map:
        return
    if kept:
        config["auto_map"] = kept
    else:
        del config["auto_map"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# -- GGUF ---------------------------------------------------------------------------------------------------------
_LLAMA_LAYERS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


@dataclass(frozen=True)
class GgufArch:
    """What one model family needs in a GGUF: llama.cpp's architecture name, its per-layer tensor names, and the
    rewrites llama.cpp's ``convert_hf_to_gguf.py`` applies to it (which transformers' GGUF reader undoes).

    ``permute_qk``: the family's llama.cpp rotary pairs neighbouring dimensions (``LLAMA_ROPE_TYPE_NORM``), so the
    q/k rows are interleaved by ``permute_rows``; NEOX-style families (Qwen) pair the halves as transformers does
    and keep the rows as they are. ``norm_offset`` is added to every RMSNorm weight (Gemma's norms multiply by
    ``1 + w``, llama.cpp's by ``w``). ``head_dim_key`` writes ``attention.key_length`` even when it equals
    hidden/heads. ``metadata(writer, config)`` writes the keys only this family has; ``refuse(config)`` returns why
    a config cannot be exported faithfully (or None).
    """

    arch: str
    layers: dict[str, str]
    permute_qk: bool = False
    norm_offset: float = 0.0
    head_dim_key: bool = False
    rope_section: str | None = None  # rope_parameters holds one dict per layer type: this one is llama.cpp's main rope
    metadata: Callable[[Any, Any], None] | None = None
    refuse: Callable[[Any], str | None] | None = None


def _qwen2_refuse(config) -> str | None:
    # llama.cpp's qwen2 graph has no sliding window: a config that uses one would attend differently past it
    if getattr(config, "use_sliding_window", False):
        return "use_sliding_window=True has no llama.cpp equivalent"
    return None


def _phi3_refuse(config) -> str | None:
    rope = getattr(config, "rope_parameters", None)
    factor = _config_value(config, "partial_rotary_factor", (rope or {}).get("partial_rotary_factor", 1.0))
    if factor != 1.0:  # llama.cpp would take it from rope.dimension_count; transformers' reader cannot check that
        return f"partial_rotary_factor={factor} is not supported yet (only 1.0)"
    return None


def _phi3_metadata(writer, config) -> None:
    # llama.cpp's phi3 graph reads the window (convert_hf_to_gguf.py Phi3MiniModel writes it when the config has one)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))


_GEMMA_LAYERS = {**_LLAMA_LAYERS, "post_attention_layernorm": "post_attention_norm",
                 "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def _gemma2_refuse(config) -> str | None:
    n_layers = config.num_hidden_layers
    head_dim = _config_value(config, "head_dim", config.hidden_size // config.num_attention_heads)
    # llama.cpp's gemma2 graph scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B (46 layers)
    expected = config.hidden_size // config.num_attention_heads if n_layers == 46 else head_dim
    if _config_value(config, "query_pre_attn_scalar", expected) != expected:
        return f"query_pre_attn_scalar={config.query_pre_attn_scalar} but llama.cpp scales queries by {expected}"
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if list(getattr(config, "layer_types", None) or alternating) != alternating:
        return "layer_types other than sliding/full alternation (llama.cpp hard-codes it)"
    if _config_value(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        return f"hidden_activation={config.hidden_activation!r} (llama.cpp uses tanh-approximated GELU)"
    return None


def _gemma2_metadata(writer, config) -> None:
    # what convert_hf_to_gguf.py's Gemma2Model writes beyond the common keys
    if getattr(config, "attn_logit_softcapping", None) is not None:
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if getattr(config, "final_logit_softcapping", None) is not None:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))


def _gemma3_refuse(config) -> str | None:
    """llama.cpp's gemma3 graph hard-codes what a Gemma 3 text model may vary in its config (llama-model.cpp):
    every 6th layer global, sliding layers' rope base 10000, no soft-capping, queries scaled by 1/sqrt(head_dim)
    (by 1/sqrt(hidden/heads) for the 27B, 62 layers)."""
    n_layers, head_dim = config.num_hidden_layers, config.head_dim
    expected = config.hidden_size // config.num_attention_heads if n_layers == 62 else head_dim
    if config.query_pre_attn_scalar != expected:
        return f"query_pre_attn_scalar={config.query_pre_attn_scalar} but llama.cpp scales queries by {expected}"
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]
    if list(config.layer_types) != pattern:
        return "layer_types other than five sliding layers then one global (llama.cpp hard-codes it)"
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention") or {}
    if local.get("rope_type", "default") != "default" or local.get("rope_theta", 10000.0) != 10000.0:
        return f"sliding-layer rope {local} (llama.cpp hard-codes default rope with base 10000)"
    if config.attn_logit_softcapping is not None or config.final_logit_softcapping is not None:
        return "logit soft-capping (llama.cpp's gemma3 graph has none)"
    if config.hidden_activation != "gelu_pytorch_tanh":
        return f"hidden_activation={config.hidden_activation!r} (llama.cpp uses tanh-approximated GELU)"
    return None


def _gemma3_metadata(writer, config) -> None:
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))


GGUF_ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("llama", _LLAMA_LAYERS, permute_qk=True),
    "mistral": GgufArch("llama", _LLAMA_LAYERS, permute_qk=True),  # llama.cpp runs Mistral as llama
    "qwen2": GgufArch("qwen2", _LLAMA_LAYERS, refuse=_qwen2_refuse),  # q/k/v biases ride along as .bias
    "qwen3": GgufArch("qwen3", {**_LLAMA_LAYERS, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
                      refuse=_qwen2_refuse),
    # fused q|k|v and gate|up projections, kept fused as llama.cpp's attn_qkv and ffn_up; NEOX rotary: no permutation
    "phi3": GgufArch("phi3", {**_LLAMA_LAYERS, "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},
                     metadata=_phi3_metadata, refuse=_phi3_refuse),
    # norms stored as 1 + w (transformers' reader subtracts 1 from every *norm.weight); the sqrt(hidden) embedding
    # scale is applied by llama.cpp at run time, so embeddings are written as they are
    "gemma2": GgufArch("gemma2", _GEMMA_LAYERS, norm_offset=1.0, head_dim_key=True, metadata=_gemma2_metadata,
                       refuse=_gemma2_refuse),
    # Gemma 3's text model (the multimodal "gemma3" checkpoint nests it under language_model: not this table);
    # q/k norms are RMSNorms with 1 + w too, and the reader's "- 1" covers them
    "gemma3_text": GgufArch("gemma3", {**_GEMMA_LAYERS, "self_attn.q_norm": "attn_q_norm",
                                       "self_attn.k_norm": "attn_k_norm"},
                            norm_offset=1.0, head_dim_key=True, rope_section="full_attention",
                            metadata=_gemma3_metadata, refuse=_gemma3_refuse),
}


def _rope(config, arch: GgufArch) -> dict:
    """The rope parameters llama.cpp's main rope takes (transformers 5 ``rope_parameters``, or 4's ``rope_scaling``)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if arch.rope_section is not None and isinstance(rope, dict):
        rope = rope.get(arch.rope_section) or {}
    return rope if isinstance(rope, dict) else {}


def _rope_type(rope: dict) -> str | None:
    return rope.get("rope_type", rope.get("type", "default"))


def llama3_rope_factors(config) -> np.ndarray:
    """Llama 3.1's rotary scaling as llama.cpp takes it: one factor per rotary frequency (the ``rope_freqs.weight``
    tensor llama.cpp's converter writes), by which its graph divides that frequency.

    transformers' llama3 init keeps the high frequencies (wavelength under original_max_position_embeddings /
    high_freq_factor), divides the low ones (wavelength over original / low_freq_factor) by ``factor`` and blends the
    band between; the factor here is the default inverse frequency over the llama3 one, so llama.cpp's
    ``theta_i = pos * base^(-2i/d) / factor_i`` is transformers' angle. Returns float32, shape (head_dim // 2,).
    """
    rope = _rope(config, GGUF_ARCHS["llama"])
    head_dim = _config_value(config, "head_dim", config.hidden_size // config.num_attention_heads)
    base = float(_config_value(config, "rope_theta", rope.get("rope_theta", 10000.0)))
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    # transformers falls back to the model's context when the pretraining one is not given
    original = float(rope.get("original_max_position_embeddings") or config.max_position_embeddings)
    if low >= high:
        raise LorakitError(f"GGUF export: llama3 rope_scaling needs low_freq_factor < high_freq_factor, got {low} and {high}")
    # the frequencies and wavelengths in float32, as both transformers and llama.cpp compute them, so a wavelength
    # on a band's edge lands in the band transformers puts it in
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / np.power(np.float32(base), exponents, dtype=np.float32)
    wavelength = (np.float32(2 * np.pi) / inv_freq).astype(np.float64)
    blend = (original / wavelength - low) / (high - low)  # 0 at the low band's edge, 1 at the high one's
    factors = 1.0 / ((1.0 - blend) / factor + blend)
    factors = np.where(wavelength < original / high, 1.0, np.where(wavelength > original / low, factor, factors))
    return factors.astype(np.float32)


# which scaled rotary types each llama.cpp graph takes, as convert_hf_to_gguf.py writes them: its generic TextModel
# writes linear and yarn (llama, qwen2, qwen3, and gemma3's global layers), LlamaModel adds llama3's rope_freqs, and
# Phi3MiniModel writes longrope's two factor tensors and nothing else; Gemma2Model writes no scaling at all
GGUF_ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "llama": ("linear", "yarn", "llama3"), "qwen2": ("linear", "yarn"), "qwen3": ("linear", "yarn"),
    "phi3": ("longrope",), "gemma2": (), "gemma3": ("linear",),
}
# the yarn keys the converter copies from the config (llama.cpp's loader reads none of them for these graphs)
_YARN_OPTIONAL = (("extrapolation_factor", "yarn_ext_factor"), ("attention_factor", "yarn_attn_factor"),
                  ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"))


def _head_dim(config) -> int:
    return int(_config_value(config, "head_dim", config.hidden_size // config.num_attention_heads))


def _original_context(config, rope: dict) -> int:
    """The pretraining context a yarn or longrope config scales from, as transformers takes it (the rope dict's, then
    the config's own attribute (Phi-3), then max_position_embeddings)."""
    value = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    return int(value or config.max_position_embeddings)


def gguf_rope_scaling(config, arch: GgufArch) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The rotary-scaling metadata and tensors llama.cpp's ``convert_hf_to_gguf.py`` writes for ``config``.

    Returns ``(kv, tensors)``: kv maps full GGUF keys (``{arch}.rope.scaling.*``) to values (str for ``type``, int for
    ``original_context_length``, float otherwise); tensors maps names to float32 arrays of shape (head_dim // 2,).
    The rope parameters come from transformers 5's ``rope_parameters`` or 4's ``rope_scaling`` (``type`` or
    ``rope_type``), as the converter reads either:

    * linear: ``type`` "linear" and ``factor``;
    * yarn: ``type`` "yarn", ``factor``, ``original_context_length`` (the converter requires it in the config;
      transformers falls back to max_position_embeddings, and so does this), and ``yarn_ext_factor`` /
      ``yarn_attn_factor`` / ``yarn_beta_fast`` / ``yarn_beta_slow`` copied only where the config sets
      ``extrapolation_factor`` / ``attention_factor`` / ``beta_fast`` / ``beta_slow``; never ``yarn_log_multiplier``;
    * llama3: no key, a ``rope_freqs.weight`` tensor (``llama3_rope_factors``);
    * longrope (phi3 only): ``original_context_length``, ``attn_factor`` = sqrt(1 + ln(s) / ln(original)) with
      s = max_position_embeddings / original (1 when s <= 1), and ``rope_factors_long.weight`` /
      ``rope_factors_short.weight`` (the config's long_factor / short_factor); no ``type`` key, as the converter.
    """
    rope = _rope(config, arch)
    rope_type = _rope_type(rope)
    prefix = f"{arch.arch}.rope.scaling"
    kv: dict[str, Any] = {}
    tensors: dict[str, np.ndarray] = {}
    if rope_type == "linear" and rope.get("factor") is not None:
        kv[f"{prefix}.type"] = "linear"
        kv[f"{prefix}.factor"] = float(rope["factor"])
    elif rope_type == "yarn" and rope.get("factor") is not None:
        kv[f"{prefix}.type"] = "yarn"
        kv[f"{prefix}.factor"] = float(rope["factor"])
        kv[f"{prefix}.original_context_length"] = _original_context(config, rope)
        for name, key in _YARN_OPTIONAL:
            value = rope.get(name, rope.get("attn_factor")) if name == "attention_factor" else rope.get(name)
            if value is not None:
                kv[f"{prefix}.{key}"] = float(value)
    elif rope_type == "llama3":
        tensors["rope_freqs.weight"] = llama3_rope_factors(config)
    elif rope_type == "longrope" and rope.get("long_factor"):
        original = _original_context(config, rope)
        kv[f"{prefix}.original_context_length"] = original
        scale = config.max_position_embeddings / original
        kv[f"{prefix}.attn_factor"] = float(np.sqrt(1 + np.log(scale) / np.log(original))) if scale > 1.0 else 1.0
        tensors["rope_factors_long.weight"] = np.asarray(rope["long_factor"], dtype=np.float32)
        tensors["rope_factors_short.weight"] = np.asarray(rope["short_factor"], dtype=np.float32)
    return kv, tensors


def _write_rope_scaling(writer, kv: dict[str, Any]) -> None:
    # the value types GGUFWriter's add_rope_scaling_* methods use (type: string, context: uint32, the rest: float32)
    for key, value in kv.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif key.endswith(".original_context_length"):
            writer.add_uint32(key, int(value))
        else:
            writer.add_float32(key, float(value))


def llama_cpp_rope(kv: dict[str, Any], tensors: dict[str, np.ndarray], arch: str, n_rot: int,
                   n_ctx: int | None = None) -> tuple[np.ndarray, float]:
    """What llama.cpp's rotary embedding does for a GGUF with metadata ``kv`` and rope tensors ``tensors``: the
    inverse frequencies (position p of pair i turns by p * inv_freq[i]; float64, shape (n_rot // 2,)) and the factor
    on cos/sin (transformers' ``attention_scaling``), at context size ``n_ctx`` (default: the file's context).

    It follows llama.cpp: the loader (llama-model.cpp) reads ``rope.freq_base``, ``rope.scaling.type`` (default
    "linear"), ``.factor`` (freq_scale = 1 / factor; none: 1), ``.original_context_length`` (default: the context
    length) and ``.attn_factor`` (default 1), and for the llama / qwen2 / qwen3 / phi3 / gemma graphs none of the
    ``yarn_*`` keys, so yarn runs with ext_factor 1, beta_fast 32, beta_slow 1; the context (llama-context.cpp) sets
    yarn's cos/sin factor to 0.1 * ln(factor) + 1 (get_mscale, after cancelling the one ggml's kernel multiplies in),
    times attn_factor; ggml's rope_yarn mixes freq_scale * theta and theta by the ramp between floor/ceil of the
    correction dims; ``rope_freqs`` divides each frequency; phi3 divides by ``rope_factors_long`` when the context
    exceeds the original one, else by ``rope_factors_short``.
    """
    n_ctx_train = int(kv[f"{arch}.context_length"])
    n_ctx = n_ctx_train if n_ctx is None else n_ctx
    base = float(kv.get(f"{arch}.rope.freq_base", 10000.0))
    scaling = kv.get(f"{arch}.rope.scaling.type", "linear")
    factor = float(kv.get(f"{arch}.rope.scaling.factor", 0.0))
    freq_scale = 1.0 if factor == 0.0 or scaling == "none" else 1.0 / factor
    n_orig = int(kv.get(f"{arch}.rope.scaling.original_context_length", n_ctx_train))
    attn_factor = float(kv.get(f"{arch}.rope.scaling.attn_factor", 1.0))
    pairs = np.arange(n_rot // 2, dtype=np.float64)
    inv_freq = base ** (-2.0 * pairs / n_rot)
    if "rope_freqs.weight" in tensors:
        inv_freq = inv_freq / tensors["rope_freqs.weight"].astype(np.float64)
    if "rope_factors_long.weight" in tensors:
        chosen = "rope_factors_long.weight" if n_ctx > n_orig else "rope_factors_short.weight"
        inv_freq = inv_freq / tensors[chosen].astype(np.float64)
    if scaling != "yarn":  # ext_factor 0: theta = freq_scale * theta, cos/sin times attn_factor alone
        return inv_freq * freq_scale, attn_factor

    def corr_dim(n_rotations: float) -> np.float32:  # ggml_rope_yarn_corr_dim, in float32 as ggml computes it
        f32 = np.float32
        return f32(n_rot) * np.log(f32(n_orig) / (f32(n_rotations) * f32(2 * np.pi))) / (f32(2) * np.log(f32(base)))

    low = max(0.0, float(np.floor(corr_dim(32.0))))
    high = min(n_rot - 1.0, float(np.ceil(corr_dim(1.0))))
    ramp = 1.0 - np.clip((pairs - low) / max(0.001, high - low), 0.0, 1.0)  # rope_yarn_ramp, times ext_factor 1
    mscale = 1.0 if factor <= 1.0 else 0.1 * np.log(1.0 / freq_scale) + 1.0
    return inv_freq * (freq_scale * (1.0 - ramp) + ramp), float(mscale * attn_factor)


def _transformers_rope(config, arch: GgufArch, rope_type: str, long: bool = False) -> tuple[np.ndarray, float]:
    """transformers' own inverse frequencies and cos/sin factor for this config (its ``ROPE_INIT_FUNCTIONS``);
    ``long``: longrope's set for sequences past the original context."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs: dict[str, Any] = {"seq_len": _original_context(config, _rope(config, arch)) + 1} if long else {}
    if arch.rope_section is not None:
        kwargs["layer_type"] = arch.rope_section
    try:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)
    except TypeError:  # transformers 4: no layer_type (one rope_scaling, the global layers')
        kwargs.pop("layer_type", None)
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)
    return inv_freq.double().numpy(), float(scaling)


def _rope_mismatch(config, arch: GgufArch, rope_type: str) -> str | None:
    """Why llama.cpp would rotate differently from transformers with the metadata ``gguf_rope_scaling`` writes (its
    frequencies or cos/sin factor off by more than float32 rounding), or None. Catches what the converter copies but
    llama.cpp ignores (yarn's beta_fast / beta_slow / attention_factor / mscale, truncate=False), and config fields
    that transformers reads differently (an explicit longrope factor)."""
    kv, tensors = gguf_rope_scaling(config, arch)
    rope = _rope(config, arch)
    kv[f"{arch.arch}.context_length"] = int(config.max_position_embeddings)
    kv[f"{arch.arch}.rope.freq_base"] = float(_config_value(config, "rope_theta", rope.get("rope_theta", 10000.0)))
    original = _original_context(config, rope)
    for long in ((False, True) if rope_type == "longrope" else (False,)):  # longrope: both factor sets
        n_ctx = original + 1 if long else original
        ours, our_scale = llama_cpp_rope(kv, tensors, arch.arch, _head_dim(config), n_ctx=n_ctx)
        theirs, their_scale = _transformers_rope(config, arch, rope_type, long)
        error = float(np.max(np.abs(ours / theirs - 1.0))) if ours.shape == theirs.shape else float("inf")
        if error > 1e-5 or abs(our_scale - their_scale) > 1e-6 * their_scale:
            return (f"llama.cpp would run this {rope_type} rope differently from transformers (frequencies off by up "
                    f"to {100 * error:.3g}%, cos/sin factor {our_scale:.6g} vs {their_scale:.6g}): llama.cpp's "
                    f"{arch.arch} graph reads only the scaling factor, original context and attn_factor (yarn: "
                    "beta_fast 32, beta_slow 1, attention factor 0.1*ln(factor)+1)")
    return None


def _refuse_rope(config, arch: GgufArch) -> str | None:
    """Why the config's rotary scaling cannot be written so that llama.cpp runs it as transformers does, or None."""
    rope = _rope(config, arch)
    rope_type = _rope_type(rope)
    if rope_type in ("default", None):
        return None
    if rope_type == "dynamic":  # transformers grows the base past max_position_embeddings; llama.cpp has no such rope
        return (f"rope type 'dynamic' (dynamic NTK) has no llama.cpp equivalent: within max_position_embeddings "
                f"({config.max_position_embeddings} tokens) it equals default rope, which llama.cpp's converter writes "
                "instead and which drifts from transformers past it; to export that, set the base's rope_type to "
                "'default' (config.json / model.config.rope_parameters) and export again")
    supported = GGUF_ROPE_TYPES.get(arch.arch, ())
    if rope_type not in supported:
        return (f"rope type {rope_type!r} is not supported yet on llama.cpp's {arch.arch} graph (its converter writes "
                f"{', '.join(('default',) + supported)})")
    return _rope_mismatch(config, arch, rope_type)


def gguf_arch(config) -> GgufArch:
    """The export table for ``config``'s family; one line naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    arch = GGUF_ARCHS.get(model_type)
    if arch is None:
        raise LorakitError(f"GGUF export supports Llama-architecture models (llama, mistral) and "
                           f"{', '.join(t for t in GGUF_ARCHS if t not in ('llama', 'mistral'))}; this model is "
                           f"{model_type!r}: export the Hugging Face folder and convert it with llama.cpp's convert_hf_to_gguf.py")
    reason = arch.refuse(config) if arch.refuse is not None else None
    if reason:
        raise LorakitError(f"GGUF export of this {model_type} model: {reason}; export the Hugging Face folder and "
                           "convert it with llama.cpp's convert_hf_to_gguf.py")
    # scaled rotary embeddings: what llama.cpp's converter writes for this family, and only where llama.cpp then
    # turns the same frequencies transformers does (checked numerically: _rope_mismatch)
    reason = _refuse_rope(config, arch)
    if reason:
        raise LorakitError(f"GGUF export of this {model_type} model: {reason}; the Hugging Face folder runs it as "
                           "trained (export without GGUF)")
    return arch


def permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (``convert_hf_to_gguf.py`` ``LlamaModel.permute``): within each head, rows
    ``[x0..x(d/2-1), y0..y(d/2-1)]`` (transformers' rotate-half pairs) become ``[x0, y0, x1, y1, ...]``.

    weight: (n_head * head_dim, ...) -> the same shape.
    """
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _config_value(config, name: str, default=None):
    value = getattr(config, name, None)
    return default if value is None else value


def gguf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under llama.cpp's names (float32, rewritten as its family's ``GgufArch`` says).
    Refuses families without a table."""
    config = model.config
    arch = gguf_arch(config)
    n_head = config.num_attention_heads
    n_kv = _config_value(config, "num_key_value_heads", n_head)
    out: dict[str, torch.Tensor] = {}
    state = _dense_state(model)
    tied = "lm_head.weight" not in state or (
        getattr(config, "tie_word_embeddings", False) and torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]))
    unsupported = f"this {config.model_type} variant is not supported"
    # rope_freqs (llama3) or rope_factors_long / _short (longrope): shared by every layer's rope (1-D: stay float32)
    for name, factors in gguf_rope_scaling(config, arch)[1].items():
        out[name] = torch.from_numpy(factors)
    for key, tensor in state.items():
        if key == "model.embed_tokens.weight":
            out["token_embd.weight"] = tensor
        elif key == "model.norm.weight":
            out["output_norm.weight"] = tensor + arch.norm_offset if arch.norm_offset else tensor
        elif key == "lm_head.weight":
            if not tied:  # llama.cpp uses token_embd for the head when output.weight is absent
                out["output.weight"] = tensor
        elif key.startswith("model.layers."):
            _, _, index, rest = key.split(".", 3)
            module, _, kind = rest.rpartition(".")
            name = arch.layers.get(module)
            if name is None or kind not in ("weight", "bias"):
                raise LorakitError(f"GGUF export: no llama.cpp name for tensor {key}; {unsupported}")
            array = tensor.numpy()
            if arch.permute_qk and name == "attn_q":
                array = permute_rows(array, n_head)
            elif arch.permute_qk and name == "attn_k":
                array = permute_rows(array, n_kv)
            if arch.norm_offset and name.endswith("norm"):
                array = array + np.float32(arch.norm_offset)
            out[f"blk.{index}.{name}.{kind}"] = torch.from_numpy(np.ascontiguousarray(array))
        elif "rotary_emb" in key:
            continue
        else:
            raise LorakitError(f"GGUF export: no llama.cpp name for tensor {key}; {unsupported}")
    return out


def _dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as float32 on the CPU, an NF4 layer's as its dequantized ``weight`` (and ``bias``)
    instead of its packed buffers; refuses a model that still carries lorakit adapters (they must be merged)."""
    from lorakit.inject import adapter_hosts
    from lorakit.quant import QuantizedLinear

    hosts = adapter_hosts(model)
    if hosts:
        raise LorakitError(f"the model still has lorakit adapters (e.g. on {next(iter(hosts))!r}); a GGUF holds a plain "
                           "model: merge them first (lorakit.merge_and_unload(model)), or use lorakit.export.export_merged")
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in quantized:  # packed buffers: the layer's dense weight instead, once
            layer = quantized[owner]
            if f"{owner}.weight" not in state:
                state[f"{owner}.weight"] = layer.dequantize(torch.float32).cpu()
                if layer.bias is not None:
                    state[f"{owner}.bias"] = layer.bias.detach().float().cpu()
            continue
        state[key] = value.detach().float().cpu()
    return state


def check_gguf_tokenizer(tokenizer, vocab_size: int) -> dict:
    """The tokenizer.json spec of a tokenizer GGUF export can write, or one line saying why not and what to do.

    ``export_merged`` asks this before merging: a Unigram / WordPiece tokenizer or one with tokens past the
    embedding's rows was refused only once the merge (minutes on a large model on a CPU) was done, and the
    Hugging Face folder asked for beside the GGUF was not written either."""
    instead = ("; merge without --format gguf (the Hugging Face folder alone; in Python, gguf_type=None) and convert "
               "that folder with llama.cpp's convert_hf_to_gguf.py")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LorakitError(f"GGUF export needs a fast (tokenizer.json) tokenizer{instead}")
    spec = json.loads(backend.to_str())
    model_spec = spec.get("model", {})
    if model_spec.get("type") != "BPE":
        raise LorakitError(f"GGUF export supports BPE tokenizers; this one is {model_spec.get('type')!r}{instead}")
    if len(tokenizer) > vocab_size:
        # llama.cpp's vocabulary must fit the embedding: a token past its rows has no embedding to read
        raise LorakitError(f"GGUF export: the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                           f"{vocab_size} rows (tokens added to the tokenizer without resizing the model); resize the "
                           "base to the tokenizer first (model.resize_token_embeddings(len(tokenizer)), then "
                           "save_pretrained), or merge without --format gguf for the Hugging Face folder alone")
    return spec


def _tokenizer_metadata(writer, tokenizer, vocab_size: int, base_name: str) -> None:
    """Vocabulary, merges, special ids and chat template, as llama.cpp's converter writes them."""
    import gguf

    spec = check_gguf_tokenizer(tokenizer, vocab_size)
    model_spec = spec.get("model", {})
    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    byte_fallback = bool(model_spec.get("byte_fallback"))
    for i in range(vocab_size):
        token = id_to_token.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            tokens.append(token)  # a byte, even where tokenizer.json lists it among its added (special) tokens
            types.append(gguf.TokenType.BYTE)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_spec.get("merges", [])]
    if byte_fallback:  # SentencePiece-style BPE (Llama 2, Mistral): llama.cpp's "llama" vocabulary with scores
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores([-float(i) for i in range(vocab_size)])
        # llama.cpp puts a "▁" before such a text unless told not to: Llama 2's tokenizer does, Gemma's does not
        writer.add_add_space_prefix(_prepends_space(spec))
    else:  # byte-level BPE (GPT-2 family, SmolLM, Llama 3)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec, base_name))
        writer.add_token_list(tokens)
        writer.add_token_merges(merges)
    writer.add_token_types(types)
    for setter, token_id in (("add_bos_token_id", tokenizer.bos_token_id), ("add_eos_token_id", tokenizer.eos_token_id),
                             ("add_pad_token_id", tokenizer.pad_token_id), ("add_unk_token_id", tokenizer.unk_token_id)):
        if isinstance(token_id, int) and hasattr(writer, setter):
            getattr(writer, setter)(token_id)
    # llama.cpp adds BOS/EOS around a prompt by its own per-vocabulary default unless these keys say otherwise
    # (convert_hf_to_gguf.py writes them from tokenizer_config.json): write what this tokenizer does, so llama.cpp
    # tokenizes a prompt as transformers does
    adds = _adds_special_tokens(tokenizer)
    if adds is not None:
        writer.add_add_bos_token(adds[0])
        writer.add_add_eos_token(adds[1])
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates ("default", "tool_use"): gguf takes them as a list of entries
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)


def _prepends_space(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts "▁" before the text: a ``Prepend`` normalizer (Llama 2's
    older files) or a ``Metaspace`` pre-tokenizer that prepends (its newer ones); Gemma's and Phi-3's newer files
    only replace spaces."""
    def nodes(node):
        if isinstance(node, dict):
            yield node
            for key in ("normalizers", "pretokenizers"):
                for child in node.get(key) or []:
                    yield from nodes(child)

    for node in nodes(spec.get("normalizer")):
        if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
            return True
    for node in nodes(spec.get("pre_tokenizer")):
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never") != "never"
    return False


def _adds_special_tokens(tokenizer) -> tuple[bool, bool] | None:
    """Whether encoding a text with the tokenizer's defaults puts BOS before it and EOS after it (None: unknown)."""
    text = "a"
    try:
        with_special = list(tokenizer(text).input_ids)
        plain = list(tokenizer(text, add_special_tokens=False).input_ids)
    except Exception:  # a tokenizer that cannot encode here: write no key, llama.cpp keeps its default
        return None
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]
    add_eos = eos is not None and with_special[-1:] == [eos] and plain[-1:] != [eos]
    return add_bos, add_eos


_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_patterns(node) -> list[str]:
    """Every ``Split`` regex in a tokenizer.json pre-tokenizer (they nest inside ``Sequence``)."""
    if isinstance(node, dict):
        pattern = node.get("pattern") or {}
        found = [pattern["Regex"]] if node.get("type") == "Split" and "Regex" in pattern else []
        return found + [p for child in node.get("pretokenizers") or [] for p in _split_patterns(child)]
    return []


def _pre_tokenizer_name(spec: dict, base_name: str) -> str:
    """llama.cpp picks its pre-tokenizer regex by this name (``tokenizer.ggml.pre``)."""
    if "smollm" in base_name.lower():
        return "smollm"
    if _QWEN2_SPLIT in _split_patterns(spec.get("pre_tokenizer")):
        return "qwen2"  # Llama 3's regex with single digits: Qwen2, Qwen2.5, Qwen3
    text = json.dumps(spec.get("pre_tokenizer"))
    if "Split" in text and "\\p{N}{1,3}" in text:
        return "llama-bpe"  # Llama 3's regex
    return "gpt-2"


def _gguf_context(config, arch: GgufArch) -> int:
    """The context length the GGUF declares: the model's, or its sliding window where that is shorter and the
    family's llama.cpp graph has none (Mistral 7B v0.1, run as llama: its 4096-token window under a 32768 context).
    Within the window full attention is the model's own; past it llama.cpp would attend to every earlier token, so the
    file says the context in which it equals the model (llama.cpp warns when asked for more), and this is said."""
    context = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None) if arch.arch == "llama" else None
    if isinstance(window, int) and not isinstance(window, bool) and 0 < window < context:
        warnings.warn(f"llama.cpp runs this {config.model_type} model without its sliding window ({window} tokens), so "
                      f"the GGUF declares a context of {window} tokens, not {context}: within it llama.cpp attends as "
                      "the model does, past it to every earlier token", stacklevel=3)
        return window
    return context


def write_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, kind: str = "f16", name: str = "merged") -> Path:
    """Write ``model`` (a plain, merged model of a ``GGUF_ARCHS`` family) as GGUF ``kind`` (``f16`` or ``q8_0``) to ``path``, atomically.

    Norms stay float32 and tensors whose rows do not split into Q8_0 blocks of 32 stay f16, as llama.cpp does.
    Scaled rotary embeddings get the ``rope.scaling.*`` keys and rope tensors of ``gguf_rope_scaling``.
    """
    import gguf

    if kind not in GGUF_TYPES:
        raise LorakitError(f"unknown GGUF type {kind!r}; choose one of {', '.join(GGUF_TYPES)}")
    path = Path(path).expanduser()
    if path.is_dir():
        raise LorakitError(f"{path} is a folder; give the GGUF file's name, e.g. {path / f'{name}-{kind}.gguf'}")
    tensors = gguf_tensors(model)
    config = model.config
    arch = gguf_arch(config)
    n_head = config.num_attention_heads
    head_dim = _config_value(config, "head_dim", config.hidden_size // n_head)
    rope_theta = _config_value(config, "rope_theta", _rope(config, arch).get("rope_theta", 10000.0))
    vocab_size = tensors["token_embd.weight"].shape[0]
    check_gguf_tokenizer(tokenizer, vocab_size)  # before the file is opened
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch.arch)
        writer.add_name(name)
        writer.add_context_length(_gguf_context(config, arch))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(config.num_hidden_layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_rope_dimension_count(int(head_dim))
        writer.add_head_count(int(n_head))
        writer.add_head_count_kv(int(_config_value(config, "num_key_value_heads", n_head)))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_rope_freq_base(float(rope_theta))
        writer.add_vocab_size(int(vocab_size))
        if head_dim * n_head != config.hidden_size or arch.head_dim_key:
            writer.add_key_length(int(head_dim))
            writer.add_value_length(int(head_dim))
        _write_rope_scaling(writer, gguf_rope_scaling(config, arch)[0])
        if arch.metadata is not None:
            arch.metadata(writer, config)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if kind == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _tokenizer_metadata(writer, tokenizer, vocab_size, name)
        for tensor_name, tensor in slow_work(tensors.items(), f"writing {path.name}", "tensor", total=len(tensors)):
            array = tensor.numpy().astype(np.float32)
            if array.ndim == 1:
                writer.add_tensor(tensor_name, array)
            elif kind == "q8_0" and array.shape[-1] % 32 == 0:
                quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(tensor_name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(tensor_name, array.astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def export_merged(model: nn.Module, tokenizer, adapter: str, out: str | os.PathLike, dtype: torch.dtype = torch.float32,
                  gguf_type: str | None = None, overwrite: bool = False, name: str | None = None,
                  max_shard_size: int | str = MAX_SHARD_SIZE) -> tuple[Path, DeltaReport]:
    """Merge ``adapter`` (one name; combine several first, ``lorakit.combine_adapters``) and write the HF folder
    ``out`` (and ``out/<name>-<gguf_type>.gguf`` when asked).

    The GGUF is written from the float32 merged weights, before the folder's cast to ``dtype``. Weights above
    ``max_shard_size`` are split into shards (see ``write_folder``).
    """
    if not isinstance(adapter, str):  # a list was told "unknown adapter ['a', 'b']; this model has: a, b"
        from lorakit.inject import adapter_names

        names = adapter_names(model)
        mix = "{" + ", ".join(f"{n!r}: 1.0" for n in (adapter if isinstance(adapter, (list, tuple)) else names)) + "}"
        raise LorakitError(f"export_merged merges one adapter, named by a string (this model has: "
                           f"{', '.join(names) or 'no adapters'}), got {adapter!r}; to export several merged together, "
                           f"combine them first: lorakit.combine_adapters(model, {mix}, name='mix'), then export 'mix'")
    if gguf_type is not None:  # fail before any work when the model cannot be exported
        gguf_arch(model.config)
        if gguf_type not in GGUF_TYPES:
            raise LorakitError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        rows = getattr(embedding, "num_embeddings", None)
        if isinstance(rows, int):  # the tokenizer too, not only after the merge (it was: minutes lost on a big model)
            check_gguf_tokenizer(tokenizer, rows)
    _checked_out(model, out, overwrite)  # before merging: a refused folder leaves the model as it was
    shard_size(max_shard_size)
    dtype = export_dtype(dtype)
    from lorakit.adapters import _require

    _require(model, [adapter])  # before dequantize() changes a 4-bit model
    model, report = merge_model(model, adapter, dtype, keep_float32=gguf_type is not None)  # the GGUF: float32
    if report.lost_share > LOSS_WARNING:
        # a share of the update's weights, not of its effect: the rounding is noise at the scale of the base's
        # weights, which the outputs often absorb; the user's own eval of the folder says which
        warnings.warn(f"the cast to {str(dtype).replace('torch.', '')} rounds away {100 * report.lost_share:.0f}% of "
                      "the adapter's update to the weights (RMS; rounding noise, so the answers may change less: "
                      f"compare with `lorakit eval --model {Path(out)} --data VAL.jsonl`); merge with --dtype fp32 to "
                      "keep it exactly", stacklevel=2)
    stem = name or Path(out).name
    extra = (lambda folder: write_gguf(model, tokenizer, folder / f"{stem}-{gguf_type}.gguf", gguf_type, stem)) if gguf_type else None
    return write_folder(model, tokenizer, out, dtype, overwrite=overwrite, extra_files=extra,
                        max_shard_size=max_shard_size), report
