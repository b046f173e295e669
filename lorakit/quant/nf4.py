"""NF4 (QLoRA) base weights: quantization bit-compatible with bitsandbytes, and ``NF4Linear``.

``quantize_nf4(W)`` gives the same bytes as ``bitsandbytes.functional.quantize_4bit(W, blocksize=64,
quant_type="nf4", compress_statistics=True)`` (bitsandbytes 0.50.2 on CPU, checked element by element in
tests/test_nf4.py): the packed 4-bit codes, the 8-bit absmax codes, the nested absmax, the offset; and
``NF4Linear.dequantize`` gives the same values as ``dequantize_4bit``. The layout is described in
``lorakit/kernels/nf4.py``.

Rounding, from bitsandbytes' own code:
  * 4-bit codes (``backends/default/ops.py``, used on CPU): ``scaled = clamp(x * (1 / absmax), -1, 1)`` in float32,
    then the nearest NF4 level by ``bucketize`` over the float32 midpoints (a tie goes to the lower level); an odd
    element count is padded with one 0.0 (code 7) in the last low nibble.
  * 8-bit absmax codes (``csrc/cpu_ops.cpp`` ``quantize_cpu_impl``): ``v = clamp(x * (1 / absmax), -1, 1)``, then
    ``lut[int(((v + 1) * 0.5) * 65535 + 0.5)]`` with a 65,536-entry table of nearest codes (a block of zeros codes
    as 0). bitsandbytes' CUDA kernel picks the exact nearest code instead, which differs in about 0.1% of the absmax
    codes by one step (1e-3 relative on that block's scale); bench/qlora.py measures this on the GPU. lorakit uses
    the CPU rule on every device, so its bytes do not depend on the device.
  * offset = ``absmax.mean()`` (torch's float32 mean on the weight's device, as bitsandbytes calls it).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lorakit._finite import all_finite
from lorakit.errors import LorakitError
from lorakit.kernels.nf4 import NF4Weight, decode_absmax, dequantize_nf4, nf4_linear
from lorakit.quant import QuantizedLinear

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts for 4-bit
NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed blocksize for the double quantization of the absmax


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 levels, float32 ``(16,)`` (``bitsandbytes.functional.get_4bit_type("nf4")``)."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=1)
def _dynamic_code_cpu() -> torch.Tensor:
    # bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), step for step
    data: list[float] = []
    for i in range(7):
        fraction_items = int(2 ** i + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map, float32 ``(256,)``, sorted (the code of the nested absmax).

    Always a fresh tensor: each NF4Linear owns its buffer, so ``load_state_dict`` (which copies in place) cannot
    write into the cached map, and ``save_pretrained``/safetensors see no shared storage between layers."""
    return _dynamic_code_cpu().to(device, copy=True)


@functools.lru_cache(maxsize=4)
def _dynamic_lut_cpu() -> torch.Tensor:
    """bitsandbytes' CPU quantization table: 65,536 bins over [-1, 1] -> nearest code index (uint8)."""
    code = _dynamic_code_cpu()
    midpoints = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(65536, dtype=torch.float32)
    values = -1.0 + (2.0 * i) / 65535.0
    return torch.searchsorted(midpoints, values, right=False).to(torch.uint8)  # count of midpoints < value


def _blockwise_absmax(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n,) float32 -> (x padded to (n_blocks, blocksize) with zeros, absmax (n_blocks,) float32)."""
    n = x.numel()
    n_blocks = -(-n // blocksize)
    pad = n_blocks * blocksize - n
    blocks = (F.pad(x, (0, pad)) if pad else x).view(n_blocks, blocksize)  # no copy when the blocks fit exactly
    return blocks, blocks.abs().amax(dim=1)


def quantize_dynamic_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (n,) float32 -> (codes (n,) uint8, absmax (ceil(n / blocksize),) float32)`` with the dynamic map, as
    bitsandbytes' ``quantize_blockwise`` on CPU (see the module docstring)."""
    n = x.numel()
    blocks, absmax = _blockwise_absmax(x.float().reshape(-1), blocksize)
    inv = 1.0 / absmax
    scaled = (blocks * inv.view(-1, 1)).clamp(-1.0, 1.0)
    index = (((scaled + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)  # truncation, as the C cast
    codes = _dynamic_lut_cpu().to(x.device)[index.clamp(0, 65535)]
    codes = torch.where((absmax == 0).view(-1, 1), torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n], absmax


def _nf4_midpoints(device) -> torch.Tensor:
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2


def check_finite(weight: torch.Tensor, name: str = "") -> None:
    """Refuse NaN/inf weights before quantizing: they would poison a whole block's scale silently."""
    if not all_finite(weight):
        bad = int((~torch.isfinite(weight)).sum())
        where = f"module '{name}'" if name else "the weight"
        raise LorakitError(f"{where} has {bad} non-finite value(s) (NaN/inf) in its weight {tuple(weight.shape)}; "
                           f"NF4 cannot quantize them: fix or skip this module (quantize(..., skip=...)).")


def quantize_nf4(weight: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True, name: str = "") -> NF4Weight:
    """Quantize a dense 2-D weight ``(out, in)`` (float32/float16/bfloat16, any device) to NF4.

    Returns an ``NF4Weight`` on the weight's device: packed ``(ceil(n/2),)`` uint8; with ``double_quant`` the absmax
    as ``(n_blocks,)`` uint8 codes + nested absmax ``(ceil(n_blocks/256),)`` float32 + offset ``()`` float32,
    otherwise the absmax as ``(n_blocks,)`` float32. Raises ``LorakitError`` for a non-finite or non-2-D weight.
    """
    label = f"module '{name}'" if name else "the weight"
    if weight.dim() != 2:
        raise LorakitError(f"{label}: NF4 quantizes 2-D (out, in) weights, got shape {tuple(weight.shape)}.")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise LorakitError(f"{label}: NF4 quantizes float32/float16/bfloat16 weights, got {weight.dtype}.")
    if blocksize not in BLOCKSIZES:
        raise LorakitError(f"{label}: NF4 blocksize must be one of {BLOCKSIZES}, got {blocksize}.")
    check_finite(weight, name)
    device = weight.device
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    blocks, absmax = _blockwise_absmax(flat, blocksize)
    if n % blocksize:  # bitsandbytes stores a partial last block's absmax clamped to >= 1e-38 (full ones are not)
        absmax[-1] = absmax[-1].clamp(min=1e-38)
    # bitsandbytes: x * (1 / absmax.clamp(min=1e-38)); the clamp only matters for an all-zero block (-> code 7)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp(-1.0, 1.0).reshape(-1)[:n]
    if n % 2:
        scaled = F.pad(scaled, (0, 1))  # the spare low nibble codes 0.0 (index 7), as bitsandbytes pads
    codes = torch.bucketize(scaled, _nf4_midpoints(device), out_int32=True).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    code = nf4_code(device)
    if not double_quant:
        return NF4Weight(packed, absmax, None, None, code, None, weight.shape, blocksize, NESTED_BLOCKSIZE)
    offset = absmax.mean()
    absmax_codes, nested_absmax = quantize_dynamic_8bit(absmax - offset, NESTED_BLOCKSIZE)
    return NF4Weight(packed, absmax_codes, nested_absmax, offset, code, dynamic_code(device), weight.shape,
                     blocksize, NESTED_BLOCKSIZE)


def nf4_roundtrip_error(weight: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True) -> dict[str, float]:
    """How much NF4 loses on ``weight (out, in)``: max and RMS absolute error, and RMS error relative to RMS(W)."""
    q = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
    error = dequantize_nf4(q, torch.float32) - weight.float()
    rms_w = weight.float().pow(2).mean().sqrt().item()
    rms_e = error.pow(2).mean().sqrt().item()
    return {"max_abs": error.abs().max().item() if error.numel() else 0.0, "rms": rms_e,
            "relative_rms": rms_e / rms_w if rms_w > 0 else 0.0}


# the float32 buffers that must stay float32 through model.to(dtype) / .half() (they are exact quantization state)
_FLOAT_STATE = ("absmax", "nested_absmax", "absmax_offset", "code", "nested_code")


class NF4Linear(QuantizedLinear):
    """A frozen linear layer whose weight is stored in NF4 (QLoRA's base layer).

    Buffers (all moved by ``.to(device)``; the float32 ones keep float32 through ``.to(dtype)``):
      weight_packed (ceil(out*in/2),) uint8; absmax (n_blocks,) uint8 codes (double quant) or float32;
      nested_absmax (ceil(n_blocks/256),) float32; absmax_offset () float32; code (16,) float32 NF4 levels;
      nested_code (256,) float32 dynamic map. ``bias`` (out,) is an ordinary Parameter (or None).
    ``forward(x (..., in)) -> (..., out)`` computes ``x @ dequantize(x.dtype)^T + bias`` in ``x.dtype``.
    ``weight_dtype`` is the dtype the weight had before quantization (what bitsandbytes records as ``dtype``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 double_quant: bool = True, weight_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype | None = None):
        super().__init__()
        if blocksize not in BLOCKSIZES:
            raise LorakitError(f"NF4 blocksize must be one of {BLOCKSIZES}, got {blocksize}.")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.blocksize, self.nested_blocksize, self.weight_dtype = int(blocksize), NESTED_BLOCKSIZE, weight_dtype
        n = self.in_features * self.out_features
        n_blocks = -(-n // self.blocksize)
        self.register_buffer("weight_packed", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        self.register_buffer("code", nf4_code(device))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("nested_absmax", torch.zeros(-(-n_blocks // NESTED_BLOCKSIZE), device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))
            self.register_buffer("nested_code", dynamic_code(device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, device=device))
            self.register_buffer("nested_absmax", None)
            self.register_buffer("absmax_offset", None)
            self.register_buffer("nested_code", None)
        self.bias = (torch.nn.Parameter(torch.zeros(out_features, device=device, dtype=bias_dtype or weight_dtype),
                                        requires_grad=False) if bias else None)
        self.mode = "auto"  # kernels.nf4.nf4_matmul mode; tests set "reference"/"fused"/"dequantize"

    # -- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, blocksize: int = 64,
                    double_quant: bool = True, name: str = "") -> "NF4Linear":
        """Quantize a dense ``(out, in)`` weight (on its device) into a new NF4Linear; ``bias (out,)`` is copied."""
        if weight.dim() != 2:
            raise LorakitError(f"module '{name}': NF4Linear needs a 2-D weight, got {tuple(weight.shape)}.")
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias=bias is not None, blocksize=blocksize,
                     double_quant=double_quant, weight_dtype=weight.dtype, device=weight.device,
                     bias_dtype=bias.dtype if bias is not None else None)
        module.load_dense(weight, name=name)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    @classmethod
    def from_linear(cls, linear: torch.nn.Module, *, blocksize: int = 64, double_quant: bool = True,
                    device: torch.device | str | None = None, name: str = "") -> "NF4Linear":
        """An NF4Linear from an ``nn.Linear`` or a transformers ``Conv1D`` (quantized on ``device``, default the
        weight's own); a bitsandbytes 4-bit NF4 layer is converted exactly (its state copied, not re-quantized)."""
        from lorakit.quant import is_conv1d
        from lorakit.quant.quantize import _bnb_kind, from_bnb_linear4bit

        label = name or type(linear).__name__
        if _bnb_kind(linear) == "4bit":
            return from_bnb_linear4bit(linear, name)
        conv1d = is_conv1d(linear)
        if not (isinstance(linear, torch.nn.Linear) or conv1d) or _bnb_kind(linear) is not None:
            raise LorakitError(f"module '{label}' ({type(linear).__name__}) is not linear; NF4Linear.from_linear takes an "
                               "nn.Linear or a transformers Conv1D (lorakit.quantize(model) picks them for you)")
        weight = linear.weight.detach()
        weight = weight.T.contiguous() if conv1d else weight  # Conv1D stores (in, out)
        if device is not None:
            weight = weight.to(device)
        bias = linear.bias.detach().to(weight.device) if linear.bias is not None else None
        module = cls.from_weight(weight, bias, blocksize=blocksize, double_quant=double_quant, name=name)
        module.conv1d_layout = conv1d
        return module

    @classmethod
    def from_nf4_weight(cls, w: NF4Weight, bias: torch.Tensor | None = None, *,
                        weight_dtype: torch.dtype = torch.bfloat16) -> "NF4Linear":
        """Wrap already-quantized tensors (e.g. read from a bitsandbytes checkpoint) without re-quantizing."""
        out_features, in_features = w.shape
        module = cls(in_features, out_features, bias=bias is not None, blocksize=w.blocksize,
                     double_quant=w.nested, weight_dtype=weight_dtype, device="meta",
                     bias_dtype=bias.dtype if bias is not None else None)
        module._set_state(w)
        if bias is not None:
            module.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)
        return module

    def _set_state(self, w: NF4Weight) -> None:
        n = self.in_features * self.out_features
        expect = {"weight_packed": ((n + 1) // 2,), "absmax": (-(-n // self.blocksize),)}
        for key, tensor in (("weight_packed", w.packed.reshape(-1)), ("absmax", w.absmax.reshape(-1))):
            if tuple(tensor.shape) != expect[key]:
                raise LorakitError(f"NF4 {key} has shape {tuple(tensor.shape)}, expected {expect[key]} for a "
                                   f"({self.out_features}, {self.in_features}) weight with blocksize {self.blocksize}.")
        self._buffers["weight_packed"] = w.packed.reshape(-1)
        self._buffers["absmax"] = w.absmax.reshape(-1)
        self._buffers["code"] = w.code.float()
        if w.nested:
            self._buffers["nested_absmax"] = w.nested_absmax.float().reshape(-1)
            self._buffers["absmax_offset"] = w.offset.float().reshape(())
            self._buffers["nested_code"] = w.nested_code.float()
            self.nested_blocksize = w.nested_blocksize

    # -- the QuantizedLinear interface ---------------------------------------------------------------------------

    def nf4_weight(self) -> NF4Weight:
        """The storage as an ``NF4Weight`` (references to the buffers, no copies)."""
        return NF4Weight(self.weight_packed, self.absmax, self.nested_absmax, self.absmax_offset, self.code,
                         self.nested_code, (self.out_features, self.in_features), self.blocksize,
                         self.nested_blocksize)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight ``(out, in)`` in ``dtype`` (identical to bitsandbytes' ``dequantize_4bit``)."""
        return dequantize_nf4(self.nf4_weight(), dtype)

    def block_scales(self) -> torch.Tensor:
        """Per-block float32 scales ``(n_blocks,)`` (the absmax after undoing double quantization)."""
        return decode_absmax(self.nf4_weight())

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor, name: str = "") -> None:
        """Re-quantize from a dense ``(out, in)`` weight (lossy), on this module's device, in place."""
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise LorakitError(f"module '{name or self._name_hint()}': weight shape {tuple(weight.shape)} does not "
                               f"match the NF4 layer's {expected}.")
        device = self.weight_packed.device
        if device.type == "meta":
            device = weight.device
        q = quantize_nf4(weight.detach().to(device), blocksize=self.blocksize, double_quant=self.double_quant,
                         name=name or self._name_hint())
        self._set_state(q)

    def _name_hint(self) -> str:
        return f"NF4Linear({self.in_features}, {self.out_features})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise LorakitError(f"NF4Linear expects inputs (..., {self.in_features}), got {tuple(x.shape)}.")
        return nf4_linear(x, self.nf4_weight(), self.bias, mode=self.mode)

    # -- keep the quantization state float32 through model.to(dtype) / .half() ------------------------------------

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers[name] for name in _FLOAT_STATE if self._buffers.get(name) is not None}
        for name in kept:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in kept.items():
                target = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device)).device  # where fn moves things
                self._buffers[name] = tensor.to(target)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, weight_dtype={self.weight_dtype}")

    def memory_bytes(self) -> int:
        """Bytes held by the quantized storage (not the bias)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())
