"""LoRA on raw ``nn.Parameter``s (PEFT's ``target_parameters``): fused MoE expert stacks and other weights that no
``nn.Linear`` holds.

transformers 5 stores the experts of Mixtral, Qwen2/3-MoE, ... as 3-D parameters of one module
(``mlp.experts.gate_up_proj`` (experts, 2 x ffn, hidden), ``mlp.experts.down_proj`` (experts, hidden, ffn)) and the
router as a 2-D ``weight`` of a custom module, so module-level LoRA cannot reach them. ``ParamLora`` wraps the module
that holds such parameters and, for the duration of its forward, shows it ``W + s * delta`` in place of each adapted
``W`` (the module's own code, whatever experts kernel it picks, reads the adapted tensor). That is PEFT's
``lora.ParamWrapper`` math, term for term:

* a 3-D parameter ``(E, d1, d2)`` is ``E`` matrices; its layout is ``(E, out, in)`` (what ``F.linear(x, W[e])``
  uses), or ``(E, in, out)`` when the module says ``is_transposed = True`` (GPT-OSS);
  a 2-D parameter is one ``(out, in)`` matrix (E = 1);
* ``lora_A`` is ``(r * E, in)`` and ``lora_B`` ``(out, r * E)``: PEFT's ``nn.Linear(in, r * E)`` and
  ``nn.Linear(r * E, out)`` weights, so the rank grows with the number of experts (r per expert). Expert ``e`` uses
  ``A_e = lora_A.reshape(E, r, in)[e]`` (rows ``e*r .. e*r+r-1``) and ``B_e = lora_B.reshape(out, r, E)[:, :, e]``
  (columns ``k*E + e``): PEFT's interleaving, kept so files are interchangeable;
* ``delta_e = s * B_e @ A_e`` (transposed for the ``(E, in, out)`` layout), ``s = alpha / r`` (``alpha / sqrt(r)``
  for rsLoRA), with no dependence on ``E``.

Limits, as in PEFT: no dropout (it cannot be factored out of ``W``), no DoRA. The adapted stack is materialised on each
forward (one extra copy of the parameter, in its dtype), as PEFT does. Mixed-adapter batches (which PEFT refuses
here) run each group of rows through the module with its adapter. Inside ``nn.DataParallel`` (transformers' Trainer in
one process with several GPUs) the wrapped module is a replica whose parameter copies are plain attributes: they are
read there, and put back after each call.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.functional import scaling as lora_scaling
from lorakit.layers import _AdapterHost, init_from_cpu, join_rows
from lorakit.param_call import call_with_tensors


def parameter_layout(module: nn.Module, parameter: torch.Tensor) -> tuple[int, int, int, bool]:
    """``(experts, in_features, out_features, transposed)`` of a target parameter, as PEFT reads it.

    2-D: ``(out, in)``, one expert. 3-D: ``(E, out, in)``, or ``(E, in, out)`` (``transposed``) when the module sets
    ``is_transposed = True`` (transformers' ``use_experts_implementation(is_transposed=True)``)."""
    shape = tuple(parameter.shape)
    if len(shape) == 2:
        return 1, shape[1], shape[0], False
    if len(shape) == 3:
        transposed = bool(getattr(module, "is_transposed", False))
        experts, first, second = shape
        return (experts, first, second, True) if transposed else (experts, second, first, False)
    raise LorakitError(f"target_parameters: a parameter of shape {shape} cannot hold LoRA; only 2-D (out, in) and 3-D "
                       "(experts, out, in) parameters can (as in peft)")


class ParamAdapter(nn.Module):
    """One adapter on one parameter, in PEFT's layout: ``lora_A (r * E, in)``, ``lora_B (out, r * E)``."""

    def __init__(self, experts: int, in_features: int, out_features: int, transposed: bool, ndim: int, rank: int,
                 alpha: float, variant: str, dtype: torch.dtype, device: torch.device | None):
        super().__init__()
        self.experts, self.in_features, self.out_features = experts, in_features, out_features
        self.transposed, self.ndim = transposed, ndim
        self.rank, self.alpha, self.variant_name = rank, float(alpha), variant
        self.scaling = lora_scaling(variant, rank, alpha)
        self.lora_A = nn.Parameter(torch.empty(rank * experts, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank * experts, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        return (f"experts={self.experts}, in={self.in_features}, out={self.out_features}, variant={self.variant_name}, "
                f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}")

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lhs, rhs)`` with ``delta = s * lhs @ rhs`` in the parameter's shape, cast to ``dtype`` (with gradients).

        3-D: ``lhs (E, out, r)``, ``rhs (E, r, in)`` (or ``(E, in, r)``, ``(E, r, out)`` when transposed).
        2-D: ``lhs (out, r)``, ``rhs (r, in)``."""
        lora_A, lora_B = self.lora_A.to(dtype), self.lora_B.to(dtype)
        if self.ndim == 2:
            return lora_B, lora_A
        per_A = lora_A.reshape(self.experts, self.rank, self.in_features)  # (E, r, in)
        per_B = lora_B.reshape(self.out_features, self.rank, self.experts).permute(2, 0, 1)  # (E, out, r)
        if self.transposed:
            return per_A.transpose(-2, -1), per_B.transpose(-2, -1)
        return per_B, per_A

    def adapted(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + s * lhs @ rhs`` in ``W``'s dtype, one fused op (PEFT's ``baddbmm``), differentiable in A and B."""
        lhs, rhs = self.factors(weight.dtype)
        with torch.autocast(device_type=weight.device.type, enabled=False):  # the module expects W's own dtype
            if self.ndim == 2:
                return torch.addmm(weight, lhs, rhs, alpha=self.scaling)
            return torch.baddbmm(weight, lhs, rhs, alpha=self.scaling)

    def delta(self) -> torch.Tensor:
        """``s * lhs @ rhs`` in float32, in the parameter's shape, without gradients (for merging)."""
        with torch.no_grad():
            lhs, rhs = self.factors(torch.float32)
            return (lhs @ rhs) * self.scaling


class ParamLora(_AdapterHost):
    """A module (e.g. ``MixtralExperts``) with LoRA on some of its own parameters.

    ``adapters[name][parameter_name]`` is a ``ParamAdapter``. Calling the wrapper calls the module with each adapted
    parameter replaced, for that call only, by ``W + delta`` of the active, unmerged adapters (in order). Other
    attributes (``num_experts``, ``config``, the raw parameters) read through to the module.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.adapters = nn.ModuleDict()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)

    def adapter_names(self) -> list[str]:
        return list(self.adapters.keys())

    def parameter(self, name: str) -> nn.Parameter:
        """The base parameter that adapters' entries ``name`` change (``MhaLora``'s out_proj part is a submodule's)."""
        return self.base_layer._parameters[name]

    def parameter_names(self, adapter: str | None = None) -> list[str]:
        """Adapted parameters (of one adapter, or of any), in the module's registration order (PEFT nests its
        wrappers in this order, which names the keys in the file)."""
        wanted = {p for name, params in self.adapters.items() if adapter in (None, name) for p in params}
        return [name for name, _ in self.base_layer.named_parameters(recurse=False) if name in wanted]

    def add_adapter(self, name: str, parameters: dict[str, tuple[int, float]], variant: str, init: str,
                    dtype: torch.dtype | None = None) -> nn.ModuleDict:
        """Adapter ``name`` on ``parameters`` (``{parameter name: (rank, alpha)}``), PEFT's init: A Kaiming-uniform
        (``init="gaussian"``: normal(0, 1/r)), B zero."""
        if name in self.adapters:
            raise LorakitError(f"adapter {name!r} already exists on this module; delete it first or pick another name")
        per_parameter = nn.ModuleDict()
        for parameter_name, (rank, alpha) in parameters.items():
            weight = self.parameter(parameter_name)
            experts, in_features, out_features, transposed = parameter_layout(self.base_layer, weight)
            kind = dtype or (torch.float64 if weight.dtype == torch.float64 else torch.float32)
            adapter = ParamAdapter(experts, in_features, out_features, transposed, weight.ndim, rank, alpha, variant,
                                   kind, weight.device)
            with torch.no_grad():
                if init == "gaussian":
                    init_from_cpu(adapter.lora_A, lambda t, r=rank: nn.init.normal_(t, std=1.0 / r))
                else:  # nn.Linear's default, as peft's ParamWrapper
                    init_from_cpu(adapter.lora_A, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))
            per_parameter[parameter_name] = adapter
        self.adapters[name] = per_parameter
        return per_parameter

    # -- forward -------------------------------------------------------------------------------------------------
    def adapted_parameters(self, names: list[str]) -> dict[str, torch.Tensor]:
        """``{parameter name: W + deltas of names}`` for every parameter one of ``names`` adapts."""
        base = self.base_layer
        weights: dict[str, torch.Tensor] = {}
        for name in names:
            for parameter_name, adapter in self.adapters[name].items():
                # not dict.get's default: it would be read (and fail, in a replica) even when not needed
                current = weights.get(parameter_name)
                if current is None:
                    current = base._parameters.get(parameter_name)
                    if current is None:  # a DataParallel replica: the parameter's copy is a plain attribute
                        current = _own_tensor(base, parameter_name)
                weights[parameter_name] = adapter.adapted(current)
        return weights

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            return self.base_layer(*args, **kwargs)
        if self.row_adapters is not None:
            return self._forward_mixed(args, kwargs)
        return self._call_with([n for n in self.active if n not in self.merged], args, kwargs)

    def _forward_mixed(self, args: tuple, kwargs: dict) -> Any:
        """``lorakit.mixed_batch``: each group of rows through the module with its own adapter (or none), outputs put
        back in row order. Rows are the first dimension of the first tensor argument (batch rows, or the flattened
        tokens of MoE blocks: rows x T, as ``_rows_by_adapter`` reads them); every tensor argument and output with
        that first dimension is split and joined along it. Right for modules that treat rows independently, as
        experts and routers do (each token through its chosen experts); peft refuses mixed batches here."""
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.ndim), None)
        if first is None:
            raise LorakitError(f"mixed_batch: {type(self.base_layer).__name__} got no tensor input to split by rows")
        count = first.shape[0]
        groups = self._rows_by_adapter(count)
        if len(groups) == 1:
            name = next(iter(groups))
            return self._call_with([name] if name is not None else [], args, kwargs)

        def pick(value: Any, rows: torch.Tensor) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == count:
                return value.index_select(0, rows.to(value.device))
            return value

        parts = []
        for name, rows in groups.items():
            output = self._call_with([name] if name is not None else [], tuple(pick(a, rows) for a in args),
                                     {k: pick(v, rows) for k, v in kwargs.items()})
            parts.append((rows, output))
        return join_rows(parts, count, "a module with LoRA on its parameters")

    def _call_with(self, names: list[str], args: tuple, kwargs: dict) -> Any:
        """The module called with the parameters of adapters ``names`` added (none: the module alone)."""
        base = self.base_layer
        if not names:
            return base(*args, **kwargs)
        weights = self.adapted_parameters(names)
        return call_with_tensors(base, {self.tensor_path(p): w for p, w in weights.items()}, args, kwargs)

    def tensor_path(self, name: str) -> str:
        """Dotted path, inside the wrapped module, of the base tensor that adapters' entries ``name`` change (here the
        parameter's own name; ``MhaLora``'s out_proj part is ``out_proj.weight``)."""
        return name

    # -- merge ---------------------------------------------------------------------------------------------------
    def times_applied(self, name: str) -> int:
        """How many times an adapter's delta on parameter ``name`` is added to it, in forward and merge alike: once
        here (``MhaLora``'s out_proj part: twice, as peft 0.21 does)."""
        return 1

    def merged_candidates(self, name: str) -> dict[str, torch.Tensor]:
        """``{parameter name: W + delta (times_applied times)}`` in float32 for adapter ``name`` (nothing is
        changed); each addition rounds to float32 in turn, as peft's merge."""
        candidates = {}
        for parameter_name, adapter in self.adapters[name].items():
            weight, delta = self.parameter(parameter_name).detach().float(), adapter.delta()
            for _ in range(self.times_applied(parameter_name)):
                weight = weight + delta
            candidates[parameter_name] = weight
        return candidates

    def merge(self, name: str, candidates: dict[str, torch.Tensor] | None = None) -> None:
        """Fold adapter ``name`` into the parameters (computed in float32, stored in each parameter's dtype)."""
        if name in self.merged or name not in self.adapters:
            return
        candidates = self.merged_candidates(name) if candidates is None else candidates
        with torch.no_grad():
            for parameter_name, weight in candidates.items():
                parameter = self.parameter(parameter_name)
                parameter.copy_(weight.to(parameter.dtype))
        self.merged.append(name)

    def unmerge(self) -> None:
        """Undo every merge, last first (exact up to rounding in the parameter's dtype)."""
        with torch.no_grad():
            while self.merged:
                name = self.merged.pop()
                for parameter_name, adapter in self.adapters[name].items():
                    parameter = self.parameter(parameter_name)
                    weight, delta = parameter.float(), adapter.delta()
                    for _ in range(self.times_applied(parameter_name)):  # the merge's additions, undone in turn
                        weight = weight - delta
                    parameter.copy_(weight.to(parameter.dtype))


def _own_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor ``module`` holds as parameter ``name``: the registered parameter, or, in a ``DataParallel`` replica
    (``torch.nn.parallel.replicate``: empty ``_parameters``, each parameter's copy a plain attribute, not a leaf, whose
    gradient flows back to the original parameter), that attribute."""
    tensor = module._parameters.get(name)
    if tensor is None:
        tensor = module.__dict__.get(name)
        if not isinstance(tensor, torch.Tensor):
            raise LorakitError(f"{type(module).__name__} holds no parameter {name!r} any more; the module was changed "
                               "after lorakit wrapped it: wrap it again (lorakit.inject)")
    return tensor


def param_hosts(model: nn.Module) -> dict[str, ParamLora]:
    """Every ``ParamLora`` of the model by the path of the module it wraps."""
    return {name: module for name, module in model.named_modules() if isinstance(module, ParamLora)}


def matches_parameter(key: str, targets: list[str]) -> bool:
    """PEFT's rule: ``<module path>.<parameter name>`` equals a target or ends with ``.<target>``."""
    return key in targets or any(key.endswith("." + target) for target in targets)


def file_key_prefixes(host: ParamLora, adapter: str) -> dict[str, str]:
    """``{parameter name: key infix}`` of adapter ``adapter`` in PEFT's file: PEFT wraps the module once per
    parameter, the first one (registration order) innermost, so the last adapted parameter's tensors are saved as
    ``<path>.lora_A.weight``, the one before as ``<path>.base_layer.lora_A.weight``, and so on."""
    names = host.parameter_names(adapter)
    return {p: ".base_layer" * (len(names) - 1 - i) for i, p in enumerate(names)}
