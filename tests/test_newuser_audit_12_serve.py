"""``lorakit serve`` audited as an unknown client would use it (audit 12), over real sockets: each test is a
regression test for a defect found by trying the case against a real server, and checks it still serves after.

First, peft adapters with ``trainable_token_indices`` (trained rows of the embedding and of the head tied to it):
the server loaded each as whole ``(vocab, dim)`` copies of both modules, counted only its file (a few KB) against
``--max-adapter-mb``, and the static decoder's refusal of such a row was a 500 naming the pool's internal name.
"""

from __future__ import annotations

import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import peft
import pytest
import torch

from conftest import TOLERANCE
from http_helpers import api_error
from test_serve_support import ServerProcess, make_adapter, never_ending, tiny_hf_folder, wait_idle

PROMPT = [5, 17, 42, 99, 17]  # token ids: the trained rows 17 and 42 are read by the prompt itself
TOKENS = {"tok": [17, 42, 200], "tok2": [5, 99, 300]}  # each adapter's trainable_token_indices
LONG = 1000  # tokens of a generation that runs for seconds


def _peft_tokens(model_dir: Path, folder: Path, indices: list[int], seed: int | None):
    """peft's LoRA on q_proj plus trained rows ``indices`` of the (tied) embedding, randomized (``seed`` None: as
    peft starts them, the base's rows and B = 0), saved to ``folder``."""
    from transformers import AutoModelForCausalLM

    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                 trainable_token_indices=indices)).eval()
    generator = torch.Generator().manual_seed(seed or 0)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if seed is not None and ("lora_B" in name or "trainable_tokens_delta" in name):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note on tied embeddings
        theirs.save_pretrained(folder)
    return theirs


@pytest.fixture(scope="module")
def tokens_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit12_tokens")
    model_dir = tiny_hf_folder(root / "model", initializer_range=0.5, tie_word_embeddings=True,
                               max_position_embeddings=LONG + 64)
    base = never_ending(model_dir)
    adapters = root / "adapters"
    references = {name: _peft_tokens(model_dir, adapters / name, indices, seed)
                  for seed, (name, indices) in enumerate(TOKENS.items())}
    make_adapter(base, adapters / "a0", seed=3)
    _peft_tokens(model_dir, adapters / "untrained", [17, 42], None)
    return {"root": root, "model": model_dir, "adapters": adapters, "peft": references,
            "vocab": base.config.vocab_size, "dim": base.config.hidden_size}


@pytest.fixture(scope="module")
def server(tokens_setup):
    process = ServerProcess(tokens_setup["model"], tokens_setup["adapters"], "--decoder", "transformers",
                            "--max-tokens", str(LONG), log=tokens_setup["root"] / "server.log")
    client = httpx.Client(base_url=process.url, timeout=60)
    try:
        yield {"url": process.url, "client": client, "process": process, **tokens_setup}
    finally:
        client.close()
        process.stop()


def _greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """peft's (or any model's) greedy tokens and their log-probabilities, no KV cache."""
    tokens, logprobs = [], []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(torch.tensor([prompt + tokens])).logits[0, -1].float()
            token = int(logits.argmax())
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
    return tokens, logprobs


def _ask(client, model: str, max_tokens: int = 6) -> dict:
    response = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                                    "temperature": 0, "logprobs": 1})
    assert response.status_code == 200, response.text[:500]
    return response.json()["choices"][0]


# -- trainable tokens ----------------------------------------------------------------------------------------------
def test_trainable_tokens_answer_as_peft_alone_and_mixed(server):
    """Each token adapter's greedy answer and log-probabilities equal peft's, served alone and with requests on
    the other token adapter, a LoRA adapter and the base decoding in the same batches."""
    from transformers import AutoTokenizer

    client = server["client"]
    for name, theirs in server["peft"].items():
        tokens, logprobs = _greedy(theirs, PROMPT, 6)
        choice = _ask(client, name)
        rtol, atol = TOLERANCE[torch.float32]
        torch.testing.assert_close(torch.tensor(choice["logprobs"]["token_logprobs"]), torch.tensor(logprobs),
                                   rtol=rtol, atol=atol)
        assert choice["text"] == AutoTokenizer.from_pretrained(server["model"]).decode(tokens)
    alone = {name: _ask(client, name)["text"] for name in ("tok", "tok2", "a0", "base")}
    assert len(set(alone.values())) == 4  # every adapter changes the answer
    jobs = ["tok", "tok2", "a0", "base"] * 4
    with ThreadPoolExecutor(len(jobs)) as pool:
        mixed = list(pool.map(lambda name: _ask(client, name)["text"], jobs))
    assert mixed == [alone[name] for name in jobs]


def test_trainable_tokens_hold_their_rows_not_copies(server):
    """/v1/adapters reports what each adapter holds in memory: its LoRA tensors and the trained rows, not a
    (vocab, dim) copy of the embedding and another of the tied head (two copies were held for a file of ~3 KB)."""
    client = server["client"]
    _ask(client, "tok")
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}
    one_copy = server["vocab"] * server["dim"] * 4
    lora = 2 * 2 * (4 * server["dim"]) * 4  # q_proj A (4, dim) and B (dim, 4) in 2 layers, float32
    rows = 2 * len(TOKENS["tok"]) * (server["dim"] * 4 + 8)  # the embedding's rows and the tied head's, with ids
    assert listed["tok"]["memory_bytes"] == lora + rows < one_copy / 10
    assert listed["tok"]["size_bytes"] > 0
    # saved before training (B = 0, its rows the base's): the base's answer, and no rows held (it kept both copies)
    assert _ask(client, "untrained")["text"] == _ask(client, "base")["text"]
    untrained = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}["untrained"]
    assert untrained["memory_bytes"] == lora


def test_static_decoder_refuses_token_adapters_in_one_line(tokens_setup):
    """The static decoder serves adapters on the attention and MLP projections only. A request on a trainable-tokens
    adapter was a 500 "generation failed: adapter 'lk0' also changes ..." (the pool's internal name); now a 400
    naming the adapter as the client did, before anything is generated, with its pin released; others still serve.
    echo's scoring alone (max_tokens 0: lm-eval's loglikelihood) runs transformers' forward, so it stays served.
    A second token adapter (or the first loaded again) was decoded with the base's embedding and head: silently
    wrong answers, the decoder having listed such adapters only when the first one's wrappers were added."""
    process = ServerProcess(tokens_setup["model"], tokens_setup["adapters"], "--decoder", "static", "--max-context",
                            "48", "--max-tokens", "16", log=tokens_setup["root"] / "static.log")
    try:
        with httpx.Client(base_url=process.url, timeout=60) as client:
            assert client.get("/health").json()["decoder"] == "static"
            for path, body in (("/v1/completions", {"prompt": PROMPT}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                               ("/v1/responses", {"input": "hi"})):
                field = "max_output_tokens" if path == "/v1/responses" else "max_tokens"
                error = api_error(client.post(path, json={"model": "tok", field: 16, **body}), 400)
                assert error["code"] == "adapter_unsupported" and error["param"] == "model", (path, error)
                assert "adapter 'tok' also changes lm_head" in error["message"], error
                assert "--decoder transformers" in error["message"] and "lk" not in error["message"]
            assert [a["in_use"] for a in client.get("/v1/adapters").json()["data"]] == [0]
            # another token adapter, and the same one loaded again, join the embedding's and head's wrappers that
            # the first made: the decoder's list of such adapters, read when wrappers are added, missed them and
            # decoded their rows with the base's embedding and head (wrong answers, no error)
            assert client.post("/v1/adapters/unload", json={"name": "tok"}).status_code == 200
            for name in ("tok2", "tok"):
                error = api_error(client.post("/v1/completions", json={"model": name, "prompt": PROMPT,
                                                                       "max_tokens": 4}), 400)
                assert error["code"] == "adapter_unsupported" and f"adapter {name!r} also changes" in error["message"]
            # echo's scoring alone runs transformers' forward, which serves the rows: peft's prompt logprobs
            response = client.post("/v1/completions", json={"model": "tok", "prompt": PROMPT, "max_tokens": 0,
                                                            "echo": True, "logprobs": 0})
            assert response.status_code == 200, response.text[:300]
            with torch.no_grad():
                logits = tokens_setup["peft"]["tok"](torch.tensor([PROMPT])).logits[0, :-1].float()
            expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(PROMPT[1:]).unsqueeze(1))[:, 0]
            scored = response.json()["choices"][0]["logprobs"]["token_logprobs"]
            assert scored[0] is None
            torch.testing.assert_close(torch.tensor(scored[1:]), expected, rtol=TOLERANCE[torch.float32][0],
                                       atol=TOLERANCE[torch.float32][1])
            # the decoder still serves the other adapters, as transformers computes them
            import lorakit
            from transformers import AutoModelForCausalLM

            reference = AutoModelForCausalLM.from_pretrained(tokens_setup["model"]).eval()
            lorakit.load_adapter(reference, tokens_setup["adapters"] / "a0")
            _, logprobs = _greedy(reference, PROMPT, 4)
            torch.testing.assert_close(torch.tensor(_ask(client, "a0", 4)["logprobs"]["token_logprobs"]),
                                       torch.tensor(logprobs), rtol=TOLERANCE[torch.float32][0],
                                       atol=TOLERANCE[torch.float32][1])
    finally:
        process.stop()


def test_scaled_embedding_rows_equal_peft_in_the_pool(tmp_path):
    """Gemma 3 scales its embedding in forward: the kept rows are scaled as peft scales them (logits equal peft's,
    alone and in a batch beside the base), and the tied head's rows are kept, not copied."""
    import threading

    from lorakit.generation import _routing
    from lorakit.serve.copies import RowOverride
    from lorakit.serve.pool import AdapterPool
    from test_newuser_audit_11_interop import IDS, build, peft_folder

    theirs = peft_folder(tmp_path / "tok", kind="gemma3", target_modules=["q_proj"], trainable_token_indices=[1, 5, 9])
    model = build("gemma3")
    pool = AdapterPool(model, tmp_path, threading.RLock())
    internal = pool.acquire("tok")
    assert isinstance(model.model.embed_tokens.copies[internal], RowOverride)
    assert isinstance(model.lm_head.copies[internal], RowOverride)
    with torch.no_grad():
        want = theirs(IDS).logits
        with theirs.disable_adapter():
            base = theirs(IDS).logits
        with _routing(model, [internal]):
            alone = model(IDS).logits
        with _routing(model, [None, internal]):
            mixed = model(torch.cat([IDS, IDS])).logits
    for got, expected in ((alone, want), (mixed[1:], want), (mixed[:1], base)):
        torch.testing.assert_close(got, expected, rtol=TOLERANCE[torch.float32][0], atol=TOLERANCE[torch.float32][1])


def test_memory_held_counts_against_the_limit(tmp_path, monkeypatch):
    """A bfloat16 file loads as float32 LoRA tensors: twice its size in memory. --max-adapter-mb is checked against
    what the adapter holds once loaded too (was: the file alone); the refusal says so, leaves nothing loaded, and is
    remembered like the other refusals (asking again loads nothing)."""
    import threading

    from safetensors.torch import load_file, save_file

    import lorakit
    from lorakit.serve.pool import AdapterPool, AdapterRejected
    from test_newuser_audit_11_interop import build, peft_folder

    peft_folder(tmp_path / "half", target_modules=["q_proj", "v_proj"])
    weights = tmp_path / "half" / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights)
    size = weights.stat().st_size
    model = build()
    loads = []
    monkeypatch.setattr(lorakit.io, "load_adapter", lambda *a, _load=lorakit.io.load_adapter, **k: loads.append(1)
                        or _load(*a, **k))
    pool = AdapterPool(model, tmp_path, threading.RLock(), max_bytes=size + 64)
    for _ in range(2):
        with pytest.raises(AdapterRejected, match=r"^adapter 'half' refused: it holds [\d,]+ bytes in memory once "
                                                  r"loaded .* over the limit of [\d,]+ \(--max-adapter-mb\)"):
            pool.acquire("half")
        assert pool.loaded() == [] and lorakit.adapter_names(model) == []
    assert len(loads) == 1
    roomy = AdapterPool(model, tmp_path, threading.RLock(), max_bytes=4 * size)
    roomy.acquire("half")
    assert roomy.loaded()[0]["memory_bytes"] > size


def test_reload_and_unload_of_a_busy_adapter_say_which(server):
    """POST /v1/adapters/load of an adapter serving a request is a 409 that said "unload it when they finish" (the
    client asked to reload it); unload's 409 says unload. Both leave it serving; once the request ends both work."""
    client = server["client"]
    with httpx.Client(base_url=server["url"], timeout=60) as own, own.stream(
            "POST", "/v1/completions", json={"model": "a0", "prompt": PROMPT, "max_tokens": LONG, "temperature": 0,
                                                   "stream": True}) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the stream, and the server cancels the request
        next(lines)  # generating
        for action in ("load", "unload"):
            error = api_error(client.post(f"/v1/adapters/{action}", json={"name": "a0"}), 409)
            assert error["message"] == f"adapter 'a0' is serving 1 request(s); {'re' if action == 'load' else 'un'}" \
                                       "load it when they finish" and error["code"] == "adapter_busy"
    assert wait_idle(client, 5.0)
    assert client.post("/v1/adapters/load", json={"name": "a0"}).json()["in_use"] == 0
    assert client.post("/v1/adapters/unload", json={"name": "a0"}).status_code == 200


def test_static_refusal_is_asked_once_per_loaded_adapter():
    """The engine asks the decoder whether it can run an adapter under the model lock, which the engine's loop takes
    for every step; each request waited for it. An adapter's answer never changes under its (per-load) name, so
    later requests get it at once, even while the lock is held."""
    import threading

    import lorakit
    from conftest import tiny_llama
    from lorakit.decoding import StaticDecoder
    from lorakit.serve.engine import Engine

    model = tiny_llama(seed=6)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]), adapter="x")
    lock = threading.RLock()
    engine = Engine(model, lock, max_batch=2, decoder=StaticDecoder(model, max_batch=2, max_len=8))
    try:
        assert "embed_tokens" in engine.unservable("x") and engine.unservable(None) is None
        held, release = threading.Event(), threading.Event()

        def hold():
            with lock:
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(5)
        answer = []
        asker = threading.Thread(target=lambda: answer.append(engine.unservable("x")))
        asker.start()
        asker.join(2)
        answered = list(answer)  # before the lock is given back
        release.set()
        holder.join()
        asker.join()
        assert answered and "embed_tokens" in answered[0]
    finally:
        engine.close()


# -- browsers ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body", [
    ("/v1/adapters/unload", {"name": "a0"}),
    ("/v1/adapters/load", {"name": "tok"}),
    ("/v1/completions", {"model": "a0", "prompt": "hi", "max_tokens": 4}),
])
def test_web_pages_cannot_drive_a_server_without_cors(server, path, body):
    """Any web page the operator opens could POST to a keyless server on localhost: a text/plain body is a CORS
    "simple request", sent without a preflight, and the server (which reads JSON whatever the Content-Type) ran it
    (unloaded adapters, generated); the browser only hides the answer. A request from an origin not given with
    --cors-origin is now refused before it runs; clients that are no browser send no Origin and are unchanged."""
    client = server["client"]
    client.post("/v1/adapters/load", json={"name": "a0"})
    before = client.get("/v1/adapters").json()["data"]
    steps = client.get("/health").json()["steps"]
    response = client.post(path, content=json.dumps(body), headers={"Origin": "http://evil.example",
                                                                    "Content-Type": "text/plain"})
    error = api_error(response, 403)
    assert error["code"] == "cors_refused" and "--cors-origin http://evil.example" in error["message"]
    assert client.get("/v1/adapters").json()["data"] == before and client.get("/health").json()["steps"] == steps
    assert client.get("/v1/models", headers={"Origin": "http://evil.example"}).status_code == 200  # reads nothing
    assert client.post(path, json=body).status_code == 200


def test_a_folder_named_as_the_base_is_reported_at_start(tokens_setup, tmp_path, capsys):
    """"model": NAME means the base model (--name), so an adapter folder of that name could never be asked for:
    /v1/models left it out and the server said nothing (and --preload loaded it, for nothing)."""
    import argparse
    import shutil

    from lorakit.serve.cli import add_arguments, build_state

    adapters = tmp_path / "adapters"
    shutil.copytree(tokens_setup["adapters"] / "a0", adapters / "base")
    shutil.copytree(tokens_setup["adapters"] / "a0", adapters / "other")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(tokens_setup["model"]), "--adapters", str(adapters), "--name", "base",
                              "--decoder", "transformers", "--preload"])
    state = build_state(args)
    try:
        out = capsys.readouterr().out
        assert f"folder 'base' in {adapters} is not served: 'base' names the base model (--name); rename the " \
               "folder, or give the base another --name" in out
        assert [a["name"] for a in state.pool.loaded()] == ["other"]
    finally:
        state.engine.close()


# -- structured outputs --------------------------------------------------------------------------------------------
def test_many_choices_sharing_a_prefix(server):
    """guided_choice takes up to 4096 strings; with more than 2000 sharing a prefix ("option 0001", ...) llguidance's
    parser gave up once the answer had written the prefix ("Current row has 2501 items; max is 2000"), and the
    request was a 500 "generation failed". The choices are now one lexer token, which has no such limit."""
    choices = [f"option {i:04d}" for i in range(2500)]
    for model in ("a0", "tok"):
        response = server["client"].post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "pick"}], "max_tokens": 16, "temperature": 0,
            "guided_choice": choices})
        assert response.status_code == 200, response.text[:300]
        assert response.json()["choices"][0]["message"]["content"] in choices


def test_a_grammar_the_parser_gives_up_on_is_the_clients_400(server):
    """A Lark grammar whose parse needs more than llguidance's 2000 items in a row fails only once the answer gets
    there: the request was a 500 ("generation failed", type server_error) for what is the grammar's limit. Now a 400
    that says the answer could not follow the format, and why."""
    grammar = "start: " + " | ".join(f'"option {i:04d}"' for i in range(2500))
    response = server["client"].post("/v1/chat/completions", json={
        "model": "a0", "messages": [{"role": "user", "content": "pick"}], "max_tokens": 16, "temperature": 0,
        "guided_grammar": grammar})
    error = api_error(response, 400)
    assert error["code"] == "invalid_response_format" and error["type"] == "invalid_request_error"
    assert error["message"].startswith("the answer could not follow the format: ") and "max is 2000" in error["message"]
    assert "<state>" not in error["message"]  # llguidance's parser dump stays out
    with server["client"].stream("POST", "/v1/chat/completions", json={
            "model": "a0", "messages": [{"role": "user", "content": "pick"}], "max_tokens": 16, "temperature": 0,
            "guided_grammar": grammar, "stream": True}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "invalid_response_format"
    assert events[-1]["error"]["message"] == error["message"]
    assert _ask(server["client"], "a0")["text"]  # still serving


def test_the_base_is_not_an_adapter_to_load_and_head_answers(server):
    """POST /v1/adapters/load or unload with the base's name said "no adapter named 'base'" (404) or "not loaded";
    now one line that it is the base. HEAD of the GET routes was a 405 (HTTP checkers send it); now their headers."""
    for action in ("load", "unload"):
        error = api_error(server["client"].post(f"/v1/adapters/{action}", json={"name": "base"}), 400)
        assert error["message"] == f"'base' is the base model, always in memory; {action} takes the name of an " \
                                   "adapter (GET /v1/models lists them)" and error["param"] == "name"
    for path in ("/v1/models", "/v1/models/a0", "/v1/models/base", "/v1/adapters", "/health"):
        response = server["client"].head(path)
        assert response.status_code == 200 and response.content == b"", path
        assert response.headers["content-type"] == "application/json"
    assert server["client"].head("/v1/models/nope").status_code == 404
