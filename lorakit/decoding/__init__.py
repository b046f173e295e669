"""Static-cache decoding: one token per sequence per step with a few large kernels per layer (CUDA-graph ready).

``StaticDecoder(model, max_batch, max_len)`` for Llama-family models, Phi-3, Gemma, Gemma 2 and Gemma 3 text
on dense or NF4 (QLoRA, lorakit ``NF4Linear``) projections (``static_decoding_unsupported`` says why a model is not
one); used by ``lorakit serve`` on CUDA and by ``bench/multi_adapter.py`` / ``bench/static_families_check.py`` /
``bench/nf4_decode_check.py``.
"""

from lorakit.decoding.architecture import static_decoding_unsupported
from lorakit.decoding.decoder import StaticDecoder

__all__ = ["StaticDecoder", "static_decoding_unsupported"]
