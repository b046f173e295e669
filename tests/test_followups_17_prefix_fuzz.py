"""Randomized traffic against the static decoder's prefix cache: with it on, every logit equals the same decoder's
with ``prefix_cache=0`` (float32 tolerance of the shared table), whatever the sequence of operations.

Two twin models (deep copies) each get a ``StaticDecoder``, one with a prefix cache (a tiny pool of 32..64 tokens,
so blocks are evicted all the time, or a large one, so long chains hit), one without; a seeded random program drives
both with the same operations: prefills of several prompts at once that share random prefixes (block boundaries
+-1, prompts shorter than a block, identical prompts in one batch, a remembered sequence + 0/1/15/16/17 tokens,
prompts near ``max_len``), greedy decode steps, releases that ``remember`` prompt + answer as the server does,
adapters of every kind the decoder serves (LoRA, rsLoRA, DoRA, peft's lora_bias) changed in place and reloaded, or
deleted and injected again under the same name, while rows on them are still running, salts, and rows admitted
from transformers' prefill. The kernels run as their PyTorch references (LORAKIT_DISABLE_TRITON=1).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

import lorakit
from conftest import assert_close, tiny_llama
from lorakit.decoding import StaticDecoder
from lorakit.decoding.prefix_cache import PREFIX_BLOCK

MAX_LEN = 80
ROWS = 4
# name -> config: every adapter kind the static decoder serves
KINDS = {
    "lora": dict(r=4, alpha=8),
    "rs": dict(r=2, alpha=3, variant="rslora", target_modules=["q_proj", "v_proj", "down_proj"]),
    "dora": dict(r=3, alpha=6, variant="dora"),
    "bias": dict(r=2, alpha=4, lora_bias=True, target_modules=["k_proj", "o_proj", "up_proj"]),
}


@pytest.fixture(autouse=True)
def _references(monkeypatch):
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")


def _add(model, name: str, seed: int) -> None:
    """Inject adapter ``name`` of its kind with random non-zero weights (``seed``: the same on both twins)."""
    import warnings

    torch.manual_seed(seed)  # inject's own init (lora_A) draws from the global generator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lora_bias on layers without a bias: runs, cannot be merged (irrelevant)
        lorakit.inject(model, lorakit.LoraConfig(**KINDS[name]), adapter=name)
    _perturb(model, name, seed)


def _perturb(model, name: str, seed: int) -> None:
    """Change adapter ``name``'s tensors in place, the same way on each twin."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(lorakit.lora_parameters(model, name)):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


class Twins:
    """The same operations on a decoder with a prefix cache and one without; every logits output compared."""

    def __init__(self, seed: int, capacity: int, window: int | None = None):
        from lorakit.decoding import decoder as decoder_module

        if window is None:
            base = tiny_llama(seed=seed, max_position_embeddings=256)
        else:  # a sliding window shorter than the prompts: windowed attention after a cached prefix
            from transformers import MistralConfig, MistralForCausalLM

            torch.manual_seed(seed)
            base = MistralForCausalLM(MistralConfig(
                vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, sliding_window=window)).eval()
        for j, name in enumerate(KINDS):
            _add(base, name, seed * 100 + j)
        self.models = [base, copy.deepcopy(base)]
        self.on = StaticDecoder(self.models[0], max_batch=ROWS, max_len=MAX_LEN, prefix_cache=capacity)
        self.off = StaticDecoder(self.models[1], max_batch=ROWS, max_len=MAX_LEN, prefix_cache=0)
        assert self.on.prefix is not None and self.off.prefix is None
        self.rows: dict[int, dict] = {}  # row -> prompt, answer tokens, adapter, salt, last logits
        self.checked = 0
        self._module = decoder_module

    def compare(self, got, expected, what: str):
        assert_close(got, expected, msg=f"{what} (check {self.checked})")
        self.checked += 1

    def prefill(self, prompts, adapters, salts):
        rows = self.on.free_rows()[:len(prompts)]
        assert rows == self.off.free_rows()[:len(prompts)]
        got = self.on.prefill(rows, prompts, adapters, salts)
        expected = self.off.prefill(rows, prompts, adapters, salts)
        self.compare(got, expected, f"prefill of {[len(p) for p in prompts]} tokens on {adapters} salts {salts}")
        for j, row in enumerate(rows):
            self.rows[row] = dict(prompt=list(prompts[j]), answer=[], adapter=adapters[j], salt=salts[j],
                                  logits=expected[j])

    def admit(self, prompts, adapters, salts):
        """Rows prefilled by transformers' forward (the server's long-prompt path), then remembered."""
        from lorakit.generation import prefill

        rows = self.on.free_rows()[:len(prompts)]
        outs = []
        for decoder, model in ((self.on, self.models[0]), (self.off, self.models[1])):
            logits, batch = prefill(model, prompts, adapters)
            decoder.admit(rows, batch)
            for row, prompt, adapter, salt in zip(rows, prompts, adapters, salts):
                decoder.remember(row, prompt, adapter, salt)
            outs.append(logits)
        self.compare(outs[0], outs[1], f"transformers prefill of {[len(p) for p in prompts]} tokens")
        for j, row in enumerate(rows):
            self.rows[row] = dict(prompt=list(prompts[j]), answer=[], adapter=adapters[j], salt=salts[j],
                                  logits=outs[1][j])

    def step(self):
        rows = [row for row, s in self.rows.items() if self.off.lengths[row] < MAX_LEN]
        if not rows:
            return
        tokens = [int(self.rows[row]["logits"].argmax()) for row in rows]
        adapters = [self.rows[row]["adapter"] for row in rows]
        got = self.on.step(rows, tokens, adapters)
        expected = self.off.step(rows, tokens, adapters)
        self.compare(got, expected, f"step of rows {rows} on {adapters}")
        for j, row in enumerate(rows):
            self.rows[row]["answer"].append(tokens[j])
            self.rows[row]["logits"] = expected[j]

    def finish(self, row: int):
        """As the engine: remember prompt + answer (the answer's last token has no K/V yet), then release."""
        state = self.rows.pop(row)
        for decoder in (self.on, self.off):
            decoder.remember(row, state["prompt"] + state["answer"], state["adapter"], state["salt"])
            decoder.release([row])
        return state


def _program(seed: int, capacity: int, operations: int, window: int | None = None) -> Twins:
    rng = random.Random(seed)
    twins = Twins(seed, capacity, window)
    vocab = 128
    bases = [[rng.randrange(vocab) for _ in range(MAX_LEN)] for _ in range(3)]
    seen: list[tuple[list[int], str | None, str | None]] = []  # sequences remembered (prompts, prompt + answer)
    names = [None, *KINDS]
    salts = [None, None, "tenant-1", "tenant-2"]
    generation = {name: 0 for name in KINDS}

    def length_near_block() -> int:
        return max(1, min(MAX_LEN - 1, rng.randrange(0, MAX_LEN // PREFIX_BLOCK + 1) * PREFIX_BLOCK + rng.choice((-1, 0, 1))))

    def new_prompt(batch):
        kind = rng.random()
        if kind < 0.3 and seen:  # a remembered sequence, re-sent with 0/1/15/16/17 more tokens
            tokens, adapter, salt = rng.choice(seen)
            extra = [rng.randrange(vocab) for _ in range(rng.choice((0, 1, 15, 16, 17)))]
            prompt = (tokens + extra)[:MAX_LEN - 1]
            if rng.random() < 0.15:  # sometimes under another adapter or salt: must not share
                adapter, salt = rng.choice(names), rng.choice(salts)
            return prompt, adapter, salt
        if kind < 0.4 and batch:  # identical to one in this batch
            return batch[rng.randrange(len(batch))]
        if kind < 0.5:  # shorter than a block
            return [rng.randrange(vocab) for _ in range(rng.randrange(1, PREFIX_BLOCK))], rng.choice(names), rng.choice(salts)
        base = rng.choice(bases)
        n = length_near_block() if rng.random() < 0.6 else rng.randrange(1, MAX_LEN)
        prompt = base[:n]
        if rng.random() < 0.3:  # diverges after a shared head
            cut = rng.randrange(0, n)
            prompt = base[:cut] + [rng.randrange(vocab) for _ in range(n - cut)]
        return prompt, rng.choice(names), rng.choice(salts)

    for _ in range(operations):
        free = len(twins.on.free_rows())
        op = rng.random()
        if free and op < 0.35:
            batch = []
            if free > 1 and rng.random() < 0.2:  # clients arriving together with one new system prompt
                head = [rng.randrange(vocab) for _ in range(rng.randint(2 * PREFIX_BLOCK + 1, MAX_LEN - 20))]
                adapter, salt = rng.choice(names), rng.choice(salts)
                for _ in range(rng.randint(2, free)):
                    tail = [rng.randrange(vocab) for _ in range(rng.randint(0, 17))]
                    batch.append(((head + tail)[:MAX_LEN - 1], adapter if rng.random() < 0.8 else rng.choice(names),
                                  salt))
            for _ in range(rng.randint(1, free) if not batch else 0):
                batch.append(new_prompt(batch))
            prompts, adapters, batch_salts = (list(x) for x in zip(*batch))
            if rng.random() < 0.1:
                twins.admit(prompts, adapters, batch_salts)
            else:
                twins.prefill(prompts, adapters, batch_salts)
            seen.extend((p, a, s) for p, a, s in zip(prompts, adapters, batch_salts) if len(p) >= PREFIX_BLOCK)
        elif twins.rows and op < 0.7:
            for _ in range(rng.randint(1, 6)):
                twins.step()
        elif twins.rows and op < 0.88:
            state = twins.finish(rng.choice(sorted(twins.rows)))
            seen.append((state["prompt"] + state["answer"][:-1], state["adapter"], state["salt"]))
        elif op < 0.95:  # an adapter changed in place and reloaded (rows on it may still be running)
            name = rng.choice(list(KINDS))
            generation[name] += 1
            for model, decoder in zip(twins.models, (twins.on, twins.off)):
                _perturb(model, name, seed * 1000 + generation[name])
                if name in decoder.adapters:
                    decoder.reload_adapter(name)
        else:  # deleted and injected again under the same name
            name = rng.choice(list(KINDS))
            generation[name] += 1
            for model in twins.models:
                lorakit.delete_adapter(model, name)
                _add(model, name, seed * 1000 + generation[name])
    return twins


@pytest.mark.parametrize("seed,capacity,window", [(1, 32, None), (2, 64, None), (3, 48, None), (4, 4096, None),
                                                  (5, 4096, None), (9, 40, 24), (7, 4096, 24), (8, 4096, 20)])
def test_random_traffic_gives_the_uncached_logits(seed, capacity, window, monkeypatch):
    from lorakit.decoding import decoder as decoder_module

    # per-prompt attention after a cached prefix for rests above 24 tokens (the real 256 needs longer prompts)
    monkeypatch.setattr(decoder_module, "PREFILL_KERNEL_MAX_PROMPT", 24)
    twins = _program(seed, capacity, operations=250, window=window)
    assert twins.checked > 100
    assert twins.on.prefix.hits > 0  # the cache did serve blocks (else the comparison proves nothing)


@pytest.mark.parametrize("change", ["reload", "replace", "base"])
def test_a_row_whose_weights_changed_while_it_ran_is_not_kept(change):
    """Found by the program above: a row prefilled under one load of an adapter (or of the base weights) that is
    reloaded after in-place changes, deleted and injected again under its name, or whose base weights are replaced
    and ``refresh``-ed while the row still runs, holds K/V of the old weights; remembered at its end under the new
    load, they were copied into later prompts that start the same way."""
    model = tiny_llama(max_position_embeddings=256)
    _add(model, "lora", 1)
    name = None if change == "base" else "lora"
    prompt = list(range(3, 40))
    decoder = StaticDecoder(model, max_batch=1, max_len=MAX_LEN, prefix_cache=1024)
    logits = decoder.prefill([0], [prompt], [name])
    answer = [int(logits[0].argmax())]
    if change == "reload":
        _perturb(model, "lora", 2)
        decoder.reload_adapter("lora")
    elif change == "replace":
        lorakit.delete_adapter(model, "lora")
        _add(model, "lora", 2)
    else:
        layer = model.model.layers[0].mlp.down_proj
        base = layer.base_layer if hasattr(layer, "base_layer") else layer
        with torch.no_grad():
            base.weight = torch.nn.Parameter(base.weight * 0.5)
        decoder.refresh()
    answer.append(int(decoder.step([0], answer[-1:], [name])[0].argmax()))
    decoder.remember(0, prompt + answer, name)
    decoder.release([0])
    later = prompt + answer[:1] + [7, 8]
    got = decoder.prefill([0], [later], [name])
    expected = StaticDecoder(model, max_batch=1, max_len=MAX_LEN, prefix_cache=0).prefill([0], [later], [name])
    assert_close(got, expected)


def test_server_answers_equal_a_server_without_the_cache_across_salts_and_a_replaced_adapter(tmp_path):
    """Over real sockets: concurrent chats sharing one system prompt, on the base and two adapters, with and without
    cache_salt; then vLLM's /v1/unload_lora_adapter and /v1/load_lora_adapter replace the folder behind 'policy'
    under the same name while the other adapters' traffic runs. Greedy answers and their logprobs equal those of
    a server started with --prefix-cache-tokens 0, and the replaced adapter's answers are its new weights'."""
    import threading

    import httpx
    from transformers import AutoModelForCausalLM

    from test_serve_support import ServerProcess, make_adapter, tiny_hf_folder

    model_dir = tiny_hf_folder(tmp_path / "model", initializer_range=0.5, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    adapters = tmp_path / "adapters"
    make_adapter(model, adapters / "alpha", seed=1)
    make_adapter(model, adapters / "beta", seed=2, r=2, target_modules=["q_proj", "v_proj", "down_proj"])
    for version, seed in (("v1", 3), ("v2", 4)):
        make_adapter(model, tmp_path / "checkpoints" / version, seed=seed)
    servers, errors = {}, []

    def start(label, *flags):
        try:
            servers[label] = ServerProcess(model_dir, adapters, "--decoder", "static", "--max-context", "512",
                                           "--max-batch", "4", "--allow-any-lora-path", *flags,
                                           log=tmp_path / f"server_{label}.log")
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=start, args=("on",)),
               threading.Thread(target=start, args=("off", "--prefix-cache-tokens", "0"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    system = {"role": "system", "content": "You are a careful assistant for a small shop; answer in one line. " * 3}
    questions = ["What do you sell?", "When do you open?", "Where are you?"]

    def chat(client, model, question, salt, results, key):
        body = {"model": model, "messages": [system, {"role": "user", "content": question}], "max_tokens": 6,
                "temperature": 0, "logprobs": True}
        if salt is not None:
            body["cache_salt"] = salt
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text[:500]
        choice = reply.json()["choices"][0]
        results[key] = (choice["message"]["content"], [t["logprob"] for t in choice["logprobs"]["content"]])
        return reply.json()["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)

    def burst(client, models, results, tag, during=None):
        """Every (model, question, salt) at once (the server batches them); ``during`` runs beside them."""
        jobs = [threading.Thread(target=chat, args=(client, m, q, s, results, (tag, m, q, s)))
                for m in models for q in questions for s in (None, "tenant-1")]
        extra = threading.Thread(target=during) if during else None
        for job in jobs + ([extra] if extra else []):
            job.start()
        for job in jobs + ([extra] if extra else []):
            job.join()

    def load(client, path):
        reply = client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": str(path)})
        assert reply.status_code == 200, reply.text[:300]

    def swap(client):
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "policy"}).status_code == 200
        load(client, tmp_path / "checkpoints" / "v2")

    results = {"on": {}, "off": {}}
    try:
        assert not errors, errors
        for label, process in servers.items():
            with httpx.Client(base_url=process.url, timeout=180) as client:
                load(client, tmp_path / "checkpoints" / "v1")
                got = results[label]
                burst(client, ["base", "alpha", "policy"], got, "first")
                burst(client, ["alpha", "beta"], got, "swap", during=lambda: swap(client))
                # one at a time: the replaced adapter and a new salt find nothing cached, then their own blocks
                cached = [chat(client, model, questions[1], salt, got, ("probe", model, salt, turn))
                          for model, salt in (("policy", None), ("alpha", "tenant-9")) for turn in range(2)]
                if label == "on":
                    assert cached[0] == cached[2] == 0 and cached[1] >= 3 * PREFIX_BLOCK <= cached[3], cached
                burst(client, ["policy", "beta", "base"], got, "after")
                if label == "on":
                    hits = client.get("/health").json()["prefix_cache_hit_tokens"]
    finally:
        for process in servers.values():
            process.stop()
    on, off = results["on"], results["off"]
    assert on.keys() == off.keys() and len(on) == 3 * 3 * 2 + 2 * 3 * 2 + 3 * 3 * 2 + 4
    for key in on:
        assert on[key][0] == off[key][0], key
        assert_close(torch.tensor(on[key][1]), torch.tensor(off[key][1]), msg=str(key))
    assert hits >= 3 * PREFIX_BLOCK  # the shared system prompt was served from the pool
    # the adapter replaced under its name answers with its new weights (nothing of v1's K/V was reused)
    q = questions[0]
    assert on[("first", "policy", q, None)][1] != on[("after", "policy", q, None)][1]


def test_prefill_tokens_counts_only_the_blocks_a_small_pool_can_keep():
    """``prefill_tokens`` (the engine routes newcomers by it) counts a follower's shared blocks as copies, but the
    leader keeps only as many blocks as the pool holds: with a 2-block pool and 3 shared blocks, the prefill
    computes one block more than planned."""
    decoder = StaticDecoder(tiny_llama(max_position_embeddings=256), max_batch=2, max_len=MAX_LEN, prefix_cache=32)
    head = list(range(1, 3 * PREFIX_BLOCK + 2))
    prompts = [head + [5], head + [6, 7]]
    planned = decoder.prefill_tokens(prompts, [None, None], [None, None])
    decoder.prefill([0, 1], prompts, [None, None])
    assert planned == sum(len(p) for p in prompts) - sum(decoder.reused[:2])
