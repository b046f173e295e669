"""``lorakit train`` as a function: load the model and data, score before, train, score after, write the report.

``run_training(config)`` is what the CLI calls; notebooks that already hold a model call
:func:`lorakit.train.loop.train` instead. The run folder ends up with::

    adapter/            the adapter (PEFT format; ``model/`` for --full)
    best/               the adapter at the best validation loss
    checkpoints/        step-NNNNNN/ checkpoints and the ``latest`` pointer
    config.yaml         the resolved config (every option), reusable with --config
    metrics.jsonl       one JSON line per step / validation / score
    loss_curve.png      training and validation loss
    results.json        before/after scores, losses, time, trainable share
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from lorakit._fs import atomic_write_text
from lorakit._rank import speaks, world_size
from lorakit._signals import sigterm_as_interrupt
from lorakit.errors import LorakitError
from lorakit.train.config import TrainConfig, dump_yaml, read_config_file
from lorakit.train.evaluate import GenerationScore, score_generations, scorable
from lorakit.train.loop import train

RUNS_DIR = "runs"
CONFIG_NAME = "config.yaml"
RESULTS_NAME = "results.json"
BEFORE_NAME = "eval_before.json"
# Greedy decoding on a CPU reads every weight once per new token, whatever the batch: 60 prompts in one batch of
# 64 were scored 4.6x faster (CPU time) than in batches of 16 (SmolLM2-135M, 2 cores).
GENERATION_BATCH = 64
EMBEDDED_DEMO_STEPS = 30  # `lorakit train` with no data: steps of the embedded task


def say(message: str = "") -> None:
    """Print on the first process only (torchrun starts several)."""
    if speaks():
        print(message, flush=True)


# -- the run folder -------------------------------------------------------------------------------------------------
def latest_run(root: Path = Path(RUNS_DIR)) -> Path:
    runs = sorted((p for p in root.glob("*") if (p / CONFIG_NAME).is_file()), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise LorakitError(f"--resume without a folder continues the newest run in {root}/, but there is none; "
                           "give the run folder: --resume RUN_DIR")
    return runs[-1]


def resolve_run_folder(out: str | None, resume: str | None, overwrite: bool,
                       clock: float | None = None) -> tuple[Path, Path | None]:
    """(run folder, folder or checkpoint to resume from). A fresh run never writes into a folder holding another run.
    Without ``out`` a fresh run is ``runs/<date-time>`` of ``clock`` (a ``time.time()``; None: now)."""
    if resume is not None:
        # expanded: --resume=~/runs/x (no shell expands a ~ after '=') was "cannot resume: ~/runs/x does not exist"
        source = Path(resume).expanduser() if resume != "latest" else (Path(out) if out else latest_run())
        if not source.exists():
            raise LorakitError(f"cannot resume: {source} does not exist; give the run folder of the earlier run")
        home = source.parent.parent if (source / "state.json").is_file() else source  # the run being resumed
        if source.name == "checkpoints" and (home.parent / CONFIG_NAME).is_file() and not (home / CONFIG_NAME).is_file():
            # RUN/checkpoints (a shell's completion stops there): its run is RUN; this read the options from
            # RUN/checkpoints/config.yaml and said "its config.yaml ... is missing; put it back"
            home = source.parent
        run_dir = Path(out) if out else home
        if out and (home / CONFIG_NAME).is_file() and not (run_dir / CONFIG_NAME).is_file() \
                and run_dir.resolve() != home.resolve():
            # the options of a resume are read from --out's config.yaml: this was refused as "its config.yaml is
            # missing; put it back", for a folder that never held one, or (flags given) failed after loading on
            # the defaults, leaving a config.yaml there that the next try read
            raise LorakitError(f"--resume {source} continues the run in {home}, and --out {run_dir} is another folder, "
                               f"which holds no run: leave --out out to continue it in {home}, or copy the run first "
                               f"(cp -r {shlex.quote(str(home))} {shlex.quote(str(run_dir))}) and resume the copy: "
                               f"lorakit train --resume {shlex.quote(str(run_dir))}")
        return run_dir, source
    if not out and clock is None:  # one process: the folder is claimed now (see claim_run_folder)
        return claim_run_folder(), None
    run_dir = Path(out) if out else Path(RUNS_DIR) / time.strftime("%Y%m%d-%H%M%S", time.localtime(clock))
    if run_dir.exists() and not run_dir.is_dir():
        raise LorakitError(f"--out {run_dir} is a file; give a folder")
    if (run_dir / "adapter_config.json").is_file():  # even with --overwrite, which clears only a run's own files
        raise LorakitError(f"--out {run_dir} is an adapter folder (adapter_config.json), not a run folder: a run writes "
                           "its adapter into OUT/adapter, and an old adapter left here would load instead of the new "
                           "one; choose a new folder for --out")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise LorakitError(f"{run_dir} already holds files (an earlier run?); continue it with --resume, choose another "
                           "--out, or pass --overwrite")
    if overwrite and run_dir.is_dir() and not _is_run_folder(run_dir):  # --overwrite replaces a run, not a user's folders
        taken = sorted(p.name + "/" * p.is_dir() for p in run_dir.iterdir() if p.name in (
            "adapter", "best", "checkpoints", "model", CONFIG_NAME, RESULTS_NAME, "metrics.jsonl"))
        if taken:
            raise LorakitError(f"--overwrite would replace {', '.join(taken)} in {run_dir}, which is not a lorakit run "
                               "folder (no config.yaml of a run); choose another --out")
    from lorakit.export import check_output_folder

    check_output_folder(run_dir, overwrite=True)  # a writable place, checked before minutes of loading
    return run_dir, None


def claim_run_folder(root: Path = Path(RUNS_DIR)) -> Path:
    """A new, empty ``runs/<date-time>`` folder for a run without ``--out``, made at once (``-2``, ``-3``, ... after
    the name when that one is taken): runs started in the same second (a sweep, ``lorakit train ... &`` in a loop)
    were all given one folder, and each wrote its checkpoints, metrics and adapter over the others'. A run that
    fails before its first checkpoint removes the folder again (``_run_training``)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        run_dir = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
        except OSError as error:
            raise LorakitError(f"cannot make the run folder {run_dir}: {error.strerror or error}; give --out") from None
    raise LorakitError(f"{root}/{stamp}: every name up to -999 is taken; give --out")


def _is_run_folder(run_dir: Path) -> bool:
    try:
        return {"model", "out", "rank", "lr"} <= set(saved_config(run_dir)) or (run_dir / "checkpoints" / "latest").is_file()
    except LorakitError:
        return False


def check_saved_paths(run_dir: Path, saved: dict[str, Any], given: dict[str, Any]) -> None:
    """Refuse, in one line, a resume whose run's data files (config.yaml keeps them as typed where the run started)
    are not found from this folder, unless given again; names the folder above the run they are found from.

    Without it, a resume from another folder read the paths from here and failed on "data file not found: train.jsonl",
    which says nothing of the run or of where it started."""
    for key in ("data", "val_data"):
        files = saved.get(key)
        files = [files] if isinstance(files, str) else [f for f in files or [] if isinstance(f, str)]
        lost = [f for f in files if not Path(f).expanduser().is_absolute() and not path_found(Path(f).expanduser())]
        if key in given or not lost:
            continue
        home = start_folder(run_dir, lost)
        where = (f"they are found from {home}: cd there and resume" if home is not None else
                 "resume from the folder the run started in")
        flag = "--" + key.replace("_", "-")
        raise LorakitError(f"cannot resume from {run_dir}: its {CONFIG_NAME} names {flag} {' '.join(lost)}, not found "
                           f"from this folder ({Path.cwd()}); the run's paths are as typed where it started: {where}, "
                           f"or give {flag} again")


def path_found(path: Path) -> bool:
    """Whether a data path exists; a pattern (data/*.jsonl, from a config file) is found when it matches a file."""
    import glob

    return bool(glob.glob(str(path), recursive=True)) if any(c in str(path) for c in "*?[") else path.exists()


def start_folder(run_dir: Path, files: list[str]) -> Path | None:
    """The folder a run was likely started in: the nearest of the four folders above ``run_dir`` from which every
    one of the run's relative ``files`` (as its config.yaml keeps them) is found; None when none is. runs/mine
    started from the project folder finds train.jsonl from there."""
    return next((folder for folder in list(run_dir.resolve().parents)[:4]
                 if all(path_found(folder / f) for f in files)), None)


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The config a run was started with (the base of a resume, so `--resume` alone repeats the same run)."""
    path = run_dir / CONFIG_NAME
    return read_config_file(path) if path.is_file() else {}


def interrupted_hint(run_dir: Path, error: BaseException | None = None) -> str:
    """What a Ctrl-C or SIGTERM leaves behind: the last complete checkpoint and the command that continues from it.

    ``error``: the interrupt; a :class:`lorakit.train.stopping.TrainingInterrupted` (the loop stopped at a step and
    saved a checkpoint there) is said with that step, e.g. ``training stopped by SIGTERM at step 7 of 100, saved there;
    the last checkpoint is RUN/checkpoints/step-000007; continue with: lorakit train --resume RUN``."""
    from lorakit.train.checkpoint import latest_checkpoint
    from lorakit.train.loop import CHECKPOINTS_DIR
    from lorakit.train.stopping import TrainingInterrupted

    last = latest_checkpoint(run_dir / CHECKPOINTS_DIR)
    if last is None:
        return (f"training interrupted before its first checkpoint; nothing to resume in {run_dir} (--save-every N "
                "writes one every N steps)")
    from lorakit._signals import signal_words
    from lorakit.train.distributed import resume_command

    if isinstance(error, TrainingInterrupted):
        there = ", saved there" if error.checkpoint is not None and last == error.checkpoint else ""
        return (f"training stopped by {signal_words(error.signum)} at step {error.step} of {error.total_steps}{there}; "
                f"the last checkpoint is {last}; continue with: {resume_command(run_dir)}")
    return f"training interrupted; the last checkpoint is {last}; continue with: {resume_command(run_dir)}"


def check_module_names(model: Any, config: TrainConfig) -> None:
    """Every name given to --targets, --exclude and --modules-to-save must match a module of this model (as a
    full path or its last parts): a typo among several names would otherwise be skipped without a word."""
    import difflib

    from torch import nn

    from lorakit.train.config import _looks_like_regex

    names = [name for name, _ in model.named_modules() if name]
    layers = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name and (
        isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D")})
    lists = (("--targets", config.targets), ("--exclude", config.exclude), ("--modules-to-save", config.modules_to_save))
    for flag, values in lists:
        if config.full and flag != "--modules-to-save" or not values:
            continue
        if flag != "--modules-to-save" and len(values) == 1 and (_looks_like_regex(values[0]) or values[0] == "all-linear"):
            continue  # one regular expression (or all-linear): the injection reports one that matches nothing
        for value in values:
            if not any(name == value or name.endswith("." + value) for name in names):
                close = difflib.get_close_matches(value, layers, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise LorakitError(f"{flag} {value!r} matches no module of this model{hint}; its linear and embedding "
                                   f"layers are named: {', '.join(layers)}{_expert_hint(model, value)}")


# transformers 4's per-expert layer names (Mixtral w1/w2/w3, Qwen-MoE gate_proj/up_proj/down_proj), which tutorials
# still list as targets
_OLD_EXPERT_NAMES = {"w1", "w2", "w3", "gate_proj", "up_proj", "down_proj", "gate_up_proj"}


def _expert_hint(model: Any, value: str) -> str:
    """Why an expert name matches nothing on a transformers-5 MoE model: its experts are fused 3-D parameters."""
    import re

    from lorakit.config import LoraConfig
    from lorakit.inject import _base_modules, expert_parameters, unreachable_experts

    modules = _base_modules(model)
    unreachable = unreachable_experts(modules, LoraConfig())
    if value in {path.rsplit(".", 1)[-1] for path in unreachable}:  # DBRX's w1 / v1 / w2
        reader = next(iter(unreachable.values()))[0]
        name = reader.rsplit(".", 1)[-1]
        return (f" ({value} is an MoE expert weight that {type(modules[reader]).__name__} reads itself, not a layer, "
                f"and no LoRA reaches it: train the experts whole with --modules-to-save {name})")
    fused = sorted({path.rsplit(".", 1)[-1] for path in expert_parameters(modules)})
    if not fused or value not in _OLD_EXPERT_NAMES | set(fused):
        return ""
    full = sorted({re.sub(r"^.*?\.\d+\.", "", path) for path in expert_parameters(modules)})
    return (f" (the MoE experts are fused 3-D parameters here, {', '.join(fused)}, not layers: adapt them with "
            f"--target-parameters {','.join(full)})")


def fit_max_length(config: TrainConfig, model: Any, explicit: bool) -> TrainConfig:
    """Keep ``max_length`` within the model's context: lowered to it (and said) when it is the default, refused when
    the user asked for more. Beyond it, learned position embeddings (GPT-2, OPT) fail with an index error."""
    from lorakit.models.loading import context_length

    limit = context_length(model)
    if limit is None or config.max_length <= limit:
        return config
    if explicit:
        raise LorakitError(f"--max-length {config.max_length} is longer than the model's context of {limit} tokens "
                           f"(max_position_embeddings in its config.json); pass --max-length {limit} or less")
    say(f"max_length lowered from {config.max_length} to {limit}, the model's context length")
    return config.replace(max_length=limit)


# -- pieces ---------------------------------------------------------------------------------------------------------
def check_torchrun_environment() -> None:
    """Refuse, in one line, a WORLD_SIZE > 1 that torchrun did not set up: torch's rendezvous raised a ValueError
    traceback for a missing RANK or MASTER_ADDR (WORLD_SIZE left exported in a shell, a job script setting it by
    hand), and on GPUs a LOCAL_RANK past the GPUs there are (`--nproc_per_node 8` on a 4-GPU machine) ended each
    extra process in a CUDA "invalid device ordinal" traceback. Every process of such a launch gets the same
    LOCAL_WORLD_SIZE, so each refuses it and rank 0's line is the one shown."""
    size = world_size()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise LorakitError(f"WORLD_SIZE={size} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                           f"not: launch several processes with torchrun --nproc_per_node {size} -m lorakit train ..., "
                           "or unset WORLD_SIZE to train on one")
    rank = os.environ["RANK"]
    if not rank.isdigit() or int(rank) >= size:
        raise LorakitError(f"RANK={rank} is not a process of WORLD_SIZE={size} (0 to {size - 1}): launch with "
                           f"torchrun --nproc_per_node {size} -m lorakit train ..., which sets both")
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        local = os.environ.get("LOCAL_RANK", "0")
        per_node = os.environ.get("LOCAL_WORLD_SIZE", "")
        wanted = int(per_node) if per_node.isdigit() else int(local) + 1 if local.isdigit() else 0
        if wanted > gpus:
            raise LorakitError(f"{wanted} processes on this machine (torchrun --nproc_per_node {wanted}) but it has "
                               f"{gpus} GPU{'s' * (gpus != 1)} (CUDA_VISIBLE_DEVICES counts): one process per GPU, "
                               f"--nproc_per_node {gpus} at most")


@contextlib.contextmanager
def distributed_group() -> Iterator[None]:
    """Inside: joined to the process group when launched by torchrun (WORLD_SIZE > 1). A group this made is
    destroyed on the way out, after a garbage collection: FSDP2's modules sit in reference cycles that hold the
    group, and a group whose last reference dies in interpreter teardown can abort in gloo's thread destructors
    ("terminate called without an active exception", seen twice in CI; see also ``cli.main``)."""
    import torch.distributed as dist

    if world_size() <= 1 or dist.is_initialized():
        yield
        return
    check_torchrun_environment()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    previous, keep_group = None, False
    try:
        yield
    except BaseException as error:
        # rank 0 ending in error: torchrun sends SIGTERM (once) the moment another process exits (one killed
        # outright, say), and its default action killed rank 0 in the teardown below, before the CLI printed why
        # (the run's checkpoint, the resume command); torchrun still sends SIGKILL 30 s later should it hang. The
        # other processes keep the default: torchrun ends them once rank 0 has said it (cli._let_rank0_say_it)
        if dist.get_rank() == 0 and threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        elif isinstance(error, (LorakitError, OSError)):
            # a mistake of this process that the CLI says after waiting for rank 0 to say it first: the group stays
            # up meanwhile (the process ends in os._exit). Destroying it here failed rank 0's next collective at once
            # ("another process of this run ended ... killed, or out of memory"), torchrun then ended this process
            # in its wait, and a mistake of this process alone (its --data missing on its node) was never said
            keep_group = True
        raise
    finally:
        if not keep_group:
            gc.collect()
            dist.destroy_process_group()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def choose_device(config: TrainConfig) -> torch.device:
    from lorakit.models.loading import default_device

    if config.device is None:
        device = default_device()
    else:
        from lorakit.commands._args import check_device

        check_device(config.device)  # generate's checks: no GPU, cuda:N past the GPUs there are, no MPS
        device = torch.device(config.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def load_model(config: TrainConfig, device: torch.device):
    """The base model and tokenizer; float32 weights for --full on CUDA (bf16 autocast does the compute)."""
    from lorakit.models import load_base

    dtype = config.dtype
    if dtype is None and config.full:
        dtype = "float32"
    try:
        return load_base(config.model, dtype=dtype, device=device, quantize=config.quantize)
    except (ImportError, NotImplementedError) as error:
        if config.quantize:
            raise LorakitError(f"--quantize {config.quantize} is not available in this install ({error}); train "
                               "without --quantize") from None
        raise


_SHARDED_LOADS = 0


def load_sharded(config: TrainConfig, device: torch.device):
    """--fsdp: the base and tokenizer, the config's adapter injected, sharded over the processes (FSDP2).

    Each process loads the whole base into CPU memory, injects the adapter (from the same seed everywhere, as
    ``train`` would) and keeps only its shard, moved to ``device``. The weights load in the dtype the training
    device would get (bfloat16 for CUDA unless --dtype says otherwise), not the CPU's float32.

    When the checkpoint is stored in that dtype, transformers maps the safetensors files instead of copying them:
    the processes share those pages and load at once. Otherwise each load is a private whole copy (8 processes x a
    70B base converted to bf16: 1.1 TB of host memory), so the processes load in turn and the host holds one copy
    at a time (bench/fsdp_host_memory.py). The turns pass through the rendezvous store, not a collective, which a
    process may wait on longer than NCCL's watchdog allows. A mistake found while loading (a --targets typo, an NF4
    base) is passed on, so every process stops with the same one-line error and rank 0 prints it.
    """
    import datetime

    import torch.distributed as dist

    from lorakit.train.distributed import apply_fsdp, fsdp_mesh
    from lorakit.train.loop import prepare_model

    rank, world_size = dist.get_rank(), dist.get_world_size()
    dtype = load_dtype(config, device)
    config = config.replace(dtype=str(dtype).removeprefix("torch."))
    mesh = fsdp_mesh(device)  # collective: made by every process before any turn

    def load():
        model, tokenizer = load_model(config, torch.device("cpu"))
        check_module_names(model, config)
        torch.manual_seed(config.seed)
        prepare_model(model, config)
        apply_fsdp(model, device, mesh)
        gc.collect()  # whole weights copied at load are garbage now: free them before the next process loads
        return model, tokenizer

    if stored_dtype(config.model) == dtype:
        return load()
    store = dist.distributed_c10d._get_default_store()
    global _SHARDED_LOADS
    _SHARDED_LOADS += 1  # every process counts its calls alike: each call has its own keys in the store
    turn_key = f"lorakit/fsdp-load/{_SHARDED_LOADS}/{{}}".format
    patience = datetime.timedelta(hours=4)  # a 400B base loads for minutes per process; the store default is 5 min

    def outcome(turn: int) -> str:
        store.wait([turn_key(turn)], patience)
        return store.get(turn_key(turn)).decode()

    failure = outcome(rank - 1) if rank > 0 else "ok"
    loaded = None
    if failure == "ok":
        try:
            loaded = load()
        except LorakitError as error:
            failure = str(error)
        except BaseException as error:
            store.set(turn_key(rank), f"process {rank} failed while loading the model ({type(error).__name__}); "
                                      "its traceback is above")
            raise
    store.set(turn_key(rank), failure)
    last = outcome(world_size - 1)
    if last != "ok":
        raise LorakitError(last)
    return loaded


def load_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The base weights' dtype on ``device``: --dtype, else what ``load_base`` picks for that device (bfloat16 on
    CUDA, float32 elsewhere). --fsdp loads on the CPU first: without this, a GPU run would shard float32 weights."""
    from lorakit.models.loading import default_dtype, parse_dtype

    return parse_dtype(config.dtype) or default_dtype(device)


def stored_dtype(model: str) -> torch.dtype | None:
    """The dtype of the first floating-point tensor in a model folder's safetensors files (None: not known)."""
    from safetensors import safe_open

    from lorakit.models.loading import resolve_model_folder

    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    try:
        folder, _ = resolve_model_folder(model)
        for path in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    found = names.get(handle.get_slice(key).get_dtype())
                    if found is not None:
                        return found
    except (LorakitError, OSError, ValueError):
        return None  # load_model says what is wrong with the folder
    return None


def read_data(config: TrainConfig) -> tuple[list, list | None]:
    """(training records, validation records or None), read and validated: done before the model loads, so a bad
    line in the data is reported in seconds rather than after minutes of loading a large model."""
    from lorakit.train.sources import VALIDATION_SPLITS, read_many, reading_progress, repeated_note, unused_validation

    train_files, val_files, val_fraction = config.data, config.val_data, config.val_fraction
    if not train_files:
        from lorakit.data import embedded_dataset_paths

        train_path, val_path = embedded_dataset_paths()
        train_files = [str(train_path)]
        if val_files is None and val_fraction is None:
            val_files = [str(val_path)]
    for files, flag in ((train_files, "--data"), (val_files or [], "--val-data")):
        note = repeated_note(files, flag)
        if note:
            say(note)
    for path in train_files if val_files is None else ():
        note = unused_validation(path, val_fraction)
        if note:
            say(note)
    # a DatasetDict folder as --val-data gives its validation (or test) split, not "train"
    with reading_progress(data_progress(config)):  # 100k chats: 15 s or more of parsing and checking
        return read_many(train_files), (read_many(val_files, split=VALIDATION_SPLITS) if val_files is not None else None)


def check_records_fit(config: TrainConfig, train_records: list, world_size: int) -> None:
    """Before the model loads: refuse a batch (or global batch) larger than the training records left after
    ``--val-fraction``, and a ``--val-fraction`` that leaves less than a batch. Skipped when a chat may train as
    several examples (one per assistant turn): then the count is known after tokenizing, where it is checked again."""
    from lorakit.train.data import validation_count
    from lorakit.train.preflight import check_batch_fits, example_bound

    if example_bound(train_records) != len(train_records):
        return
    n = len(train_records)
    held_out = config.val_fraction is not None and 0 < config.val_fraction < 1
    kept = n - validation_count(n, config.val_fraction) if held_out else n
    check_batch_fits(config, kept, world_size, records=n)


def load_data(config: TrainConfig, tokenizer: Any, records: tuple[list, list | None] | None = None):
    """The tokenized training (and validation) sets; ``records`` from :func:`read_data` (read here when None)."""
    from lorakit.train.data import build_datasets

    train_records, val_records = records if records is not None else read_data(config)
    return build_datasets(train_records, tokenizer, validation=val_records, val_fraction=config.val_fraction,
                          seed=config.seed, max_length=config.max_length, overflow=config.overflow, pack=config.pack,
                          chat_template_kwargs=config.chat_template_kwargs, progress=data_progress(config))


def data_progress(config: TrainConfig) -> bool | str:
    """How tokenizing the data shows progress (:func:`lorakit.train.data.build_dataset`): as training's does, a bar
    on a terminal (or --progress), plain lines in a log file (or --no-progress); nothing on a process other than the
    first, whose bars would draw over rank 0's (every process tokenizes the same data)."""
    from lorakit.train.loop import show_bar

    if not speaks():
        return False
    return True if show_bar(config.progress) else "lines"


def score(model, tokenizer, records, config: TrainConfig, device: torch.device, when: str = "") -> GenerationScore:
    """Exact match of greedy generations on ``records``; ``when`` ("before training") announces the scoring first,
    since generating a whole held-out set takes a minute or more on a CPU; a bar or plain lines then count its decode
    steps (lorakit.train.generation_progress)."""
    from lorakit.train.loop import compute_dtype_for

    if when:
        say(f"{when}: scoring {len(records)} held-out examples by exact match of greedy generations ...")
    return score_generations(model, tokenizer, records, max_new_tokens=config.max_new_tokens,
                             batch_size=config.eval_batch_size or GENERATION_BATCH, device=device,
                             compute_dtype=compute_dtype_for(model, device),
                             chat_template_kwargs=config.chat_template_kwargs,
                             progress=data_progress(config))  # a log gets lines: a bar's redraws, or nothing


def _score_line(label: str, result: GenerationScore) -> str:
    line = f"{label}: exact match {100 * result.exact_match:.1f}% ({result.correct}/{len(result.references)})"
    return line + (f"\n{result.note()}" if result.note() else "")


# -- the command ----------------------------------------------------------------------------------------------------
def run_training(config: TrainConfig, *, resume: str | None = None, overwrite: bool = False,
                 config_file_values: dict[str, Any] | None = None, cli_values: dict[str, Any] | None = None) -> dict:
    """Everything ``lorakit train`` does; returns the results written to ``results.json``."""
    with distributed_group(), _quiet_transformers():
        return _run_training(config, resume, overwrite, config_file_values, cli_values)


def _run_training(config: TrainConfig, resume: str | None, overwrite: bool, config_file_values: dict[str, Any] | None,
                  cli_values: dict[str, Any] | None) -> dict:
    started, cpu_started = time.perf_counter(), time.process_time()
    from lorakit.train.distributed import rank0_clock
    from lorakit.train.loop import world

    rank, world_size = world()
    main = rank == 0
    out = config.out
    # under torchrun each process names the folder: from rank 0's clock, or two processes could name two folders
    clock = rank0_clock() if world_size > 1 and not out and resume is None else None
    run_dir, resume_from = resolve_run_folder(out, resume, overwrite, clock)
    claimed = not out and resume is None and clock is None  # runs/<date-time>, made empty just now
    if resume_from is None:  # --overwrite clears lorakit's file names in the run folder: never in an input
        from lorakit.export import check_output_folder

        inputs: dict[str, str] = {}
        for kind, paths in (("training", config.data or []), ("validation", config.val_data or [])):
            for i, path in enumerate(p for p in paths if not any(ch in str(p) for ch in "*?[")):
                inputs[f"the {kind} data" + (f" ({i + 1})" if i else "")] = path
        if os.path.isdir(os.path.expanduser(config.model)):
            inputs["the model folder"] = config.model
        try:
            check_output_folder(run_dir, overwrite=True, protected=inputs)
        except LorakitError:
            if claimed:
                shutil.rmtree(run_dir, ignore_errors=True)
                with contextlib.suppress(OSError):
                    run_dir.parent.rmdir()
            raise
    existed = run_dir.is_dir() and not claimed
    fresh = resume_from is None and not (existed and any(run_dir.iterdir()))
    try:
        with sigterm_as_interrupt():
            return _run(config, run_dir, resume_from, started, cpu_started, config_file_values, cli_values,
                        replace=resume_from is None and not fresh)
    except BaseException as error:
        # a new run that failed (or was stopped) before its first checkpoint leaves nothing to resume: remove what
        # it wrote, so the same command can run again without --overwrite (a folder that held files is kept)
        resumable = (run_dir / "checkpoints" / "latest").is_file()
        if fresh and main and run_dir.is_dir() and not resumable:
            for child in (list(run_dir.iterdir()) if existed else [run_dir]):
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            if claimed:  # and runs/ when the claim made it (rmdir: only an empty one)
                with contextlib.suppress(OSError):
                    run_dir.parent.rmdir()
            if isinstance(error, KeyboardInterrupt):
                print(f"removed the unfinished run in {run_dir}", file=sys.stderr, flush=True)
        if isinstance(error, OSError) and error.filename is None and error.errno in (errno.ENOSPC, errno.EDQUOT):
            # a write that fails for room has no file name (the CLI would print a traceback): say where and what next
            from lorakit.train.distributed import resume_command

            then = f"continue with: {resume_command(run_dir)}" if resumable else "run the command again"
            raise LorakitError(f"the disk is full ({error.strerror}) while writing the run folder {run_dir}; free "
                               f"disk space, then {then}") from None
        raise


def clear_run_files(run_dir: Path) -> None:
    """``--overwrite``: remove an earlier run's files (only lorakit's own names; anything else stays), so its
    checkpoints, best adapter and metrics cannot mix with the new run's."""
    from lorakit.train.loop import ADAPTER_DIR, BEST_DIR, CHECKPOINTS_DIR, MODEL_DIR
    from lorakit.train.report import CURVE_NAME, METRICS_NAME

    for name in (ADAPTER_DIR, BEST_DIR, CHECKPOINTS_DIR, MODEL_DIR, "tensorboard", METRICS_NAME, CURVE_NAME,
                 CONFIG_NAME, RESULTS_NAME, BEFORE_NAME):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def finished_run(run_dir: Path, resume_from: Path, earlier: dict[str, Any], given: dict[str, Any]) -> dict | None:
    """The results of a run that a ``--resume`` finds finished (its results.json written, the checkpoint at its last
    step or where it stopped early, no option given that differs from the run's), after saying so; else None. The
    training loop would say "nothing to do" too, but only after minutes of loading the model, and the runner then
    scored the held-out set again."""
    from lorakit.train.checkpoint import find_checkpoint, read_state

    results = run_dir / RESULTS_NAME
    defaults = TrainConfig()
    if not results.is_file() or any(value != earlier.get(key, getattr(defaults, key, None))
                                    for key, value in given.items() if key not in ("out", "progress")):
        return None
    checkpoint = find_checkpoint(resume_from)
    state = read_state(checkpoint)
    step, total = int(state.get("step", 0)), state.get("total_steps")
    patience = earlier.get("early_stopping_patience")
    if isinstance(total, int) and step >= total:
        why = f"is at step {step}, the end of this run; nothing to do (raise --max-steps or --epochs to train further)"
    elif patience and int(state.get("since_best", 0)) >= patience:
        why = (f"is where the run stopped early at step {step}; nothing to do (raise --early-stopping-patience to "
               "train further)")
    else:
        return None
    try:
        summary = json.loads(results.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a damaged results file: the full resume rewrites it
        return None
    # results.json of an earlier finish: a run extended past it (--resume --max-steps 12 after 9 steps) that failed
    # to write its adapter (a full disk, a kill) after its last checkpoint left the step-9 adapter and results; this
    # said "nothing to do; the run's results are in results.json" over them. The full resume writes both again
    output = run_dir / ("model" if earlier.get("full") else "adapter")
    if not isinstance(summary, dict) or summary.get("steps") != step or not output.is_dir():
        return None
    say(f"checkpoint {checkpoint} {why}; the run's results are in {results}")
    return summary


def _run(config: TrainConfig, run_dir: Path, resume_from: Path | None, started: float, cpu_started: float,
         config_file_values: dict[str, Any] | None, cli_values: dict[str, Any] | None, replace: bool) -> dict:
    from lorakit.train.loop import world

    rank, world_size = world()
    main = rank == 0
    if resume_from is not None:  # the earlier run's options, then the config file's, then the flags'
        # how progress shows belongs to this invocation, not to the run: a run started at a terminal may go on under
        # nohup, and a config.yaml written before progress was decided at run time holds that default, "progress:
        # true", which forced a bar's redraws into the resumed run's log file
        earlier = {key: value for key, value in saved_config(run_dir).items() if key != "progress"}
        given = {**(config_file_values or {}), **(cli_values or {})}
        if "model" not in earlier and "model" not in given:  # else the default base loads, to be refused after
            state = "missing" if not (run_dir / CONFIG_NAME).is_file() else "empty (it names no model)"
            raise LorakitError(f"cannot resume from {run_dir}: its {CONFIG_NAME}, which keeps the run's options "
                               f"(model, data, adapter settings), is {state}; put it back, or give them again with the "
                               "run's original values: lorakit train --resume --out RUN --model ... --data ...")
        check_saved_paths(run_dir, earlier, given)
        from lorakit.train.config import layered

        config = TrainConfig(**layered(earlier, config_file_values, cli_values))
        from lorakit.train.loop import check_resume_options

        check_resume_options(saved_config(run_dir), config, run_dir)  # before minutes of loading
        from lorakit.train.distributed import check_resume_processes

        check_resume_processes(resume_from, run_dir, world_size)
        done = finished_run(run_dir, resume_from, earlier, given)
        if done is not None:  # no model to load, nothing to score again: the run's results stand
            return done
    config = config.replace(out=str(run_dir))
    from lorakit.commands._args import check_model_arg

    check_model_arg(config.model)  # a GGUF or weights file where a folder goes: said before reading any data
    if not config.data and config.max_steps is None and config.epochs == 1.0:
        # the embedded task is learnt by step ~12 (validation loss 0.011); 30 steps keep the demo inside 5 CPU minutes
        config = config.replace(max_steps=EMBEDDED_DEMO_STEPS)
    device = choose_device(config)
    torch.manual_seed(config.seed)

    from lorakit.train.preflight import local_config

    stored = (local_config(config.model) or {}).get("quantization_config")  # a folder `lorakit quantize` wrote
    # only a bitsandbytes 4-bit folder is one: GPTQ, AWQ, FP8 or 8-bit ones are refused by name as the model loads
    four_bit = isinstance(stored, dict) and stored.get("quant_method", "bitsandbytes") == "bitsandbytes" \
        and bool(stored.get("load_in_4bit") or stored.get("_load_in_4bit"))
    stored_type = str(stored.get("bnb_4bit_quant_type", "nf4")).upper() if four_bit else None
    base = (f"{config.model} ({config.quantize.upper()} 4-bit base: QLoRA)" if config.quantize
            else f"{config.model} ({stored_type} 4-bit base: QLoRA, a 4-bit folder)" if stored_type else config.model)
    say(f"lorakit train: {'full fine-tuning' if config.full else config.variant} of {base} on {device.type}; "
        f"run folder {run_dir}")
    sharded = config.fsdp and world_size > 1
    records = read_data(config)  # a malformed line is found before the model loads
    check_records_fit(config, records[0], world_size)  # and a batch the data cannot fill
    if sharded:
        model, tokenizer = load_sharded(config, device)
    else:
        model, tokenizer = load_model(config, device)
        check_module_names(model, config)
    from lorakit.models.text_part import text_model_note

    text_only = text_model_note(config.model, model, merged=False)  # a vision-language folder's text model
    if text_only:
        say(text_only)
    given = {**(config_file_values or {}), **(cli_values or {})}
    config = fit_max_length(config, model, explicit="max_length" in given or resume_from is not None)
    bundle = load_data(config, tokenizer, records)
    from lorakit.models.vocab_fit import check_ids_fit

    check_ids_fit(model, tokenizer, [("training", bundle.train), ("validation", bundle.val)])  # not an IndexError
    from lorakit.train.preflight import check_batch_fits

    # again on the tokenized rows: dropped examples and packing leave fewer than the records (said before training)
    check_batch_fits(config, len(bundle.train), world_size,
                     what="packed training rows" if config.pack else "training examples kept")
    say(f"training data: {bundle.train.summary}")
    if not getattr(tokenizer, "chat_template", None) and any(
            r.fallback is not None and r.fallback["prompt"].endswith("### Response:\n") for r in records[0]):
        say("note: Alpaca records are trained in Alpaca's prompt format (this tokenizer has no chat template); lorakit "
            "generate --adapter RUN/adapter asks the adapter in it too, and the tokenizer saved beside the adapter "
            "has a chat template that writes it (from Python, frame prompts the same way: "
            "lorakit.train.formats.frame_prompt('alpaca', prompt))")
    if bundle.train.summary.drop_note():
        say(bundle.train.summary.drop_note())
    if bundle.val is not None:
        say(f"validation data: {bundle.val.summary}")
        if bundle.val.summary.drop_note():  # its drops and special-token text, labelled: else they read as training's
            say(f"validation data: {bundle.val.summary.drop_note()}")
    if main:
        try:
            if replace:
                clear_run_files(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise LorakitError(f"cannot write the run folder {run_dir}: {error.strerror or error}; choose another --out") from None
        # a resume refused before its first step (other adapter settings) puts the run's options back: else the
        # plain `--resume` after it would read the refused flags from config.yaml and be refused again
        kept = (run_dir / CONFIG_NAME).read_text(encoding="utf-8") if resume_from is not None and (run_dir / CONFIG_NAME).is_file() else None
        atomic_write_text(run_dir / CONFIG_NAME, dump_yaml(config))

    eval_records = scorable(bundle.val.records)[: config.eval_examples] if bundle.val is not None else []
    before: dict[str, Any] | None = None
    # generation under FSDP needs every process (each forward gathers the shards); rank 0 alone writes and prints
    scoring = main or sharded
    if eval_records and scoring:
        before_path = run_dir / BEFORE_NAME
        if resume_from is not None and before_path.is_file():
            before = json.loads(before_path.read_text(encoding="utf-8"))
        elif resume_from is None:
            t = time.perf_counter()
            result = score(model, tokenizer, eval_records, config, device, when="before training")
            before = {"exact_match": result.exact_match, "examples": len(result.references),
                      "seconds": round(time.perf_counter() - t, 1)}
            if main:
                atomic_write_text(before_path, json.dumps(before) + "\n")
                append_metric(run_dir, {"kind": "eval", "when": "before", "step": 0, **before})
            say(_score_line(f"before training ({len(eval_records)} held-out examples)", result))
    elif not eval_records and config.eval_examples:
        say("no held-out examples with a reference answer: skipping the exact-match score (give --val-data or "
            "--val-fraction with prompt/completion or chat records)")

    try:
        result = train(model, tokenizer, bundle.train, config, val_data=bundle.val, out=run_dir, resume=resume_from)
    except LorakitError as error:
        if main and kept is not None and str(error).startswith("cannot resume"):
            atomic_write_text(run_dir / CONFIG_NAME, kept)
        raise
    except KeyboardInterrupt as error:
        if main:
            print(interrupted_hint(run_dir, error), file=sys.stderr, flush=True)
        raise
    from lorakit.inject import trainable_report
    from lorakit.train.report import example_prompt, next_commands, prompt_style

    share = trainable_report(model)
    summary: dict[str, Any] = {
        "model": config.model, "method": "full" if config.full else config.variant, "device": device.type,
        "steps": result.steps, "total_steps": result.total_steps, "stopped": result.stopped,
        "train_loss": result.train_loss, "best_val_loss": result.best_val_loss, "best_step": result.best_step,
        "skipped_steps": result.skipped_steps, "tokens": result.tokens, "train_seconds": round(result.seconds, 1),
        "trainable_parameters": share.trainable, "total_parameters": share.total, "trainable_share": share.share,
        "dropped_examples": bundle.train.summary.dropped, "truncated_examples": bundle.train.summary.truncated,
        "exact_match_before": before["exact_match"] if before else None,
        **prompt_style(bundle.train.records),  # how `lorakit generate --adapter RUN/adapter` frames its prompt
    }
    if device.type == "cuda":
        summary["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if eval_records and scoring:
        after = score(model, tokenizer, eval_records, config, device, when="after training")
        summary["exact_match_after"] = after.exact_match
        summary["eval_examples"] = len(after.references)
        if main:
            append_metric(run_dir, {"kind": "eval", "when": "after", "step": result.steps,
                                    "exact_match": after.exact_match, "examples": len(after.references)})
        if before:
            say(f"held-out exact match: {100 * before['exact_match']:.1f}% before -> {100 * after.exact_match:.1f}% "
                f"after ({len(after.references)} examples)" + (f"\n{after.note()}" if after.note() else ""))
        else:
            say(_score_line("after training", after))
        for i in range(min(config.samples, len(after.references))):
            mark = "ok " if after.matches[i] else "XX "
            say(f"  [{mark.strip()}] {after.prompts[i]!r}\n       -> {after.predictions[i]!r}"
                + ("" if mark == "ok " else f"\n       expected {after.references[i]!r}"))
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    summary["cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    if main:
        try:
            atomic_write_text(run_dir / RESULTS_NAME, json.dumps(summary, indent=2) + "\n")
        except OSError as error:  # the adapter is saved by now: say so, not only that a write failed
            raise LorakitError(f"writing {run_dir / RESULTS_NAME} failed ({error.strerror or error}); the training "
                               f"finished and its {'model' if config.full else 'adapter'} is saved in "
                               f"{result.adapter_dir}") from None
        what = "model" if config.full else "adapter"
        say(f"done in {summary['total_seconds']:.0f} s: {_steps(result.steps)}, final train loss "
            f"{_fmt(result.train_loss)}, best validation loss {_fmt(result.best_val_loss)}"
            + (f", {_steps(result.skipped_steps)} skipped" if result.skipped_steps else ""))
        curve = f"  |  curve: {run_dir / 'loss_curve.png'}" if (run_dir / "loss_curve.png").is_file() else ""
        say(f"{what}: {result.adapter_dir}  |  metrics: {run_dir / 'metrics.jsonl'}{curve}  |  config: "
            f"{run_dir / CONFIG_NAME}")
        say(next_commands(result.adapter_dir, config.model, config.full, example_prompt(bundle.train.records),
                          validation=bundle.val is not None))
    return summary


def _steps(count: int) -> str:
    """ "1 step", "2 steps": the count of the run's last line (a --max-steps 1 smoke test said "1 steps")."""
    return f"{count} step" + ("" if count == 1 else "s")


def append_metric(run_dir: Path, entry: dict[str, Any]) -> None:
    """One more line in metrics.jsonl (the before/after scores sit beside the training lines)."""
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


@contextlib.contextmanager
def _quiet_transformers():
    """No per-file loading bars from transformers during the run (it prints its own progress); afterwards they are
    as they were, for a notebook that goes on loading models."""
    try:
        from transformers.utils import logging as hf_logging

        was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    except Exception:  # a transformers without this switch only prints more
        yield
        return
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
