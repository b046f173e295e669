"""Hugging Face TRL (``SFTTrainer``, ``DPOTrainer``, ...) with a lorakit-injected model.

What already works through ``lorakit.hf_trainer`` (TRL's trainers are transformers' ``Trainer``): adapter-only
checkpoints and ``save_model``, resume, and gradient checkpointing (transformers 5 turns on input gradients for any
``input_ids`` model, so a frozen base still passes gradients to the adapters). Two things TRL does only for a
``peft.PeftModel``, which a lorakit model is not, are covered here:

- TRL computes log-probabilities from ``lm_head.weight`` directly (``trl.trainer.utils.add_fused_lm_head``: every
  forward of its trainers passes ``fused_lm_head=True``), so an adapter on the output head never runs: a LoRA on
  ``lm_head`` would stay at its initial value for the whole run without a word (TRL refuses it for PEFT), and a
  ``modules_to_save`` copy of the head has no ``.weight`` for TRL to read (AttributeError). ``check_fused_head``,
  a forward pre-hook that ``lorakit.hf_trainer.install`` puts on every injected transformers model, turns both into
  one line naming the fix, before any step is taken.
- ``DPOTrainer`` (TRL 1.16; its other trainers with a reference model do the same) without ``ref_model`` takes
  the reference from the adapter-disabled ``PeftModel``; for any other model it loads the base a second time from
  ``config._name_or_path`` (twice the memory, a hub download; an ``OSError`` for a model built in memory).
  ``reference_model(model)`` is that reference without a copy: the same weights, run with the adapters disabled.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorakit.errors import LorakitError


def check_fused_head(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook (``with_kwargs=True``): refuse a TRL fused-head forward whose output head holds an adapter.

    Costs one dict lookup on an ordinary forward; only TRL passes ``fused_lm_head``.

    Raises:
        LorakitError: the output head has a LoRA adapter (enabled) or a ``modules_to_save`` copy.
    """
    if not kwargs.get("fused_lm_head"):
        return None
    from lorakit.layers import LoraLayer, ModulesToSave

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, LoraLayer) and head.adapter_names() and not head.disabled:
        raise LorakitError("TRL computes log-probabilities from lm_head.weight directly, so the LoRA adapter on "
                           "lm_head would never be trained: inject a LoraConfig whose target_modules leave out "
                           "lm_head (\"all-linear\" does)")
    if isinstance(head, ModulesToSave) and not hasattr(head, "weight"):
        raise LorakitError("TRL computes log-probabilities from lm_head.weight directly and cannot read the "
                           "modules_to_save copy of lm_head: leave lm_head out of modules_to_save with TRL's trainers, "
                           "or train with transformers' Trainer")
    return None


def install_fused_head_check(model: nn.Module) -> None:
    """Register ``check_fused_head`` on ``model`` once (a module-level function: the model still pickles)."""
    hooks = getattr(model, "_forward_pre_hooks", {})
    if any(hook is check_fused_head for hook in hooks.values()):
        return
    model.register_forward_pre_hook(check_fused_head, with_kwargs=True)


class AdaptersDisabled(nn.Module):
    """``model`` with its lorakit adapters switched off during each call: the frozen base, sharing its weights.

    The model is held, not registered as a submodule, so ``.eval()``, ``.to()``, ``.parameters()`` and dropout
    changes on this object (what TRL does to a reference model) never reach the model being trained. Any other
    attribute (``config``, ``base_model``, ``get_output_embeddings``, ``dtype``, ``device``) is the model's: TRL's
    fused head reads those and calls ``base_model`` directly, which runs inside the disabled block of ``__call__``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule (see the class docstring)

    def __call__(self, *args, **kwargs):
        from lorakit.adapters import disable_adapters

        with disable_adapters(self.model):
            return super().__call__(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def base_model(self) -> nn.Module:
        return self.model.base_model

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        """The tensors the reference computes with: the model's, without its adapters (lorakit's internal names).

        TRL keys its cache of precomputed reference log-probabilities (``precompute_ref_log_probs=True``) on a hash
        of the reference's ``state_dict``: an empty one (nothing is registered here) would give every base the same
        key, and a later run on another base would reuse the stale file.
        """
        from lorakit.inject import adapter_hosts

        tensors = self.model.state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        hosts = adapter_hosts(self.model)
        owned = tuple(f"{prefix}{path}.{part}." for path in hosts for part in ("adapters", "copies"))
        return {key: value for key, value in tensors.items() if not key.startswith(owned)}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "model" not in self.__dict__:  # copy / pickle probe before __init__ ran
                raise
            return getattr(self.__dict__["model"], name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"


def reference_model(model: nn.Module) -> AdaptersDisabled:
    """The reference for TRL's ``DPOTrainer(ref_model=...)`` (tested; its other trainers that take a ``ref_model``
    call it the same way): ``model`` with its adapters disabled, no second copy of the base in memory, which is what
    TRL does for a ``PeftModel`` without ``ref_model``.

    Example::

        lorakit.inject(model, lorakit.LoraConfig(r=16))
        DPOTrainer(model=model, ref_model=reference_model(model), args=DPOConfig(...), ...)

    Valid while the adapters are not merged (``disable_adapters`` refuses merged ones); tested on one process and
    on 2 under torchrun (DDP; the same losses, margins and adapters as one process). DeepSpeed / FSDP would prepare
    the reference as a second engine over the same weights: give those a separate reference model.

    Raises:
        LorakitError: ``model`` has no lorakit adapters (the base itself is already the reference: pass a copy).
    """
    from lorakit.inject import adapter_names

    if isinstance(model, AdaptersDisabled):
        return model
    if not adapter_names(model):
        raise LorakitError("reference_model: this model has no lorakit adapters, so disabling them leaves the model "
                           "being trained; call lorakit.inject(model, config) first (or pass a separate copy of the "
                           "base as ref_model)")
    return AdaptersDisabled(model)
