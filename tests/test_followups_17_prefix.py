"""Automatic prefix caching in the static decoder (lorakit.decoding.prefix_cache) and the server around it.

A prefill whose prompt starts with blocks an earlier prompt (or a finished answer) had, under the same adapter as
loaded and the same cache_salt, copies their K/V instead of computing them. The logits must equal those of the
same decoder without a prefix cache (float32 tolerance of the shared table) on every attention path: the decode
kernels (short rest of the prompt), per-prompt attention after a cached prefix (a long rest), a sliding window and
Gemma 2's soft-capping; and nothing may be shared across adapters, reloads, salts or changed weights.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

import lorakit
from conftest import assert_close, tiny_llama
from lorakit.decoding import StaticDecoder
from lorakit.decoding.prefix_cache import PREFIX_BLOCK, PrefixCache


@pytest.fixture(autouse=True)
def _references(monkeypatch):
    # the kernels' PyTorch references (the kernels are tested against them elsewhere): what this file checks is
    # which K/V a prefill reads, and the interpreted Triton kernels would make it minutes long on the CPU
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")


def _prompts(vocab: int, seed: int = 1) -> tuple[list[int], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, vocab, (120,), generator=g).tolist()
    # a shared head; re-sent whole; longer; a long rest (more than PREFILL_KERNEL_MAX_PROMPT, lowered to 24 below:
    # per-prompt attention) after a cached head; one diverging inside a block; one shorter than a block
    return base, [base[:40], base[:40], base[:70], base[:20] + base[60:110], base[:37] + [3, 1, 4], base[:9]]


def _run(model, prompts, names, prefix, salts=None, steps=2, max_len=128):
    """Each prompt prefilled alone (in order, so later ones can hit), then ``steps`` greedy steps; logits of all."""
    decoder = StaticDecoder(model, max_batch=2, max_len=max_len, prefix_cache=prefix)
    out = []
    for j, (prompt, name) in enumerate(zip(prompts, names)):
        logits = decoder.prefill([0], [prompt], [name], None if salts is None else [salts[j]])
        seq = [logits[0]]
        for _ in range(steps):
            seq.append(decoder.step([0], [int(seq[-1].argmax())], [name])[0])
        out.append(torch.stack(seq))
        decoder.release([0])
    return out, decoder


@pytest.mark.parametrize("family", ["llama", "mistral_window", "gemma2_softcap"])
def test_cached_prefixes_give_the_uncached_logits(family, monkeypatch):
    from lorakit.decoding import decoder as decoder_module

    # prompts longer than this run per-prompt attention (queries after a cached prefix: their own mask); the real
    # value (256) would need prompts too long for the CPU
    monkeypatch.setattr(decoder_module, "PREFILL_KERNEL_MAX_PROMPT", 24)
    if family == "llama":
        model = tiny_llama(max_position_embeddings=512)
    elif family == "mistral_window":
        from transformers import MistralConfig, MistralForCausalLM

        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, sliding_window=24)).eval()
    else:
        from transformers import Gemma2Config, Gemma2ForCausalLM

        torch.manual_seed(0)
        model = Gemma2ForCausalLM(Gemma2Config(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=512, sliding_window=24,
            attn_logit_softcapping=5.0, final_logit_softcapping=10.0)).eval()
    _, prompts = _prompts(model.config.vocab_size)
    names = [None] * len(prompts)
    cold, off = _run(model, prompts, names, prefix=0)
    warm, on = _run(model, prompts, names, prefix=1024)  # room for every block (the default, 200 tokens, evicts)
    assert off.prefix is None
    for j, (a, b) in enumerate(zip(warm, cold)):
        assert_close(a, b, msg=f"prompt {j}")
    # the second prompt re-sends the first: its two full blocks (32 of 40 tokens) come from the cache; the third
    # shares the first's 40 tokens (2 blocks); the fourth its first block; the fifth 2 blocks
    assert on.prefix.hits == 32 + 32 + 16 + 32


def test_adapters_reloads_and_salts_never_share():
    model = tiny_llama(max_position_embeddings=512)
    for name, seed in (("a", 1), ("b", 2)):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), adapter=name)
    with torch.no_grad():
        for index, (_, p) in enumerate(lorakit.lora_parameters(model)):
            p.add_(torch.randn_like(p) * 0.2)
    prompt = list(range(3, 60))
    decoder = StaticDecoder(model, max_batch=1, max_len=128, prefix_cache=1024)
    reference = StaticDecoder(model, max_batch=1, max_len=128, prefix_cache=0)

    def both(name, salt=None):
        got = decoder.prefill([0], [prompt], [name], [salt])
        expected = reference.prefill([0], [prompt], [name])
        decoder.release([0]), reference.release([0])
        assert_close(got, expected)
        return got

    a = both("a")
    assert decoder.prefix.hits == 0
    b = both("b")  # the same tokens under another adapter: computed, not copied
    assert decoder.prefix.hits == 0 and (a - b).abs().max() > 1e-3
    both("a", salt="tenant-1")  # another salt: computed
    assert decoder.prefix.hits == 0
    both("a", salt="tenant-1")  # the same adapter and salt: 3 of its blocks copied
    assert decoder.prefix.hits == 3 * PREFIX_BLOCK
    with torch.no_grad():  # adapter "a" changed in place and reloaded: the K/V of its old values must not be used
        for name, p in lorakit.lora_parameters(model):
            if ".a." in f".{name}." or name.endswith("lora_B.a.weight"):
                p.mul_(-1.0)
    decoder.reload_adapter("a"), reference.reload_adapter("a")
    hits = decoder.prefix.hits
    both("a", salt="tenant-1")
    assert decoder.prefix.hits == hits
    # the base weights replaced: every kept block goes
    layer = model.model.layers[0].mlp.down_proj
    base = layer.base_layer if hasattr(layer, "base_layer") else layer
    with torch.no_grad():
        base.weight = torch.nn.Parameter(base.weight * 0.5)
    decoder.refresh(), reference.refresh()
    both(None), both(None)  # computed, then copied: equal to the new weights' logits both times
    assert decoder.prefix.hits == hits + 3 * PREFIX_BLOCK


def test_pool_evicts_least_recently_used_and_never_serves_an_orphan():
    cache = PrefixCache(layers=1, kv_heads=1, head_dim=2, capacity=3 * 4, dtype=torch.float32, device="cpu", block=4)
    k = torch.arange(1 * 1 * 1 * 16 * 2, dtype=torch.float32).reshape(1, 1, 1, 16, 2)
    v = -k
    first = list(range(12)) + [99]
    cache.remember("r", first, k, v, row=0)
    assert cache.lookup("r", first) == cache.lookup("r", first[:12] + [7])  # 3 blocks, the last token left over
    assert len(cache.lookup("r", first)) == 3 and cache.lookup("other root", first) == []
    row_k, row_v = torch.zeros_like(k), torch.zeros_like(v)
    cache.copy_in(cache.lookup("r", first), row_k, row_v, row=0)
    assert torch.equal(row_k[:, :, :, :12], k[:, :, :, :12]) and torch.equal(row_v[:, :, :, :12], v[:, :, :, :12])
    # a new chain of one block: the pool is full, the least recently used block goes, which is the chain's last
    # (a lookup marks a chain's head the most recently used of its blocks: a chain without its head is unreachable)
    cache.remember("s", [50, 51, 52, 53], k, v, row=0)
    assert len(cache.lookup("r", first)) == 2 and len(cache.lookup("s", [50, 51, 52, 53, 1])) == 1
    # blocks of the first chain written again under serials the orphaned blocks never had
    cache.remember("r", first, k, v, row=0)
    assert len(cache.lookup("r", first)) == 3
    # a prompt longer than the pool keeps its first blocks only
    cache.remember("t", list(range(100, 140)), k.expand(1, 1, 1, 16, 2).repeat(1, 1, 1, 3, 1), -k.repeat(1, 1, 1, 3, 1),
                   row=0)
    assert len(cache.lookup("t", list(range(100, 140)))) == 3


def test_prefix_cache_argument_is_checked():
    with pytest.raises(lorakit.LorakitError, match="prefix_cache"):
        StaticDecoder(tiny_llama(), max_batch=1, max_len=32, prefix_cache=-1)
    assert StaticDecoder(tiny_llama(), max_batch=1, max_len=32, prefix_cache=8).prefix is None  # under a block


def test_server_reuses_a_conversation_and_answers_as_without(tmp_path, monkeypatch):
    """Over real sockets: the second turn of a chat (its history re-sent with the answer) copies the first turn's
    prompt and answer; greedy answers equal a server without the prefix cache; /health counts the hit tokens."""
    from test_serve_support import ServerProcess, tiny_hf_folder

    model_dir = tiny_hf_folder(tmp_path / "model", initializer_range=0.5)
    (tmp_path / "adapters").mkdir()
    history = [{"role": "system", "content": "You are a terse assistant who answers in a few words. " * 3},
               {"role": "user", "content": "Name three colours of the rainbow, please."}]
    answers = {}
    for label, flags in (("on", ()), ("off", ("--prefix-cache-tokens", "0"))):
        process = ServerProcess(model_dir, tmp_path / "adapters", "--decoder", "static", "--max-context", "512",
                                *flags, log=tmp_path / f"server_{label}.log")
        try:
            with httpx.Client(base_url=process.url, timeout=120) as client:
                turns, details, messages = [], [], list(history)
                for turn in range(2):
                    body = {"model": "base", "messages": messages, "max_tokens": 12, "temperature": 0}
                    reply = client.post("/v1/chat/completions", json=body)
                    assert reply.status_code == 200, reply.text
                    text = reply.json()["choices"][0]["message"]["content"]
                    turns.append(text)
                    details.append(reply.json()["usage"].get("prompt_tokens_details"))
                    messages = messages + [{"role": "assistant", "content": text},
                                           {"role": "user", "content": f"And {turn + 2} more?"}]
                # the same prompt again, streamed with usage and through the Responses API: all but its last
                # partial block comes from the cache (with it on)
                stream = client.post("/v1/chat/completions", json={**body, "stream": True,
                                                                   "stream_options": {"include_usage": True}})
                usage = [json.loads(line[6:]) for line in stream.text.splitlines()
                         if line.startswith("data: {")][-1]["usage"]
                details.append(usage.get("prompt_tokens_details"))
                response = client.post("/v1/responses", json={"model": "base", "input": history, "max_output_tokens": 16,
                                                              "temperature": 0}).json()
                assert "usage" in response, response
                details.append(response["usage"]["input_tokens_details"]["cached_tokens"])
                health = client.get("/health").json()
                answers[label] = (turns, health.get("prefix_cache_hit_tokens"), details, usage["prompt_tokens"])
        finally:
            process.stop()
    assert answers["on"][0] == answers["off"][0]
    assert answers["off"][1] is None  # off: not reported
    assert answers["off"][2] == [None, None, None, 0]  # no prefix cache: no prompt_tokens_details (as vLLM)
    first, second, streamed, responses = answers["on"][2]
    prompt = answers["on"][3]
    assert first == {"cached_tokens": 0} and second["cached_tokens"] >= 3 * PREFIX_BLOCK
    assert streamed["cached_tokens"] == (prompt - 1) // PREFIX_BLOCK * PREFIX_BLOCK and responses > 0
    assert answers["on"][1] >= 3 * PREFIX_BLOCK  # the second turn found the system prompt and more


def test_rows_admitted_with_only_their_window_are_not_kept():
    """transformers' cache keeps a sliding layer's last window - 1 columns only: a row admitted from it lacks the
    earlier positions, which a prompt that shares an early prefix of it would read (inside its own window)."""
    from transformers import MistralConfig, MistralForCausalLM

    from lorakit.generation import prefill

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=24)).eval()
    g = torch.Generator().manual_seed(3)
    long = torch.randint(0, 128, (60,), generator=g).tolist()
    later = long[:40] + torch.randint(0, 128, (5,), generator=g).tolist()
    decoder = StaticDecoder(model, max_batch=1, max_len=128, prefix_cache=1024)
    reference = StaticDecoder(model, max_batch=1, max_len=128, prefix_cache=0)
    _, batch = prefill(model, [long], [None])
    for layer in batch._kv_layers():  # as transformers' sliding cache layers keep them (this version keeps all)
        layer.keys, layer.values = layer.keys[:, :, -23:], layer.values[:, :, -23:]
    decoder.admit([0], batch)
    assert not decoder.whole[0]
    decoder.remember(0, long, None)
    decoder.release([0])
    got = decoder.prefill([0], [later], [None])
    assert decoder.prefix.hits == 0
    assert_close(got, reference.prefill([0], [later], [None]))


def test_an_adapter_replaced_under_its_name_gets_none_of_the_old_blocks():
    """A server unloads adapter 'x' and loads another folder as 'x' (vLLM's load/unload routes): the decoder sees
    new modules under the old name, loads them into a slot with a new serial, and computes every block again."""
    model = tiny_llama(max_position_embeddings=512)
    prompt = list(range(5, 60))

    def add(seed):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), adapter="x")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in lorakit.lora_parameters(model, "x"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    add(1)
    decoder = StaticDecoder(model, max_batch=1, max_len=128, prefix_cache=1024)
    first = decoder.prefill([0], [prompt], ["x"])
    decoder.release([0])
    lorakit.delete_adapter(model, "x")
    add(2)
    again = decoder.prefill([0], [prompt], ["x"])
    decoder.release([0])
    assert decoder.prefix.hits == 0 and (first - again).abs().max() > 1e-3
    reference = StaticDecoder(model, max_batch=1, max_len=128, prefix_cache=0)
    assert_close(again, reference.prefill([0], [prompt], ["x"]))


def test_prompts_sharing_new_blocks_in_one_call_compute_them_once():
    """A request's n choices, or clients arriving together with one new system prompt, come in one prefill: the
    prompts sharing uncached blocks with an earlier one wait for a second pass that copies them; logits unchanged."""
    model = tiny_llama(max_position_embeddings=512)
    g = torch.Generator().manual_seed(5)
    system = torch.randint(0, 128, (50,), generator=g).tolist()
    prompts = [system + [1, 2], system + [3], torch.randint(0, 128, (40,), generator=g).tolist(), system + [1, 2],
               system[:20] + [9]]  # the last shares one block only: not worth a second pass
    decoder = StaticDecoder(model, max_batch=5, max_len=128, prefix_cache=1024)
    reference = StaticDecoder(model, max_batch=5, max_len=128, prefix_cache=0)
    rows = [4, 0, 2, 1, 3]
    # prompts 1 and 3 copy the system prompt's 3 full blocks; the others run whole
    assert decoder.prefix.plan([(None, 0, None)] * 5, prompts) == ([1, 3], sum(map(len, prompts)) - 2 * 48)
    assert decoder.prefill_tokens(prompts, [None] * 5, [None] * 5) == sum(map(len, prompts)) - 2 * 48
    got = decoder.prefill(rows, prompts, [None] * 5)
    assert_close(got, reference.prefill(rows, prompts, [None] * 5))
    assert decoder.prefix.hits == 2 * 3 * PREFIX_BLOCK  # prompts 1 and 3: the system prompt's 3 full blocks
    assert decoder.lengths == reference.lengths
    tokens = got.argmax(-1).tolist()  # the rows decode on as the reference's
    assert_close(decoder.step(rows, tokens, [None] * 5), reference.step(rows, tokens, [None] * 5))


def test_a_cache_too_large_for_the_gpu_is_one_line(monkeypatch):
    """A CUDA out-of-memory while the decoder allocates its caches says the sizes and the flags that shrink them."""
    import lorakit.decoding
    from lorakit.serve.cli import static_decoder

    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(lorakit.decoding, "StaticDecoder", no_room)
    with pytest.raises(lorakit.LorakitError) as error:
        static_decoder(tiny_llama(), "static", max_batch=32, context=4096, explicit_context=True)
    message = str(error.value)
    # tiny_llama: 2 layers x 2 kv heads x 8 dims x K and V x 4 bytes = 256 bytes a token
    assert "32 rows x 4096 tokens: 0.0 GiB" in message and "prefix cache (32768 tokens" in message
    assert "--max-context" in message and "--prefix-cache-tokens" in message and "\n" not in message


def test_the_engine_counts_shared_blocks_when_it_routes_a_burst(monkeypatch):
    """Newcomers that bring one new system prompt together run through the static decoder's two passes when what
    those compute fits STATIC_PREFILL_MAX_TOKENS, though their prompts' sum does not (before: transformers' prefill,
    every prompt whole)."""
    import threading

    from lorakit.generation import SamplingParams
    from lorakit.serve import engine as engine_module
    from lorakit.serve.engine import Engine, Request

    def whole_prompts(*args, **kwargs):
        raise AssertionError("the burst went through transformers' prefill")

    monkeypatch.setattr(engine_module, "STATIC_PREFILL_MAX_TOKENS", 100)
    monkeypatch.setattr(engine_module, "prefill", whole_prompts)
    model = tiny_llama(max_position_embeddings=512)
    decoder = StaticDecoder(model, max_batch=4, max_len=128, prefix_cache=1024)
    lock = threading.RLock()
    engine = Engine(model, lock, max_batch=4, decoder=decoder, prefill_chunk=0)  # routing by the total
    system = list(range(20, 60))
    burst = [Request(prompt=system + [j, j + 1], adapter=None, params=SamplingParams(max_new_tokens=3),
                     on_token=lambda token, info: True, on_finish=lambda reason: None) for j in range(4)]
    try:
        with lock:  # the engine's thread has nothing to do: this step is the only one
            engine._step(burst, [])
    finally:
        engine.close()
    assert sum(map(len, (r.prompt for r in burst))) > 100 and decoder.prefix.hits == 3 * 32
    assert all(r.row >= 0 for r in burst)


def test_prefix_cache_tokens_without_the_static_decoder_says_so(capsys):
    from lorakit.serve.cli import static_decoder

    model = tiny_llama()
    assert static_decoder(model, "transformers", max_batch=2, context=32, prefix_cache=64) is None
    assert "--prefix-cache-tokens has no effect: --decoder transformers" in capsys.readouterr().err
    assert static_decoder(model, "auto", max_batch=2, context=32, prefix_cache=64) is None  # 'auto' off CUDA
    assert "--prefix-cache-tokens has no effect: decoding through transformers (not on CUDA)" in capsys.readouterr().err
    assert static_decoder(model, "auto", max_batch=2, context=32) is None
    assert "prefix" not in capsys.readouterr().err  # not given: nothing said
