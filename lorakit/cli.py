"""``lorakit`` command line: a thin table of subcommands, each implemented in its own module.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only
when their subcommand runs, so ``lorakit --help`` stays fast. A ``LorakitError`` (a user mistake) prints one
line and exits with status 2, as does an OSError about a path (too long, no permission, a full disk); anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import textwrap
import threading
from typing import Callable

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("lorakit.commands.demo", "load the embedded model, inject an adapter, show trainable share and a generation"),
    "train": ("lorakit.train.cli", "fine-tune a causal LM with LoRA (no arguments: the embedded demo task)"),
    "eval": ("lorakit.train.eval_cli", "loss, perplexity and exact match of a model (+ adapter) on a data file"),
    "generate": ("lorakit.commands.generate", "generate text with a base model and zero or more adapters"),
    "merge": ("lorakit.commands.merge", "merge an adapter into its base and write a Hugging Face (or GGUF) model"),
    "combine": ("lorakit.commands.combine", "build one adapter from weighted adapters (peft's add_weighted_adapter)"),
    "quantize": ("lorakit.commands.quantize", "quantize a 16-bit base to NF4 once and save it as a 4-bit folder"),
    "inspect": ("lorakit.commands.inspect", "describe an adapter folder: rank, alpha, variant, targets, size, base"),
    "serve": ("lorakit.serve.cli", "OpenAI-compatible HTTP server over one base model and many adapters"),
}
# what a command needs beyond `pip install lorakit`, said under its --help's description (a core install has the
# help, and would otherwise learn of the extra only when the command fails)
NEEDS_EXTRA: dict[str, str] = {
    "serve": "Needs the serve extra (FastAPI, uvicorn, llguidance): pip install 'lorakit[serve]'",
}


EPILOG = """a first session:
  lorakit demo                                               # the embedded model with a fresh adapter
  lorakit train --data train.jsonl --val-fraction 0.1 --out runs/mine
  lorakit generate --adapter runs/mine/adapter "Two lattes to Berlin"
  lorakit serve --adapters runs/mine                         # OpenAI-compatible; models "adapter" and "best"

lorakit COMMAND --help (or lorakit help COMMAND) shows each command's options, defaults and examples.

environment:
  LORAKIT_CACHE           where the embedded model is converted on first use (default: ~/.cache/lorakit)
  LORAKIT_API_KEY         lorakit serve's --api-key when the flag is not given
  LORAKIT_PROGRESS        0: no progress from library calls (merge, loading, quantizing) in your own programs
  LORAKIT_DISABLE_TRITON  1: PyTorch reference kernels instead of the Triton ones (comparisons, bisecting)
  LORAKIT_DISABLE_PDL     1: no programmatic dependent launch between kernels on Hopper GPUs
"""

# other tools' names of our options (transformers' Trainer, vLLM, peft scripts, OpenAI's API), suggested when typed;
# each is offered only to a command that has the option it names (lorakit train adds its config-file aliases)
OTHER_NAMES: dict[str, str | tuple[str, ...]] = {  # a tuple: the first option the command has
    "output": "out", "output_dir": "out", "output_path": "out", "save_dir": "out", "save_path": "out",
    "adapter_path": "adapter", "adapter_dir": "adapter", "lora_path": "adapter", "lora": "adapter",
    "peft_model": "adapter", "model_path": "model", "model_name": "model", "model_name_or_path": "model",
    "base_model": "model", "base": "model", "max_tokens": "max_new_tokens", "max_length_new": "max_new_tokens",
    "adapter_dirs": "adapters", "lora_modules": "adapters", "data_path": "data", "dataset_path": "data",
    "train_data": "data", "eval_data": ("val_data", "data"),
    # lorakit eval's --limit: train's --eval-examples, lm-eval's --limit, HF scripts' --max-eval-samples
    "eval_examples": "limit", "max_samples": "limit", "max_eval_samples": "limit", "num_examples": "limit",
    "examples": "limit",
}
# other tools' switches that are one of our options with a value (a bare --variant would not say which)
OTHER_SWITCHES: dict[str, str] = {
    "use_dora": "--variant dora", "use_rslora": "--variant rslora", "load_in_4bit": "--quantize nf4",
    "bf16": "--dtype bfloat16", "fp16": "--dtype float16", "fp32": "--dtype float32",
}


class _OneLineParser(argparse.ArgumentParser):
    """argparse's refusals (a missing value, an unknown option, 'abc' for a number) as one line, like every other
    mistake: its default prints the whole usage first, 40 lines for ``lorakit train``, above the one that matters.

    Prefixes of options are not accepted (``allow_abbrev=False``): with them ``lorakit generate --n 2 hi`` read
    ``--n`` as ``--no-chat`` and ``2`` as the prompt, and a script's ``--eval`` would change meaning the day another
    ``--eval-...`` option is added; an unknown option gets the nearest one instead (:func:`_unknown_arguments`).

    A single-value option given twice with different values (``--lr 1e-4 --lr 3e-4``) is refused, naming both: argparse
    kept the last one silently (:mod:`lorakit.commands._given_once`, whose actions replace argparse's ``store`` and
    ``BooleanOptionalAction`` in every parser built from this class, its subcommands' and their groups' too)."""

    def __init__(self, *args, **kwargs):
        from lorakit.commands._given_once import BooleanOnce, StoreOnce

        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.given: dict[str, tuple] = {}  # dest -> (value, option, as typed) of this parse, for StoreOnce
        self.typed: list[str] = []  # the strings of the value being stored
        for key in (None, "store"):
            self.register("action", key, StoreOnce)
        self.register("action", argparse.BooleanOptionalAction, BooleanOnce)  # passed as a class: the class is the key

    def parse_known_args(self, args=None, namespace=None):
        self.given = {}
        return super().parse_known_args(args, namespace)

    def _get_values(self, action, arg_strings):
        self.typed = list(arg_strings)  # argparse calls the action right after: StoreOnce shows what was typed
        return super()._get_values(action, arg_strings)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="lorakit",
        description="Low-rank adaptation of language models: train, merge, hot-swap and serve LoRA adapters.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
    )
    from lorakit import __version__

    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        description = f"{help_text}. {NEEDS_EXTRA[name]}" if name in NEEDS_EXTRA else help_text
        # wrapped here: a command that sets a raw formatter for its examples prints its description as given
        description = textwrap.fill(description, width=100, break_on_hyphens=False, break_long_words=False)
        sub = subparsers.add_parser(name, help=help_text, description=description)
        if name == only:  # only the chosen subcommand's module is imported
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``lorakit`` console entry point (and ``python -m lorakit``): the exit status of the command.

    Ctrl-C at any point ends with one line and status 130, also before the command runs: importing its module
    (torch, transformers: seconds, even for ``lorakit train --help``) is where an early Ctrl-C usually lands. An
    interrupted import can fail with another error than KeyboardInterrupt (numpy's C module, cut short, refuses to
    load again: "ImportError: cannot load module more than once"), so until the command runs, whatever error follows
    a Ctrl-C counts as one.
    """
    interrupts: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    noting = previous is signal.default_int_handler and threading.current_thread() is threading.main_thread()
    # (not where SIGINT is ignored (a background job) or handled already, nor off the main thread: main() in a test)
    ending = False  # the process is ending without its command having run (--help, a usage error, a Ctrl-C)

    def note_interrupt(signum, frame):
        interrupts.append(signum)
        if not ending:
            signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, as without this handler

    def end_of_startup() -> None:  # the command's own code gets Ctrl-C as it always did
        nonlocal noting
        if noting:
            signal.signal(signal.SIGINT, previous)
            noting = False

    if noting:
        signal.signal(signal.SIGINT, note_interrupt)
    try:
        try:
            return _main(argv, end_of_startup)
        finally:
            # The process's own command line that ends before its command ran keeps this handler, quiet: a Ctrl-C
            # as it exits (argparse's SystemExit after --help) would otherwise raise KeyboardInterrupt out of this
            # function, past every handler, and print a traceback. One landing before this line is caught below.
            if argv is None:
                ending = True
            else:
                end_of_startup()
    except (KeyboardInterrupt, Exception) as error:
        if not isinstance(error, KeyboardInterrupt) and not interrupts:
            raise
        args = list(sys.argv[1:] if argv is None else argv)
        command = next((a for a in args if not a.startswith("-")), None)
        from lorakit._rank import speaks

        if speaks():  # torchrun passes Ctrl-C to every process
            print(f"lorakit {command}: interrupted" if command in SUBCOMMANDS else "lorakit: interrupted",
                  file=sys.stderr)
        return 130


def _main(argv: list[str] | None, end_of_startup: Callable[[], None]) -> int:
    from lorakit.errors import LorakitError

    argv_given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["help"]:  # `lorakit help [COMMAND]`, as git and pip take it: that command's --help
        argv = ["--help"] if len(argv) == 1 else [argv[1], "--help"] if argv[1] in SUBCOMMANDS else argv[1:2]
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in SUBCOMMANDS:
        if argv and argv[0] == command:  # a mistyped command: argparse would only list the choices
            import difflib

            close = difflib.get_close_matches(command, list(SUBCOMMANDS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; the commands are {', '.join(SUBCOMMANDS)}"
            print(f"lorakit: error: unknown command {command!r}{hint} (lorakit --help describes each)", file=sys.stderr)
            return 2
        command = None
    parser = build_parser(only=command)
    unknown = _unknown_before_required(parser, argv)  # a misspelt --out is said, not "--out is required"
    if unknown and (command != "generate" or any(_is_option(u) for u in unknown)):
        return _unknown_arguments(parser, command, unknown)
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command == "generate" and not any(_is_option(u) for u in unknown):
        # generate's prompts (nargs="*") after an option: argparse takes only the first run of them and leaves the
        # rest over, so `generate "a b" --base "c d"` was refused; generate itself checks them all
        args.prompt, unknown = [*args.prompt, *unknown], []
    if unknown:  # argparse names them from the top level ("lorakit: error"), without the option meant
        return _unknown_arguments(parser, args.command, unknown)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    from lorakit._signals import sigterm_as_interrupt
    from lorakit.commands._args import plain_warnings

    end_of_startup()
    _tolerant_stdout()
    said, wait_for_rank0 = None, True  # the one line the command ends with, if it fails
    try:
        from lorakit._rank import world_size

        if args.command != "train" and argv_given is None and world_size() > 1:
            # torchrun -m lorakit merge/eval/...: every process did all the work and printed it (merge: one wrote
            # the folder, the others failed on "already exists", and torchrun reported the run as failed)
            raise LorakitError(f"torchrun started {world_size()} copies of lorakit {args.command}, each doing all "
                               f"of the work and writing the same files: run lorakit {args.command} without torchrun "
                               "(lorakit train alone spreads over processes)")
        # the commands that write a folder: SIGTERM (`timeout`, a batch job's limit) removes the half-written one too
        writes = args.command in ("merge", "combine", "quantize")
        stopping = sigterm_as_interrupt() if writes else contextlib.nullcontext()
        with plain_warnings(), stopping:  # every command: a user reads "warning: ...", not lorakit's file:line
            code = int(module.run(args) or 0)
    except LorakitError as error:
        said, code = f"lorakit {args.command}: error: {error}", 2
    except KeyboardInterrupt as error:
        from lorakit._signals import by_sigterm

        # 128 + the signal's number, as a shell reports a process the signal ended, and as `lorakit serve` ends
        said, code = ((f"lorakit {args.command}: stopped by SIGTERM", 143) if by_sigterm(error) else
                      (f"lorakit {args.command}: interrupted", 130))
        # Ctrl-C reaches every process at once (torchrun passes it on): rank 0 says it, the others need not wait for
        # it (torchrun, shutting down, waits for them); a stop the processes made together at one step for a signal
        # some of them alone got (SIGTERM to one of them) is said by rank 0, which torchrun cuts short once another
        # has exited
        wait_for_rank0 = getattr(error, "processes", 1) > 1 and not getattr(error, "everywhere", True)
    except BrokenPipeError:  # the output went to a reader that stopped early (lorakit inspect DIR | head): end quietly
        with contextlib.suppress(OSError, ValueError, AttributeError):  # so the interpreter's exit flush does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    except OSError as error:  # a path the system refuses (too long, no permission, a full disk): one line, not a bug
        if error.filename is None:
            raise
        name = str(error.filename) if len(str(error.filename)) <= 120 else str(error.filename)[:117] + "..."
        said, code = f"lorakit {args.command}: error: {name}: {error.strerror or error}", 2
    from lorakit._rank import speaks, world_size

    torchrun = argv_given is None and world_size() > 1
    if said is not None:
        # under torchrun every process hits the same mistake (torchrun passes Ctrl-C to each, too): rank 0 says it
        if speaks():
            print(said, file=sys.stderr)
        elif torchrun and wait_for_rank0:
            _let_rank0_say_it(said)
    if torchrun:
        _exit_without_teardown(code)
    return code


def _is_option(argument: str) -> bool:
    return argument.startswith("-") and argument != "-"  # "-" alone names standard input


def _tolerant_stdout() -> None:
    """Characters the terminal's encoding lacks are printed escaped (``\\U0001f389``), as Python's stderr does: a
    generation (model text: emoji, U+FFFD of a cut byte sequence) printed to an ASCII or Latin-1 stdout
    (PYTHONIOENCODING, a C locale, a Windows console) ended the command with a UnicodeEncodeError traceback after
    the whole generation had run."""
    stream = sys.stdout
    if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
        with contextlib.suppress(ValueError, OSError, AttributeError):  # a stream that cannot change its errors
            stream.reconfigure(errors="backslashreplace")


def _unknown_before_required(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The arguments ``parser`` does not know, found before argparse checks the required ones: it checks those first,
    so ``lorakit merge --adapter A --output merged`` was told "--out is required" about the option it had typed.
    Not with --help, which would print its usage while the required options are relaxed (``[--adapters DIR]``)."""
    if "-h" in argv or "--help" in argv:
        return []
    parsers = [parser, *(sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                         for sub in action.choices.values())]
    required = [action for p in parsers for action in p._actions if action.required]
    for action in required:
        action.required = False
    try:
        return parser.parse_known_args(argv)[1]
    finally:
        for action in required:
            action.required = True


def _suggestion(typed: str, command: str | None, options: list[str]) -> str | None:
    """The option (with its value, for another tool's switch) a mistyped or foreign ``--option`` most likely means:
    a typo of ours (--max-stpes), another tool's name (--learning-rate, --output-dir, --max-tokens) or a typo of
    one (--lerning-rate), or another tool's switch (--use-dora: --variant dora)."""
    import difflib

    key = typed.lstrip("-").replace("-", "_").lower()
    aliases = dict(OTHER_NAMES)
    if command == "train":  # the config file's table of other tools' names (Trainer, axolotl, peft scripts)
        from lorakit.train.config import ALIASES

        aliases.update(ALIASES)
    aliases = {name: target for name, targets in aliases.items()
               for target in [next((t for t in ((targets,) if isinstance(targets, str) else targets)
                                    if f"--{t.replace('_', '-')}" in options), None)] if target}
    switch = OTHER_SWITCHES.get(key)
    if switch and switch.split()[0] in options:
        return switch
    if key in aliases:
        return f"--{aliases[key].replace('_', '-')}"
    close = difflib.get_close_matches(f"--{key.replace('_', '-')}", options, n=1, cutoff=0.75)
    if close:
        return close[0]
    close = difflib.get_close_matches(key, list(aliases), n=1, cutoff=0.8)
    return f"--{aliases[close[0]].replace('_', '-')}" if close else None


def _unknown_arguments(parser: argparse.ArgumentParser, command: str | None, unknown: list[str]) -> int:
    """One line for what the command does not take: an unknown option with the one meant, or words left over, which
    for ``lorakit generate`` are almost always a prompt of several words typed without quotes."""
    prog = f"lorakit {command}" if command else "lorakit"
    sub = next((a.choices[command] for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None) \
        if command else parser
    options = [o for action in (sub or parser)._actions for o in action.option_strings if o.startswith("--")]
    typed = next((u.split("=", 1)[0] for u in unknown if u.startswith("--")), None)
    if typed is not None:  # the option alone: the words after it were taken as other arguments, not as its value
        close = _suggestion(typed, command, options)
        hint = f"; did you mean {close}?" if close else ""
        print(f"{prog}: error: unrecognized arguments: {typed}{hint} (`{prog} --help` lists the options)",
              file=sys.stderr)
        return 2
    hint = ""
    if command == "generate" and not any(u.startswith("-") for u in unknown):
        hint = '; a prompt of several words goes in quotes: lorakit generate "Two lattes to Berlin"'
    print(f"{prog}: error: unrecognized arguments: {' '.join(unknown)}{hint} (`{prog} --help` lists the options)",
          file=sys.stderr)
    return 2


# how long a torchrun process other than rank 0 that fails waits for rank 0 to say why before saying it itself
RANK0_GRACE_S = 20.0


def _let_rank0_say_it(said: str) -> None:
    """A torchrun process other than rank 0 ends with ``said``: wait for rank 0 to print it, then say it here.

    torchrun ends every other process as soon as one exits, so a rank 1 that exited at once with a mistake all the
    processes make (a missing data file) killed rank 0 before it printed it, when rank 1 got there first: the user
    read only torchrun's ChildFailedError. Waiting here, rank 0 reaches the same mistake, prints it and exits, and
    torchrun ends this process (SIGTERM, its default action: lorakit's handler is gone by now). A failure of this
    process alone (a SIGTERM sent to it, a row only it trains on) is said by rank 0 too when rank 0 notices (its
    collectives fail once this process's group is closed); else, after :data:`RANK0_GRACE_S`, it is said here,
    naming the process, rather than not at all."""
    import time

    deadline = time.monotonic() + RANK0_GRACE_S
    while time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"{said} (process {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')})", file=sys.stderr)


def _exit_without_teardown(code: int) -> None:
    """End a torchrun worker here, its work done and its files closed: the interpreter's teardown frees torch's
    distributed objects in no set order, and gloo can then abort a worker that finished cleanly ("terminate called
    without an active exception"; torchrun then kills the other workers and the run reads as failed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
