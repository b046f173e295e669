"""Fine-tuning: data (sources.py: reading files; formats.py: record shapes; data.py: label masks, batches, packing), loop, checkpoints.

``train(model, tokenizer, records, config=TrainConfig(...))`` is the whole loop as one function; ``lorakit train``
is its command line.

The names load on first use (PEP 562), as in ``lorakit/__init__.py``: ``lorakit train --help`` imports this package
(its command module is ``lorakit.train.cli``), and the loop imports torch, seconds before the help could print.
"""

import importlib as _importlib
import importlib.util as _importlib_util
from typing import TYPE_CHECKING as _TYPE_CHECKING

# public name -> module that defines it; loaded by __getattr__ below on first use
_LAZY: dict[str, str] = {
    "train": "lorakit.train.loop", "TrainResult": "lorakit.train.loop",
    "TrainConfig": "lorakit.train.config",
}

if _TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import TrainResult, train

__all__ = ["train", "TrainConfig", "TrainResult"]


def __getattr__(name: str):
    """Load a public name from its module on first use and keep it here; a submodule's name (``lorakit.train.loop``,
    an attribute the eager import used to set as a side effect) imports that submodule."""
    module_name = _LAZY.get(name)
    if module_name is not None:
        value = getattr(_importlib.import_module(module_name), name)
        globals()[name] = value
        return value
    if name.isidentifier() and _importlib_util.find_spec(f"{__name__}.{name}") is not None:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
