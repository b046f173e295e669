"""LoRA on fused MoE experts (``--target-parameters``, lorakit/param_lora.py) trained on 2 CPU processes (torchrun,
gloo), and under ``--compile-layers``' regional torch.compile.

One torchrun launch does all the multi-process work (its start-up is most of the cost):

* data parallel, Mixtral with LoRA on q_proj, the fused experts and the router: the bucketed all-reduce of the
  experts' ``(r * E, in)`` / ``(out, r * E)`` tensors; a fresh model resumed from its step-2 checkpoint ends
  bit-identical;
* ``lorakit train --fsdp --gradient-checkpointing`` (``run_training``, which loads, injects and shards per
  process), Qwen3-MoE: each
  process holds half of every expert stack and of its LoRA tensors; a run stopped after its step-2 checkpoint and
  resumed with ``--resume`` ends bit-identical to the same run never stopped.

Both give the adapter of one process with the same global batch, and the saved folders load in peft 0.21 with the
same logits.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import lorakit
from conftest import assert_close
from test_train_distributed import ENV, TESTS, TORCHRUN
from test_train_helpers import task_records, tiny_tokenizer, write_jsonl

# fused 3-D expert parameters (what target_parameters adapts here) exist only from transformers 5
pytestmark = pytest.mark.skipif(not any(p.ndim == 3 for p in tf.MixtralForCausalLM(tf.MixtralConfig(
    vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    num_local_experts=2)).parameters()), reason="fused 3-D MoE expert parameters need transformers >= 5")
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]
TINY = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts_per_tok=2, pad_token_id=3, bos_token_id=1, eos_token_id=3, max_position_embeddings=64)
SETTINGS = dict(rank=3, alpha=6.0, max_steps=4, progress=False, eval_examples=0, samples=0, lr=1e-2, global_batch=8,
                targets=["q_proj"], target_parameters=EXPERTS)
IDS = torch.tensor([[1, 7, 10, 11, 8, 3, 12, 13], [2, 9, 9, 14, 17, 5, 6, 4]])


def mixtral() -> tf.MixtralForCausalLM:
    torch.manual_seed(0)
    return tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, intermediate_size=24, **TINY))


def qwen3_moe_folder(folder: Path) -> Path:
    """3 experts, rank 3: FSDP2 splits each expert stack (3, ., .) and lora_A (9, 32) unevenly over 2 processes."""
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(num_experts=3, head_dim=8, moe_intermediate_size=24,
                                                     intermediate_size=24, norm_topk_prob=True, **TINY))
    with torch.no_grad():  # its router starts at zero: random, so each process routes its tokens differently
        for name, parameter in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                parameter.normal_(std=0.5)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


SCRIPT = '''
import os, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import torch.distributed as dist
from test_train_distributed_experts import SETTINGS, mixtral
from test_train_helpers import task_records, tiny_tokenizer
from lorakit.train import runner
from lorakit.train.config import TrainConfig
from lorakit.train.data import build_dataset
from lorakit.train.loop import train
dist.init_process_group("gloo")
out = {out!r}
tok = tiny_tokenizer()
data = build_dataset(task_records(32, seed=3), tok, max_length=32)
ddp = TrainConfig(**SETTINGS, batch_size=2, save_every=2, compile_layers=True)
train(mixtral(), tok, data, ddp, out=os.path.join(out, "ddp"),
      val_data=build_dataset(task_records(4, seed=4), tok, max_length=32))
# a fresh model resumed from the step-2 checkpoint of that run, into another folder
train(mixtral(), tok, data, ddp, out=os.path.join(out, "ddp_resumed"),
      resume=os.path.join(out, "ddp", "checkpoints", "step-000002"))
# gradients over real gloo processes: "a" on both, "b" on process 1 only (an expert only its tokens reached), "c" on
# none (an expert no process routed a token to): c keeps no gradient, as on one process (AdamW then skips it)
import json
from torch import nn
from lorakit.train.distributed import all_reduce_gradients, with_gradient_anywhere
rank = dist.get_rank()
a, b, c = (nn.Parameter(torch.zeros(3)) for _ in range(3))
a.grad = torch.full((3,), 1.0 + rank)
if rank == 1:
    b.grad = torch.full((3,), 5.0)
kept = with_gradient_anywhere([a, b, c])
all_reduce_gradients(kept)
json.dump({{"kept": [n for n, p in zip("abc", (a, b, c)) if any(p is k for k in kept)], "a": a.grad.tolist(),
           "b": b.grad.tolist(), "c": c.grad}}, open(os.path.join(out, f"grads{{rank}}.json"), "w"))
# FSDP2 with a LoRA that only process 0 uses in this step (an expert module only its tokens reached): the backward
# completes and process 0's gradient is the sum (the reduce-scatter used to mismatch between the processes)
from conftest import tiny_llama
import lorakit
from lorakit.train.distributed import apply_fsdp, full
model = tiny_llama(num_hidden_layers=2)
lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
with torch.no_grad():
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.fill_(0.1)
apply_fsdp(model, torch.device("cpu"))
model.model.layers[1].self_attn.k_proj.disabled = rank == 1
model(torch.arange(3 + rank, 11 + rank)[None]).logits.sum().backward()
k_grad = full(model.model.layers[1].self_attn.k_proj.adapters["default"].lora_A.grad)
json.dump({{"k_grad_max": float(k_grad.abs().max())}}, open(os.path.join(out, f"fsdp{{rank}}.json"), "w"))
# lorakit train --fsdp: straight, then stopped after step 3 (checkpoint at 2) and resumed with --resume
fsdp = TrainConfig(**SETTINGS, model={folder!r}, data=[{data!r}], batch_size=2, save_every=2, fsdp=True,
                   gradient_checkpointing=True)
runner.run_training(fsdp.replace(out=os.path.join(out, "straight")))
class Stop(Exception):
    pass
real_train = runner.train
def stopping(*args, **kwargs):
    def on_step(step, entry):
        if step == 3:
            raise Stop()
    return real_train(*args, on_step=on_step, **kwargs)
runner.train = stopping
try:
    runner.run_training(fsdp.replace(out=os.path.join(out, "stopped")))
    raise SystemExit("the run was not stopped")
except Stop:
    pass
runner.train = real_train
runner.run_training(TrainConfig(), resume=os.path.join(out, "stopped"))
import gc
gc.collect()  # FSDP2's cycles hold the group: free them while it lives (lorakit.train.runner.distributed_group)
dist.destroy_process_group()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)  # no interpreter teardown, where gloo can abort a finished worker (lorakit.cli._exit_without_teardown)
'''


def _losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line.get("kind") == "train"]


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def test_expert_lora_on_two_processes_matches_one_and_loads_in_peft(tmp_path):
    from lorakit.train import runner
    from lorakit.train.config import TrainConfig
    from lorakit.train.data import build_dataset
    from lorakit.train.loop import train

    folder = qwen3_moe_folder(tmp_path / "qwen3moe")
    data = write_jsonl(tmp_path / "train.jsonl", task_records(32, seed=3))
    script = tmp_path / "two.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), out=str(tmp_path), folder=str(folder), data=str(data)))
    two = subprocess.run([*TORCHRUN, str(script)], env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("FSDP2 over 2 processes, 4 sharded units: global batch") == 3  # straight, stopped, resumed
    # on the CPU --compile-layers says that it compiles nothing (it used to be dropped without a word)
    assert two.stderr.count("--compile-layers compiles lorakit's fused kernels on CUDA only; this cpu run trains "
                            "eagerly") == 2  # the data parallel run and its resume
    assert two.stderr.count("validation loss") == 4  # steps 1-4 of the data parallel run, said by process 0 alone
    assert two.stderr.count("resuming from") == 2 and "step-000002" in two.stderr

    for rank in (0, 1):
        grads = json.loads((tmp_path / f"grads{rank}.json").read_text())
        assert grads == {"kept": ["a", "b"], "a": [3.0] * 3, "b": [5.0] * 3, "c": None}, rank

    fsdp_grads = [json.loads((tmp_path / f"fsdp{rank}.json").read_text())["k_grad_max"] for rank in (0, 1)]
    assert fsdp_grads[0] == fsdp_grads[1] > 0

    # one process, the same global batch (4 rows x 2 micro-batches)
    tok = tiny_tokenizer()
    one_ddp = mixtral()
    train(one_ddp, tok, build_dataset(task_records(32, seed=3), tok, max_length=32),
          TrainConfig(**{**SETTINGS, "global_batch": None}, batch_size=4, grad_accum=2, save_every=0,
                      out=str(tmp_path / "one_ddp")))
    runner.run_training(TrainConfig(**SETTINGS, model=str(folder), data=[str(data)], batch_size=4, save_every=0,
                                    out=str(tmp_path / "one_fsdp")))

    for two_run, one_run in (("ddp", "one_ddp"), ("straight", "one_fsdp")):
        got, expected = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in (two_run, one_run))
        assert got.keys() == expected.keys(), two_run
        expert_keys = [k for k in expected if ".mlp.experts." in k]
        assert len(expert_keys) == 2 * 2 * 2  # 2 layers x (gate_up_proj, down_proj) x (A, B), peft's key nesting
        assert any(k.endswith("mlp.experts.base_layer.lora_B.weight") for k in expert_keys)
        assert all(float(expected[k].abs().max()) > 1e-3 for k in expected if "lora_B" in k)  # B left zero: trained
        for key in expected:
            assert got[key].shape == expected[key].shape, (two_run, key)
            assert_close(got[key], expected[key], msg=f"{two_run} {key}")
        assert _losses(tmp_path / two_run) == pytest.approx(_losses(tmp_path / one_run), rel=1e-5)
        config = json.loads((tmp_path / two_run / "adapter" / "adapter_config.json").read_text())
        assert config["target_parameters"] == EXPERTS and config["target_modules"] == ["q_proj"]

    # resumed from the step-2 checkpoint (--fsdp: after a stop at step 3): bit for bit the run never stopped
    for straight_run, resumed_run in (("ddp", "ddp_resumed"), ("straight", "stopped")):
        straight = load_file(tmp_path / straight_run / "adapter" / "adapter_model.safetensors")
        resumed = load_file(tmp_path / resumed_run / "adapter" / "adapter_model.safetensors")
        assert resumed.keys() == straight.keys()
        for key in straight:
            assert torch.equal(resumed[key], straight[key]), (resumed_run, key)
        assert _losses(tmp_path / resumed_run) == _losses(tmp_path / straight_run)[-len(_losses(tmp_path / resumed_run)):]
    assert _losses(tmp_path / "stopped") == _losses(tmp_path / "straight")

    # the folders written over 2 processes load in peft with lorakit's logits
    import peft

    ours = mixtral()
    lorakit.load_adapter(ours, tmp_path / "ddp" / "adapter")
    theirs = peft.PeftModel.from_pretrained(mixtral(), tmp_path / "ddp" / "adapter")
    assert (_logits(ours) - _logits(mixtral())).abs().max() > 1e-4  # the adapter changes the output
    assert_close(_logits(theirs), _logits(ours))
    base = tf.Qwen3MoeForCausalLM.from_pretrained(folder)
    ours, _ = lorakit.load_base(str(folder), device="cpu")
    lorakit.load_adapter(ours, tmp_path / "straight" / "adapter")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "straight" / "adapter")
    assert_close(_logits(theirs), _logits(ours))


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_with_expert_lora_match_eager(checkpointing):
    """``--compile-layers`` (regional torch.compile of each decoder layer) through ``ParamLora``, whose forward
    shows the experts module ``W + delta`` for one call: no graph break, one graph for all layers past the first,
    and the loss and every gradient (q_proj, the expert stacks, the router) equal to eager. dynamo + AOTAutograd
    with the eager backend, as tests/test_fast_compile.py does (inductor builds C++ for minutes on 2 cores)."""
    from torch._dynamo.utils import counters

    from lorakit.models.fast import disable_fast_kernels, use_fast_kernels

    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(num_experts=4, head_dim=8, moe_intermediate_size=24,
                                                     intermediate_size=24, norm_topk_prob=True,
                                                     **{**TINY, "num_hidden_layers": 3}))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERTS))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a random router (it starts at zero) and random B, so every gradient is non-trivial
        for name, parameter in model.named_parameters():
            if name.endswith("mlp.gate.base_layer.weight") or "lora_B" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(4, 32, (2, 11), generator=generator)
    labels = ids.clone()
    labels[0, :3] = -100
    ref_loss, ref_grads = _loss_and_grads(model, ids, labels)
    assert len(ref_grads) == 3 * 2 * 4 and all(float(g.abs().max()) > 0 for g in ref_grads.values())
    torch._dynamo.reset()
    counters.clear()
    try:
        report = use_fast_kernels(model, require_cuda=False, compile="layers", compile_backend="aot_eager")
        assert report.applied and report.compiled_layers == 3, str(report)
        for step in range(2):
            loss, grads = _loss_and_grads(model, ids, labels)
            assert_close(loss, ref_loss)
            assert grads.keys() == ref_grads.keys()
            for name in grads:
                assert_close(grads[name], ref_grads[name], msg=f"step {step} {name}")
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    finally:
        disable_fast_kernels(model)
        torch._dynamo.reset()
