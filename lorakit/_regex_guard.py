"""Refuse an adapter file's regular expressions that would take too long to match a model's module names.

An adapter_config.json names modules by regular expressions (``target_modules`` / ``exclude_modules`` as one
string, ``rank_pattern`` / ``alpha_pattern`` keys, ``layers_pattern``). Python's ``re`` has no timeout and holds
the GIL while it backtracks, so a hostile or broken pattern such as ``(.*.*)*xyz`` would hang ``load_adapter``
(and every command built on it) forever. Each pattern with a quantifier is therefore first matched, in the exact
forms lorakit uses, against the model's module paths in a child process with a time limit. A pattern without a
quantifier (``*+?{``), such as a plain module name or ``q_proj|v_proj``, cannot backtrack for long and is not
tried: the usual configs pay nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from lorakit.errors import LorakitError

REGEX_TIMEOUT_S = 2.0  # a sane pattern over a few thousand module names takes milliseconds
_QUANTIFIERS = frozenset("*+?{")

# Runs in a child process (no site, no lorakit import: it starts in tens of ms). stdin: [[method, regex], ...], paths.
_PROBE = r"""
import json, re, sys
checks, paths = json.load(sys.stdin)
for method, pattern in checks:
    compiled = re.compile(pattern)
    call = compiled.fullmatch if method == "fullmatch" else compiled.match
    for path in paths:
        call(path)
"""

_passed: set[tuple[tuple[tuple[str, str], ...], int]] = set()  # checks already timed on these paths (a server re-checks)


class RegexTooSlow(LorakitError):
    """A regular expression of an adapter config takes over ``REGEX_TIMEOUT_S`` on the model's module names."""


def module_regexes(config: Any) -> list[tuple[str, str]]:
    """``[(method, regex)]``: every match lorakit makes of ``config``'s patterns on a module path (inject's
    fullmatch of a target / exclude regex, the PEFT suffix rule of rank / alpha patterns, the layers rule)."""
    checks = [("fullmatch", value) for value in (config.target_modules, config.exclude_modules)
              if isinstance(value, str) and value != "all-linear"]
    checks += [("match", rf"(.*\.)?({key})$") for key in (*config.rank_pattern, *config.alpha_pattern)]
    layers = config.layers_pattern
    checks += [("match", rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.")
               for pattern in ([layers] if isinstance(layers, str) else (layers or []))]
    return checks


def check_regexes(config: Any, paths: list[str], where: str, timeout: float = REGEX_TIMEOUT_S) -> None:
    """Raise ``RegexTooSlow`` (one line, naming ``where``) if matching ``config``'s patterns on ``paths`` (the
    model's module paths) does not finish within ``timeout`` seconds."""
    patterns = [value for value in (config.target_modules, config.exclude_modules) if isinstance(value, str)]
    patterns += [*config.rank_pattern, *config.alpha_pattern]
    layers = config.layers_pattern
    patterns += [layers] if isinstance(layers, str) else (layers or [])
    if not any(_QUANTIFIERS & set(str(pattern)) for pattern in patterns):
        return
    checks = tuple(module_regexes(config))
    key = (checks, hash(tuple(paths)))
    if key in _passed:
        return
    try:
        subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE], input=json.dumps([checks, paths]),
                       capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        raise RegexTooSlow(f"{where}: a regular expression (target_modules, exclude_modules, rank_pattern, alpha_pattern "
                           f"or layers_pattern) takes over {timeout:g} s to match this model's module names (it "
                           "backtracks without end, as '(.*.*)*x' does); simplify it, or list the module names") from None
    except OSError:  # no child process here (a sandbox, a frozen app): match unguarded, as peft does
        return
    except subprocess.CalledProcessError as error:  # the pattern itself is broken (re.error)
        detail = (error.stderr or "").strip()
        raise RegexTooSlow(f"{where}: its regular expressions could not be checked: "
                           f"{detail.splitlines()[-1][:300] if detail else type(error).__name__}") from None
    if len(_passed) > 4096:  # a long-lived server loading many configs: forget, rather than grow without end
        _passed.clear()
    _passed.add(key)
