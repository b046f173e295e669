"""LoRA on fused MoE experts and other raw parameters (``LoraConfig(target_parameters=...)``, lorakit.param_lora).

transformers 5 keeps Mixtral / Qwen3-MoE experts as 3-D nn.Parameters, which "all-linear" cannot reach: inject says
so in one line naming the option. With ``target_parameters`` lorakit adapts them with peft's ParamWrapper math and
file format: each case below is compared with the real peft 0.21 (same logits, same gradients, files read both
ways), and with a per-expert pure-PyTorch reference written out here.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from torch import nn

import lorakit
from conftest import assert_close
from lorakit.errors import LorakitError
from lorakit.param_lora import ParamLora
from model_helpers import logits

# MoE experts are fused 3-D parameters (what target_parameters adapts) only from transformers 5; 4.x builds one
# nn.Linear per expert, which target_modules adapts like any other layer
FUSED_EXPERTS = hasattr(tf, "MixtralForCausalLM") and any(p.ndim == 3 for p in tf.MixtralForCausalLM(tf.MixtralConfig(
    vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    num_local_experts=2)).parameters())
pytestmark = pytest.mark.skipif(not FUSED_EXPERTS, reason="fused 3-D MoE expert parameters need transformers >= 5")
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROUTER = ["mlp.gate.weight"]
TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            max_position_embeddings=64)


def build(kind: str = "mixtral", seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, **TINY))
    elif kind == "gpt_oss":  # experts stored (experts, in, out): transformers' is_transposed layout
        model = tf.GptOssForCausalLM(tf.GptOssConfig(num_local_experts=4, head_dim=8, layer_types=["full_attention"] * 2,
                                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                                     **TINY))
    else:
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(num_experts=4, head_dim=8, moe_intermediate_size=24,
                                                         norm_topk_prob=True, **TINY))
    with torch.no_grad():  # Qwen3-MoE's router starts at zero: random, so the routing depends on the input
        for name, parameter in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                parameter.normal_(std=0.5)
    return model.to(dtype).eval()


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Random non-zero B (A is random already), so every adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=gen))


IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 61], [12, 7, 7, 30, 55, 21, 4]])


def test_all_linear_says_the_experts_stay_frozen_and_names_the_option():
    model = build("mixtral")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.inject(model, lorakit.LoraConfig(r=2))
    said = [str(w.message) for w in caught if "fused MoE expert weights" in str(w.message)]
    assert len(said) == 1 and "\n" not in said[0]
    assert "target_parameters=['mlp.experts.down_proj', 'mlp.experts.gate_up_proj']" in said[0]
    assert "--target-parameters mlp.experts.down_proj,mlp.experts.gate_up_proj" in said[0]
    model = build("mixtral")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_parameters=EXPERTS))
    assert not [w for w in caught if "fused MoE expert weights" in str(w.message)]  # adapted: nothing to say
    assert isinstance(model.model.layers[1].mlp.experts, ParamLora)


def _reference_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                      transposed: bool) -> torch.Tensor:
    """The spec, one expert at a time: expert e uses rows e*r.. of A and columns k*E + e of B (peft's layout)."""
    if weight.ndim == 2:
        return weight + scaling * lora_B @ lora_A
    experts = weight.shape[0]
    rank = lora_A.shape[0] // experts
    out = weight.clone()
    for e in range(experts):
        A_e = lora_A[e * rank:(e + 1) * rank]  # (r, in)
        B_e = lora_B[:, [k * experts + e for k in range(rank)]]  # (out, r)
        delta = scaling * B_e @ A_e  # (out, in)
        out[e] = out[e] + (delta.T if transposed else delta)
    return out


class TransposedExperts(nn.Module):
    """GPT-OSS-style experts stored (experts, in, out) and flagged ``is_transposed``, plus a 2-D router weight."""

    is_transposed = True

    def __init__(self, experts: int = 3, hidden: int = 6, ffn: int = 5):
        super().__init__()
        self.router = nn.Parameter(torch.randn(experts, hidden))
        self.up = nn.Parameter(torch.randn(experts, hidden, ffn) / 3)
        self.down = nn.Parameter(torch.randn(experts, ffn, hidden) / 3)

    def forward(self, x):  # x (tokens, hidden): each token through its top-1 expert
        chosen = (x @ self.router.T).argmax(-1)
        return torch.stack([torch.relu(x[t] @ self.up[e]) @ self.down[e] for t, e in enumerate(chosen.tolist())])


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = TransposedExperts()

    def forward(self, x):
        return self.block(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # pure PyTorch: no Triton here
def test_adapted_weights_match_the_per_expert_reference_in_both_layouts(dtype):
    model = build("mixtral", dtype=dtype)
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=5, target_modules=[], target_parameters=EXPERTS + ROUTER))
    holder = Holder().to(dtype)
    lorakit.inject(holder, lorakit.LoraConfig(r=2, alpha=3, variant="rslora", target_modules=None,
                                              target_parameters=["block.up", "block.down", "block.router"]))
    randomize(model)
    randomize(holder)
    hosts = [model.model.layers[0].mlp.experts, model.model.layers[1].mlp.gate, holder.block]
    for host in hosts:
        adapted = host.adapted_parameters(["default"])
        for name, adapter in host.adapters["default"].items():
            weight = host.base_layer._parameters[name]
            expected = _reference_weight(weight.double(), adapter.lora_A.double(), adapter.lora_B.double(),
                                         adapter.scaling, getattr(host.base_layer, "is_transposed", False))
            assert adapted[name].dtype == weight.dtype and adapted[name].shape == weight.shape
            assert_close(adapted[name], expected, dtype)
    # rsLoRA scales by alpha / sqrt(r); the rank is per expert, whatever the number of experts
    assert holder.block.adapters["default"]["up"].scaling == pytest.approx(3 / 2 ** 0.5)
    assert tuple(holder.block.adapters["default"]["up"].lora_A.shape) == (2 * 3, 6)  # (r * E, in): in=hidden here


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_lorakit_adapter_loads_in_peft_and_back_with_the_same_logits(kind, tmp_path):
    ours = build(kind)
    router = ["mlp.router.weight"] if kind == "gpt_oss" else ROUTER
    assert getattr(ours.model.layers[0].mlp.experts, "is_transposed", False) == (kind == "gpt_oss")
    lorakit.inject(ours, lorakit.LoraConfig(r=2, alpha=6, target_modules=["q_proj", "v_proj"],
                                            target_parameters=EXPERTS + router, rank_pattern={"down_proj": 3}))
    randomize(ours)
    expected = logits(ours, IDS)
    assert (expected - logits(build(kind), IDS)).abs().max() > 1e-2  # the adapter matters
    lorakit.save_adapter(ours, tmp_path / "ours")
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.mlp."
    # peft nests one wrapper per parameter, the first registered innermost: gate_up_proj one base_layer deeper
    assert tuple(keys[prefix + "experts.base_layer.lora_A.weight"].shape) == (2 * 4, 32)  # (r * experts, hidden)
    assert tuple(keys[prefix + "experts.base_layer.lora_B.weight"].shape) == (48, 2 * 4)  # (2 x ffn, r * experts)
    assert tuple(keys[prefix + "experts.lora_A.weight"].shape) == (3 * 4, 24)  # rank_pattern: down_proj rank 3
    assert tuple(keys[prefix + router[0].split(".")[1] + ".lora_B.weight"].shape) == (4, 2)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(EXPERTS + router)

    theirs = peft.PeftModel.from_pretrained(build(kind), tmp_path / "ours").eval()
    assert_close(logits(theirs, IDS), expected)
    theirs.save_pretrained(tmp_path / "peft")  # and peft's own file of the same adapter loads back in lorakit
    again = build(kind)
    lorakit.load_adapter(again, tmp_path / "peft")
    assert_close(logits(again, IDS), expected)


def test_peft_made_adapter_loads_in_lorakit_experts_only(tmp_path):
    """A peft adapter on the experts alone (target_modules=[]), random weights from peft's own init."""
    theirs = peft.get_peft_model(build("qwen3_moe"), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERTS, use_rslora=True, init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path)
    ours = build("qwen3_moe")
    lorakit.load_adapter(ours, tmp_path)
    assert not any(isinstance(m, lorakit.layers.LoraLayer) for m in ours.modules())  # no attention LoRA added
    assert_close(logits(ours, IDS), logits(theirs, IDS))
    lorakit.save_adapter(ours, tmp_path / "again")
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["target_modules"] == [] and config["use_rslora"] is True  # [] keeps peft from adding q/v defaults
    back = peft.PeftModel.from_pretrained(build("qwen3_moe"), tmp_path / "again").eval()
    assert_close(logits(back, IDS), logits(theirs, IDS))


def test_transposed_layout_and_2d_parameters_match_peft(tmp_path):
    x = torch.randn(9, 6)
    ours = Holder().eval()
    reference, plain = Holder(), Holder()
    reference.load_state_dict(ours.state_dict())
    plain.load_state_dict(ours.state_dict())
    lorakit.inject(ours, lorakit.LoraConfig(r=2, alpha=4, target_modules=None,
                                            target_parameters=["block.up", "block.down", "block.router"]))
    randomize(ours)
    lorakit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(reference, tmp_path).eval()
    with torch.no_grad():
        assert_close(ours(x), theirs(x))
        assert (ours(x) - plain(x)).abs().max() > 1e-3


def test_gradients_reach_only_the_adapters_and_equal_peft(tmp_path):
    ours = build("mixtral")
    lorakit.inject(ours, lorakit.LoraConfig(r=2, alpha=4, target_modules=["o_proj"], target_parameters=EXPERTS + ROUTER))
    randomize(ours)
    lorakit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build("mixtral"), tmp_path, is_trainable=True)
    ours.train()
    theirs.train()
    ours(IDS, labels=IDS).loss.backward()
    theirs(IDS, labels=IDS).loss.backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert all(".adapters." in n for n in ours_grads) and len(ours_grads) == 2 * 2 * (1 + 3)  # A, B x layers x hosts
    peft_grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    layer = "model.layers.1.mlp."
    pairs = {"experts.adapters.default.gate_up_proj.lora_A": "experts.base_layer.lora_A.default.weight",
             "experts.adapters.default.down_proj.lora_B": "experts.lora_B.default.weight",
             "gate.adapters.default.weight.lora_A": "gate.lora_A.default.weight"}
    for mine, peft_name in pairs.items():
        grad = ours_grads[layer + mine]
        assert grad.abs().max() > 0
        assert_close(grad, peft_grads["base_model.model." + layer + peft_name])


def test_training_steps_move_only_the_adapters():
    model = build("qwen3_moe")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=[], target_parameters=EXPERTS))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for _, p in lorakit.lora_parameters(model)], lr=0.05)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_merge_unmerge_and_merge_and_unload(tmp_path):
    model = build("mixtral")
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_parameters=EXPERTS + ROUTER))  # all-linear + experts
    randomize(model)
    unmerged = logits(model, IDS)
    lorakit.merge(model)
    assert_close(logits(model, IDS), unmerged)
    with pytest.raises(LorakitError, match="merged"):
        lorakit.delete_adapter(model, "default")
    lorakit.unmerge(model)
    restored = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if ".adapters." not in n}
    for name, value in original.items():
        assert_close(restored[name], value)
    assert_close(logits(model, IDS), unmerged)
    lorakit.merge_and_unload(model)
    assert not any(isinstance(m, ParamLora) for m in model.modules())
    assert set(model.state_dict()) == set(original)  # a plain model again: saves as transformers expects
    assert_close(logits(model, IDS), unmerged)


def test_adapters_switch_disable_and_mix_per_row():
    model = build("mixtral")
    base = logits(model, IDS)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERTS + ROUTER),
                   adapter="a")  # the router returns a tuple: joined element by element in mixed batches
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=2, target_modules=[], target_parameters=["mlp.experts.down_proj"]),
                   adapter="b")
    randomize(model)
    lorakit.set_adapter(model, "a")
    only_a = logits(model, IDS)
    lorakit.set_adapter(model, "b")
    only_b = logits(model, IDS)
    assert (only_a - only_b).abs().max() > 1e-2
    with lorakit.disable_adapters(model):
        assert_close(logits(model, IDS), base)
    rows = torch.cat([IDS, IDS[:1]])  # row i through adapter names[i], as if it ran alone with that adapter active
    with lorakit.mixed_batch(model, ["b", None, "a"]):
        mixed = logits(model, rows)
    assert_close(mixed[0], only_b[0])
    assert_close(mixed[1], base[1])
    assert_close(mixed[2], only_a[0])
    lorakit.delete_adapter(model, "b")
    lorakit.set_adapter(model, "a")
    assert_close(logits(model, IDS), only_a)


@pytest.mark.parametrize("options, message", [
    (dict(target_parameters="mlp.experts.down_proj"), "target_parameters must be a list of parameter names"),
    (dict(target_parameters=EXPERTS, variant="dora"), "variant='dora' cannot be used with target_parameters"),
    (dict(target_parameters=EXPERTS, dropout=0.1), "dropout=0.1 cannot be used with target_parameters"),
    (dict(target_parameters=EXPERTS, init="pissa"), "init='pissa' cannot be used with target_parameters"),
])
def test_unsupported_options_are_one_line_errors(options, message):
    with pytest.raises(LorakitError, match=message) as error:
        lorakit.LoraConfig(**options)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("options, message", [
    (dict(target_parameters=["mlp.experts.up_proj"]), r"target_parameters 'mlp.experts.up_proj' matched no parameter of "
                                                      r"this model; .*mlp.experts.down_proj, mlp.experts.gate_up_proj"),
    (dict(target_parameters=["norm.weight"]), r"model.norm.weight has shape \(32,\).*needs a 2-D \(out, in\) or 3-D"),
    (dict(target_parameters=["self_attn.q_proj.weight"]), r"model.layers.0.self_attn.q_proj is adapted both as a module"),
])
def test_wrong_parameter_targets_are_one_line_errors_and_leave_the_model(options, message):
    model = build("mixtral")
    before = logits(model, IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(LorakitError, match=message) as error:
            lorakit.inject(model, lorakit.LoraConfig(r=2, **options))
    assert "\n" not in str(error.value)
    assert not lorakit.adapter_names(model) and not any(isinstance(m, ParamLora) for m in model.modules())
    assert_close(logits(model, IDS), before)


def test_targets_naming_expert_parameters_point_to_target_parameters():
    with pytest.raises(LorakitError, match=r"adapt them with target_parameters=\['mlp.experts.down_proj'\]"):
        lorakit.inject(build("mixtral"), lorakit.LoraConfig(r=2, target_modules=["down_proj"]))


def test_peft_file_with_a_wrong_rank_is_refused_by_name(tmp_path):
    peft.get_peft_model(build("mixtral"), peft.LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS)
                        ).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "r": 3}))
    with pytest.raises(LorakitError, match=r"experts.base_layer.lora_A.weight has shape \(8, 32\), but parameter "
                                           r"model.layers.0.mlp.experts.gate_up_proj \(4 expert\(s\), rank 3\) needs \(12, 32\)"):
        lorakit.load_adapter(build("mixtral"), tmp_path)


def test_2d_parameter_of_a_linear_layer_round_trips_with_peft(tmp_path):
    """target_parameters on an nn.Linear's weight (peft accepts it; lorakit refused the whole option before): the
    same logits as peft's PeftModel, merged as peft merges, and saved back for peft."""
    def llama():
        torch.manual_seed(0)
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2)).eval()

    theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                          target_parameters=["mlp.down_proj.weight"],
                                                          init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = llama()
    lorakit.load_adapter(ours, tmp_path / "peft")
    assert isinstance(ours.model.layers[0].mlp.down_proj, ParamLora)
    expected = logits(theirs, IDS)
    assert_close(logits(ours, IDS), expected)
    lorakit.save_adapter(ours, tmp_path / "ours")
    assert_close(logits(peft.PeftModel.from_pretrained(llama(), tmp_path / "ours").eval(), IDS), expected)
    with torch.no_grad():
        merged = theirs.merge_and_unload()(IDS).logits
    lorakit.merge_and_unload(ours)
    assert_close(logits(ours, IDS), merged)


def test_train_cli_adapts_the_experts_with_target_parameters(tmp_path, capsys):
    """``lorakit train --target-parameters a,b`` trains LoRA on the experts; ``merge`` folds them into the saved
    model, and peft reads the adapter with lorakit's logits."""
    from lorakit.cli import main
    from test_train_helpers import task_records, tiny_tokenizer, write_jsonl

    folder, run, merged = tmp_path / "mixtral", tmp_path / "run", tmp_path / "merged"
    tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, **{**TINY, "vocab_size": 128, "eos_token_id": 3,
                                                                     "pad_token_id": 3})).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = write_jsonl(tmp_path / "train.jsonl", task_records(8, seed=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main([str(a) for a in ("train", "--model", folder, "--data", data, "--max-steps", 2, "--out", run,
                                      "--batch-size", 4, "--rank", 2, "--lr", 0.05, "--eval-examples", 0, "--samples", 0,
                                      "--no-progress", "--targets", "q_proj", "--target-parameters",
                                      "mlp.experts.gate_up_proj,mlp.experts.down_proj")])
    assert code == 0, capsys.readouterr().err
    assert not [w for w in caught if "fused MoE expert weights" in str(w.message)]
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == EXPERTS and config["target_modules"] == ["q_proj"]
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    trained = tensors["base_model.model.model.layers.0.mlp.experts.lora_B.weight"]
    assert trained.abs().max() > 0  # B started at zero: two steps moved it
    ids = torch.tensor([[1, 7, 10, 11, 8, 3, 12, 13]])
    model, _ = lorakit.load_base(str(folder), device="cpu")
    lorakit.load_adapter(model, run / "adapter")
    expected = logits(model, ids)
    theirs = peft.PeftModel.from_pretrained(tf.MixtralForCausalLM.from_pretrained(folder), run / "adapter").eval()
    assert_close(logits(theirs, ids), expected)
    assert main(["merge", "--model", str(folder), "--adapter", str(run / "adapter"), "--out", str(merged),
                 "--dtype", "fp32"]) == 0
    assert_close(logits(tf.MixtralForCausalLM.from_pretrained(merged).eval(), ids), expected)
    capsys.readouterr()
    code = main([str(a) for a in ("train", "--model", folder, "--data", data, "--max-steps", 1, "--out", tmp_path / "bad",
                                  "--no-progress", "--target-parameters", "mlp.experts.w1")])
    err = capsys.readouterr().err
    assert code == 2 and "target_parameters 'mlp.experts.w1' matched no parameter" in err and "Traceback" not in err


def _write_transformers4_adapter(folder, kind: str, rank: int = 2, alpha: float = 4.0, router: bool = True):
    """A peft adapter as it was saved for transformers 4's MoE models: one LoRA per expert layer (Mixtral's
    block_sparse_moe.experts.N.w1/w2/w3, Qwen-MoE's mlp.experts.N.gate_proj/up_proj/down_proj), the router as a
    linear ``gate``. Returns ``{v5 parameter path: float64 delta}``, the update each fused weight should get."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    old = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"), "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}
    block, gate_name, up_name, down_name = old[kind]
    scale = alpha / rank
    tensors, deltas = {}, {}

    def lora(key: str, in_features: int, out_features: int) -> torch.Tensor:
        A, B = torch.randn(rank, in_features, generator=gen), 0.2 * torch.randn(out_features, rank, generator=gen)
        tensors[f"base_model.model.{key}.lora_A.weight"], tensors[f"base_model.model.{key}.lora_B.weight"] = A, B
        return scale * B.double() @ A.double()  # (out, in)

    for layer in range(2):
        prefix = f"model.layers.{layer}."
        deltas[prefix + "self_attn.q_proj.weight"] = lora(prefix + "self_attn.q_proj", 32, 32)
        if router:
            deltas[prefix + "mlp.gate.weight"] = lora(f"{prefix}{block}.gate", 32, 4)
        gate_up, down = torch.zeros(4, 48, 32, dtype=torch.float64), torch.zeros(4, 32, 24, dtype=torch.float64)
        for e in range(4):
            gate_up[e, :24] = lora(f"{prefix}{block}.experts.{e}.{gate_name}", 32, 24)
            gate_up[e, 24:] = lora(f"{prefix}{block}.experts.{e}.{up_name}", 32, 24)
            down[e] = lora(f"{prefix}{block}.experts.{e}.{down_name}", 24, 32)
        deltas[prefix + "mlp.experts.gate_up_proj"], deltas[prefix + "mlp.experts.down_proj"] = gate_up, down
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    targets = ["q_proj", gate_name, up_name, down_name] + (["gate"] if router else [])
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": alpha,
                                                            "target_modules": targets, "task_type": "CAUSAL_LM"}))
    return deltas


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_transformers4_per_expert_adapter_loads_onto_the_fused_experts(kind, tmp_path):
    """Hub adapters of Mixtral / Qwen-MoE were trained on transformers 4's per-expert linear layers; lorakit refused
    them (unexpected keys). They load now, converted exactly: the logits are those of the base with each expert's
    update added by hand (and peft's own conversion gives them too)."""
    deltas = _write_transformers4_adapter(tmp_path / "v4", kind)
    reference = build(kind)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name in deltas:
                parameter.copy_((parameter.double() + deltas[name]).float())
    expected = logits(reference, IDS)
    ours = build(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "matched no module" warning for the old names
        lorakit.load_adapter(ours, tmp_path / "v4")
    assert_close(logits(ours, IDS), expected)
    config = ours.lorakit_configs["default"]
    assert config.target_modules == ["q_proj"] and config.target_parameters == sorted(EXPERTS + ROUTER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build(kind), tmp_path / "v4").eval()
    assert_close(logits(theirs, IDS), expected)
    lorakit.save_adapter(ours, tmp_path / "v5")  # saved in transformers 5's form, which peft reads as it is
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(logits(peft.PeftModel.from_pretrained(build(kind), tmp_path / "v5").eval(), IDS), expected)


def test_transformers4_adapter_missing_an_expert_half_is_refused_in_one_line(tmp_path):
    _write_transformers4_adapter(tmp_path, "mixtral", router=False)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v for k, v in tensors.items() if ".w3." not in k}, tmp_path / "adapter_model.safetensors")
    model = build("mixtral")
    with pytest.raises(LorakitError, match=r"expert 0 of model.layers.0.mlp.experts has LoRA on \['gate'\]; the fused "
                                           r"gate_up_proj needs all of \['gate', 'up'\]") as error:
        lorakit.load_adapter(model, tmp_path)
    assert "\n" not in str(error.value) and not lorakit.adapter_names(model)


def test_safe_merge_refuses_an_expert_update_that_overflows_and_writes_nothing():
    model = build("mixtral", dtype=torch.float16)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERTS))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}
    with torch.no_grad():
        model.model.layers[1].mlp.experts.adapters["default"]["down_proj"].lora_B.fill_(1e6)  # fp16 tops out at 65504
    with pytest.raises(LorakitError, match=r"would put NaN/Inf into 1 weight\(s\), e.g. model.layers.1.mlp.experts"):
        lorakit.merge(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert not model.model.layers[1].mlp.experts.merged


def test_inspect_merge_report_and_combine_know_the_expert_lora(tmp_path, capsys):
    """inspect lists the adapted parameters apart from the layers (their nested base_layer keys are not layers and
    their r x experts rows are not ranks); the merge report counts the expert stacks; combine keeps them in the
    combined adapter."""
    from lorakit.cli import main
    from lorakit.commands.inspect import describe
    from lorakit.export import delta_survival

    model = build("mixtral")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS))
    randomize(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    info = describe(str(tmp_path / "adapter"))
    assert info["adapted_layers"] == 2 and info["adapted_modules"] == {"q_proj": 2}
    assert info["adapted_parameters"] == 4 and info["ranks_in_file"] == [2]
    assert sorted(info["target_parameters"]) == sorted(EXPERTS)
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "-> 4 parameters" in out and "q_proj x2" in out and "base_layer" not in out
    report = delta_survival(model, "default", torch.float32)
    assert report.layers == 2 + 4 and report.delta_norm > 0  # two q_proj, two expert stacks per layer
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="plain")
    lorakit.combine_adapters(model, {"default": 0.5, "plain": 0.5}, name="mix")  # the experts are kept, not dropped
    assert "mix" in model.model.layers[0].mlp.experts.adapters  # (tests/test_combine_experts.py checks the values)
