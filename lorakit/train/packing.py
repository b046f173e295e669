"""Packed rows on sliding-window models (Mistral, Gemma 2/3, Qwen2 with use_sliding_window, Phi-3 with a window).

A packed batch carries an explicit (B, 1, T, T) block-causal mask (``lorakit.train.batches.block_causal_mask``), and
transformers uses a 4D mask as given: the sliding window the model applies to a 2D mask is then lost, so a packed
example longer than the window trained its sliding layers on more context than they ever see at inference
(measured: Gemma 2 with a window of 8, two examples of 20 and 18 tokens, logits off by 0.28 from each example
run alone). :func:`window_packed_masks` puts the window back with a forward pre-hook on the decoder:

- one attention kind (Mistral: every layer slides): the 4D mask loses keys ``window`` or more positions back;
- mixed kinds (``config.layer_types``, Gemma 2/3): the decoder gets ``{"full_attention": mask,
  "sliding_attention": windowed}``, the per-kind mapping transformers 5 decoders accept in place of a mask.

Positions restart at 0 for every packed example and the block mask already keeps examples apart, so "``window``
positions back in the row" is the same as "``window`` positions back in the example". Layer kinds no mask can
confine (linear attention, state-space layers) make packing refuse in one line, and so does
:func:`check_packed_rows`, which runs the model once on two packed rows before training for the cases no config
field tells (ALiBi models that fail on a 4D mask, layers that carry state along the row).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError

_MASKED_KINDS = {"full_attention", "sliding_attention"}


def sliding_window_layout(model: nn.Module) -> tuple[int, bool] | None:
    """``(window, per_kind)`` when some attention layers slide, else None.

    ``per_kind`` is True when the config lists ``layer_types`` (the decoder then takes a mask per kind).
    Raises LorakitError for layer kinds a packed attention mask cannot keep from reading across examples.
    """
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    config = get_text() if callable(get_text) else config
    if config is None:
        return None
    kinds = getattr(config, "layer_types", None)
    if kinds:
        unknown = sorted(set(kinds) - _MASKED_KINDS)
        if unknown:
            raise LorakitError(f"--pack: this {getattr(config, 'model_type', 'model')} model has {', '.join(unknown)} "
                               "layers, which an attention mask cannot keep from reading across packed examples; "
                               "train without --pack")
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    if kinds:
        return (window, True) if "sliding_attention" in kinds else None
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2-style flag with no layer_types
        return None
    return window, False


def _decoder(model: nn.Module) -> nn.Module:
    """The module that turns ``attention_mask`` into per-layer masks (lorakit's loss calls it directly)."""
    # transformers 4.x's Gemma3ForCausalLM names base_model_prefix "language_model" but keeps its decoder in .model
    for name in (getattr(model, "base_model_prefix", "") or "model", "model"):
        decoder = getattr(model, name, None)
        if isinstance(decoder, nn.Module):
            return decoder
    return model


def window_packed_masks(model: nn.Module):
    """Install the pre-hook (see the module docstring) when the model has sliding layers; returns its handle (call
    ``.remove()`` after training) or None when nothing is needed. 2D masks (unpacked batches, generation) pass
    through untouched."""
    layout = sliding_window_layout(model)
    if layout is None:
        return None
    window, per_kind = layout
    decoder = _decoder(model)
    if per_kind and "attention_mask, dict)" not in _forward_source(type(decoder)):
        raise LorakitError(f"--pack: {type(decoder).__name__} mixes sliding-window and full attention layers but "
                           "takes no mask per layer kind, so packed rows would lose the window; train without --pack")

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        mask = kwargs.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.is_floating_point()):
            return None
        length = mask.shape[-1]
        windowed = mask
        if length > window:  # keys `window` or more positions back are out of reach (transformers' sliding rule)
            far = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril(-window)
            windowed = mask.masked_fill(far, torch.finfo(mask.dtype).min)
        kwargs["attention_mask"] = {"full_attention": mask, "sliding_attention": windowed} if per_kind else windowed
        return args, kwargs

    return decoder.register_forward_pre_hook(hook, with_kwargs=True)


def check_packed_rows(model: nn.Module, collator, device: torch.device, compute_dtype: torch.dtype | None) -> None:
    """Refuse ``--pack`` in one line where packed examples would not stay apart, found by running the model.

    Config flags do not tell every case: ALiBi models (Bloom, Falcon with alibi) fail on a 4D mask, state-space
    layers (Mamba, Jamba) carry one example into the next whatever the mask. Two packed rows that differ only in
    their first example are run in one forward (eval mode, no gradients; call it with the window hook installed):
    the second example's logits must come out the same in both rows, up to a few units of rounding. A crash of
    that forward is reported the same way."""
    from lorakit.train.evaluate import autocast_context, to_device

    vocab = model.get_input_embeddings().num_embeddings
    first, other, second = ([(4 + i * 7 + k) % vocab for k in range(n)] for i, n in enumerate((5, 5, 6)))
    rows = [{"input_ids": a + second, "labels": a + second, "position_ids": list(range(len(a))) + list(range(len(second))),
             "seq_lens": [len(a), len(second)]} for a in (first, other)]  # the layout pack_examples gives a row
    batch = to_device({k: v for k, v in collator(rows).items() if k != "labels"}, device)
    name = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_context(device, compute_dtype):
            logits = model(**batch, use_cache=False).logits.float()
    except Exception as error:  # the model cannot take a packed row at all
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise LorakitError(f"--pack: {name} cannot run packed rows ({type(error).__name__}: {reason[:160]}); train "
                           "without --pack") from None
    finally:
        model.train(was_training)
    tail = slice(len(first), len(first) + len(second))  # the example both rows share, packed second
    seen, again = logits[0, tail], logits[1, tail]
    # same kernels, same shapes: equal up to rounding noise (a MoE's atomic adds on CUDA are not ordered); state
    # carried across the row moves them far more
    eps = torch.finfo(compute_dtype or next(model.parameters()).dtype).eps
    if (seen - again).abs().max() > max(8 * eps, 1e-4) * max(float(seen.abs().max()), 1.0):
        raise LorakitError(f"--pack: in {name}, one packed example changes the next one's outputs (its layers carry "
                           "state across the row whatever the attention mask: recurrent / state-space layers); train "
                           "without --pack")


def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""
