"""Fused kernels for training a transformers causal LM: ``use_fast_kernels(model)``.

What it changes, on supported architectures (Llama, Mistral, Qwen2, Qwen3; Gemma's norms; the attention, norms and
loss of Mixtral and Qwen2/3-MoE, whose experts stay as they are), in place, at call time (never at import):

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

``compile="layers"`` adds regional ``torch.compile``: each decoder layer is compiled, and because every layer runs
the same code, one compiled graph serves all of them (dynamo inlines nn.Modules and passes their parameters as
graph inputs, so layer 2..N pass layer 1's guards; the first layer compiles a second variant when its input needs
no gradient). Why: at batch 1 x 2048 on an 8B model the eager step is host-bound (H200: 140 ms of GPU work in a
261 ms step, ~6,600 launches at ~39 us each); a compiled layer is one call per layer forward and one backward, with
inductor fusing the elementwise work. In this mode the RMSNorm / SwiGLU modules are left as transformers wrote them
(inductor fuses them itself; the Triton ones would be opaque calls inside the graph), the LoRA linears keep their
hand-written autograd.Function (dynamo traces it into the graph) and the fused loss stays outside the layers.
Training calls with labels run without a KV cache (``use_cache=False``), which would otherwise make each layer's
index a guard and recompile per layer.
"""

from __future__ import annotations

import dataclasses
import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError
from lorakit.kernels.linear_cross_entropy import linear_cross_entropy
from lorakit.kernels.rmsnorm import FusedRMSNorm
from lorakit.kernels.swiglu import FusedSwiGLUMLP

# model_type -> RMSNorm flavour (offset added to the weight, and whether x is rounded before the weight multiply)
_NORM_FLAVOUR = {
    "llama": (0.0, True), "mistral": (0.0, True), "qwen2": (0.0, True), "qwen3": (0.0, True), "gemma": (1.0, False),
    # MoE decoders with Llama's RMSNorm (their experts are left as they are; Qwen2-MoE's shared expert is a SwiGLU MLP)
    "mixtral": (0.0, True), "qwen2_moe": (0.0, True), "qwen3_moe": (0.0, True),
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
    compiled_layers: int = 0

    def __str__(self) -> str:
        if not self.applied:
            return f"fast kernels not used: {self.reason}"
        return (f"fast kernels: {self.rms_norms} RMSNorm, {self.mlps} SwiGLU MLP, "
                f"fused linear cross-entropy {'on' if self.fused_loss else 'off (' + self.reason + ')'}"
                + (f", {self.compiled_layers} decoder layers compiled" if self.compiled_layers else ""))


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
                     require_cuda: bool = True, compile: str | None = None,
                     compile_backend: str = "inductor") -> FastKernelReport:
    """Swap in the fused RMSNorm / SwiGLU modules and the chunked-logits loss; see the module docstring.

    ``compile="layers"`` also compiles each decoder layer with ``torch.compile(backend=compile_backend)`` (the
    compilation happens on the first forward; on an H200 expect tens of seconds, not minutes, since one layer is
    compiled, not 32). Returns a :class:`FastKernelReport`; an unsupported model or (with ``require_cuda``) a model
    not on CUDA is left untouched and the report says why. Calling it twice is harmless.
    """
    if compile not in (None, "off", "layers"):
        raise LorakitError(f"use_fast_kernels: compile must be None, 'off' or 'layers', got {compile!r}")
    compile_layers = compile == "layers"
    model_type = _model_type(model)
    if model_type not in _NORM_FLAVOUR:
        return FastKernelReport(False, f"architecture {model_type!r} is not one of {sorted(_NORM_FLAVOUR)}")
    param = next(model.parameters(), None)
    if require_cuda and (param is None or param.device.type != "cuda"):
        return FastKernelReport(False, "the model is not on CUDA (pass require_cuda=False to swap anyway)")
    layers = _decoder_layers(model) if compile_layers else None
    if compile_layers and layers is None:
        return FastKernelReport(False, "compile='layers' found no decoder layers (an nn.ModuleList named 'layers' "
                                       "under the model's base_model_prefix); use compile=None")
    state = model.__dict__.setdefault(_STATE, {"modules": {}, "forward": None, "compiled": []})
    offset, cast_before_weight = _NORM_FLAVOUR[model_type]
    report = FastKernelReport(True)
    if compile_layers:  # inductor fuses the originals; put back any Triton modules an earlier call swapped in
        rms_norm = swiglu = False
        _restore_modules(model, state)
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
    if compile_layers:
        state["training_no_cache"] = True
        if state["forward"] is None:  # the no-cache rule needs the wrapper even where the fused loss does not apply
            state["forward"] = model.forward
            model.forward = types.MethodType(_make_fast_forward(model.forward, fused_loss=False), model)
        for layer in layers:
            if getattr(layer, "_compiled_call_impl", None) is None:
                layer.compile(backend=compile_backend)
                state["compiled"].append(layer)
        report.compiled_layers = sum(getattr(m, "_compiled_call_impl", None) is not None for m in layers)
    return report


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of identical decoder layers (``model.model.layers`` on transformers decoders)."""
    decoder = getattr(model, getattr(model, "base_model_prefix", "") or "model", None)
    layers = getattr(decoder, "layers", None) if decoder is not None else getattr(model, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) > 0 else None


def _restore_modules(model: nn.Module, state: dict) -> None:
    """Put back the modules ``use_fast_kernels`` replaced (keeping LoRA wrappers injected in between)."""
    for path, original in state["modules"].items():
        fused = model.get_submodule(path)
        if isinstance(fused, FusedSwiGLUMLP):  # children may have been LoRA-wrapped since: keep the current ones
            for name in ("gate_proj", "up_proj", "down_proj"):
                setattr(original, name, getattr(fused, name))
        _set_submodule(model, path, original)
    state["modules"] = {}


def disable_fast_kernels(model: nn.Module) -> None:
    """Put back the original modules and forward (keeping any LoRA wrappers injected in between)."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return
    _restore_modules(model, state)
    for layer in state.get("compiled", []):
        layer._compiled_call_impl = None  # what nn.Module.compile set; the eager __call__ shows through again
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
    if getattr(model.config, "output_router_logits", False):
        return "the model adds its router's auxiliary loss (output_router_logits), which the fused loss leaves out"
    if not hasattr(model, getattr(model, "base_model_prefix", "") or "model"):
        return "the decoder is not found under base_model_prefix"
    return ""


def _make_fast_forward(original_forward, fused_loss: bool = True):
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
        training = labels is not None and torch.is_grad_enabled()
        if (training and self.__dict__.get(_STATE, {}).get("training_no_cache") and named.get("use_cache") is None
                and extra.get("use_cache") is None and ("use_cache" in signature.parameters or var_kw)):
            # compiled layers: a KV cache (useless in training) would make each layer's index a guard
            extra.pop("use_cache", None)
            kwargs["use_cache"] = named["use_cache"] = False
        router_loss = named.get("output_router_logits", extra.get("output_router_logits"))  # MoE: the aux loss
        if not fused_loss or not training or router_loss or not (logits_to_keep is None or logits_to_keep == 0):
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
