"""combine_adapters / ``lorakit combine`` on LoRA of fused MoE experts and routers (``target_parameters``) and of
nn.MultiheadAttention, which peft's add_weighted_adapter refuses.

References: ``cat`` and the svd methods against the weighted sum of the inputs' merged deltas, expert by expert (and
its best rank-k approximation per expert); the same-rank methods against peft's own merge_utils functions applied to
the adapters' whole lora_A / lora_B tensors (what add_weighted_adapter does with a layer's). The results are saved
and read by the real peft 0.21 with the same logits.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from peft.utils import merge_utils
from torch import nn

import lorakit
from lorakit.errors import LorakitError
from lorakit.param_lora import ParamLora, param_hosts
from model_helpers import logits
from test_moe_experts import EXPERTS, FUSED_EXPERTS, IDS, ROUTER, build, randomize

pytestmark = pytest.mark.skipif(not FUSED_EXPERTS, reason="fused 3-D MoE expert parameters need transformers >= 5")


def two_adapters(kind: str = "mixtral", ranks=(2, 3), second_variant: str = "rslora", q_proj: bool = True) -> nn.Module:
    """Adapter "a": q_proj (unless not ``q_proj``), experts and router at ranks[0]; adapter "b": experts only at
    ranks[1] (rsLoRA)."""
    model = build(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorakit.inject(model, lorakit.LoraConfig(r=ranks[0], alpha=4, target_modules=["q_proj"] if q_proj else [],
                                                 target_parameters=EXPERTS + (ROUTER if kind != "gpt_oss" else [])),
                       adapter="a")
        lorakit.inject(model, lorakit.LoraConfig(r=ranks[1], alpha=3, variant=second_variant, target_modules=[],
                                                 target_parameters=EXPERTS),
                       adapter="b")
    randomize(model)
    return model


def per_expert_delta(adapter) -> torch.Tensor:
    """s * B_e @ A_e for every expert, (E, out, in), written out from peft's layout."""
    per_A = adapter.lora_A.detach().reshape(adapter.experts, adapter.rank, adapter.in_features)
    per_B = adapter.lora_B.detach().reshape(adapter.out_features, adapter.rank, adapter.experts).permute(2, 0, 1)
    return (per_B @ per_A) * adapter.scaling


def reference(host: ParamLora, part: str, weights: dict[str, float]) -> torch.Tensor:
    """The weighted sum of the inputs' deltas on one parameter (inputs without it add nothing)."""
    return sum(w * per_expert_delta(host.adapters[n][part]) for n, w in weights.items() if has(host, n, part))


def has(host: ParamLora, name: str, part: str) -> bool:
    return name in host.adapters and part in host.adapters[name]


def best_rank(delta: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return (U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]


def peft_logits(base: nn.Module, folder) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval(), IDS)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_cat_is_the_weighted_sum_per_expert_and_peft_reads_it(kind, tmp_path):
    base = build(kind)
    model = two_adapters(kind)
    weights = {"a": 0.7, "b": -0.4}
    lorakit.combine_adapters(model, weights, name="mix", method="cat")
    hosts = param_hosts(model)
    assert len(hosts) == (4 if kind == "mixtral" else 2) and all("mix" in h.adapters for h in hosts.values())
    for host in hosts.values():
        for part, adapter in host.adapters["mix"].items():
            assert adapter.rank == 5 and adapter.scaling == 1.0
            torch.testing.assert_close(per_expert_delta(adapter), reference(host, part, weights), rtol=1e-5, atol=1e-6)

    combined = logits(model, IDS)
    lorakit.save_adapter(model, tmp_path / "mix", adapter="mix")
    torch.testing.assert_close(peft_logits(base, tmp_path / "mix"), combined, rtol=1e-5, atol=1e-5)
    again = copy.deepcopy(base)
    lorakit.load_adapter(again, tmp_path / "mix")
    torch.testing.assert_close(logits(again, IDS), combined, rtol=1e-5, atol=1e-5)
    lorakit.merge(model, "mix")
    for path, host in hosts.items():  # merged: W + the weighted sum, every expert
        for part in host.adapters["mix"]:
            original = base.get_submodule(path)._parameters[part].detach()
            delta = reference(host, part, weights)
            if getattr(host.base_layer, "is_transposed", False):
                delta = delta.transpose(-2, -1)
            torch.testing.assert_close(host.parameter(part).detach(), original + delta.reshape(original.shape),
                                       rtol=1e-5, atol=1e-6)


def test_svd_methods_cut_each_expert_to_its_best_rank(tmp_path):
    model = two_adapters()
    weights = {"a": 0.5, "b": 1.5}
    lorakit.combine_adapters(model, weights, name="full", method="svd", svd_rank=5)
    lorakit.combine_adapters(model, weights, name="one", method="svd", svd_rank=1)
    lorakit.combine_adapters(model, weights, name="fast", method="svd", svd_rank=1, svd_lowrank=True)
    for host in param_hosts(model).values():
        for part in host.adapters["full"]:
            expected = reference(host, part, weights)
            torch.testing.assert_close(per_expert_delta(host.adapters["full"][part]), expected, rtol=1e-4, atol=1e-5)
            assert host.adapters["one"][part].rank == 1
            torch.testing.assert_close(per_expert_delta(host.adapters["one"][part]), best_rank(expected, 1),
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(per_expert_delta(host.adapters["fast"][part]), best_rank(expected, 1),
                                       rtol=1e-4, atol=1e-5)

    pruned = two_adapters(ranks=(2, 2))
    lorakit.combine_adapters(pruned, weights, name="mp", method="magnitude_prune_svd", density=0.5, svd_rank=4)
    for host in param_hosts(pruned).values():
        for part in host.adapters["mp"]:
            deltas = [per_expert_delta(host.adapters[n][part]) for n in weights if has(host, n, part)]
            kept = [w for n, w in weights.items() if has(host, n, part)]
            expected = merge_utils.magnitude_prune(deltas, torch.tensor(kept), 0.5)  # the whole stack at once
            torch.testing.assert_close(per_expert_delta(host.adapters["mp"][part]), best_rank(expected, 4), rtol=1e-4,
                                       atol=1e-5)


@pytest.mark.parametrize("method,options", [("linear", {}), ("ties", {"density": 0.5}),
                                            ("magnitude_prune", {"density": 0.4}),
                                            ("dare_linear", {"density": 0.7, "seed": 3})])
def test_same_rank_methods_equal_peft_merge_utils_on_the_whole_tensors(method, options):
    model = two_adapters(ranks=(2, 2), second_variant="lora", q_proj=False)  # DARE's draws: the parameters' only
    weights = {"a": 0.8, "b": -0.3}
    lorakit.combine_adapters(model, weights, name="mix", method=method, **options)
    functions = {"linear": lambda t, w: merge_utils.task_arithmetic(t, w),
                 "ties": lambda t, w: merge_utils.ties(t, w, 0.5, "total"),
                 "magnitude_prune": lambda t, w: merge_utils.magnitude_prune(t, w, 0.4),
                 "dare_linear": lambda t, w: merge_utils.dare_linear(t, w, 0.7)}
    torch.manual_seed(options.get("seed", 0))  # DARE: the same draws, in the same order (module, parameter, A then B)
    for path, host in param_hosts(model).items():
        for part in host.parameter_names():
            present = [(host.adapters[n][part], w) for n, w in weights.items() if has(host, n, part)]
            scaled = [w * a.scaling for a, w in present]
            weights_A = torch.tensor([abs(v) ** 0.5 * (1 if v >= 0 else -1) for v in scaled])
            weights_B = torch.tensor([abs(v) ** 0.5 for v in scaled])
            expected_A = functions[method]([a.lora_A.detach() for a, _ in present], weights_A)
            expected_B = functions[method]([a.lora_B.detach() for a, _ in present], weights_B)
            got = host.adapters["mix"][part]
            torch.testing.assert_close(got.lora_A.detach(), expected_A, rtol=1e-6, atol=1e-7, msg=f"{path}.{part} A")
            torch.testing.assert_close(got.lora_B.detach(), expected_B, rtol=1e-6, atol=1e-7, msg=f"{path}.{part} B")


def test_methods_that_cannot_apply_are_refused_in_one_line_naming_them():
    model = two_adapters()  # ranks 2 and 3
    for method in ("linear", "ties"):
        with pytest.raises(LorakitError, match=rf"method '{method}' needs adapters of one rank") as error:
            lorakit.combine_adapters(model, {"a": 1.0, "b": 1.0}, name="mix", method=method,
                                     **({"density": 0.5} if method == "ties" else {}))
        assert "\n" not in str(error.value)
    assert "mix" not in lorakit.adapter_names(model)


def test_attention_adapters_combine_exactly_and_peft_reads_the_result(tmp_path):
    from test_mha_interop import X, Block

    torch.manual_seed(0)
    base = Block().eval()
    model = copy.deepcopy(base)
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["attn", "fc"]), adapter="a")
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=3, target_modules=["attn"]), adapter="b")
    randomize(model)
    with torch.no_grad():
        lorakit.set_adapter(model, ["a", "b"])
        both = model(X)  # two active adapters: the sum of their updates
    lorakit.combine_adapters(model, {"a": 1.0, "b": 1.0}, name="mix", method="cat")
    with torch.no_grad():
        combined = model(X)
    torch.testing.assert_close(combined, both, rtol=1e-5, atol=1e-6)
    lorakit.save_adapter(model, tmp_path / "mix", adapter="mix")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "mix")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(X), combined, rtol=1e-5, atol=1e-6)


def test_combine_command_writes_the_expert_adapter(tmp_path, capsys):
    from lorakit.cli import main
    from test_train_helpers import tiny_tokenizer

    base = build("mixtral")
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")  # the command loads the base as a model folder
    model = two_adapters()
    for name in ("a", "b"):
        lorakit.save_adapter(model, tmp_path / name, adapter=name)
    assert main(["combine", "--model", str(tmp_path / "base"), "--adapter", f"{tmp_path / 'a'}=0.7",
                 "--adapter", f"{tmp_path / 'b'}=-0.4", "--out", str(tmp_path / "out")]) == 0
    assert "rank 5" in capsys.readouterr().out
    lorakit.combine_adapters(model, {"a": 0.7, "b": -0.4}, name="mix")
    torch.testing.assert_close(peft_logits(base, tmp_path / "out"), logits(model, IDS), rtol=1e-5, atol=1e-5)


def test_combine_command_on_adapters_of_the_experts_only(tmp_path, capsys):
    from lorakit.cli import main
    from test_train_helpers import tiny_tokenizer

    base = build("mixtral")
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    model = build("mixtral")
    for name, rank in (("a", 2), ("b", 3)):
        lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=4, target_modules=[], target_parameters=EXPERTS),
                       adapter=name)
    randomize(model)
    for name in ("a", "b"):
        lorakit.save_adapter(model, tmp_path / name, adapter=name)
    assert main(["combine", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "a"),
                 "--adapter", str(tmp_path / "b"), "--method", "svd", "--out", str(tmp_path / "out")]) == 0
    assert "rank 3" in capsys.readouterr().out
    lorakit.combine_adapters(model, ["a", "b"], name="mix", method="svd")
    torch.testing.assert_close(peft_logits(base, tmp_path / "out"), logits(model, IDS), rtol=1e-5, atol=1e-5)
