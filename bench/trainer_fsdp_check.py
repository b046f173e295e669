"""GPU check: transformers' Trainer with FSDP (``fsdp_config={"fsdp_version": 2}``) on a lorakit-injected model.

On CPUs Trainer silently falls back to DDP, so this runs only on 2+ GPUs. It trains a small random Llama (float32,
LoRA r=4 on q/v/down, a second idle trainable adapter) for 6 steps of a global batch of 8 rows, under torchrun with
FSDP, saves with ``trainer.save_model``, and then, in one process, trains the same model on the same rows with the
same global batch (no FSDP) and compares the two saved adapters tensor by tensor. Prints a table and PASS / FAIL;
writes $OUT/trainer_fsdp_check.json.

    python bench/trainer_fsdp_check.py            # launches the torchrun part itself
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import lorakit  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
GLOBAL_BATCH, STEPS = 8, 6


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["k_proj"]), adapter="spare")
    lorakit.set_adapter(model, "default")
    with torch.no_grad():  # B starts at zero: give it values so both A and B get gradients from the first step
        for name, p in lorakit.lora_parameters(model):
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    return model.train()


def rows(n: int = GLOBAL_BATCH * STEPS):
    out = []
    for i in range(n):
        ids = torch.randint(3, TINY["vocab_size"], (32,), generator=torch.Generator().manual_seed(i))
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def train(out_dir: str, processes: int, fsdp: bool) -> None:
    import transformers as tf

    extra = dict(fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}) \
        if fsdp else {}
    args = tf.TrainingArguments(output_dir=out_dir, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // processes,
                                learning_rate=1e-2, report_to=[], disable_tqdm=True, logging_steps=1, save_strategy="no",
                                lr_scheduler_type="constant", dataloader_drop_last=True, seed=0, **extra)
    trainer = tf.Trainer(model=build(), args=args, train_dataset=rows())
    result = trainer.train()
    wrapped = type(trainer.model_wrapped).__name__
    first = type(next(trainer.model.parameters()).data).__name__  # DTensor once FSDP2 sharded the model
    trainer.save_model(os.path.join(out_dir, "final"))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out_dir, "summary.json"), "w") as fh:
            json.dump(dict(loss=result.training_loss, processes=processes, fsdp=fsdp,
                           fsdp_plugin=trainer.accelerator.state.fsdp_plugin is not None if fsdp else False,
                           first_parameter=first, wrapped=wrapped), fh)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        train(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "fsdp")
        return 0
    gpus = torch.cuda.device_count()
    if gpus < 2:
        print(f"needs 2+ GPUs, found {gpus}")
        return 1
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    work = "/tmp/trainer_fsdp_check"
    started = time.time()
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               __file__, "--worker", f"{work}/fsdp", "2", "fsdp"], capture_output=True, text=True)
    print(launched.stdout[-3000:], launched.stderr[-3000:], flush=True)
    if launched.returncode:
        print("FAIL: the FSDP run did not finish")
        return 1
    single = subprocess.run([sys.executable, __file__, "--worker", f"{work}/one", "1", "plain"],
                            capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    print(single.stderr[-2000:], flush=True)
    from safetensors.torch import load_file

    summaries = {k: json.load(open(f"{work}/{k}/summary.json")) for k in ("fsdp", "one")}
    tensors = {k: load_file(f"{work}/{k}/final/adapter_model.safetensors") for k in ("fsdp", "one")}
    from lorakit.io import adapter_state_dict

    start = {k: v.detach().float() for k, v in adapter_state_dict(build(), "default")[0].items()}
    same_keys = tensors["fsdp"].keys() == tensors["one"].keys()
    worst = max(((tensors["fsdp"][k].float() - tensors["one"][k].float()).abs().max() /
                 tensors["one"][k].float().abs().max().clamp_min(1e-12)).item() for k in tensors["one"]) if same_keys else None
    shapes_ok = same_keys and all(tensors["fsdp"][k].shape == tensors["one"][k].shape for k in tensors["one"])
    moved = None
    if same_keys:
        moved = max((tensors["one"][k].float() - start[k]).abs().max().item() for k in start if k in tensors["one"])
    ok = bool(shapes_ok and worst is not None and worst < 1e-3 and summaries["fsdp"]["fsdp_plugin"])
    record = dict(device=torch.cuda.get_device_name(), gpus=gpus, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  summaries=summaries, tensors=len(tensors["one"]), same_keys=same_keys, shapes_ok=shapes_ok,
                  max_rel_diff_fsdp_vs_one_process=worst, max_change_from_start=moved, seconds=round(time.time() - started, 1),
                  ok=ok)
    print(json.dumps(record, indent=1))
    print("PASS" if ok else "FAIL")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "trainer_fsdp_check.json"), "w") as fh:
        json.dump(record, fh, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
