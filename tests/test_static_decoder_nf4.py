"""lorakit.decoding.StaticDecoder on an NF4 (QLoRA) base: the fused NF4 rows GEMM against its reference, and the
decoder against transformers' forward of the same lorakit-quantized model, row by row, float32.

Kernels run under TRITON_INTERPRET=1 (conftest); ``references_only`` runs the kernels' PyTorch references
(LORAKIT_DISABLE_TRITON=1) where a test checks the decoder's plumbing on other families, to stay cheap.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.decoding import StaticDecoder, static_decoding_unsupported
from lorakit.generation import prefill
from lorakit.kernels.nf4 import decode_absmax
from lorakit.kernels.nf4_rows import NF4Rows, nf4_rows_linear, nf4_rows_linear_reference
from lorakit.quant.nf4 import quantize_nf4
from tests.conftest import tiny_llama
from tests.test_static_decoder_families import _reference, _with_adapters

ATOL = 1e-5  # float32, as tests/test_static_decoder.py (measured here: <= 7e-7)
PROMPTS = [[5, 9, 2, 7, 1], [3, 4], [8, 8, 1, 2, 3, 4, 5], [11, 12, 13]]
NAMES = ["a", None, "d", "b"]


@pytest.fixture
def references_only(monkeypatch):
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")


@pytest.fixture
def nf4_kernel_only(monkeypatch):
    """The fused NF4 kernel (and the Triton dequantize) under the interpreter, every other kernel's reference: the
    decoder's other kernels are checked on the same steps in tests/test_static_decoder.py, and the interpreter
    would spend a minute on them here."""
    import lorakit.kernels.nf4 as nf4
    import lorakit.kernels.nf4_rows as nf4_rows

    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")
    monkeypatch.setattr(nf4_rows, "triton_usable", lambda *tensors: True)
    monkeypatch.setattr(nf4, "triton_usable", lambda *tensors: True)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The row counts of every fused NF4 kernel launch (the matrix-vector and the tensor-core kernel)."""
    import lorakit.kernels.triton.nf4_gemv as triton_gemv
    import lorakit.kernels.triton.nf4_rows as triton_nf4

    calls = []
    for module, name in ((triton_nf4, "nf4_rows_gemm"), (triton_gemv, "nf4_gemv")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda x, *a, _real=real, **kw: calls.append(x.shape[0]) or _real(x, *a, **kw))
    return calls


def _members(sizes, K, blocksize, seed=0):
    torch.manual_seed(seed)
    out = []
    for n in sizes:
        q = quantize_nf4(torch.randn(n, K) * 0.3, blocksize=blocksize)
        out.append(NF4Rows(q.packed, decode_absmax(q), q.code, n, blocksize))
    return out


# ---- the kernel ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,sizes,K,blocksize,dtype", [
    (5, (37, 17, 20), 192, 64, torch.float32),  # q/k/v-like: three members, odd sizes, column blocks cut short
    (1, (33, 40), 64, 32, torch.float32),  # gate/up-like, the smallest blocksize (16-column chunks per nibble)
    (64, (96,), 512, 64, torch.float16),  # the most rows the kernel takes
    (3, (20,), 4096, 4096, torch.float32),  # one block per row
    (7, (50,), 320, 64, torch.float16),  # K not a multiple of the 128-column loop step
])
@pytest.mark.parametrize("residual", [False, True])
def test_nf4_rows_kernel_matches_the_reference(rows, sizes, K, blocksize, dtype, residual, kernel_calls, monkeypatch):
    import lorakit.kernels.nf4_rows as nf4_rows

    monkeypatch.setattr(nf4_rows, "MAX_FUSED_ROWS", nf4_rows.KERNEL_MAX_ROWS)  # the kernel at every row count it takes
    members = _members(sizes, K, blocksize)
    x = torch.randn(rows, K).to(dtype)
    r = torch.randn(rows, sum(sizes)).to(dtype) if residual else None
    got = nf4_rows_linear(x, members, r)
    expected = nf4_rows_linear_reference(x, members, r)
    assert kernel_calls == [rows]
    assert got.dtype == dtype and got.shape == expected.shape
    # float32: another summation order; float16: the reference's own rounding (<= 1 ulp at |y| ~ 30)
    atol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got.float(), expected.float(), atol=atol, rtol=1e-5), (got.float() - expected.float()).abs().max()
    # the reference is bitsandbytes' dequantization: the dense weight of each member, then addmm
    dense = torch.cat([m.dequantize(K, torch.float32) for m in members])
    q = quantize_nf4(dense[:sizes[0]].clone(), blocksize=blocksize)
    assert torch.equal(dense[:sizes[0]], members[0].dequantize(K, torch.float32))
    assert q.packed.shape == members[0].packed.shape


@pytest.mark.parametrize("config", [(32, 32, 2, 4, 2), (16, 32, 1, 4, 3), (64, 32, 4, 8, 3)])
def test_nf4_rows_kernel_tiles_and_lookups(config):
    """The other tiles of the bench's sweep (``config`` = BLOCK_N, CHUNK, UNROLL, warps, stages), called twice."""
    from lorakit.kernels.triton.nf4_rows import nf4_rows_gemm

    members = _members((70, 20, 9), 256, 32)
    x, r = torch.randn(9, 256), torch.randn(9, 99)
    expected = nf4_rows_linear_reference(x, members, r)
    for _ in range(2):
        got = nf4_rows_gemm(x, [(m.packed, m.scales, m.code, m.out_features) for m in members], 32, r,
                            config=config)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("rows,sizes,K,blocksize,config", [
    (1, (37, 17, 20), 192, 64, (16, 32, "load", 4, 3)),  # three members, column blocks cut short, one block a step
    (3, (33, 40), 256, 32, (8, 64, "gather", 4, 2)),  # 128 columns a step over four 32-column blocks
    (4, (50,), 512, 256, (32, 16, "load", 2, 3)),  # 32 columns a step inside a 256-column block
    (2, (9,), 4096, 4096, None),  # the default tile; one block a row
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nf4_gemv_matches_the_reference(rows, sizes, K, blocksize, config, dtype):
    """The matrix-vector kernel (1-4 rows, CUDA cores) against the reference, with and without a residual, each
    lookup, steps smaller than, equal to and larger than a scale block."""
    from lorakit.kernels.triton.nf4_gemv import nf4_gemv

    members = _members(sizes, K, blocksize)
    weights = [(m.packed, m.scales, m.code, m.out_features) for m in members]
    x = torch.randn(rows, K).to(dtype)
    for r in (None, torch.randn(rows, sum(sizes)).to(dtype)):
        got = nf4_gemv(x, weights, blocksize, r, config=config)
        expected = nf4_rows_linear_reference(x, members, r)
        atol = 1e-4 if dtype == torch.float32 else 3e-2
        assert got.dtype == dtype and torch.allclose(got.float(), expected.float(), atol=atol, rtol=1e-5), \
            (got.float() - expected.float()).abs().max()


def test_nf4_rows_linear_picks_the_kernel_by_rows(kernel_calls, monkeypatch):
    """1-4 rows: the matrix-vector kernel; up to MAX_FUSED_ROWS: the tensor-core kernel (both counted by the fixture,
    told apart by patching the GEMV off)."""
    import lorakit.kernels.nf4_rows as nf4_rows

    members = _members((24,), 128, 64)
    for rows in (1, 4, 5, nf4_rows.MAX_FUSED_ROWS):
        x = torch.randn(rows, 128)
        assert torch.allclose(nf4_rows_linear(x, members), nf4_rows_linear_reference(x, members), atol=1e-4)
    assert kernel_calls == [1, 4, 5, nf4_rows.MAX_FUSED_ROWS]
    monkeypatch.setattr(nf4_rows, "MAX_GEMV_ROWS", 0)
    from lorakit.kernels.triton import nf4_gemv

    monkeypatch.setattr(nf4_gemv, "nf4_gemv", None)  # would fail if called
    x = torch.randn(2, 128)
    assert torch.allclose(nf4_rows_linear(x, members), nf4_rows_linear_reference(x, members), atol=1e-4)


def test_nf4_rows_other_paths_give_the_reference(kernel_calls):
    """K not a multiple of the blocksize (blocks straddle rows): the reference; more than 64 rows (prefill): Triton
    dequantize + BLAS; bfloat16 on the CPU (the interpreter has none): the reference. No fused launch in any."""
    members = _members((9, 14), 96, 64)  # K = 96: blocks straddle rows
    x = torch.randn(3, 96)
    assert torch.equal(nf4_rows_linear(x, members), nf4_rows_linear_reference(x, members))
    members = _members((9, 14), 128, 64)
    x, r = torch.randn(70, 128), torch.randn(70, 23)
    assert torch.allclose(nf4_rows_linear(x, members, r), nf4_rows_linear_reference(x, members, r), atol=1e-5)
    xb = torch.randn(2, 128).bfloat16()
    assert torch.equal(nf4_rows_linear(xb, members), nf4_rows_linear_reference(xb, members))
    assert kernel_calls == []
    # past MAX_FUSED_ROWS (the measured crossing on a GPU) decode rows dequantize too; up to it, the kernel
    from lorakit.kernels.nf4_rows import MAX_FUSED_ROWS

    for rows, launches in ((MAX_FUSED_ROWS + 1, []), (MAX_FUSED_ROWS, [MAX_FUSED_ROWS])):
        x, r = torch.randn(rows, 128), torch.randn(rows, 23)
        assert torch.allclose(nf4_rows_linear(x, members, r), nf4_rows_linear_reference(x, members, r), atol=1e-4)
        assert kernel_calls == launches
        kernel_calls.clear()


# ---- the decoder ----------------------------------------------------------------------------------------------------

def _qlora_llama(seed=1, **overrides):
    """A tiny Llama (widths multiples of 64: the fused kernel runs) quantized by lorakit, with three adapters."""
    model = tiny_llama(seed=seed, hidden_size=64, intermediate_size=128, **overrides)
    lorakit.quantize(model, "nf4")
    return _with_adapters(model)


def _static(model, names, steps, overlap=None, rows=(0, 1, 2, 3)):
    decoder = StaticDecoder(model, max_batch=6, max_len=16, lora_overlap=overlap)
    logits, batch = prefill(model, PROMPTS, names)
    decoder.admit(list(rows), batch)
    out = [logits]
    for _ in range(steps):
        out.append(decoder.step(list(rows), out[-1].argmax(dim=-1).tolist(), names))
    return out, decoder


def _assert_steps(expected, got):
    for step, (e, g) in enumerate(zip(expected, got)):
        assert torch.allclose(g, e, atol=ATOL, rtol=1e-5), f"step {step}: max diff {(g - e).abs().max():.2e}"


@pytest.mark.parametrize("overlap,names", [("off", NAMES), ("lora", ["a", None, "b", "a"])],
                         ids=["dora-and-no-adapter", "delta-fused-into-next-kernels"])
def test_llama_on_nf4_decodes_as_transformers_with_mixed_adapters(overlap, names, kernel_calls, nf4_kernel_only):
    """Rows on LoRA, rsLoRA (a few projections), DoRA (its norm from the dequantized base) and no adapter; every
    base GEMM of a step is one fused NF4 launch per projection group (q/k/v, o, gate/up, down)."""
    from lorakit.quant.nf4 import NF4Linear

    model = _qlora_llama()
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
    assert static_decoding_unsupported(model) is None
    expected = _reference(model, PROMPTS, names, steps=2)
    got, decoder = _static(model, names, steps=2, overlap=overlap)
    _assert_steps(expected, got)
    layers = len(model.model.layers)
    assert kernel_calls == [6] * (4 * layers * 2)  # 4 groups x layers x 2 steps, all 6 cache rows
    fused = decoder.weights[0]["qkv"]
    q = model.model.layers[0].self_attn.q_proj.base_layer
    assert fused.weight is None and fused.nf4[0].packed.data_ptr() == q.weight_packed.data_ptr()  # read in place


def test_decoder_prefill_on_nf4_matches_transformers(kernel_calls, nf4_kernel_only):
    """decoder.prefill over 72 tokens in all (more than 64 rows: the dequantize path) then a fused-kernel step."""
    model = _qlora_llama(seed=3)
    prompts = [list(range(1, 41)), [7, 3, 9], list(range(50, 79))]
    names = ["a", None, "d"]
    expected = _reference(model, prompts, names, steps=1)
    decoder = StaticDecoder(model, max_batch=3, max_len=48)
    got = [decoder.prefill([2, 0, 1], prompts, names)]
    got.append(decoder.step([2, 0, 1], got[-1].argmax(dim=-1).tolist(), names))
    _assert_steps(expected, got)
    assert kernel_calls == [3] * (4 * len(model.model.layers))  # the prefill's 72 rows dequantized instead


def _qwen2_nf4():
    """Qwen2 (q/k/v biases kept dense beside the NF4 weights), blocksize 32: hidden 32 runs the fused kernel, the
    MLP's 48 columns (down_proj: K = 48, blocks straddle rows) the reference."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    lorakit.quantize(model, "nf4", blocksize=32)
    return _with_adapters(model)


def _family_nf4(family):
    import tests.test_static_decoder_families as families

    model = families.FAMILIES[family]()
    lorakit.quantize(model, "nf4")
    return _with_adapters(model, family)


def test_qwen2_with_biases_and_straddling_blocks_on_nf4(kernel_calls, nf4_kernel_only):
    model = _qwen2_nf4()
    expected = _reference(model, PROMPTS, NAMES, steps=2)
    got, _ = _static(model, NAMES, steps=2, overlap="lora")
    _assert_steps(expected, got)
    assert len(kernel_calls) == 3 * 2 * 2  # q/k/v, o, gate/up fused; down (K = 48 of blocksize 32) the reference


@pytest.mark.parametrize("family", ["phi3", "gemma2"])
def test_other_families_on_nf4(family, references_only):
    model = _family_nf4(family)
    assert static_decoding_unsupported(model, 16) is None
    expected = _reference(model, PROMPTS, NAMES, steps=2)
    got, _ = _static(model, NAMES, steps=2)
    _assert_steps(expected, got)


# ---- what stays unsupported, and keeping in step with the model ---------------------------------------------------

class _OtherQuant(lorakit.quant.QuantizedLinear):
    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features, self.bias = linear.in_features, linear.out_features, None
        self.register_buffer("w", linear.weight.detach().clone())

    def forward(self, x):
        return x @ self.w.t()

    def dequantize(self, dtype=torch.float32):
        return self.w.to(dtype)


def test_unsupported_storage_gets_one_line_reasons():
    from lorakit.quant.nf4 import NF4Linear

    mixed = tiny_llama(seed=5, hidden_size=64, intermediate_size=128)
    attn = mixed.model.layers[1].self_attn
    attn.k_proj = NF4Linear.from_linear(attn.k_proj)  # q and v stay dense
    reason = static_decoding_unsupported(mixed)
    assert reason == ("layer 1 mixes NF4 and dense weights in its q_proj/k_proj/v_proj projections; static decoding "
                      "needs them all NF4 or all dense (quantize them together)")
    other = tiny_llama(seed=5)
    other.model.layers[0].mlp.up_proj = _OtherQuant(other.model.layers[0].mlp.up_proj)
    reason = static_decoding_unsupported(other)
    assert "layer 0 up_proj is a _OtherQuant" in reason and "NF4Linear" in reason and "\n" not in reason
    head = tiny_llama(seed=5)
    lorakit.quantize(head, "nf4", skip=())
    assert static_decoding_unsupported(head) == ("static decoding needs a plain bias-free nn.Linear output head (this one "
                                                 "is quantized: lorakit.quantize leaves lm_head dense unless skip= drops it)")


def test_model_unchanged_and_a_requantized_member_is_fused_again(references_only):
    model = _qlora_llama(seed=4)
    ids = torch.tensor([PROMPTS[0]])
    before = model(input_ids=ids).logits
    keys = list(model.state_dict())
    decoder = StaticDecoder(model, max_batch=2, max_len=8)
    assert torch.equal(model(input_ids=ids).logits, before) and list(model.state_dict()) == keys
    fused = decoder.weights[0]["gate_up"]
    up = model.model.layers[0].mlp.up_proj.base_layer
    assert fused.is_current()
    up.load_dense(up.dequantize() * 2)  # re-quantized: new buffers
    assert not fused.is_current()
    decoder.refresh()
    fused = decoder.weights[0]["gate_up"]
    assert fused.is_current() and torch.equal(fused.member_weight(1, torch.float32), up.dequantize())
    with torch.no_grad():  # an in-place write (a load_state_dict copy) is noticed too
        up.absmax.copy_(up.absmax.flip(0))
    assert not fused.is_current()
    decoder.refresh()
    expected = _reference(model, [[4, 2, 9]], ["a"], steps=1)
    logits, batch = prefill(model, [[4, 2, 9]], ["a"])
    decoder.admit([0], batch)
    _assert_steps(expected, [logits, decoder.step([0], [int(logits[0].argmax())], ["a"])])


def test_a_model_quantized_under_inference_mode_decodes(references_only):
    """Buffers made under torch.inference_mode keep no version counter: the fusion still works. Without double
    quantization (float32 absmax) as well."""
    model = tiny_llama(seed=7, hidden_size=64, intermediate_size=128)
    with torch.inference_mode():
        lorakit.quantize(model, "nf4", double_quant=False)
    assert model.model.layers[0].mlp.down_proj.nested_absmax is None
    decoder = StaticDecoder(model, max_batch=1, max_len=8)
    assert decoder.weights[0]["qkv"].is_current()
    expected = _reference(model, [[4, 2, 9]], [None], steps=1)
    logits, batch = prefill(model, [[4, 2, 9]], [None])
    decoder.admit([0], batch)
    _assert_steps(expected, [logits, decoder.step([0], [int(logits[0].argmax())], [None])])


def test_serve_runs_the_static_decoder_on_an_nf4_model():
    """--decoder static runs it on any device; 'auto' runs it on CUDA only (an H200 decodes an NF4 8B shape 9x
    faster with it than with transformers' forward: docs/PERFORMANCE.md)."""
    from lorakit.serve.cli import static_decoder

    model = _qlora_llama(seed=6)
    decoder = static_decoder(model, "static", max_batch=2, context=32)  # the free-memory cap computes (no cap off CUDA)
    assert isinstance(decoder, StaticDecoder) and decoder.max_len == 32
    assert decoder.weights[0]["down"].nf4 is not None
    assert static_decoder(model, "auto", max_batch=2, context=32) is None  # 'auto' only on CUDA
