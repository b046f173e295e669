"""Expert LoRA (``--target-parameters``) and lorakit models under torchrun on the GPUs of one machine (NCCL), and
``--compile-layers`` with inductor on CUDA: what the CPU tests (gloo, the aot_eager backend) cannot reach.

Checks, each against one process (or eager) on the same random bf16 Mixtral (8 experts, top-2):

* ``train-ddp`` / ``train-fsdp``: ``torchrun --nproc_per_node N -m lorakit train --target-parameters
  mlp.experts.gate_up_proj,mlp.experts.down_proj,mlp.gate.weight --global-batch G`` (with ``--fsdp``: FSDP2 shards
  the expert stacks and their LoRA) against ``lorakit train`` on one GPU: the adapters' relative difference (bf16
  reduction order only), the loss curves, and PEFT 0.21 reading the N-process folder with lorakit's logits;
* ``compile``: ``use_fast_kernels(compile="layers")`` (inductor) with expert LoRA and gradient checkpointing:
  graph breaks (lorakit's ParamLora used to write the module's ``__dict__``, which dynamo refused inside the
  checkpoint: no layer compiled) and the loss and gradients against eager;
* ``trainer-ddp``: transformers' ``Trainer`` over N processes with a lorakit model holding an idle trainable adapter,
  under gradient checkpointing (Trainer then turns DDP's ``find_unused_parameters`` off; lorakit tells DDP to leave
  the idle tensors out) against the one-GPU Trainer run with the same global batch;
* ``trainer-fsdp``: the same Trainer with ``fsdp=True`` (accelerate FSDP, full state dict): recorded as it goes
  (trains? writes an adapter folder? same adapter as DDP?), not yet supported by a test.

    python bench/distributed_experts_check.py                 # every check, N = the visible GPUs (at most 2)
    python bench/distributed_experts_check.py --smoke         # CPU, gloo, 2 processes, float32: checks the script
Writes $OUT/distributed_experts_check.json (bench/results/ when $OUT is unset), prints a table, exits non-zero when a
check (other than trainer-fsdp) fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# shared multi-GPU hosts: keep NCCL off NVLink multicast (see bench/multi_gpu.py); set before torch / NCCL start
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # lorakit from this checkout (the GPU image has no installed copy)
EXPERTS = "mlp.experts.gate_up_proj,mlp.experts.down_proj,mlp.gate.weight"
WORDS = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "reverse", "copy", ":",
         *"abcdefgh"]


def tokenizer():
    """A word-level tokenizer with a ChatML-like template, built offline (tests/test_train_helpers.py's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
                                  pad_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    return tok


def mixtral_config(smoke: bool):
    from transformers import MixtralConfig

    size = dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_local_experts=4) if smoke else \
        dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_local_experts=8)
    return MixtralConfig(vocab_size=32, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                         pad_token_id=3, bos_token_id=1, eos_token_id=3, max_position_embeddings=128, **size)


def make_inputs(work: Path, smoke: bool) -> tuple[Path, Path]:
    import random

    import torch
    from transformers import MixtralForCausalLM

    folder, data = work / "mixtral", work / "train.jsonl"
    torch.manual_seed(0)
    MixtralForCausalLM(mixtral_config(smoke)).to(torch.float32 if smoke else torch.bfloat16).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    rng = random.Random(3)
    with open(data, "w", encoding="utf-8") as handle:
        for _ in range(64):
            letters = [rng.choice("abcdefgh") for _ in range(rng.randint(2, 5))]
            op = rng.choice(["reverse", "copy"])
            answer = " ".join(reversed(letters) if op == "reverse" else letters)
            handle.write(json.dumps({"prompt": f"{op} {' '.join(letters)} : ", "completion": answer}) + "\n")
    return folder, data


def rel(a, b) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


# -- lorakit train ----------------------------------------------------------------------------------------------------
def lorakit_train(folder: Path, data: Path, out: Path, procs: int, fsdp: bool, args) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] \
        if procs > 1 else [sys.executable]
    command = [*launcher, "-m", "lorakit", "train", "--model", str(folder), "--data", str(data), "--out", str(out),
               "--targets", "q_proj", "v_proj", "--target-parameters", EXPERTS, "--rank", "4", "--lr", "2e-3",
               # 2 micro-batches per step whatever the process count: the same rows in the same order
               "--max-steps", str(args.steps), "--batch-size", str(args.global_batch // 2 // procs),
               "--global-batch", str(args.global_batch), "--eval-examples", "0", "--no-progress", "--seed", "0"]
    if fsdp:
        command.append("--fsdp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        print(f"!! {' '.join(command)} failed (exit {done.returncode})\n{done.stderr[-3000:]}", flush=True)
    return {"ok": done.returncode == 0, "stderr_tail": done.stderr[-400:]}


def losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line.get("kind") == "train" and "loss" in line]


def compare_runs(folder: Path, many: Path, one: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    import lorakit

    a, b = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (many, one))
    ids = torch.tensor([[1, 8, 10, 11, 12, 9, 2, 5]])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    lorakit.load_adapter(ours, many / "adapter")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device),
                                       many / "adapter").eval()
    single = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    lorakit.load_adapter(single, one / "adapter")
    with torch.no_grad():
        mine, peft_logits = ours(ids.to(device)).logits.cpu(), theirs(ids.to(device)).logits.cpu()
        one_logits = single(ids.to(device)).logits.cpu()
        with lorakit.disable_adapters(ours):
            base = ours(ids.to(device)).logits.cpu()
    curve_many, curve_one = losses(many), losses(one)
    return {"same_keys": a.keys() == b.keys(),
            "adapter_rel": max(rel(a[k], b[k]) for k in b if k in a),
            "loss_rel": max(abs(x - y) / abs(y) for x, y in zip(curve_many, curve_one)) if curve_one else None,
            "steps": [len(curve_many), len(curve_one)], "peft_rel": rel(peft_logits, mine),
            "moved_rel": rel(mine, base),  # how far the adapter moved the logits: the comparisons above mean something
            # the N-process adapter's logits against the one-process adapter's: in bf16, AdamW's first steps turn
            # reduction-order noise in near-zero gradients (experts few tokens reach) into +-lr moves of single
            # entries, so the tensors may differ entry by entry while the trained function agrees
            "logits_rel": rel(mine, one_logits)}


# -- compile ----------------------------------------------------------------------------------------------------------
def compile_check(smoke: bool) -> dict:
    import torch
    from torch._dynamo.utils import counters
    from transformers import MixtralForCausalLM

    import lorakit
    from lorakit.models.fast import disable_fast_kernels, use_fast_kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    model = MixtralForCausalLM(mixtral_config(smoke)).to(device=device, dtype=dtype)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], target_parameters=EXPERTS.split(",")))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(4, 32, (2, 64 if not smoke else 11), generator=torch.Generator().manual_seed(1)).to(device)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=not smoke):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    eager_loss, eager_grads = loss_and_grads()
    torch._dynamo.reset()
    counters.clear()
    report = use_fast_kernels(model, require_cuda=not smoke, compile="layers",
                              compile_backend="aot_eager" if smoke else "inductor")
    start = time.time()
    loss, grads = loss_and_grads()
    first = time.time() - start
    loss, grads = loss_and_grads()
    disable_fast_kernels(model)
    worst = sorted(((rel(grads[n], eager_grads[n]), n) for n in grads), reverse=True)[:6]
    return {"report": str(report), "graph_breaks": sum(counters["graph_break"].values()),
            "worst_grads": [(n, round(r, 5), float(grads[n].abs().max()), float(eager_grads[n].abs().max()))
                            for r, n in worst],
            "graph_break_reasons": [k[:160] for k in counters["graph_break"]],
            "unique_graphs": counters["stats"].get("unique_graphs", 0), "first_step_s": round(first, 1),
            "loss_rel": rel(loss, eager_loss), "grad_rel": max(rel(grads[n], eager_grads[n]) for n in grads)}


# -- transformers' Trainer --------------------------------------------------------------------------------------------
def trainer_worker(out: str, mode: str, smoke: bool, global_batch: int) -> None:
    """One process of a Trainer run (torchrun starts N, or the launcher runs it alone with mode 'one')."""
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralForCausalLM, Trainer, TrainingArguments

    import lorakit

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    model = MixtralForCausalLM(mixtral_config(smoke))
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], target_parameters=EXPERTS.split(",")))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["v_proj"]), adapter="spare")
    lorakit.set_adapter(model, "default")  # "spare": trainable, idle
    rows = []
    for i in range(32):
        ids = torch.randint(4, 32, (48,), generator=torch.Generator().manual_seed(i))
        labels = ids.clone()
        labels[: i % 7] = -100
        rows.append({"input_ids": ids, "labels": labels})
    extra = {"fsdp": True, "fsdp_config": {"transformer_layer_cls_to_wrap": ["MixtralDecoderLayer"],
                                           "state_dict_type": "FULL_STATE_DICT"}} if mode == "fsdp" else {}
    args = TrainingArguments(output_dir=os.path.join(out, mode), max_steps=4, per_device_train_batch_size=global_batch // processes,
                             learning_rate=2e-3, report_to=[], use_cpu=smoke, disable_tqdm=True, logging_steps=1,
                             save_steps=2, gradient_checkpointing=True, bf16=not smoke,
                             gradient_checkpointing_kwargs={"use_reentrant": False}, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    trainer.save_model(os.path.join(out, mode, "final"))
    if trainer.args.process_index == 0:
        with open(os.path.join(out, f"trainer-{mode}.json"), "w") as handle:
            json.dump({"losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
                       "wrapper": type(trainer.model_wrapped).__name__}, handle)
        if mode != "fsdp":  # under FSDP the local tensors are shards: the saved folder is what counts there
            save_file({n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                      os.path.join(out, f"trainer-{mode}.safetensors"))


def trainer_run(work: Path, mode: str, procs: int, args) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] \
        if procs > 1 else [sys.executable]
    command = [*launcher, str(Path(__file__).resolve()), "--worker", mode, "--work", str(work),
               "--global-batch", str(args.global_batch)] + (["--smoke"] if args.smoke else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if mode == "one":  # one GPU: with more visible, one process's Trainer is nn.DataParallel over all of them (and
        env["CUDA_VISIBLE_DEVICES"] = "0"  # a per-device batch per GPU): that is the "dataparallel" run
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        print(f"!! trainer {mode} failed (exit {done.returncode})\n{done.stderr[-3000:]}", flush=True)
    return {"ok": done.returncode == 0, "stderr_tail": done.stderr[-600 if done.returncode == 0 else -4000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny float32 model: checks the script")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--checks", default="train,compile,trainer")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        trainer_worker(args.work, args.worker, args.smoke, args.global_batch)
        return
    import torch

    if not args.smoke:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible; run with --smoke to check the script on the CPU")
        args.procs = min(args.procs, torch.cuda.device_count())
    checks = args.checks.split(",")
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dist_experts_"))
    folder, data = make_inputs(work, args.smoke)
    results: dict = {"procs": args.procs, "smoke": args.smoke, "torch": torch.__version__,
                     "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    failed: list[str] = []
    # bf16 weights, AdamW over a few steps: the reduction order alone moves adapters by ~1e-2 relative (the
    # tolerance table's bf16 entry is 4e-2); float32 (smoke): ~1e-4 relative to the largest (still small) B value
    limit = 1e-3 if args.smoke else 5e-2

    if "train" in checks:
        one = lorakit_train(folder, data, work / "one", 1, False, args)
        for mode in ("ddp", "fsdp"):
            run = lorakit_train(folder, data, work / mode, args.procs, mode == "fsdp", args)
            if run["ok"] and one["ok"]:
                run.update(compare_runs(folder, work / mode, work / "one"))
                close = run["adapter_rel"] < limit if args.smoke else run["logits_rel"] < 0.1 * run["moved_rel"]
                good = run["same_keys"] and close and run["peft_rel"] < 1e-4 and run["moved_rel"] > 1e-4
            else:
                good = False
            run["pass"] = good
            results[f"train-{mode}"] = run
            failed += [] if good else [f"train-{mode}"]
    if "compile" in checks:
        try:
            found = compile_check(args.smoke)
            found["pass"] = found["graph_breaks"] == 0 and found["loss_rel"] < limit and found["grad_rel"] < 10 * limit
        except Exception:
            found = {"pass": False, "error": traceback.format_exc()[-1500:]}
        results["compile"] = found
        failed += [] if found["pass"] else ["compile"]
    if "trainer" in checks:
        from safetensors.torch import load_file

        single = trainer_run(work, "one", 1, args)
        for mode in ("ddp", "fsdp", "dataparallel"):
            if mode == "dataparallel" and (args.smoke or args.procs < 2):
                continue
            # "dataparallel": one process seeing every GPU, which Trainer wraps in nn.DataParallel (lorakit's
            # expert LoRA used to fail in its replicas); its global batch is the per-device batch times the GPUs
            run = trainer_run(work, mode, args.procs if mode != "dataparallel" else 1, args)
            if run["ok"]:
                run.update(json.loads((work / f"trainer-{mode}.json").read_text()))
                final = work / mode / "final" / "adapter_model.safetensors"
                run["adapter_folder"] = final.is_file()
                if single["ok"] and final.is_file():
                    reference = load_file(str(work / "one" / "final" / "adapter_model.safetensors"))
                    written = load_file(str(final))
                    run["adapter_rel"] = max(rel(written[k], reference[k]) for k in reference if k in written)
                    run["same_keys"] = written.keys() == reference.keys()
                    one_losses = json.loads((work / "trainer-one.json").read_text())["losses"]
                    run["loss_rel"] = max(abs(x - y) / abs(y) for x, y in zip(run["losses"], one_losses))
            # bf16 (GPU): AdamW makes single entries of near-zero gradients differ (see compare_runs): the losses
            close = run.get("adapter_rel", 1) < limit if args.smoke else run.get("loss_rel", 1) < 1e-2
            run["pass"] = bool(run["ok"] and run.get("adapter_folder") and run.get("same_keys") and close)
            results[f"trainer-{mode}"] = run
            if mode == "dataparallel":  # another global batch: it must train and write the folder, not match
                run["pass"] = bool(run["ok"] and run.get("adapter_folder") and run.get("same_keys"))
            if mode != "fsdp" and not run["pass"]:
                failed.append(f"trainer-{mode}")  # trainer-fsdp is recorded, not yet required
    results["failed"] = failed
    with open(out_dir / "distributed_experts_check.json", "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, default=str)
    print(f"\n{'check':<14} {'pass':<6} details")
    for name, row in results.items():
        if isinstance(row, dict):
            details = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()
                       if k not in ("stderr_tail", "error", "pass", "graph_break_reasons")}
            print(f"{name:<14} {str(row.get('pass')):<6} {details}")
    print(f"written: {out_dir / 'distributed_experts_check.json'}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
