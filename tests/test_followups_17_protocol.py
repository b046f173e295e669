"""Two request fields real clients send, honoured by ``lorakit serve`` (session 17), over real sockets.

Before, each was a 400 that refused it by name:

- OpenAI's ``tool_choice`` ``{"type": "allowed_tools", ...}`` (chat completions' nested form and the Responses
  API's flat one): the answer may call only the listed tools, while every tool stays in the prompt (the same
  prompt tokens, so a provider's prompt cache holds). ``"required"`` forces a call of one of them (the prompt ends
  with the call's start, as for tool_choice "required"), ``"auto"`` leaves text or a call; a call's name is
  restricted to the allowed ones as the model writes it (``tool_names.NameGate``), where the model would have
  called another tool.
- vLLM's ``thinking_token_budget``: once the reasoning block holds that many tokens, its closing marker is forced
  and the model goes on to the answer (non-streamed, streamed, on /v1/responses and /v1/completions, and with
  several budgets in one batch, each row its own); -1 is unlimited, as in vLLM.

The server's model is a tiny Llama whose answer is a table of next tokens (``tests/test_serve_tools``' scripted
model): with the Qwen3 template (tools and ``<think>``) it thinks three steps, says "Let me check." and calls
``get_weather``; after ``{"name": "`` its next choices are ``get_time`` then ``get_location``, so a restriction of
the name shows in which tool it calls.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import torch

from conftest import tiny_llama
from test_serve_support import ServerProcess
from test_serve_tools import QUESTION
from test_train_tool_calls import FAMILIES, build_tokenizer, family

from lorakit.serve.reasoning import THINK, AnswerStart, ThinkBudget, content_start
from lorakit.serve.tool_names import NAME_ENDS, NameGate, TokenTexts

STEPS = ["Step one.", " Step two.", " Step three."]
WORDS = ["<think>", *STEPS, "</think>", "\n\n", "Let me check.", "<tool_call>", '\n{"name": "', "get_weather",
         '", "arguments": ', '{"city": "Paris"}', "}\n", "</tool_call>", "<|im_end|>"]
RUNNERS_UP = {"get_time": 6.0, "get_location": 4.0}  # after '\n{"name": "' (get_weather: 10)
TOOLS = [{"type": "function", "function": {"name": name, "description": f"the {name[4:]} of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    for name in ("get_weather", "get_time", "get_location")]
RESPONSES_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]
CALL = {"city": "Paris"}


def allowed(mode: str, *names: str) -> dict:
    """Chat completions' allowed_tools tool_choice."""
    return {"type": "allowed_tools", "allowed_tools": {
        "mode": mode, "tools": [{"type": "function", "function": {"name": name}} for name in names]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("protocol17")
    family("qwen3").save_pretrained(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    tokenizer.add_tokens([w for w in [*WORDS, *RUNNERS_UP] if w not in tokenizer.get_vocab()])
    prompt = tokenizer.apply_chat_template(QUESTION, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    chain = [prompt[-1], *tokenizer.convert_tokens_to_ids(WORDS)]
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    hot = lambda k: torch.nn.functional.one_hot(torch.tensor(k), 32).float()  # noqa: E731
    with torch.no_grad():
        for layer in model.model.layers:  # each position sees its own token only: a table of next tokens
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.normal_(0, 0.02)
        for k, (token, following) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[token] = hot(k)
            model.lm_head.weight[following] = 10 * hot(k)
        head, name = chain.index(tokenizer.convert_tokens_to_ids('\n{"name": "')), WORDS.index("get_weather") + 1
        for word, logit in RUNNERS_UP.items():  # the other names: next choices there, continued as get_weather is
            token = tokenizer.convert_tokens_to_ids(word)
            model.lm_head.weight[token] = logit * hot(head)
            model.model.embed_tokens.weight[token] = hot(name)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "adapters").mkdir()
    # its words are tokens added to the tokenizer, which llguidance reads as markers, never as text: forced calls
    # unconstrained (--tool-call-grammar off, as without llguidance), so the scripted words go through
    proc = ServerProcess(root / "model", root / "adapters", "--max-tokens", "32", "--tool-call-grammar", "off",
                         log=root / "server.log")
    client = httpx.Client(base_url=proc.url, timeout=120)
    try:
        yield {"url": proc.url, "client": client, "server": proc, "tokenizer": tokenizer}
    finally:
        client.close()
        proc.stop()


def _chat(server, **extra) -> dict:
    body = {"model": "base", "messages": QUESTION, "max_tokens": 24, "temperature": 0, **extra}
    response = server["client"].post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text[:500]
    return response.json()


def _stream(server, path="/v1/chat/completions", **body) -> list[dict]:
    body = {"model": "base", "temperature": 0, "stream": True, **body}
    with server["client"].stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        raw = response.read().decode()
    return [json.loads(line[6:]) for block in raw.split("\n\n") for line in block.split("\n")
            if line.startswith("data: {")]  # (the Responses API's blocks start with an "event:" line)


def _names(message) -> list[str]:
    return [call["function"]["name"] for call in message.get("tool_calls") or ()]


def _error(response: httpx.Response, param: str = "tool_choice") -> str:
    assert response.status_code == 400, response.text[:500]
    error = response.json()["error"]
    assert error["param"] == param and "\n" not in error["message"]
    return error["message"]


# -- allowed_tools ----------------------------------------------------------------------------------------------
def test_allowed_tools_auto_narrows_the_call_and_keeps_the_prompt(server):
    """Through the openai package: the model calls get_weather by itself; allowed only get_time (or
    get_location), it calls that one, reasoning first as before, from the very same prompt tokens."""
    import openai

    sdk = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused")
    kwargs = dict(model="base", messages=QUESTION, tools=TOOLS, max_tokens=24, temperature=0,
                  extra_body={"return_prompt_text": True})
    free = sdk.chat.completions.create(**kwargs)
    assert [c.function.name for c in free.choices[0].message.tool_calls] == ["get_weather"]
    for name in ("get_time", "get_location"):
        narrowed = sdk.chat.completions.create(**kwargs, tool_choice=allowed("auto", name))
        choice = narrowed.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == \
            [(name, CALL)]
        assert choice.message.model_extra["reasoning_content"] == "".join(STEPS)
        assert narrowed.usage.prompt_tokens == free.usage.prompt_tokens
        assert narrowed.model_extra["prompt_text"] == free.model_extra["prompt_text"]
    # two allowed: the model's favourite among them; all three allowed: as without
    assert _names(_chat(server, tools=TOOLS, tool_choice=allowed("auto", "get_location", "get_time"))
                  ["choices"][0]["message"]) == ["get_time"]
    assert _names(_chat(server, tools=TOOLS, tool_choice=allowed("auto", *[t["function"]["name"] for t in TOOLS]))
                  ["choices"][0]["message"]) == ["get_weather"]


def test_allowed_tools_required(server):
    """"required" with several tools: the prompt ends with a call's start and the name is one of them; with one,
    the call is that one's (as a named tool_choice). No reasoning, no text: the call only."""
    several = _chat(server, tools=TOOLS, tool_choice=allowed("required", "get_time", "get_location"))
    one = _chat(server, tools=TOOLS, tool_choice=allowed("required", "get_location"))
    for answer, name in ((several, "get_time"), (one, "get_location")):
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in choice["message"]["tool_calls"]] == [(name, CALL)]
    required = _chat(server, tools=TOOLS, tool_choice="required")  # any tool: the model's own choice
    assert _names(required["choices"][0]["message"]) == ["get_weather"]
    assert several["usage"]["prompt_tokens"] == required["usage"]["prompt_tokens"]


def test_allowed_tools_streamed(server):
    """Streamed, the call goes out as it is written, under the allowed name ("auto" and "required")."""
    for choice in (allowed("auto", "get_time"), allowed("required", "get_time", "get_location")):
        events = _stream(server, messages=QUESTION, tools=TOOLS, tool_choice=choice, max_tokens=24)
        deltas = [e["choices"][0] for e in events if e["choices"]]
        parts = [part for d in deltas for part in d["delta"].get("tool_calls") or ()]
        assert [p["function"]["name"] for p in parts if "id" in p] == ["get_time"]
        assert json.loads("".join(p["function"]["arguments"] for p in parts)) == CALL
        assert [d["finish_reason"] for d in deltas if d["finish_reason"]] == ["tool_calls"]


def test_allowed_tools_on_responses(server):
    """The Responses API's flat form through the openai package: one function_call item of the allowed tool, and
    the response echoes the tool_choice."""
    import openai

    sdk = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused")
    for mode in ("auto", "required"):
        choice = {"type": "allowed_tools", "mode": mode, "tools": [{"type": "function", "name": "get_location"}]}
        response = sdk.responses.create(model="base", input=QUESTION, tools=RESPONSES_TOOLS, tool_choice=choice,
                                        max_output_tokens=24, temperature=0)
        [call] = [item for item in response.output if item.type == "function_call"]
        assert (call.name, json.loads(call.arguments)) == ("get_location", CALL)
        assert response.tool_choice.type == "allowed_tools" and response.tool_choice.mode == mode
        events = _stream(server, "/v1/responses", input=QUESTION, tools=RESPONSES_TOOLS, tool_choice=choice,
                         max_output_tokens=24)
        done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
        assert [(i["name"], json.loads(i["arguments"])) for i in done if i["type"] == "function_call"] == \
            [("get_location", CALL)]


@pytest.mark.parametrize("choice, words", [
    (allowed("auto", "get_date"), "allows 'get_date', which is not among the tools"),
    (allowed("sometimes", "get_time"), "mode must be 'auto' or 'required'"),
    (allowed("auto"), "at least one"),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "custom", "custom": {
        "name": "get_time"}}]}}, "is a 'custom' tool; only function tools"),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "name":
                                                                            "get_time"}]}}, "names no function"),
    ({"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "get_time"}]},
     "takes the form {'type': 'allowed_tools', 'allowed_tools'"),  # the Responses form sent to chat
])
def test_allowed_tools_refused(server, choice, words):
    response = server["client"].post("/v1/chat/completions", json={"model": "base", "messages": QUESTION,
                                                                   "tools": TOOLS, "tool_choice": choice})
    assert words in _error(response)


def test_allowed_tools_refused_on_responses_and_without_tools(server):
    client = server["client"]
    body = {"model": "base", "input": "hi", "tools": RESPONSES_TOOLS,
            "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "x"}]}}
    assert "allows 'x', which is not among the tools" in _error(client.post("/v1/responses", json=body))
    chat = {"model": "base", "messages": QUESTION, "tool_choice": allowed("auto", "get_time")}
    assert "not supported without tools" in _error(client.post("/v1/chat/completions", json=chat))


def _drive(gate: NameGate, table: TokenTexts, tokenizer, text: str) -> list[tuple[str, tuple | None]]:
    """Feed ``text``'s tokens to ``gate``: (the token's text, what the gate allowed before it) per token."""
    out = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        out.append((table.texts[token], gate.allowed()))
        gate.take(token)
    return out


@pytest.mark.parametrize("fmt, name, text", [
    ("hermes", "qwen2.5", 'Sure.<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'),
    ("llama3_json", "llama3.1", '{"name": "get_time", "parameters": {}}'),
    ("mistral", "mistral", '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]'),
    ("mistral_args", "mistral", "Sure.[TOOL_CALLS]get_time[ARGS]{}"),
])
def test_name_gate_restricts_the_name_only(fmt, name, text):
    """On each call format: nothing is restricted before the call's name begins or after it ends; while it is
    written, only tokens on the way to an allowed name and its end are (one that ends it and goes on too), and
    the name the text writes is among them."""
    tokenizer = build_tokenizer(*FAMILIES[name])
    if fmt == "mistral_args":
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ARGS]", "[CALL_ID]"]})
    table = TokenTexts(tokenizer, len(tokenizer))
    gate = NameGate(table, fmt, ["get_time", "get_location"])
    steps = _drive(gate, table, tokenizer, text)
    before = text.index("get_time")
    ends = [n + e for n in ("get_time", "get_location") for e in NAME_ENDS[fmt]]
    at = 0
    for piece, ids in steps:
        if at < before or at > before + len("get_time"):  # the name's end is restricted too: '"' or [ARGS]
            assert ids is None, (piece, at)
        else:
            written = text[before:at]
            options = [written + table.texts[i] for i in ids]
            assert written + piece in options
            assert all(any(c.startswith(o) or o.startswith(c) for c in ends) for o in options), options
            if "get_location".startswith(written):  # the other name is still open to the model
                assert any("get_location".startswith(o) or o.startswith("get_location") for o in options)
        at += len(piece)


def test_name_gate_refuses_tokens_that_run_from_the_head_into_another_name():
    """A SentencePiece tokenizer (Mistral v0.3's kind) has tokens that finish the call's head and go on into the
    name (' "get_weather",'): where the content ends inside the head, those of names not allowed are refused, the
    allowed one's not; drawn, it closes the name (nothing restricted after)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    texts = [f'[TOOL_CALLS] [{{"name": "{name}", "arguments": {{"city": "Paris"}}}}]'
             for name in ("get_weather", "get_time", "get_location")] * 40
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "[TOOL_CALLS]"], show_progress=False,
        initial_alphabet=list('abcdefghijklmnopqrstuvwxyz_"{}[]:, P')))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    table = TokenTexts(tokenizer, len(tokenizer))
    spanning = {name: table.by_text.get(f' "{name}",', [None])[0] for name in ("get_weather", "get_time")}
    assert None not in spanning.values()  # the vocabulary has them: the case to cover
    gate = NameGate(table, "mistral", ["get_time", "get_location"])
    for token in tokenizer('[TOOL_CALLS] [{"name":', add_special_tokens=False)["input_ids"]:
        assert gate.allowed() is None
        gate.take(token)
    refused = gate.refused()
    assert spanning["get_weather"] in refused and spanning["get_time"] not in refused
    assert not any(table.texts[t].startswith(' "get_t') for t in refused)
    gate.take(spanning["get_time"])
    assert gate.allowed() is None and gate.refused() == ()


def test_name_gate_waits_for_the_reasoning_and_lets_other_writings_through():
    """A call written inside the reasoning block is not restricted (the gate looks at the content only); the
    same call after the block is. A call written another way (the name after the arguments) is not seen by the
    gate: read with the allowed names only, it is no call (its text the content)."""
    from lorakit.serve.tool_calls import parse_calls

    tokenizer = family("qwen3")
    table = TokenTexts(tokenizer, len(tokenizer))
    call = '<tool_call>\n{"name": "get_time"'
    steps = _drive(NameGate(table, "hermes", ["get_time"], start=AnswerStart("start", THINK)), table, tokenizer,
                   f"<think>{call}</think>\n\n{call}")
    restricted = [piece for piece, ids in steps if ids is not None]
    assert "".join(restricted) == 'get_time"' and sum(1 for p, _ in steps if p == "g") == 2
    other = '<tool_call>\n{"arguments": {}, "name": "get_weather"}\n</tool_call>'
    assert all(ids is None for _, ids in _drive(NameGate(table, "hermes", ["get_time"]), table, tokenizer, other))
    assert parse_calls(other, "hermes", {"get_time"}) is None
    assert content_start("<think>a</think>\n\nb", AnswerStart("start", THINK)) == len("<think>a</think>")
    assert content_start(" <thi", AnswerStart("start", THINK)) is None
    assert content_start("plain", AnswerStart("start", THINK)) == 0


# -- thinking_token_budget ---------------------------------------------------------------------------------------
def _reasoning(answer: dict) -> tuple[str | None, str | None, list[str]]:
    message = answer["choices"][0]["message"]
    return message.get("reasoning_content"), message["content"], _names(message)


@pytest.mark.parametrize("budget, thought", [(0, None), (1, STEPS[0]), (2, "".join(STEPS[:2])), (3, "".join(STEPS)),
                                             (50, "".join(STEPS)), (-1, "".join(STEPS)), (None, "".join(STEPS))])
def test_thinking_budget_cuts_the_reasoning(server, budget, thought):
    """The block ends after ``budget`` tokens and the answer goes on, calling as before; the reasoning tokens
    counted are the block's (the forced closing marker included)."""
    answer = _chat(server, tools=TOOLS, **({} if budget is None else {"thinking_token_budget": budget}))
    assert _reasoning(answer) == (thought, "Let me check.", ["get_weather"])
    kept = min(budget, 3) if budget is not None and budget >= 0 else 3
    assert answer["usage"]["completion_tokens_details"] == {"reasoning_tokens": kept + 2}  # + <think>, </think>


def test_thinking_budget_streamed_and_batched(server):
    """Streamed, the reasoning chunks stop at the budget; sent together, requests of different budgets share the
    engine's batch and each is cut at its own."""
    events = _stream(server, messages=QUESTION, tools=TOOLS, max_tokens=24, thinking_token_budget=1,
                     stream_options={"include_usage": True})
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == STEPS[0]
    assert "".join(d.get("content") or "" for d in deltas) == "Let me check."
    assert events[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}
    budgets = [2, None, 0, 1, 3, 0, 2]
    answers: dict[int, dict] = {}

    def ask(i: int, budget) -> None:
        answers[i] = _chat(server, **({} if budget is None else {"thinking_token_budget": budget}))

    threads = [threading.Thread(target=ask, args=(i, b)) for i, b in enumerate(budgets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, budget in enumerate(budgets):
        kept = STEPS if budget is None else STEPS[:budget]
        assert answers[i]["choices"][0]["message"]["reasoning_content"] == ("".join(kept) or None), (i, budget)
    n2 = _chat(server, n=2, temperature=0.5, seed=3, thinking_token_budget=1)
    assert [c["message"]["reasoning_content"] for c in n2["choices"]] == [STEPS[0]] * 2


def test_thinking_budget_on_responses_and_completions(server):
    """/v1/responses cuts its reasoning item; /v1/completions, whose prompt opened the block, too (counted from
    the marker, as vLLM counts); with thinking off (the prompt holds a closed block) there is nothing to cut."""
    client = server["client"]
    response = client.post("/v1/responses", json={"model": "base", "input": QUESTION, "max_output_tokens": 24,
                                                  "temperature": 0, "thinking_token_budget": 2}).json()
    [reasoning] = [item for item in response["output"] if item["type"] == "reasoning"]
    assert "".join(part["text"] for part in reasoning["content"]) == "".join(STEPS[:2])
    prompt = server["tokenizer"].apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False) + "<think>"
    text = client.post("/v1/completions", json={"model": "base", "prompt": prompt, "max_tokens": 4, "temperature": 0,
                                                "thinking_token_budget": 1}).json()["choices"][0]["text"]
    assert text == STEPS[0] + "</think>\n\nLet me check."
    off = _chat(server, tools=TOOLS, thinking_token_budget=0, chat_template_kwargs={"enable_thinking": False})
    assert _reasoning(off) == (None, "Let me check.", ["get_weather"])
    # with a format: the block is cut, then the content follows the format (its grammar waits for the marker)
    formatted = _chat(server, thinking_token_budget=1, response_format={"type": "json_object"}, max_tokens=12)
    assert formatted["choices"][0]["message"]["reasoning_content"] == STEPS[0]
    assert formatted["choices"][0]["message"]["content"].startswith("{")
    assert "-1 for unlimited" in _error(client.post("/v1/chat/completions", json={
        "model": "base", "messages": QUESTION, "thinking_token_budget": -2}), "thinking_token_budget")
    assert "Traceback" not in server["server"].output()


def test_think_budget_counts_as_vllm():
    """The steer alone: a block the prompt opened counts the prompt's tokens after its marker; one the answer
    opens (after whitespace) counts from the marker; an answer that begins otherwise is never cut; the model's own
    closing marker ends the count; the marker of several tokens is forced token by token."""
    tokenizer = family("qwen2.5")  # <think> is no token of its own here: several tokens
    encode = lambda s: tuple(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    decode = lambda ids: tokenizer.decode(ids)  # noqa: E731
    close = encode("</think>")
    assert len(close) > 1

    def run(budget, where, answer_ids, prompt_tokens=0):
        cap, forced = ThinkBudget(budget, where, THINK, close, decode, prompt_tokens), []
        for token in answer_ids:
            ids = cap.allowed()
            if ids is not None:
                forced.append(ids[0])
                token = ids[0]
            cap.take(token)
        return forced

    thinking = encode(" a b c d e f")
    assert run(2, "inside", thinking) == list(close[:len(thinking) - 2])
    assert run(2, "inside", thinking, prompt_tokens=1)[:1] == [close[0]]  # the prompt's "\n" after <think> counts
    assert run(0, "inside", thinking[:len(close)]) == list(close)
    assert run(2, "start", encode("\n<think>") + thinking)[:len(close)] == list(close)
    assert run(0, "start", encode("Hello <think> a b c d")) == []
    assert run(9, "start", encode("<think> a</think> b c d e f g")) == []  # closed by the model within budget
    assert run(0, "closed", encode("<think> a b")) == []


def test_steered_rows_choose_their_own_tokens():
    """The engine's choice: each steered row draws among its steer's tokens only, other rows as they would, and
    the caller's logits (the model's, for logprobs) are left as they were. One token allowed is forced whatever
    the row's allowed_token_ids say (as vLLM forces a budget's marker); among several, those still apply."""
    from lorakit.generation import SamplingParams
    from lorakit.serve.engine import Engine, Request
    from lorakit.serve.sampling import RowOptions

    class Force:
        def __init__(self, ids, refused=()):
            self.ids, self.banned = ids, refused

        def allowed(self):
            return self.ids

        def refused(self):
            return self.banned

    rows = [Request([1], None, SamplingParams(max_new_tokens=4, temperature=t), lambda *a: True, lambda r: None,
                    steer=steer)
            for t, steer in ((0, Force((3,))), (0, None), (1.0, Force((5, 7))), (0, Force(None)))]
    logits = torch.zeros(4, 10)
    logits[:, 9] = 5.0
    before = logits.clone()
    tokens, errors = Engine._choose(rows, logits)
    assert tokens[0] == 3 and tokens[1] == 9 and tokens[2] in (5, 7) and tokens[3] == 9 and errors == [None] * 4
    assert torch.equal(logits, before)
    only = RowOptions(allowed=(1, 7))
    rows = [Request([1], None, SamplingParams(max_new_tokens=4, temperature=t), lambda *a: True, lambda r: None,
                    steer=Force(ids), options=only) for t, ids in ((0, (3,)), (1.0, (3,)), (0, (5, 7)), (1.0, (5, 7)))]
    tokens, errors = Engine._choose(rows, logits)
    assert tokens == [3, 3, 7, 7] and errors == [None] * 4
    refusing = Request([1], None, SamplingParams(max_new_tokens=4, temperature=0), lambda *a: True, lambda r: None,
                       steer=Force(None, (9, 8)))
    logits[0, 8] = 4.0
    assert Engine._choose([refusing], logits[:1])[0] == [0]  # 9 and 8 refused: the next best (ties: the first)


def test_budget_without_a_reasoning_parser_is_refused():
    from lorakit.serve.app import _steers
    from lorakit.serve.model_text import ModelText
    from lorakit.serve.protocol import APIError, ChatRequest

    tokenizer = family("qwen2.5")
    text = ModelText(tokenizer, (), None, len(tokenizer))
    body = ChatRequest.model_validate({"model": "m", "messages": QUESTION, "thinking_token_budget": 8})
    with pytest.raises(APIError, match="writes none .or the server runs with --reasoning-parser none"):
        _steers(text, body, [[1, 2]], 1, None, None, None)
    assert _steers(text, ChatRequest.model_validate({"model": "m", "messages": QUESTION}), [[1]], 1, None, None,
                   None) is None
