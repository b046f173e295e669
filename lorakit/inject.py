"""Find target modules (names, a regex, or "all-linear"), wrap them in LoRA layers, and freeze the base.

Every check runs before the model is touched, so a refused call leaves the model exactly as it was.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from lorakit import quant
from lorakit.config import LoraConfig, listed, shown
from lorakit.errors import LorakitError
from lorakit.layers import LORA_HOSTS, LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave
from lorakit.mha_lora import MhaLora, check_attention
from lorakit.offload import offloaded, onload, refusal
from lorakit.param_lora import ParamLora, matches_parameter, parameter_layout

# Every lorakit wrapper: LoRA layers, modules-to-save copies, and LoRA on raw parameters (target_parameters)
_HOSTS = LORA_HOSTS + (ParamLora,)

# Name segments of lorakit's wrappers, removed to get the original module / parameter path.
_WRAPPER_SEGMENTS = re.compile(r"\.(base_layer)(?=\.|$)")


def original_path(path: str) -> str:
    """``model.layers.0.q_proj.base_layer.weight`` -> ``model.layers.0.q_proj.weight``."""
    return _WRAPPER_SEGMENTS.sub("", path)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every LoRA layer of the model by its original module path."""
    return {original_path(name): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


# Bumped whenever lorakit puts a module into a model or takes one out (``_set_module``): a cached host list made
# before is then rebuilt. Serving calls ``adapter_hosts`` several times per decode step, and walking every module
# of a 30-layer model with 8 adapters took 12 ms of host time per call on an H200 machine (the GPU step: 4 ms).
_STRUCTURE_VERSION = [0]


def check_model(model: object) -> None:
    """Refuse what is not a model before anything reads it (an AttributeError on ``__dict__`` otherwise):
    ``model = lorakit.load_base(...)`` keeps the (model, tokenizer) pair, and a model's name needs loading first."""
    if isinstance(model, nn.Module):
        return
    if isinstance(model, tuple):
        what, fix = "a tuple", ("lorakit.load_base returns (model, tokenizer): unpack it with model, tokenizer = "
                                "lorakit.load_base(...)")
    elif isinstance(model, str):
        what, fix = f"str {shown(model)}", f"load it first: model, tokenizer = lorakit.load_base({shown(model)})"
    else:
        what, fix = type(model).__name__, "pass the model itself"
    raise LorakitError(f"expected the model (a torch.nn.Module), got {what}; {fix}")


def unwrap(model: object) -> object:
    """The model inside the wrappers a training loop puts around it: ``torch.compile``'s ``OptimizedModule``
    (``_orig_mod``) and ``DistributedDataParallel`` / ``DataParallel`` (``module``); anything else as it is.

    lorakit names adapter tensors and the base's fingerprint by module path, so through a wrapper ``save_adapter``
    wrote keys holding the wrapper's name (``module.model.layers...``, ``_orig_mod.model.layers...``) that neither
    peft nor ``load_adapter`` maps back, and ``load_adapter`` called a fitting adapter "made for another base model".
    DDP also forwards no attributes, so the injected ``LoraConfig`` was not found there either: the file got the
    default one (r=8, alpha 16, "all-linear") beside tensors of another rank, without a word."""
    while isinstance(model, nn.Module):
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model._modules.get("module")
        elif type(model).__name__ == "OptimizedModule":  # torch._dynamo's class (not imported: that takes seconds)
            inner = model._modules.get("_orig_mod")
        else:
            return model
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def adapter_hosts(model: nn.Module) -> dict[str, nn.Module]:
    """LoRA layers and modules-to-save wrappers by original module path.

    Cached on the model; the cache is used only when no module was set by lorakit since, and every host is still
    reached from the model through the same chain of parent modules (so a module swapped by other code, like
    ``use_fast_kernels`` replacing an MLP, is noticed too).
    """
    check_model(model)  # every public call reaches here first: adapter_names, inject, load/save, merge, set_adapter
    cached = model.__dict__.get("_lorakit_host_cache")
    if cached is not None and cached[0] == _STRUCTURE_VERSION[0] and all(_still_attached(model, c) for c in cached[2]):
        return dict(cached[1])
    hosts, chains = {}, []
    for name, module in model.named_modules():
        if isinstance(module, _HOSTS):
            hosts[original_path(name)] = module
            chains.append(_chain(model, name))
    model.__dict__["_lorakit_host_cache"] = (_STRUCTURE_VERSION[0], hosts, chains)
    return dict(hosts)


def _chain(model: nn.Module, path: str) -> tuple[tuple[str, nn.Module], ...]:
    """((attribute, module), ...) from the model down to the module at ``path``."""
    links, current = [], model
    for attr in path.split("."):
        current = current._modules[attr]
        links.append((attr, current))
    return tuple(links)


def _still_attached(model: nn.Module, chain: tuple[tuple[str, nn.Module], ...]) -> bool:
    current = model
    for attr, expected in chain:
        current = current._modules.get(attr)
        if current is not expected:
            return False
    return True


def adapter_names(model: nn.Module) -> list[str]:
    """Names of every adapter in the model, in the order they were added."""
    names: dict[str, None] = {}
    for host in adapter_hosts(model).values():
        for name in host.adapter_names():
            names[name] = None
    return list(names)


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output head (excluded from "all-linear", as PEFT does)."""
    heads = {"lm_head"}
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        try:
            head = get_output()
        except Exception:  # some models raise NotImplementedError
            head = None
        for name, module in model.named_modules():
            if head is not None and (module is head or getattr(module, "base_layer", None) is head):
                heads.add(original_path(name))
    return heads


def _base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Original (unwrapped) modules by original path; lorakit's own adapter modules are left out."""
    modules: dict[str, nn.Module] = {}
    inside: list[str] = []  # the wrapped modules of LoRA on parameters, whose submodules stay part of the base
    for name, module in model.named_modules():
        if ".adapters." in f".{name}." or ".copies." in f".{name}.":
            continue
        if isinstance(module, _HOSTS):
            modules[original_path(name)] = module.base_layer
            if isinstance(module, ParamLora):
                inside.append(f"{name}.base_layer.")
        elif not name.endswith("base_layer") and ".base_layer." not in name:
            modules[name] = module
        elif any(name.startswith(prefix) for prefix in inside):  # nn.MultiheadAttention's out_proj under MhaLora
            modules[original_path(name)] = module
    return modules


def _refuse_peft_layers(modules: dict[str, nn.Module]) -> None:
    """A model wrapped by peft (PeftModel.from_pretrained, get_peft_model) holds peft's own layers: lorakit would
    wrap those, so it says what to do instead of failing on them one by one."""
    path = next((p for p, m in modules.items() if type(m).__module__.startswith("peft.tuners.")), None)
    if path is not None:
        raise LorakitError(f"this model holds peft's adapter layers ({path} is peft's {type(modules[path]).__name__}): "
                           "give lorakit the plain transformers model (the base without PeftModel) and load each adapter "
                           "folder, peft's too, with lorakit.load_adapter; or fold peft's in first with merge_and_unload()")


def _matches(path: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == key or path.endswith("." + key) for key in spec)


def _inside(path: str, names: list[str]) -> bool:
    """``path`` is one of ``names`` or lies inside one (``names`` are module names or dotted path endings)."""
    return any(re.match(rf"(^|.*\.){re.escape(name)}($|\..*)", path) for name in names)


def _no_chosen_layer(config: LoraConfig, paths: list[str]) -> str:
    """Why ``layers_to_transform`` left none of ``paths``: its numbers name no layer they are in, or
    ``layers_pattern`` is no part of their paths (an adapter of GPT-2's "h" on a Llama's "layers")."""
    layers: set[int] = set()
    for path in paths:  # the numbers of the path that peft's rule reads as its layer (config.in_chosen_layers)
        layers.update(n for n in {int(part) for part in path.split(".") if part.isdigit()}
                      if config.replace(layers_to_transform=[n]).in_chosen_layers(path))
    target = (f"target_modules {shown(config.target_modules)} matches {len(paths)} modules, but layers_to_transform "
              f"({len(paths)}) takes out every one, leaving nothing to adapt:")
    if layers:
        return (f"{target} {shown(config.layers_to_transform)} names no layer of these modules (their layers: "
                f"{', '.join(map(str, sorted(layers)))}); choose among those")
    if config.layers_pattern:
        return (f"{target} layers_pattern {shown(config.layers_pattern)} is no part of their paths (such as {paths[0]}); "
                "name the part before the layer number, or leave layers_pattern out")
    return f"{target} their paths (such as {paths[0]}) hold no layer number to choose by"


def _whole_path_note(spec: list[str] | str, modules: dict[str, nn.Module]) -> str:
    """For a string of plain module names (``"q_proj"``, ``"q_proj|v_proj"``): it is peft's regular expression over
    the whole module path, so it matched nothing, while the names the error lists included ``q_proj`` itself."""
    if not isinstance(spec, str) or not re.fullmatch(r"\w+(\|\w+)*", spec):
        return ""
    names = spec.split("|")
    if len(names) > 4:  # thousands of names (a generated or hostile file): the first few, as other values are quoted
        names, spec = names[:3] + ["..."], "|".join(names[:3]) + "|..."
    example = next((path for path, module in modules.items() if path and _supported(module)), "")
    return (f"; a string is a regular expression matched against the whole module path (as in peft), such as "
            f"{example!r}: write a list of names, target_modules={names!r}, or a pattern such as "
            f"{'.*' + chr(92) + '.(' + spec + ')'!r}")


def find_targets(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    """Target path -> original module, following the config's rules. Raises if nothing matches."""
    modules = _base_modules(model)
    _refuse_peft_layers(modules)
    if config.target_modules in (None, []):  # target_parameters only
        return {}
    heads = output_head_names(model)
    targets: dict[str, nn.Module] = {}
    removed: Counter = Counter()  # matched, then taken out by another field: named if nothing is left
    outside_layers: list[str] = []
    for path, module in modules.items():
        if not path:
            continue
        if config.target_modules == "all-linear":
            chosen = quant.is_linear_like(module) and path not in heads
        else:
            chosen = _matches(path, config.target_modules)
        named = not isinstance(config.target_modules, str) and path in config.target_modules
        if chosen and not named and not config.in_chosen_layers(path):  # peft: a path named whole is never filtered
            chosen, removed["layers_to_transform"] = False, removed["layers_to_transform"] + 1
            outside_layers.append(path)
        if chosen and config.exclude_modules and _matches(path, config.exclude_modules):
            chosen, removed["exclude_modules"] = False, removed["exclude_modules"] + 1
        if chosen and config.modules_to_save and _inside(path, config.modules_to_save):
            # a module trained whole (or inside one) needs no adapter on top, as in PEFT
            chosen, removed["modules_to_save"] = False, removed["modules_to_save"] + 1
        if chosen:
            targets[path] = module
    if not targets and list(removed) == ["layers_to_transform"]:
        raise LorakitError(_no_chosen_layer(config, outside_layers))
    if not targets and removed:
        why = ", ".join(f"{field} ({count})" for field, count in removed.items())
        raise LorakitError(f"target_modules {shown(config.target_modules)} matches {sum(removed.values())} modules, "
                           f"but {why} takes out every one, leaving nothing to adapt; narrow {' / '.join(removed)} or "
                           "widen target_modules")
    if not targets:
        kinds = sorted({path.rsplit(".", 1)[-1] for path, m in modules.items() if _supported(m)})
        regex = _whole_path_note(config.target_modules, modules)
        raise LorakitError(f"target_modules {shown(config.target_modules)} matched no module; this model's "
                           f"linear/embedding modules are named: {', '.join(kinds) or '(none)'}"
                           f"{_expert_note(modules, config)}{regex}")
    if not isinstance(config.target_modules, str):
        unmatched = [key for key in config.target_modules if not any(_matches(p, [key]) for p in modules if p)]
        if unmatched:  # PEFT skips these silently; a typo would then train fewer layers than the user meant
            kinds = sorted({path.rsplit(".", 1)[-1] for path, m in modules.items() if _supported(m)})
            warnings.warn(f"target_modules {shown(unmatched)} matched no module and are skipped; this model's "
                          f"linear/embedding modules are named: {', '.join(kinds)}", stacklevel=3)
    for path, module in targets.items():
        if not _supported(module):
            raise LorakitError(f"target {path!r} is a {type(module).__name__}; lorakit adapts nn.Linear, Conv1D, "
                               "nn.Embedding, nn.MultiheadAttention and quantized linear layers only: leave it out of "
                               "target_modules (an adapter peft saved for such a layer: merge it with peft's "
                               "merge_and_unload and load the merged model)")
        if isinstance(module, nn.MultiheadAttention):
            check_attention(module, path, config.variant, config.init)
    custom = [path for path in targets if _custom_forward(targets[path])]
    if custom:  # named (alone, or with called layers) or reached by all-linear: not wrapped, said once
        custom_names = sorted({p.rsplit(".", 1)[-1] for p in custom})
        custom_classes = sorted({type(targets[p]).__name__ for p in custom})
        why = (f"an nn.Linear subclass ({', '.join(custom_classes)}) whose own forward computes more than x @ W.T + b "
               "(a router returning scores, a grouped or scaled product), so a LoRA there would break its output or "
               "merge into another model")
        called = [p for p in targets if p not in custom]
        if not called:
            raise LorakitError(f"target_modules {shown(config.target_modules)} matches only {listed(custom, 3)}: {why}; "
                               f"adapt other layers (remove {', '.join(map(repr, custom_names))} from target_modules)")
        warnings.warn(f"{shown(config.target_modules)} skips {len(custom)} modules ({', '.join(custom_names)}): each is "
                      f"{why}", stacklevel=3)
        targets = {path: module for path, module in targets.items() if path not in custom}
    raw = [path for path in targets if _weight_read_raw(modules, path)]
    attention = sorted({p.rpartition(".")[0].rsplit(".", 1)[-1] for p in raw
                        if isinstance(modules[p.rpartition(".")[0]], nn.MultiheadAttention)})
    hint = (f" (to adapt an nn.MultiheadAttention, name the attention module itself: target_modules "
            f"{attention!r} puts LoRA on its in_proj and out_proj, as peft does)") if attention else ""
    only_raw = _raw_only(config.target_modules, targets, raw)
    if raw and config.target_modules == "all-linear":
        warnings.warn(f"all-linear skips {len(raw)} modules ({', '.join(sorted({p.rsplit('.', 1)[-1] for p in raw}))}) "
                      f"whose weight the model's forward uses directly, so an adapter there would not apply{hint}",
                      stacklevel=3)
        targets = {path: module for path, module in targets.items() if path not in raw}
    elif only_raw:
        name = only_raw.rsplit(".", 1)[-1]
        raise LorakitError(f"{type(modules[only_raw.rpartition('.')[0]]).__name__} uses {name}.weight directly in its "
                           f"forward ({only_raw}), so a LoRA adapter there would not apply; remove {name!r} from "
                           f"target_modules{hint}")
    elif raw:  # the same name also covers layers that are called (SigLIP's encoder out_proj beside its head's)
        warnings.warn(f"target_modules {shown(config.target_modules)} also match {listed(raw, 3)}, whose weight the "
                      f"model's forward uses directly, so an adapter there would not apply: skipped{hint}", stacklevel=3)
        targets = {path: module for path, module in targets.items() if path not in raw}
    if not targets:
        raise LorakitError("no target is left once the modules whose weight the model reads directly are skipped; name "
                           "target_modules explicitly")
    _warn_frozen_experts(modules, config)
    return targets


def _raw_only(target_modules: list[str] | str, targets: dict[str, nn.Module], raw: list[str]) -> str | None:
    """A raw-read target that the user named on its own: one matched by a list entry (or a regular expression)
    that matches no layer that is called. None when every raw-read target came with called ones."""
    called = [path for path in targets if path not in raw]
    for path in raw:
        if isinstance(target_modules, str):
            if not called:
                return path
        elif any(_matches(path, [key]) and not any(_matches(other, [key]) for other in called) for key in target_modules):
            return path
    return None


def _warn_frozen_experts(modules: dict[str, nn.Module], config: LoraConfig) -> None:
    """One line when "all-linear" (or a regular expression) leaves fused 3-D expert weights frozen, target_parameters
    not naming them: "all-linear" reads as "everything", and on Mixtral / Qwen3-MoE the experts hold most weights."""
    if not isinstance(config.target_modules, str):  # a list names what the user wants (expert names in it: an error)
        return
    experts = {path: size for path, size in expert_parameters(modules).items()
               if not matches_parameter(path, config.target_parameters or [])}
    if not experts:
        return
    share = sum(experts.values()) / max(_weight_elements(modules), 1)
    names = sorted({_per_layer(path) for path in experts})
    what = "all-linear adapts the linear layers only" if config.target_modules == "all-linear" else \
        f"target_modules {shown(config.target_modules)} adapts linear layers only"
    warnings.warn(f"{what}: this model's fused MoE expert weights ({', '.join(names[:4])}"
                  f"{', ...' if len(names) > 4 else ''}; {100 * share:.0f}% of its weights) are 3-D parameters and stay "
                  f"frozen; to adapt them too, pass LoraConfig(target_parameters={names[:4]!r}) (lorakit train: "
                  f"--target-parameters {','.join(names[:4])})", stacklevel=4)


def _weight_elements(modules: dict[str, nn.Module]) -> int:
    """Every weight element of the model: its parameters, and a quantized layer's logical (dequantized) size, which
    its packed buffers do not count (an NF4 model's expert share read 89% where it was 85%)."""
    total = sum(p.numel() for m in modules.values() for p in m.parameters(recurse=False))
    for module in modules.values():
        if quant.is_quantized(module):
            out_features, in_features = quant.linear_shape(module)
            total += out_features * in_features
    return total


def read_by_parent(modules: dict[str, nn.Module], path: str, name: str) -> str | None:
    """The path of the module that reads parameter ``name`` of ``modules[path]`` itself (its parent's code has
    ``self.<child>.<name>``), or None. DBRX's experts (``DbrxExperts``) slice ``self.mlp.w1`` / ``v1`` / ``w2`` and
    pass the slices to ``mlp``: a ``ParamLora`` on ``mlp`` shows ``W + delta`` only inside ``mlp``'s own forward, so
    an adapter there never acted (peft's ParamWrapper fails on it outright)."""
    parent_path, _, child = path.rpartition(".")
    parent = modules.get(parent_path) if path else None
    return parent_path if parent is not None and _reads_weight(parent, child, tensor=name) else None


def unreachable_experts(modules: dict[str, nn.Module], config: LoraConfig) -> dict[str, tuple[str, int]]:
    """``{parameter path: (path of the module that reads it, size)}`` for MoE expert weights no LoRA can reach: plain
    2-D or 3-D parameters of a module under an ``experts`` path that its parent reads itself (DBRX's
    ``ffn.experts.mlp.w1``: (experts x ffn, hidden)), unless ``modules_to_save`` copies that reader."""
    found = {}
    for path, module in modules.items():
        if "expert" not in path or _supported(module):
            continue
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.ndim not in (2, 3) or not parameter.is_floating_point():
                continue
            reader = read_by_parent(modules, path, name)
            if reader is not None and not _inside(reader, config.modules_to_save or []):
                found[f"{path}.{name}"] = (reader, parameter.numel())
    return found


def _outside_read_fix(modules: dict[str, nn.Module], reader: str) -> str:
    """How to train weights a module reads from its child: a modules-to-save copy of that module."""
    name = reader.rsplit(".", 1)[-1]
    return (f"to train those weights, pass modules_to_save=[{name!r}] (lorakit train: --modules-to-save {name}), which trains "
            f"full copies of the {type(modules[reader]).__name__} modules")


def _warn_unreachable_experts(modules: dict[str, nn.Module], config: LoraConfig) -> None:
    """One line when "all-linear" (or a regular expression) leaves expert weights frozen that neither a LoRA layer
    nor target_parameters can reach (DBRX), naming them and the option that trains them."""
    if not isinstance(config.target_modules, str):
        return
    experts = unreachable_experts(modules, config)
    if not experts:
        return
    share = sum(size for _, size in experts.values()) / max(_weight_elements(modules), 1)
    names = sorted({_per_layer(path) for path in experts})
    reader = next(iter(experts.values()))[0]
    what = "all-linear adapts the linear layers only" if config.target_modules == "all-linear" else \
        f"target_modules {shown(config.target_modules)} adapts linear layers only"
    warnings.warn(f"{what}: this model's MoE expert weights ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}; "
                  f"{100 * share:.0f}% of its weights) stay frozen: {type(modules[reader]).__name__} reads them from "
                  "its child module itself, so no LoRA reaches them (nor target_parameters, here or in peft); "
                  f"{_outside_read_fix(modules, reader)}", stacklevel=3)


def _per_layer(path: str) -> str:
    """``model.layers.3.mlp.experts.down_proj`` -> ``mlp.experts.down_proj`` (the part every layer shares)."""
    return re.sub(r"^.*?\.\d+\.", "", path)


def find_param_targets(model: nn.Module, config: LoraConfig) -> dict[str, dict[str, tuple[int, float]]]:
    """Module path -> ``{parameter name: (rank, alpha)}`` for the parameters ``config.target_parameters`` names
    (peft's rule: ``<module path>.<name>`` equals an entry or ends with ``.entry``), in registration order.
    Raises for an entry that matches nothing, a parameter that cannot hold LoRA, or one on a module that
    ``target_modules`` adapts too (as peft)."""
    if not config.target_parameters:
        return {}
    modules = _base_modules(model)
    hosts = adapter_hosts(model)
    found: dict[str, dict[str, tuple[int, float]]] = {}
    for path, module in modules.items():
        for name, parameter in module.named_parameters(recurse=False):
            key = f"{path}.{name}" if path else name
            if not matches_parameter(key, config.target_parameters):
                continue
            if not path:
                raise LorakitError(f"target_parameters: {key!r} belongs to the top-level model itself, which cannot be "
                                   "wrapped (as in peft); name a parameter of a submodule")
            if not parameter.is_floating_point() or parameter.ndim not in (2, 3):
                raise LorakitError(f"target_parameters: {key} has shape {tuple(parameter.shape)} and dtype "
                                   f"{parameter.dtype}; LoRA needs a 2-D (out, in) or 3-D (experts, out, in) float weight")
            if isinstance(hosts.get(path), (LoraLayer, ModulesToSave, MhaLora)):
                raise LorakitError(f"target_parameters: {key} belongs to {path}, which target_modules / modules_to_save "
                                   "adapt already; adapt a module either as a layer or by its parameters, not both")
            parameter_layout(module, parameter)
            reader = read_by_parent(modules, path, name)
            if reader is not None:
                raise LorakitError(f"target_parameters: {key} is read by {type(modules[reader]).__name__} ({reader}) "
                                   f"outside the forward of the {type(module).__name__} that holds it, so a LoRA on it "
                                   "would never apply (peft cannot adapt it either); "
                                   f"{_outside_read_fix(modules, reader)}")
            found.setdefault(path, {})[name] = (config.rank_for(key), config.alpha_for(key))
    unmatched = [t for t in config.target_parameters
                 if not any(matches_parameter(f"{p}.{n}", [t]) for p, names in found.items() for n in names)]
    if unmatched:
        candidates = sorted({_per_layer(f"{p}.{n}") for p, m in modules.items() if p and not _supported(m)
                             for n, t in m.named_parameters(recurse=False) if t.ndim in (2, 3) and t.is_floating_point()})
        per_expert = sorted({p.rsplit(".", 1)[-1] for p, m in modules.items()
                             if _supported(m) and re.search(r"\.experts\.\d+\.[^.]+$", p)})
        if per_expert and not candidates and "experts" in unmatched[0]:  # transformers 4.x: one Linear per expert
            import transformers

            raise LorakitError(f"target_parameters {shown(unmatched[0])}: transformers {transformers.__version__} "
                               "builds this model's MoE experts as one linear layer each, not fused 3-D parameters "
                               "(those need transformers >= 5); adapt the experts with target_modules "
                               f"{', '.join(per_expert)} instead")
        raise LorakitError(f"target_parameters {shown(unmatched[0])} matched no parameter of this model; parameters it "
                           f"could name (held outside linear/embedding layers): {listed(candidates, 8) or '(none)'}")
    return found


def peft_resolves_differently(model: nn.Module, target_modules: list[str] | str) -> bool:
    """Whether peft, given this ``target_modules`` in adapter_config.json, would adapt other modules than lorakit
    did: on fused MoE experts (peft 0.21 adds LoRA on them and the router, for a string) and where lorakit skipped
    layers whose weight the forward reads directly (Mamba's x_proj/dt_proj/out_proj, which peft even refuses;
    nn.MultiheadAttention's out_proj, where peft adds a LoRA that never acts): by "all-linear", or by a name or
    regular expression that also covers called layers. The adapter file then names the adapted modules instead."""
    if not target_modules:  # target_parameters only
        return False
    modules = _base_modules(model)
    if isinstance(target_modules, str) and expert_parameters(modules):
        return True
    heads = output_head_names(model) if target_modules == "all-linear" else set()
    chosen = (lambda p: p not in heads) if target_modules == "all-linear" else (lambda p: _matches(p, target_modules))
    return any(p and chosen(p) and quant.is_linear_like(m) and (_weight_read_raw(modules, p) or _custom_forward(m))
               for p, m in modules.items())


def expert_parameters(modules: dict[str, nn.Module]) -> dict[str, int]:
    """Path -> size of every stack of matrices (3 dimensions, each at least 2) held directly by a module that is not a
    convolution: transformers 5 stores MoE experts fused this way (``mlp.experts.gate_up_proj``: (experts, 2 x ffn,
    hidden)), outside any nn.Linear, so no LoRA layer can wrap them. (A SigLIP pooling probe, (1, 1, hidden), is not
    one.)"""
    found = {}
    for path, module in modules.items():
        if isinstance(module, nn.modules.conv._ConvNd):
            continue
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.ndim == 3 and min(parameter.shape) >= 2:
                found[f"{path}.{name}" if path else name] = parameter.numel()
    return found


def _expert_note(modules: dict[str, nn.Module], config: LoraConfig) -> str:
    """When target names are those of fused 3-D expert parameters: say why they are not modules."""
    if isinstance(config.target_modules, str):
        return ""
    experts = {path.rsplit(".", 1)[-1] for path in expert_parameters(modules)}
    named = sorted(set(config.target_modules) & experts)
    if not named:
        return ""
    what = "is a fused 3-D MoE expert parameter" if len(named) == 1 else "are fused 3-D MoE expert parameters"
    full = sorted({_per_layer(p) for p in expert_parameters(modules) if p.rsplit(".", 1)[-1] in named})
    return f"; {', '.join(named)} {what}, not linear layers: adapt them with target_parameters={full!r}"


def _weight_read_raw(modules: dict[str, nn.Module], path: str) -> bool:
    """True when the parent module's code uses ``self.<name>.weight`` as a tensor (Mamba's ``dt_proj.weight @ x``,
    the fused kernels' ``x_proj.weight`` argument) rather than calling the module: LoRA there would be bypassed.
    Reads of its dtype / device / shape (T5 casts to ``wo.weight.dtype``), isinstance checks and initialisation
    are not uses."""
    parent_path, _, name = path.rpartition(".")
    parent = modules.get(parent_path)
    return parent is not None and _reads_weight(parent, name)


def keeps_own_class(parent: nn.Module, name: str, module: nn.Module) -> bool:
    """Whether ``parent.<name>`` (``module``, a linear layer) must stay the module it is: its parent reads its
    ``.weight`` itself, or it is an nn.Linear subclass with its own forward (see ``_custom_forward``). A LoRA
    wrapper skips such layers; ``lorakit.quantize`` keeps them dense (an NF4Linear has no ``.weight`` to read, and
    computes only x @ W.T + b). Here, and not for LoRA, writes through ``.weight.data`` count too: Gemma 3n clamps
    ``altup.prediction_coefs.weight.data`` in place at each training step, which a LoRA layer passes on to its base
    layer's weight and an NF4Linear, holding none, cannot take."""
    return _custom_forward(module) or _reads_weight(parent, name, data=True)


def _reads_weight(parent: nn.Module, name: str, data: bool = False, tensor: str = "weight") -> bool:
    """``_weight_read_raw`` for the child ``name`` of ``parent``; ``data``: ``self.<name>.weight.data`` counts too;
    ``tensor``: another parameter of the child than ``weight`` (DBRX's ``self.mlp.w1``)."""
    if not name.isidentifier() or not tensor.isidentifier():
        return False
    source = _class_source(type(parent))
    facts = "dtype|device|shape|ndim|is_meta|requires_grad" + ("" if data else r"|data\b")
    pattern = rf"self\.{name}\.{tensor}\b(?!\s*\.\s*(?:{facts}))"
    for match in re.finditer(pattern, source):
        line = source[source.rfind("\n", 0, match.start()) + 1: match.start()]
        if not re.search(r"isinstance\(|init\.\w+\(|nn\.init|_init_", line) and not _in_dead_branch(parent, source,
                                                                                                    match.start()):
            return True
    return False


def _custom_forward(module: nn.Module) -> bool:
    """True for an nn.Linear subclass whose own ``forward`` is not ``x @ W.T + b``: Llama 4's and PhiMoE's routers
    (they return (scores, logits) tuples), DeepSeek-V4's block-diagonal grouped projection, Dory's scaled head. A
    LoRA layer adds its delta to what the wrapped module returns, so there it fails on a tuple or merges into a
    different model. Decided by running the module once on a fixed (2, in_features) input; FalconLinear (the same
    product written out) passes. On the meta device (a model built before its weights are read) only what it
    returns is compared: a tuple or another shape. Packed 4-bit weights (bitsandbytes) count as plain."""
    forward = getattr(type(module), "forward", None)
    if not isinstance(module, nn.Linear) or forward is nn.Linear.forward:
        return False
    weight = module.weight
    if not weight.is_floating_point() or type(weight).__name__ in quant._BNB_PARAMS:
        return False
    if weight.device.type == "meta":
        try:
            with torch.no_grad():
                out = module(torch.empty(2, module.in_features, device="meta", dtype=weight.dtype))
        except Exception:
            return True
        return not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, module.out_features)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, module.in_features, generator=generator).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            out = module(x.clone())  # (a router may scale its input in place)
            expected = torch.nn.functional.linear(x, weight, module.bias)
    except Exception:  # wants another input layout (a grouped projection): not a plain linear layer
        return True
    if not isinstance(out, torch.Tensor) or out.shape != expected.shape:
        return True
    tolerance = 1e-4 if weight.dtype == torch.float32 else 2e-2
    return not torch.allclose(out.float(), expected.float(), rtol=tolerance, atol=tolerance)


_RUNTIME_FLAGS = {"training", "gradient_checkpointing", "is_causal"}


def _in_dead_branch(module: nn.Module, source: str, offset: int) -> bool:
    """True when the code at ``offset`` sits under an ``if`` whose condition is ``and``-joined terms, one of which is
    a bare ``self.<flag>`` that is falsy on this module: that branch never runs. Bloom reads ``self.dense.weight``
    only under ``if self.pretraining_tp > 1 and self.slow_but_exact:`` (False in its released configs) and calls
    ``self.dense(...)`` otherwise, so its adapters apply."""
    lines = source[:offset].split("\n")
    indent = len(lines[-1]) - len(lines[-1].lstrip())
    for text in reversed(lines[:-1]):
        stripped = text.lstrip()
        depth = len(text) - len(stripped)
        if not stripped or depth >= indent:
            continue
        indent = depth
        branch = re.match(r"(?:if|elif)\s+(.+):\s*(?:#.*)?$", stripped)
        if branch and " or " not in branch.group(1):
            for term in branch.group(1).split(" and "):
                flag = re.fullmatch(r"\(?\s*self\.(\w+)\s*\)?", term.strip())
                # a setting the module keeps from its config; not a mode that changes at run time (Mamba reads
                # x_proj/out_proj.weight under `if self.training and cache is None:`, i.e. in every training step)
                if flag and flag.group(1) not in _RUNTIME_FLAGS and not flag.group(1).startswith("_") and \
                        flag.group(1) in vars(module) and vars(module)[flag.group(1)] in (False, None, 0):
                    return True
        if stripped.startswith(("def ", "class ")):
            return False
    return False


@functools.lru_cache(maxsize=256)
def _class_source(cls: type) -> str:
    """The source of a module class (empty when it has none: built in, or defined in a REPL)."""
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def _supported(module: nn.Module) -> bool:
    return quant.is_linear_like(module) or isinstance(module, (nn.Embedding, nn.MultiheadAttention))


def saved_by(path: str, names: list[str]) -> bool:
    """peft's ``modules_to_save`` rule: the module's path ends with a name, at any character (``"norm"`` covers
    ``input_layernorm`` and ``model.norm``, ``"head"`` the ``lm_head``); a file saved by peft holds those copies."""
    return any(path.endswith(name) for name in names)


def find_modules_to_save(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    if not config.modules_to_save:
        return {}
    modules = _base_modules(model)
    found = {path: m for path, m in modules.items() if path and saved_by(path, config.modules_to_save)}
    missing = [key for key in config.modules_to_save if not any(p.endswith(key) for p in found)]
    if missing:
        raise LorakitError(f"modules_to_save names {shown(missing)} that this model does not have")
    return found


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, module)
    _STRUCTURE_VERSION[0] += 1


def _host_for(model: nn.Module, path: str, module: nn.Module, hosts: dict[str, nn.Module], kind,
              created: list[tuple[str, nn.Module]]) -> nn.Module:
    host = hosts.get(path)
    if host is None:
        host = kind(module)
        _set_module(model, path, host)
        hosts[path] = host
        created.append((path, module))
    return host


@dataclass
class TrainableReport:
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({100 * self.share:.3f}%)"


def _warn_unused_patterns(config: LoraConfig, paths: list[str]) -> None:
    """A rank_pattern / alpha_pattern key that matches none of the adapted paths changes nothing (peft ignores it
    silently): a typo would train every module at the default rank or alpha."""
    for field_name, patterns in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        unused = []
        for key in patterns:  # compiled once per key (re's own cache holds 512: a generated config has thousands)
            compiled = re.compile(rf"(.*\.)?({key})$")
            if not any(compiled.match(path) for path in paths):
                unused.append(key)
        if unused:  # the first few, shortened: a hostile or generated file may hold thousands of long keys
            named = "[" + ", ".join(shown(key) for key in unused[:5]) + "]"
            more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
            ends = sorted({path.rsplit(".", 1)[-1] for path in paths})
            warnings.warn(f"{field_name} keys {named}{more} match none of this adapter's modules and change nothing; its "
                          f"modules end in: {listed(ends, 20)}", stacklevel=3)


def _warn_wasted_settings(config: LoraConfig, targets: dict[str, nn.Module], params: dict[str, dict[str, tuple[int, float]]],
                          adapter: str, trainable: bool) -> None:
    """Settings peft accepts silently that waste an adapter, one line each: alpha 0 on every adapted module (the update,
    and with it every gradient, is scaled to nothing; DoRA's magnitudes and modules_to_save copies would still learn)
    and, for an adapter to train, a rank above what a layer's update can reach (min(in_features, out_features): the
    extra rank only adds parameters)."""
    alphas = [config.alpha_for(path) for path in targets] + [alpha for chosen in params.values()
                                                             for _, alpha in chosen.values()]
    if alphas and not any(alphas) and "dora" not in config.variant and not config.modules_to_save:
        warnings.warn(f"adapter {adapter!r} has alpha 0 on every layer it adapts, so it changes nothing (the update is "
                      "scaled by alpha / r) and training it learns nothing; give a positive alpha, e.g. 2 x r", stacklevel=3)
    if not trainable:
        return
    over = []
    attention = [path for path, module in targets.items() if isinstance(module, nn.MultiheadAttention)]
    if attention and config.dropout:
        warnings.warn(f"dropout={config.dropout:g} does not apply to the nn.MultiheadAttention {attention[0]}: its update is "
                      "added to the weights for each call, where the input's dropout cannot be applied (peft ignores "
                      "it there too)", stacklevel=3)
    for path, module in targets.items():
        if isinstance(module, nn.MultiheadAttention):  # in_proj (E -> 3E) and out_proj (E -> E)
            out_features = in_features = module.embed_dim
        else:
            out_features, in_features = quant.linear_shape(module)
        if isinstance(module, nn.Embedding):  # (num_embeddings, dim): A reads the vocabulary, B writes the dim
            out_features, in_features = in_features, out_features
        if config.rank_for(path) > min(in_features, out_features):
            over.append((path, config.rank_for(path), in_features, out_features))
    if over:
        path, rank, in_features, out_features = over[0]
        others = f" and {len(over) - 1} other targeted layer(s)" if len(over) > 1 else ""
        warnings.warn(f"r={rank} is above min(in_features, out_features) of {path} ({in_features} -> {out_features})"
                      f"{others}: the update there has rank at most {min(in_features, out_features)}, so the extra rank "
                      "only adds parameters; lower r or give those layers rank_pattern", stacklevel=3)


def check_adapter_name(name: object, what: str = "adapter name") -> None:
    """Refuse a name that cannot be a module key (a dot) or a subfolder name: ``save_pretrained`` writes each
    non-default adapter into ``folder/<name>``, so a slash, a backslash or an absolute path would write outside it."""
    if not isinstance(name, str) or not name or "." in name:
        raise LorakitError(f"{what} {shown(name)} must be a non-empty string without dots")
    if "/" in name or "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise LorakitError(f"{what} {name!r} must not hold a slash, a backslash or a control character (it names "
                           "the adapter's subfolder when saved); use a plain name such as 'orders'")


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count trainable and total parameters (quantized bases count their logical, dequantized size)."""
    check_model(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if quant.is_quantized(module):
            out_features, in_features = quant.linear_shape(module)
            total += out_features * in_features
    return TrainableReport(trainable, total)


def freeze_base(model: nn.Module) -> None:
    """Every parameter frozen except the adapters' (their trainability is set per adapter)."""
    for name, parameter in model.named_parameters():
        if ".adapters." not in name and ".copies." not in name:
            parameter.requires_grad_(False)


def _refuse_offloaded(model: nn.Module, config: LoraConfig, targets: dict[str, nn.Module],
                      saved: dict[str, nn.Module], params: dict[str, dict[str, tuple[int, float]]]) -> None:
    """Layers accelerate offloads (weights on meta, loaded only for their own forward) take plain LoRA, which only
    calls them; what reads their weight at other times is refused before anything changes."""
    modules = _base_modules(model) if params else {}
    reasons = [(path, "lorakit cannot keep a trained copy of it (modules_to_save)") for path in saved] + [
        (path, "LoRA on its raw parameters (target_parameters) cannot read them") for path in params]
    if config.variant in ("dora", "rsdora"):
        reasons += [(path, f"variant={config.variant!r} cannot take its weight's norms (read outside the layer's "
                           "forward); use variant='lora' or 'rslora'") for path in targets]
    if config.init == "pissa":
        reasons += [(path, "init='pissa' cannot rewrite its weight; use init='default'") for path in targets]
    reasons += [(path, "LoRA cannot wrap its attention (nn.MultiheadAttention reads its weights directly)")
                for path, module in targets.items() if isinstance(module, nn.MultiheadAttention)]
    reasons += [(path, "LoRA on it cannot scale its update as its forward does (embed_scale)")
                for path, module in targets.items() if getattr(module, "embed_scale", None) is not None]
    for path, what in reasons:
        module = targets.get(path) or saved.get(path) or modules.get(path)
        if module is not None and offloaded(module):
            raise LorakitError(refusal(path, what))


def _refuse_lora_beside_copy(existing: dict[str, nn.Module], targets: dict[str, nn.Module],
                             saved: dict[str, nn.Module], adapter: str) -> None:
    """One module holds either LoRA (of any number of adapters) or whole trained copies (modules_to_save, and peft's
    trainable_token_indices, loaded as copies), not both: the two wrappers would have to nest."""
    copy = "a whole trained copy (modules_to_save or trainable tokens)"
    clashes = [(path, "LoRA", copy, existing[path].copies) for path in targets
               if isinstance(existing.get(path), ModulesToSave)]
    clashes += [(path, copy, "LoRA", existing[path].adapters) for path in saved if isinstance(existing.get(path), LoraLayer)]
    if clashes:
        path, ours, theirs, owners = clashes[0]
        raise LorakitError(f"{path}: adapter {adapter!r} puts {ours} there, and adapter {list(owners)[0]!r} already has "
                           f"{theirs}; lorakit cannot hold both on one module: load {adapter!r} into another copy of the "
                           "base, or delete the other adapter first")


def _check_lora_bias(targets: dict[str, nn.Module]) -> None:
    """``lora_bias``: refused on embeddings and ``nn.MultiheadAttention`` (peft refuses both); layers without a bias
    of their own are warned about once, as peft does: the adapter will run, but never merge."""
    refused = [p for p, m in targets.items() if isinstance(m, (nn.Embedding, nn.MultiheadAttention))]
    if refused:
        raise LorakitError(f"lora_bias=True is not supported on {type(targets[refused[0]]).__name__} layers ({refused[0]}; "
                           "peft refuses it too); exclude them from target_modules or set lora_bias=False")
    bare = [p for p, m in targets.items() if getattr(m, "bias", None) is None]
    if bare:
        warnings.warn(f"lora_bias=True on {len(bare)} layer(s) without a bias of their own (e.g. {bare[0]}): the adapter "
                      "runs and saves, but cannot be merged into them (there is no bias to fold its own into; peft's "
                      "merge refuses them too)", UserWarning, stacklevel=3)


def inject(model: nn.Module, config: LoraConfig, adapter: str = "default", trainable: bool = True,
           dtype: torch.dtype | None = None) -> nn.Module:
    """Add adapter ``adapter`` to every target module of ``model`` (in place), freeze the base, make it active.

    Args:
        model: any PyTorch model (transformers models included).
        config: what to inject.
        adapter: the adapter's name; must be new.
        trainable: whether the new adapter's parameters require gradients.
        dtype: adapter parameter dtype (default float32, so adapters train in full precision on a 16-bit base).
    Returns:
        the same model.
    """
    given, model = model, unwrap(model)  # a compiled / DDP-wrapped model: the adapters go by the inner model's names
    check_adapter_name(adapter)
    if not isinstance(config, LoraConfig):  # peft's LoraConfig or a dict: an AttributeError deep inside otherwise
        fix = ("lorakit.LoraConfig.from_peft_dict(config.to_dict())" if hasattr(config, "peft_type")
               else "lorakit.LoraConfig(**config)" if isinstance(config, dict) else "lorakit.LoraConfig(r=8, alpha=16)")
        raise LorakitError(f"config must be a lorakit.LoraConfig, got {type(config).__module__}.{type(config).__name__}; "
                           f"pass {fix}")
    if not isinstance(trainable, bool):  # checked first: requires_grad_ refuses it only after the layers are wrapped
        raise LorakitError(f"trainable must be True or False, got {shown(trainable)}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise LorakitError(f"dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, ...) or None, "
                           f"got {shown(dtype)}")
    if adapter in adapter_names(model):
        raise LorakitError(f"the model already has an adapter named {adapter!r}; delete it first or choose another name")
    if config.init == "pissa" and adapter_names(model):
        raise LorakitError("init='pissa' rewrites the base weights, so it must be the model's only adapter")
    targets = find_targets(model, config)
    saved = find_modules_to_save(model, config)
    params = find_param_targets(model, config)
    existing = adapter_hosts(model)
    both = [path for path in params if path in targets or path in saved] + [
        path for path in (*targets, *saved) if isinstance(existing.get(path), ParamLora)
        and not (isinstance(existing[path], MhaLora) and path in targets)]
    if both:
        raise LorakitError(f"{both[0]} is adapted both as a module (target_modules / modules_to_save) and by its "
                           "parameters (target_parameters); choose one (exclude_modules can drop it from the modules)")
    _refuse_lora_beside_copy(existing, targets, saved, adapter)
    if config.lora_bias:
        _check_lora_bias(targets)
    _warn_unused_patterns(config, [*targets, *(f"{p}.{n}" if p else n for p, names in params.items() for n in names)])
    if config.init == "pissa":  # checked here, before PiSSA rewrites any base weight (a rollback restores none)
        embeddings = [p for p, m in targets.items() if isinstance(m, nn.Embedding)]
        if embeddings:
            raise LorakitError(f"init='pissa' is not supported on embedding layers ({embeddings[0]}); exclude them from "
                               "target_modules")
        quantized = [p for p, m in targets.items() if quant.is_quantized(m)]
        if quantized:
            raise LorakitError(f"init='pissa' needs dense base weights ({quantized[0]} is quantized); quantize after "
                               "training or use init='default'")
        narrow = [p for p, m in targets.items() if config.rank_for(p) > min(quant.linear_shape(m))]
        if narrow:
            out_features, in_features = quant.linear_shape(targets[narrow[0]])
            raise LorakitError(f"init='pissa' takes r of a layer's top singular vectors, and {narrow[0]} ({in_features} "
                               f"-> {out_features}) has only {min(in_features, out_features)} "
                               f"(r={config.rank_for(narrow[0])}); lower r, or give those layers a smaller rank_pattern")
    _refuse_offloaded(model, config, targets, saved, params)
    _warn_wasted_settings(config, targets, params, adapter, trainable)
    if trainable:  # said once, where an adapter to train is made: loading one to generate with needs no word
        _warn_unreachable_experts(_base_modules(model), config)

    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    param_modules = _base_modules(model) if params else {}
    hosts = adapter_hosts(model)
    added: list[tuple[nn.Module, str]] = []
    created: list[tuple[str, nn.Module]] = []
    try:
        for path, module in targets.items():
            if isinstance(module, nn.MultiheadAttention):  # one rank and alpha for in_proj and out_proj, as peft
                host = _host_for(model, path, module, hosts, MhaLora, created)
                chosen = (config.rank_for(path), config.alpha_for(path))
                host.add_adapter(adapter, {"in_proj_weight": chosen, "out_proj_weight": chosen}, config.variant,
                                 config.init, dtype)
                added.append((host, adapter))
                continue
            kind = LoraEmbedding if isinstance(module, nn.Embedding) else LoraLinear
            offload_again = onload(module)  # an offloaded base: the new adapter's device, dtype and init read W
            host = _host_for(model, path, module, hosts, kind, created)
            weight = getattr(module, "weight", None)
            host.shared_weight = isinstance(weight, nn.Parameter) and uses[id(weight)] > 1
            host.add_adapter(adapter, config.rank_for(path), config.alpha_for(path), config.variant, config.dropout,
                             config.init, dtype, lora_bias=config.lora_bias)
            added.append((host, adapter))
            offload_again()  # (left onloaded if add_adapter raised: its next forward offloads it)
        for path, module in saved.items():
            host = _host_for(model, path, module, hosts, ModulesToSave, created)
            host.add_adapter(adapter)
            added.append((host, adapter))
        for path, chosen in params.items():
            host = _host_for(model, path, param_modules[path], hosts, ParamLora, created)
            host.add_adapter(adapter, chosen, config.variant, config.init, dtype)
            added.append((host, adapter))
    except BaseException:
        for host, name in added:  # leave the model as it was
            host.delete_adapter(name)
        for path, original in created:
            _set_module(model, path, original)
        raise
    freeze_base(model)
    # new adapter modules in hosts that were already there: whatever read the model's modules (a static decoder's
    # copy of an adapter deleted and made again under this name) must read them again
    _STRUCTURE_VERSION[0] += 1
    for host, name in added:
        module = host.copies[name] if isinstance(host, ModulesToSave) else host.adapters[name]
        for parameter in module.parameters():
            parameter.requires_grad_(trainable)
        # new modules start in training mode; follow the wrapped module, or a model in eval() would run dropout
        host.training = host.base_layer.training
        module.train(host.base_layer.training)
    from lorakit.adapters import set_adapter

    set_adapter(model, adapter)
    model.lorakit_configs = {**getattr(model, "lorakit_configs", {}), adapter: config}
    from lorakit.hf_trainer import install  # imports nothing from transformers

    install(model)  # transformers models: save_pretrained (what Trainer calls) writes the adapter folder
    return given
