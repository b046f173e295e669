"""Call a module with some of its parameters replaced by other tensors, for that call only.

What LoRA on raw parameters needs (``ParamLora``: fused MoE experts, routers; ``MhaLora``: an
``nn.MultiheadAttention``'s ``in_proj_weight`` and ``out_proj.weight``): the module's own forward, whatever it does
with its weights, reads ``W + delta`` in place of ``W``, while the parameter itself (state_dict, optimizer) stays
untouched and nothing of the call is left behind, even when the forward raises.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError

# marks a DataParallel replica whose parameters are replaced by a call in progress (its parameters are __dict__
# entries already, so their presence there cannot say it)
_CALL_MARK = "_lorakit_param_lora_call"
_MISSING = object()


def call_with_tensors(base: nn.Module, tensors: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
    """``base(*args, **kwargs)`` with ``tensors`` (``{dotted path of a parameter inside base: tensor}``, e.g.
    ``{"in_proj_weight": W1, "out_proj.weight": W2}``; each tensor of its parameter's shape) read in place of those
    parameters. A second such call on the same parameters while the first runs (a module calling its own lorakit
    wrapper) is refused in one line: it would read the first call's tensors as the parameters."""
    if torch.compiler.is_compiling():
        # under torch.compile: functional_call, which dynamo traces. The __dict__ write below is, inside a
        # checkpointed layer (--compile-layers with --gradient-checkpointing), a side effect dynamo refuses: a
        # graph break and no layer compiled. Eager keeps the write: 4 us a call against functional_call's 17.
        return torch.func.functional_call(base, tensors, args, kwargs, tie_weights=False, strict=False)
    places = []  # (owner module, attribute name, tensor)
    for path, tensor in tensors.items():
        prefix, _, attr = path.rpartition(".")
        owner = base.get_submodule(prefix) if prefix else base
        held = owner.__dict__
        # a DataParallel replica (torch.nn.parallel.replicate: empty _parameters) holds each parameter's per-device
        # copy as a plain attribute, so the attribute is there already and only the mark says a call is running
        busy = _CALL_MARK in held if held.get("_is_replica", False) else attr in held
        if busy:
            raise LorakitError(f"{type(owner).__name__}.{attr} is already replaced during this call (a nested call "
                               "through the same lorakit wrapper?)")
        places.append((owner, attr, tensor))
    # an instance attribute is found before nn.Module.__getattr__ looks in _parameters: the module's code reads the
    # given tensor, while the parameter itself stays registered and untouched
    saved = []  # (owner's __dict__, attribute, what it held: a replica's own copy, or _MISSING)
    try:
        for owner, attr, tensor in places:
            held = owner.__dict__
            saved.append((held, attr, held.get(attr, _MISSING)))
            if held.get("_is_replica", False):
                held[_CALL_MARK] = True
            held[attr] = tensor
        return base(*args, **kwargs)
    finally:
        for held, attr, previous in reversed(saved):  # a replica gets its own copies back; popping would lose them
            if previous is _MISSING:
                held.pop(attr, None)
            else:
                held[attr] = previous
            held.pop(_CALL_MARK, None)
