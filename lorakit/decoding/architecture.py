"""Which models the static decoder runs, and the parts of one it reads.

The static decoder (``lorakit.decoding.StaticDecoder``) replaces transformers' forward for decode steps only, so
it must know the architecture exactly. It runs:

* the Llama family: ``llama`` (also SmolLM2, Llama 2/3), ``mistral``, ``qwen2`` (q/k/v biases) and ``qwen3``
  (per-head q/k RMSNorm), with SwiGLU MLPs and RMSNorms;
* ``phi3`` (Phi-3/3.5, Phi-4-mini): the same layer with fused ``qkv_proj`` and ``gate_up_proj`` modules (adapters
  target the fused modules, so each is one group of one projection); partial rotary (``partial_rotary_factor``);
* ``gemma``: embeddings scaled by sqrt(hidden) (rounded to the weights' dtype, as transformers), RMSNorms that
  multiply by ``1 + weight`` in float32, a GeGLU MLP (tanh GELU), head_dim set apart from hidden / heads;
* ``gemma2``: Gemma plus norms on the attention and MLP outputs (before the residual adds), attention and final
  logit soft-capping, ``query_pre_attn_scalar`` scaling, alternating sliding-window layers;
* ``gemma3_text``: Gemma 2 plus per-head q/k norms and two rotary tables (local and global bases).

Sliding-window layers (Mistral, Phi-3, Qwen2/3 with ``use_sliding_window``, Gemma 2/3's local layers) are exact at
any length: each layer's window (``LayerParts.window``, from ``_layer_windows``) goes to the attention kernel; rope
types whose table does not depend on the sequence length (default, linear, llama3, yarn; longrope while every
position stays within its original context). Anything else gets a one-line reason from ``static_decoding_unsupported``, and callers keep
transformers' forward.

A projection may be a plain ``nn.Linear``, a lorakit ``NF4Linear`` (QLoRA's 4-bit base, from
``lorakit.quantize(model, "nf4")`` or ``load_base(folder, quantize="nf4")``), or a lorakit ``LoraLinear`` over
either; the members of a fused group (q/k/v, gate/up) are all NF4 or all dense. Other quantized layers (bitsandbytes,
other ``QuantizedLinear`` types) get a one-line reason. Adapters that also change other modules (embeddings, the output head, modules_to_save) are
listed in ``ModelParts.foreign``: the decoder refuses rows that use them (it would silently skip those modules).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.errors import LorakitError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION + MLP
# projection groups: each group's members read one input and run as one GEMM over their fused weights
GROUPS = (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)), ("gate_up", ("gate_proj", "up_proj")),
          ("down", ("down_proj",)))
PHI3_ATTENTION = ("qkv_proj", "o_proj")
PHI3_MLP = ("gate_up_proj", "down_proj")
PHI3_GROUPS = (("qkv", ("qkv_proj",)), ("o", ("o_proj",)), ("gate_up", ("gate_up_proj",)), ("down", ("down_proj",)))
# transformers' activation modules computing the tanh GELU (``gelu_pytorch_tanh`` and its same-formula aliases)
_GELU_TANH = ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation")


@dataclass
class LayerParts:
    """One decoder layer: its norms, projection modules (by name), q/k norms (Qwen3, Gemma 3) or None.

    ``post_norm`` is the norm before the MLP (Llama's post_attention_layernorm, Gemma 2's pre_feedforward_layernorm);
    ``attn_out_norm`` / ``mlp_out_norm`` (Gemma 2/3, else None) normalise the attention / MLP output before its
    residual add. ``softcap``: attention logit soft-capping (or None); ``rope``: the key of the rotary table the
    layer uses (None: the model's one table; Gemma 3: its layer type). ``window``: a sliding-window layer's window
    (the query at position p attends keys p - window < k <= p, as transformers' mask) or None (full attention).
    """

    input_norm: nn.Module
    post_norm: nn.Module
    projections: dict[str, nn.Module]
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    scaling: float
    attn_out_norm: nn.Module | None = None
    mlp_out_norm: nn.Module | None = None
    softcap: float | None = None
    rope: str | None = None
    window: int | None = None


@dataclass
class ModelParts:
    """What a decode step reads. Shapes: hidden d, heads H of head_dim D, kv heads Hkv, MLP width F, vocab V.

    ``groups``: (group, member projection names) in the decoder's order qkv, o, gate_up, down. ``embed_scale``:
    the factor on the embeddings (Gemma: sqrt(d) rounded to the weights' dtype) or None. ``norm_offset`` /
    ``norm_cast_first``: RMSNorm's weight is ``offset + weight`` (Gemma: 1) and the normalised value is rounded to
    the input dtype before (Llama) or after (Gemma) the multiply. ``activation``: "silu" (SwiGLU) or "gelu_tanh"
    (GeGLU). ``final_softcap``: logit soft-capping of the head's output, or None. ``rotary``: the rotary module;
    ``rope_keys``: the table keys its layers use (None, or Gemma 3's layer types). ``rotary_dim``: the leading
    dims of each q/k head that rotate (head_dim, or less for Phi-3 with ``partial_rotary_factor`` < 1; None: all).
    """

    model_type: str
    embed: nn.Embedding
    layers: list[LayerParts]
    final_norm: nn.Module
    lm_head: nn.Linear
    rotary: nn.Module
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    # lorakit's wrappers of modules outside the projections (path -> wrapper): adapters they hold are not served
    # here. The wrappers, not their adapter names: a later adapter can join an existing wrapper (a second
    # trainable-tokens adapter on the embedding) without lorakit adding a module, so a list of names would go stale
    foreign: dict[str, nn.Module]
    groups: tuple = GROUPS
    embed_scale: float | None = None
    norm_offset: float = 0.0
    norm_cast_first: bool = True
    activation: str = "silu"
    final_softcap: float | None = None
    rope_keys: tuple = (None,)
    rotary_dim: int | None = None


def base_linear(module: nn.Module) -> nn.Module:
    """The ``nn.Linear`` under a projection (itself, or a LoraLinear's base layer)."""
    return getattr(module, "base_layer", module)


class _RotaryPerType(nn.Module):
    """transformers 4.x's Gemma 3 keeps one rotary module per base (``rotary_emb`` for full layers,
    ``rotary_emb_local`` for sliding ones); 5.x has one module taking the layer type. This answers as the 5.x one."""

    def __init__(self, full: nn.Module, local: nn.Module):
        super().__init__()
        self.full, self.local = full, local

    def forward(self, x, positions, layer_type: str):
        return (self.local if layer_type == "sliding_attention" else self.full)(x, positions)


def _rotary(inner: nn.Module, per_type: bool) -> nn.Module:
    """The model's rotary module, called ``(x, positions)`` or, with ``per_type``, ``(x, positions, layer_type)``."""
    if per_type and hasattr(inner, "rotary_emb_local"):
        return _RotaryPerType(inner.rotary_emb, inner.rotary_emb_local)
    return inner.rotary_emb


def _is_nf4(module: nn.Module) -> bool:
    """A lorakit NF4 (QLoRA) base layer: the decoder's GEMMs read its packed weight (``lorakit.kernels.nf4_rows``)."""
    from lorakit.quant.nf4 import NF4Linear

    return isinstance(module, NF4Linear)


def norm_eps(norm: nn.Module, default: float) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", default)))


def _rope_params(config) -> dict:
    """The rope parameter sets of the config: {None: params} or, for per-layer-type rope (Gemma 3), {type: params}."""
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        if isinstance(params, dict) and params:
            if all(isinstance(v, dict) for v in params.values()):
                return dict(params)
            return {None: params}
    return {None: {}}


def _rope_type(params: dict) -> str:
    return str(params.get("rope_type", params.get("type", "default")))


def _check_rope(config, model_type: str, head_dim: int, max_len: int | None) -> int | None:
    """Rope tables that the decoder's one table per layer type reproduces exactly; returns the rotated dims of a
    head when only a part rotates (Phi-3 / Phi-4-mini's ``partial_rotary_factor``), else None."""
    rotary_dim = None
    for key, params in _rope_params(config).items():
        rope = _rope_type(params)
        factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        if factor is not None and float(factor) != 1.0:
            # transformers' Phi-3 rotates the first int(head_dim * factor) dims (rotate_half over them) and passes
            # the rest; the other families here have no partial rotary in their attention
            rotary_dim = int(head_dim * float(factor))
            if model_type != "phi3" or not 0 < rotary_dim < head_dim or rotary_dim % 2:
                raise LorakitError(f"static decoding rotates whole heads (or an even part of Phi-3 heads); this "
                                   f"{model_type} model rotates {rotary_dim} of {head_dim} (partial_rotary_factor={factor})")
        if rope == "longrope":
            # transformers picks the short factors while the sequence is within the original context: a table
            # for positions below it is the one every step uses
            original = params.get("original_max_position_embeddings",
                                  getattr(config, "original_max_position_embeddings", None))
            if not original or max_len is None or max_len > int(original):
                given = "" if max_len is None else f", not {max_len}"
                raise LorakitError(f"static decoding runs longrope only within the original context (max_len / "
                                   f"--max-context <= original_max_position_embeddings={original}{given}), where "
                                   "its table does not depend on the length")
        elif rope not in ROPE_TYPES:
            raise LorakitError(f"static decoding does not run rope type {rope!r} (its table depends on the length); "
                               f"supported: {', '.join(ROPE_TYPES)}, longrope within the original context")
    return rotary_dim


def _activation(config, model_type: str, mlp: nn.Module) -> str:
    """'silu' (SwiGLU) or 'gelu_tanh' (GeGLU), from the activation module the MLP really calls."""
    if model_type not in GEMMA_TYPES:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise LorakitError(f"static decoding needs a SwiGLU MLP (hidden_act 'silu'), not {act!r}")
        return "silu"
    module = getattr(mlp, "act_fn", None)
    name = type(module).__name__
    if name in _GELU_TANH:
        return "gelu_tanh"
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    raise LorakitError(f"static decoding runs Gemma MLPs with the tanh GELU (gelu_pytorch_tanh), not {act!r} ({name})")


def _embed_scale(model_type: str, config, embed_module: nn.Module, embed: nn.Embedding) -> float | None:
    """Gemma's embedding factor: sqrt(hidden) rounded to the weights' dtype (the module's ``embed_scale`` buffer
    where it has one, transformers 5.x; else the ``normalizer`` older versions compute in the model's forward)."""
    if model_type not in GEMMA_TYPES:
        return None
    dtype = embed.weight.dtype
    buffer = getattr(embed_module, "embed_scale", None)
    if isinstance(buffer, torch.Tensor) and buffer.numel() == 1:
        return float(buffer.detach().to(dtype))
    return float(torch.tensor(config.hidden_size ** 0.5, dtype=dtype))


def static_decoding_unsupported(model: nn.Module, max_len: int | None = None) -> str | None:
    """Why ``model`` cannot use the static decoder with ``max_len`` tokens per row (one line), or None when it can."""
    try:
        model_parts(model, max_len)
    except LorakitError as error:
        return str(error)
    return None


def model_parts(model: nn.Module, max_len: int | None = None) -> ModelParts:
    """The parts of a supported causal LM; raises LorakitError naming the first thing that is not supported.

    ``max_len`` (tokens per cache row) matters only for longrope.
    """
    from lorakit.layers import LoraLinear

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        raise LorakitError(f"static decoding supports {', '.join(SUPPORTED_TYPES)} models, not {model_type!r}")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(model, "lm_head"):
        raise LorakitError(f"this {model_type} model does not have the usual model.layers / lm_head structure")
    gemma, phi3 = model_type in GEMMA_TYPES, model_type == "phi3"
    attention, mlp_names = (PHI3_ATTENTION, PHI3_MLP) if phi3 else (ATTENTION, MLP)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    activation = _activation(config, model_type, getattr(layers[0], "mlp", None) if len(layers) else None)
    rotary_dim = _check_rope(config, model_type, head_dim, max_len)
    if getattr(config, "use_bidirectional_attention", False):
        raise LorakitError(f"static decoding runs causal attention; this {model_type} model attends bidirectionally")
    windows = _layer_windows(config, model_type, len(layers))

    hosts = _adapter_hosts(model)
    allowed = {f"model.layers.{i}.{'self_attn' if p in attention else 'mlp'}.{p}"
               for i in range(len(layers)) for p in attention + mlp_names}
    # adapters that also change other modules (embeddings, the head, modules_to_save) cannot be served by the
    # decoder: rows that use them are refused (``foreign``: adapter name -> one such module), the other rows decode
    foreign = {path: hosts[path] for path in sorted(p for p in hosts if p not in allowed)}
    merged = sorted(p for p, h in hosts.items() if getattr(h, "merged", None))
    if merged:
        raise LorakitError(f"static decoding needs unmerged adapters ({merged[0]} holds a merged one); call lorakit.unmerge(model)")

    layer_types = list(getattr(config, "layer_types", None) or [])
    softcap = getattr(config, "attn_logit_softcapping", None) if model_type == "gemma2" else None
    if model_type == "gemma3_text" and getattr(config, "attn_logit_softcapping", None) is not None:
        # its config field exists but transformers' Gemma 3 attention does not pass it on (released models: None)
        raise LorakitError("static decoding does not run a Gemma 3 with attn_logit_softcapping set (transformers' "
                           "Gemma 3 attention ignores it, so which one is meant is unclear)")
    per_type_rope = model_type == "gemma3_text"
    parts = []
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            raise LorakitError(f"layer {i} has no self_attn / mlp module")
        projections = {}
        for name in attention + mlp_names:
            module = getattr(attn if name in attention else mlp, name, None)
            if module is None:
                raise LorakitError(f"layer {i} has no {name}")
            if not isinstance(module, LoraLinear) and hasattr(module, "base_layer"):
                raise LorakitError(f"layer {i} {name} is wrapped by another library ({type(module).__name__})")
            linear = base_linear(module)
            if type(linear) is not nn.Linear and not _is_nf4(linear):
                hint = (" (convert bitsandbytes layers with lorakit.quantize(model, 'nf4'): exact for NF4)"
                        if type(linear).__name__ in ("Linear4bit", "LinearNF4") else "")
                raise LorakitError(f"layer {i} {name} is a {type(linear).__name__}; static decoding needs 16/32-bit "
                                   f"nn.Linear or lorakit NF4Linear weights{hint}")
            projections[name] = module
        for group, members in (PHI3_GROUPS if phi3 else GROUPS):
            kinds = {_is_nf4(base_linear(projections[p])) for p in members}
            if len(kinds) > 1:  # one GEMM per group reads one storage
                raise LorakitError(f"layer {i} mixes NF4 and dense weights in its {'/'.join(members)} projections; "
                                   "static decoding needs them all NF4 or all dense (quantize them together)")
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        if (q_norm is None) != (k_norm is None) or (model_type in ("qwen3", "gemma3_text")) != (q_norm is not None):
            raise LorakitError(f"layer {i} has unexpected q/k norms for a {model_type} model")
        attn_out_norm = mlp_out_norm = None
        post_norm = layer.post_attention_layernorm
        if model_type in ("gemma2", "gemma3_text"):
            attn_out_norm, post_norm = layer.post_attention_layernorm, layer.pre_feedforward_layernorm
            mlp_out_norm = layer.post_feedforward_layernorm
        rope = None
        if per_type_rope:
            rope = layer_types[i] if i < len(layer_types) else getattr(attn, "layer_type", None)
            if rope is None:
                raise LorakitError(f"layer {i} of this {model_type} model has no layer type (its rotary table)")
        parts.append(LayerParts(layer.input_layernorm, post_norm, projections, q_norm, k_norm,
                                float(getattr(attn, "scaling", attn.head_dim ** -0.5)), attn_out_norm, mlp_out_norm,
                                None if softcap is None else float(softcap), rope, windows[i]))

    embed_module = inner.embed_tokens
    embed, lm_head = base_linear(embed_module), base_linear(model.lm_head)  # wrapped: see ``foreign``
    scaled = gemma and isinstance(embed, nn.Embedding) and type(embed).__name__.endswith("ScaledWordEmbedding")
    if type(embed) is not nn.Embedding and not scaled:
        raise LorakitError(f"the input embedding is a {type(embed).__name__}; static decoding needs a plain nn.Embedding")
    if type(lm_head) is not nn.Linear or lm_head.bias is not None:
        quantized = " (this one is quantized: lorakit.quantize leaves lm_head dense unless skip= drops it)" \
            if _is_nf4(lm_head) else ""
        raise LorakitError(f"static decoding needs a plain bias-free nn.Linear output head{quantized}")
    final_softcap = getattr(config, "final_logit_softcapping", None) if gemma else None
    return ModelParts(
        model_type=model_type, embed=embed, layers=parts, final_norm=inner.norm, lm_head=lm_head,
        rotary=_rotary(inner, per_type_rope), hidden=config.hidden_size, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate=config.intermediate_size, vocab=lm_head.out_features,
        max_positions=int(getattr(config, "max_position_embeddings", 4096) or 4096), foreign=foreign,
        groups=PHI3_GROUPS if phi3 else GROUPS, embed_scale=_embed_scale(model_type, config, embed_module, embed),
        norm_offset=1.0 if gemma else 0.0, norm_cast_first=not gemma, activation=activation,
        final_softcap=None if final_softcap is None else float(final_softcap),
        rope_keys=tuple(dict.fromkeys(p.rope for p in parts)) if per_type_rope else (None,), rotary_dim=rotary_dim,
    )


def _layer_windows(config, model_type: str, n_layers: int) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as transformers' forward masks it.

    Mistral and Phi-3 slide on every layer when ``sliding_window`` is set (their models ignore ``layer_types``);
    Qwen2/3, Gemma 2 and Gemma 3 slide on the layers whose ``layer_types`` entry is "sliding_attention" (Qwen2/3:
    the layers from ``max_window_layers`` on, with ``use_sliding_window``; Gemma 2 every other one; Gemma 3 five of
    six), older configs without ``layer_types`` by the same rules. The query at position p attends the keys k with
    p - window < k <= p (``masking_utils.sliding_window_overlay``) at any length: the decoder's kernels take the
    window.
    """
    window = getattr(config, "sliding_window", None)
    if model_type in ("mistral", "phi3"):
        return [int(window) if window else None] * n_layers
    layer_types = list(getattr(config, "layer_types", None) or [])
    if not layer_types:
        if model_type in ("qwen2", "qwen3") and window and getattr(config, "use_sliding_window", False):
            first = int(getattr(config, "max_window_layers", 0) or 0)
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
        else:
            layer_types = ["full_attention"] * n_layers
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise LorakitError(f"static decoding runs full and sliding-window attention layers, not {unknown}")
    if len(layer_types) < n_layers:
        raise LorakitError(f"this {model_type} config lists {len(layer_types)} layer_types for {n_layers} layers")
    sliding = [t == "sliding_attention" for t in layer_types[:n_layers]]
    if any(sliding) and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise LorakitError(f"this {model_type} model has sliding-window layers but no sliding_window size >= 1 in its "
                           f"config (got {window!r}); set sliding_window")
    return [int(window) if slide else None for slide in sliding]


def _adapter_hosts(model: nn.Module) -> dict:
    from lorakit.inject import adapter_hosts

    return adapter_hosts(model)
