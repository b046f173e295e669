"""Training checkpoints in safetensors + JSON (never pickle), written atomically.

A checkpoint is a folder ``<run>/checkpoints/step-000120/`` holding:

- ``trainable.safetensors``: every trainable parameter by its name in the model (exact values, for resume);
- ``adapter/``: the adapter in PEFT's format (or nothing for full fine-tuning), so any checkpoint is usable;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's state tensors, and its scalars and groups;
- ``rng.safetensors`` + (in ``state.json``) the random states: torch CPU/CUDA states as uint8 tensors, Python's
  and NumPy's Mersenne Twister states as uint8 tensors of their 32-bit words; under torchrun, those of every
  process (keys ``rank<r>.<name>`` and ``state.json`` ``rng_ranks`` for ranks r >= 1: dropout draws differ per
  process);
- (several processes) the same files as one process: sharded tensors (FSDP2) are gathered whole before rank 0
  writes them (see lorakit/train/distributed.py), and each process takes its shard back on resume;
- ``state.json``: the step, the data position, counters, the best validation loss, and the run's identity (what
  must match for a resume: model, data, batch settings).

Atomicity: everything is written (and fsynced) into a hidden temporary folder next to the final one, which is
then renamed into place; only after that is ``checkpoints/latest`` (a small text file, itself replaced
atomically) pointed at it. A crash or a failed write (disk full) at any point leaves the previous checkpoint and
the ``latest`` pointer untouched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from lorakit._fs import atomic_write_text, temp_dir
from lorakit.errors import LorakitError
from lorakit.inject import unwrap

FORMAT = "lorakit-checkpoint-1"
LATEST = "latest"


# -- nested state <-> (JSON tree, flat tensors) ------------------------------------------------------------------
def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list/tuple by ``{"__tensor__": key}`` and collect it in ``tensors``.

    Dicts with non-string keys (the optimizer's ``{param_index: state}``) become ``{"__items__": [[k, v], ...]}``;
    tuples become ``{"__tuple__": [...]}``, so :func:`unflatten_state` gives back the same structure.
    """
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten_state(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise LorakitError(f"cannot store a {type(obj).__name__} at {prefix} in a checkpoint (only tensors and JSON values)")


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__items__" in tree:
            return {k: unflatten_state(v, tensors) for k, v in tree["__items__"]}
        if "__tuple__" in tree:
            return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    return tree


# -- random states -------------------------------------------------------------------------------------------------
def _words_to_uint8(words: list[int] | Any) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(words, dtype="<u4").view(np.uint8).copy())


def _uint8_to_words(tensor: torch.Tensor) -> list[int]:
    return tensor.numpy().view("<u4").tolist()


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All random states as (uint8 tensors, JSON scalars): torch CPU and CUDA, Python ``random``, NumPy."""
    import numpy as np

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    version, words, gauss = random.getstate()
    tensors["python"] = _words_to_uint8(list(words))
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = _words_to_uint8(keys)
    scalars = {"python_version": version, "python_gauss": gauss, "numpy_name": name, "numpy_pos": int(pos),
               "numpy_has_gauss": int(has_gauss), "numpy_cached_gaussian": float(cached),
               "cuda_devices": sum(k.startswith("torch_cuda_") for k in tensors)}
    return tensors, scalars


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"torch_cuda_{i}"] for i in range(int(scalars.get("cuda_devices", 0)))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate((scalars["python_version"], tuple(_uint8_to_words(tensors["python"])), scalars["python_gauss"]))
    np.random.set_state((scalars["numpy_name"], np.asarray(_uint8_to_words(tensors["numpy"]), dtype=np.uint32),
                         scalars["numpy_pos"], scalars["numpy_has_gauss"], scalars["numpy_cached_gaussian"]))


# -- writing -------------------------------------------------------------------------------------------------------
def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save as safetensors_bytes

    data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=1, sort_keys=True, allow_nan=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def os_error_of(error: BaseException) -> OSError | None:
    """The OSError (a full disk, no permission) behind ``error``: itself, or one it was raised from, even
    ``from None`` (which hides the context from tracebacks but keeps it); None when there is none."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def write_into_temp(write: Callable[[Path], Any], path: Path) -> None:
    """``write(path)``, where ``path`` is inside a hidden temporary folder: a LorakitError it raises over an OSError
    (save_adapter's line names that folder and says to choose another) is raised as the OSError itself, so the
    caller's handler says what failed with the real destination's name."""
    try:
        write(path)
    except LorakitError as error:
        cause = os_error_of(error)
        if cause is None:
            raise
        raise cause from None


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(folder: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], adapter_writer=None, keep: int | None = None, *,
                    trainable: dict[str, torch.Tensor] | None = None, optimizer_state: dict[str, Any] | None = None,
                    rank_rngs: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None) -> Path:
    """Write checkpoint ``step`` under ``folder`` (the run's ``checkpoints/``) atomically; returns its path.

    Args:
        folder: where checkpoints live.
        step: optimizer steps done.
        model: its trainable parameters are saved by name.
        optimizer: its ``state_dict()`` is saved (tensors to safetensors, the rest to JSON).
        state: JSON-serialisable trainer state (data position, counters, identity).
        adapter_writer: ``f(path)`` writing the user-facing adapter (PEFT format) into ``path``, or None.
        keep: after success, delete all but the ``keep`` newest step folders.
        trainable / optimizer_state: the whole (gathered) trainable tensors and optimizer state, when they differ
            from ``model`` and ``optimizer`` (FSDP2 shards); default: read from them.
        rank_rngs: ``rng_state()`` of every process in rank order (torchrun); default: this process's.
    Raises:
        LorakitError: the write failed (e.g. a full disk); the previous checkpoint is untouched.
    """
    folder = Path(folder)
    final = folder / checkpoint_name(step)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(final)
    except OSError as error:
        raise LorakitError(f"cannot create a checkpoint in {folder}: {error.strerror or error}") from None
    try:
        if trainable is None:  # named as in the model inside a torch.compile wrapper: a resume may leave it out
            trainable = {name: p.detach() for name, p in unwrap(model).named_parameters() if p.requires_grad}
        _write_safetensors(tmp / "trainable.safetensors", {k: v.detach().cpu() for k, v in trainable.items()})
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_tree = flatten_state(optimizer.state_dict() if optimizer_state is None else optimizer_state, "optimizer",
                                 opt_tensors)
        _write_safetensors(tmp / "optimizer.safetensors", opt_tensors)
        _write_json(tmp / "optimizer.json", opt_tree)
        rngs = rank_rngs or [rng_state()]
        rng_tensors = dict(rngs[0][0])
        for r, (tensors, _) in enumerate(rngs[1:], start=1):
            rng_tensors.update({f"rank{r}.{k}": v for k, v in tensors.items()})
        _write_safetensors(tmp / "rng.safetensors", rng_tensors)
        if adapter_writer is not None:
            write_into_temp(adapter_writer, tmp / "adapter")
        _write_json(tmp / "state.json", {"format": FORMAT, "step": step, "rng": rngs[0][1],
                                         "rng_ranks": [scalars for _, scalars in rngs[1:]], **state})
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(folder)
        atomic_write_text(folder / LATEST, final.name + "\n")
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(folder)
        kept = f"; the previous checkpoint {previous} is still valid" if previous else ""
        # without an earlier checkpoint there is nothing to resume (a new run's folder is removed): run it again
        then = "resume with --resume" if previous else "run the command again"
        raise LorakitError(f"writing checkpoint {final} failed ({error.strerror or error}){kept}. Free disk space "
                           f"and {then}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        prune_checkpoints(folder, keep)
    return final


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (never the one ``latest`` names) and stale temp folders."""
    latest = latest_checkpoint(folder)
    steps = sorted(p for p in folder.glob("step-*") if p.is_dir())
    for path in steps[:-keep] if keep > 0 else steps:
        if latest is None or path.resolve() != latest.resolve():
            shutil.rmtree(path, ignore_errors=True)
    for tmp in folder.glob(".step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


# -- reading -------------------------------------------------------------------------------------------------------
def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint ``folder/latest`` names (a complete one), or None."""
    folder = Path(folder)
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    path = folder / name
    return path if name.startswith("step-") and (path / "state.json").is_file() else None


def complete_checkpoints(folder: Path) -> list[Path]:
    """The step folders in ``folder`` that hold their state.json (written last), oldest first (by step number:
    a name sort put step-1000000 before step-999999)."""
    found = []
    for path in Path(folder).glob("step-*"):
        digits = path.name[len("step-"):]
        if digits.isdigit() and (path / "state.json").is_file():
            found.append((int(digits), path))
    return [path for _, path in sorted(found)]


def _earlier(checkpoint: Path) -> str:
    """What to do about a damaged ``checkpoint``: the newest complete one before it, by name, or that none is kept."""
    step = checkpoint.name[len("step-"):]
    earlier = [p for p in complete_checkpoints(checkpoint.parent)
               if step.isdigit() and int(p.name[len("step-"):]) < int(step)]
    if earlier:
        return f"resume from the earlier checkpoint {earlier[-1]} instead (--resume {earlier[-1]})"
    return "no earlier checkpoint is kept: start the run again"


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint path, a ``checkpoints/`` folder or a run folder."""
    path = Path(path).expanduser()  # train(..., resume="~/runs/nb") from Python: no shell expanded it
    if (path / "state.json").is_file():
        return path
    for folder in (path / "checkpoints", path):
        found = latest_checkpoint(folder)
        if found is not None:
            return found
    # no usable ``latest`` pointer (a kill between a first checkpoint's rename and the pointer's write, a pointer to
    # a folder since deleted, a copy of the step folders alone): a step folder exists only once renamed complete, so
    # the newest holding its state.json is the one to continue from. This said "no checkpoint (the run stopped
    # before its first checkpoint); start it again with --overwrite", which deleted the checkpoints there
    for folder in (path / "checkpoints", path):
        found = next(iter(complete_checkpoints(folder)[::-1]), None)
        if found is not None:
            return found
    if not path.exists():
        raise LorakitError(f"cannot resume: {path} does not exist; give a run folder (--out of the earlier run) or a checkpoint")
    raise LorakitError(f"cannot resume: no checkpoint in {path} (the run stopped before its first checkpoint); "
                       "start it again with --overwrite instead of --resume, and a lower --save-every")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise LorakitError(f"checkpoint file missing: {path}; the checkpoint is incomplete: {_earlier(path.parent)}")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error type for damaged files
        # which earlier checkpoint: "resume from an earlier checkpoint" alone left the user to find out that
        # --resume takes a step folder, and which ones are whole
        raise LorakitError(f"checkpoint file {path} is damaged ({type(error).__name__}); "
                           f"{_earlier(path.parent)}") from None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise LorakitError(f"checkpoint file missing: {path}; the checkpoint is incomplete: {_earlier(path.parent)}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LorakitError(f"checkpoint file {path} is damaged ({error}); {_earlier(path.parent)}") from None


def read_state(checkpoint: Path) -> dict[str, Any]:
    state = _read_json(checkpoint / "state.json")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise LorakitError(f"{checkpoint / 'state.json'} is not a lorakit checkpoint ({FORMAT})")
    return state


def load_checkpoint(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    rank: int = 0) -> dict[str, Any]:
    """Restore trainable parameters, optimizer state and random states (those of process ``rank``) from
    ``checkpoint``; returns its state. Sharded (FSDP2) parameters and their optimizer state take this process's
    shard of the whole tensors saved.

    Every file is read and checked before anything is changed.
    """
    from lorakit.train.distributed import to_local_layout

    state = read_state(checkpoint)
    trainable = _read_safetensors(checkpoint / "trainable.safetensors")
    opt_tensors = _read_safetensors(checkpoint / "optimizer.safetensors")
    opt_state = unflatten_state(_read_json(checkpoint / "optimizer.json"), opt_tensors)
    rng_tensors = _read_safetensors(checkpoint / "rng.safetensors")
    params = {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}  # as save_checkpoint names them
    if set(params) != set(trainable):
        extra = sorted(set(trainable) - set(params))[:3]
        missing = sorted(set(params) - set(trainable))[:3]
        raise LorakitError(f"checkpoint {checkpoint} does not match this model's trainable parameters (in the checkpoint "
                           f"only: {extra}; in the model only: {missing}); resume with the same model and adapter settings")
    for name, tensor in trainable.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise LorakitError(f"checkpoint {checkpoint}: {name} has shape {tuple(tensor.shape)}, the model "
                               f"{tuple(params[name].shape)}; resume with the same adapter settings")
    groups = opt_state.get("param_groups", [])
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise LorakitError(f"checkpoint {checkpoint}: the optimizer's parameter groups differ from this run's "
                           "(another --loraplus-ratio, --weight-decay or adapter?); resume with the same settings")
    if rank > len(state.get("rng_ranks", [])):
        raise LorakitError(f"checkpoint {checkpoint} holds the random states of {len(state.get('rng_ranks', [])) + 1} "
                           f"process(es), not of rank {rank}; resume with the run's number of processes")
    with torch.no_grad():
        for name, tensor in trainable.items():
            params[name].copy_(to_local_layout(tensor.to(device=params[name].device, dtype=params[name].dtype),
                                               params[name]))
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in opt_state.get("state", {}).items():  # AdamW moments of a sharded parameter: its shard
        param = ordered[int(index)] if int(index) < len(ordered) else None
        if param is not None and isinstance(values, dict):
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0:
                    values[key] = to_local_layout(value, param)
    # the saved groups carry the earlier run's learning rate, LoRA+ ratio, weight decay, betas and eps; loading
    # them as they are would silently undo a flag changed on resume (--lr lowered after a divergence): the
    # moments and step counts come from the checkpoint, the hyperparameters from this run (changes are returned)
    changes = []
    for index, (saved, current) in enumerate(zip(groups, optimizer.param_groups)):
        for key, value in current.items():
            if key == "params":
                continue
            before = tuple(saved[key]) if isinstance(saved.get(key), list) else saved.get(key)
            if key in saved and before != value and key != "lr":  # lr is the schedule's, re-set every step
                shown = "lr" if key == "initial_lr" else key
                label = f"{shown} of group {saved.get('name', index)}" if len(groups) > 1 else shown
                changes.append(f"{label}: {before:g} then, {value:g} now" if isinstance(value, float) and
                               isinstance(before, (int, float)) else f"{label}: {before} then, {value} now")
            saved[key] = value
    optimizer.load_state_dict(opt_state)
    state["optimizer_changes"] = changes
    if rank == 0:
        set_rng_state(rng_tensors, state.get("rng", {}))
    else:
        prefix = f"rank{rank}."
        set_rng_state({k[len(prefix):]: v for k, v in rng_tensors.items() if k.startswith(prefix)},
                      state["rng_ranks"][rank - 1])
    return state
