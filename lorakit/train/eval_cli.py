"""``lorakit eval``: loss, perplexity and exact match of greedy generations, for a base model with or without an adapter.

Loss is the mean cross-entropy per supervised token (the same targets as training: completions / assistant turns,
or all of a text record); perplexity is exp(loss); exact match compares each greedy generation, whitespace-trimmed,
with the record's answer (records of the text shape have no answer and are only used for the loss); for reasoning
models, the final answers after the last ``</think>``. For an adapter of a ``lorakit train`` run (RUN/adapter,
RUN/best, RUN/checkpoints/step-N/adapter), ``--max-length``, ``--overflow``, ``--chat-template-kwargs`` and, without
``--data``, the records scored default to the run's (its config.yaml), so eval's loss is the run's validation loss.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path

from lorakit.errors import LorakitError

CONFIG_NAME = "config.yaml"  # lorakit.train.runner's name, not imported from there: it loads torch and the loop
RUN_KEYS = frozenset({"model", "out", "rank", "lr"})  # options every run's config.yaml holds


EPILOG = """examples:
  lorakit eval                                                    # the embedded model on the embedded task
  lorakit eval --model ./base --adapter runs/mine/adapter --data val.jsonl --json results.json
  lorakit eval --model ./base --adapter runs/mine/checkpoints/step-000200/adapter   # on the run's validation data
  lorakit eval --model ./base --data val.jsonl --no-generate      # the base alone, loss and perplexity only
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--model", default=None, help="base model: embedded name, local Hugging Face folder or "
                        "org/name id in the Hugging Face cache (default: smollm2-135m)")
    parser.add_argument("--adapter", metavar="FOLDER", help="adapter folder (PEFT format, e.g. RUN/adapter); omit to "
                        "score the base model alone")
    parser.add_argument("--data", nargs="+", action="extend", metavar="PATH", help="JSONL / CSV files or a datasets folder; default: the "
                        "validation data of the adapter's lorakit train run (its --val-data, or the records its "
                        "--val-fraction held out), else the embedded task's held-out set")
    parser.add_argument("--max-length", type=int, default=None, help="most tokens per example (default: the "
                        "adapter's training run's, else 256, or the model's context length when shorter)")
    parser.add_argument("--overflow", choices=("drop", "truncate", "error", "split"), default=None,
                        help="examples longer than --max-length: drop (counted), truncate, error or split (text records "
                        "in windows of --max-length tokens) (default: the adapter's training run's, else drop)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per batch (default: 16)")
    parser.add_argument("--limit", type=int, default=None, help="score at most this many examples")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="most tokens generated per example "
                        "(default: the reference's length + 4 up to 64; twice the reference + 16 for answers that "
                        "reason in <think> first)")
    parser.add_argument("--chat-template-kwargs", metavar="JSON", default=None, help="options of the model's chat "
                        "template as a JSON object, e.g. '{\"enable_thinking\": false}' (Qwen3); default: those the "
                        "adapter's run was trained with (its config.yaml), else none")
    parser.add_argument("--no-generate", action="store_true", help="report loss and perplexity only")
    parser.add_argument("--samples", type=int, default=3, help="generations to print (default: 3)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu; default: the best available")
    parser.add_argument("--dtype", default=None, help="base weight dtype (float32, bfloat16, float16)")
    parser.add_argument("--quantize", choices=("nf4",), default=None, help="store the base in 4-bit NF4")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a redrawn bar (--progress) or a plain line now and then (--no-progress); default: a "
                        "bar when stderr is a terminal, lines otherwise (a log file), as in lorakit train")


def run(args: argparse.Namespace) -> int:
    from lorakit._fs import atomic_write_text
    from lorakit.io import load_adapter
    from lorakit.models import load_base
    from lorakit.models.loading import context_length
    from lorakit.train.config import TrainConfig
    from lorakit.train.batches import Collator
    from lorakit.train.data import build_dataset, pad_id_for
    from lorakit.train.evaluate import dataset_loss, perplexity, score_generations, scorable
    from lorakit.train.sources import VALIDATION_SPLITS, read_many, reading_progress, repeated_note
    from lorakit.train.loop import compute_dtype_for, show_bar
    from lorakit.train.runner import choose_device

    for name in ("batch_size", "max_new_tokens", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise LorakitError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_length is not None and args.max_length < 2:  # a token to read and one to predict
        raise LorakitError(f"--max-length must be at least 2 (an example needs a token to read and one to predict), "
                           f"got {args.max_length}")
    if "-" in (args.data or []):  # Unix's "standard input"
        raise LorakitError("--data -: lorakit reads data from files, not standard input; save the records to a file "
                           "first, e.g. ... > val.jsonl, then --data val.jsonl")
    if args.samples < 0:
        raise LorakitError(f"--samples must be 0 or more (generations to print), got {args.samples}")
    if args.json is not None and not args.json.strip():  # an unset variable: the results would not be written
        raise LorakitError("--json is empty (an unset shell variable?); give the results file, e.g. --json results.json")
    if args.json:  # a results file that cannot be written is found out before minutes of scoring
        args.json = os.path.expanduser(args.json)
        target = Path(args.json)
        if target.exists() and not target.is_dir() and not target.is_file():  # /dev/null: the write would replace it
            raise LorakitError(f"--json {args.json} is not a regular file (a device or a pipe), which the results "
                               "would replace; give a file path, e.g. --json results.json")
        if target.is_dir() or not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
            raise LorakitError(f"--json {args.json}: cannot write a file there (a folder, or a parent folder that does "
                               "not exist or is not writable)")
        real = os.path.realpath(target)
        for given in [*(args.data or []), args.adapter, args.model or ""]:  # the results would replace an input
            source = os.path.realpath(os.path.expanduser(given)) if given else None
            if source and (real == source or real.startswith(source.rstrip(os.sep) + os.sep)):
                raise LorakitError(f"--json {args.json} is or sits inside the input {given}; writing the results "
                                   "there would replace it: choose another file, e.g. --json results.json")
    from lorakit.commands._args import check_adapter_arg, check_base_names, check_model_arg, check_writable, explain_misfit
    from lorakit.io import read_adapter
    from lorakit.train.config import check_template_kwargs
    from lorakit.train.preflight import config_context, local_config

    template_kwargs = check_template_kwargs(args.chat_template_kwargs) if args.chat_template_kwargs is not None else None

    if args.json:
        check_writable(args.json, "--json")
    if args.model is not None:
        check_model_arg(args.model)
    adapter_file = None
    if args.adapter:
        check_adapter_arg(args.adapter)
        adapter_file = read_adapter(args.adapter)  # checked (and read once) before the base loads
    defaulted = args.model is None
    args.model = check_base_names(args.model, [(args.adapter, adapter_file)] if adapter_file else [])
    declared = config_context(local_config(args.model) or {})
    if args.max_length is not None and declared is not None and args.max_length > declared:
        raise LorakitError(f"--max-length {args.max_length} is longer than the model's context of {declared} tokens "
                           f"(max_position_embeddings in its config.json); pass --max-length {declared} or less")
    started = time.perf_counter()
    progress = True if show_bar(args.progress) else "lines"  # a bar on a terminal, plain lines in a log
    device = choose_device(TrainConfig(device=args.device))
    # the output of a lorakit train run scored here: an adapter of a run, or a run's fully fine-tuned model (--full)
    run_output, kind = (args.adapter, "adapter") if args.adapter else (args.model, "model")
    if run_folder(run_output) is None or (kind == "model" and not (
            Path(run_output).expanduser().is_dir() and run_config(run_output)[1].get("full") is True)):
        run_output = None
    records, results_extra = None, {}
    if args.data:
        paths = args.data
    elif run_output is None:
        from lorakit.data import embedded_dataset_paths

        paths = [str(embedded_dataset_paths()[1])]
    if run_output is not None:
        # the run's validation loss was scored on its validation data, at its max_length / overflow, its chats
        # rendered with its template options: eval scores the same examples the same way unless a flag says otherwise
        config_path, _ = run_config(run_output)
        taken = {}
        if not args.data:
            with reading_progress(progress):
                paths, records, taken["data"] = run_validation_data(run_output, kind)
            results_extra["data_from_run"] = taken["data"]  # "data" names the files; this, which of their records
        for name, value in run_length_options(run_output).items():
            if getattr(args, name) is None:
                taken[name] = value
                setattr(args, name, value)
        if template_kwargs is None:
            template_kwargs = run_template_kwargs(run_output)
            if template_kwargs:
                taken["chat_template_kwargs"] = shlex.quote(json.dumps(template_kwargs))
        if taken:  # one line: what came from which config
            print(f"from the {kind}'s run: " + ", ".join(
                value if name == "data" else f"--{name.replace('_', '-')} {value}" for name, value in taken.items())
                + f" (read from {_shown(config_path)}, as the run scored its validation loss; "
                f"{' / '.join('--' + n.replace('_', '-') for n in taken)} to change)")
            results_extra["run_config"] = str(config_path)
    if records is None:
        if repeated_note(paths, "--data"):
            print(repeated_note(paths, "--data"))
        if run_output is not None:
            warning = trained_on_warning(run_output, paths)
            if warning:
                print(warning)
        with reading_progress(progress):  # a large file: its lines / rows counted, as train's reading is
            records = read_many(paths, split=VALIDATION_SPLITS)  # a folder or file of splits: its validation (or test) split
    if args.limit is not None:
        records = records[: args.limit]
    try:
        model, tokenizer = load_base(args.model, dtype=args.dtype, device=device, quantize=args.quantize)
    except (ImportError, NotImplementedError) as error:
        if args.quantize:
            raise LorakitError(f"--quantize {args.quantize} is not available in this install ({error})") from None
        raise
    if args.adapter:
        from lorakit.commands._adapter_folder import adapter_tokenizer, resize_for

        resize_for(model, adapter_file, args.adapter)  # a resized vocabulary (peft's whole embedding / head)
        try:
            load_adapter(model, adapter_file)
        except LorakitError as error:  # another base's adapter: say which base, and how to pass it
            raise explain_misfit(error, adapter_file, args.model, defaulted) from None
        tokenizer = adapter_tokenizer(args.adapter, model) or tokenizer  # its chat template renders the records
    if args.overflow is None:
        args.overflow = "drop"
    limit = context_length(model)
    if args.max_length is None:
        args.max_length = min(256, limit or 256)
    elif limit is not None and args.max_length > limit:
        raise LorakitError(f"--max-length {args.max_length} is longer than the model's context of {limit} tokens; "
                           f"pass --max-length {limit} or less")
    dataset = build_dataset(records, tokenizer, args.max_length, args.overflow, name=", ".join(map(str, paths)),
                            chat_template_kwargs=template_kwargs, progress=progress)  # after PROGRESS_DELAY_S only
    from lorakit.models.vocab_fit import check_ids_fit

    check_ids_fit(model, tokenizer, [("evaluation", dataset)])  # an id past the embedding: not an IndexError
    compute_dtype = compute_dtype_for(model, device)
    loss, tokens = dataset_loss(model, dataset, args.batch_size, Collator(pad_id_for(tokenizer)), device, compute_dtype,
                                progress=progress)
    what = f"{args.model}" + (f" + adapter {args.adapter}" if args.adapter else " (no adapter)")
    results = {"model": args.model, "adapter": args.adapter, "data": [str(p) for p in paths],
               "examples": len(dataset), "dropped": dataset.summary.dropped, "truncated": dataset.summary.truncated,
               "supervised_tokens": tokens, "loss": loss, "perplexity": perplexity(loss)}
    print(f"{what} on {len(dataset)} examples ({dataset.summary.dropped} dropped, {dataset.summary.truncated} truncated "
          f"at max_length={args.max_length})")
    if dataset.summary.drop_note():
        print(dataset.summary.drop_note())
    print(f"loss {loss:.4f} per supervised token ({tokens} tokens), perplexity {perplexity(loss):.3f}")
    scored = scorable(dataset.records)
    if not args.no_generate and scored:
        result = score_generations(model, tokenizer, scored, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size, device=device, compute_dtype=compute_dtype,
                                   progress=progress, chat_template_kwargs=template_kwargs)
        results.update(exact_match=result.exact_match, scored_examples=len(result.references))
        print(f"exact match {100 * result.exact_match:.1f}% ({result.correct}/{len(result.references)})"
              + (" of the final answers (after </think>)"
                 if any("</think>" in t for t in result.predictions + result.references) else ""))
        if result.note():
            print(result.note())
            results["unanswered"] = result.unanswered
        for i in range(min(args.samples, len(result.references))):
            ok = result.matches[i]
            print(f"  [{'ok' if ok else 'XX'}] {result.prompts[i]!r} -> {result.predictions[i]!r}"
                  + ("" if ok else f" (expected {result.references[i]!r})"))
    elif not args.no_generate:
        print("exact match: no record has a reference answer (text records); loss and perplexity only")
    if template_kwargs:
        results["chat_template_kwargs"] = template_kwargs
    results.update(results_extra)
    results["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(results, indent=2) + "\n")
    return 0


def run_candidates(folder: Path) -> list[Path]:
    """The folders that would be the run of adapter folder ``folder`` if it is a run's: its parent (RUN/adapter,
    RUN/best), and for a checkpoint's adapter (RUN/checkpoints/step-000120/adapter) the run three levels up."""
    candidates = [folder.parent]
    step = folder.parent.name  # step-000120 (lorakit.train.checkpoint's names)
    if step.startswith("step-") and step[5:].isdigit() and folder.parent.parent.name == "checkpoints":
        candidates.append(folder.parent.parent.parent)
    return candidates


def run_folder(adapter: str) -> Path | None:
    """The ``lorakit train`` run folder that holds the adapter folder ``adapter``, or None (an adapter from elsewhere).

    The run's own adapters sit one level down (RUN/adapter, RUN/best), a checkpoint's three
    (RUN/checkpoints/step-000120/adapter); that folder counts as a run's when its config.yaml holds a run's options
    (a user's unrelated config.yaml above an adapter is not read as one)."""
    for run_dir in run_candidates(Path(adapter).expanduser().resolve()):
        if RUN_KEYS <= set(_read_config(run_dir / CONFIG_NAME) or {}):
            return run_dir
    return None


def _shown(path: Path) -> str:
    """``path`` relative to the current folder when it lies inside it (as the user typed the adapter), else whole."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _read_config(path: Path) -> dict | None:
    """config.yaml's mapping, or None (missing, unreadable, not a mapping)."""
    import yaml

    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return values if isinstance(values, dict) else None


def run_config(adapter: str) -> tuple[Path | None, dict]:
    """(path, values) of the config.yaml of the ``lorakit train`` run folder that holds ``adapter`` (RUN/adapter,
    RUN/best, RUN/checkpoints/step-N/adapter: see :func:`run_folder`); (None, {}) for an adapter from elsewhere."""
    run_dir = run_folder(adapter)
    if run_dir is None:
        return None, {}
    return run_dir / CONFIG_NAME, _read_config(run_dir / CONFIG_NAME) or {}


def run_validation_data(adapter: str, what: str = "adapter") -> tuple[list[str], list, str]:
    """(files, records, what they are in a few words) of the validation data of the run that trained ``adapter``:
    its --val-data, or the records its --val-fraction held out (the same seeded split, so none it trained on), or
    the embedded task's held-out set for a run on the embedded task. eval of a run's adapter without --data scored
    the embedded task instead, whatever the adapter had learnt. ``adapter`` may also be the model folder of a
    ``--full`` run (``what`` = "model": how the messages name it).

    Raises:
        LorakitError: the run held out nothing, or its data files are not found from the current folder.
    """
    from lorakit.train.data import split_records
    from lorakit.train.runner import path_found, start_folder
    from lorakit.train.sources import VALIDATION_SPLITS, read_many

    config, values = run_config(adapter)

    def files_of(key: str) -> list[str]:
        given = values.get(key)
        files = [given] if isinstance(given, str) else [str(f) for f in given or []]
        for file in files:  # the run's paths are as typed where it started: say so rather than "not found"
            if not path_found(Path(file).expanduser()):
                relative = not Path(file).expanduser().is_absolute()
                home = start_folder(config.parent, [file]) if relative else None  # as a resume names it
                where = (f" ({Path.cwd()}); the run's paths are as typed where it started: they are found from "
                         f"{home}: cd there, or" if home is not None else " (the run started elsewhere?);")
                raise LorakitError(f"the {what}'s run read --{key.replace('_', '-')} {file} ({_shown(config)}), "
                                   f"which is not found from this folder{where} give the records to score with --data")
        return files

    fraction, seed = values.get("val_fraction"), values.get("seed", 0)
    if values.get("val_data"):
        files = files_of("val_data")
        return files, read_many(files, split=VALIDATION_SPLITS), f"--val-data {' '.join(files)}"
    if values.get("data"):
        files = files_of("data")
    else:  # the embedded task: its held-out file, unless the run held out part of its training file instead
        from lorakit.data import embedded_dataset_paths

        train_path, val_path = embedded_dataset_paths()
        if not isinstance(fraction, (int, float)):
            return [str(val_path)], read_many([val_path]), "the embedded task's held-out set"
        files = [str(train_path)]
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool):
        raise LorakitError(f"the {what}'s run ({_shown(config)}) held out no validation data (no --val-data or "
                           "--val-fraction), so it has no records it did not train on to score; give them with --data")
    held_out = split_records(read_many(files), float(fraction), seed if isinstance(seed, int) else 0)[1]
    return files, held_out, (f"the {len(held_out)} records its --val-fraction {fraction} held out of "
                             f"{' '.join(files)} (seed {seed})")


def trained_on_warning(adapter: str, paths: list[str]) -> str | None:
    """A warning when an eval --data file is one the run of ``adapter`` trained on (by where the files lie, as its
    config.yaml names them), else None: its scores then show memorisation, not how the adapter does on new
    records. Train warns the same of a validation file that is its training file."""
    config, values = run_config(adapter)
    given = values.get("data")
    trained = {os.path.realpath(os.path.expanduser(f)) for f in ([given] if isinstance(given, str) else given or [])
               if isinstance(f, str)}
    same = [path for path in paths if os.path.realpath(os.path.expanduser(str(path))) in trained]
    if not same:
        return None
    fraction = values.get("val_fraction")
    part = (f"all its records but the {fraction:.0%} held out (--val-fraction {fraction}) were trained on"
            if isinstance(fraction, float) else "all its records were trained on")
    return (f"warning: --data {' '.join(map(str, same))} is the run's training data ({_shown(config)}): {part}, so the "
            "scores show what it memorised, not how it does on new records; leave out --data to score the run's "
            "validation data, or give held-out records")


def run_template_kwargs(adapter: str) -> dict:
    """The chat template options a ``lorakit train`` run used (its config.yaml); {} for an adapter from elsewhere."""
    from lorakit.train.config import check_template_kwargs

    config, values = run_config(adapter)
    found = values.get("chat_template_kwargs")
    return check_template_kwargs(found, f"{config}: chat_template_kwargs") if found else {}


def run_length_options(adapter: str) -> dict:
    """``max_length`` and ``overflow`` of the run that trained ``adapter`` (config.yaml holds them after the run
    fitted max_length to the model's context), those of them that are valid; {} for an adapter from elsewhere."""
    _, values = run_config(adapter)
    found = {}
    length = values.get("max_length")
    if isinstance(length, int) and not isinstance(length, bool) and length >= 2:
        found["max_length"] = length
    if values.get("overflow") in ("drop", "truncate", "error", "split"):
        found["overflow"] = values["overflow"]
    return found
