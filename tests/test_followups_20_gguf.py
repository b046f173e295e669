"""GGUF export of scaled rotary embeddings: linear, yarn (Llama, Qwen2, Qwen3; linear also Gemma 3's global layers)
and Phi-3's longrope, written as llama.cpp's ``convert_hf_to_gguf.py`` writes them.

Before, ``lorakit merge --gguf`` refused every rope type but default and llama3, so Qwen2.5 / Qwen3 long-context
configs (yarn), linearly scaled Llama fine-tunes and Phi-3 128k (longrope) could not be exported. Each case here is
written, read back with the ``gguf`` package and checked key by key (names, GGUF value types, values, tensors)
against what the converter writes for the same config. Then the written keys are run through llama.cpp's rope
arithmetic, restated here from its sources (llama-model.cpp's loader, llama-context.cpp's yarn attention factor,
ggml's ``ggml_rope_yarn_corr_dims`` / ``rope_yarn``, float32 like ggml), and the cos/sin that gives at 300 positions
must equal transformers' own rotary embedding's (``model.model.rotary_emb``, which carries ``attention_scaling``),
while the same weights without the scaling keys must not: this runs in CI, where llama.cpp is absent. Where
llama-cpp-python is installed, the files' logits are compared with transformers' too (skipped otherwise, as in
test_followups_18_gguf.py)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.export import GGUF_ARCHS, gguf_arch, gguf_rope_scaling, write_gguf
from test_gguf_architectures import SHAPE, TRANSFORMERS_4, qwen_tokenizer

# base 500, head 32, pretraining context 256: yarn's correction dims land at 0 and 10 of the 16 frequency pairs
# (floor / ceil of ggml_rope_yarn_corr_dim for beta_fast 32 / beta_slow 1), so all three yarn bands are exercised,
# and the interpolated low frequencies have turned by radians (not milliradians) within 300 positions
BASE, ORIGINAL, FACTOR = 500.0, 256, 4.0
TINY = {**SHAPE, "max_position_embeddings": int(ORIGINAL * FACTOR)}
POSITIONS = 300
LINEAR = {"rope_type": "linear", "factor": FACTOR, "rope_theta": BASE}
YARN = {"rope_type": "yarn", "factor": FACTOR, "rope_theta": BASE, "original_max_position_embeddings": ORIGINAL}
# Phi-3 128k's layout: long / short factors per frequency pair (head 16: 8 pairs)
SHORT = [1.0 + 0.05 * i for i in range(8)]
LONG = [1.0 + 1.5 * i for i in range(8)]


def _config(cls, **overrides):
    return cls(**{**TINY, **overrides})


def rope_kwargs(rope: dict) -> dict:
    """The config arguments for ``rope``: transformers 5's ``rope_parameters``, or 4's ``rope_scaling`` with
    ``rope_theta`` beside it (the export reads either)."""
    if not TRANSFORMERS_4:
        return {"rope_parameters": dict(rope)}
    rope = dict(rope)
    rope["type"] = rope.pop("rope_type")  # 4.x's Phi-3 takes the old "type" key alone
    return {"rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}


def llama(rope: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(_config(LlamaConfig, vocab_size=360, tie_word_embeddings=False, **rope_kwargs(rope)))


def qwen2(rope: dict, **kwargs):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(_config(Qwen2Config, vocab_size=360, tie_word_embeddings=True, **kwargs,
                                    **(rope_kwargs(rope) if rope else {})))


def qwen2_v4_layout():
    """A transformers 4 checkpoint's config.json: ``rope_scaling`` with the old ``type`` key and ``rope_theta`` beside
    it (Qwen2.5's long-context recipe), read by transformers 5 as users' old checkpoints are."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    raw = {**TINY, "vocab_size": 360, "tie_word_embeddings": True, "model_type": "qwen2", "rope_theta": BASE,
           "rope_scaling": {"type": "yarn", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL}}
    return Qwen2ForCausalLM(Qwen2Config.from_dict(raw))


def qwen3(rope: dict):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(_config(Qwen3Config, vocab_size=360, tie_word_embeddings=False, head_dim=32,
                                    **rope_kwargs(rope)))


def phi3_longrope():
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(_config(Phi3Config, vocab_size=360, tie_word_embeddings=False, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2, original_max_position_embeddings=ORIGINAL,
                                   **rope_kwargs({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                                                  "rope_theta": BASE})))


def gemma3_linear():
    """Gemma 3 4B and up: linear factor 8 on the global layers' rope only; the sliding layers keep base 10000."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    if TRANSFORMERS_4:
        pytest.skip("transformers 4's Gemma 3 config has no per-layer-type rope_parameters")
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    return Gemma3ForCausalLM(_config(Gemma3TextConfig, vocab_size=360, num_hidden_layers=6, num_attention_heads=2,
                                     num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_parameters=rope))


YARN_KEYS = {"rope.scaling.type": "yarn", "rope.scaling.factor": FACTOR, "rope.scaling.original_context_length": ORIGINAL}
LONGROPE_ATTN = math.sqrt(1 + math.log(FACTOR) / math.log(ORIGINAL))  # the converter's: max_position / original = 4
# case -> (builder, llama.cpp architecture, the rope.scaling keys convert_hf_to_gguf.py writes, rope tensors)
CASES = {
    "llama-linear": (lambda: llama(LINEAR), "llama", {"rope.scaling.type": "linear", "rope.scaling.factor": FACTOR}, {}),
    "llama-yarn": (lambda: llama(YARN), "llama", YARN_KEYS, {}),
    "qwen2-linear": (lambda: qwen2(LINEAR), "qwen2", {"rope.scaling.type": "linear", "rope.scaling.factor": FACTOR}, {}),
    "qwen2-yarn": (lambda: qwen2(YARN), "qwen2", YARN_KEYS, {}),
    "qwen2-yarn-transformers4-layout": (qwen2_v4_layout, "qwen2", YARN_KEYS, {}),
    # beta_fast / beta_slow set to their defaults: copied into the file as the converter copies them
    "qwen3-yarn": (lambda: qwen3({**YARN, "beta_fast": 32.0, "beta_slow": 1.0}), "qwen3",
                   {**YARN_KEYS, "rope.scaling.yarn_beta_fast": 32.0, "rope.scaling.yarn_beta_slow": 1.0}, {}),
    "phi3-longrope": (phi3_longrope, "phi3", {"rope.scaling.original_context_length": ORIGINAL,
                                               "rope.scaling.attn_factor": LONGROPE_ATTN},
                      {"rope_factors_long.weight": LONG, "rope_factors_short.weight": SHORT}),
    "gemma3-linear": (gemma3_linear, "gemma3", {"rope.scaling.type": "linear", "rope.scaling.factor": 8.0}, {}),
}


@pytest.fixture(scope="module")
def tokenizer():
    return qwen_tokenizer()


@pytest.fixture(scope="module", params=sorted(CASES))
def written(request, tokenizer, tmp_path_factory):
    """One case's tiny model (float32, random) and its f16 GGUF."""
    builder, arch, keys, tensors = CASES[request.param]
    torch.manual_seed(0)
    model = builder().eval()
    path = tmp_path_factory.mktemp(request.param) / "m-f16.gguf"
    write_gguf(model, tokenizer, path, "f16", "m")
    return {"case": request.param, "model": model, "arch": arch, "keys": keys, "tensors": tensors, "path": path}


def read_back(path) -> tuple[dict, dict, dict]:
    """(key -> value, key -> GGUF value type, rope tensor name -> (float32 array, tensor type)) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    values = {name: field.contents() for name, field in reader.fields.items()}
    types = {name: field.types[0] for name, field in reader.fields.items() if field.types}
    tensors = {t.name: (np.asarray(t.data, dtype=np.float32).reshape(-1), t.tensor_type) for t in reader.tensors
               if t.name.startswith("rope_")}
    return values, types, tensors


def test_the_file_carries_exactly_the_converters_rope_keys(written):
    """Every ``rope.scaling`` key the converter writes for this config is there with its value and GGUF type
    (type: string, original_context_length: uint32, the rest: float32), and no other; rope tensors are float32 with
    the config's factors; the rest of the rope metadata is the model's."""
    import gguf

    values, types, tensors = read_back(written["path"])
    arch = written["arch"]
    assert values["general.architecture"] == arch
    expected = {f"{arch}.{key}": value for key, value in written["keys"].items()}
    scaling = {key: value for key, value in values.items() if ".rope.scaling." in key}
    assert scaling.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, str):
            assert scaling[key] == value and types[key] == gguf.GGUFValueType.STRING
        elif key.endswith("original_context_length"):
            assert scaling[key] == value and types[key] == gguf.GGUFValueType.UINT32
        else:
            assert scaling[key] == pytest.approx(value, rel=1e-7) and types[key] == gguf.GGUFValueType.FLOAT32
    # the key names are gguf's own (gguf.Keys.Rope), which llama.cpp reads
    known = {template.format(arch=arch) for name, template in vars(gguf.Keys.Rope).items() if name.isupper()}
    assert set(expected) <= known
    assert tensors.keys() == written["tensors"].keys()
    for name, factors in written["tensors"].items():
        array, kind = tensors[name]
        assert kind == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(array, np.asarray(factors, dtype=np.float32))
    config = written["model"].config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert values[f"{arch}.rope.dimension_count"] == head_dim
    assert values[f"{arch}.context_length"] == config.max_position_embeddings == ORIGINAL * FACTOR
    assert "blk.0.attn_norm.weight" in {t.name for t in gguf.GGUFReader(str(written["path"])).tensors}


def llama_cpp_cos_sin(values: dict, tensors: dict, arch: str, positions: int, n_ctx: int,
                      drop_scaling: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's rotary cos/sin, (positions, n_rot / 2) float32, for a GGUF's metadata and rope tensors at context
    size ``n_ctx``, restated from its sources (not from lorakit): llama-model.cpp's loader reads rope.freq_base,
    rope.scaling.type (default "linear"), .factor (freq_scale = 1 / factor), .original_context_length (default: the
    context length) and .attn_factor, and for these graphs no yarn_* key (ext_factor 1 for yarn, beta 32 / 1,
    yarn_attn_factor 1); llama-context.cpp then sets yarn's attn_factor to get_mscale(factor) / (1 + 0.1 ln factor)
    (cancelling the factor ggml multiplies back in), times rope.scaling.attn_factor; ggml's rope_yarn turns pair i
    at position p by theta = p * theta_scale^i / freq_factor_i, mixed with freq_scale * theta by the yarn ramp;
    phi3 takes rope_factors_long when n_ctx exceeds the original context, else rope_factors_short."""
    f32 = np.float32
    n_rot = int(values[f"{arch}.rope.dimension_count"])
    n_ctx_train = int(values[f"{arch}.context_length"])
    scaling_keys = {} if drop_scaling else values
    base = f32(values.get(f"{arch}.rope.freq_base", 10000.0))
    kind = scaling_keys.get(f"{arch}.rope.scaling.type", "linear")
    factor = f32(scaling_keys.get(f"{arch}.rope.scaling.factor", 0.0))
    freq_scale = f32(1.0) if factor == 0 or kind == "none" else f32(1.0) / factor
    n_orig = int(scaling_keys.get(f"{arch}.rope.scaling.original_context_length", n_ctx_train))
    attn_factor = f32(1.0)  # yarn_attn_factor: the loader's default for these graphs
    ext_factor = f32(1.0) if kind == "yarn" else f32(0.0)
    if ext_factor != 0:
        mscale_factor = f32(1.0) if 1 / freq_scale <= 1 else f32(0.1) * np.log(1 / freq_scale) + f32(1.0)
        attn_factor = mscale_factor * (f32(1.0) / (f32(1.0) + f32(0.1) * np.log(1 / freq_scale)))
    attn_factor = attn_factor * f32(scaling_keys.get(f"{arch}.rope.scaling.attn_factor", 1.0))

    freq_factors = np.ones(n_rot // 2, dtype=f32)
    if not drop_scaling and "rope_freqs.weight" in tensors:
        freq_factors = tensors["rope_freqs.weight"][0]
    if not drop_scaling and "rope_factors_long.weight" in tensors:
        freq_factors = tensors["rope_factors_long.weight" if n_ctx > n_orig else "rope_factors_short.weight"][0]

    def corr_dim(n_rotations):  # ggml_rope_yarn_corr_dim
        return f32(n_rot) * np.log(f32(n_orig) / (f32(n_rotations) * f32(2) * f32(np.pi))) / (f32(2) * np.log(base))

    low = max(f32(0), np.floor(corr_dim(32.0)))
    high = min(f32(n_rot - 1), np.ceil(corr_dim(1.0)))
    theta_scale = base ** f32(-2.0 / n_rot)
    cos = np.empty((positions, n_rot // 2), dtype=f32)
    sin = np.empty_like(cos)
    for p in range(positions):
        theta_base = f32(p)
        for i in range(n_rot // 2):  # rope_yarn, pair by pair as ggml's cache init
            theta_extrap = theta_base / freq_factors[i]
            theta = freq_scale * theta_extrap
            mscale = attn_factor
            if ext_factor != 0:
                ramp = f32(1) - min(f32(1), max(f32(0), (f32(i) - low) / max(f32(0.001), high - low)))
                mix = ramp * ext_factor
                theta = theta * (f32(1) - mix) + theta_extrap * mix
                mscale = mscale * (f32(1) + f32(0.1) * np.log(f32(1) / freq_scale))
            cos[p, i] = np.cos(theta) * mscale
            sin[p, i] = np.sin(theta) * mscale
            theta_base = theta_base * theta_scale
    return cos, sin


def transformers_cos_sin(model, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's own rotary embedding at positions 0..positions-1: (positions, head_dim / 2) of the first half
    (transformers repeats the frequencies in the second), attention_scaling included."""
    rotary = model.model.rotary_emb
    ids = torch.arange(positions)[None]
    x = torch.zeros(1, positions, 8)
    with torch.no_grad():
        if model.config.model_type == "gemma3_text":  # the global layers' rope carries the scaling
            cos, sin = rotary(x, ids, "full_attention")
        else:
            cos, sin = rotary(x, ids)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()


def test_llama_cpps_rope_arithmetic_on_the_written_keys_is_transformers_rope(written):
    """What llama.cpp computes from the file's keys equals transformers' cos/sin (attention_scaling included) at
    every pair and position up to 300 (past the 256-token original context), to float32 rounding of angles up to
    ~300 rad; with the scaling keys dropped (the file before this change, had it not been refused) the same check
    is off by far more. Longrope is checked with both factor sets: llama.cpp picks them by context size, transformers
    by sequence length, and the two agree on either side of the original context."""
    values, _, tensors = read_back(written["path"])
    arch, model = written["arch"], written["model"]
    runs = [(POSITIONS, POSITIONS)]  # (positions transformers sees, llama.cpp's context size)
    if written["case"] == "phi3-longrope":
        runs.append((ORIGINAL, ORIGINAL))  # short factors on both sides
    for positions, n_ctx in runs:
        expected_cos, expected_sin = transformers_cos_sin(model, positions)
        cos, sin = llama_cpp_cos_sin(values, tensors, arch, positions, n_ctx)
        error = max(float(np.abs(cos - expected_cos).max()), float(np.abs(sin - expected_sin).max()))
        plain_cos, plain_sin = llama_cpp_cos_sin(values, tensors, arch, positions, n_ctx, drop_scaling=True)
        unscaled = max(float(np.abs(plain_cos - expected_cos).max()), float(np.abs(plain_sin - expected_sin).max()))
        assert error < 1e-4, (written["case"], positions, error)
        assert unscaled > 0.1, (written["case"], positions, unscaled)


def test_qwen2_yarn_through_export_merged(tokenizer, tmp_path):
    """The ``lorakit merge --gguf`` path (export_merged: merge an adapter, write the folder and the GGUF) writes the
    yarn keys too, and the folder's config keeps the rope scaling."""
    import json

    import lorakit
    from lorakit.export import export_merged
    from test_serve_support import make_adapter

    torch.manual_seed(0)
    model = qwen2(YARN)
    lorakit.load_adapter(model, make_adapter(model, tmp_path / "adapter", seed=1, std=0.05), adapter="x")
    export_merged(model, tokenizer, "x", tmp_path / "out", dtype=torch.float32, gguf_type="q8_0", name="m")
    values, _, _ = read_back(tmp_path / "out" / "m-q8_0.gguf")
    assert {k: v for k, v in values.items() if ".rope.scaling." in k} == {f"qwen2.{k}": v for k, v in YARN_KEYS.items()}
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    rope = saved.get("rope_parameters") or saved.get("rope_scaling")
    assert rope["rope_type"] == "yarn" and rope["factor"] == FACTOR


def test_transformers_4_rope_scaling_layout_gives_the_same_keys():
    """A config object as transformers 4 holds it (``rope_scaling`` with ``type``, ``rope_theta`` as an attribute,
    no ``rope_parameters``) gives the keys the transformers 5 layout gives, as the converter reads either."""
    v4 = SimpleNamespace(model_type="qwen2", rope_theta=BASE, max_position_embeddings=ORIGINAL * 4, hidden_size=64,
                         num_attention_heads=4, rope_scaling={"type": "yarn", "factor": FACTOR,
                                                              "original_max_position_embeddings": ORIGINAL})
    v5 = qwen2(YARN).config
    assert gguf_rope_scaling(v4, GGUF_ARCHS["qwen2"]) == gguf_rope_scaling(v5, GGUF_ARCHS["qwen2"])
    linear = SimpleNamespace(**{**vars(v4), "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert gguf_rope_scaling(linear, GGUF_ARCHS["qwen2"]) == (
        {"qwen2.rope.scaling.type": "linear", "qwen2.rope.scaling.factor": 2.0}, {})
    # a yarn config without original_max_position_embeddings: transformers scales from max_position_embeddings
    bare = SimpleNamespace(**{**vars(v4), "rope_scaling": {"rope_type": "yarn", "factor": FACTOR}})
    assert gguf_rope_scaling(bare, GGUF_ARCHS["qwen2"])[0]["qwen2.rope.scaling.original_context_length"] == ORIGINAL * 4


@pytest.mark.parametrize("rope, reason", [
    ({**YARN, "beta_fast": 16.0}, "yarn rope differently from transformers"),  # llama.cpp's qwen2 reads no beta_fast
    ({**YARN, "attention_factor": 1.5}, "cos/sin factor 1.13863 vs 1.5"),  # nor yarn_attn_factor
    ({**YARN, "truncate": False}, "yarn rope differently from transformers"),  # ggml always floors / ceils
    ({"rope_type": "dynamic", "factor": FACTOR, "rope_theta": BASE}, "rope type 'dynamic' .* no llama.cpp equivalent"),
])
def test_what_llama_cpp_would_run_differently_is_refused_in_one_line(rope, reason):
    """The converter would copy these keys, but llama.cpp's qwen2 graph ignores them (or, dynamic NTK, has no such
    rope): the file would run differently from the model, so the export stops before any work, in one line."""
    config = qwen2(rope).config
    with pytest.raises(LorakitError, match=reason) as info:
        gguf_arch(config)
    assert "\n" not in str(info.value)
    if rope["rope_type"] == "dynamic":  # it says what equals it and how to get that
        assert "1024 tokens" in str(info.value) and "'default'" in str(info.value)


def test_rope_types_a_family_graph_does_not_take_are_refused():
    """Gemma2's converter writes no rope scaling (llama.cpp would run it unscaled); longrope exists only in llama.cpp's
    phi3 graph; llama3's rope_freqs only in its llama graph."""
    from transformers import Gemma2Config, LlamaConfig

    gemma2 = Gemma2Config(**{**TINY, "head_dim": 16, "query_pre_attn_scalar": 16}, **rope_kwargs(LINEAR))
    with pytest.raises(LorakitError, match="rope type 'linear' is not supported yet on llama.cpp's gemma2 graph"):
        gguf_arch(gemma2)
    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "rope_theta": BASE,
                "original_max_position_embeddings": ORIGINAL}
    with pytest.raises(LorakitError, match="rope type 'longrope' is not supported yet on llama.cpp's llama graph"):
        gguf_arch(_config(LlamaConfig, vocab_size=360, **rope_kwargs(longrope)))


@pytest.mark.parametrize("case", ["llama-linear", "qwen2-yarn", "qwen3-yarn", "phi3-longrope", "gemma3-linear"])
def test_llama_cpp_runs_the_scaled_rope_files_as_transformers(case, tokenizer, tmp_path):
    """llama.cpp's logits over 300 positions (past the 256-token original context) equal the model's up to f16
    rounding (its weights, and llama.cpp's f16 KV cache: this random model amplifies rounding, so the bound is three
    times the error of transformers itself with f16-rounded weights), pick the same tokens, and the same weights under
    default rope differ from the model by far more. Phi-3's longrope runs twice: a 512-token context past the
    original one (long factors; transformers takes them for 300 tokens) and a 256-token one (short factors, as
    transformers for 200 tokens)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    builder = CASES[case][0]
    torch.manual_seed(0)
    model = builder().eval()
    path = tmp_path / "m-f16.gguf"
    write_gguf(model, tokenizer, path, "f16", "m")
    plain_config = copy.deepcopy(model.config)
    plain_config.rope_parameters = {"rope_type": "default", "rope_theta": BASE}
    if TRANSFORMERS_4:
        plain_config.rope_scaling, plain_config.rope_theta = None, BASE
    if case == "gemma3-linear":  # the global layers' rope unscaled, the sliding layers' as they were
        plain_config.rope_parameters = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    plain = type(model)(plain_config).eval()
    plain.load_state_dict(model.state_dict())
    for positions, n_ctx in [(POSITIONS, 512)] + ([(200, ORIGINAL)] if case == "phi3-longrope" else []):
        ids = torch.randint(3, len(tokenizer), (positions,), generator=torch.Generator().manual_seed(3)).tolist()
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()
            rounded = copy.deepcopy(model).half().float()(torch.tensor([ids])).logits[0].numpy()
            unscaled = plain(torch.tensor([ids])).logits[0].numpy()
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=1, seed=0)
        llm.eval(ids)
        actual = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        error, f16_error = float(np.abs(actual - expected).max()), float(np.abs(rounded - expected).max())
        default_rope = float(np.abs(unscaled - expected).max())
        print(f"{case} ({positions} tokens, n_ctx {n_ctx}): max |llama.cpp - transformers| = {error:.4f}, f16-rounded "
              f"weights in transformers {f16_error:.4f}, default rope {default_rope:.4f}")
        assert error <= 3 * f16_error, (error, f16_error)
        assert (actual.argmax(-1) == expected.argmax(-1)).mean() >= 0.95
        assert default_rope > 5 * error, (default_rope, error)
