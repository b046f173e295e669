"""What OpenAI and vLLM clients send today, on ``lorakit serve`` (session 16), over real sockets.

Before, each field here was a 400 "unknown field" (or, for ``prompt_logprobs``, ``reasoning_effort``,
``reasoning.effort``, ``service_tier`` "fast", refused by name). Now each is honoured, or accepted where vLLM
accepts it and it changes nothing here, or refused in one line that names it and says why:

- vLLM's answers: ``prompt_logprobs`` (each prompt token's log-probability, its rank and the top k, against
  transformers' forward), ``return_token_ids`` (the prompt's ids and each choice's, streamed in pieces that add up),
  ``return_tokens_as_token_ids`` ("token_id:<id>" in logprobs), ``request_id`` (the answer's id),
  ``stream_options.continuous_usage_stats`` (usage on every chunk), ``repetition_detection`` (ends a looping
  answer), ``include_reasoning`` false (no reasoning in the answer), ``truncation_side``, ``add_special_tokens``.
- ``reasoning_effort`` (chat) and ``reasoning.effort`` (responses) reach the chat template as vLLM hands them
  (``reasoning_effort``, and ``enable_thinking`` unless chat_template_kwargs sets it), seen in the prompt's ids.
- The openai package's newer fields (``prompt_cache_options``, a text part's ``prompt_cache_breakpoint``,
  ``service_tier`` "fast") are accepted; ``moderation`` is refused by name, through the package itself.
- vLLM's machinery fields are accepted (``cache_salt``, ``kv_transfer_params``, ``vllm_xargs``, ``session_id``,
  ``stream_interval``, ``priority`` 0, ``thinking_token_budget`` -1) or refused by name (a non-zero priority, as
  vLLM's default scheduler; ``logits_processors``, ``logprob_token_ids``, ``watermarking`` true);
  ``thinking_token_budget`` is honoured since session 17 (tests/test_followups_17_protocol.py), below -1 refused.
"""

from __future__ import annotations

import json
import random

import httpx
import pytest
import torch

from http_helpers import post_json, sse_events
from test_serve_support import CHATML, ServerProcess, make_tokenizer, never_ending, tiny_hf_folder

QUESTION = [{"role": "user", "content": "Hello, how are you today?"}]
# a template that shows what it was handed: reasoning_effort as a system line, enable_thinking false as /no_think,
# and an opened <think> block when asked (chat_template_kwargs open_think), which turns the <think> parser on
TEMPLATE = ("{% if reasoning_effort is defined and reasoning_effort %}<|im_start|>system\nReasoning: "
            "{{ reasoning_effort }}<|im_end|>\n{% endif %}{% if enable_thinking is defined and not enable_thinking %}"
            "/no_think\n{% endif %}" + CHATML + "{% if open_think is defined and open_think %}<think>\n{% endif %}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny Llama that never ends a turn (greedy answers run to max_tokens), whose tokenizer adds its BOS to a
    plain text (as Llama's does) and whose template is ``TEMPLATE``."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("protocol16")
    model_dir = tiny_hf_folder(root / "model", initializer_range=0.5)
    model = never_ending(model_dir).eval()
    tokenizer = make_tokenizer()
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", tokenizer.bos_token_id)])
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(model_dir)
    (root / "adapters").mkdir()
    process = ServerProcess(model_dir, root / "adapters", log=root / "server.log")
    client = httpx.Client(base_url=process.url, timeout=120)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        yield {"url": process.url, "client": client, "model": model, "tokenizer": tokenizer, "process": process}
    finally:
        client.close()
        process.stop()


def _rendered(server, messages=QUESTION, **kwargs) -> list[int]:
    return list(server["tokenizer"].apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False, **kwargs))


def _greedy(server, prompt: list[int], tokens: int) -> list[int]:
    with torch.no_grad():
        out = server["model"].generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False,
                                       pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def _log_softmax(server, prompt: list[int]) -> torch.Tensor:
    """(len(prompt) - 1, V): position i's log-probabilities of the token at i + 1."""
    with torch.no_grad():
        return torch.log_softmax(server["model"](torch.tensor([prompt])).logits[0, :-1].float(), -1)


def _check_prompt_logprobs(server, prompt: list[int], scored: list, k: int) -> None:
    """vLLM's form: None first, then per token {id: {logprob, rank, decoded_token}}: the prompt's token with its
    rank in the vocabulary, then the k likeliest (ranks 1..k), each id once, against transformers' forward."""
    decode = server["tokenizer"].decode
    expected = _log_softmax(server, prompt)
    assert len(scored) == len(prompt) and scored[0] is None
    for position, entry in enumerate(scored[1:]):
        row, token = expected[position], prompt[position + 1]
        top = torch.topk(row, k).indices.tolist() if k else []
        assert list(entry) == list(dict.fromkeys([str(token), *map(str, top)]))
        own = entry[str(token)]
        assert own["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        assert own["rank"] == int((row > row[token]).sum()) + 1
        assert own["decoded_token"] == decode([token])
        for rank, other in enumerate(top, 1):
            assert entry[str(other)]["logprob"] == pytest.approx(float(row[other]), abs=1e-4)
            assert other == token or entry[str(other)]["rank"] == rank


# -- vLLM's answer fields ----------------------------------------------------------------------------------------------
def test_prompt_logprobs_are_the_forwards(server):
    prompts = [[50, 60, 70, 80, 90, 100], [7, 8, 9]]
    answer = post_json(server, "/v1/completions", {"prompt": prompts, "max_tokens": 2, "n": 2, "prompt_logprobs": 3})
    for choice in answer["choices"]:  # choice p * n + i answers prompt p
        _check_prompt_logprobs(server, prompts[choice["index"] // 2], choice["prompt_logprobs"], 3)
    alone = post_json(server, "/v1/completions", {"prompt": prompts[0], "max_tokens": 0, "echo": True,
                                                  "prompt_logprobs": 0})  # scored, nothing generated
    _check_prompt_logprobs(server, prompts[0], alone["choices"][0]["prompt_logprobs"], 0)
    assert all(len(entry) == 1 for entry in alone["choices"][0]["prompt_logprobs"][1:])
    chat = post_json(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2, "prompt_logprobs": 2})
    _check_prompt_logprobs(server, _rendered(server), chat["prompt_logprobs"], 2)  # the response's: one prompt
    for fields, words in (({"prompt_logprobs": 21}, "less than or equal to 20"),
                          ({"prompt_logprobs": -1}, "greater than or equal to 0"),
                          ({"prompt_logprobs": 1, "stream": True}, "not available when stream is true")):
        error = post_json(server, "/v1/completions", {"prompt": "hi", **fields}, status=400)["error"]
        assert error["param"] == "prompt_logprobs" and words in error["message"], error


def test_token_ids_whole_and_streamed(server):
    prompt = [50, 60, 70, 80]
    expected = _greedy(server, prompt, 6)
    choice = post_json(server, "/v1/completions", {"prompt": prompt, "max_tokens": 6,
                                                   "return_token_ids": True})["choices"][0]
    assert (choice["prompt_token_ids"], choice["token_ids"]) == (prompt, expected)
    text = server["tokenizer"].decode(prompt)
    with_bos = post_json(server, "/v1/completions", {"prompt": text, "max_tokens": 1, "return_token_ids": True})
    assert with_bos["choices"][0]["prompt_token_ids"] == [server["tokenizer"].bos_token_id, *prompt]
    events = sse_events(server, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "return_token_ids": True,
                                                    "n": 2})
    for index in (0, 1):
        chunks = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        assert chunks[0]["prompt_token_ids"] == prompt and all("prompt_token_ids" not in c for c in chunks[1:])
        assert [t for c in chunks for t in c["token_ids"]] == expected  # the pieces add up
    ids = _rendered(server)
    chat = post_json(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 5, "return_token_ids": True})
    assert chat["prompt_token_ids"] == ids and chat["choices"][0]["token_ids"] == _greedy(server, ids, 5)
    streamed = sse_events(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 5,
                                                           "return_token_ids": True})
    assert streamed[0]["prompt_token_ids"] == ids and all("prompt_token_ids" not in e for e in streamed[1:])
    assert [t for e in streamed for t in e["choices"][0]["token_ids"]] == chat["choices"][0]["token_ids"]


def test_tokens_as_token_ids(server):
    body = {"prompt": [50, 60, 70], "max_tokens": 5, "logprobs": 2, "return_token_ids": True}
    plain = post_json(server, "/v1/completions", body)["choices"][0]
    named = post_json(server, "/v1/completions", {**body, "return_tokens_as_token_ids": True})["choices"][0]
    lp, plain_lp = named["logprobs"], plain["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in named["token_ids"]]
    assert lp["text_offset"] == plain_lp["text_offset"] and lp["token_logprobs"] == plain_lp["token_logprobs"]
    assert all(set(top) <= {f"token_id:{i}" for i in range(len(server["tokenizer"]))} for top in lp["top_logprobs"])
    chat = {"messages": QUESTION, "max_tokens": 4, "logprobs": True, "top_logprobs": 2,
            "return_tokens_as_token_ids": True, "return_token_ids": True}
    choice = post_json(server, "/v1/chat/completions", chat)["choices"][0]
    assert [c["token"] for c in choice["logprobs"]["content"]] == [f"token_id:{t}" for t in choice["token_ids"]]
    streamed = sse_events(server, "/v1/chat/completions", chat)
    tokens = [c["token"] for e in streamed if e["choices"][0]["logprobs"] for c in e["choices"][0]["logprobs"]["content"]]
    assert tokens == [c["token"] for c in choice["logprobs"]["content"]]


def test_prompt_text(server):
    """return_prompt_text: the prompt as the template rendered it, on the answer (streamed: the first chunk)."""
    rendered = server["tokenizer"].apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    body = {"messages": QUESTION, "max_tokens": 2, "return_prompt_text": True}
    assert post_json(server, "/v1/chat/completions", body)["prompt_text"] == rendered
    events = sse_events(server, "/v1/chat/completions", body)
    assert events[0]["prompt_text"] == rendered and all("prompt_text" not in e for e in events[1:])
    assert "prompt_text" not in post_json(server, "/v1/chat/completions", {**body, "return_prompt_text": False})
    error = post_json(server, "/v1/completions", {"prompt": "hi", "prompt_embeds": "AAAA"}, status=400)["error"]
    assert error["param"] == "prompt_embeds" and "text or token ids" in error["message"]


def test_request_id_and_continuous_usage(server):
    assert post_json(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2,
                                                      "request_id": "abc-123"})["id"] == "chatcmpl-abc-123"
    assert post_json(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "request_id": "r1"})["id"] == \
        "cmpl-r1"
    assert post_json(server, "/v1/responses", {"input": "hi", "max_output_tokens": 16, "request_id": "r2"})["id"] == \
        "resp_r2"
    events = sse_events(server, "/v1/chat/completions", {
        "messages": QUESTION, "max_tokens": 5,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    done = [e["usage"]["completion_tokens"] for e in events]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 5 and events[-1]["choices"] == []
    prompt = events[-1]["usage"]["prompt_tokens"]
    assert all(e["usage"]["prompt_tokens"] == prompt and e["usage"]["total_tokens"] == prompt +
               e["usage"]["completion_tokens"] for e in events)
    # known whole: the usage on every chunk too
    scored = sse_events(server, "/v1/completions", {
        "prompt": "hi there", "max_tokens": 0, "echo": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert [e["usage"] for e in scored[:-1]] == [scored[-1]["usage"]] and scored[-1]["usage"]["completion_tokens"] == 0
    only_last = sse_events(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 5,
                                                            "stream_options": {"include_usage": True}})
    assert all(e["usage"] is None for e in only_last[:-1]) and only_last[-1]["usage"]["completion_tokens"] == 5


def test_prompt_edges(server):
    """add_special_tokens (completions: the BOS by default, none with false; chat: the BOS on top of the
    template's with true) and truncation_side "right" (the first k tokens, not the last)."""
    bos, tokenizer = server["tokenizer"].bos_token_id, server["tokenizer"]
    words = tokenizer("Paris is the capital of France", add_special_tokens=False)["input_ids"]
    def ids(path, **body):
        answer = post_json(server, path, {"max_tokens": 1, "return_token_ids": True, **body})
        return answer["prompt_token_ids"] if "prompt_token_ids" in answer else answer["choices"][0]["prompt_token_ids"]
    assert ids("/v1/completions", prompt="Paris is the capital of France") == [bos, *words]
    assert ids("/v1/completions", prompt="Paris is the capital of France", add_special_tokens=False) == words
    assert ids("/v1/chat/completions", messages=QUESTION) == _rendered(server)
    assert ids("/v1/chat/completions", messages=QUESTION, add_special_tokens=True) == [bos, *_rendered(server)]
    assert ids("/v1/completions", prompt=words, truncate_prompt_tokens=3, truncation_side="right") == words[:3]
    assert ids("/v1/completions", prompt=words, truncate_prompt_tokens=3, truncation_side="left") == words[-3:]
    assert ids("/v1/completions", prompt=words, truncate_prompt_tokens=3) == words[-3:]
    error = post_json(server, "/v1/completions", {"prompt": "hi", "truncation_side": "right"}, status=400)["error"]
    assert error["param"] == "truncation_side" and "send truncate_prompt_tokens with it" in error["message"]


# -- repetition_detection --------------------------------------------------------------------------------------------
def _naive_first(tokens: list[int], most: int, least: int, count: int) -> int | None:
    """The first position where the answer so far ends in a pattern of least..most tokens said count times."""
    for end in range(1, len(tokens) + 1):
        seen = tokens[:end]
        for size in range(max(least, 1), most + 1):
            if len(seen) >= size * count and seen[-size * count:] == seen[-size:] * count:
                return end - 1
    return None


def test_repetition_watch_is_the_naive_check():
    from lorakit.serve.repetition import RepetitionWatch

    generator = random.Random(0)
    for trial in range(600):
        most, count = generator.randint(1, 5 if trial < 300 else 12), generator.randint(2, 4)
        least = generator.randint(0, most)
        alphabet = 2 if trial < 300 else generator.randint(2, 6)
        tokens = [generator.randint(0, alphabet) for _ in range(generator.randint(1, 60 if trial < 300 else 150))]
        watch = RepetitionWatch(most, least, count)
        first = next((i for i, token in enumerate(tokens) if watch.add(token)), None)
        assert first == _naive_first(tokens, most, least, count), (tokens, most, least, count)


def test_repetition_detection_ends_a_loop(server):
    """Only token 50 allowed, the answer is 50 50 50 ...: a 1-token pattern said 3 times ends it at 3 tokens
    (finish "stop"), a 2-token one said twice at 4; off (max_pattern_size 0) it runs to max_tokens."""
    body = {"prompt": [7, 8], "max_tokens": 12, "allowed_token_ids": [50], "return_token_ids": True}
    for detection, tokens, finish in (({"max_pattern_size": 3, "min_count": 3}, 3, "stop"),
                                      ({"max_pattern_size": 2, "min_pattern_size": 2, "min_count": 2}, 4, "stop"),
                                      ({"max_pattern_size": 0}, 12, "length")):
        choice = post_json(server, "/v1/completions", {**body, "repetition_detection": detection})["choices"][0]
        assert (choice["token_ids"], choice["finish_reason"]) == ([50] * tokens, finish), detection
    events = sse_events(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 12,
                                                         "allowed_token_ids": [50], "repetition_detection":
                                                             {"max_pattern_size": 1, "min_count": 5},
                                                         "stream_options": {"include_usage": True}})
    assert events[-1]["usage"]["completion_tokens"] == 5 and events[-2]["choices"][0]["finish_reason"] == "stop"
    for detection, words in (({"max_pattern_size": 2, "min_count": 1}, "min_count must be 2 or more"),
                             ({"max_pattern_size": 2, "min_pattern_size": 3, "min_count": 2}, "is over max_pattern")):
        error = post_json(server, "/v1/completions", {"prompt": "hi", "repetition_detection": detection}, 400)["error"]
        assert words in error["message"] and error["param"] == "repetition_detection", error


# -- reasoning: effort and include_reasoning ---------------------------------------------------------------------------
def test_reasoning_effort_reaches_the_template(server):
    def prompt(**body) -> list[int]:
        return post_json(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 1,
                                                          "return_token_ids": True, **body})["prompt_token_ids"]

    assert prompt(reasoning_effort="low") == _rendered(server, reasoning_effort="low", enable_thinking=True)
    assert prompt(reasoning_effort="none") == _rendered(server, reasoning_effort="none", enable_thinking=False)
    assert prompt(reasoning_effort="none") != prompt()
    # chat_template_kwargs' enable_thinking is the client's own choice: the effort leaves it
    assert prompt(reasoning_effort="none", chat_template_kwargs={"enable_thinking": True}) == \
        _rendered(server, reasoning_effort="none", enable_thinking=True)
    usage = post_json(server, "/v1/responses", {"input": QUESTION[0]["content"], "max_output_tokens": 16,
                                                "reasoning": {"effort": "high", "summary": "auto"}})
    assert usage["usage"]["input_tokens"] == len(_rendered(server, reasoning_effort="high", enable_thinking=True))
    assert usage["reasoning"]["effort"] == "high"


def test_include_reasoning_false_leaves_the_reasoning_out(server):
    """The prompt opens a <think> block (the template's open_think): the whole answer is reasoning; with
    include_reasoning false it is not returned, whole or streamed, while its tokens still count."""
    body = {"messages": QUESTION, "max_tokens": 4, "chat_template_kwargs": {"open_think": True},
            "stream_options": {"include_usage": True}}
    shown = post_json(server, "/v1/chat/completions", {**body, "stream_options": None})
    message = shown["choices"][0]["message"]
    assert message["reasoning_content"] and message["content"] is None
    hidden = post_json(server, "/v1/chat/completions", {**body, "stream_options": None, "include_reasoning": False})
    assert hidden["choices"][0]["message"]["reasoning_content"] is None
    assert hidden["usage"]["completion_tokens_details"] == shown["usage"]["completion_tokens_details"] == \
        {"reasoning_tokens": 4}
    streamed = [e["choices"][0]["delta"] for e in sse_events(server, "/v1/chat/completions", body) if e["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in streamed) == message["reasoning_content"]
    quiet = sse_events(server, "/v1/chat/completions", {**body, "include_reasoning": False})
    assert not any(e["choices"][0]["delta"].get("reasoning_content") for e in quiet if e["choices"])
    assert quiet[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 4}


# -- accepted, and refused by name ---------------------------------------------------------------------------------
ACCEPTED = [
    {"cache_salt": "s" * 43, "kv_transfer_params": {"do_remote_decode": False}, "ec_transfer_params": {},
     "vllm_xargs": {"a": 1, "b": ["x", 2.5]}, "session_id": "s1", "stream_interval": 4, "priority": 0,
     "thinking_token_budget": -1, "watermarking": False, "logits_processors": [], "logprob_token_ids": None},
    {"prompt_cache_options": {"mode": "implicit", "ttl": "30m"}, "service_tier": "fast", "mm_processor_kwargs": {},
     "media_io_kwargs": None, "return_token_offsets": True, "return_mm_kwargs": False, "routed_experts_prompt_start": 2},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "prompt_cache_breakpoint":
                                                {"mode": "explicit", "ttl": "12h"}}]}]},
]
REFUSED = [
    ({"priority": 1}, "priority", "arrival order"),
    ({"logits_processors": ["my.module:Processor"]}, "logits_processors", "loads no logits processor"),
    ({"thinking_token_budget": -5}, "thinking_token_budget", "-1 for unlimited"),
    ({"logprob_token_ids": [5, 6], "logprobs": True}, "logprob_token_ids", "top_logprobs"),
    ({"watermarking": True}, "watermarking", "no watermark"),
    ({"moderation": {"model": "omni-moderation-latest"}}, "moderation", "no moderation model"),
    ({"cache_salt": ""}, "cache_salt", "at least 1 character"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort", "'none', 'minimal', 'low'"),
    ({"mm_processor_kwargs": {"num_crops": 4}}, "mm_processor_kwargs", "text models"),
    ({"tools": [{"type": "custom", "custom": {"name": "shell"}}]}, "tools", "tools[0] is a 'custom' tool"),
    ({"structured_outputs": {"json": {"type": "object"}, "structural_tag": "{}"}}, "structured_outputs.structural_tag",
     "json, regex, choice"),
]


@pytest.mark.parametrize("fields", ACCEPTED)
def test_accepted_fields(server, fields):
    post_json(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2, **fields})


@pytest.mark.parametrize("fields, param, words", REFUSED)
def test_refused_fields_name_themselves(server, fields, param, words):
    error = post_json(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2, **fields}, 400)["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error", error


def test_an_earlier_refusal_renders_as_what_the_assistant_said(server):
    """An assistant turn's OpenAI ``refusal`` part (the openai package's assistant content: text or refusal parts)
    is its text in the template; a user's refusal part is still refused."""
    said = "I cannot help with that."
    def prompt(content) -> list[int]:
        history = [QUESTION[0], {"role": "assistant", "content": content}, {"role": "user", "content": "Why?"}]
        return post_json(server, "/v1/chat/completions", {"messages": history, "max_tokens": 1,
                                                          "return_token_ids": True})["prompt_token_ids"]

    assert prompt([{"type": "refusal", "refusal": said}]) == prompt(said) == _rendered(
        server, [QUESTION[0], {"role": "assistant", "content": said}, {"role": "user", "content": "Why?"}])
    error = post_json(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "refusal", "refusal": said}]}]}, status=400)["error"]
    assert error["param"] == "messages.0.content" and "type 'refusal'" in error["message"]


def test_the_openai_package_newer_fields(server):
    import openai

    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)
    answer = client.chat.completions.create(
        model="base", messages=QUESTION, max_completion_tokens=3, temperature=0, reasoning_effort="minimal",
        prompt_cache_options={"mode": "explicit", "ttl": "30m"}, service_tier="fast", prompt_cache_key="k",
        safety_identifier="u1", extra_body={"request_id": "sdk-1", "cache_salt": "salt"})
    assert answer.id == "chatcmpl-sdk-1" and answer.usage.completion_tokens == 3
    response = client.responses.create(model="base", input="hi", max_output_tokens=16, service_tier="fast",
                                       prompt_cache_options={"mode": "implicit"}, reasoning={"effort": "low"},
                                       image={"context_compression": "auto"}, context_management=[])
    assert response.status == "incomplete" and response.reasoning.effort == "low"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="base", input="hi", moderation={"model": "omni-moderation-latest"})
    assert caught.value.body["param"] == "moderation"
    for field, value, words in (("context_management", [{"type": "compaction", "compact_threshold": 1000}], "compacted"),
                                ("background_options", {"completion_window": "2h"}, "background"),
                                ("access_programs", {"cyber": "standard"}, "access programs")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model="base", input="hi", **{field: value})
        assert caught.value.body["param"] == field and words in caught.value.body["message"], caught.value.body
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt="hi", extra_body={"priority": -5})
    assert caught.value.body["param"] == "priority" and "send 0" in caught.value.body["message"]


# -- structured_outputs' vLLM options ----------------------------------------------------------------------------------
def test_closed_objects_leave_names_and_data_alone():
    from lorakit.serve.protocol import closed_objects

    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"b": {}}},
                                               "open": {"type": "object", "additionalProperties": True}},
              "$defs": {"X": {"properties": {"q": {}}}}, "default": {"type": "object"}, "enum": [{"type": "object"}]}
    assert closed_objects(schema) == {
        "type": "object", "additionalProperties": False,
        "properties": {"properties": {"type": "object", "properties": {"b": {}}, "additionalProperties": False},
                       "open": {"type": "object", "additionalProperties": True}},
        "$defs": {"X": {"properties": {"q": {}}, "additionalProperties": False}},
        "default": {"type": "object"}, "enum": [{"type": "object"}]}
    assert "additionalProperties" not in schema and "additionalProperties" not in schema["$defs"]["X"]  # a copy


def test_structured_outputs_closed_objects_over_the_socket(server):
    """disable_additional_properties: an object that names "a" takes nothing else, so sampled answers are
    exactly {"a": true} or {"a": false}; disable_any_whitespace is taken (the JSON is compact anyway)."""
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}
    answer = post_json(server, "/v1/completions", {
        "prompt": "JSON:", "max_tokens": 30, "n": 6, "temperature": 1.0, "seed": 11,
        "structured_outputs": {"json": schema, "disable_additional_properties": True, "disable_any_whitespace": True}})
    for choice in answer["choices"]:
        assert choice["finish_reason"] == "stop" and json.loads(choice["text"]) in ({"a": True}, {"a": False}), choice


# -- /v1/responses' logprobs -------------------------------------------------------------------------------------------
def test_responses_logprobs_are_the_chat_ones(server):
    """include ["message.output_text.logprobs"] with top_logprobs: the message's part lists every answer token
    as chat's logprobs.content does (the same prompt through the same template, greedy: the same tokens); streamed,
    the deltas carry them in order and output_text.done the whole list. top_logprobs alone returns none, as
    OpenAI's."""
    chat = post_json(server, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 16, "logprobs": True,
                                                      "top_logprobs": 3})["choices"][0]["logprobs"]["content"]
    body = {"input": QUESTION[0]["content"], "max_output_tokens": 16, "top_logprobs": 3,
            "include": ["message.output_text.logprobs", "reasoning.encrypted_content"]}
    answer = post_json(server, "/v1/responses", body)
    part = answer["output"][-1]["content"][0]
    assert len(part["logprobs"]) == 16 and answer["top_logprobs"] == 3
    for got, expected in zip(part["logprobs"], chat):
        assert (got["token"], got["bytes"], [t["token"] for t in got["top_logprobs"]]) == \
            (expected["token"], expected["bytes"], [t["token"] for t in expected["top_logprobs"]])
        assert got["logprob"] == pytest.approx(expected["logprob"], abs=1e-4)
    events = sse_events(server, "/v1/responses", body)
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert [lp["token"] for e in deltas for lp in e["logprobs"]] == [lp["token"] for lp in done["logprobs"]] == \
        [lp["token"] for lp in part["logprobs"]]
    assert events[-1]["response"]["output"][-1]["content"][0]["logprobs"] == done["logprobs"]
    quiet = post_json(server, "/v1/responses", {**body, "include": None})
    assert quiet["output"][-1]["content"][0]["logprobs"] == [] and quiet["top_logprobs"] == 3
    error = post_json(server, "/v1/responses", {**body, "top_logprobs": 21}, status=400)["error"]
    assert error["param"] == "top_logprobs", error
