"""``lorakit train``: flags generated from :class:`lorakit.train.config.TrainConfig` (its field docs are the help).

Precedence: defaults < ``--config FILE`` (YAML or TOML) < flags given on the command line (only flags actually
given override: argparse defaults are suppressed, so the help shows the real defaults without applying them).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.train.config import DEFAULT_FULL_LR, DEFAULT_LORA_LR, FIELDS, TrainConfig, check_values, read_config_file, resolve_config

_TYPES = {"int": int, "float": float, "str": str}

EPILOG = """examples:
  lorakit train                                     # the embedded demo: SmolLM2-135M-Instruct on the 'orders' task
  lorakit train --data train.jsonl --val-fraction 0.1 --out runs/mine --rank 8 --epochs 3
  lorakit train --config run.yaml --lr 1e-4         # a config file, with one option overridden
  lorakit train --resume --out runs/mine            # continue a stopped run from its last checkpoint

a config file names options as below, with underscores or dashes (each run writes its own as RUN/config.yaml):
  # run.yaml
  model: ./my-base
  data: [train.jsonl]
  val_fraction: 0.1
  rank: 8
  epochs: 3
"""


def _base_type(field: dataclasses.Field) -> type:
    kind = str(field.type)
    for name, typ in _TYPES.items():
        if kind.startswith(name) or kind.startswith(f"list[{name}]"):
            return typ
    return str


def _default_text(field: dataclasses.Field) -> str:
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if default is None or default == [] or default == {}:
        return ""
    if isinstance(default, bool):
        return " (default: on)" if default else ""
    return f" (default: {default})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag, in groups, plus --config, --resume and --overwrite."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    run = parser.add_argument_group("run")
    run.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                     help="YAML, TOML or JSON file of options (names as below, dashes or underscores); flags override it")
    run.add_argument("--resume", nargs="?", const="latest", default=argparse.SUPPRESS, metavar="RUN_OR_CHECKPOINT",
                     help="continue a stopped run from its last checkpoint: a run folder or checkpoint folder; alone, "
                          "the run in --out (or the newest under runs/). The run's saved options are reused; "
                          "a different model, data, batch or adapter setting is refused; optimizer flags given "
                          "(--lr, --loraplus-ratio, --weight-decay, --schedule, --max-steps...) apply from the next step")
    run.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                     help="allow --out to be a folder that already holds files")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        if meta.get("cli") is False:
            continue
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flag = "--" + field.name.replace("_", "-")
        help_text = meta["help"] + _default_text(field)
        if str(field.type).split(" ")[0] == "bool":  # "bool | None" too: --progress / --no-progress / unset
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            continue
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "type": _base_type(field)}
        if "choices" in meta:
            kwargs["choices"] = list(meta["choices"])
        if meta.get("json"):  # parsed (and refused in one line) by check_values, not by argparse
            kwargs["metavar"] = "JSON"
        if meta.get("nargs"):
            kwargs["nargs"] = meta["nargs"]
            kwargs["action"] = "extend"  # --data a.jsonl --data b.jsonl trains on both (not only the last)
            kwargs["metavar"] = "PATH" if field.name in ("data", "val_data") else "NAME"
        group.add_argument(flag, **kwargs)


# options that only shape a LoRA adapter: with --full (every weight trained) they would be ignored without a word
LORA_ONLY = ("rank", "alpha", "dropout", "targets", "exclude", "variant", "init", "rank_pattern", "alpha_pattern",
             "loraplus_ratio", "modules_to_save", "target_parameters")


def check_conflicts(config: TrainConfig, file_values: dict[str, Any], cli_values: dict[str, Any]) -> None:
    """Refuse options given together that cannot both apply (a config file's values count only when they differ
    from the default, so a run's own resolved config.yaml, which lists every option, passes back in)."""
    defaults = TrainConfig()
    given = {k for k in cli_values} | {k for k, v in file_values.items() if v != getattr(defaults, k)}
    if config.full:
        ignored = [k for k in LORA_ONLY if k in given]
        if ignored:
            flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
            raise LorakitError(f"--full trains every weight, so {flags} would be ignored (adapter options); drop "
                               f"{'it' if len(ignored) == 1 else 'them'} or drop --full")
    if "full" in cli_values and file_values.get("full", False) != config.full and "lr" in file_values \
            and "lr" not in cli_values:  # a LoRA run's config.yaml (which lists its lr) reused for a --full baseline
        raise LorakitError(f"the config file's lr {file_values['lr']:g} was set for {'full fine-tuning' if file_values.get('full') else 'LoRA'}, "
                           f"and --{'' if config.full else 'no-'}full changes the method; give --lr too (the default is "
                           f"{DEFAULT_FULL_LR if config.full else DEFAULT_LORA_LR:g} for "
                           f"{'full fine-tuning' if config.full else 'LoRA'})")
    if config.data and not config.val_data and config.val_fraction is None:  # --data alone: no validation set
        needs = [k for k in ("eval_every", "early_stopping_patience") if k in given and getattr(config, k)]
        if needs:
            flags = " and ".join("--" + k.replace("_", "-") for k in needs)
            raise LorakitError(f"{flags} need{'s' * (len(needs) == 1)} a validation set, and --data alone has none; "
                               "add --val-data FILE or --val-fraction 0.1")


def check_file_paths(config_file: str, file_values: dict[str, Any]) -> None:
    """Paths in a config file are read from the current folder (as on the command line). A path that is missing
    from here but sits beside the config file is the likely mix-up: say which path to write."""
    here = Path(config_file).parent
    for key in ("model", "data", "val_data"):
        values = file_values.get(key)
        for value in ([values] if isinstance(values, str) else values or []):
            path = Path(value).expanduser()
            if path.is_absolute() or path.exists() or not (here / path).exists() or str(here) in ("", "."):
                continue
            raise LorakitError(f"{config_file}: {key} {value!r} is not found from the current folder, but "
                               f"{here / path} is; paths in a config file are read from where lorakit runs: write "
                               f"{str(here / path)!r} (or run from {str(here)!r})")


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any], dict[str, Any]]:
    """(resolved config, the config file's values, the flags given), from parsed arguments."""
    given = {k: v for k, v in vars(args).items() if k in FIELDS}
    file_values = read_config_file(args.config) if getattr(args, "config", None) else {}
    if file_values:
        check_file_paths(args.config, file_values)
    cli_values = check_values(given, source="command line")
    try:
        config = resolve_config(file_values, cli_values)
    except LorakitError as error:  # a value from the config file alone: say which file it is in
        flag = re.match(r"--([a-z0-9-]+)", str(error))
        key = flag.group(1).replace("-", "_") if flag else None
        if key in file_values and key not in cli_values:
            raise LorakitError(f"{args.config}: {error}") from None
        raise
    check_conflicts(config, file_values, cli_values)
    return config, file_values, cli_values


def check_resume_source(resume: str, out: str | None) -> None:
    """The folder ``--resume`` names must hold a checkpoint: said before the model loads, with what the folder is
    instead (a file, an adapter or a model folder, a run's adapter folder) rather than 'no checkpoint in it'."""
    from lorakit.train.checkpoint import find_checkpoint
    from lorakit.train.runner import latest_run

    source = Path(resume).expanduser() if resume != "latest" else (Path(out) if out else latest_run())
    if not source.exists():
        return  # the runner's "cannot resume: ... does not exist" names it
    if source.is_file():
        raise LorakitError(f"--resume {source} is a file; give the run folder (the --out of the earlier run) or one "
                           "of its checkpoints")
    try:
        find_checkpoint(source)
    except LorakitError:
        run_dir = next((p for p in source.resolve().parents if (p / "config.yaml").is_file() and (p / "checkpoints").is_dir()),
                       None)
        if run_dir is not None:
            raise LorakitError(f"--resume {source} sits inside the run folder {run_dir}; give that folder: "
                               f"--resume {shlex.quote(str(run_dir))}") from None
        kind = ("an adapter folder" if (source / "adapter_config.json").is_file() else
                "a model folder" if (source / "config.json").is_file() else None)
        if kind is not None:
            raise LorakitError(f"--resume {source} is {kind}, not a run folder: --resume continues a stopped "
                               "`lorakit train` run from its checkpoints (RUN/checkpoints); to start a run, leave "
                               "--resume out") from None
        raise


def run(args: argparse.Namespace) -> int:
    from lorakit.train.runner import run_training

    if getattr(args, "resume", None) is not None and getattr(args, "overwrite", False):
        raise LorakitError("--resume continues a run and --overwrite starts it again from scratch; give one")
    config, file_values, cli_values = config_from_args(args)
    if getattr(args, "resume", None) is not None:
        check_resume_source(args.resume, config.out)
    else:  # a resumed run's options come from its folder: checked there
        from lorakit.train.preflight import check_before_loading

        check_before_loading(config, set(file_values) | set(cli_values))
    run_training(config, resume=getattr(args, "resume", None), overwrite=getattr(args, "overwrite", False),
                 config_file_values=file_values, cli_values=cli_values)
    return 0
