"""``lorakit serve --decoder static``: the static-cache decoder behind the real HTTP server, over real sockets.

The server decodes with ``lorakit.decoding.StaticDecoder`` (on the CPU here, kernels on their PyTorch references);
answers must equal an independent greedy reference (transformers + one adapter, no cache), with LoRA, rsLoRA on
some projections, DoRA and a rank above the decoder's initial stacks, while the pool (--max-loaded 2) evicts and
reloads adapters under new internal names mid-traffic.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import lorakit
from lorakit import generation
from conftest import TOLERANCE
from test_serve_support import ServerProcess, make_adapter, tiny_hf_folder

ADAPTERS = {
    "plain": dict(seed=1),
    "rs": dict(seed=2, r=2, variant="rslora", target_modules=["q_proj", "v_proj", "down_proj"]),
    "dora": dict(seed=3, r=3, variant="dora", std=0.1),
    "wide": dict(seed=4, r=20, alpha=20),  # above the decoder's initial rank 16: its stacks grow
}
PROMPTS = ["Hello", "Paris is the capital of", "The quick brown fox", "Numbers: 1 2 3"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("serve_static")
    model_dir = tiny_hf_folder(root / "model", initializer_range=0.5)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    for name, kw in ADAPTERS.items():
        make_adapter(base, root / "adapters" / name, **kw)
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for name in ADAPTERS:
        lorakit.load_adapter(reference, root / "adapters" / name, adapter=name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAKIT_DISABLE_TRITON", "1")  # PyTorch references on the CPU: fast, and the same math
        process = ServerProcess(model_dir, root / "adapters", "--decoder", "static", "--max-loaded", "2",
                                "--max-rank", "32", "--max-context", "48", "--max-tokens", "40",
                                log=root / "server.log")
        try:
            with httpx.Client(base_url=process.url, timeout=120) as client:
                yield {"client": client, "model": reference, "tokenizer": tokenizer}
        finally:
            process.stop()


def expected(server, prompt: str, adapter: str | None, max_tokens: int) -> tuple[str, list[float]]:
    """Greedy tokens and log-probabilities from transformers with one adapter active, no KV cache."""
    model, tokenizer = server["model"], server["tokenizer"]
    stop = set(generation.end_of_turn_ids(tokenizer))
    ids = generation.encode_prompt(tokenizer, prompt, chat=False)
    tokens, logprobs = [], []
    with torch.inference_mode():
        if adapter is None:
            context = lorakit.disable_adapters(model)
        else:
            lorakit.set_adapter(model, adapter)
            context = contextlib.nullcontext()
        with context:
            for _ in range(max_tokens):
                logits = model(torch.tensor([ids + tokens])).logits[0, -1].float()
                token = int(logits.argmax())
                tokens.append(token)
                logprobs.append(float(torch.log_softmax(logits, -1)[token]))
                if token in stop:
                    break
    return tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=True), logprobs


def ask(server, prompt: str, adapter: str | None, max_tokens: int = 10) -> dict:
    response = server["client"].post("/v1/completions", json={
        "model": adapter or "base", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_health_reports_the_static_decoder(server):
    assert server["client"].get("/health").json()["decoder"] == "static"


def test_answers_equal_the_reference_for_every_adapter_kind(server):
    texts = set()
    for i, adapter in enumerate([None, *ADAPTERS]):
        prompt = PROMPTS[i % len(PROMPTS)]
        choice = ask(server, prompt, adapter)
        text, logprobs = expected(server, prompt, adapter, 10)
        assert choice["text"] == text, adapter
        rtol, atol = TOLERANCE[torch.float32]
        torch.testing.assert_close(torch.tensor(choice["logprobs"]["token_logprobs"]), torch.tensor(logprobs),
                                   rtol=rtol, atol=atol)
        texts.add(expected(server, PROMPTS[0], adapter, 10)[0])
    assert len(texts) >= 4  # the adapters really change the answers


def test_concurrent_clients_while_the_pool_evicts(server):
    jobs = [(PROMPTS[i % 4], [None, *ADAPTERS][i % 5]) for i in range(15)]
    answers = {job: expected(server, *job, 8)[0] for job in set(jobs)}
    with ThreadPoolExecutor(15) as pool:
        got = list(pool.map(lambda job: ask(server, *job, max_tokens=8)["text"], jobs))
    assert got == [answers[job] for job in jobs]


def test_context_of_the_static_cache_is_enforced(server):
    response = server["client"].post("/v1/completions", json={"model": "base", "prompt": "word " * 60, "max_tokens": 4})
    assert response.status_code == 400 and "context" in response.text


def test_sliding_window_model_is_not_capped_at_its_window(capsys):
    """A Mistral v0.1-style model (window 4096, 32k positions): the static decoder's attention takes the window
    (exact at any length, tests/test_static_decoder_families.py), so the default context is the usual 8192 and an
    explicit longer --max-context runs too."""
    from transformers import MistralConfig, MistralForCausalLM

    from lorakit.serve.cli import static_decoder

    config = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32768,
                           sliding_window=4096)
    model = MistralForCausalLM(config).eval()
    decoder = static_decoder(model, "static", max_batch=1, context=32768)
    assert decoder.max_len == 8192 and decoder.parts.layers[0].window == 4096
    assert static_decoder(model, "static", max_batch=1, context=12000, explicit_context=True).max_len == 12000
    assert static_decoder(model, "auto", max_batch=1, context=32768) is None  # not on CUDA
    assert "capped" not in capsys.readouterr().err
