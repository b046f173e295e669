"""Build a new adapter from weighted existing ones: PEFT's ``add_weighted_adapter``, with its semantics.

``combine_adapters(model, {"a": 0.7, "b": 0.3}, name="mix", method="cat")`` adds adapter ``mix`` to every LoRA layer
that holds any input, as a plain LoRA with ``alpha = r`` (scaling 1: the inputs' scalings are folded into the
tensors), so it can be activated, saved, merged and served like any other adapter. Per layer, with inputs i of
weight w_i and scaling s_i, A_i (r_i, in), B_i (out, r_i):

* ``cat``: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...] (sum r_i, in), B = [B_1, B_2, ...]: exactly sum_i w_i s_i B_i A_i.
  The rank is the sum of the inputs' ranks (zero-padded where a layer holds fewer inputs).
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: A and B are combined *separately*
  with weights sqrt(|w_i s_i|) (A also takes the sign): B A is then only an approximation of the weighted sum, but
  the rank stays r. All inputs need the same rank.
* ``svd`` and the ``*_svd`` forms: the full deltas w_i s_i B_i A_i are combined (pruned first for ties / dare /
  magnitude_prune) and cut back to ``svd_rank`` (default: the largest input rank) by an SVD: B = U S, A = V^T.

TIES (Yadav et al. 2023) keeps the top ``density`` share of each input by magnitude, elects a sign per element and
averages the inputs that agree with it; DARE (Yu et al. 2023) drops each element with probability 1 - density and
rescales by 1 / density. DARE's masks come from torch's global generator (or ``seed``), drawn in PEFT's order
(layer by layer in module order; per layer A's inputs then B's, or the deltas), so a run equals PEFT's when the
generator is in the state PEFT's masks start from. That is not the state before ``add_weighted_adapter``: PEFT first
draws the new adapter's random initialisation (``tests/test_combine.py`` injects quietly to line the two up);
``seed`` makes lorakit's own runs reproducible.

Where this differs from peft 0.21 on purpose (PEFT's result would be wrong or lost):
* rsLoRA inputs: PEFT's new adapter copies ``use_rslora`` from the first input while its tensors assume scaling 1,
  so it runs sqrt(r) times too strong; here it is plain LoRA with scaling 1 (same tensors, right function).
* DoRA inputs are refused (PEFT keeps only their directions and gives the new adapter the base's norms as magnitude,
  so even one DoRA adapter of weight 1 does not come back).
* ``modules_to_save``: PEFT gives the new adapter a fresh copy of the *original* module (or none), losing the trained
  one; here the one input that has a trained copy passes it on (unweighted: a whole module cannot be weighted). Two
  inputs with copies of the same module are refused, as in PEFT.
* An existing name is refused unless ``overwrite=True`` (PEFT silently does nothing); density outside (0, 1] is
  refused (PEFT divides by zero for DARE); ``svd_rank`` above a layer's min(out, in) keeps that layer's full rank
  and zero-pads (PEFT raises a shape error); a ``linear`` layer below the common rank (a rank_pattern) is zero-padded
  to it (PEFT writes a smaller tensor than its config says, and its file does not load).
* Inputs on different layers (``layers_to_transform`` / ``layers_pattern`` that differ): the new adapter holds every
  layer that any input holds, so the result is the weighted sum on all of them. PEFT's new adapter inherits the first
  input's ``layers_to_transform`` and drops the other inputs' layers. peft reads the saved result as lorakit runs it.
* LoRA on raw parameters (``target_parameters``: fused MoE expert stacks, routers) and on nn.MultiheadAttention
  combines too (PEFT refuses the former). Each expert ``e`` of a stack is a layer of its own for ``cat`` and the svd
  methods: ``cat`` stacks the inputs' per-expert factors (A_e = [w_1 s_1 A_1e; ...], B_e = [B_1e, ...]: exactly
  sum_i w_i s_i B_ie A_ie per expert, rank r_1 + r_2 + ... per expert), the svd methods cut each expert's combined
  delta back to ``svd_rank``; the result is packed in peft's layout (``lora_A (R * E, in)``, ``lora_B (out, R * E)``,
  see lorakit.param_lora), so peft loads it. The same-rank methods combine the whole ``lora_A`` / ``lora_B`` tensors
  element by element as for a linear layer (each expert's block with its own inputs); the pruned methods (ties,
  dare, magnitude_prune and their _svd forms) rank and drop the elements of a whole parameter at once, as of one
  layer.

The core of lorakit: no transformers, training, serving or CLI imports.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import warnings
from typing import Iterator, Sequence

import torch
from torch import nn

from lorakit import quant
from lorakit._progress import slow_work
from lorakit.adapters import _require, delete_adapter, set_adapter
from lorakit.combine_methods import METHODS, SAME_RANK, SVD
from lorakit.config import LoraConfig, listed, shown
from lorakit.errors import LorakitError
from lorakit.inject import adapter_hosts, adapter_names, check_adapter_name, find_targets, unwrap
from lorakit.layers import LoraEmbedding, LoraLayer, ModulesToSave
from lorakit.mha_lora import MhaLora
from lorakit.param_lora import ParamAdapter, ParamLora, matches_parameter

_PRUNED = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # the methods (and their _svd forms) that use density
_SIGNED = ("ties", "dare_ties")  # the methods that elect a sign (majority_sign_method)


def combine_adapters(model: nn.Module, adapters: dict[str, float] | Sequence[str] | str,
                     weights: Sequence[float] | None = None, name: str = "combined", method: str = "cat",
                     density: float | None = None, majority_sign_method: str = "total", svd_rank: int | None = None,
                     svd_clamp: float | None = None, svd_full_matrices: bool = True, svd_driver: str | None = None,
                     svd_lowrank: bool = False, seed: int | None = None, overwrite: bool = False,
                     trainable: bool = False, **peft_names) -> str:
    """Add adapter ``name``, a weighted combination of ``adapters``, to ``model`` and make it the active adapter.

    Args:
        model: a model holding the input adapters (lorakit.inject / lorakit.load_adapter).
        adapters: ``{name: weight}``, or a list of names with ``weights`` (default: 1.0 each). Weights may be
            negative (subtract an adapter's effect).
        weights: one number per name when ``adapters`` is a list.
        name: the new adapter's name. An existing name is refused unless ``overwrite=True``.
        method: ``cat`` (exact, rank = sum of ranks), ``linear``, ``svd`` (exact up to ``svd_rank``), ``ties``,
            ``dare_linear``, ``dare_ties``, ``magnitude_prune`` or their ``_svd`` forms (see the module docstring).
            With one input adapter every method is ``linear``, as in PEFT (a warning says so).
        density: share of elements kept, in (0, 1]; required by the ties / dare / magnitude_prune methods.
        majority_sign_method: ``"total"`` (sign of the sum) or ``"frequency"`` (most common sign), for ties methods.
        svd_rank: rank of an svd method's result (default: the largest input rank).
        svd_clamp: quantile in [0, 1] at which an svd method clamps U S and V^T (default: none).
        svd_full_matrices, svd_driver: passed to ``torch.linalg.svd`` (the driver works on CUDA tensors only).
            PEFT's default ``full_matrices=True`` is kept for equal results; ``False`` needs far less memory on
            large layers (the product B A is the same, A and B may differ in sign).
        svd_lowrank: for ``method="svd"``: factor the sum from the inputs' own factors (QR of the stacked A's and
            B's, then the SVD of an R x R core, R = the sum of the ranks) instead of an SVD of each full (out, in)
            delta. The same rank-``svd_rank`` result (B A equal to float32 rounding; A and B may differ in sign) in
            O((out + in) R^2) instead of O(out in min(out, in)): minutes instead of hours for a 7B model on a CPU
            Not for the pruned ``_svd`` methods, whose sums are not low-rank.
        seed: when given, DARE's random masks are drawn from a generator seeded with it (torch's global generator
            is left as it was); otherwise from the global generator, as PEFT does.
        overwrite: replace an existing adapter ``name`` (it must not be merged); it may be one of the inputs.
        trainable: whether the new adapter's tensors require gradients (PEFT freezes it; so does the default).
    Returns:
        ``name``. On any error the model is left exactly as it was.
    """
    if peft_names:  # code ported from peft's add_weighted_adapter: say what its names are here
        ours = {"combination_type": "method", "adapter_name": "name"}
        advice = [f"{key}= (peft's name: write {ours[key]}=)" if key in ours else f"{key}= (not an option)"
                  for key in peft_names]
        raise LorakitError(f"combine_adapters got unknown keyword(s): {'; '.join(advice)}")
    names, weight_list = _inputs(adapters, weights)
    model = unwrap(model)  # torch.compile / DDP: the new adapter's LoraConfig goes on the model inside (see unwrap)
    _require(model, names)
    _check_name(model, name, overwrite)
    method = _check_options(method, density, majority_sign_method, svd_rank, svd_clamp, svd_driver, svd_lowrank)
    if len(names) == 1 and method != "linear":
        if method != "cat":
            warnings.warn(f"combine_adapters: one input adapter, so method {method!r} is 'linear' (PEFT's rule); "
                          "density / svd_rank do not apply", UserWarning, stacklevel=2)
        method = "linear"
    hosts = {path: host for path, host in adapter_hosts(model).items() if isinstance(host, (LoraLayer, ParamLora))}
    layers = {path: host for path, host in hosts.items() if isinstance(host, LoraLayer)}
    params = {path: host for path, host in hosts.items() if isinstance(host, ParamLora)}
    merged = next(((path, host.merged[0]) for path, host in hosts.items() if host.merged), None)
    if merged is not None:  # the new adapter becomes active: on top of a merged one, both would apply
        raise LorakitError(f"adapter {merged[1]!r} is merged into the base (e.g. {merged[0]}); call lorakit.unmerge(model) "
                           "before combining, so the new adapter is not applied on top of it")
    _check_variants(layers, names)
    ranks = {n: max(r for h in hosts.values() if n in h.adapters for r in _ranks(h, n)) for n in names
             if any(n in h.adapters for h in hosts.values())}
    if not ranks:
        raise LorakitError(f"adapters {listed(names)} hold no LoRA layers (only modules_to_save copies), so there is "
                           "nothing to combine")
    new_rank = _new_rank(method, names, ranks, svd_rank)
    copies = _modules_to_save(model, names)
    if svd_driver is not None and any(not a.lora_A.is_cuda for h in hosts.values() for n in names
                                      if n in h.adapters for a in _lora_modules(h, n)):
        raise LorakitError(f"svd_driver={svd_driver!r} works on CUDA tensors only (cuSOLVER); these adapters are on the "
                           "CPU: leave svd_driver out")

    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    param_results: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    with _generator(seed, hosts.values()):
        for path, layer in slow_work(hosts.items(), f"combining into {name}", "layer", total=len(hosts)):
            # module order: DARE draws its masks in PEFT's order
            present = [(n, w) for n, w in zip(names, weight_list) if n in layer.adapters]
            if not present:
                continue
            if isinstance(layer, ParamLora):
                param_results[path] = {
                    part: _combine_parameter(path, part, [(layer.adapters[n][part], w) for n, w in present if part in
                                                          layer.adapters[n]], new_rank, method, density,
                                             majority_sign_method, svd_clamp, svd_full_matrices, svd_driver, svd_lowrank)
                    for part in layer.parameter_names()
                    if any(part in layer.adapters[n] for n, _ in present)}
            elif method == "cat":
                results[path] = _cat(layer, present, new_rank)
            elif method in SAME_RANK:
                results[path] = _same_rank(layer, path, present, new_rank, method, density, majority_sign_method)
            else:
                results[path] = _svd(layer, present, new_rank, method.removesuffix("_svd"), density, majority_sign_method,
                                     svd_clamp, svd_full_matrices, svd_driver, svd_lowrank)
    saved_copies = {path: copy.deepcopy(host.copies[owner]) for path, (host, owner) in copies.items()}

    # everything is computed and checked: only now is the model changed
    first_config = getattr(model, "lorakit_configs", {}).get(names[0]) or LoraConfig()
    attention = [path for path in param_results if isinstance(params[path], MhaLora)]
    parameters = _target_parameters(model, names, {path: list(chosen) for path, chosen in param_results.items()
                                                   if path not in attention})
    config = LoraConfig(r=new_rank, alpha=float(new_rank),
                        dropout=0.0 if parameters else first_config.dropout,  # no dropout beside target_parameters
                        target_modules=_target_modules(model, [*results, *attention], list(saved_copies)), variant="lora",
                        modules_to_save=list(saved_copies) or None, target_parameters=parameters)
    if name in adapter_names(model):
        delete_adapter(model, name)
    _add(hosts, results, adapter_hosts(model), saved_copies, name, config.dropout, trainable, param_results)
    model.lorakit_configs = {**getattr(model, "lorakit_configs", {}), name: config}
    set_adapter(model, name)
    return name


# -- checks --------------------------------------------------------------------------------------------------------
def _inputs(adapters, weights) -> tuple[list[str], list[float]]:
    """(names, weights) from a dict or a list plus weights; every mistake is one line."""
    if isinstance(adapters, str):
        adapters = [adapters]
    if isinstance(adapters, dict):
        if weights is not None:
            raise LorakitError("give the weights once: either adapters={name: weight, ...} or a list of names with "
                               "weights=[...]")
        names, weights = list(adapters), list(adapters.values())
    elif isinstance(adapters, (list, tuple)):
        names = list(adapters)
        if weights is None:
            weights = [1.0] * len(names)
        elif isinstance(weights, (str, bytes, dict)) or not hasattr(weights, "__len__") or (
                isinstance(weights, torch.Tensor) and weights.dim() != 1):
            raise LorakitError(f"weights must be a list with one number per adapter, got {shown(weights)}")
        weights = [w.item() if isinstance(w, torch.Tensor) and w.numel() == 1 else w for w in list(weights)]
        if len(weights) != len(names):
            raise LorakitError(f"{len(names)} adapters ({listed(names)}) but {len(weights)} weights; give one weight per "
                               "adapter")
    else:
        raise LorakitError(f"adapters must be a dict {{name: weight}} or a list of adapter names, got {shown(adapters)}")
    if not names:
        raise LorakitError("no adapters to combine; give at least one name (see lorakit.adapter_names(model))")
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise LorakitError(f"adapter names must be strings, got {shown(bad[0])}; see lorakit.adapter_names(model)")
    twice = [n for n in dict.fromkeys(names) if names.count(n) > 1]
    if twice:
        raise LorakitError(f"adapter {twice[0]!r} is named twice; give each input once with its total weight")
    for n, w in zip(names, weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(float(w)):
            raise LorakitError(f"the weight of adapter {n!r} must be a finite number, got {shown(w)}")
    return names, [float(w) for w in weights]


def _check_name(model: nn.Module, name: str, overwrite: bool) -> None:
    check_adapter_name(name, "the new adapter's name")
    if name not in adapter_names(model):
        return
    if not overwrite:
        raise LorakitError(f"the model already has an adapter named {name!r}; pass another name, or overwrite=True to "
                           "replace it")
    merged = [p for p, h in adapter_hosts(model).items() if isinstance(h, LoraLayer) and name in h.merged]
    if merged:
        raise LorakitError(f"adapter {name!r} is merged (e.g. in {merged[0]}), so it cannot be overwritten; call "
                           "lorakit.unmerge(model) first")


def _check_options(method, density, majority_sign_method, svd_rank, svd_clamp, svd_driver, svd_lowrank=False) -> str:
    if method not in METHODS:
        close = [m for m in METHODS if isinstance(method, str) and m == method.lower().replace("-", "_")]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LorakitError(f"unknown method {shown(method)}{hint}; choose one of {', '.join(METHODS)}")
    base = method.removesuffix("_svd")
    if base in _PRUNED:
        if density is None:
            raise LorakitError(f"method {method!r} needs density, the share of each adapter's elements it keeps (e.g. "
                               "density=0.5)")
        if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < float(density) <= 1:
            raise LorakitError(f"density must be a number in (0, 1] (the share of elements kept), got {shown(density)}")
    elif density is not None:
        raise LorakitError(f"density applies to the ties / dare / magnitude_prune methods, not {method!r}; leave it out")
    if majority_sign_method not in ("total", "frequency"):
        raise LorakitError(f"majority_sign_method must be 'total' or 'frequency', got {shown(majority_sign_method)}")
    if majority_sign_method != "total" and base not in _SIGNED:
        raise LorakitError(f"majority_sign_method applies to the ties / dare_ties methods, not {method!r}; leave it out")
    if method not in SVD and (svd_rank is not None or svd_clamp is not None or svd_driver is not None):
        raise LorakitError(f"svd_rank / svd_clamp / svd_driver apply to the svd methods ({', '.join(SVD)}), not "
                           f"{method!r}; leave them out")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise LorakitError(f"svd_rank must be a positive integer, got {shown(svd_rank)}")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, numbers.Real)
                                  or not 0 <= float(svd_clamp) <= 1):
        raise LorakitError(f"svd_clamp must be a quantile in [0, 1] (e.g. 0.99), got {shown(svd_clamp)}")
    if svd_lowrank and method != "svd":
        raise LorakitError(f"svd_lowrank works with method='svd' only, not {method!r} (a pruned sum is not low-rank); "
                           "leave it out")
    if svd_driver not in (None, "gesvd", "gesvdj", "gesvda"):
        raise LorakitError(f"svd_driver must be None, 'gesvd', 'gesvdj' or 'gesvda', got {shown(svd_driver)}")
    return method


def _check_variants(layers: dict[str, LoraLayer], names: list[str]) -> None:
    for path, layer in layers.items():
        for n in names:
            adapter = layer.adapters[n] if n in layer.adapters else None
            if adapter is None:
                continue
            if adapter.magnitude is not None:
                raise LorakitError(f"adapter {n!r} is DoRA ({path}): a weighted sum of DoRA adapters has no magnitude "
                                   "that keeps their effect, so lorakit does not combine them (peft drops the "
                                   "magnitudes silently); merge them one at a time with lorakit.merge instead")
            if adapter.lora_bias is not None:  # the combined adapter is built from A and B alone: the bias would drop
                raise LorakitError(f"adapter {n!r} has a bias on lora_B (lora_bias, {path}), which lorakit does not "
                                   "combine (the combined adapter holds A and B only); merge such adapters one at a time "
                                   "with lorakit.merge instead")
            if adapter.pissa_init is not None:
                raise LorakitError(f"adapter {n!r} was made with init='pissa' on this model, whose base now holds the "
                                   "residual; save it (lorakit.save_adapter), load the file into a fresh base, then combine")


def _new_rank(method: str, names: list[str], ranks: dict[str, int], svd_rank: int | None) -> int:
    """PEFT's rule: cat sums the ranks, the svd methods take svd_rank or the largest, the others need one rank."""
    if method == "cat":
        return sum(ranks.values())
    if method in SVD:
        return svd_rank or max(ranks.values())
    if len(set(ranks.values())) > 1:
        shown_ranks = ", ".join(f"{n}: r={r}" for n, r in ranks.items())
        raise LorakitError(f"method {method!r} needs adapters of one rank, got {shown_ranks}; use method='cat' (rank "
                           f"{sum(ranks.values())}, exact) or 'svd' (rank svd_rank, default {max(ranks.values())})")
    return next(iter(ranks.values()))


def _lora_modules(host: nn.Module, name: str) -> list:
    """The adapter's LoRA tensors' holders on one host: a LoraAdapter, or one ParamAdapter per adapted parameter."""
    return list(host.adapters[name].values()) if isinstance(host, ParamLora) else [host.adapters[name]]


def _ranks(host: nn.Module, name: str) -> list[int]:
    """The ranks adapter ``name`` has on ``host`` (per expert for a stack: peft's r)."""
    return [a.rank for a in _lora_modules(host, name)]


def _target_parameters(model: nn.Module, names: list[str], chosen: dict[str, list[str]]) -> list[str] | None:
    """``target_parameters`` selecting exactly the combined parameters: the inputs' own entries when those do (so
    the file names them as the inputs did), else every ``<path>.<parameter>``."""
    keys = sorted(f"{path}.{part}" for path, parts in chosen.items() for part in parts)
    if not keys:
        return None
    configs = getattr(model, "lorakit_configs", {})
    entries = sorted({t for n in names for t in (getattr(configs.get(n), "target_parameters", None) or [])})
    from lorakit.param_lora import param_hosts

    every = [f"{path}.{p}" for path, host in param_hosts(model).items() if not isinstance(host, MhaLora)
             for p, _ in host.base_layer.named_parameters(recurse=False)]
    if entries and sorted(k for k in every if matches_parameter(k, entries)) == keys:
        return entries
    return keys


def _modules_to_save(model: nn.Module, names: list[str]) -> dict[str, tuple[ModulesToSave, str]]:
    """path -> (host, the one input adapter with a trained copy there). Two owners of one module are refused."""
    found = {}
    for path, host in adapter_hosts(model).items():
        if not isinstance(host, ModulesToSave):
            continue
        owners = [n for n in names if n in host.copies]
        if len(owners) > 1:
            raise LorakitError(f"adapters {listed(owners)} each have a trained copy of {path} (modules_to_save); whole "
                               "modules cannot be combined (peft refuses too): combine without all but one of them")
        if owners:
            found[path] = (host, owners[0])
    return found


@contextlib.contextmanager
def _generator(seed: int | None, layers) -> Iterator[None]:
    """With a seed: a forked global generator seeded with it (so DARE's draws equal PEFT's after
    ``torch.manual_seed(seed)``), restored afterwards. Without: the global generator as it is."""
    if seed is None:
        yield
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise LorakitError(f"seed must be an integer, got {shown(seed)}")
    seed = int(seed)
    devices = sorted({a.lora_A.device.index or 0 for layer in layers for n in layer.adapters
                      for a in _lora_modules(layer, n) if a.lora_A.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# -- the combinations, per layer (A (r, in), B (out, r) in linear form; embeddings as LoraEmbedding holds them) -------
def _padded(lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (k, in), B (out, k) zero-padded to rank ``rank`` (the product is unchanged)."""
    k = lora_A.shape[0]
    if k == rank:
        return lora_A, lora_B
    A = lora_A.new_zeros(rank, lora_A.shape[1])
    B = lora_B.new_zeros(lora_B.shape[0], rank)
    A[:k], B[:, :k] = lora_A, lora_B
    return A, B


def _cat(layer: LoraLayer, present: list[tuple[str, float]], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the inputs: A_i scaled by w_i then by s_i (PEFT's order of the two products), B_i as they are."""
    dtype = layer.adapters[present[0][0]].lora_A.dtype
    As = [layer.adapters[n].lora_A.detach().to(dtype) * w * layer.adapters[n].scaling for n, w in present]
    Bs = [layer.adapters[n].lora_B.detach().to(dtype) for n, _ in present]
    return _padded(torch.cat(As, dim=0), torch.cat(Bs, dim=1), rank)


def _same_rank(layer: LoraLayer, path: str, present, rank: int, method: str, density, sign_method):
    """A and B combined separately, with sqrt(|w s|) on each (the sign on A only, so it is not applied twice)."""
    lora = [layer.adapters[n] for n, _ in present]
    if len({a.rank for a in lora}) > 1:
        shown_ranks = ", ".join(f"{n}: r={a.rank}" for (n, _), a in zip(present, lora))
        raise LorakitError(f"method {method!r} needs one rank per layer, but {path} has {shown_ranks} (a rank_pattern); "
                           "use method='cat' or 'svd'")
    device, dtype = lora[0].lora_A.device, lora[0].lora_A.dtype
    scaled = [w * a.scaling for (_, w), a in zip(present, lora)]
    root = [math.sqrt(abs(v)) for v in scaled]
    weights_A = torch.tensor([r if v >= 0 else -r for r, v in zip(root, scaled)], device=device)
    weights_B = torch.tensor(root, device=device)
    lora_A = _merge_tensors([a.lora_A.detach() for a in lora], weights_A, method, density, sign_method).to(dtype)
    lora_B = _merge_tensors([a.lora_B.detach() for a in lora], weights_B, method, density, sign_method).to(dtype)
    return _padded(lora_A, lora_B, rank)


def _svd(layer: LoraLayer, present, rank: int, method: str, density, sign_method, clamp, full_matrices, driver,
         lowrank: bool = False):
    """The weighted deltas (s_i B_i A_i, float32 (out, in)) combined, then their best rank-``rank`` factors."""
    lora = [layer.adapters[n] for n, _ in present]
    if lowrank:
        U, S, Vh = _lowrank_svd(lora, [w for _, w in present], driver)
        return _factors(U, S, Vh, rank, clamp, lora[0].lora_A.dtype)
    # PEFT combines embeddings' and Conv1D's deltas in their base layout (in, out): DARE's masks are drawn in that
    # order, so the same layout gives the same masks
    flipped = isinstance(layer, LoraEmbedding) or quant.from_conv1d(layer.base_layer)
    deltas = [a.delta_weight().T if flipped else a.delta_weight() for a in lora]
    weights = torch.tensor([w for _, w in present], device=deltas[0].device)
    delta = _merge_tensors(deltas, weights, "linear" if method == "svd" else method, density, sign_method)
    delta = delta.T if flipped else delta  # (out, in)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    return _factors(U, S, Vh, rank, clamp, lora[0].lora_A.dtype)


def _lowrank_svd(lora, weights: list[float], driver):
    """The SVD of sum_i w_i s_i B_i A_i = B_cat A_cat without forming it: B_cat = Q_b R_b, A_cat^T = Q_a R_a, and
    R_b R_a^T = U_c S V_c^T (R x R) give U = Q_b U_c, V^T = V_c^T Q_a^T. Float32; (out, k), (k,), (k, in)."""
    B_cat = torch.cat([a.lora_B.detach().float() for a in lora], dim=1)  # (out, R)
    A_cat = torch.cat([a.lora_A.detach().float() * (w * a.scaling) for a, w in zip(lora, weights)])  # (R, in)
    Q_b, R_b = torch.linalg.qr(B_cat)  # (out, m), (m, R) with m = min(out, R)
    Q_a, R_a = torch.linalg.qr(A_cat.T)  # (in, n), (n, R)
    U_c, S, Vh_c = torch.linalg.svd(R_b @ R_a.T, full_matrices=False, driver=driver)
    return Q_b @ U_c, S, Vh_c @ Q_a.T


def _factors(U, S, Vh, rank: int, clamp, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``rank`` factors A = V^T (rank, in), B = U S (out, rank) of an SVD, clamped, zero-padded, cast."""
    k = min(rank, S.shape[0])  # a layer smaller than the rank keeps all it has (zero-padded below)
    lora_B = U[:, :k] @ torch.diag(S[:k])  # (out, k); the same product PEFT forms, so equal bits
    lora_A = Vh[:k, :]  # (k, in)
    if clamp is not None:  # clip outliers at a quantile of all factor entries (kohya's svd_merge_lora)
        high = torch.quantile(torch.cat([lora_B.flatten(), lora_A.flatten()]), float(clamp))
        lora_B, lora_A = lora_B.clamp(-high, high), lora_A.clamp(-high, high)
    return _padded(lora_A.to(dtype), lora_B.to(dtype), rank)


def _merge_tensors(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density, sign_method) -> torch.Tensor:
    """One tensor from same-shaped ``tensors`` and one weight each (a 1-D tensor): task arithmetic, TIES, DARE."""
    if method in ("magnitude_prune", "ties"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [_keep_random(t, density) for t in tensors]
    stacked = torch.stack(tensors)  # (n, *shape)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if method in ("ties", "dare_ties"):
        return _disjoint_mean(stacked, weighted, sign_method)
    return weighted.sum(dim=0)


def _keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density * numel) entries of largest magnitude."""
    if density >= 1:
        return tensor
    keep = torch.zeros_like(tensor).flatten()
    keep[tensor.abs().flatten().topk(int(density * tensor.numel())).indices] = 1
    return tensor * keep.view_as(tensor)


def _keep_random(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by 1 / density (expectation unchanged)."""
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * keep / density


def _disjoint_mean(stacked: torch.Tensor, weighted: torch.Tensor, sign_method: str) -> torch.Tensor:
    """TIES: per element, the elected sign (of the unweighted sum, or the most frequent), then the mean of the
    weighted entries that carry it (pruned zeros carry no sign)."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    agree = signs == torch.where(votes >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


# -- LoRA on raw parameters (lorakit.param_lora): per-expert factors --------------------------------------------
def _per_expert(adapter: ParamAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (E, r, in), B (E, out, r))``: each expert's factors, from peft's interleaved layout."""
    lora_A, lora_B = adapter.lora_A.detach(), adapter.lora_B.detach()
    per_A = lora_A.reshape(adapter.experts, adapter.rank, adapter.in_features)
    per_B = lora_B.reshape(adapter.out_features, adapter.rank, adapter.experts).permute(2, 0, 1)
    return per_A, per_B


def _packed(per_A: torch.Tensor, per_B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert ``A (E, k, in)``, ``B (E, out, k)``, zero-padded to rank ``rank``, in peft's layout:
    ``lora_A (rank * E, in)`` (expert-major rows), ``lora_B (out, rank * E)`` (column k * E + e)."""
    experts, k, in_features = per_A.shape
    if k < rank:
        per_A = torch.cat([per_A, per_A.new_zeros(experts, rank - k, in_features)], dim=1)
        per_B = torch.cat([per_B, per_B.new_zeros(experts, per_B.shape[1], rank - k)], dim=2)
    return per_A.reshape(experts * rank, in_features), per_B.permute(1, 2, 0).reshape(per_B.shape[1], rank * experts)


def _combine_parameter(path: str, part: str, present: list[tuple[ParamAdapter, float]], rank: int, method: str,
                       density, sign_method, clamp, full_matrices, driver, lowrank) -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's ``(lora_A, lora_B)`` on one adapted parameter (see the module docstring)."""
    dtype = present[0][0].lora_A.dtype
    if method == "cat":  # per expert: A_e = [w_i s_i A_ie; ...], B_e = [B_ie, ...]
        factors = [_per_expert(a) for a, _ in present]
        per_A = torch.cat([A.to(dtype) * w * a.scaling for (A, _), (a, w) in zip(factors, present)], dim=1)
        per_B = torch.cat([B.to(dtype) for _, B in factors], dim=2)
        return _packed(per_A, per_B, rank)
    if method in SAME_RANK:  # the whole tensors, element by element (peft's rule for a layer's A and B)
        if len({a.rank for a, _ in present}) > 1:
            shown_ranks = ", ".join(f"r={a.rank}" for a, _ in present)
            raise LorakitError(f"method {method!r} needs one rank per layer, but {path}.{part} has {shown_ranks} (a "
                               "rank_pattern); use method='cat' or 'svd'")
        adapter = present[0][0]
        device = adapter.lora_A.device
        scaled = [w * a.scaling for a, w in present]
        root = [math.sqrt(abs(v)) for v in scaled]
        weights_A = torch.tensor([r if v >= 0 else -r for r, v in zip(root, scaled)], device=device)
        lora_A = _merge_tensors([a.lora_A.detach() for a, _ in present], weights_A, method, density, sign_method)
        lora_B = _merge_tensors([a.lora_B.detach() for a, _ in present], torch.tensor(root, device=device), method,
                                density, sign_method)
        per_A, per_B = _per_expert_of(adapter, lora_A.to(dtype), lora_B.to(dtype))
        return _packed(per_A, per_B, rank)
    base = method.removesuffix("_svd")
    if lowrank:  # per expert: QR of the stacked factors, SVD of the small core (batched over experts)
        B_cat = torch.cat([_per_expert(a)[1].float() for a, _ in present], dim=2)  # (E, out, R)
        A_cat = torch.cat([_per_expert(a)[0].float() * (w * a.scaling) for a, w in present], dim=1)  # (E, R, in)
        Q_b, R_b = torch.linalg.qr(B_cat)
        Q_a, R_a = torch.linalg.qr(A_cat.transpose(1, 2))
        U_c, S, Vh_c = torch.linalg.svd(R_b @ R_a.transpose(1, 2), full_matrices=False, driver=driver)
        U, Vh = Q_b @ U_c, Vh_c @ Q_a.transpose(1, 2)
    else:  # the weighted per-expert deltas (E, out, in), combined as one tensor, then an SVD per expert
        deltas = []
        for adapter, _ in present:
            per_A, per_B = _per_expert(adapter)
            deltas.append((per_B.float() @ per_A.float()) * adapter.scaling)
        weights = torch.tensor([w for _, w in present], device=deltas[0].device)
        delta = _merge_tensors(deltas, weights, "linear" if base == "svd" else base, density, sign_method)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.shape[-1])
    per_B = U[..., :k] * S[..., None, :k]  # (E, out, k)
    per_A = Vh[..., :k, :]  # (E, k, in)
    if clamp is not None:  # one quantile over the whole parameter's factors
        high = torch.quantile(torch.cat([per_B.flatten(), per_A.flatten()]), float(clamp))
        per_B, per_A = per_B.clamp(-high, high), per_A.clamp(-high, high)
    return _packed(per_A.to(dtype), per_B.to(dtype), rank)


def _per_expert_of(adapter: ParamAdapter, lora_A: torch.Tensor, lora_B: torch.Tensor):
    """``_per_expert`` of new tensors in ``adapter``'s layout (same experts, rank and shapes)."""
    per_A = lora_A.reshape(adapter.experts, adapter.rank, adapter.in_features)
    per_B = lora_B.reshape(adapter.out_features, adapter.rank, adapter.experts).permute(2, 0, 1)
    return per_A, per_B


# -- writing the new adapter ---------------------------------------------------------------------------------------
def _target_modules(model: nn.Module, paths: list[str], saved: list[str]) -> list[str]:
    """The module names that select exactly ``paths``: their last segments when those do, else the full paths."""
    short = sorted({p.rsplit(".", 1)[-1] for p in paths})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chosen = find_targets(model, LoraConfig(target_modules=short, modules_to_save=saved or None))
    except LorakitError:
        chosen = {}
    return short if set(chosen) == set(paths) else sorted(paths)


def _add(layers: dict[str, nn.Module], results, hosts, saved_copies, name: str, dropout: float, trainable: bool,
         param_results=None) -> None:
    """Create the adapter in every layer and copy its tensors in; on any error every part of it is removed."""
    added: list[tuple[nn.Module, str]] = []
    try:
        for path, parts in (param_results or {}).items():  # LoRA on raw parameters and on nn.MultiheadAttention
            host = layers[path]
            rank = next(iter(parts.values()))[0].shape[0] // max(1, _experts(host, next(iter(parts))))
            with torch.random.fork_rng(devices=[]):  # the init is overwritten: leave the global generator alone
                created = host.add_adapter(name, {part: (rank, float(rank)) for part in parts}, "lora", "default",
                                           next(iter(parts.values()))[0].dtype)
            added.append((host, name))
            with torch.no_grad():
                for part, (lora_A, lora_B) in parts.items():
                    created[part].lora_A.copy_(lora_A)
                    created[part].lora_B.copy_(lora_B)
            created.requires_grad_(trainable)
            created.train(host.training)
        for path, (lora_A, lora_B) in results.items():
            layer = layers[path]
            with torch.random.fork_rng(devices=[]):  # the init is overwritten: leave the global generator alone
                adapter = layer.add_adapter(name, lora_A.shape[0], float(lora_A.shape[0]), "lora", dropout, "default",
                                            lora_A.dtype)
            added.append((layer, name))
            with torch.no_grad():
                adapter.lora_A.copy_(lora_A)
                adapter.lora_B.copy_(lora_B)
            adapter.requires_grad_(trainable)
            adapter.train(layer.training)  # a new module starts in training mode: follow the layer (dropout)
        for path, module in saved_copies.items():
            host = hosts[path]
            module.requires_grad_(trainable)
            module.train(host.training)
            host.copies[name] = module
            added.append((host, name))
    except BaseException:
        for host, added_name in added:
            host.delete_adapter(added_name)
        raise


def _experts(host: ParamLora, part: str) -> int:
    """Number of matrices in the stack ``part`` of ``host`` (1 for a 2-D parameter)."""
    weight = host.parameter(part)
    return weight.shape[0] if weight.ndim == 3 else 1
