"""Generation shared by ``lorakit generate`` and ``lorakit serve``: prompts, sampling, and a batched KV cache.

Rows of one batch may use different adapters (``lorakit.mixed_batch``) and have different lengths. Prompts are
left-padded, so every row's newest token sits in the last column and one decode step feeds one token per row:

    input_ids / mask   (B, L)   left padding, mask 0 on padding
    KV cache           per layer (B, kv_heads, L, head_dim), same left padding
    positions          (B,)     the next position of each row (its count of real tokens)

``KVBatch`` keeps that layout while rows join (their cache is left-padded to the longer length) and leave (their
rows are dropped and all-padding columns trimmed), which is what the continuous-batching server needs. Padding
never changes a row's result: masked keys get exactly zero attention weight, and padded K/V are zeroed so no
NaN from a fully masked padding query can leak into real rows.

Hybrid models (transformers 5.x: linear attention, Mamba / SSM or convolution layers beside attention, e.g.
Qwen3-Next, LFM2, Nemotron-H, Jamba, and the ones whose attention slides) also hold one state per row and layer,
``(B, ...)`` with no columns: the models zero padded tokens' inputs, so left padding leaves it alone, and rows
joining or leaving take theirs along. ``unsupported(model)`` names what cannot be batched this way.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from lorakit.errors import LorakitError

# Tokens that end an assistant turn in common chat templates (ChatML, Llama 3, Gemma, Phi-3).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; ``top_p < 1`` keeps the smallest nucleus of that mass;
    ``top_k > 0`` samples among the k most likely tokens only. ``stop_token_ids`` end a row (one id or several);
    ``stop`` strings end it too when ``generate`` is given the tokenizer (the text is cut before the match).
    ``repetition_penalty`` (> 0, 1: off) is transformers' (CTRL's): each step, the logit of every token of the
    prompt or of the answer so far is divided by it where positive and multiplied by it otherwise, before
    temperature and top-k / top-p (greedy decoding too). ``generate`` applies it; the server takes a request's
    ``repetition_penalty`` from the request itself."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    top_k: int = 0
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise LorakitError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        for key, low, high, open_low in (("temperature", 0.0, 100.0, False), ("top_p", 0.0, 1.0, True)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:  # value != value: NaN
                raise LorakitError(f"{key} must be a number in {'(' if open_low else '['}{low:g}, {high:g}], got {value!r}")
            if not ((low < value if open_low else low <= value) and value <= high):
                raise LorakitError(f"{key} must be in {'(' if open_low else '['}{low:g}, {high:g}], got {value!r}")
            setattr(self, key, float(value))
        self.max_new_tokens = int(self.max_new_tokens)
        penalty = self.repetition_penalty
        if isinstance(penalty, bool) or not isinstance(penalty, numbers.Real) or not 0 < penalty < float("inf"):
            raise LorakitError(f"repetition_penalty must be a number above 0 (1: off; above 1 discourages repeating "
                               f"the prompt's and the answer's tokens), got {penalty!r}")
        self.repetition_penalty = float(penalty)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise LorakitError(f"top_k must be a non-negative integer (0: off), got {self.top_k!r}")
        self.top_k = int(self.top_k)
        stops = self.stop_token_ids
        if hasattr(stops, "tolist") and not _is_int(stops):  # a torch tensor or numpy array of ids
            stops = stops.tolist()
        stops = (stops,) if _is_int(stops) else stops
        if isinstance(stops, (str, bytes)) or not all(_is_int(t) for t in _iterable(stops)):
            raise LorakitError(f"stop_token_ids must be token ids (ints), got {self.stop_token_ids!r}; for a text, "
                               "use tokenizer.convert_tokens_to_ids(...) or lorakit.generation.end_of_turn_ids(tokenizer)")
        self.stop_token_ids = tuple(int(t) for t in stops)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(t, str) and t for t in stop):
            raise LorakitError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop = tuple(stop)
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise LorakitError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        if self.seed is not None:
            self.seed = int(self.seed)

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return generator


def _is_int(value) -> bool:
    """An integer, numpy's included (a length or id read from an array); not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, torch.Tensor))


def _iterable(value) -> Iterator:
    try:
        return iter(value)
    except TypeError:
        return iter([None])  # not iterable: reported by the caller's check (None is not an int)


# -- prompts -------------------------------------------------------------------------------------------------------
def end_of_turn_ids(tokenizer, model: nn.Module | None = None) -> tuple[int, ...]:
    """Token ids that end a generation: the tokenizer's EOS, the token its chat template ends a turn with (found by
    rendering the template, so an unusual one stops generation too), the common end-of-turn tokens it knows, and
    with ``model`` every id of its ``generation_config.eos_token_id`` (what transformers' generate stops on: Llama
    3.1's ``<|eom_id|>``, GLM-4's ``<|user|>``, which the tokenizer does not call an end)."""
    from lorakit.chat_template import template_end_of_turn

    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in [configured] if _is_int(configured) else configured if isinstance(configured, (list, tuple)) else ():
        if _is_int(token):
            ids.add(int(token))
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    template_eot = template_end_of_turn(tokenizer)
    if template_eot is not None:
        ids.add(int(template_eot))
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            ids.add(vocab[token])
    return tuple(sorted(ids))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt: str | Sequence[dict], chat: bool | None = None,
                  chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a prompt.

    Args:
        prompt: plain text, or chat messages ``[{"role": ..., "content": ...}]``.
        chat: wrap plain text as one user message in the chat template. Default: when the tokenizer has one.
        chat_template_kwargs: options of the chat template (Qwen3: ``{"enable_thinking": False}``); use the ones
            the adapter was trained with (its run's config.yaml).
    """
    if not isinstance(prompt, (str, list, tuple)):
        raise LorakitError(f"a prompt is a string or a list of chat messages ({{'role': ..., 'content': ...}}), got "
                           f"{type(prompt).__name__}")
    if isinstance(prompt, str):
        if chat is None:
            chat = has_chat_template(tokenizer)
        if not chat:
            return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        messages: Sequence[dict] = [{"role": "user", "content": prompt}]
    else:
        messages = prompt
    if not has_chat_template(tokenizer):
        raise LorakitError("this tokenizer has no chat template, so chat messages cannot be formatted; give plain text "
                           "instead (encode_prompt(tokenizer, text, chat=False), /v1/completions, or --no-chat)")
    try:
        # the server's chat requests may set add_generation_prompt (and continue_final_message, documents) here
        kwargs = {"add_generation_prompt": True, **(chat_template_kwargs or {})}
        ids = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=False, **kwargs)
    except Exception as error:  # a template may raise for roles it does not know (jinja's TemplateError and others)
        if type(error).__name__ == "TemplateSyntaxError":  # the template itself is broken, whatever the messages
            where = f"line {getattr(error, 'lineno', '?')}: {getattr(error, 'message', None) or error}"
            raise LorakitError(f"the tokenizer's chat template is not valid Jinja ({where}); fix chat_template.jinja "
                               "(or tokenizer_config.json's chat_template), or send plain text (--no-chat; "
                               "/v1/completions)") from None
        raise LorakitError(f"the chat template refused these messages: {str(error).splitlines()[0]}") from None
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


# -- sampling ------------------------------------------------------------------------------------------------------
def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from ``logits (V,)``: argmax when greedy, else top-k, temperature and nucleus (top-p) sampling."""
    if params.temperature == 0:
        return int(torch.argmax(logits).item())
    logits = logits.float()
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # shift before dividing: the best token scores 0, so a tiny temperature gives -inf elsewhere, never inf - inf = NaN
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep tokens until the mass before them reaches top_p (the first token always stays)
        keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < params.top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


# -- the batched KV cache ------------------------------------------------------------------------------------------
def _cache_kwarg(model: nn.Module) -> str:
    """transformers >= 5.2x names the cache argument ``cache``; earlier versions ``past_key_values``."""
    names = inspect.signature(model.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def _new_cache(model: nn.Module):
    """A cache whose every attention layer keeps all its keys.

    transformers' cache built from the config crops sliding-window layers to their last window - 1 columns, which
    breaks the equal-width rows that left padding, ``extend`` and ``keep`` rely on (prompts of different lengths past
    the window failed); the attention mask applies the window either way (from ``config.sliding_window``), so the
    logits are the same. Pure attention models get a plain cache. Models with other layer kinds (linear attention,
    Mamba / SSM, short convolutions: ``linear_attention``, ``conv``, ``hybrid``, ... on transformers 5.x) hold states
    only the config-built cache creates, so they get that one with each cropping window layer swapped for its
    uncropped twin: a sliding attention layer for a full one, a sliding hybrid (state + window) for a full hybrid.
    """
    import sys

    from transformers import DynamicCache

    reason = unsupported(model)
    if reason is not None:
        raise LorakitError(reason)
    config = getattr(model, "config", None)
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    own = _OWN_CACHES.get(getattr(text, "model_type", None))
    if own is not None:  # the model refuses any other cache class; its layers all keep every column
        return getattr(sys.modules[type(model).__module__], own)()
    if not set(getattr(text, "layer_types", None) or ()) - {"full_attention", "sliding_attention", "chunked_attention"}:
        return DynamicCache()
    cache = DynamicCache(config=config)
    for index, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False):
            cache.layers[index] = _uncropped(layer)
    return cache


# model_type -> the cache class (in the model's own module) its forward insists on. MiniMax keeps its lightning
# attention states in ``linear_cache``, a list of (B, heads, d, d) tensors (``KVBatch._states`` moves them with rows).
_OWN_CACHES = {"minimax": "MiniMaxCache"}

# model_type -> why its forward cannot take lorakit's decode step (the new token, the whole rows' mask, per-row
# positions): each failed inside transformers (a shape mismatch or an assert, a traceback) on the first step
_OWN_DECODE_LOOP = {
    # XLMModel.forward takes the whole sequence each step and cuts the cached part off itself (its mask must be
    # (batch, whole length) for the ids it is given)
    "xlm": "its forward takes the whole sequence at every step and drops the cached part itself",
    # CPM-Ant puts prompt_length learned tokens before every input, so its cache is longer than the rows it holds
    "cpmant": "it puts its prompt_length learned tokens before every input, so its cache is longer than the rows",
    # ProphetNet's decoder refuses position ids other than 0..n-1, so no row can be left-padded
    "prophetnet": "its decoder takes positions 0..n-1 only, so rows of different lengths cannot be left-padded",
}


def unsupported(model: nn.Module) -> str | None:
    """Why lorakit's batched generation cannot run ``model`` (one line naming the family and what to use), or None.

    RecurrentGemma keeps its recurrent and convolution states in attributes of its layers, not in the cache, and
    resets them whenever the batch size changes: rows joining or leaving a batch would silently lose their state.
    Dory's ``recurrent_kv_cache_mode="last_loop"`` has its earlier loops read the cache cut to the sliding window,
    which does not line up with a cache that keeps whole rows (needed for rows of different lengths).
    """
    config = getattr(model, "config", None)
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    model_type = getattr(text, "model_type", None)
    takes = inspect.signature(type(model).forward).parameters  # (the class's: use_fast_kernels wraps the instance's)
    own = _own_cache_class(model)
    if own is not None and "cache_params" in takes:
        # Mamba, Mamba2, FalconMamba on transformers 4.x: their state goes in as cache_params (a MambaCache), which
        # the "no KV cache" refusal below called them, as if no transformers version could work; 5.x takes `cache`
        return _needs_transformers_5(model, own)
    if "cache" not in takes and "past_key_values" not in takes:
        # RWKV takes its recurrent state as `state`, OpenAI GPT no cache at all: the cache lorakit passed went into
        # **kwargs unread, each decode step saw only its one new token, and every token after the first was
        # silently not the model's
        own = [name for name in ("state", "mems", "past_buckets_states") if name in takes]
        held = f"carries its state in {' / '.join(map(repr, own))}" if own else "takes no KV cache"
        return (f"lorakit's generation does not support {type(model).__name__}: its forward {held}, not a "
                "transformers cache; generate with transformers' model.generate instead")
    if model_type == "recurrent_gemma":
        return ("lorakit's generation does not support RecurrentGemma (it keeps its recurrent state inside its "
                "layers, so batched rows would lose it); generate with transformers' model.generate instead")
    if model_type in _OWN_DECODE_LOOP:
        return (f"lorakit's generation does not support {type(model).__name__}: {_OWN_DECODE_LOOP[model_type]}; "
                "generate with transformers' model.generate, one prompt at a time")
    if "position_ids" not in takes and any(name.endswith("embed_positions") for name, _ in model.named_modules()):
        # BART / mBART / Pegasus / Marian / Blenderbot / TrOCR decoders number positions from the cache's length, not
        # from position_ids or the mask: a row left-padded beside a longer one (or joining a running batch) was
        # read at shifted positions, so its answer depended on the batch it ran in (ALiBi models, Bloom and MPT, take
        # their positions from the mask and are fine)
        return (f"lorakit's generation does not support {type(model).__name__}: it numbers positions from the cache's "
                "length (its forward takes no position_ids), so rows of different lengths side by side would be read "
                "at shifted positions; generate with transformers' model.generate, one prompt at a time")
    if (model_type == "dory" and getattr(text, "recurrent_kv_cache_mode", None) == "last_loop"
            and "sliding_attention" in (getattr(text, "layer_types", None) or ())):
        return ("lorakit's generation does not support Dory with recurrent_kv_cache_mode='last_loop' and sliding "
                "layers; load it with recurrent_kv_cache_mode='per_loop' (the default) or use transformers' "
                "model.generate")
    attention_only = set(getattr(text, "layer_types", None) or ["?"]) <= {"full_attention", "sliding_attention",
                                                                           "chunked_attention"}
    if own is not None and model_type not in _OWN_CACHES and not attention_only:  # an LFM2 of attention layers only: fine
        return _needs_transformers_5(model, own)
    return None


def _needs_transformers_5(model: nn.Module, own: str) -> str:
    """The one-line refusal for a model whose state transformers 4.x keeps in its own cache class ``own``
    (MambaCache, HybridMambaAttentionDynamicCache, ...): lorakit generates it on transformers >= 5, which keeps that
    state in the standard cache. Names the installed version and the command that fixes it."""
    import transformers

    return (f"lorakit's generation does not support {type(model).__name__} on transformers "
            f"{transformers.__version__}: it keeps its state in its own {own}, and lorakit generates it only on "
            "transformers >= 5 (where that state lives in the standard cache); upgrade to transformers 5 with "
            "pip install -U \"transformers>=5\", or generate with transformers' model.generate")


def _own_cache_class(model: nn.Module) -> str | None:
    """On transformers 4.x, the name of the cache class a Mamba / hybrid model defines for its states (MambaCache,
    HybridMambaAttentionDynamicCache, Lfm2HybridConvCache, ...): such a model ignores or breaks on the plain cache
    lorakit passes (Mamba generated wrong tokens after the first). 5.x moved those states into the standard cache."""
    import sys

    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return None
    module = sys.modules.get(type(model).__module__)
    for name, value in sorted(vars(module).items() if module is not None else ()):
        if isinstance(value, type) and name.endswith("Cache") and value.__module__ == module.__name__:
            return name
    return None


def _attention_free(cache) -> bool:
    """Whether every layer of ``cache`` holds a recurrent state and none holds keys (Mamba, Mamba2, FalconMamba)."""
    from transformers import cache_utils

    layers = getattr(cache, "layers", None)
    linear = getattr(cache_utils, "LinearAttentionCacheLayerMixin", None)
    attention = getattr(cache_utils, "CacheLayerMixin", None)
    return bool(layers) and linear is not None and all(
        isinstance(layer, linear) and not (attention and isinstance(layer, attention)) for layer in layers)


def _uncropped(layer):
    """The full-length layer of the same kind as the sliding window cache ``layer`` (still empty)."""
    from transformers import cache_utils

    if isinstance(layer, getattr(cache_utils, "LinearAttentionCacheLayerMixin", ())):
        return cache_utils.LinearAttentionAndFullAttentionLayer(number_of_states=layer.number_of_states)
    if type(layer) is cache_utils.DynamicSlidingWindowLayer:
        return cache_utils.DynamicLayer()
    raise LorakitError(f"lorakit's generation does not know the cache layer {type(layer).__name__} of this model "
                       f"({type(layer).__module__}); generate with transformers' model.generate instead")


@dataclass
class KVBatch:
    """Rows of running sequences: their KV cache, padding mask ``(B, L)`` and next positions ``(B,)``."""

    cache: object
    mask: torch.Tensor
    positions: torch.Tensor
    layers: list = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def _kv_layers(self):
        """The layers holding keys and values (not a layer without attention: transformers' ``DummyLayer`` for a
        Mamba or MLP-only block holds None). transformers 4.56's layers have no ``is_initialized``: an empty one holds
        None there, which the tensor check leaves out."""
        return [layer for layer in self.cache.layers if getattr(layer, "is_initialized", True)
                and isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.numel()]

    def _states(self) -> list[tuple[dict, int]]:
        """Where the per-row states of linear-attention / SSM / convolution layers live: ``(dict, key)`` pairs of
        their ``conv_states`` and ``recurrent_states`` tensors, each ``(B, ...)``. A state has no columns, so left
        padding leaves it alone; rows joining and leaving must take theirs along."""
        found = []
        linear_cache = getattr(self.cache, "linear_cache", None)  # MiniMax's own cache: one entry per layer
        if isinstance(linear_cache, list):
            found.extend((linear_cache, i) for i, value in enumerate(linear_cache) if isinstance(value, torch.Tensor))
        for layer in self.cache.layers:
            for states in (getattr(layer, "conv_states", None), getattr(layer, "recurrent_states", None)):
                if isinstance(states, dict):
                    found.extend((states, key) for key, value in states.items() if isinstance(value, torch.Tensor))
        return found

    def _columns(self) -> list[tuple[object, str, int, int]]:
        """Every cached tensor with a column per token, as ``(owner, attribute, batch dim, column dim)``: the keys
        and values ``(B, heads, L, d)``, and a sparse-attention layer's indexer keys ``(B, L, d)`` and indexer
        positions ``(P, B, L)`` (transformers' ``DynamicIndexedLayer``: DeepSeek-V3.2, GLM-MoE-DSA)."""
        found = []
        for layer in self._kv_layers():
            found += [(layer, "keys", 0, 2), (layer, "values", 0, 2)]
            if isinstance(getattr(layer, "indexer_keys", None), torch.Tensor) and layer.indexer_keys.numel():
                found.append((layer, "indexer_keys", 0, 1))
            if isinstance(getattr(layer, "indexer_position_ids", None), torch.Tensor):
                found.append((layer, "indexer_position_ids", 1, 2))
        return found

    def left_pad(self, length: int) -> None:
        """Grow to ``length`` columns by adding zero K/V and mask 0 on the left."""
        extra = length - self.length
        if extra <= 0:
            return
        for owner, name, _, column in self._columns():
            tensor = getattr(owner, name)
            shape = list(tensor.shape)
            shape[column] = extra
            setattr(owner, name, torch.cat([tensor.new_zeros(shape), tensor], dim=column))
        self.mask = torch.cat([self.mask.new_zeros(self.rows, extra), self.mask], dim=1)

    def extend(self, other: "KVBatch") -> None:
        """Append ``other``'s rows (both are left-padded to the longer length first)."""
        length = max(self.length, other.length)
        self.left_pad(length)
        other.left_pad(length)
        for (mine, name, batch, _), (theirs, _, _, _) in zip(self._columns(), other._columns()):
            setattr(mine, name, torch.cat([getattr(mine, name), getattr(theirs, name)], dim=batch))
        for (mine, key), (theirs, _) in zip(self._states(), other._states()):
            mine[key] = torch.cat([mine[key], theirs[key]], dim=0)
        self.mask = torch.cat([self.mask, other.mask], dim=0)
        self.positions = torch.cat([self.positions, other.positions], dim=0)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order), then drop columns that are padding in every remaining row."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0].item()) if used.numel() else self.length
        self.mask = self.mask[:, start:]
        for owner, name, batch, column in self._columns():
            tensor = getattr(owner, name).index_select(batch, index)
            setattr(owner, name, tensor.narrow(column, start, tensor.shape[column] - start))
        for states, key in self._states():
            states[key] = states[key].index_select(0, index)

    def zero_padding(self) -> None:
        """Zero the K/V at padding columns (a fully masked padding query may produce NaN; keep it out)."""
        pad = self.mask == 0
        if not pad.any():
            return
        for owner, name, batch, column in self._columns():
            tensor = getattr(owner, name)
            if name == "indexer_position_ids":
                continue  # positions, not values: what a padding column holds is never read
            shape = [1] * tensor.dim()
            shape[batch], shape[column] = pad.shape
            setattr(owner, name, tensor.masked_fill(pad.view(shape), 0))


@contextlib.contextmanager
def _routing(model: nn.Module, adapters: Sequence[str | None]) -> Iterator[None]:
    """Route row i through ``adapters[i]``. When every row uses the same adapter (or none), that adapter is simply
    made the only active one for the call: the plain (fused) adapter path, no per-row routing."""
    from lorakit.adapters import disable_adapters, mixed_batch
    from lorakit.inject import adapter_hosts, adapter_names

    names = list(adapters)
    hosts = adapter_hosts(model)
    merged = any(getattr(h, "merged", None) for h in hosts.values())
    if merged:  # a merged adapter cannot be turned off for a row, nor another one run beside it
        raise LorakitError("each row runs through its adapter (or the base alone), which needs unmerged adapters; call "
                           "lorakit.unmerge(model) first, or generate from the merged model with model.generate")
    if len(set(names)) != 1 or not hosts:
        with mixed_batch(model, names):
            yield
        return
    if names[0] is None:
        with disable_adapters(model):
            yield
        return
    known = adapter_names(model)
    if names[0] not in known:
        raise LorakitError(f"unknown adapter {names[0]!r}; this model has: {', '.join(known) or '(no adapters)'}")
    previous = {path: (list(h.active), h.disabled) for path, h in hosts.items()}
    for host in hosts.values():
        host.set_active([names[0]])
        host.disabled = False
    try:
        yield
    finally:
        for path, host in hosts.items():
            host.active, host.disabled = previous[path]


def _attention_backends(device: torch.device):
    """On CUDA, keep sdpa off the cuDNN backend: the KV length grows by one every decode step, and cuDNN builds a new
    graph for every new shape (a 30-layer step on an H200 machine: 62 ms of host time without it, 83-108 ms with it;
    bench/results/decode_step_profile_h200_smol.json). Flash, memory-efficient and math kernels stay allowed."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's class names ``logits_to_keep`` (only those rows of logits are computed). transformers 5.x's
    causal LMs all do; in 4.x Bloom, GPT-J, GPT-Neo, OPT, CodeGen, MPT, Mamba, ... do not (Bloom refuses it), and
    they return every position's logits, which callers slice. The class, not the instance: ``lorakit.fast`` wraps
    the instance's forward in a ``(*args, **kwargs)`` function that passes it on."""
    try:
        return "logits_to_keep" in inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):  # no signature to read: compute all logits, always right
        return False


def _forward(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
             adapters: Sequence[str | None]) -> torch.Tensor:
    """Run the model once; returns the logits of the last column, ``(B, V)`` float32."""
    kwargs = {_cache_kwarg(model): cache}
    if takes_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1
    if _attention_free(cache):
        # Mamba / Mamba2 / FalconMamba multiply each fed token's hidden state by its mask column (zeroing padding):
        # they take the mask of the tokens fed, (B, q), not the (B, L) attention mask over the whole cache
        mask = mask[:, -input_ids.shape[1]:]
    with torch.inference_mode(), _routing(model, adapters), _attention_backends(input_ids.device):
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
    return out.logits[:, -1, :].float()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_prompts(prompts) -> None:
    """Refuse what is not a batch of token-id lists, with the fix (a common slip: one prompt, or text)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) and not isinstance(prompts, torch.Tensor):
        raise LorakitError("prompts must be a list of prompts, each a list of token ids; encode text with "
                           "lorakit.generation.encode_prompt(tokenizer, text)")
    if len(prompts) == 0:
        raise LorakitError("no prompts to generate from; give a list of token-id lists")
    for row, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)):
            raise LorakitError(f"prompt {row} is text; give token ids: lorakit.generation.encode_prompt(tokenizer, text)")
        if isinstance(prompt, int) or isinstance(prompt, torch.Tensor) and prompt.dim() == 0:
            raise LorakitError("prompts must be a list of prompts, each a list of token ids; wrap a single prompt in a "
                               "list: [ids]")
        if len(prompt) == 0:
            raise LorakitError(f"cannot generate from an empty prompt (prompt {row}); give at least one token (a "
                               "tokenizer without a BOS token encodes empty text to none)")
        integral = (not prompt.is_floating_point() and not prompt.is_complex() if isinstance(prompt, torch.Tensor)
                    else all(hasattr(t, "__index__") and not isinstance(t, torch.Tensor) or
                             isinstance(t, torch.Tensor) and not t.is_floating_point() for t in prompt))
        if not integral:
            raise LorakitError(f"prompt {row} is not a list of token ids (ints): {list(prompt)[:4]!r}...; encode text "
                               "with lorakit.generation.encode_prompt(tokenizer, text)")


def _vocab_size(model: nn.Module) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None)


def prefill(model: nn.Module, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None],
            pad_id: int | None = 0) -> tuple[torch.Tensor, KVBatch]:
    """Run new prompts (left-padded into one batch, row i through adapter ``adapters[i]``).

    ``pad_id`` fills the padding, which is masked, so any id of the vocabulary gives the same result; None (a
    tokenizer without a pad token) pads with 0.

    Returns the next-token logits ``(n, V)`` and the rows' ``KVBatch``.
    """
    _check_prompts(prompts)
    vocab = _vocab_size(model)
    for row, prompt in enumerate(prompts):  # in Python, before any tensor: no device sync in the server's prefill
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt
        low, high = min(ids), max(ids)
        if low < 0 or (vocab is not None and high >= vocab):
            raise LorakitError(f"prompt {row} holds token id {low if low < 0 else high}, outside this model's "
                               f"vocabulary [0, {vocab}); encode prompts with this model's tokenizer")
    device = model_device(model)
    length = max(len(p) for p in prompts)
    pad_id = 0 if pad_id is None else pad_id
    if any(len(p) < length for p in prompts) and (not _is_int(pad_id) or not 0 <= pad_id < (vocab or pad_id + 1)):
        # padding is masked, yet its id still goes through the embedding (IndexError outside the vocabulary)
        raise LorakitError(f"pad_id {pad_id} is outside this model's vocabulary [0, {vocab}); pass any id in it (the "
                           "padding is masked, so which one does not matter), e.g. pad_id=0")
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), length), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        try:
            input_ids[row, length - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long, device=device)
        except (TypeError, ValueError, RuntimeError):
            raise LorakitError(f"prompt {row} is not a list of token ids (ints): {list(prompt)[:4]!r}...") from None
        mask[row, length - len(prompt):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # real tokens count from 0; padding's position is unused
    cache = _new_cache(model)
    logits = _forward(model, input_ids, mask, positions, cache, adapters)
    batch = KVBatch(cache, mask, mask.sum(dim=1))
    batch.zero_padding()
    return logits, batch


def decode(model: nn.Module, batch: KVBatch, tokens: Sequence[int], adapters: Sequence[str | None]) -> torch.Tensor:
    """Feed one token per row (the rows' newest tokens); returns the next-token logits ``(B, V)``."""
    device = batch.mask.device
    input_ids = torch.tensor(list(tokens), dtype=torch.long, device=device).unsqueeze(1)  # (B, 1)
    batch.mask = torch.cat([batch.mask, batch.mask.new_ones(batch.rows, 1)], dim=1)
    logits = _forward(model, input_ids, batch.mask, batch.positions.unsqueeze(1), batch.cache, adapters)
    batch.positions = batch.positions + 1
    return logits


# -- offline generation --------------------------------------------------------------------------------------------
@dataclass
class Generation:
    """One finished row: the new token ids, why it stopped (``"stop"`` or ``"length"``), if asked the logits, and
    with a tokenizer the decoded text (cut before a matched stop string; the tokens keep the whole match)."""

    tokens: list[int]
    finish_reason: str
    logits: list[torch.Tensor] = field(default_factory=list)
    text: str | None = None


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None],
             params: SamplingParams | Sequence[SamplingParams], pad_id: int | None = 0,
             keep_logits: bool = False, tokenizer=None) -> list[Generation]:
    """Generate for several prompts at once, row i through ``adapters[i]``, with one KV cache.

    Finished rows leave the batch, so every step only computes rows still running.

    Args:
        prompts: token ids per row.
        adapters: adapter name per row (None: the base model).
        params: one ``SamplingParams`` for all rows or one per row.
        pad_id: the id written at padding (masked: any id of the vocabulary; None, as a tokenizer without a pad
            token gives it, pads with 0).
        keep_logits: keep each step's next-token logits ``(V,)`` per row (for tests and log-probabilities).
        tokenizer: decode each row into ``Generation.text``; needed for ``stop`` strings.
    """
    _check_prompts(prompts)
    if isinstance(adapters, str) or adapters is None:
        raise LorakitError(f"adapters must be a list with one adapter name (or None) per prompt, got {adapters!r}; "
                           f"e.g. [{adapters!r}] * {len(prompts)}")
    if len(adapters) != len(prompts):
        raise LorakitError(f"{len(prompts)} prompts but {len(adapters)} adapter names; give one per prompt")
    per_row = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(per_row) != len(prompts) or not all(isinstance(p, SamplingParams) for p in per_row):
        raise LorakitError(f"params must be one SamplingParams or a list of {len(prompts)} (one per prompt), got "
                           f"{len(per_row)} item(s) of type {type(per_row[0]).__name__ if per_row else 'none'}")
    if tokenizer is None and any(p.stop for p in per_row):
        raise LorakitError("stop strings need the tokenizer to read the text: generate(..., tokenizer=tokenizer)")
    from lorakit.models.loading import context_length

    limit = context_length(model)
    for row, (prompt, param) in enumerate(zip(prompts, per_row)):
        if limit is not None and len(prompt) + param.max_new_tokens > limit:  # learned positions fail past it
            raise LorakitError(f"prompt {row} is {len(prompt)} tokens and max_new_tokens is {param.max_new_tokens}: "
                               f"more than the model's context of {limit} positions; shorten the prompt or lower "
                               "max_new_tokens")
    if model.training:
        warnings.warn("generating with the model in training mode: dropout makes the answers random; call "
                      "model.eval() first", UserWarning, stacklevel=2)
    device = model_device(model)
    generators = [p.generator(device) for p in per_row]
    results = [Generation([], "length") for _ in prompts]
    logits, batch = prefill(model, prompts, adapters, pad_id)
    # the repetition penalty's rows: which tokens each has seen (its prompt's, then its answer's), as the server
    # keeps them (lorakit.serve.sampling: new_history, penalize_rows), so both penalise alike
    seen = {}
    if any(p.repetition_penalty != 1.0 for p in per_row):
        from lorakit.serve.sampling import new_history

        seen = {row: new_history([int(t) for t in prompts[row]], [], logits.shape[-1], logits.device)
                for row, p in enumerate(per_row) if p.repetition_penalty != 1.0}
    running = list(range(len(prompts)))
    step = 0
    while running:
        _check_finite(model, logits, step)
        step += 1
        still, last = [], []
        for slot, row in enumerate(running):
            if keep_logits:  # the model's own logits (before any repetition penalty)
                results[row].logits.append(logits[slot].cpu())
            row_logits = logits[slot] if row not in seen else _penalized(logits[slot], seen[row], per_row[row])
            token = sample(row_logits, per_row[row], generators[row])
            results[row].tokens.append(token)
            if row in seen:
                seen[row][token] += 1
            if token in per_row[row].stop_token_ids or _stopped(results[row], per_row[row], tokenizer):
                results[row].finish_reason = "stop"
            elif len(results[row].tokens) < per_row[row].max_new_tokens:
                still.append(slot)
                last.append(token)
        if not still:
            break
        if len(still) < len(running):
            batch.keep(still)
            running = [running[s] for s in still]
        logits = decode(model, batch, last, [adapters[r] for r in running])
    if tokenizer is not None:
        for result, param in zip(results, per_row):
            result.text = cut_at_stop(tokenizer.decode(result.tokens, skip_special_tokens=True), param.stop)
    return results


def _check_finite(model: nn.Module, logits: torch.Tensor, step: int) -> None:
    """Refuse next-token logits ``(rows, V)`` holding NaN or +inf: argmax then picks an arbitrary token (often an end
    of turn), and a float16 model whose activations overflow answered with an empty text and success. -inf is left
    alone (a model may mask tokens out). One small device sync per step, beside the token's own."""
    if not bool((torch.isnan(logits) | torch.isposinf(logits)).any()):
        return
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    why = ("float16 overflows in this model's activations or weights; load it in bfloat16 or float32 (--dtype bf16 "
           "or fp32)" if dtype == torch.float16 else "the weights or an adapter hold non-finite values, or the "
           "computation overflowed; check the adapter (lorakit inspect) or load the model in float32 (--dtype fp32)")
    raise LorakitError(f"the model's next-token logits are not finite (NaN or inf) at step {step} of generation: {why}")


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` cut before the earliest of the ``stop`` strings it holds (OpenAI's ``stop``), else whole."""
    cuts = [text.find(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


def _penalized(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row's logits ``(V,)`` with ``params.repetition_penalty`` on the tokens ``seen`` (a history row of
    :func:`lorakit.serve.sampling.new_history`), by the server's own function; a new tensor."""
    from lorakit.serve.sampling import penalize_rows

    penalties = torch.tensor([[params.repetition_penalty, 0.0, 0.0]], dtype=torch.float32, device=logits.device)
    return penalize_rows(logits.float().unsqueeze(0).clone(), seen.unsqueeze(0), penalties)[0]


def _stopped(result: Generation, params: SamplingParams, tokenizer) -> bool:
    """Whether the row's text now holds one of its stop strings (only the tail that the newest token can complete
    is decoded: each step costs the same however long the row is). A character is up to 4 UTF-8 bytes, and a
    byte-level tokenizer may spend a token on each: the tail holds 4 tokens per character of the longest string.
    Special tokens are kept in it, as transformers' ``stop_strings`` sees them: ``stop="<|im_end|>"`` stops there."""
    if not params.stop:
        return False
    longest = max(len(stop) for stop in params.stop)
    tail = tokenizer.decode(result.tokens[-(4 * longest + 8):], skip_special_tokens=False)
    return any(stop in tail for stop in params.stop)
