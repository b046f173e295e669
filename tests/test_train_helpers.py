"""Tiny models, tokenizers and data files for the training tests (imported by the other test_train_* files).

A tiny Llama (tests/conftest.py ``tiny_llama``) is saved with ``save_pretrained`` together with a word-level
tokenizer built offline (``tokenizers`` WordLevel + ``PreTrainedTokenizerFast``) that has a ChatML-like template,
so the real CLI can load it as a local Hugging Face folder in a subprocess.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_llama

REPO = Path(__file__).resolve().parents[1]
LETTERS = list("abcdefgh")
WORDS = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "reverse", "copy", ":"] + LETTERS


def tiny_tokenizer():
    """Word-level tokenizer (whitespace split) with eos = <|im_end|> and a ChatML-like chat template."""
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


# the train loop's quick settings and model, shared by the loop and run-audit tests
SMALL = dict(rank=4, alpha=8.0, batch_size=4, eval_examples=0, progress=False, save_every=0, lr=5e-3)


def tiny_train_model(seed: int = 0):
    """The tiny Llama every train-loop test trains (the word tokenizer's 32-id vocabulary)."""
    return tiny_llama(seed=seed, vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2)


def lora_state(model) -> dict:
    """A copy of the trainable parameters by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def make_model_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama + tokenizer saved as a Hugging Face folder (safetensors)."""
    model = tiny_llama(seed=seed, vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def task_records(n: int, seed: int = 0, shape: str = "prompt_completion") -> list[dict]:
    """'reverse b c a :' -> 'a c b' (and 'copy'), with 2-5 letters, so examples have different supervised lengths."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        letters = [rng.choice(LETTERS) for _ in range(rng.randint(2, 5))]
        op = rng.choice(["reverse", "copy"])
        answer = " ".join(reversed(letters) if op == "reverse" else letters)
        prompt = f"{op} {' '.join(letters)} :"
        if shape == "messages":
            records.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        else:
            records.append({"prompt": prompt + " ", "completion": answer})
    return records


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m lorakit ARGS`` in a subprocess (the real entry point), returning its output."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lorakit", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tiny-data")
    return write_jsonl(folder / "train.jsonl", task_records(48, seed=1)), write_jsonl(folder / "val.jsonl", task_records(8, seed=2))


def test_tiny_tokenizer_masks_only_the_completion():
    """The helper tokenizer gives the label layout the loop relies on: prompt masked, answer + <|im_end|> targets."""
    from lorakit.train.data import IGNORE_INDEX, tokenize_example

    tok = tiny_tokenizer()
    example = tokenize_example({"prompt": "reverse a b : ", "completion": "b a"}, tok, max_length=32)
    ids, labels = example["input_ids"], example["labels"]
    assert tok.convert_ids_to_tokens(ids) == ["reverse", "a", "b", ":", "b", "a", "<|im_end|>"]
    assert labels == [IGNORE_INDEX] * 4 + ids[4:]
