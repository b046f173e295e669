"""Many adapters on one base: choose, disable, delete, and mix them per batch row."""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
import weakref
from typing import Iterator, Sequence

from torch import nn

from lorakit.errors import LorakitError
from lorakit.inject import _STRUCTURE_VERSION, adapter_hosts, adapter_names, lora_layers, unwrap
from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.param_lora import ParamLora

_MERGEABLE = (LoraLayer, ParamLora)  # hosts whose adapters can be merged into the base


def _require(model: nn.Module, names: Sequence[str]) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown and not known:
        raise LorakitError(f"unknown adapter {unknown[0]!r}: this model has no lorakit adapters (add one with "
                           "lorakit.inject or lorakit.load_adapter; after merge_and_unload it is a plain model: save it "
                           "with model.save_pretrained)")
    if unknown:
        raise LorakitError(f"unknown adapter {unknown[0]!r}; this model has: {', '.join(known)}")


def _names(value, what: str) -> list[str]:
    """One adapter name or a list of names, as a list; anything else is one line."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise LorakitError(f"{what} takes an adapter name or a list of names, got {value!r}; the model's adapters are "
                           "listed by lorakit.adapter_names(model)")
    return list(names)


def set_adapter(model: nn.Module, name: str | Sequence[str]) -> None:
    """Make ``name`` (or several names, applied in order) the active adapter(s) everywhere in the model."""
    names = _names(name, "set_adapter")
    _require(model, names)
    hosts = adapter_hosts(model)
    for path, host in hosts.items():
        holding = [n for n in dict.fromkeys(names) if isinstance(host, ModulesToSave) and n in host.copies]
        if len(holding) > 1:  # one copy runs in the module's place: which one would be a silent choice
            raise LorakitError(f"adapters {holding[0]!r} and {holding[1]!r} both hold a whole trained copy of {path} "
                               "(modules_to_save, or peft's trainable tokens), and only one copy can run: activate one "
                               "of them (or give each batch row its own adapter with lorakit.mixed_batch)")
    for host in hosts.values():
        host.set_active(names)


def active_adapters(model: nn.Module) -> list[str]:
    actives: dict[str, None] = {}
    for host in adapter_hosts(model).values():
        actives.update(dict.fromkeys(host.active))
    return list(actives)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter from every layer (it must not be merged). Layers left without adapters stay wrapped."""
    if not isinstance(name, str):
        raise LorakitError(f"delete_adapter takes one adapter name, got {name!r}; call it once per adapter")
    _require(model, [name])
    hosts = adapter_hosts(model)
    merged = [path for path, h in hosts.items() if isinstance(h, _MERGEABLE) and name in h.merged]
    if merged:
        raise LorakitError(f"adapter {name!r} is merged (e.g. in {merged[0]}); call lorakit.unmerge(model) first")
    for host in hosts.values():
        if name in host.adapter_names():
            host.delete_adapter(name)
    configs = getattr(unwrap(model), "lorakit_configs", {})  # DDP forwards no attributes (see unwrap)
    configs.pop(name, None)
    _STRUCTURE_VERSION[0] += 1  # a static decoder's copy of the adapter goes at its next use


class _Block:
    """A ``with`` block that warns when it is created but never entered: ``lorakit.disable_adapters(model)`` written
    as a plain call would otherwise do nothing, silently, and the next forward would still use the adapters."""

    def __init__(self, context: contextlib.AbstractContextManager, what: str) -> None:
        self._context, self._what, self._entered = context, what, False
        caller = sys._getframe(2)  # 0: here, 1: disable_adapters / mixed_batch, 2: the user's line
        self._where = (caller.f_code.co_filename, caller.f_lineno)

    def __enter__(self):
        self._entered = True
        return self._context.__enter__()

    def __exit__(self, *exc_info):
        return self._context.__exit__(*exc_info)

    def __del__(self) -> None:
        if not self._entered:
            try:
                warnings.warn_explicit(f"lorakit.{self._what}(...) does nothing unless used as a block: "
                                       f"`with lorakit.{self._what}(...):`", UserWarning, *self._where)
            except Exception:  # interpreter shutdown: nothing left to warn with
                pass


def disable_adapters(model: nn.Module) -> _Block:
    """Run the base model alone inside the ``with`` block (merged adapters must be unmerged first)."""
    return _Block(_disable_adapters(model), "disable_adapters")


@contextlib.contextmanager
def _disable_adapters(model: nn.Module) -> Iterator[None]:
    hosts = adapter_hosts(model)
    if any(isinstance(h, _MERGEABLE) and h.merged for h in hosts.values()):
        raise LorakitError("adapters are merged into the base weights; call lorakit.unmerge(model) before disabling them")
    previous = {path: h.disabled for path, h in hosts.items()}
    for host in hosts.values():
        host.disabled = True
    try:
        yield
    finally:
        for path, host in hosts.items():
            host.disabled = previous[path]


# model -> (thread id, open blocks): the per-row routing is state of the model, so one thread at a time
_MIXED_OWNERS: "weakref.WeakKeyDictionary[nn.Module, tuple[int, int]]" = weakref.WeakKeyDictionary()
_MIXED_LOCK = threading.Lock()


def mixed_batch(model: nn.Module, names: Sequence[str | None]) -> _Block:
    """Inside the ``with`` block, row ``i`` of every batch goes through adapter ``names[i]`` (``None``: the base alone).

    One forward pass serves requests for different adapters; each row's output equals running that row alone
    with its adapter active. A batch of k x len(names) rows gives each name k consecutive rows: transformers'
    ``generate`` with ``num_beams=k`` or ``num_return_sequences=k`` repeats each row k times in place, so those
    work as expected; any other row count is refused at the forward pass. Blocks nest (the inner one's names apply inside it, the outer's again after it);
    ``disable_adapters`` inside the block runs the base for every row. The routing belongs to the model, not
    the thread: a block opened while another thread holds one on the same model is refused (use one thread, as
    ``lorakit serve`` does, or a lock). Merging inside the block is refused.
    """
    return _Block(_mixed_batch(model, names), "mixed_batch")


@contextlib.contextmanager
def _mixed_batch(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise LorakitError(f"mixed_batch takes a list with one adapter name (or None) per batch row, got {names!r}; "
                           "for one adapter on every row use lorakit.set_adapter(model, name)")
    names = list(names)
    if not all(n is None or isinstance(n, str) for n in names):
        bad = next(n for n in names if not (n is None or isinstance(n, str)))
        raise LorakitError(f"mixed_batch: {bad!r} is not an adapter name; give a name (str) or None per batch row")
    _require(model, [n for n in names if n is not None])
    hosts = adapter_hosts(model)
    if any(isinstance(h, _MERGEABLE) and h.merged for h in hosts.values()):
        raise LorakitError("mixed_batch needs unmerged adapters; call lorakit.unmerge(model) first")
    me = threading.get_ident()
    with _MIXED_LOCK:
        owner, depth = _MIXED_OWNERS.get(model, (me, 0))
        if owner != me:
            raise LorakitError("another thread has a mixed_batch block open on this model; the per-row routing is "
                               "the model's state, so run mixed batches of one model from one thread (or a lock)")
        _MIXED_OWNERS[model] = (me, depth + 1)
    previous = {path: host.row_adapters for path, host in hosts.items()}
    for host in hosts.values():
        host.row_adapters = names
    try:
        yield
    finally:
        for path, host in hosts.items():
            host.row_adapters = previous[path]
        with _MIXED_LOCK:
            owner, depth = _MIXED_OWNERS.get(model, (me, 1))
            if depth <= 1:
                _MIXED_OWNERS.pop(model, None)
            else:
                _MIXED_OWNERS[model] = (owner, depth - 1)


def mixed_batch_open(model: nn.Module) -> bool:
    """Whether a ``mixed_batch`` block is open on ``model`` (in any thread)."""
    return any(getattr(h, "row_adapters", None) is not None for h in adapter_hosts(model).values())


def lora_parameters(model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of an adapter's trainable tensors (all adapters when ``adapter`` is None).

    Names end in ``lora_A``, ``lora_B``, ``magnitude`` or, for modules-to-save copies, the module's own names.
    """
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        for marker in ("adapters", "copies"):
            if marker in parts:
                owner = parts[parts.index(marker) + 1]
                if adapter is None or owner == adapter:
                    yield name, parameter
                break


def layer_count(model: nn.Module) -> int:
    return len(lora_layers(model))
