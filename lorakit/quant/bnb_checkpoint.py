"""Read and write bitsandbytes' 4-bit checkpoint format without bitsandbytes.

A Hugging Face folder saved 4-bit by transformers + bitsandbytes has ``config.json["quantization_config"]`` with
``quant_method: "bitsandbytes"``, ``load_in_4bit: true``, ``bnb_4bit_quant_type: "nf4"``, and for every quantized
linear layer ``<path>`` these tensors (safetensors):

    <path>.weight                                      (ceil(n/2), 1) uint8 (or another quant_storage dtype)
    <path>.weight.absmax                               (n_blocks,) uint8 with double quant, else float32
    <path>.weight.quant_map                            (16,) float32, the NF4 levels
    <path>.weight.nested_absmax                        (ceil(n_blocks/256),) float32   (double quant only)
    <path>.weight.nested_quant_map                     (256,) float32, the dynamic map (double quant only)
    <path>.weight.quant_state.bitsandbytes__nf4        uint8 bytes of a JSON object: quant_type, blocksize, dtype,
                                                       shape, and nested_blocksize, nested_dtype, nested_offset

These map one to one onto ``NF4Linear``'s buffers, so reading is a copy (no re-quantization, no loss) and
``dequantize`` gives exactly what bitsandbytes gives. FP4 and 8-bit (LLM.int8) checkpoints are refused by name.
"""

from __future__ import annotations

import json
import math
from typing import Callable

import torch

from lorakit._finite import all_finite
from lorakit.errors import LorakitError
from lorakit.kernels.nf4 import NF4Weight
from lorakit.quant.nf4 import BLOCKSIZES, NF4_LEVELS, NF4Linear, nf4_code

QUANT_STATE_PREFIX = ".weight.quant_state.bitsandbytes__"
SUFFIXES = (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bnb_quantization(config: dict, where: str = "config.json") -> str | None:
    """``"nf4"`` for a bitsandbytes 4-bit NF4 checkpoint, ``None`` for an unquantized one; refuses the rest."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise LorakitError(f"{where}: quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise LorakitError(f"{where}: quantization_config.quant_method is {method!r}; lorakit reads only bitsandbytes "
                           "4-bit NF4 checkpoints (or unquantized ones, which it can quantize itself)")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise LorakitError(f"{where}: this is a bitsandbytes 8-bit (LLM.int8) checkpoint; lorakit reads only 4-bit "
                           "NF4 checkpoints: load the original 16-bit model with --quantize nf4 instead "
                           "(quantize=\"nf4\" from Python)")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise LorakitError(f"{where}: quantization_config (bitsandbytes) has neither load_in_4bit nor load_in_8bit "
                           "set, so it names no quantization; delete it if the weights are 16-bit, or use the "
                           "config.json saved with them")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' default is fp4
    if quant_type != "nf4":
        # a config without the key was refused as "bnb_4bit_quant_type is 'fp4'", a value found nowhere in the file
        shown = repr(quant_type) if "bnb_4bit_quant_type" in qc else "not set, so bitsandbytes' default 'fp4'"
        raise LorakitError(f"{where}: bnb_4bit_quant_type is {shown}; lorakit reads only 'nf4' 4-bit "
                           "checkpoints: load the original 16-bit model with --quantize nf4 instead "
                           "(quantize=\"nf4\" from Python)")
    return "nf4"


def quant_state_key(weight_key: str, keys) -> str | None:
    """The ``...weight.quant_state.bitsandbytes__<type>`` key belonging to ``weight_key``, if the weight is 4-bit."""
    stem = weight_key[: -len(".weight")] if weight_key.endswith(".weight") else weight_key
    for quant_type in ("nf4", "fp4"):
        key = f"{stem}{QUANT_STATE_PREFIX}{quant_type}"
        if key in keys:
            return key
    return None


def is_bnb_aux_key(key: str) -> bool:
    """True for the extra tensors bitsandbytes stores next to a 4-bit ``.weight``."""
    return key.endswith(SUFFIXES) or QUANT_STATE_PREFIX in key


def _parse_quant_state(raw: torch.Tensor, key: str) -> dict:
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() > 1 << 16:
        raise LorakitError(f"{key}: expected a 1-D uint8 tensor of JSON bytes, got {raw.dtype} {tuple(raw.shape)}")
    try:
        state = json.loads(bytes(raw.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:  # JSONDecodeError is a ValueError, so is a huge number
        raise LorakitError(f"{key}: the packed quant state is not valid JSON ({error})") from None
    except RecursionError:  # "[[[[..." nested deeper than Python's stack
        raise LorakitError(f"{key}: the packed quant state is nested too deeply to be bitsandbytes' JSON") from None
    if not isinstance(state, dict):
        raise LorakitError(f"{key}: the packed quant state must be a JSON object")
    return state


def read_bnb_linear(weight_key: str, get: Callable[[str], torch.Tensor], keys, device: torch.device | str | None = None,
                    bias: torch.Tensor | None = None) -> NF4Linear:
    """Build an ``NF4Linear`` from the bitsandbytes tensors of one layer (``get(key)`` reads one tensor).

    Raises ``LorakitError`` naming the key for FP4, an unknown blocksize, wrong shapes, a missing tensor, a bias
    that is not ``(out_features,)`` or a quant_map that is not NF4.
    """
    stem = weight_key[: -len(".weight")]

    def need(key: str) -> torch.Tensor:
        if key not in keys:
            raise LorakitError(f"{key}: missing from the checkpoint (bitsandbytes stores it beside every 4-bit weight "
                               f"{weight_key}); the safetensors file is incomplete")
        return get(key)

    qs_key = quant_state_key(weight_key, keys)
    if qs_key is None:
        raise LorakitError(f"{weight_key}: no {QUANT_STATE_PREFIX}nf4 entry next to this 4-bit weight")
    if not qs_key.endswith("nf4"):
        raise LorakitError(f"{qs_key}: FP4 weights are not supported (lorakit reads NF4); re-quantize the original "
                           "16-bit model with --quantize nf4 (quantize=\"nf4\" from Python)")
    state = _parse_quant_state(get(qs_key), qs_key)
    if state.get("quant_type") != "nf4":
        raise LorakitError(f"{qs_key}: quant_type is {state.get('quant_type')!r}, expected 'nf4'")
    blocksize = state.get("blocksize")
    if type(blocksize) is not int or blocksize not in BLOCKSIZES:  # bool/float compare equal to ints: refused
        raise LorakitError(f"{qs_key}: blocksize {blocksize!r} is not one of bitsandbytes' {BLOCKSIZES}")
    shape = state.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(s) is int and s > 0 for s in shape)):
        raise LorakitError(f"{qs_key}: shape must be [out_features, in_features], got {shape!r}")
    weight_dtype = _DTYPES.get(state.get("dtype"))
    if weight_dtype is None:
        raise LorakitError(f"{qs_key}: dtype {state.get('dtype')!r} is not one of {sorted(_DTYPES)}")
    numel = math.prod(shape)
    n_blocks = -(-numel // blocksize)

    packed = need(weight_key)
    if packed.dtype != torch.uint8:  # quant_storage other than uint8 (e.g. bf16 for FSDP) holds the same bytes
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.reshape(-1)
    if packed.numel() != (numel + 1) // 2:
        raise LorakitError(f"{weight_key}: {packed.numel()} packed bytes, expected {(numel + 1) // 2} for shape {shape}")
    quant_map = need(f"{stem}.weight.quant_map").float()
    if not torch.equal(quant_map.cpu(), nf4_code()):
        raise LorakitError(f"{stem}.weight.quant_map is not the NF4 code {NF4_LEVELS[:3]}...; not an NF4 checkpoint")
    absmax = need(f"{stem}.weight.absmax").reshape(-1)
    if absmax.numel() != n_blocks:
        raise LorakitError(f"{stem}.weight.absmax has {absmax.numel()} entries, expected {n_blocks} "
                           f"(shape {shape}, blocksize {blocksize})")
    nested_key = f"{stem}.weight.nested_absmax"
    if nested_key in keys:
        nested_blocksize = state.get("nested_blocksize")
        if type(nested_blocksize) is not int or nested_blocksize not in BLOCKSIZES:
            raise LorakitError(f"{qs_key}: nested_blocksize {nested_blocksize!r} is not one of {BLOCKSIZES}")
        if absmax.dtype != torch.uint8:
            raise LorakitError(f"{stem}.weight.absmax must be uint8 codes with double quantization, got {absmax.dtype}")
        nested_absmax = get(nested_key).float().reshape(-1)
        if nested_absmax.numel() != -(-n_blocks // nested_blocksize):
            raise LorakitError(f"{nested_key} has {nested_absmax.numel()} entries, expected "
                               f"{-(-n_blocks // nested_blocksize)}")
        nested_code = need(f"{stem}.weight.nested_quant_map").float().reshape(-1)
        if nested_code.numel() != 256:
            raise LorakitError(f"{stem}.weight.nested_quant_map has {nested_code.numel()} entries, expected 256")
        try:
            value = state["nested_offset"]
            if isinstance(value, bool):  # float(True) would be 1.0
                raise TypeError
            offset = torch.tensor(float(value), dtype=torch.float32)
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float range
            raise LorakitError(f"{qs_key}: nested_offset missing or not a number") from None
        w = NF4Weight(packed, absmax, nested_absmax, offset, quant_map, nested_code, shape, blocksize, nested_blocksize)
    else:
        if not absmax.dtype.is_floating_point:
            raise LorakitError(f"{stem}.weight.absmax is {absmax.dtype} but there is no nested_absmax")
        w = NF4Weight(packed, absmax.float(), None, None, quant_map, None, shape, blocksize)
    for label, tensor in (("absmax", w.absmax), ("nested_absmax", w.nested_absmax), ("nested_quant_map", w.nested_code),
                          ("nested_offset", w.offset)):
        if tensor is not None and tensor.is_floating_point() and not all_finite(tensor):
            raise LorakitError(f"{stem}.weight.{label} holds NaN/inf values; the checkpoint is corrupt")
    if bias is not None and tuple(bias.shape) != (shape[0],):
        raise LorakitError(f"{stem}.bias has shape {tuple(bias.shape)}, expected ({shape[0]},) for the "
                           f"{shape[0]}x{shape[1]} 4-bit weight {weight_key}")
    if device is not None:
        w = NF4Weight(*(t.to(device) if t is not None else None for t in (w.packed, w.absmax, w.nested_absmax,
                                                                         w.offset, w.code, w.nested_code)),
                      w.shape, w.blocksize, w.nested_blocksize)
        bias = bias.to(device) if bias is not None else None
    return NF4Linear.from_nf4_weight(w, bias, weight_dtype=weight_dtype)


def bnb_tensors(module: NF4Linear, prefix: str) -> dict[str, torch.Tensor]:
    """The bitsandbytes tensors of ``module`` under ``prefix`` (e.g. ``"model.layers.0.mlp.up_proj"``), ready for
    safetensors: what ``Linear4bit.state_dict()`` holds, so bitsandbytes (and transformers) can read lorakit's NF4."""
    n = module.in_features * module.out_features
    state = {"quant_type": "nf4", "blocksize": module.blocksize,
             "dtype": str(module.weight_dtype).replace("torch.", ""),
             "shape": [module.out_features, module.in_features]}
    out = {f"{prefix}.weight": module.weight_packed.reshape((n + 1) // 2, 1).contiguous(),
           f"{prefix}.weight.absmax": module.absmax.contiguous(),
           f"{prefix}.weight.quant_map": module.code.contiguous()}
    if module.double_quant:
        out[f"{prefix}.weight.nested_absmax"] = module.nested_absmax.contiguous()
        out[f"{prefix}.weight.nested_quant_map"] = module.nested_code.clone()
        state.update(nested_blocksize=module.nested_blocksize, nested_dtype="float32",
                     nested_offset=module.absmax_offset.item())
    out[f"{prefix}{QUANT_STATE_PREFIX}nf4"] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
    if module.bias is not None:
        out[f"{prefix}.bias"] = module.bias.detach().contiguous()
    return out
