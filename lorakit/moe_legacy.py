"""Adapters trained on transformers 4's per-expert MoE layers, loaded onto transformers 5's fused experts.

Most Mixtral / Qwen-MoE adapters on the hub were trained when every expert was its own ``nn.Linear``
(``block_sparse_moe.experts.3.w1``, ``mlp.experts.3.gate_proj``) and the router was an ``nn.Linear`` ``gate``.
transformers 5 fuses the experts into ``mlp.experts.gate_up_proj`` (E, 2 x ffn, hidden) = [gate; up] and
``mlp.experts.down_proj`` (E, hidden, ffn), and makes the router a module with a 2-D ``weight``. peft 0.21 converts
such files when it loads them; this does the same, exactly (no approximation):

* ``down_proj`` (from ``w2`` / ``down_proj``): expert e's ``A_e (r, ffn)``, ``B_e (hidden, r)`` become the rows
  ``e*r..`` of ``lora_A (r*E, ffn)`` and the columns ``k*E + e`` of ``lora_B (hidden, r*E)`` (``lorakit.param_lora``'s
  layout);
* ``gate_up_proj`` (from ``w1`` + ``w3`` / ``gate_proj`` + ``up_proj``): rank 2r per expert, ``A_e = [A_gate; A_up]``
  and ``B_e = blockdiag(B_gate, B_up)``, so ``B_e A_e = [B_gate A_gate; B_up A_up]``; alpha doubles with the rank
  (``sqrt(2)`` x for rsLoRA) so the scaling is unchanged;
* the router's ``gate`` LoRA keeps its tensors, as LoRA on the 2-D parameter ``gate.weight``.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError

# transformers 4 expert layer -> (fused parameter, slot in [gate; up] or None)
_OLD_NAMES = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}
_EXPERT_KEY = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<name>[A-Za-z0-9_]+)\.lora_(?P<ab>[AB])\.weight$")
_ROUTER_KEY = re.compile(r"^(?P<router>.+)\.lora_(?P<ab>[AB])\.weight$")


def convert_legacy_experts(model: nn.Module, adapter_file: Any) -> Any:
    """``adapter_file`` (an ``io.AdapterFile``) with per-expert LoRA tensors turned into fused ``target_parameters``
    tensors for this model; the same object when it has none. Raises in one line when a file cannot be converted."""
    from lorakit.inject import _base_modules
    from lorakit.io import PREFIX, _layout_renamer, _strip
    from lorakit.param_lora import parameter_layout

    if adapter_file.config.target_parameters:  # a transformers-5 file already
        return adapter_file
    modules = _base_modules(model)
    renamed = _layout_renamer(model) or (lambda key: key)
    per_expert: dict[tuple[str, str], dict[int, dict[str, dict[str, torch.Tensor]]]] = {}
    routers: dict[str, dict[str, torch.Tensor]] = {}
    kept: dict[str, torch.Tensor] = {}
    for key, tensor in adapter_file.tensors.items():
        path = _strip(key)
        if path.rsplit(".lora_", 1)[0] not in modules:
            path = renamed(path)
        match = _EXPERT_KEY.match(path)
        if match and match["experts"] in modules and match["name"] in _OLD_NAMES and \
                f"{match['experts']}.{match['index']}.{match['name']}" not in modules:
            fused, slot = _OLD_NAMES[match["name"]]
            per_expert.setdefault((match["experts"], fused), {}).setdefault(int(match["index"]), {}).setdefault(
                "gate" if slot == 0 else "up" if slot == 1 else "down", {})[match["ab"]] = tensor
            continue
        router = _ROUTER_KEY.match(path)
        module = modules.get(router["router"]) if router else None
        weight = getattr(module, "_parameters", {}).get("weight") if module is not None else None
        if router and per_expert_model(modules, router["router"]) and isinstance(weight, torch.Tensor) and \
                weight.ndim == 2 and not isinstance(module, (nn.Linear, nn.Embedding)):
            routers.setdefault(router["router"], {})[router["ab"]] = tensor
            continue
        kept[key] = tensor
    if not per_expert and not routers:
        return adapter_file

    where = f"{adapter_file.folder}: a transformers-4 per-expert adapter"
    config = adapter_file.config
    if config.rank_pattern or config.alpha_pattern:
        raise LorakitError(f"{where} with rank_pattern / alpha_pattern cannot be converted to the fused experts of "
                           "transformers 5; load it with transformers 4, merge it there, and use the merged model")
    new_params: list[str] = []
    fused_tensors: dict[str, dict[str, torch.Tensor]] = {}  # experts path -> {param.lora_A: tensor}
    gate_up_rank = None
    for (experts_path, fused), by_expert in sorted(per_expert.items()):
        parameter = modules[experts_path]._parameters.get(fused)
        if parameter is None or parameter.ndim != 3:
            raise LorakitError(f"{where}: {experts_path} has no fused 3-D parameter {fused!r} to take its experts' LoRA")
        count = parameter_layout(modules[experts_path], parameter)[0]
        if sorted(by_expert) != list(range(count)):
            raise LorakitError(f"{where}: {experts_path} has LoRA for experts {sorted(by_expert)[:8]}, this model has "
                               f"{count} experts; every expert needs its LoRA")
        parts = ("gate", "up") if fused == "gate_up_proj" else ("down",)
        A_list, B_list = [], []
        for index in range(count):
            pieces = by_expert[index]
            if set(pieces) != set(parts) or any(set(p) != {"A", "B"} for p in pieces.values()):
                raise LorakitError(f"{where}: expert {index} of {experts_path} has LoRA on {sorted(pieces)}; the fused "
                                   f"{fused} needs all of {list(parts)} with lora_A and lora_B (peft refuses it too)")
            A_list.append(torch.cat([pieces[p]["A"] for p in parts]))  # (n*r, in)
            B_list.append(torch.block_diag(*[pieces[p]["B"] for p in parts]))  # (n*out, n*r)
        rank = A_list[0].shape[0]
        if any(a.shape[0] != rank for a in A_list):
            raise LorakitError(f"{where}: the experts of {experts_path} have different ranks")
        if fused == "gate_up_proj":
            gate_up_rank = rank
        fused_tensors.setdefault(experts_path, {})[f"{fused}.lora_A"] = torch.cat(A_list)  # (E*r', in)
        B = torch.stack(B_list, dim=-1)  # (out, r', E): column k*E + e after the reshape
        fused_tensors[experts_path][f"{fused}.lora_B"] = B.reshape(B.shape[0], -1)
        new_params.append(f"{experts_path}.{fused}")
    for router_path, pair in routers.items():
        if set(pair) != {"A", "B"}:
            raise LorakitError(f"{where}: {router_path} has only lora_{next(iter(pair))}")
        fused_tensors.setdefault(router_path, {})["weight.lora_A"] = pair["A"]
        fused_tensors[router_path]["weight.lora_B"] = pair["B"]
        new_params.append(f"{router_path}.weight")

    # file keys in lorakit.param_lora's nesting: the module's last adapted parameter outermost
    tensors = dict(kept)
    for path, named in fused_tensors.items():
        order = [n for n, _ in modules[path].named_parameters(recurse=False) if f"{n}.lora_A" in named]
        for index, name in enumerate(order):
            infix = ".base_layer" * (len(order) - 1 - index)
            for which in ("lora_A", "lora_B"):
                tensors[f"{PREFIX}{path}{infix}.{which}.weight"] = named[f"{name}.{which}"]

    targets = config.target_modules
    if isinstance(targets, list):  # the old names that now match no module (w1, w2, w3, gate)
        targets = [t for t in targets if any(p == t or p.endswith("." + t) for p in modules if p)
                   and not any(p.endswith("." + t) or p == t for p in routers)]
    rank_pattern, alpha_pattern = {}, {}
    if gate_up_rank is not None and gate_up_rank != config.r:
        factor = math.sqrt(gate_up_rank / config.r) if config.variant in ("rslora", "rsdora") else gate_up_rank / config.r
        rank_pattern = {"gate_up_proj": gate_up_rank}
        alpha_pattern = {"gate_up_proj": config.alpha * factor}
    names = sorted({_per_layer(p) for p in new_params})
    try:
        converted = config.replace(target_modules=targets or None, target_parameters=names, rank_pattern=rank_pattern,
                                   alpha_pattern=alpha_pattern)
    except LorakitError as error:  # DoRA, dropout: not possible on the fused experts
        raise LorakitError(f"{where} cannot be converted to transformers 5's fused experts: {error}") from None
    return replace(adapter_file, config=converted, tensors=tensors)


def per_expert_model(modules: dict[str, nn.Module], router_path: str) -> bool:
    """The router sits beside fused experts (``<block>.gate`` next to ``<block>.experts`` with 3-D parameters)."""
    experts = modules.get(router_path.rsplit(".", 1)[0] + ".experts")
    return experts is not None and any(p.ndim == 3 for p in experts.parameters(recurse=False))


def _per_layer(name: str) -> str:
    return re.sub(r"^.*?\.\d+\.", "", name)
