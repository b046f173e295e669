"""Helpers shared by the generate / merge / serve tests, and tests of the helpers themselves.

``tiny_hf_folder``: a random tiny Llama saved as a Hugging Face folder with a real byte-level BPE tokenizer
(trained offline with ``tokenizers`` in well under a second, ChatML chat template), so tests need no download
and no model cache. ``make_adapter``: a PEFT-format adapter with random non-zero B, so adapters differ.
``ServerProcess``: ``python -m lorakit serve`` on a free loopback port, as a user starts it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import tiny_llama

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = [
    "The quick brown fox jumps over the lazy dog.", "LoRA adapters add a low-rank update to frozen weights.",
    "Paris is the capital of France. Berlin is the capital of Germany.", "Hello, how are you today? I am fine.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.", "Servers answer many requests for many adapters at once.",
    "Ünïcödé tëxt, emoji 🙂 and 中文 characters too.",
]


def make_tokenizer(vocab_size: int = 360):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT * 4, trainer)
    # model_input_names: what Llama-family tokenizers (and every tokenizer on transformers 5) return; 4.x's plain
    # fast tokenizer adds token_type_ids, which generate(**inputs) refuses for Llama
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>", chat_template=CHATML,
                                   model_input_names=["input_ids", "attention_mask"])


def tiny_hf_folder(folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random Llama + tokenizer to ``folder`` (a plain Hugging Face model folder)."""
    tokenizer = make_tokenizer()
    config = dict(vocab_size=len(tokenizer), max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.update(overrides)
    model = tiny_llama(seed=seed, **config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def never_ending(model_dir: Path):
    """Zero the output rows of the tokenizer's end-of-turn tokens in the model saved at ``model_dir`` and save it
    again: the model never ends a turn by itself (a zero logit, below the largest of ~360 random ones), so greedy
    answers run to max_tokens. Returns the model (transformers, float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.generation import end_of_turn_ids

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for token in end_of_turn_ids(AutoTokenizer.from_pretrained(model_dir)):
            base.lm_head.weight[token] = 0
    base.save_pretrained(model_dir)
    return base


def make_adapter(model, folder: Path, seed: int, r: int = 4, alpha: float = 8.0, std: float = 0.3, **config) -> Path:
    """Inject a LoRA with random non-zero B into ``model``, save it to ``folder`` as PEFT does, then remove it."""
    import lorakit

    name = f"tmp{seed}"
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=alpha, **{"target_modules": "all-linear", **config}), adapter=name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, parameter in lorakit.lora_parameters(model, name):
            if key.endswith("lora_B"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    lorakit.save_adapter(model, folder, adapter=name)
    lorakit.delete_adapter(model, name)
    return Path(folder)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m lorakit serve ...`` in a subprocess; ``url`` once ``/health`` answers."""

    def __init__(self, model: Path, adapters: Path, *extra: str, api_key: str | None = None, log: Path | None = None,
                 env: dict[str, str] | None = None):
        """``env``: variables set for the server on top of this process's (e.g. a PYTHONPATH of test hooks)."""
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # "base" unless the test names the model itself (a flag given twice with two values is refused)
        name = [] if any(a == "--name" or a.startswith("--name=") for a in extra) else ["--name", "base"]
        args = [sys.executable, "-m", "lorakit", "serve", "--model", str(model), "--adapters", str(adapters),
                "--port", str(self.port), *name, *extra]
        if api_key:
            args += ["--api-key", api_key]
        # the CPU server runs the PyTorch reference path, as a real CPU deployment does (no Triton interpreter)
        env = {**os.environ, "LORAKIT_DISABLE_TRITON": "1", "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1",
               **(env or {})}
        self.log = log
        out = open(log, "wb") if log else subprocess.DEVNULL
        self.process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        cwd=Path(__file__).resolve().parents[1])
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start in 90 s: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log and self.log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def tiny_folder_with_adapters(root: Path, names=("alpha", "beta")) -> dict:
    """A ``tiny_hf_folder`` model (large random weights, so adapters change its answers) in ``root/model`` and one
    ``make_adapter`` adapter per name beside it: ``{"model", "adapters", "root"}``."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_hf_folder(root / "model", initializer_range=0.5)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    adapters = [make_adapter(base, root / name, seed=i + 1) for i, name in enumerate(names)]
    return {"model": model_dir, "adapters": adapters, "root": root}


@contextlib.contextmanager
def tiny_server_client(root: Path, *extra: str):
    """An ``httpx.Client`` on a server (``ServerProcess``, its log in ``root``) of a ``tiny_hf_folder`` model
    (ChatML without tools: a template that writes no tool calls) with an empty adapters folder; stopped after."""
    import httpx

    model = tiny_hf_folder(root / "model")
    (root / "adapters").mkdir()
    process = ServerProcess(model, root / "adapters", *extra, log=root / "server.log")
    try:
        with httpx.Client(base_url=process.url, timeout=60) as client:
            yield client
    finally:
        process.stop()


# -- tests of the helpers ----------------------------------------------------------------------------------------
def test_tokenizer_round_trips_and_fits_the_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_hf_folder(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    text = "Paris is the capital of France 🙂"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert max(ids) < model.config.vocab_size == len(tokenizer)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_adapters_differ(tmp_path):
    import lorakit

    model = tiny_llama()
    first = lorakit.read_adapter(make_adapter(model, tmp_path / "a", seed=1))
    second = lorakit.read_adapter(make_adapter(model, tmp_path / "b", seed=2))
    key = next(k for k in first.tensors if k.endswith("lora_B.weight"))
    assert first.tensors[key].abs().min() > 0
    assert not torch.equal(first.tensors[key], second.tensors[key])
    assert lorakit.adapter_names(model) == []


def wait_idle(client, seconds: float) -> bool:
    """Whether the server's engine (``/health``) has nothing running or waiting within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stats = client.get("/health").json()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return True
        time.sleep(0.05)
    return False
