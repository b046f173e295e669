"""Adapters peft saves under another ``peft_type`` whose weight update is a low-rank product, read as that plain LoRA.

``read_adapter`` calls ``to_lora`` on the tensors it read, so the ``AdapterFile`` it returns holds a LoRA config and
``lora_A`` / ``lora_B`` tensors (its ``raw_config`` stays the file's, so ``origin`` can say what it was). The update
of each (peft 0.21's forward, eval mode; dropout only trains):

* AdaLoRA (``ADALORA``): ``B (A * E) * s / (ranknum + 1e-5)``, A (r, in), E (r, 1) the singular values, B (out, r),
  ``s = lora_alpha`` (or the saved r when it is 0) and ``ranknum = init_r`` (peft never saves it: a module its
  ``rank_pattern`` resized keeps the ranknum of ``init_r``). Read as ``A' = A * E`` without the ranks whose E is 0
  (pruned; not saved at all when peft's ``rank_pattern`` resized them) and the scale folded into B.
* VeRA (``VERA``): ``diag(lambda_b) B_s[:out] diag(lambda_d) A_s[:, :in]``, with A_s (r, max in) and B_s (max out,
  r) shared by all layers. Read as ``A' = lambda_d * A_s`` (sliced to the layer's ``in`` by ``fit_to_model`` once the
  model is known) and ``B' = lambda_b * B_s[:out]``. A file saved without A_s and B_s (``save_projection=False``)
  has them drawn as peft draws them, from ``projection_prng_key`` at the model's largest adapted layer
  (``fit_to_model``).
* LoHa (``LOHA``) on linear layers: ``(W1a W1b) o (W2a W2b) * alpha / r`` (o: elementwise), W1a (out, r1), W1b
  (r1, in). Entry (o, i) is ``sum_jk W1a[o,j] W2a[o,k] W1b[j,i] W2b[k,i]``: a product of rank r1 r2 with
  ``B'[o, (j,k)] = W1a[o,j] W2a[o,k]`` and ``A'[(j,k), i] = W1b[j,i] W2b[k,i]``; read so while r1 r2 <= 256.
* LoKr (``LOKR``) on linear layers: ``kron(W1, W2) * alpha / r``, each factor saved whole or as a product W_a W_b.
  With W = P Q (a whole W (o, i) is ``I W`` or ``W I``, of rank min(o, i)), ``kron(P1 Q1, P2 Q2) = kron(P1, P2)
  kron(Q1, Q2)``: a LoRA of rank r1 r2, read so while that is <= 256.

Each module's rank is its tensors' (``rank_pattern`` holds the others) and its alpha equals it, so the scale is 1.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import torch

from lorakit.config import FOLDER_TYPES as NAMES, _pattern_value, shown
from lorakit.errors import LorakitError

MAX_RANK = 256  # LoHa's r1 r2, LoKr's: the plain form's rank; beyond it the plain LoRA costs more than the dense update
_PREFIX = "base_model.model."
# fields of these configs that name no math lorakit's plain form needs (training schedules, inits, dropouts)
_CARRIED = ("base_model_name_or_path", "revision", "task_type", "inference_mode", "bias", "modules_to_save",
            "fan_in_fan_out", "peft_version",
            "layer_replication")  # AdaLoRA's LoraModel copies layers by it: refused by name, as for a LoRA


def peft_type(raw_config: Any) -> str | None:
    """``"ADALORA"`` / ``"VERA"`` / ``"LOHA"`` when the config is one of these, else None."""
    kind = raw_config.get("peft_type") if isinstance(raw_config, dict) else None
    return kind.upper() if isinstance(kind, str) and kind.upper() in NAMES else None


def origin(raw_config: Any) -> str | None:
    """What the adapter was converted from, for ``lorakit inspect`` (None for a LoRA)."""
    kind = peft_type(raw_config)
    return f"peft {NAMES[kind]} ({kind}), loaded as the plain LoRA it equals" if kind else None


def to_lora(raw_config: dict[str, Any], tensors: dict[str, torch.Tensor], where: str
            ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(a LoRA ``adapter_config`` dict, LoRA tensors under peft's keys) for one of these adapters. ``where`` names the
    config file in errors. Tensors that are none of the method's (``modules_to_save`` copies) are kept."""
    kind = peft_type(raw_config)
    convert = {"ADALORA": _adalora, "VERA": _vera, "LOHA": _loha, "LOKR": _lokr}[kind]
    per_module, rest = _group(tensors, _PARTS[kind])
    if not per_module:
        raise LorakitError(f"{where}: peft_type {kind} but the weights hold none of its tensors "
                           f"({', '.join(_PARTS[kind])}); save the adapter again with peft")
    out, ranks = dict(rest), {}
    for path, parts in per_module.items():
        missing = [p for p in _PARTS[kind] if p not in parts and p not in _OPTIONAL.get(kind, ())]
        if missing:
            raise LorakitError(f"{where}: {_PREFIX}{path} lacks {', '.join(missing)} ({NAMES[kind]} needs "
                               f"{', '.join(_PARTS[kind])}); save the adapter again with peft")
        pair = convert(raw_config, path, parts, rest, where)
        if pair is None:  # every rank pruned: no update
            continue
        lora_A, lora_B = pair
        out[f"{_PREFIX}{path}.lora_A.weight"], out[f"{_PREFIX}{path}.lora_B.weight"] = lora_A, lora_B
        ranks[path] = lora_A.shape[0]
    for key in _SHARED.get(kind, ()):
        out.pop(key, None)
    if not ranks:
        raise LorakitError(f"{where}: every rank of this {NAMES[kind]} adapter was pruned (all singular values 0): it "
                           "changes nothing; there is no adapter to load")
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(path): rank for path, rank in sorted(ranks.items()) if rank != r}
    config = {key: raw_config[key] for key in _CARRIED if key in raw_config}
    config.update(peft_type="LORA", r=r, lora_alpha=r, lora_dropout=0.0, target_modules=sorted(ranks),
                  rank_pattern=pattern, alpha_pattern=dict(pattern))
    if kind != "ADALORA":  # AdaLoRA's config is a LoraConfig: the rest of its fields are LoRA's, set to peft's defaults
        config.setdefault("bias", "none")
    if config.get("bias") == "vera_only":  # VeRA's name for LoRA's "lora_only": saved biases are checked as those
        config["bias"] = "lora_only"
    return config, out


_PARTS = {"ADALORA": ("lora_A", "lora_B", "lora_E"), "VERA": ("vera_lambda_b", "vera_lambda_d"),
          "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
          "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}
_OPTIONAL = {"LOHA": ("hada_t1", "hada_t2"), "LOKR": _PARTS["LOKR"]}  # LoKr: either form of each factor (_lokr)
_SHARED = {"VERA": ("base_model.vera_A", "base_model.vera_B")}


def _group(tensors: dict[str, torch.Tensor], parts: tuple[str, ...]
           ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``{module path: {part: tensor}}`` for the keys ending in ``.part``, and the other tensors."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, tensor in tensors.items():
        head, _, last = key.rpartition(".")
        if last in parts and head:
            path = head[len(_PREFIX):] if head.startswith(_PREFIX) else head
            grouped.setdefault(path, {})[last] = tensor
        else:
            rest[key] = tensor
    return grouped, rest


def _adalora(raw: dict[str, Any], path: str, parts: dict[str, torch.Tensor], rest: Any, where: str):
    A, B, E = parts["lora_A"], parts["lora_B"], parts["lora_E"]
    rank = A.shape[0] if A.dim() == 2 else -1
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != rank or tuple(E.shape) != (rank, 1):
        raise LorakitError(f"{where}: {_PREFIX}{path}'s AdaLoRA tensors do not fit (lora_A {tuple(A.shape)}, lora_B "
                           f"{tuple(B.shape)}, lora_E {tuple(E.shape)}; expected (r, in), (out, r), (r, 1))")
    init_r, alpha = raw.get("init_r", 12), raw.get("lora_alpha", 8)
    for name, value in (("init_r", init_r), ("lora_alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise LorakitError(f"{where}: {name} must be a non-negative number, got {shown(value)}")
    if not init_r:
        raise LorakitError(f"{where}: init_r must be positive, got {shown(init_r)}")
    kept = E[:, 0] != 0  # ranks the allocator pruned (masked to 0) add nothing
    if not bool(kept.any()):
        return None
    # peft: scaling = lora_alpha, or when 0 the layer's r: the saved rank (init_r, or the rank_pattern's count that
    # peft resized the layer to); divided by ranknum + 1e-5, a float32 parameter that keeps init_r through the resize
    scale = (alpha if alpha > 0 else float(rank)) / (torch.tensor(float(init_r)) + 1e-5)
    lora_A = (A.float() * E.float())[kept]
    lora_B = B.float()[:, kept] * scale
    return lora_A.to(A.dtype), lora_B.to(B.dtype)


def _vera(raw: dict[str, Any], path: str, parts: dict[str, torch.Tensor], rest: dict[str, torch.Tensor], where: str):
    shared_A, shared_B = rest.get("base_model.vera_A"), rest.get("base_model.vera_B")
    lambda_b, lambda_d = parts["vera_lambda_b"], parts["vera_lambda_d"]
    if (shared_A is None or shared_B is None) and _regenerated(raw):
        if lambda_d.dim() != 1 or lambda_b.dim() != 1:
            raise LorakitError(f"{where}: {_PREFIX}{path}'s VeRA tensors do not fit (vera_lambda_b {tuple(lambda_b.shape)}, "
                               f"vera_lambda_d {tuple(lambda_d.shape)}; expected (out,), (r,)); save the adapter again "
                               "with peft")
        # peft draws vera_A / vera_B again from projection_prng_key, at sizes only the model gives: the scaling
        # vectors alone here, (r, 1) and (out, 1), made whole by fit_to_model
        return lambda_d[:, None], lambda_b[:, None]
    if shared_A is None or shared_B is None:
        raise LorakitError(f"{where}: this VeRA adapter's weights lack the shared matrices vera_A / vera_B that its config "
                           "says were saved (save_projection true); save the adapter again with peft")
    rank = shared_A.shape[0] if shared_A.dim() == 2 else -1
    if (shared_B.dim() != 2 or shared_B.shape[1] != rank or lambda_d.shape != (rank,) or lambda_b.dim() != 1
            or lambda_b.shape[0] > shared_B.shape[0]):
        raise LorakitError(f"{where}: {_PREFIX}{path}'s VeRA tensors do not fit (vera_lambda_b {tuple(lambda_b.shape)}, "
                           f"vera_lambda_d {tuple(lambda_d.shape)}, vera_A {tuple(shared_A.shape)}, vera_B "
                           f"{tuple(shared_B.shape)}); save the adapter again with peft")
    # lora_A keeps every column of vera_A here: the layer's in_features is the model's, sliced by slice_vera
    lora_A = lambda_d.float()[:, None] * shared_A.float()
    lora_B = lambda_b.float()[:, None] * shared_B.float()[: lambda_b.shape[0]]
    return lora_A.to(lambda_d.dtype), lora_B.to(lambda_b.dtype)


def _loha(raw: dict[str, Any], path: str, parts: dict[str, torch.Tensor], rest: Any, where: str):
    if "hada_t1" in parts or "hada_t2" in parts:
        raise LorakitError(f"{where}: {_PREFIX}{path} is a LoHa of a convolution (use_effective_conv2d: hada_t1 / hada_t2); "
                           "lorakit converts LoHa of linear layers only: merge it with peft (merge_and_unload) and load "
                           "the merged model")
    w1a, w1b, w2a, w2b = (parts[p] for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if (any(t.dim() != 2 for t in (w1a, w1b, w2a, w2b)) or w1a.shape[1] != w1b.shape[0]
            or w2a.shape[1] != w2b.shape[0] or w1a.shape[0] != w2a.shape[0] or w1b.shape[1] != w2b.shape[1]):
        raise LorakitError(f"{where}: {_PREFIX}{path}'s LoHa tensors do not fit (hada_w1_a {tuple(w1a.shape)}, hada_w1_b "
                           f"{tuple(w1b.shape)}, hada_w2_a {tuple(w2a.shape)}, hada_w2_b {tuple(w2b.shape)}); save the "
                           "adapter again with peft")
    r1, r2 = w1a.shape[1], w2a.shape[1]
    if r1 * r2 > MAX_RANK:
        raise LorakitError(f"{where}: {_PREFIX}{path} is a LoHa of ranks {r1} and {r2}, which is a LoRA of rank {r1 * r2} "
                           f"(over {MAX_RANK}); merge it with peft (merge_and_unload) and load the merged model")
    # peft: scaling = alpha / r, both per module (alpha_pattern / rank_pattern); r is the factors' own rank
    alpha = float(_pattern_value(raw.get("alpha_pattern") or {}, path, raw.get("alpha", 8)))
    scale = alpha / r1
    out, size_in = w1a.shape[0], w1b.shape[1]
    lora_B = (w1a.float()[:, :, None] * w2a.float()[:, None, :]).reshape(out, r1 * r2) * scale
    lora_A = (w1b.float()[:, None, :] * w2b.float()[None, :, :]).reshape(r1 * r2, size_in)
    return lora_A.to(w1b.dtype), lora_B.to(w1a.dtype)


def _lokr(raw: dict[str, Any], path: str, parts: dict[str, torch.Tensor], rest: Any, where: str):
    if "lokr_t2" in parts or any(t.dim() != 2 for t in parts.values()):
        raise LorakitError(f"{where}: {_PREFIX}{path} is a LoKr of a convolution (lokr_t2 or 4-D factors); lorakit "
                           "converts LoKr of linear layers only: merge it with peft (merge_and_unload) and load the "
                           "merged model")
    factors = []
    for n in ("1", "2"):  # each Kronecker factor as a product P Q: saved so (w_a, w_b), or whole (w)
        if f"lokr_w{n}" in parts:
            w = parts[f"lokr_w{n}"].float()
            eye_out, eye_in = torch.eye(w.shape[0]), torch.eye(w.shape[1])
            factors.append((eye_out, w) if w.shape[0] <= w.shape[1] else (w, eye_in))  # rank min(out, in)
        elif f"lokr_w{n}_a" in parts and f"lokr_w{n}_b" in parts:
            factors.append((parts[f"lokr_w{n}_a"].float(), parts[f"lokr_w{n}_b"].float()))
        else:
            raise LorakitError(f"{where}: {_PREFIX}{path} lacks LoKr's factor {n} (lokr_w{n}, or lokr_w{n}_a and "
                               f"lokr_w{n}_b); save the adapter again with peft")
    (P1, Q1), (P2, Q2) = factors
    if P1.shape[1] != Q1.shape[0] or P2.shape[1] != Q2.shape[0]:
        shapes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in parts.items())
        raise LorakitError(f"{where}: {_PREFIX}{path}'s LoKr factors do not fit ({shapes}); save the adapter again "
                           "with peft")
    rank = P1.shape[1] * P2.shape[1]
    if rank > MAX_RANK:
        raise LorakitError(f"{where}: {_PREFIX}{path} is a LoKr whose Kronecker product is a LoRA of rank {rank} (over "
                           f"{MAX_RANK}); merge it with peft (merge_and_unload) and load the merged model")
    # peft: kron(W1, W2) * alpha / r, r and alpha per module (rank_pattern / alpha_pattern); and kron(P1 Q1, P2 Q2)
    # = kron(P1, P2) kron(Q1, Q2): B' (o1 o2, r1 r2), A' (r1 r2, i1 i2)
    r = float(_pattern_value(raw.get("rank_pattern") or {}, path, raw.get("r", 8)))
    alpha = float(_pattern_value(raw.get("alpha_pattern") or {}, path, raw.get("alpha", 8)))
    dtype = next(iter(parts.values())).dtype
    return torch.kron(Q1, Q2).to(dtype), (torch.kron(P1, P2) * (alpha / r)).to(dtype)


def fit_to_model(model_modules: dict[str, Any], raw_config: Any, tensors: dict[str, torch.Tensor], where: str
                 ) -> dict[str, torch.Tensor]:
    """The converted tensors for this model: a VeRA adapter's ``lora_A`` cut to each layer's in_features (peft
    slices the shared vera_A so); a module that is not a linear layer refused in one line (a convolution's LoHa or
    VeRA is not this file's product form). Others as they are; a layer with more inputs than vera_A has columns is
    left for ``plan_load`` to name."""
    from lorakit import quant

    kind = peft_type(raw_config)
    if kind is None:
        return tensors
    tensors = dict(tensors)
    if kind == "VERA" and _regenerated(raw_config):
        tensors = _vera_projections(model_modules, raw_config, tensors, where)
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        path = key[: -len(".lora_A.weight")]
        path = path[len(_PREFIX):] if path.startswith(_PREFIX) else path
        module = model_modules.get(path)
        if module is None:
            continue  # plan_load names a path the model lacks
        if not quant.is_linear_like(module):
            raise LorakitError(f"{where}: {path} is a {type(module).__name__}, and lorakit reads {NAMES[kind]} adapters of linear "
                               "layers only: merge this one with peft (merge_and_unload) and load the merged model")
        in_features = quant.linear_shape(module)[1]
        if kind == "VERA" and tensors[key].shape[1] > in_features:
            tensors[key] = tensors[key][:, :in_features].contiguous()
    return tensors


def _regenerated(raw: dict[str, Any]) -> bool:
    """A VeRA config saved without vera_A / vera_B (``save_projection`` false): peft draws them again on load."""
    return raw.get("save_projection") is False


def _vera_projections(model_modules: dict[str, Any], raw: dict[str, Any], tensors: dict[str, torch.Tensor], where: str
                      ) -> dict[str, torch.Tensor]:
    """A ``save_projection=False`` VeRA adapter's LoRA tensors for this model: ``to_lora`` left each module's
    ``lambda_d`` (r, 1) and ``lambda_b`` (out, 1); the shared matrices are drawn as peft 0.21 draws them
    (``VeraModel._init_vera_A_vera_B``): a CPU generator seeded with ``projection_prng_key``, then vera_A (r, max in)
    and vera_B (max out, r), each kaiming-uniform with bound sqrt(6 / fan_in), max over the adapted linear layers.
    Then ``A' = lambda_d * vera_A[:, :in]``, ``B' = lambda_b * vera_B[:out]`` as for a saved projection."""
    from lorakit import quant

    paths = {key[: -len(".lora_A.weight")]: key for key in tensors if key.endswith(".lora_A.weight")}
    shapes = {}
    for full in paths:
        module = model_modules.get(full[len(_PREFIX):] if full.startswith(_PREFIX) else full)
        if module is not None and quant.is_linear_like(module):
            shapes[full] = quant.linear_shape(module)  # (out, in)
    if not shapes:
        return tensors  # plan_load names the paths this model lacks
    key = raw.get("projection_prng_key", 0)
    if isinstance(key, bool) or not isinstance(key, int):
        raise LorakitError(f"{where}: projection_prng_key must be an integer (the seed peft draws VeRA's shared "
                           f"matrices from), got {shown(key)}")
    rank = tensors[paths[next(iter(shapes))]].shape[0]  # lambda_d (r, 1)
    generator = torch.Generator(device="cpu").manual_seed(key)
    max_out, max_in = (max(shape[i] for shape in shapes.values()) for i in (0, 1))

    def kaiming(rows: int, columns: int) -> torch.Tensor:  # peft's _kaiming_init: fan_in = columns, gain sqrt(2)
        bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(columns)
        return torch.empty(rows, columns).uniform_(-bound, bound, generator=generator)

    shared_A, shared_B = kaiming(rank, max_in), kaiming(max_out, rank)
    out = dict(tensors)
    for full, (size_out, size_in) in shapes.items():
        key_A, key_B = paths[full], f"{full}.lora_B.weight"
        lambda_d, lambda_b = tensors[key_A], tensors.get(key_B)
        if lambda_d.shape != (rank, 1) or lambda_b is None or lambda_b.shape != (size_out, 1):
            raise LorakitError(f"{where}: {full}'s VeRA scaling vectors (vera_lambda_d {tuple(lambda_d.shape[:1])}, "
                               f"vera_lambda_b {None if lambda_b is None else tuple(lambda_b.shape[:1])}) do not fit this "
                               f"model's layer ({size_out} outputs) at rank {rank}; load the adapter on the base it was "
                               "trained on")
        out[key_A] = (lambda_d.float() * shared_A[:, :size_in]).to(lambda_d.dtype)
        out[key_B] = (lambda_b.float() * shared_B[:size_out]).to(lambda_b.dtype)
    return out


def training_reason(raw_config: Any) -> str | None:
    """Why such an adapter cannot continue training in lorakit (None for a LoRA)."""
    kind = peft_type(raw_config)
    why = {"ADALORA": "AdaLoRA (peft trains P, Lambda, Q with rank pruning and orthogonality)",
           "VERA": "VeRA (peft trains only the scaling vectors on frozen shared matrices)",
           "LOHA": "LoHa (peft trains the four factors of a Hadamard product)",
           "LOKR": "LoKr (peft trains the factors of a Kronecker product)"}
    return why[kind] if kind else None

