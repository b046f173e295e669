"""Writes the folders beside this file (not a test; kept to say how they were made and to make them again).

Side venv, apart from the project's: ``python3 -m venv /tmp/oldpeft && /tmp/oldpeft/bin/pip install torch==2.13.0
transformers==4.46.3 safetensors accelerate``, each peft with ``pip install --no-deps --target /tmp/peft_<v>
peft==<v>``. Then, from the repository root:

  /tmp/oldpeft/bin/python tests/data/old_peft/make_old_peft.py base /tmp/oldgen/base   # the tiny Llama (4.46.3)
  (the project venv) write base/tokenizer*.json: a WordLevel tokenizer of 128 words (special tokens, "user",
      "assistant", "system", newline, w0..w120) with the tests' ChatML template, saved by PreTrainedTokenizerFast
  PYTHONPATH=/tmp/peft_<v> /tmp/oldpeft/bin/python tests/data/old_peft/make_old_peft.py adapters /tmp/oldgen/out \
      /tmp/oldgen/base   # for v in 0.4.0 0.6.2 0.10.0 0.13.2

and the chosen folders were copied here with adapter_config.json, adapter_model.safetensors and
expected_logits.json trimmed to the last three positions (logits printed with 7 significant digits). Tensors
equal across versions were kept once (0.13.2's all_linear is 0.10.0's).
"""

import json
import os
import shutil
import sys

import torch

IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 120, 7]])


def make_base(folder: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)


def make_adapters(out: str, base: str) -> None:
    import peft
    import transformers
    from packaging.version import Version
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    version = Version(peft.__version__)

    def variant(name: str, config_class=LoraConfig, adalora: bool = False, **config) -> None:
        torch.manual_seed(1234)
        model = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
        if config_class is LoraConfig:
            config = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05, **config}
        wrapped = get_peft_model(model, config_class(**config))
        generator = torch.Generator().manual_seed(99)
        with torch.no_grad():  # every trainable tensor moved (lora_B starts at 0): the adapter changes the logits
            for key, tensor in wrapped.named_parameters():
                if tensor.requires_grad:
                    scale = 0.02 if "lm_head" in key and "lora" not in key else 0.2
                    tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)
        if adalora:
            train_adalora(wrapped)
        wrapped.eval()
        with torch.no_grad():
            logits = wrapped(input_ids=IDS).logits[0]
            ids = IDS
            for _ in range(4):  # greedy, a full forward each step (no cache: the same in every version)
                ids = torch.cat([ids, wrapped(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
        folder = os.path.join(out, peft.__version__, name)
        shutil.rmtree(folder, ignore_errors=True)
        wrapped.save_pretrained(folder, safe_serialization=True)
        with open(os.path.join(folder, "expected_logits.json"), "w") as f:
            json.dump({"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                       "input_ids": IDS[0].tolist(), "greedy": ids[0, IDS.shape[1]:].tolist(),
                       "logits": [[float(x) for x in row] for row in logits]}, f)

    qv = dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    variant("qv_safe", **qv)
    variant("qv_notask", target_modules=["q_proj", "v_proj"], task_type=None)
    variant("emb_lora", target_modules=["embed_tokens", "q_proj"])
    variant("bias_all", target_modules=["q_proj", "v_proj"], bias="lora_only")
    variant("ia3", config_class=peft.IA3Config, task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"])
    if version >= Version("0.6.0"):  # AdaLoRA trained through its final phase: rank_pattern of bool lists, resized
        variant("adalora_trained", config_class=peft.AdaLoraConfig, adalora=True, task_type="CAUSAL_LM", init_r=6,
                target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8, lora_alpha=8, lora_dropout=0.0,
                target_modules=["q_proj", "v_proj"])
        variant("patterns", rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16}, **qv)
    if version >= Version("0.8.0"):
        variant("all_linear", target_modules="all-linear", modules_to_save=["lm_head"])
    if version >= Version("0.9.0"):
        variant("rslora", use_rslora=True, **qv)
        variant("dora", use_dora=True, **qv)
        variant("dora_all", use_dora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"])
    if version >= Version("0.10.0"):
        variant("layer_replication", layer_replication=[[0, 2], [1, 2]], target_modules=["q_proj", "v_proj"])


def train_adalora(wrapped) -> None:
    """Eight SGD steps with the rank allocator: the last ones prune to target_r and set rank_pattern."""
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.5)
    data = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(5))
    wrapped.train()
    for step in range(8):
        wrapped(input_ids=data, labels=data).loss.backward()
        optimizer.step()
        wrapped.base_model.update_and_allocate(step)
        optimizer.zero_grad()


if __name__ == "__main__":
    make_base(sys.argv[2]) if sys.argv[1] == "base" else make_adapters(sys.argv[2], sys.argv[3])
