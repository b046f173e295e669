"""``import lorakit`` loads its public names on first use (PEP 562), and a Ctrl-C at any point of a command's startup
ends with one line and status 130.

Before, ``lorakit/__init__.py`` imported torch (1-3 s) eagerly: ``lorakit --help`` paid for it, and a Ctrl-C in those
seconds printed a traceback, since the console script imports the package before ``lorakit.cli.main`` (and its
KeyboardInterrupt handler) runs. Subprocesses are used where the state of ``sys.modules`` or a signal's timing matters.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=ENV, capture_output=True, text=True,
                          timeout=120)


def test_every_public_name_resolves_and_is_listed():
    import lorakit

    for name in lorakit.__all__:
        value = getattr(lorakit, name)
        assert value is not None, name
        assert name in dir(lorakit), name
    namespace: dict = {}
    exec(f"from lorakit import {', '.join(lorakit.__all__)}", namespace)  # the form a user's script has
    assert all(namespace[name] is getattr(lorakit, name) for name in lorakit.__all__)
    from lorakit.inject import inject
    from lorakit.merge import merge
    from lorakit.quant.quantize import quantize

    # the names shared by a function and a submodule are the functions, as the eager import made them
    assert lorakit.inject is inject and lorakit.merge is merge and lorakit.quantize is quantize
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        lorakit.no_such_name  # noqa: B018


def test_the_lazy_table_the_type_checkers_imports_and_all_agree():
    """Three lists of the same names in __init__.py: the table __getattr__ reads, the TYPE_CHECKING imports that type
    checkers and IDEs read, and __all__. A name added to one and not the others drifts silently otherwise."""
    import ast

    import lorakit

    tree = ast.parse((REPO / "lorakit" / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
    typed = {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert typed == lorakit._LAZY
    defined_here = {"__version__", "load_base", "use_fast_kernels", "disable_fast_kernels"}
    assert set(lorakit.__all__) == set(lorakit._LAZY) | defined_here
    assert len(lorakit.__all__) == len(set(lorakit.__all__))


def test_import_lorakit_loads_torch_only_when_a_name_needs_it():
    result = _python("""
        import sys
        import lorakit
        from lorakit import LorakitError, __version__  # neither needs torch
        assert "torch" not in sys.modules, "import lorakit imported torch"
        dir(lorakit)
        for probe in ("_repr_html_", "__wrapped__", "no_such_name"):  # tools' probes: refused, nothing imported
            assert not hasattr(lorakit, probe), probe
        assert "torch" not in sys.modules, "a probe or dir() imported torch"
        assert "lorakit.layers" not in sys.modules
        config = lorakit.LoraConfig(r=4)  # a dataclass: torch only once a scaling is computed
        assert "torch" not in sys.modules, "LoraConfig imported torch"
        assert config.scaling_for("q_proj") == config.alpha / 4
        assert "torch" in sys.modules
        assert callable(lorakit.merge_and_unload)
        print(type(config).__name__, LorakitError.__name__, __version__)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["LoraConfig", "LorakitError", "0.1.0"]


def test_a_submodule_import_does_not_hide_the_function_of_the_same_name():
    """``import lorakit.inject`` (or any module's ``from lorakit.inject import ...``) sets ``lorakit.inject`` to the
    submodule; the eager import overwrote that with the function right after, and the lazy package must too."""
    result = _python("""
        import types
        import lorakit.inject, lorakit.merge, lorakit.io
        assert callable(lorakit.inject) and not isinstance(lorakit.inject, types.ModuleType), lorakit.inject
        assert callable(lorakit.merge) and not isinstance(lorakit.merge, types.ModuleType), lorakit.merge
        assert isinstance(lorakit.io, types.ModuleType)  # submodules without a public twin stay reachable
        assert lorakit.layers.LoraLayer.__name__ == "LoraLayer"  # lorakit.X that the eager import made work
        assert lorakit.models.loading.load_tokenizer
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_lorakit_help_does_not_import_torch():
    result = _python("""
        import sys
        from lorakit.cli import main
        try:
            main(["--help"])
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        assert "torch" not in sys.modules
    """)
    assert result.returncode == 0, result.stderr
    assert "lorakit train" in result.stdout  # the help itself is unchanged: the first session is listed


def test_ctrl_c_before_the_command_runs_is_one_line(monkeypatch, capsys):
    """Deterministic: the interrupt lands while the subcommand's module is imported (build_parser), where main's
    own handler around ``run`` cannot see it."""
    from lorakit import cli

    def interrupted(only=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["train", "--help"]) == 130
    assert capsys.readouterr().err == "lorakit train: interrupted\n"
    assert cli.main(["--help"]) == 130
    assert capsys.readouterr().err == "lorakit: interrupted\n"


def test_an_error_that_follows_a_ctrl_c_in_startup_counts_as_the_interrupt(monkeypatch, capsys):
    """numpy's C module, interrupted while torch imports it, fails the next import with an ImportError ("cannot load
    module more than once per process") instead of KeyboardInterrupt: seen at 1 in 40 Ctrl-Cs of train --help."""
    from lorakit import cli

    def cut_short(only=None):
        try:
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C through main's handler
        except KeyboardInterrupt:
            raise ImportError("cannot load module more than once per process") from None

    def broken(only=None):
        raise ImportError("a real bug")

    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest may run with SIGINT ignored
    try:
        monkeypatch.setattr(cli, "build_parser", cut_short)
        assert cli.main(["train", "--help"]) == 130
        assert capsys.readouterr().err == "lorakit train: interrupted\n"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main's handler is gone again
        monkeypatch.setattr(cli, "build_parser", broken)
        with pytest.raises(ImportError, match="a real bug"):  # without a Ctrl-C it is a bug: its traceback stays
            cli.main(["train", "--help"])
    finally:
        signal.signal(signal.SIGINT, outer)


def _in_lorakit(traceback: str) -> bool:
    """Whether a traceback passes through lorakit's package (not only the interpreter's start, runpy's search or pip's
    console script's own lines, which run before lorakit's first statement)."""
    package = str(Path(__file__).resolve().parents[1] / "lorakit") + "/"
    return any(f'File "{package}' in line for line in traceback.splitlines())


def _commands() -> list[list[str]]:
    commands = [[sys.executable, "-m", "lorakit", "train", "--help"]]
    script = Path(sys.executable).parent / "lorakit"  # the console script pip generates (imports lorakit.cli first)
    if script.is_file():
        commands.append([str(script), "train", "--help"])
    return commands


@pytest.mark.parametrize("command", _commands(), ids=lambda c: "console-script" if c[1] != "-m" else "python-m")
def test_ctrl_c_during_startup_never_prints_a_traceback(command):
    start = time.perf_counter()
    whole = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - start
    assert whole.returncode == 0 and "usage: lorakit train" in whole.stdout, whole.stderr
    outcomes = []
    # half the run lands in its longest import while one is left (torch, before train --help stopped importing it);
    # in a startup of ~0.1 s it lands in the interpreter or in pip's console script's own `from lorakit.cli import
    # main`, before any lorakit code runs, where no handler can be
    for delay in (0.1, 0.3, 0.6) + ((took / 2,) if took > 0.5 else ()):
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   # SIGINT may be ignored by the shell that started pytest, and children inherit
                                   # that (Python then installs no KeyboardInterrupt handler)
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        if "Traceback" in err and not _in_lorakit(err):
            # a loaded machine (CI beside other work) can still be in the interpreter's own start (site, runpy's
            # search for the module) at 0.1 s: before lorakit's first statement, where no program has a handler
            continue
        assert "Traceback" not in err, f"after {delay:.2f} s:\n{err}"
        # 0: it finished first; -SIGINT: it came before Python's handler was installed; 130: interrupted
        assert process.returncode in (0, 130, -signal.SIGINT), (delay, process.returncode, err)
        if process.returncode == 130:  # __main__'s line (no command known yet) while it imports lorakit.cli
            assert err in ("lorakit train: interrupted\n", "lorakit: interrupted\n"), err
        outcomes.append(process.returncode)
    if took > 1.0:  # a startup this long (torch's import) was certainly interrupted at least once
        assert 130 in outcomes, (took, outcomes)


@pytest.mark.parametrize("command", ["train", "eval", "combine"])
def test_train_and_eval_help_do_not_import_torch(command):
    """``lorakit train --help`` imported torch three ways (1.7 s of a 1.8 s help): lorakit.train's ``__init__``
    imported the loop, lorakit.config imported lorakit.functional for ``scaling``, and lorakit.train.config took
    SCHEDULES from lorakit.optim. eval's command imports lorakit.train (the package) too; combine's took its method
    names from lorakit.combine (torch, the layers)."""
    result = _python(f"""
        import sys
        from lorakit.cli import main
        try:
            main([{command!r}, "--help"])
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        heavy = sorted(m for m in ("torch", "transformers", "lorakit.train.loop", "lorakit.optim") if m in sys.modules)
        assert not heavy, heavy
    """)
    assert result.returncode == 0, result.stderr
    assert f"usage: lorakit {command}" in result.stdout
    assert "--schedule" in result.stdout or command != "train"  # the choices still come from the one tuple
    assert "magnitude_prune_svd" in result.stdout or command != "combine"


def test_lorakit_train_names_load_on_first_use():
    """The package's public names, its submodules (attributes the eager import set) and ``from ... import``."""
    result = _python("""
        import sys, types
        import lorakit.train as package
        assert "lorakit.train.loop" not in sys.modules and "torch" not in sys.modules
        assert sorted(package.__all__) == sorted(package._LAZY) and set(package.__all__) <= set(dir(package))
        from lorakit.train import TrainConfig
        assert "torch" not in sys.modules  # the config alone stays light
        assert TrainConfig().schedule == "cosine"
        from lorakit.train import TrainResult, train
        from lorakit.train.loop import train as loop_train
        import lorakit.optim
        assert train is loop_train and package.TrainResult is TrainResult
        assert lorakit.optim.SCHEDULES == lorakit.train.config.SCHEDULES == ("cosine", "linear", "constant")
        assert isinstance(package.data, types.ModuleType) and package.checkpoint.__name__ == "lorakit.train.checkpoint"
        try:
            package.not_a_name
        except AttributeError as error:
            assert "not_a_name" in str(error)
        else:
            raise AssertionError("no AttributeError")
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
