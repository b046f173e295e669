"""``lorakit serve`` renders an adapter's chats with the tokenizer saved in its folder (transformers' Trainer and trl
save one beside the adapter, with the chat template it was trained on), over a real socket. Before, every request
was rendered with the base's template: an adapter trained on another format got prompts it never saw, stopped on
the base's end-of-turn tokens, and its tool calls and reasoning were read in the base's formats (or refused).

The server's model is a lookup table (attention and MLP outputs zero: each position sees only its own token), so
the answer to a prompt is fixed by the prompt's last token: each template's generation prompt ends with a token of
its own, chained to an answer of its own. So the answer says which template rendered the prompt, and
``usage.prompt_tokens`` is checked against the template's own rendering too.

- base: template X (``### user: ...`` then ``### Response:``), no tools, no reasoning; answers "Base says hi.".
- adapters/plain: no tokenizer: the base's template.
- adapters/chatml: template Y, ending turns with ``<|turn_end|>``, a token its tokenizer adds in a spare row of the
  base's embedding (no new row): answers "Hello" then ``<|turn_end|>`` (then "Leaked", where that is no stop).
- adapters/tools: Qwen2.5's template (hermes tool calls), which writes the tools the base's cannot.
- adapters/thinker: a template that opens ``<think>`` in the generation prompt: its answer's reasoning is split.
- refused ones: another vocabulary, a resized one, a broken tokenizer.json, a symbolic link.
"""

from __future__ import annotations

import json
import os
import threading

import httpx
import pytest
import torch

from conftest import tiny_llama
from test_serve_support import ServerProcess, make_adapter, make_tokenizer
from test_train_tool_calls import QWEN25, TOOLS

X = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
     "{% if add_generation_prompt %}### Response:{% endif %}")
Y = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|turn_end|>\n"
     "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|turn_end|>\n{% endif %}{% endfor %}"
     "{% if add_generation_prompt %}<|assistant|>{% endif %}")
THINK = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n<think>{% endif %}")
CALL_JSON = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
WORDS = ["### Response:", "<|assistant|>", "Base says hi.", "Hello", "Leaked", "Let me check.", "<tool_call>",
         f"\n{CALL_JSON}\n", "</tool_call>", "<think>", "</think>", "Let me think.", "Answer."]
SPARE_ROWS = 4
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]


def _prompt(tokenizer, **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False,
                                              **kwargs))


def _with_template(model_dir, template: str, added: tuple[str, ...] = ()):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(list(added))
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    base_tok = make_tokenizer()
    base_tok.add_tokens(WORDS)
    base_tok.chat_template = X
    model = tiny_llama(vocab_size=len(base_tok) + SPARE_ROWS, max_position_embeddings=1024,
                       eos_token_id=base_tok.eos_token_id, pad_token_id=base_tok.pad_token_id)
    base_tok.save_pretrained(root / "model")
    chatml = _with_template(root / "model", Y, ("<|turn_end|>",))
    tools = _with_template(root / "model", QWEN25)
    thinker = _with_template(root / "model", THINK)
    turn_end = chatml.convert_tokens_to_ids("<|turn_end|>")
    assert len(base_tok) <= turn_end < len(base_tok) + SPARE_ROWS  # a spare row of the base's: no new row
    ids = chatml.convert_tokens_to_ids
    chains = [[_prompt(base_tok)[-1], ids("Base says hi."), base_tok.eos_token_id],
              [_prompt(chatml)[-1], ids("Hello"), turn_end, ids("Leaked"), base_tok.eos_token_id],
              [_prompt(tools, tools=TOOLS)[-1], *ids(["Let me check.", "<tool_call>", f"\n{CALL_JSON}\n",
                                                      "</tool_call>"]), base_tok.eos_token_id],
              [_prompt(thinker)[-1], *ids(["Let me think.", "</think>", "Answer."]), base_tok.eos_token_id]]
    starts = [chain[0] for chain in chains]
    assert len(set(starts)) == len(starts)  # each template's generation prompt ends with a token of its own
    with torch.no_grad():
        for layer in model.model.layers:  # each position sees its own token only: a table of next tokens
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.normal_(0, 0.02)
        k = 0
        for chain in chains:
            for token, following in zip(chain, chain[1:]):
                model.model.embed_tokens.weight[token] = torch.nn.functional.one_hot(torch.tensor(k), 32).float()
                model.lm_head.weight[following] += 10 * torch.nn.functional.one_hot(torch.tensor(k), 32).float()
                k += 1
    model.save_pretrained(root / "model")
    adapters = root / "adapters"
    folders = {}
    for seed, name in enumerate(("plain", "chatml", "tools", "thinker", "swap", "same", "foreign", "resized",
                                 "broken", "linked")):
        # q_proj only: the attention output is zeroed, so the adapter leaves the table as it is
        folders[name] = make_adapter(model, adapters / name, seed=seed, target_modules=["q_proj"])
    chatml.save_pretrained(folders["chatml"])
    chatml.save_pretrained(folders["swap"])
    tools.save_pretrained(folders["tools"])
    thinker.save_pretrained(folders["thinker"])
    _with_template(root / "model", X).save_pretrained(folders["same"])  # the base's, saved again as a Trainer does
    make_tokenizer(vocab_size=300).save_pretrained(folders["foreign"])  # another BPE: other ids for the same tokens
    _with_template(root / "model", X, tuple(f"<new_{i}>" for i in range(2 * SPARE_ROWS))).save_pretrained(
        folders["resized"])
    base_tok.save_pretrained(folders["broken"])
    (folders["broken"] / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut short
    (folders["linked"] / "tokenizer.json").symlink_to(root / "model" / "tokenizer.json")
    process = ServerProcess(root / "model", adapters, "--max-tokens", "16", log=root / "server.log")
    client = httpx.Client(base_url=process.url, timeout=60)
    try:
        yield {"client": client, "process": process, "base": base_tok, "chatml": chatml,
               "tools": tools, "thinker": thinker, "turn_end": turn_end, "folders": folders}
    finally:
        client.close()
        process.stop()


def _chat(server, model: str, **extra) -> dict:
    response = server["client"].post("/v1/chat/completions", json={"model": model, "messages": QUESTION,
                                                                   "max_tokens": 8, "temperature": 0, **extra})
    assert response.status_code == 200, response.text[:500]
    return response.json()


def test_each_model_renders_chats_with_its_own_template(server):
    """The base and an adapter without a tokenizer: template X. The chatml adapter: its folder's template Y (the
    prompt's tokens are Y's, the answer Y's prompt's), on chat completions and the Responses API, with logprobs
    decoded by its tokenizer. Before: X for all three, so the chatml adapter answered "Base says hi."."""
    base_prompt = _prompt(server["base"])
    for model, tokenizer, answer, end in (("base", server["base"], "Base says hi.", "<|im_end|>"),
                                          ("plain", server["base"], "Base says hi.", "<|im_end|>"),
                                          ("chatml", server["chatml"], "Hello", "<|turn_end|>")):
        reply = _chat(server, model, logprobs=True)
        expected = _prompt(tokenizer)
        assert reply["usage"]["prompt_tokens"] == len(expected), model
        choice = reply["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == (answer, "stop"), model
        # the end of turn closes the logprobs, written by the tokenizer that has it
        assert [t["token"] for t in choice["logprobs"]["content"]] == [answer, end], model
    assert len(_prompt(server["chatml"])) != len(base_prompt)  # the count alone tells the templates apart
    response = server["client"].post("/v1/responses", json={"model": "chatml", "input": QUESTION, "temperature": 0,
                                                            "max_output_tokens": 16})
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert body["output"][-1]["content"][0]["text"] == "Hello" and body["status"] == "completed"
    assert body["usage"]["input_tokens"] == len(_prompt(server["chatml"]))
    listed = {m["id"]: m.get("tokenizer") for m in server["client"].get("/v1/models").json()["data"]}
    assert listed["chatml"] == listed["tools"] == "adapter" and listed["plain"] == "base"
    assert server["client"].get("/v1/models/chatml").json()["tokenizer"] == "adapter"
    loaded = {a["name"]: a["tokenizer"] for a in server["client"].get("/v1/adapters").json()["data"]}
    assert loaded["chatml"] == "adapter" and loaded["plain"] == "base"


def test_templates_in_one_mixed_batch(server):
    """Requests of the base, the chatml and the thinker adapters at once, batched together by the engine: each is
    rendered, stopped and decoded by its own model's text side."""
    from concurrent.futures import ThreadPoolExecutor

    expected = {"base": (None, "Base says hi."), "chatml": (None, "Hello"), "thinker": ("Let me think.", "Answer.")}
    models = [*expected] * 4
    with ThreadPoolExecutor(len(models)) as pool:
        replies = list(pool.map(lambda model: _chat(server, model)["choices"][0]["message"], models))
    assert [(r.get("reasoning_content"), r["content"]) for r in replies] == [expected[m] for m in models]


def test_the_adapter_template_end_of_turn_stops_its_answers(server):
    """``<|turn_end|>`` ends a turn in the chatml adapter's template (a token only its tokenizer has, in a spare
    row): its rows stop there, text prompts included; the base's rows do not. Before: the base's stop tokens for
    every request, so the adapter's answer ran on into "Leaked" (and decoded ``<|turn_end|>`` with a tokenizer
    that does not have it)."""
    start = _prompt(server["chatml"])[-1]
    for stream in (False, True):
        response = server["client"].post("/v1/completions", json={"model": "chatml", "prompt": [start],
                                                                   "max_tokens": 8, "temperature": 0,
                                                                   "stream": stream})
        assert response.status_code == 200, response.text[:500]
        if stream:
            chunks = [json.loads(b[6:]) for b in response.text.split("\n\n") if b.startswith("data: {")]
            text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
        else:
            text, finish = response.json()["choices"][0]["text"], response.json()["choices"][0]["finish_reason"]
        assert (text, finish) == ("Hello", "stop"), stream
    response = server["client"].post("/v1/completions", json={"model": "base", "prompt": [start], "max_tokens": 8,
                                                              "temperature": 0})
    assert response.json()["choices"][0]["text"].startswith("HelloLeaked")  # no stop of the base's
    # the adapter's tokenizer knows the token: as a text prompt it is one token (the base's spells it in pieces)
    response = server["client"].post("/v1/completions", json={"model": "chatml", "prompt": "<|turn_end|>",
                                                              "max_tokens": 1, "temperature": 0, "echo": True,
                                                              "logprobs": 0})
    assert response.status_code == 200, response.text[:500]
    assert response.json()["choices"][0]["logprobs"]["tokens"][:1] == ["<|turn_end|>"]
    assert response.json()["usage"]["prompt_tokens"] == 1


def _stream(server, model: str, **body) -> list[dict]:
    with server["client"].stream("POST", "/v1/chat/completions", json={
            "model": model, "messages": QUESTION, "max_tokens": 16, "temperature": 0, "stream": True,
            **body}) as response:
        assert response.status_code == 200, response.read()
        raw = response.read().decode()
    blocks = raw.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""], raw[-200:]
    return [json.loads(block[6:]) for block in blocks[:-2]]


def test_a_stream_with_tool_calls_under_the_adapter_template(server):
    """The tools adapter's folder holds Qwen2.5's template: the tools are rendered into its prompt, and its
    streamed answer is read in the hermes format, the call streamed as OpenAI tool_calls deltas. The base's
    template writes no tools: a 400 for the base as before. Before: the 400 for the adapter too."""
    chunks = _stream(server, "tools", tools=TOOLS)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for part in chunk["choices"][0]["delta"].get("tool_calls") or ():
            if "id" in part:
                calls[part["index"]] = {"name": part["function"]["name"], "arguments": part["function"]["arguments"]}
            else:
                calls[part["index"]]["arguments"] += part["function"]["arguments"]
    assert content == "Let me check."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Paris"})]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    whole = _chat(server, "tools", tools=TOOLS, max_tokens=16)
    assert whole["usage"]["prompt_tokens"] == len(_prompt(server["tools"], tools=TOOLS))
    assert whole["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    refused = server["client"].post("/v1/chat/completions", json={"model": "base", "messages": QUESTION,
                                                                  "tools": TOOLS, "max_tokens": 8})
    assert refused.status_code == 400 and "tools are not supported" in refused.json()["error"]["message"]


def test_reasoning_follows_the_adapter_template(server):
    """The thinker adapter's template opens ``<think>`` in the generation prompt: with --reasoning-parser auto its
    answer's block is the reasoning (the base's template has none, so the server started with the parser off).
    Before: no split, the block left in the content."""
    message = _chat(server, "thinker")["choices"][0]["message"]
    assert (message.get("reasoning_content"), message["content"]) == ("Let me think.", "Answer.")
    chunks = _stream(server, "thinker")
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks if c["choices"])
    assert reasoning == "Let me think."


def test_a_reload_reads_the_adapter_template_again(server):
    """The text side is the adapter's, read with it: a reload (POST /v1/adapters/load) after the template changed
    on disk renders with the new one. Before: never the folder's template at all."""
    assert _chat(server, "swap")["choices"][0]["message"]["content"] == "Hello"
    (server["folders"]["swap"] / "chat_template.jinja").write_text(X)
    assert _chat(server, "swap")["choices"][0]["message"]["content"] == "Hello"  # the loaded version serves on
    response = server["client"].post("/v1/adapters/load", json={"name": "swap"})
    assert response.status_code == 200 and response.json()["tokenizer"] == "adapter", response.text
    assert _chat(server, "swap")["choices"][0]["message"]["content"] == "Base says hi."


@pytest.mark.parametrize("name, said", [
    ("foreign", r"refused: its tokenizer gives \d+ of the base's \d+ tokens other ids \(.* is id \d+ in the base, "
                r".*\): its prompts would mean other tokens to this model; serve it with the base it was trained "
                r"on, or delete the tokenizer files"),
    ("resized", r"refused: its tokenizer has \d+ tokens \('<new_\d>' is id \d+\), more than this base's \d+ "
                r"embedding rows: it was trained on a vocabulary resized"),
    ("broken", r"refused: .*tokenizer\.json: not valid JSON"),
    ("linked", r"refused: linked/tokenizer\.json is a symbolic link, refused here")])
def test_tokenizers_that_would_change_ids_are_refused_in_one_line(server, name, said):
    """An adapter whose tokenizer gives the base's tokens other ids (another vocabulary), names tokens past the
    base's rows (a resized vocabulary), cannot be read, or is a link: refused at load in one line saying what
    differs and what to do; the server serves on. Before: served with the base's tokenizer."""
    import re

    response = server["client"].post("/v1/chat/completions", json={"model": name, "messages": QUESTION,
                                                                   "max_tokens": 4})
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "adapter_rejected" and "\n" not in error["message"], error
    assert re.search(said, error["message"]), error["message"]
    assert error["message"].startswith(f"adapter {name!r} refused: ")
    assert str(server["folders"][name].parent) not in error["message"]  # no server paths to clients
    assert _chat(server, "base")["choices"][0]["message"]["content"] == "Base says hi."
    assert "Traceback" not in server["process"].output()


# -- in process: the pool keeps the text side with the adapter, and reads the folder warily --------------------------
@pytest.fixture(scope="module")
def pool(server):
    from transformers import AutoModelForCausalLM

    from lorakit.models.loading import load_tokenizer
    from lorakit.serve.model_text import ModelText
    from lorakit.serve.pool import AdapterPool

    folders = server["folders"]
    model_dir = folders["plain"].parent.parent / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    pool = AdapterPool(model, folders["plain"].parent, threading.RLock(), max_loaded=1)
    pool.base_text = ModelText.build(load_tokenizer(model_dir), model)  # as lorakit serve loads it
    return pool


def test_evicting_an_adapter_drops_its_text_side(pool, server):
    pool.acquire("chatml")
    text = pool.text_of("chatml")
    assert text.tokenizer.chat_template == Y and text.adapter == "chatml"
    assert server["turn_end"] in text.stop_token_ids and server["turn_end"] not in pool.base_text.stop_token_ids
    pool.release("chatml")
    pool.acquire("plain")  # --max-loaded 1: chatml is evicted, and its tokenizer with it
    assert pool.text_of("chatml") is None and pool.text_of("plain") is None
    pool.release("plain")


def test_the_base_tokenizer_saved_unchanged_serves_as_the_base_text_side(pool):
    """The Trainer saves the tokenizer beside every adapter, mostly the base's unchanged: such an adapter shares the
    base's text side (one tokenizer in memory, one llguidance view) instead of a copy of its own."""
    pool.acquire("same")
    assert pool.text_of("same") is pool.base_text
    assert [a["tokenizer"] for a in pool.loaded()] == ["adapter"]
    pool.release("same")


def test_tokenizer_files_are_read_warily(pool, server, tmp_path, monkeypatch):
    """A FIFO where tokenizer_config.json goes is refused without blocking, an oversized file before it is read,
    and transformers never reads the adapter folder itself (only a private copy of the known files)."""
    import shutil

    import lorakit.serve.adapter_tokenizer as adapter_tokenizer
    from lorakit.serve.pool import AdapterRejected

    root = pool.root
    fifo = root / "fifo"
    shutil.copytree(server["folders"]["chatml"], fifo)
    os.remove(fifo / "tokenizer_config.json")
    os.mkfifo(fifo / "tokenizer_config.json")
    with pytest.raises(AdapterRejected,
                       match=r"^adapter 'fifo' refused: fifo/tokenizer_config.json is not a regular file$"):
        pool.acquire("fifo", timeout=5)
    big = root / "big"
    shutil.copytree(server["folders"]["chatml"], big)
    monkeypatch.setattr(adapter_tokenizer, "MAX_FILE_BYTES", 1000)
    with pytest.raises(AdapterRejected, match=r"refused: tokenizer.json is [\d,]+ bytes, over the limit of 1,000"):
        pool.acquire("big", timeout=5)
    monkeypatch.undo()
    (big / "evil.py").write_text("raise SystemExit('ran the folder code')")
    config = json.loads((big / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (big / "tokenizer_config.json").write_text(json.dumps(config))
    pool.acquire("big", timeout=5)  # the private copy holds no evil.py, and no remote code runs: the fast one loads
    assert pool.text_of("big").tokenizer.chat_template == Y
    pool.release("big")


def test_structured_outputs_let_go_of_adapter_tokenizers(server):
    """llguidance's view of each tokenizer a format was compiled for was kept for good (~1 s to build, the size of
    the vocabulary): with adapters' own tokenizers, every reload of one left another behind. Now the last
    ``TOKENIZER_CACHE`` are kept, and a grammar is never reused for another view that took a freed one's id."""
    from lorakit.serve import structured

    model_dir = server["folders"]["plain"].parent.parent / "model"
    tokenizers = [_with_template(model_dir, Y) for _ in range(structured.TOKENIZER_CACHE + 3)]
    rows = len(server["base"]) + SPARE_ROWS
    for tokenizer in tokenizers:
        grammar = structured.compile_format(tokenizer, rows, (tokenizer.eos_token_id,), {"type": "object"})
        assert grammar.vocab >= len(tokenizer)
    held = [entry[0] for entry in structured._TOKENIZERS.values()]
    assert len(held) <= structured.TOKENIZER_CACHE and not any(t is tokenizers[0] for t in held)
