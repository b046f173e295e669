"""Which models the static decoder runs, and the parts of one it reads.

The static decoder (``lorakit.decoding.StaticDecoder``) replaces transformers' forward for decode steps only, so
it must know the architecture exactly. It runs the Llama family: ``llama`` (also SmolLM2, Llama 2/3), ``mistral``,
``qwen2`` (q/k/v biases) and ``qwen3`` (per-head q/k RMSNorm), with SwiGLU MLPs and RMSNorms; a sliding window only
when no sequence can outgrow it (``_check_window``); rope types whose table does not depend on the sequence length
(default, linear, llama3, yarn). Anything else gets a one-line reason from ``static_decoding_unsupported``, and
callers keep transformers' forward.

A projection may be a plain ``nn.Linear`` or a lorakit ``LoraLinear`` over one (16/32-bit weights; an NF4 base is
not supported here). Adapters that also change other modules (embeddings, the output head, modules_to_save) are
listed in ``ModelParts.foreign``: the decoder refuses rows that use them (it would silently skip those modules).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorakit.errors import LorakitError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION + MLP


@dataclass
class LayerParts:
    """One decoder layer: its two RMSNorms, seven projection modules (by name) and Qwen3's q/k norms (or None)."""

    input_norm: nn.Module
    post_norm: nn.Module
    projections: dict[str, nn.Module]
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    scaling: float


@dataclass
class ModelParts:
    """What a decode step reads. Shapes: hidden d, heads H of head_dim D, kv heads Hkv, MLP width F, vocab V."""

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
    foreign: dict[str, str]  # adapter name -> a module outside the projections that holds it (not served here)


def base_linear(module: nn.Module) -> nn.Module:
    """The ``nn.Linear`` under a projection (itself, or a LoraLinear's base layer)."""
    return getattr(module, "base_layer", module)


def norm_eps(norm: nn.Module, default: float) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", default)))


def _rope_type(config) -> str:
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        if isinstance(params, dict) and params:
            return str(params.get("rope_type", params.get("type", "default")))
    return "default"


def static_decoding_unsupported(model: nn.Module, max_len: int | None = None) -> str | None:
    """Why ``model`` cannot use the static decoder with ``max_len`` tokens per row (one line), or None when it can."""
    try:
        model_parts(model, max_len)
    except LorakitError as error:
        return str(error)
    return None


def model_parts(model: nn.Module, max_len: int | None = None) -> ModelParts:
    """The parts of a supported causal LM; raises LorakitError naming the first thing that is not supported.

    ``max_len`` (tokens per cache row) matters only for sliding-window models: see ``_check_window``.
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
    if getattr(config, "hidden_act", "silu") != "silu":
        raise LorakitError(f"static decoding needs a SwiGLU MLP (hidden_act 'silu'), not {config.hidden_act!r}")
    rope = _rope_type(config)
    if rope not in ROPE_TYPES:
        raise LorakitError(f"static decoding does not run rope type {rope!r} (its table depends on the length); "
                           f"supported: {', '.join(ROPE_TYPES)}")
    _check_window(config, model_type, max_len)

    hosts = _adapter_hosts(model)
    allowed = {f"model.layers.{i}.{'self_attn' if p in ATTENTION else 'mlp'}.{p}"
               for i in range(len(layers)) for p in PROJECTIONS}
    # adapters that also change other modules (embeddings, the head, modules_to_save) cannot be served by the
    # decoder: rows that use them are refused (``foreign``: adapter name -> one such module), the other rows decode
    foreign: dict[str, str] = {}
    for path in sorted(p for p in hosts if p not in allowed):
        for name in hosts[path].adapter_names():
            foreign.setdefault(name, path)
    merged = sorted(p for p, h in hosts.items() if getattr(h, "merged", None))
    if merged:
        raise LorakitError(f"static decoding needs unmerged adapters ({merged[0]} holds a merged one); call lorakit.unmerge(model)")

    parts = []
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            raise LorakitError(f"layer {i} has no self_attn / mlp module")
        projections = {}
        for name in PROJECTIONS:
            module = getattr(attn if name in ATTENTION else mlp, name, None)
            if module is None:
                raise LorakitError(f"layer {i} has no {name}")
            if not isinstance(module, LoraLinear) and hasattr(module, "base_layer"):
                raise LorakitError(f"layer {i} {name} is wrapped by another library ({type(module).__name__})")
            linear = base_linear(module)
            if type(linear) is not nn.Linear:
                raise LorakitError(f"layer {i} {name} is a {type(linear).__name__}; static decoding needs 16/32-bit "
                                   "nn.Linear weights (quantized bases decode through transformers)")
            projections[name] = module
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        if (q_norm is None) != (k_norm is None) or (model_type == "qwen3") != (q_norm is not None):
            raise LorakitError(f"layer {i} has unexpected q/k norms for a {model_type} model")
        parts.append(LayerParts(layer.input_layernorm, layer.post_attention_layernorm, projections, q_norm, k_norm,
                                float(getattr(attn, "scaling", attn.head_dim ** -0.5))))

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    embed, lm_head = base_linear(inner.embed_tokens), base_linear(model.lm_head)  # wrapped: see ``foreign``
    if type(embed) is not nn.Embedding:
        raise LorakitError(f"the input embedding is a {type(embed).__name__}; static decoding needs a plain nn.Embedding")
    if type(lm_head) is not nn.Linear or lm_head.bias is not None:
        raise LorakitError("static decoding needs a plain bias-free nn.Linear output head")
    return ModelParts(
        model_type=model_type, embed=embed, layers=parts, final_norm=inner.norm, lm_head=lm_head,
        rotary=inner.rotary_emb, hidden=config.hidden_size, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate=config.intermediate_size, vocab=lm_head.out_features,
        max_positions=int(getattr(config, "max_position_embeddings", 4096) or 4096), foreign=foreign,
    )


def _check_window(config, model_type: str, max_len: int | None) -> None:
    """Sliding-window attention (Mistral v0.1, Qwen2 with ``use_sliding_window``) runs when no row can outgrow it.

    transformers lets the query at position p attend the keys k with p - window < k <= p. With at most ``max_len``
    tokens per row, p <= max_len - 1, so when ``max_len <= window`` every key from 0 is inside the window and the
    layer is full attention: the decoder's kernels are exact. A longer context would need the window in the kernel.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    sliding = any(t != "full_attention" for t in layer_types) or bool(
        window and (model_type == "mistral" or getattr(config, "use_sliding_window", False)))
    if not sliding:
        return
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        raise LorakitError(f"static decoding runs full and sliding-window attention layers, not {sorted(set(layer_types))}")
    if not window:
        raise LorakitError("this model has sliding-window layers but no sliding_window size in its config")
    if max_len is None or max_len > window:
        given = "" if max_len is None else f", not {max_len}"
        raise LorakitError(f"static decoding runs this sliding-window model (sliding_window={window}) only with at most "
                           f"{window} tokens per sequence, where the window never applies (max_len / --max-context "
                           f"<= {window}{given})")


def _adapter_hosts(model: nn.Module) -> dict:
    from lorakit.inject import adapter_hosts

    return adapter_hosts(model)
