"""Fused kernels for training a transformers causal LM: ``use_fast_kernels(model)``.

What it changes, on supported architectures (Llama, Mistral, Qwen2, Qwen3; Gemma's norms), in place, at call time
(never at import):

* every ``*RMSNorm`` module -> :class:`lorakit.kernels.rmsnorm.FusedRMSNorm` (same weight Parameter);
* every SwiGLU MLP (``act_fn`` = silu) -> :class:`lorakit.kernels.swiglu.FusedSwiGLUMLP` (same child modules);
* the model's ``forward``: when ``labels`` are given and gradients are on, the loss comes from
  :func:`lorakit.kernels.linear_cross_entropy.linear_cross_entropy` on the last hidden states, so the (tokens,
  vocab) float32 logits are never built, and the output's ``logits`` is ``None``. Without labels, or under
  ``torch.no_grad()`` (evaluation that may want logits), the original forward runs unchanged.

State-dict keys and adapter paths do not change; LoRA can be injected before or after; gradient checkpointing
keeps working (the swaps are inside the checkpointed decoder layers). ``disable_fast_kernels`` undoes it all.
The dispatchers inside the fused modules still pick Triton or the reference per call, so a CPU model works too;
by default nothing is changed unless the model is on CUDA, where the kernels pay off.
"""

from __future__ import annotations

import dataclasses
import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kernels.linear_cross_entropy import linear_cross_entropy
from lorakit.kernels.rmsnorm import FusedRMSNorm
from lorakit.kernels.swiglu import FusedSwiGLUMLP

# model_type -> RMSNorm flavour (offset added to the weight, and whether x is rounded before the weight multiply)
_NORM_FLAVOUR = {
    "llama": (0.0, True), "mistral": (0.0, True), "qwen2": (0.0, True), "qwen3": (0.0, True), "gemma": (1.0, False),
}
_SWIGLU_ACTS = {"silu", "swish"}
_STATE = "_lorakit_fast_kernels"  # attribute on the model holding what was replaced, for disable_fast_kernels


@dataclasses.dataclass
class FastKernelReport:
    """What ``use_fast_kernels`` did. ``applied`` is False (and nothing changed) when ``reason`` says why."""

    applied: bool
    reason: str = ""
    rms_norms: int = 0
    mlps: int = 0
    fused_loss: bool = False

    def __str__(self) -> str:
        if not self.applied:
            return f"fast kernels not used: {self.reason}"
        return (f"fast kernels: {self.rms_norms} RMSNorm, {self.mlps} SwiGLU MLP, "
                f"fused linear cross-entropy {'on' if self.fused_loss else 'off (' + self.reason + ')'}")


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)


def _is_swiglu_mlp(module: nn.Module, config) -> bool:
    return (type(module).__name__.endswith("MLP")
            and all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and getattr(config, "hidden_act", None) in _SWIGLU_ACTS)


def use_fast_kernels(model: nn.Module, *, rms_norm: bool = True, swiglu: bool = True, fused_loss: bool = True,
                     require_cuda: bool = True) -> FastKernelReport:
    """Swap in the fused RMSNorm / SwiGLU modules and the chunked-logits loss; see the module docstring.

    Returns a :class:`FastKernelReport`; an unsupported model or (with ``require_cuda``) a model not on CUDA is left
    untouched and the report says why. Calling it twice is harmless.
    """
    model_type = _model_type(model)
    if model_type not in _NORM_FLAVOUR:
        return FastKernelReport(False, f"architecture {model_type!r} is not one of {sorted(_NORM_FLAVOUR)}")
    param = next(model.parameters(), None)
    if require_cuda and (param is None or param.device.type != "cuda"):
        return FastKernelReport(False, "the model is not on CUDA (pass require_cuda=False to swap anyway)")
    state = model.__dict__.setdefault(_STATE, {"modules": {}, "forward": None})
    offset, cast_before_weight = _NORM_FLAVOUR[model_type]
    report = FastKernelReport(True)
    for path, module in list(model.named_modules()):
        if isinstance(module, (FusedRMSNorm, FusedSwiGLUMLP)):  # swapped by an earlier call
            continue
        if rms_norm and type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter):
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            if eps is None:
                continue
            state["modules"][path] = module
            _set_submodule(model, path, FusedRMSNorm(module.weight, float(eps), offset, cast_before_weight))
        elif swiglu and _is_swiglu_mlp(module, model.config):
            state["modules"][path] = module
            _set_submodule(model, path, FusedSwiGLUMLP(module.gate_proj, module.up_proj, module.down_proj))
    report.rms_norms = sum(isinstance(m, FusedRMSNorm) for m in model.modules())
    report.mlps = sum(isinstance(m, FusedSwiGLUMLP) for m in model.modules())
    if fused_loss:
        why_not = _fused_loss_blocker(model)
        if why_not:
            report.reason = why_not
        else:
            if state["forward"] is None:
                state["forward"] = model.forward
                model.forward = types.MethodType(_make_fast_forward(model.forward), model)
            report.fused_loss = True
    return report


def disable_fast_kernels(model: nn.Module) -> None:
    """Put back the original modules and forward (keeping any LoRA wrappers injected in between)."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return
    for path, original in state["modules"].items():
        fused = model.get_submodule(path)
        if isinstance(fused, FusedSwiGLUMLP):  # children may have been LoRA-wrapped since: keep the current ones
            for name in ("gate_proj", "up_proj", "down_proj"):
                setattr(original, name, getattr(fused, name))
        _set_submodule(model, path, original)
    if state["forward"] is not None:
        del model.forward  # the instance attribute; the class's forward shows through again


def _fused_loss_blocker(model: nn.Module) -> str:
    """Why the fused loss cannot stand in for this model's loss ('' when it can)."""
    if not type(model).__name__.endswith("ForCausalLM"):
        return f"{type(model).__name__} is not a *ForCausalLM"
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear or head.bias is not None:
        return "lm_head is not a plain bias-free nn.Linear (LoRA on lm_head?)"
    if getattr(model.config, "final_logit_softcapping", None):
        return "the model soft-caps its logits"
    if not hasattr(model, getattr(model, "base_model_prefix", "") or "model"):
        return "the decoder is not found under base_model_prefix"
    return ""


def _make_fast_forward(original_forward):
    signature = inspect.signature(original_forward)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def forward(self, *args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original_forward(*args, **kwargs)  # let the original report the bad call
        named = dict(bound.arguments)
        extra = dict(named.pop(var_kw, {}) or {}) if var_kw else {}
        # (from either place: a decorator may hide the named parameters behind **kwargs)
        labels = named.pop("labels", extra.pop("labels", None))
        logits_to_keep = named.pop("logits_to_keep", extra.pop("logits_to_keep", 0))
        if labels is None or not torch.is_grad_enabled() or not (logits_to_keep is None or logits_to_keep == 0):
            return original_forward(*args, **kwargs)
        return_dict = extra.pop("return_dict", named.pop("return_dict", None))  # the decoder returns a ModelOutput
        decoder = getattr(self, self.base_model_prefix)
        outputs = decoder(**named, **extra)
        loss = causal_lm_loss(outputs[0], self.lm_head.weight, labels, **extra)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        fields = CausalLMOutputWithPast.__dataclass_fields__
        rest = {k: v for k, v in outputs.items() if k != "last_hidden_state" and k in fields}
        result = CausalLMOutputWithPast(loss=loss, logits=None, **rest)
        return result.to_tuple() if return_dict is False else result

    forward.__doc__ = original_forward.__doc__
    return forward


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                   num_items_in_batch=None, shift_labels: torch.Tensor | None = None, **_) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on ``hidden @ weight.T`` without building the logits.

    hidden (B, T, H), weight (V, H), labels (B, T): position t predicts labels[t + 1] (or ``shift_labels`` given
    ready); mean over non-ignored tokens, or a sum divided by ``num_items_in_batch`` when given (gradient
    accumulation, as the HF Trainer passes it).
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, shift_labels, ignore_index, reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
