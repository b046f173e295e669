"""Many adapters on one base: choose, disable, delete, and mix them per batch row."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from torch import nn

from lorakit.errors import LorakitError
from lorakit.inject import adapter_hosts, adapter_names, lora_layers
from lorakit.layers import LoraLayer


def _require(model: nn.Module, names: Sequence[str]) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LorakitError(f"unknown adapter {unknown[0]!r}; this model has: {', '.join(known) or '(no adapters)'}")


def set_adapter(model: nn.Module, name: str | Sequence[str]) -> None:
    """Make ``name`` (or several names, applied in order) the active adapter(s) everywhere in the model."""
    names = [name] if isinstance(name, str) else list(name)
    _require(model, names)
    for host in adapter_hosts(model).values():
        host.set_active(names)


def active_adapters(model: nn.Module) -> list[str]:
    actives: dict[str, None] = {}
    for host in adapter_hosts(model).values():
        actives.update(dict.fromkeys(host.active))
    return list(actives)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter from every layer (it must not be merged). Layers left without adapters stay wrapped."""
    _require(model, [name])
    hosts = adapter_hosts(model)
    merged = [path for path, h in hosts.items() if isinstance(h, LoraLayer) and name in h.merged]
    if merged:
        raise LorakitError(f"adapter {name!r} is merged (e.g. in {merged[0]}); call lorakit.unmerge(model) first")
    for host in hosts.values():
        if name in host.adapter_names():
            host.delete_adapter(name)
    configs = getattr(model, "lorakit_configs", {})
    configs.pop(name, None)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block (merged adapters must be unmerged first)."""
    hosts = adapter_hosts(model)
    if any(isinstance(h, LoraLayer) and h.merged for h in hosts.values()):
        raise LorakitError("adapters are merged into the base weights; call lorakit.unmerge(model) before disabling them")
    previous = {path: h.disabled for path, h in hosts.items()}
    for host in hosts.values():
        host.disabled = True
    try:
        yield
    finally:
        for path, host in hosts.items():
            host.disabled = previous[path]


@contextlib.contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, row ``i`` of every batch goes through adapter ``names[i]`` (``None``: the base alone).

    One forward pass serves requests for different adapters; each row's output equals running that row alone
    with its adapter active.
    """
    names = list(names)
    _require(model, [n for n in names if n is not None])
    hosts = adapter_hosts(model)
    if any(isinstance(h, LoraLayer) and h.merged for h in hosts.values()):
        raise LorakitError("mixed_batch needs unmerged adapters; call lorakit.unmerge(model) first")
    for host in hosts.values():
        host.row_adapters = names
    try:
        yield
    finally:
        for host in hosts.values():
            host.row_adapters = None


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
