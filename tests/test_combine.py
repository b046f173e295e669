"""combine_adapters against peft's add_weighted_adapter on the same inputs: equal tensors, bit for bit, for every
method; the cases where lorakit differs on purpose (rsLoRA first input, DoRA, modules_to_save) and every refusal."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import lorakit
from conftest import assert_close, tiny_llama
from lorakit.cli import main
from lorakit.combine import METHODS, combine_adapters
from lorakit.inject import lora_layers
from test_serve_support import make_adapter
from test_train_helpers import tiny_folder  # noqa: F401 (fixture)

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))
WEIGHTS = {"math": 0.7, "chat": -0.4}


def _quiet_inject(peft_model):
    """peft creates the new adapter (a random init, overwritten at once) before it combines; lorakit draws nothing
    there. Run peft's creation on a forked generator, so DARE's masks come from the same generator state in both."""
    original = peft_model.base_model.inject_adapter

    def inject_without_draws(*args, **kwargs):
        with torch.random.fork_rng():
            return original(*args, **kwargs)

    peft_model.base_model.inject_adapter = inject_without_draws
    return peft_model


def _peft_pair(folder, rank_b: int = 4, rslora_first: bool = False):
    """peft model with math (LoRA on q, v and the embedding) and chat (rsLoRA, another alpha, on q, k, up), saved to
    ``folder``; non-zero B everywhere (init_lora_weights=False)."""
    torch.manual_seed(1)
    config_a = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                               use_rslora=rslora_first, init_lora_weights=False)
    config_b = peft.LoraConfig(r=rank_b, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj"],
                               use_rslora=not rslora_first, init_lora_weights=False)
    peft_model = peft.get_peft_model(tiny_llama(), config_a, adapter_name="math")
    peft_model.add_adapter("chat", config_b)
    peft_model.eval().save_pretrained(folder)
    return _quiet_inject(peft_model)


def _lorakit_pair(folder, model=None):
    model = tiny_llama() if model is None else model
    lorakit.load_adapter(model, folder / "math", adapter="math")
    lorakit.load_adapter(model, folder / "chat", adapter="chat")
    return model


def _peft_tensors(peft_model, path: str, name: str):
    layer = peft_model.base_model.model.get_submodule(path)
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.lora_embedding_A[name], layer.lora_embedding_B[name]


def _assert_equal_to_peft(model, peft_model, name: str) -> int:
    layers = {p: layer for p, layer in lora_layers(model).items() if name in layer.adapters}
    for path, layer in layers.items():
        lora_A, lora_B = _peft_tensors(peft_model, path, name)
        ours = layer.adapters[name]
        assert torch.equal(ours.lora_A, lora_A) and torch.equal(ours.lora_B, lora_B), f"{name}: {path} differs from peft"
        assert ours.scaling == 1.0
    return len(layers)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    return _peft_pair(folder), _lorakit_pair(folder)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_peft_tensors_bit_for_bit(pair, method):
    peft_model, model = pair
    options = {"density": 0.5} if method.removesuffix("_svd") in ("ties", "dare_linear", "dare_ties", "magnitude_prune") else {}
    torch.manual_seed(123)  # DARE draws from the global generator in peft's order
    peft_model.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), method, combination_type=method, **options)
    torch.manual_seed(123)
    assert combine_adapters(model, WEIGHTS, name=method, method=method, **options) == method
    assert _assert_equal_to_peft(model, peft_model, method) == 9  # embedding + q, k, v, up in 2 layers
    assert lorakit.active_adapters(model) == [method]
    peft_model.set_adapter(method)
    assert_close(model(IDS).logits, peft_model(IDS).logits)


def test_options_different_ranks_and_conv1d_agree_with_peft(tmp_path):
    peft_model = _peft_pair(tmp_path, rank_b=2)
    model = _lorakit_pair(tmp_path)
    for method, options in (("cat", {}), ("svd", {"svd_rank": 3, "svd_clamp": 0.9}), ("ties_svd", {"density": 0.3})):
        peft_model.add_weighted_adapter(["math", "chat"], [0.7, -0.4], method, combination_type=method, **options)
        combine_adapters(model, WEIGHTS, name=method, method=method, **options)
        _assert_equal_to_peft(model, peft_model, method)
    assert model.model.layers[0].self_attn.q_proj.adapters["cat"].rank == 6  # 4 + 2
    assert model.model.layers[0].self_attn.q_proj.adapters["svd"].rank == 3

    # GPT-2's Conv1D (peft's fan_in_fan_out) and DARE on the full deltas: peft draws the masks in the (in, out) layout
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()

    config = dict(target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True, init_lora_weights=False)
    peft_model = peft.get_peft_model(gpt2(), peft.LoraConfig(r=2, lora_alpha=4, **config), adapter_name="math")
    peft_model.add_adapter("chat", peft.LoraConfig(r=2, lora_alpha=8, **config))
    peft_model.save_pretrained(tmp_path / "gpt2")
    _quiet_inject(peft_model)
    model = gpt2()
    lorakit.load_adapter(model, tmp_path / "gpt2" / "math", adapter="math")
    lorakit.load_adapter(model, tmp_path / "gpt2" / "chat", adapter="chat")
    for method in ("dare_ties_svd", "dare_linear", "svd"):
        options = {} if method == "svd" else {"density": 0.5}
        torch.manual_seed(9)
        peft_model.add_weighted_adapter(["math", "chat"], [0.5, 0.5], method, combination_type=method, **options)
        combine_adapters(model, {"math": 0.5, "chat": 0.5}, name=method, method=method, seed=9, **options)
        assert _assert_equal_to_peft(model, peft_model, method) == 3


def test_rank_pattern_and_svd_rank_above_a_layer_keep_the_product(tmp_path):
    """peft writes a linear layer below the common rank at its own size (its file then does not load) and raises on
    an svd_rank above min(out, in); lorakit zero-pads both, so the adapter is exactly what was asked."""
    model = tiny_llama()
    config = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2})
    for name in ("math", "chat"):
        lorakit.inject(model, lorakit.LoraConfig(**config), adapter=name)
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(model):
            p.normal_(0, 0.2)
    combine_adapters(model, WEIGHTS, name="lin", method="linear")
    v = model.model.layers[0].self_attn.v_proj.adapters
    assert v["lin"].rank == 4 and torch.equal(v["lin"].lora_B[:, 2:], torch.zeros(v["lin"].lora_B.shape[0], 2))
    lorakit.save_adapter(model, tmp_path / "lin", adapter="lin")
    expected = model(IDS).logits
    assert_close(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lin").eval()(IDS).logits, expected)
    combine_adapters(model, WEIGHTS, name="cat")
    exact = model(IDS).logits
    combine_adapters(model, WEIGHTS, name="big", method="svd", svd_rank=40)  # the 32-wide embedding keeps 32
    assert model.model.embed_tokens.adapters["big"].rank == 40
    assert_close(model(IDS).logits, exact)


# -- what lorakit does where peft's result would be wrong or lost ----------------------------------------------------
def test_rslora_first_input_saves_a_scaling_one_adapter_peft_and_lorakit_agree_on(tmp_path):
    """peft's combined adapter copies use_rslora from the first input (scaling sqrt(r) on tensors made for 1);
    lorakit's tensors are peft's, saved as plain LoRA with alpha = r, so the file means the weighted sum."""
    peft_model = _peft_pair(tmp_path, rank_b=2, rslora_first=True)
    model = _lorakit_pair(tmp_path)
    peft_model.add_weighted_adapter(["math", "chat"], [1.0, 1.0], "code", combination_type="cat")
    combine_adapters(model, ["math", "chat"], name="code")  # weights default to 1.0 each
    _assert_equal_to_peft(model, peft_model, "code")
    combined = model(IDS).logits
    lorakit.set_adapter(model, ["math", "chat"])  # both inputs applied at once: what cat with weights 1, 1 is
    assert_close(combined, model(IDS).logits)
    lorakit.save_adapter(model, tmp_path / "code", adapter="code")
    saved = json.loads((tmp_path / "code" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["use_rslora"], saved["use_dora"]) == (6, 6, False, False)
    assert sorted(saved["target_modules"]) == ["embed_tokens", "k_proj", "q_proj", "up_proj", "v_proj"]
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "code").eval()
    assert_close(reloaded(IDS).logits, combined)


def test_cat_is_the_exact_weighted_sum_and_merges_like_any_adapter(tmp_path):
    model = _lorakit_pair(_peft_pair(tmp_path, rank_b=2) and tmp_path)
    combine_adapters(model, WEIGHTS, name="mix")
    for path, layer in lora_layers(model).items():
        expected = sum(w * layer.adapters[n].delta_weight() for n, w in WEIGHTS.items() if n in layer.adapters)
        assert_close(layer.adapters["mix"].delta_weight(), expected, msg=path)
        assert not layer.adapters["mix"].lora_A.requires_grad and not layer.adapters["mix"].training
    unmerged = model(IDS).logits
    lorakit.merge(model, "mix")
    assert_close(model(IDS).logits, unmerged)
    lorakit.unmerge(model)
    # svd at the full rank is exact too; linear (A and B summed apart) is not the weighted sum
    combine_adapters(model, WEIGHTS, name="full", method="svd", svd_rank=6)
    assert_close(model(IDS).logits, unmerged)
    # the same svd from the inputs' factors (QR + a small SVD), without an SVD of any full (out, in) update
    for rank in (6, 3):
        combine_adapters(model, WEIGHTS, name=f"dense{rank}", method="svd", svd_rank=rank)
        combine_adapters(model, WEIGHTS, name=f"fast{rank}", method="svd", svd_rank=rank, svd_lowrank=True)
        for path, layer in lora_layers(model).items():
            assert_close(layer.adapters[f"fast{rank}"].delta_weight(), layer.adapters[f"dense{rank}"].delta_weight(), msg=path)
    lorakit.set_adapter(model, "fast6")
    assert_close(model(IDS).logits, unmerged)
    with pytest.raises(lorakit.LorakitError, match="svd_lowrank works with method='svd' only, not 'ties_svd'"):
        combine_adapters(model, WEIGHTS, name="no", method="ties_svd", density=0.5, svd_lowrank=True)


def test_modules_to_save_copy_passes_on_from_its_one_owner(tmp_path):
    torch.manual_seed(2)
    config = dict(r=2, alpha=4, target_modules=["q_proj"])
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(**config, modules_to_save=["lm_head"]), adapter="math")
    lorakit.inject(model, lorakit.LoraConfig(**config), adapter="chat")
    with torch.no_grad():
        model.lm_head.copies["math"].weight.add_(0.05)
        for _, p in lorakit.lora_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    combine_adapters(model, {"math": 1.0, "chat": 0.5}, name="mix")
    assert torch.equal(model.lm_head.copies["mix"].weight, model.lm_head.copies["math"].weight)
    assert model.lm_head.copies["mix"] is not model.lm_head.copies["math"]
    expected = model(IDS).logits
    lorakit.save_adapter(model, tmp_path / "mix", adapter="mix")
    assert json.loads((tmp_path / "mix" / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    assert_close(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "mix").eval()(IDS).logits, expected)
    lorakit.inject(model, lorakit.LoraConfig(**config, modules_to_save=["lm_head"]), adapter="code")
    with pytest.raises(lorakit.LorakitError, match=r"adapters math, code each have a trained copy of lm_head"):
        combine_adapters(model, ["math", "code"], name="both")


def test_nf4_base_combines_the_same_tensors(tmp_path):
    peft_model = _peft_pair(tmp_path, rank_b=2)
    dense = _lorakit_pair(tmp_path)
    quantized = _lorakit_pair(tmp_path, lorakit.quantize(tiny_llama(), "nf4"))
    for model in (dense, quantized):
        combine_adapters(model, WEIGHTS, name="mix", method="ties_svd", density=0.5)
    peft_model.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "mix", combination_type="ties_svd", density=0.5)
    assert _assert_equal_to_peft(quantized, peft_model, "mix") == 9
    assert isinstance(quantized.model.layers[0].self_attn.q_proj.base_layer, lorakit.NF4Linear)
    with lorakit.disable_adapters(quantized):
        base = quantized(IDS).logits
    assert not torch.allclose(quantized(IDS).logits, base)  # the combined adapter runs on the 4-bit base


def test_dare_seed_is_reproducible_and_leaves_the_global_generator_alone(tmp_path):
    model = _lorakit_pair(_peft_pair(tmp_path) and tmp_path)
    state = torch.random.get_rng_state()
    for name, seed in (("x", 7), ("y", 7), ("z", 8)):
        combine_adapters(model, WEIGHTS, name=name, method="dare_ties", density=0.5, seed=seed)
    assert torch.equal(torch.random.get_rng_state(), state)
    q = model.model.layers[0].self_attn.q_proj.adapters
    assert torch.equal(q["x"].lora_A, q["y"].lora_A) and not torch.equal(q["x"].lora_A, q["z"].lora_A)
    # one input: peft's rule, every method is linear (said in a warning), which is the adapter itself
    with pytest.warns(UserWarning, match="method 'ties' is 'linear'"):
        combine_adapters(model, {"math": 1.0}, name="only_a", method="ties", density=0.5)
    lorakit.set_adapter(model, "math")
    expected = model(IDS).logits
    lorakit.set_adapter(model, "only_a")
    assert_close(model(IDS).logits, expected)


def test_overwrite_replaces_an_adapter_even_an_input(tmp_path):
    model = _lorakit_pair(_peft_pair(tmp_path) and tmp_path)
    q = model.model.layers[0].self_attn.q_proj
    before = q.adapters["math"].delta_weight()
    with pytest.raises(lorakit.LorakitError, match="already has an adapter named 'math'; pass another name, or overwrite=True"):
        combine_adapters(model, {"math": 0.5}, name="math")
    combine_adapters(model, {"math": 0.5}, name="math", overwrite=True)  # the adapter at half strength
    assert_close(q.adapters["math"].delta_weight(), 0.5 * before)
    assert sorted(lorakit.adapter_names(model)) == ["chat", "math"] and model.lorakit_configs["math"].r == 4
    lorakit.merge(model, "math")
    with pytest.raises(lorakit.LorakitError, match="adapter 'math' is merged .* so it cannot be overwritten; call lorakit.unmerge"):
        combine_adapters(model, {"chat": 1.0}, name="math", overwrite=True)
    with pytest.raises(lorakit.LorakitError, match="adapter 'math' is merged into the base .* call lorakit.unmerge"):
        combine_adapters(model, {"chat": 1.0}, name="new")
    lorakit.unmerge(model)
    import numpy as np  # weights as an array, as a sweep over mixing weights would give them

    combine_adapters(model, ["math", "chat"], weights=np.array([0.25, 0.75]), name="sweep")
    combine_adapters(model, ["math", "chat"], weights=torch.tensor([0.25, 0.75]), name="sweep2")
    assert torch.equal(q.adapters["sweep"].lora_A, q.adapters["sweep2"].lora_A)


def test_mistakes_are_one_line_and_leave_the_model_as_it_was(tmp_path):
    model = _lorakit_pair(_peft_pair(tmp_path, rank_b=2) and tmp_path)
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["o_proj"], variant="dora"), adapter="dora")
    lorakit.set_adapter(model, "math")
    expected = model(IDS).logits
    cases = [
        (dict(adapters={"math": 1.0, "nope": 1.0}), r"unknown adapter 'nope'; this model has: math, chat, dora"),
        (dict(adapters=["math", "chat"], weights=[1.0]), r"2 adapters \(math, chat\) but 1 weights; give one weight per adapter"),
        (dict(adapters={"math": 1.0}, weights=[1.0]), "give the weights once"),
        (dict(adapters=["math", "math"]), "adapter 'math' is named twice"),
        (dict(adapters={"math": float("nan")}), "the weight of adapter 'math' must be a finite number"),
        (dict(adapters={"math": "0.5"}), "the weight of adapter 'math' must be a finite number"),
        (dict(adapters=[]), "no adapters to combine"),
        (dict(adapters=WEIGHTS, name="chat"), "already has an adapter named 'chat'"),
        (dict(adapters=WEIGHTS, name="x.y"), "without dots"),
        (dict(adapters=WEIGHTS, method="TIES"), r"unknown method 'TIES' \(did you mean 'ties'\?\)"),
        (dict(adapters=WEIGHTS, method="ties"), "method 'ties' needs density"),
        (dict(adapters=WEIGHTS, method="dare_linear", density=0), r"density must be a number in \(0, 1\]"),
        (dict(adapters=WEIGHTS, density=0.5), "density applies to the ties / dare / magnitude_prune methods, not 'cat'"),
        (dict(adapters=WEIGHTS, svd_rank=2), "svd_rank / svd_clamp / svd_driver apply to the svd methods"),
        (dict(adapters=WEIGHTS, method="svd", svd_rank=0), "svd_rank must be a positive integer"),
        (dict(adapters=WEIGHTS, method="svd", svd_driver="gesvdj"), "works on CUDA tensors only"),
        (dict(adapters=WEIGHTS, method="linear"), r"needs adapters of one rank, got math: r=4, chat: r=2; use method='cat'"),
        (dict(adapters=WEIGHTS, method="ties", density=0.5, majority_sign_method="max"), "majority_sign_method must be"),
        (dict(adapters={"math": 1.0, "dora": 1.0}), r"adapter 'dora' is DoRA .* merge them one at a time"),
        (dict(adapters=WEIGHTS, combination_type="ties", adapter_name="x"),
         r"unknown keyword\(s\): combination_type= \(peft's name: write method=\); adapter_name= \(peft's name: write name=\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(lorakit.LorakitError, match=message) as caught:
            combine_adapters(model, **kwargs)
        assert "\n" not in str(caught.value)
    assert lorakit.adapter_names(model) == ["math", "chat", "dora"] and lorakit.active_adapters(model) == ["math"]
    assert_close(model(IDS).logits, expected)


# -- the command -----------------------------------------------------------------------------------------------------
def test_combine_command_writes_a_peft_folder(tmp_path, tiny_folder, capsys):  # noqa: F811 (fixture)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_folder)
    first = make_adapter(base, tmp_path / "first", seed=1, r=4)
    second = make_adapter(base, tmp_path / "second", seed=2, r=2, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "mix"
    args = ["combine", "--model", str(tiny_folder), "--adapter", f"{first}=0.7", "--adapter", f"{second}=-0.3", "--out"]
    assert main([*args, str(out), "--method", "svd", "--svd-rank", "3"]) == 0
    assert "with svd: rank 3 on" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    lorakit.load_adapter(model, first, adapter="first")
    lorakit.load_adapter(model, second, adapter="second")
    combine_adapters(model, {"first": 0.7, "second": -0.3}, name="mix", method="svd", svd_rank=3)
    ids = torch.randint(0, 32, (1, 6))
    expected = model(ids).logits
    again = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    lorakit.load_adapter(again, out)
    assert_close(again(ids).logits, expected)

    def error(argv) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err.strip().splitlines()[-1]

    assert "already exists" in error([*args, str(out)])
    assert "the weight after '=' must be a number" in error([*args[:4], f"{first}=lots", "--out", str(tmp_path / "x")])
    assert "is given twice" in error([*args[:4], f"{first}=1", "--adapter", str(first), "--out", str(tmp_path / "x")])
    assert "--density applies to" in error([*args, str(tmp_path / "x"), "--density", "0.5"])
    assert "method 'ties' needs --density, the share" in error([*args, str(tmp_path / "x"), "--method", "ties"])
    assert "--svd-rank / --svd-clamp apply to the svd methods" in error([*args, str(tmp_path / "x"), "--svd-rank", "2"])
    assert not (tmp_path / "x").exists()
    assert "got first: r=4, second: r=2" in error([*args, str(out), "--overwrite", "--method", "dare_ties", "--density", "0.5"])
    assert main([*args, str(out), "--overwrite", "--method", "dare_ties_svd", "--density", "0.5"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert main(["combine", "--model", str(tiny_folder), "--adapter", f"{second}=-1", "--out", str(out), "--overwrite",
                 "--method", "svd"]) == 0  # one input: linear, said in one plain line
    printed = capsys.readouterr()
    assert "warning: one input adapter, so method 'svd' is 'linear'" in printed.err and "with linear: rank 2" in printed.out
    assert "Warning" not in printed.err and "warning" not in printed.out  # stdout: the result only


def test_combined_adapter_serves_in_mixed_batches_and_keeps_16_bit_inputs_dtype():
    model = tiny_llama()
    for seed, name in ((1, "math"), (2, "chat")):
        torch.manual_seed(seed)
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), adapter=name,
                       dtype=torch.float16)
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(model):
            p.normal_(0, 0.2)
    for method in ("cat", "svd", "dare_linear"):
        combine_adapters(model, WEIGHTS, name=method, method=method, **({"density": 0.7, "seed": 0} if "dare" in method else {}))
        assert model.model.layers[1].self_attn.v_proj.adapters[method].lora_A.dtype == torch.float16
    ids = IDS[:1].repeat(3, 1)
    alone = {}
    for name in ("cat", "svd"):
        lorakit.set_adapter(model, name)
        alone[name] = model(ids[:1]).logits[0]
    with torch.no_grad(), lorakit.mixed_batch(model, ["cat", None, "svd"]):
        mixed = model(ids).logits
    # float16 adapters: the stacked mixed-batch path and the one-adapter path round differently (float16's tolerance)
    assert_close(mixed[0], alone["cat"], dtype=torch.float16)
    assert_close(mixed[2], alone["svd"], dtype=torch.float16)
    with lorakit.disable_adapters(model):
        assert_close(mixed[1], model(ids[:1]).logits[0])
