"""Checks of the paths and names a user types on the command line, run before anything slow.

Each refuses a common mix-up with one line that says what to give instead: a GGUF file or a weights file where a
model folder goes, a file where an adapter folder goes, a device this machine does not have.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
from pathlib import Path

from lorakit.errors import LorakitError


def check_model_arg(model: str, flag: str = "--model") -> None:
    """Refuse a *file* given as the model: lorakit reads Hugging Face folders (and the embedded names).

    A missing path or a name is left to :func:`lorakit.load_base`, which says what it accepts.
    """
    if not str(model).strip():  # "" read as the current folder: ". has no config.json"
        raise LorakitError(f"{flag} is empty (an unset shell variable?); give the model folder or an embedded name, "
                           "e.g. smollm2-135m")
    path = Path(os.path.expanduser(str(model)))
    _refuse_special(path, model, flag, "the model folder (config.json, safetensors weights, tokenizer files)")
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").exists():
        raise LorakitError(f"{flag} {model} is an adapter folder (adapter_config.json), not a base model; give the "
                           f"folder of the base it was trained on as {flag}{_named_base(path)}")
    if path.is_dir() and not (path / "config.json").exists():
        _refuse_run_folder(path, model, flag)
    if not path.is_file():
        return
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError:  # unreadable: the suffix alone tells a GGUF file
        magic = b""
    if magic == b"GGUF" or path.suffix.lower() == ".gguf":
        raise LorakitError(
            f"{flag} {model} is a GGUF file; lorakit trains and merges Hugging Face folders (config.json, safetensors, "
            "tokenizer). Give the model's folder, or convert the GGUF once: transformers' "
            f"AutoModelForCausalLM.from_pretrained(folder, gguf_file={path.name!r}).save_pretrained(out), and the same "
            "with AutoTokenizer")
    parent = path.parent if str(path.parent) not in ("", ".") else Path(".")
    hint = (f"; did you mean its folder {str(parent)!r}?" if (parent / "config.json").is_file()
            else "; give the folder that holds config.json, the safetensors weights and the tokenizer files")
    raise LorakitError(f"{flag} {model} is a file, not a model folder{hint}")


def check_writable(target: str | os.PathLike, flag: str = "--out") -> None:
    """Create and remove a scratch folder where ``target`` will be written (its nearest existing folder), so a place
    nothing can be written to is refused before minutes of loading. Permission bits alone do not tell: root passes
    them, and /proc, /sys or a read-only mount refuse the write itself."""
    import tempfile

    place = Path(os.path.expanduser(str(target))).absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    if place.is_file():  # a results file written again: its folder is where the new one is made
        place = place.parent
    if not place.is_dir():
        return
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lorakit-write-check-", dir=place))
    except OSError as error:
        raise LorakitError(f"{flag} {target}: cannot write in {place} ({error.strerror or error}); choose another "
                           f"{flag}") from None


def _refuse_special(path: Path, typed: str, flag: str, what: str) -> None:
    """A device, pipe or socket (/dev/null, a fifo) is neither a file nor a folder: 'does not exist' would be wrong."""
    if path.exists() and not path.is_dir() and not path.is_file():
        raise LorakitError(f"{flag} {typed} is not a folder (a device, pipe or socket); give {what}")


def _refuse_run_folder(path: Path, model: str, flag: str) -> None:
    """A ``lorakit train`` run folder given as the model (``lorakit generate --model runs/mine``, the folder train
    just named) was told "has no config.json; give a Hugging Face model folder", which names neither the run's
    adapter nor the base to pass with it. Its adapters are RUN/adapter, RUN/best and RUN/checkpoints/step-N/adapter;
    a --full run's model is RUN/model."""
    if (path / "model" / "config.json").is_file():
        raise LorakitError(f"{flag} {model} is a training run's folder, not a model; the model it trained is "
                           f"{path / 'model'}: pass that as {flag}")
    adapters = [path / "adapter", path / "best"]
    try:
        steps = sorted((p for p in (path / "checkpoints").iterdir() if p.name.startswith("step-")), reverse=True)
    except OSError:  # no checkpoints folder (or an unreadable one)
        steps = []
    adapters += [step / "adapter" for step in steps]
    found = next((a for a in adapters if (a / "adapter_config.json").is_file()), None)
    if found is not None:
        raise LorakitError(f"{flag} {model} is a training run's folder, not a base model; {flag} takes the base it was "
                           f"trained on{_named_base(found)}, and the run's adapter is {found} (for "
                           f"{'--adapter' if flag.startswith('--') else 'lorakit.load_adapter'})")


def _named_base(adapter: Path) -> str:
    """' (its adapter_config.json names 'X')', or '' when it names none or cannot be read."""
    import json

    try:
        name = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8-sig")).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        return ""
    return f" (its adapter_config.json names {name!r})" if isinstance(name, str) and name.strip() else ""


def check_model_folder(model: str, flag: str = "--model") -> None:
    """``check_model_arg``, then the checks of a local model folder that read no weights (config.json, a pickled-only
    folder, a family that cannot generate), so they come before an adapter is read or anything loads. The
    embedded names are left to ``load_base`` (their first use converts the model)."""
    from lorakit.models.loading import _ALIASES, EMBEDDED_MODELS, check_weights_file, resolve_model_folder

    check_model_arg(model, flag)
    if _ALIASES.get(str(model).lower(), str(model).lower()) not in EMBEDDED_MODELS:
        folder, _ = resolve_model_folder(model)
        for weights in sorted(folder.glob("*.safetensors")):
            check_weights_file(weights, f"{flag} {model}")


def check_adapter_arg(adapter: str, flag: str = "--adapter") -> None:
    """Refuse a file given as an adapter (the adapter is the folder holding adapter_config.json), or an empty path
    (read as the current folder)."""
    if not str(adapter).strip():
        raise LorakitError(f"{flag} is empty (an unset shell variable?); give the adapter folder that holds "
                           "adapter_config.json, e.g. runs/mine/adapter")
    path = Path(os.path.expanduser(str(adapter)))
    _refuse_special(path, adapter, flag, "the adapter folder (adapter_config.json, adapter_model.safetensors)")
    if path.is_file():
        hint = (f"; did you mean its folder {str(path.parent)!r}?" if (path.parent / "adapter_config.json").is_file()
                else "; give the adapter folder that holds adapter_config.json and adapter_model.safetensors")
        raise LorakitError(f"{flag} {adapter} is a file, not an adapter folder{hint}")


def check_device(device: str | None, flag: str = "--device") -> None:
    """Refuse a device name torch does not know, or a GPU backend this machine lacks (instead of torch's traceback)."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise LorakitError(f"{flag} {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise LorakitError(f"{flag} {device}: no CUDA GPU is visible to PyTorch; use {flag} cpu")
    if kind == "cuda" and torch.device(device).index is not None and torch.device(device).index >= torch.cuda.device_count():
        raise LorakitError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LorakitError(f"{flag} mps: Apple's MPS backend is not available here; use {flag} cpu")


DEFAULT_MODEL = "smollm2-135m"


def check_base_names(model: str | None, adapters, flag: str = "--adapter") -> str:
    """The ``--model`` to load: the one given, or the embedded default when it was left out, unless an adapter's
    ``adapter_config.json`` names another base (``base_model_name_or_path``). Then it says to pass ``--model``,
    before the default loads only to be refused by the adapter's shapes or fingerprint.

    ``adapters``: ``(folder as typed, AdapterFile)`` pairs. lorakit downloads nothing, so a hub id there is
    named with the download command instead of being fetched.
    """
    if model is not None:
        return model
    from lorakit.io import _short_name
    from lorakit.models.hub_cache import local_model_folder, looks_like_hub_id

    for typed, adapter_file in adapters:
        name = adapter_file.base_name
        if not name:
            continue
        ours, theirs = _short_name(DEFAULT_MODEL), _short_name(name)
        if ours.startswith(theirs) or theirs.startswith(ours):
            continue
        near = _base_beside(typed, name)
        if _is_folder(lambda: local_model_folder(name)):  # a folder, or an org/name id in the Hugging Face cache
            how = f"pass --model {shlex.quote(name)}"
        elif near is not None:  # a relative folder, typed where the training ran: a parent of the run's folder
            how = f"pass --model {shlex.quote(near)} (the folder {name!r} of where it was trained, it seems)"
        elif looks_like_hub_id(name):
            how = (f"pass --model with a local folder of it (lorakit downloads nothing: hf download {name} "
                   "--local-dir DIR, then --model DIR)")
        else:
            how = "pass --model with a local folder of that base"
        from lorakit.config import shown

        raise LorakitError(f"{flag} {typed} was trained on {shown(name)} (base_model_name_or_path in its adapter_config.json), "
                           f"not on the default --model {DEFAULT_MODEL}; {how}")
    return DEFAULT_MODEL


def _is_folder(path) -> bool:
    """Whether ``path()`` is a folder; False where the system cannot even look (a base_model_name_or_path of over
    255 characters, ENAMETOOLONG: the refusal printed "aaaa...: File name too long" instead of the adapter's fault)."""
    try:
        return path().is_dir()
    except (OSError, ValueError):
        return False


def _base_beside(adapter: str, name: str) -> str | None:
    """Where the relative base folder ``name`` an adapter names is, seen from here: peft and lorakit train write the
    path as typed (``models/qwen3``), which is relative to where the training ran, usually a folder above the run's
    (``runs/x/adapter``). The first ``PARENT/name`` holding a config.json, as a path from the current folder; None
    when ``name`` is absolute or no parent has it. Only suggested: the adapter's shapes are checked on loading."""
    if os.path.isabs(name) or name.startswith("~"):
        return None
    try:
        here = Path(os.path.expanduser(adapter)).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    for parent in here.parents:
        candidate = parent / name
        try:
            if (candidate / "config.json").is_file():
                return os.path.relpath(candidate)
        except (OSError, ValueError):
            return None
    return None


# what plan_load says when an adapter does not fit the loaded base (another model's shapes, modules or fingerprint)
_MISFIT = re.compile(r"has shape .* but |made for another base model|missing tensor keys|unexpected tensor keys|"
                     r"match(?:es|ed) no module")  # inject's 'target_modules [...] matched no module' too


def explain_misfit(error: Exception, adapter_file, model: str, defaulted: bool) -> Exception:
    """``error`` (from loading an adapter onto ``model``) with what to do when it says the adapter does not fit that
    base: which base its ``adapter_config.json`` names, and how to pass it with ``--model``. Other errors unchanged.

    ``defaulted``: ``model`` is the default because ``--model`` was left out (the likely cause: say so).
    """
    if not isinstance(error, LorakitError) or not _MISFIT.search(str(error)):
        return error
    if "which adapter_config.json leaves out" in str(error):  # io._unselected_hint: the file disagrees with itself
        return error  # on this base's own layers; another --model would not help
    name = getattr(adapter_file, "base_name", None)
    if name and _same_model(name, model, getattr(adapter_file, "folder", None)):
        # "pass --model X" named the very base just loaded, so the advice could only be followed in a circle: the
        # adapter does not fit the base it was made for, so its own files (or that base folder) changed since
        return LorakitError(f"{error}; that is the base loaded (--model {model}): the adapter does not fit the model it "
                            "was saved for (its files edited or mixed with another save's, or that base changed "
                            "since); save the adapter again from its run")
    # lorakit.io's refusals often end "(adapter_config.json names the base X)" already: then the fix alone, not again
    # which file names the base
    whose = "" if "names the base" in str(error) else ", the base its adapter_config.json names"
    if name and _is_folder(lambda: Path(os.path.expanduser(name))):
        how = f"pass --model {shlex.quote(name)}{whose}"
    elif name:
        from lorakit.config import shown

        how = f"pass --model with a local folder of {shown(name)}{whose}"  # capped: the file's text, any length
    else:
        how = ("pass --model with the folder of the model it was trained on (its adapter_config.json names no "
               "base_model_name_or_path)")
    if defaulted:
        how = f"--model was not given, so the default {model} was loaded: {how}"
    return LorakitError(f"{error}; {how}")


def _same_model(name: str, model: str, adapter_folder) -> bool:
    """Whether the base an adapter names and the ``--model`` given are one model: one folder written two ways
    (``base`` and ``/abs/base``, a link to it; a relative name is first looked for above the adapter, where its
    training ran), or the same name of no folder here (an embedded model, a Hub id in the cache)."""
    if adapter_folder is not None and not os.path.isabs(name):
        name = _base_beside(str(adapter_folder), name) or name
    try:
        return os.path.samefile(os.path.expanduser(name), os.path.expanduser(model))
    except (OSError, ValueError):  # one of them is no folder here
        return name == model and not os.path.exists(os.path.expanduser(model))


@contextlib.contextmanager
def plain_warnings():
    """Python warnings (an adapter named for another base, ...) as one ``warning: ...`` line on stderr, without the
    file:line and source line Python prints for a developer. Only the format changes, so code that records warnings
    (``warnings.catch_warnings(record=True)``, pytest) still receives them."""
    import warnings

    formatted = warnings.formatwarning
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = formatted


@contextlib.contextmanager
def library_bars_only_on_a_terminal():
    """transformers' own progress bars (save_pretrained's "Writing model shards") only when stderr is a terminal:
    into a log file (CI, nohup, ``2> log``) a bar is a line of carriage-return redraws, while lorakit's own work
    says what it did in plain lines. transformers' switch is global, so it is put back as it was."""
    import sys

    try:
        terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        terminal = False
    if terminal:
        yield
        return
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
