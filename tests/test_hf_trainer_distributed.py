"""transformers' Trainer (and TRL's SFTTrainer, DPOTrainer) with a lorakit-injected model on 2 CPU processes (torchrun, gloo; Trainer wraps the model in
DistributedDataParallel through accelerate), as a PEFT user would launch it (lorakit/hf_trainer.py).

The model is a tiny Mixtral with LoRA on q_proj and on the fused experts and router (``target_parameters``), plus a
second, inactive, trainable adapter, under gradient checkpointing (so Trainer turns DDP's
``find_unused_parameters`` off). Before lorakit told DDP to leave idle adapters out, the second step failed with
"Expected to have finished reduction in the prior iteration before starting a new one".
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

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts_per_tok=2, num_local_experts=4, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, max_position_embeddings=64)
CONFIG = dict(r=2, alpha=4, target_modules=["q_proj"],
              target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"])
GLOBAL_BATCH = 4
# fused 3-D expert parameters (CONFIG's target_parameters) exist only from transformers 5
pytestmark = pytest.mark.skipif(not any(p.ndim == 3 for p in tf.MixtralForCausalLM(tf.MixtralConfig(
    vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    num_local_experts=2)).parameters()), reason="fused 3-D MoE expert parameters need transformers >= 5")


def build() -> tf.MixtralForCausalLM:
    """The model every process (and the one-process run) starts from: same seed, same adapters."""
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(**TINY))
    lorakit.inject(model, lorakit.LoraConfig(**CONFIG))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["v_proj"]), adapter="spare")  # trainable too
    lorakit.set_adapter(model, "default")  # "spare" stays trainable but idle: it never gets a gradient
    return model.train()


def dataset(n: int = 16) -> list[dict[str, torch.Tensor]]:
    """Rows of 12 tokens, 0-4 of them unsupervised: processes see different supervised-token counts."""
    rows = []
    for i in range(n):
        ids = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(i))
        labels = ids.clone()
        labels[: i % 5] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def arguments(out, processes: int, **extra) -> tf.TrainingArguments:
    settings = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=GLOBAL_BATCH // processes,
                    save_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
                    gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    settings.update(extra)
    return tf.TrainingArguments(**settings)


def sft_trainer(out, processes: int):
    """TRL's SFTTrainer as tests/test_trl.py builds it, 3 steps of 4 rows (float32: comparable across runs)."""
    import trl

    from test_trl import injected, texts, tiny_tokenizer

    config = trl.SFTConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=GLOBAL_BATCH // processes,
                           learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
                           save_strategy="no", bf16=False)
    return trl.SFTTrainer(model=injected(), train_dataset=texts(), args=config, processing_class=tiny_tokenizer())


def dpo_trainer(out, processes: int):
    """TRL's DPOTrainer with ``ref_model=reference_model(model)`` as tests/test_trl.py builds it, 2 steps of 4."""
    import trl

    from lorakit.trl_support import reference_model
    from test_trl import injected, preferences, tiny_tokenizer

    model = injected(pretrained=True)  # B away from zero: the policy differs from the reference from step 1
    config = trl.DPOConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=GLOBAL_BATCH // processes,
                           learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
                           save_strategy="no", bf16=False)
    return trl.DPOTrainer(model=model, ref_model=reference_model(model), args=config, train_dataset=preferences(),
                          processing_class=tiny_tokenizer())


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


SCRIPT = '''
import json, os, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import lorakit.io
from safetensors.torch import save_file
from transformers import Trainer
from test_hf_trainer_distributed import arguments, build, dataset, dpo_trainer, sft_trainer, trainable
out, rank, writes = {out!r}, int(os.environ["RANK"]), []
real_save = lorakit.io.save_adapter
def save_adapter(model, folder, *args, **kwargs):  # who writes adapter folders
    writes.append(os.path.relpath(str(folder), out))
    return real_save(model, folder, *args, **kwargs)
lorakit.io.save_adapter = save_adapter
model = build()
start = trainable(model)
trainer = Trainer(model=model, args=arguments(os.path.join(out, "straight"), 2), train_dataset=dataset())
trainer.train()
trainer.save_model(os.path.join(out, "straight", "final"))
ddp = trainer.model_wrapped
report = {{"wrapper": type(ddp).__name__, "find_unused": ddp.find_unused_parameters,
          "ignored": sorted(ddp.parameters_to_ignore),
          "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
          "spare_unchanged": all(torch.equal(p, start[n]) for n, p in trainable(model).items() if ".spare." in n)}}
resumed = build()
trainer = Trainer(model=resumed, args=arguments(os.path.join(out, "resumed"), 2, save_strategy="no"),
                  train_dataset=dataset())
trainer.train(resume_from_checkpoint=os.path.join(out, "straight", "checkpoint-2"))
report["writes"] = writes
# TRL's SFTTrainer (gradient checkpointing on by default) on a tiny Llama with LoRA on every linear layer
sft = sft_trainer(os.path.join(out, "sft"), 2)
sft.train()
report["sft_losses"] = [e["loss"] for e in sft.state.log_history if "loss" in e]
report["sft_wrapper"] = type(sft.model_wrapped).__name__
# TRL's DPOTrainer against lorakit's reference_model (the same weights with the adapters off, no second copy)
dpo = dpo_trainer(os.path.join(out, "dpo"), 2)
dpo.train()
report["dpo_log"] = [[e["loss"], e["rewards/margins"]] for e in dpo.state.log_history if "loss" in e]
json.dump(report, open(os.path.join(out, f"rank{{rank}}.json"), "w"))
if rank == 0:
    save_file({{n: t.contiguous() for n, t in trainable(model).items()}}, os.path.join(out, "straight.safetensors"))
    save_file({{n: t.contiguous() for n, t in trainable(resumed).items()}}, os.path.join(out, "resumed.safetensors"))
    save_file({{n: t.contiguous() for n, t in trainable(sft.model).items()}}, os.path.join(out, "sft.safetensors"))
    save_file({{n: t.contiguous() for n, t in trainable(dpo.model).items()}}, os.path.join(out, "dpo.safetensors"))
import gc
import torch.distributed as dist
gc.collect()
dist.destroy_process_group()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)  # no interpreter teardown, where gloo can abort a finished worker (lorakit.cli._exit_without_teardown)
'''


def test_trainer_on_two_processes_matches_one_and_only_rank0_writes(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), out=str(tmp_path)))
    two = subprocess.run([*TORCHRUN, str(script)], env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in ranks:
        assert report["wrapper"] == "DistributedDataParallel" and report["find_unused"] is False
        assert report["ignored"] and all(".adapters.spare." in n for n in report["ignored"])  # only the idle adapter
        assert len(report["ignored"]) == 2 * 2 and report["spare_unchanged"]  # 2 layers x (A, B) of v_proj
    # only process 0 wrote adapter folders: two checkpoints and the final folder, each with "spare" in a subfolder as
    # peft writes it (the resumed run saves nothing)
    assert ranks[1]["writes"] == []
    assert sorted(ranks[0]["writes"]) == [f"straight/{folder}{spare}" for folder in ("checkpoint-2", "checkpoint-4",
                                                                                     "final") for spare in ("", "/spare")]
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    weights = load_file(checkpoint / "model.safetensors")  # what Trainer's resume reads: the adapters, no base
    assert weights and all(".adapters." in n for n in weights)
    assert {p.name for p in (tmp_path / "straight" / "final").iterdir()} >= {"adapter_config.json",
                                                                               "adapter_model.safetensors"}
    assert (tmp_path / "straight" / "final" / "spare" / "adapter_model.safetensors").is_file()  # peft's layout

    # one process with the same global batch (4 rows per step)
    model = build()
    trainer = tf.Trainer(model=model, args=arguments(tmp_path / "one", 1, save_strategy="no"), train_dataset=dataset())
    trainer.train()
    one = trainable(model)
    straight, resumed = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert straight.keys() == one.keys() == resumed.keys()
    assert all(float(one[n].abs().max()) > 1e-3 for n in one if "lora_B" in n and ".default." in n)  # trained
    for name in one:
        assert_close(straight[name], one[name], msg=name)
        assert_close(resumed[name], straight[name], msg=name)  # steps 3-4 continued from checkpoint-2
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert ranks[0]["losses"] == pytest.approx(losses, rel=1e-5)

    # TRL's SFTTrainer over 2 processes: DDP, the one-process losses and adapters
    sft = sft_trainer(tmp_path / "sft-one", 1)
    assert sft.args.gradient_checkpointing
    sft.train()
    assert ranks[0]["sft_wrapper"] == "DistributedDataParallel"
    assert ranks[0]["sft_losses"] == pytest.approx([e["loss"] for e in sft.state.log_history if "loss" in e], rel=1e-5)
    sft_two, sft_one = load_file(tmp_path / "sft.safetensors"), trainable(sft.model)
    assert sft_two.keys() == sft_one.keys() and len(sft_one) == 2 * 7 * 2  # 2 layers x 7 linears x (A, B)
    for name in sft_one:
        assert_close(sft_two[name], sft_one[name], msg=name)

    # TRL's DPOTrainer with reference_model over 2 processes: the one-process losses, margins and adapters
    dpo = dpo_trainer(tmp_path / "dpo-one", 1)
    dpo.train()
    log = [[e["loss"], e["rewards/margins"]] for e in dpo.state.log_history if "loss" in e]
    assert log[0][1] != 0 and len(ranks[0]["dpo_log"]) == len(log) == 2
    assert sum(ranks[0]["dpo_log"], []) == pytest.approx(sum(log, []), rel=1e-4)
    dpo_two, dpo_one = load_file(tmp_path / "dpo.safetensors"), trainable(dpo.model)
    assert dpo_two.keys() == dpo_one.keys()
    for name in dpo_one:
        assert_close(dpo_two[name], dpo_one[name], msg=name)

    # the folder written over 2 processes loads in peft with lorakit's logits
    import peft

    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 61]])
    theirs = peft.PeftModel.from_pretrained(_base(), tmp_path / "straight" / "final").eval()
    ours = _base()
    lorakit.load_adapter(ours, tmp_path / "straight" / "final")
    with torch.no_grad():
        assert_close(theirs(ids).logits, ours.eval()(ids).logits)


def _base() -> tf.MixtralForCausalLM:
    torch.manual_seed(0)
    return tf.MixtralForCausalLM(tf.MixtralConfig(**TINY)).eval()


def test_idle_adapter_tensors_follow_the_active_merged_and_disabled_adapters():
    """What DDP is told to leave out: exactly the trainable tensors no forward uses now."""
    from conftest import tiny_llama
    from lorakit.hf_trainer import idle_adapter_tensors

    model = build()
    spare = [n for n, p in model.named_parameters() if ".adapters.spare." in n]
    adapters = [n for n, p in model.named_parameters() if p.requires_grad]
    assert spare and idle_adapter_tensors(model) == spare
    with lorakit.disable_adapters(model):
        assert idle_adapter_tensors(model) == adapters
    lorakit.set_adapter(model, ["default", "spare"])
    assert idle_adapter_tensors(model) == []
    for name, parameter in model.named_parameters():
        if ".spare." in name:
            parameter.requires_grad_(False)  # a frozen adapter is no business of DDP's
    lorakit.set_adapter(model, "default")
    assert idle_adapter_tensors(model) == []

    llama = tiny_llama()  # modules_to_save: only the active adapter's copy of the head is used
    lorakit.inject(llama, lorakit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    lorakit.inject(llama, lorakit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), adapter="b")
    lorakit.set_adapter(llama, "b")  # two active copies of one module are refused by set_adapter (as in peft)
    idle = idle_adapter_tensors(llama)
    assert "lm_head.copies.default.weight" in idle and "lm_head.copies.b.weight" not in idle
    assert all(".default." in name for name in idle)


def test_ddp_leaves_out_idle_adapters_and_the_quantized_base_and_refuses_a_switch():
    """A real DistributedDataParallel (one gloo process): it all-reduces the active adapters only, and no longer
    broadcasts the NF4 base's uint8 buffers before every forward (the whole 4-bit base, each step). DDP reads that
    list once: a training forward that then uses other adapters would average the wrong tensors (processes train
    apart) or wait for a gradient that never comes, so it is refused in one line."""
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from conftest import tiny_llama
    from lorakit import quant
    from lorakit.quant.nf4 import NF4Linear

    model = tiny_llama()
    for layer in model.model.layers:
        layer.mlp.down_proj = NF4Linear.from_linear(layer.mlp.down_proj)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["v_proj"]), adapter="spare")
    lorakit.set_adapter(model, "default")
    spare = {n for n, _ in model.named_parameters() if ".spare." in n}
    nf4 = {id(b) for m in model.modules() if quant.is_quantized(m) for b in m.buffers()}
    assert spare and nf4
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 61]])
    model.train()(ids)  # not wrapped yet: any adapters
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        assert spare <= ddp.parameters_to_ignore
        assert ddp.modules_buffers and not any(id(b) in nf4 for b in ddp.modules_buffers)  # rotary tables only
        reduced = {id(p) for p in ddp._module_parameters if p.requires_grad}
        assert reduced == {id(p) for n, p in model.named_parameters() if ".adapters.default." in n}
        for _ in range(2):  # a second step: DDP checks that the first one reduced every expected gradient
            ddp(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if ".adapters.default." in n)

        lorakit.set_adapter(model, "spare")
        with pytest.raises(lorakit.LorakitError, match=r"^the adapters in use changed after DistributedDataParallel "
                                                       r"wrapped the model: model\.layers\.0\.self_attn\.v_proj\."
                                                       r"adapters\.spare\.lora_A is used now, .*call lorakit\.set_adapter"):
            ddp(ids)
        with torch.no_grad():
            model(ids)  # evaluation (no gradients) may use any adapter
    finally:
        ddp = None
        gc.collect()  # DDP's reducer holds the group: let it go while the group lives
        dist.destroy_process_group()
    model(ids)  # the group is gone (a one-process run after the distributed one): switching is free again
