"""lorakit on transformers 4.x (pyproject allows >= 4.56): generation's refusal of models that keep their state in a
cache class of their own there, tested on the suite's 5.x with 4.x's shapes (and on a real 4.x where one is installed).

Found running tests/test_model_folders.py with transformers 4.56.2 in a side environment: ``lorakit generate`` on a
Mamba folder was refused with "its forward takes no KV cache, not a transformers cache; generate with transformers'
model.generate instead", as if no transformers version could run it. 4.x's Mamba, Mamba2 and FalconMamba take their
state as ``cache_params`` (a MambaCache); 5.x takes the standard ``cache`` and lorakit generates them there. The
refusal now names the installed version and the fix (pip install -U "transformers>=5"), as it does for 4.x's hybrid
models (Jamba, Bamba, ...), whose message now carries the same command.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from lorakit import generation as G
from lorakit.errors import LorakitError

FIX = 'upgrade to transformers 5 with pip install -U "transformers>=5"'


class MambaCache:
    """Stands for transformers 4.x's cache class in a model's own module (``_own_cache_class`` looks it up there)."""


class MambaForCausalLM(torch.nn.Module):
    """transformers 4.56's Mamba as lorakit's check sees it: its forward takes ``cache_params``, no ``cache``."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="mamba")

    def forward(self, input_ids=None, attention_mask=None, cache_params=None, use_cache=None, cache_position=None):
        raise AssertionError("not called: the check reads the signature only")


class JambaForCausalLM(torch.nn.Module):
    """transformers 4.x's hybrid models: a ``past_key_values`` that must be their own cache class."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="jamba")

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        raise AssertionError("not called: the check reads the signature only")


@pytest.mark.parametrize("family", [MambaForCausalLM, JambaForCausalLM])
def test_4x_own_cache_models_are_refused_naming_the_version_and_the_fix(family, monkeypatch):
    """Mamba said 'takes no KV cache' (no version, no fix) before; Jamba named no command. On 5.x the own-cache check
    is off (the state lives in the standard cache there): the same shapes are not refused for it."""
    monkeypatch.setattr(transformers, "__version__", "4.56.2")
    reason = G.unsupported(family())
    assert reason == (f"lorakit's generation does not support {family.__name__} on transformers 4.56.2: it keeps its "
                      "state in its own MambaCache, and lorakit generates it only on transformers >= 5 (where that "
                      f"state lives in the standard cache); {FIX}, or generate with transformers' model.generate")
    monkeypatch.setattr(transformers, "__version__", "5.24.0")
    reason = G.unsupported(family())
    # 4.x-shaped Mamba on 5.x: a forward with no cache argument lorakit can fill (5.x's own Mamba takes `cache`)
    assert reason is None if family is JambaForCausalLM else "takes no KV cache" in reason


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) >= 5, reason="transformers 4.x's Mamba only")
@pytest.mark.parametrize("family", ["MambaForCausalLM", "Mamba2ForCausalLM", "FalconMambaForCausalLM"])
def test_real_4x_mamba_generation_is_refused_in_one_line(family):
    configs = {"MambaForCausalLM": lambda: transformers.MambaConfig(vocab_size=64, hidden_size=16,
                                                                    num_hidden_layers=1, state_size=4),
               "Mamba2ForCausalLM": lambda: transformers.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                                      state_size=4, num_heads=4, head_dim=16,
                                                                      n_groups=1, chunk_size=4),
               "FalconMambaForCausalLM": lambda: transformers.FalconMambaConfig(vocab_size=64, hidden_size=16,
                                                                                num_hidden_layers=1, state_size=4)}
    model = getattr(transformers, family)(configs[family]()).eval()
    with pytest.raises(LorakitError) as refused:
        G._new_cache(model)  # where every lorakit generation path (generate, serve, compare) starts
    said = str(refused.value)
    assert said.startswith(f"lorakit's generation does not support {family} on transformers {transformers.__version__}: "
                           f"it keeps its state in its own {family[:-len('ForCausalLM')]}Cache")
    assert FIX in said and "\n" not in said
