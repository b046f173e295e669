"""Structured outputs on ``lorakit serve``, second part: batched sampling of a step's rows, formats in thinking mode,
vLLM's older ``guided_*`` request fields.

- Sampling: ``serve.sampling.sample_rows`` draws every sampled row of a step in one call; on the CPU a row without
  top-p gets the very token ``torch.multinomial`` (``lorakit.generation.sample``) gives, and no row's token depends
  on the other rows. In the engine (a tiny Llama, the test tokenizer, a real llguidance grammar) the plain rows'
  tokens are the same with and without formatted rows beside them, and the step's rows are drawn together.
- Thinking mode (scripted tiny models with Qwen3's and DeepSeek-R1's templates, over HTTP): an answer that never
  opens the reasoning block is formatted from its first token; one that never closes it is all reasoning, no
  content, finish reason "length"; a block opened by the prompt is free text and the content after it is formatted.
- ``guided_json`` (object or text), ``guided_regex``, ``guided_choice``, ``guided_grammar``,
  ``guided_whitespace_pattern``, ``guided_decoding_backend`` on chat and completions; two format fields in one
  request and bad values are one-line 400s; the openai package's ``parse`` and a streamed format still work.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import tiny_llama
from test_serve_structured import FORMAT, MESSAGES, SCHEMA, valid
from test_serve_support import ServerProcess, make_tokenizer, tiny_hf_folder
from test_train_tool_calls import family

OK_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
             "additionalProperties": False}
OK_FORMAT = {"type": "json_schema", "json_schema": {"name": "ok", "schema": OK_SCHEMA}}


# -- batched sampling ------------------------------------------------------------------------------------------------
def test_sample_rows_is_multinomial_and_row_independent():
    from lorakit.generation import SamplingParams, sample
    from lorakit.serve.sampling import sample_rows

    generator = torch.Generator().manual_seed(0)
    temperature = [1.0, 0.7, 1.3, 1e-30, 0.5, 2.0]
    top_p = [1.0, 1.0, 0.9, 1.0, 0.5, 0.95]
    top_k = [0, 5, 0, 0, 40, 0]
    for trial in range(8):
        logits = torch.randn(6, 3000, generator=generator) * 3
        logits[1, 100:] = float("-inf")  # a format's mask
        seeds = [100 * trial + i for i in range(6)]
        tokens, ok = sample_rows(logits, temperature, top_p, top_k, [torch.Generator().manual_seed(s) for s in seeds])
        assert ok.all() and tokens.dtype == torch.int64
        for i in range(6):
            alone, _ = sample_rows(logits[i:i + 1], temperature[i:i + 1], top_p[i:i + 1], top_k[i:i + 1],
                                   [torch.Generator().manual_seed(seeds[i])])
            assert int(alone[0]) == int(tokens[i])  # the neighbours change nothing
            assert torch.isfinite(logits[i, int(tokens[i])])  # never a masked token
            if top_k[i] == 0 and top_p[i] == 1.0:  # torch.multinomial's own draw, token for token
                params = SamplingParams(temperature=temperature[i], seed=seeds[i])
                assert int(tokens[i]) == sample(logits[i], params, torch.Generator().manual_seed(seeds[i]))
        assert int(tokens[3]) == int(logits[3].argmax())  # a tiny temperature is greedy
        assert int(tokens[1]) in torch.topk(logits[1], 5).indices.tolist()
    # the draw follows the distribution: 4000 rows of two tokens at p = 0.2 / 0.8
    many = torch.log(torch.tensor([[0.2, 0.8]])).repeat(4000, 1)
    tokens, _ = sample_rows(many, [1.0] * 4000, [1.0] * 4000, [0] * 4000, [None] * 4000)
    assert 0.77 < tokens.float().mean() < 0.83
    bad = torch.randn(3, 10)
    bad[1] = float("-inf")
    bad[2, 4] = float("nan")
    assert sample_rows(bad, [1.0] * 3, [1.0, 0.5, 1.0], [0] * 3, [None] * 3)[1].tolist() == [True, False, False]


def _run(engine, specs: list[dict]) -> list[tuple[list[int], str]]:
    """Submit requests (``specs``: SamplingParams fields plus ``constraint``), wait: (tokens, reason) of each."""
    from lorakit.generation import SamplingParams
    from lorakit.serve.engine import Request

    results, finished = [None] * len(specs), threading.Semaphore(0)
    jobs = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        constraint = spec.pop("constraint", None)

        def on_finish(reason, i=i):
            results[i] = reason
            finished.release()

        jobs.append(Request([1, 2, 3], None, SamplingParams(**spec), lambda token, info: True, on_finish,
                            constraint=constraint))
    for job in jobs:
        engine.submit(job)
    for _ in jobs:
        assert finished.acquire(timeout=60)
    return [(job.tokens, reason) for job, reason in zip(jobs, results)]


def test_engine_plain_rows_unchanged_beside_formatted_rows(monkeypatch):
    """Plain rows (greedy, seeded sampling with top-p, top-k) give the same tokens alone and beside formatted rows;
    the formatted rows are valid JSON; every step's sampled rows are drawn in one sample_rows call."""
    from lorakit.serve import engine as engine_module
    from lorakit.serve.structured import compile_format

    tokenizer = make_tokenizer()
    end = tokenizer.eos_token_id
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    grammar = compile_format(tokenizer, len(tokenizer), (end,), SCHEMA, "person")
    calls: list[int] = []
    original = engine_module.sample_rows

    def counted(logits, *args):
        calls.append(logits.shape[0])
        return original(logits, *args)

    monkeypatch.setattr(engine_module, "sample_rows", counted)
    engine = engine_module.Engine(model, threading.RLock(), max_batch=8, pad_id=tokenizer.pad_token_id)
    try:
        plain = [dict(max_new_tokens=24, stop_token_ids=(end,)),
                 dict(max_new_tokens=24, temperature=1.0, top_p=0.8, seed=3, stop_token_ids=(end,)),
                 dict(max_new_tokens=24, temperature=0.9, top_k=7, seed=4, stop_token_ids=(end,)),
                 dict(max_new_tokens=24, temperature=1.2, seed=5, stop_token_ids=(end,))]
        alone = _run(engine, plain)
        formatted = [dict(max_new_tokens=150, temperature=1.0, seed=s, stop_token_ids=(end,),
                          constraint=grammar.constraint()) for s in range(3)]
        calls.clear()
        beside = _run(engine, formatted + plain)
    finally:
        engine.close()
    assert beside[3:] == alone
    assert len({tuple(tokens) for tokens, _ in alone[1:]}) == 3  # sampled rows differ
    for tokens, reason in beside[:3]:
        assert reason == "stop"
        valid(json.loads(tokenizer.decode(tokens[:-1] if tokens[-1] == end else tokens)), SCHEMA)
    assert max(calls) == 6  # the 3 formatted and 3 sampled plain rows of a step drawn together


def test_choose_fails_a_nan_row_alone():
    from lorakit.generation import SamplingParams
    from lorakit.serve.engine import Engine, Request

    requests = [Request([1], None, SamplingParams(temperature=t, seed=1), lambda *a: True, lambda r: None)
                for t in (1.0, 1.0, 0.0)]
    for request in requests:
        request.generator = request.params.generator(torch.device("cpu"))
    logits = torch.randn(3, 50)
    logits[0, 7] = float("nan")
    tokens, errors = Engine._choose(requests, logits)
    assert errors[0] is not None and "sampling failed" in errors[0]
    assert errors[1] is None and errors[2] is None and tokens[2] == int(logits[2].argmax())


# -- constraint phases around a reasoning block -------------------------------------------------------------------
def test_phases_with_a_marker_of_several_tokens():
    """The test tokenizer writes ``<think>`` in several tokens: the first may open the block (beside the grammar's
    tokens), the rest are then forced one by one, and the block's text is free until :meth:`begin`."""
    from lorakit.serve.structured import compile_format

    tokenizer = make_tokenizer()
    opening = tuple(tokenizer("<think>", add_special_tokens=False)["input_ids"])
    assert len(opening) > 1
    grammar = compile_format(tokenizer, len(tokenizer), (tokenizer.eos_token_id,), OK_SCHEMA, "ok")
    logits = torch.zeros(len(tokenizer))
    constraint = grammar.constraint(opening=opening)
    assert constraint.phase == "choose"
    allowed = torch.isfinite(constraint.mask(logits)).nonzero().flatten().tolist()
    plain = torch.isfinite(grammar.constraint().mask(logits)).nonzero().flatten().tolist()
    assert sorted(allowed) == sorted(set(plain) | {opening[0]})
    assert constraint.take(opening[0]) and constraint.phase == "marker"
    for token in opening[1:]:
        assert torch.isfinite(constraint.mask(logits)).nonzero().flatten().tolist() == [token]
        assert constraint.take(token)
    assert constraint.waiting and not constraint.active and not constraint.done
    constraint.begin()
    text = '{"ok":true}'
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        assert torch.isfinite(constraint.mask(logits)[token]) and constraint.take(token)
    assert constraint.done
    # no block: the first token is the format's, fed to the matcher
    skipped = grammar.constraint(opening=opening)
    first = tokenizer("{", add_special_tokens=False)["input_ids"][0]
    assert skipped.take(first) and skipped.phase == "on" and not skipped.done
    # the prompt opened the block: wait from the start
    assert grammar.constraint(active=False).waiting


def _scripted(root: Path, name: str, moves: dict[str, dict[str, float]]) -> ServerProcess:
    """A server whose tiny Llama follows ``moves``: after token text ``a`` (``"PROMPT"``: the generation prompt's
    last token) the logit of each ``b`` in ``moves[a]`` is raised by about 56 x the weight (its attention and MLP
    outputs are zero, so each position sees only its own token; unlisted tokens stay near 0). Texts missing from
    the family's tokenizer are added as tokens."""
    from transformers import AutoTokenizer

    family(name).save_pretrained(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    words = {w for follow in moves.values() for w in follow} | (set(moves) - {"PROMPT"})
    tokenizer.add_tokens(sorted(w for w in words if w not in tokenizer.get_vocab()))
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = lambda word: prompt[-1] if word == "PROMPT" else tokenizer.convert_tokens_to_ids(word)  # noqa: E731
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.normal_(0, 0.02)
        for k, (word, follow) in enumerate(moves.items()):
            model.model.embed_tokens.weight[ids(word)] = torch.nn.functional.one_hot(torch.tensor(k), 32).float()
            for target, weight in follow.items():
                model.lm_head.weight[ids(target), k] += 10 * weight
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "adapters").mkdir()
    return ServerProcess(root / "model", root / "adapters", "--max-tokens", "40", log=root / "server.log")


def _chat(url: str, stream: bool = False, **extra) -> list[tuple[str | None, str | None, str]]:
    """(reasoning, content, finish_reason) of each choice, streamed (the deltas joined) or not."""
    body = {"model": "base", "messages": MESSAGES, "max_tokens": 20, **extra}
    if not stream:
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return [(c["message"].get("reasoning_content"), c["message"]["content"], c["finish_reason"])
                for c in response.json()["choices"]]
    parts: dict[int, list] = {}
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                entry = parts.setdefault(choice["index"], [None, None, None])
                for key, slot in (("reasoning_content", 0), ("content", 1)):
                    piece = choice["delta"].get(key)
                    if piece:
                        entry[slot] = (entry[slot] or "") + piece
                entry[2] = choice.get("finish_reason") or entry[2]
    return [tuple(parts[i]) for i in sorted(parts)]


def test_thinking_mode_block_never_opened_or_never_closed(tmp_path):
    """Qwen3's thinking mode (the model may open the block): this model writes ``<think>`` or ``{`` first, as
    likely; after ``<think>`` it thinks forever (" hmm" ...), after ``{`` it writes noise. Plain, the answers are
    noise or cut reasoning. With a format, each answer is either cut reasoning (finish "length", content None) or,
    the block never opened, valid JSON from its first token (before, such an answer was not constrained)."""
    process = _scripted(tmp_path, "qwen3", {"PROMPT": {"<think>": 1.0, "{": 1.0}, "<think>": {" hmm": 1.0},
                                            " hmm": {" hmm": 1.0}})
    try:
        plain = _chat(process.url, n=8, seed=0, temperature=1.0)
        assert any(content is None and reasoning.startswith("hmm hmm") for reasoning, content, _ in plain)
        noise = [content for _, content, _ in plain if content is not None]
        assert noise and all(text.startswith("{") for text in noise)
        with pytest.raises(ValueError):
            [json.loads(text) for text in noise]
        for stream in (False, True):
            for extra in ({"response_format": OK_FORMAT}, {"structured_outputs": {"json": OK_SCHEMA}},
                          {"guided_json": OK_SCHEMA}):
                answers = _chat(process.url, stream, n=8, seed=0, temperature=1.0, **extra)
                kinds = set()
                for reasoning, content, reason in answers:
                    if content is None:  # the block never closed: all reasoning, cut by max_tokens
                        assert reason == "length" and reasoning.startswith("hmm hmm")
                        kinds.add("thinking")
                    else:  # never opened: formatted from the first token
                        assert reasoning is None and reason == "stop"
                        assert json.loads(content) in ({"ok": True}, {"ok": False})
                        kinds.add("answer")
                assert kinds == {"thinking", "answer"}, answers
        assert "Traceback" not in process.output()
    finally:
        process.stop()


def test_block_opened_by_the_prompt(tmp_path):
    """DeepSeek-R1's generation prompt ends with ``<think>\\n``: the reasoning is free, the content after
    ``</think>`` follows the format (the model's own answer is no JSON); cut inside the block, the answer is all
    reasoning with finish reason "length"."""
    words = ["I need the weather.", "</think>", "\n\n", "It is sunny.", "<｜end▁of▁sentence｜>"]
    moves = {"PROMPT": {words[0]: 1.0}, **{a: {b: 1.0} for a, b in zip(words, words[1:])}}
    process = _scripted(tmp_path, "deepseek-r1", moves)
    try:
        assert _chat(process.url, temperature=0) == [("I need the weather.", "It is sunny.", "stop")]
        for stream in (False, True):
            for extra in ({"response_format": OK_FORMAT}, {"guided_json": json.dumps(OK_SCHEMA)}):
                [(reasoning, content, reason)] = _chat(process.url, stream, temperature=0, **extra)
                assert reasoning == "I need the weather." and reason == "stop"
                assert json.loads(content) in ({"ok": True}, {"ok": False})
            assert _chat(process.url, stream, temperature=0, max_tokens=1, response_format=OK_FORMAT) == \
                [("I need the weather.", None, "length")]
    finally:
        process.stop()


# -- vLLM's guided_* fields ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("guided")
    tiny_hf_folder(root / "model")
    (root / "adapters").mkdir()
    process = ServerProcess(root / "model", root / "adapters", "--max-tokens", "160", log=root / "server.log")
    try:
        yield {"url": process.url, "sdk": openai.OpenAI(base_url=process.url + "/v1", api_key="x", max_retries=0),
               "process": process}
    finally:
        process.stop()


def test_guided_fields(server):
    """vLLM's older fields on chat and completions (extra_body), each mapped onto the format structured_outputs
    names the same way: the same seed gives the same answer through either field."""
    sdk = server["sdk"]

    def chat(seed: int, **fields) -> str:
        choice = sdk.chat.completions.create(model="base", messages=MESSAGES, max_tokens=150, seed=seed,
                                             temperature=1.0, extra_body=fields).choices[0]
        assert choice.finish_reason == "stop", choice
        return choice.message.content

    for seed in range(2):
        text = chat(seed, guided_json=SCHEMA)
        valid(json.loads(text), SCHEMA)
        assert chat(seed, guided_json=json.dumps(SCHEMA), guided_decoding_backend="xgrammar") == text
        assert chat(seed, structured_outputs={"json": SCHEMA}) == text
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", chat(seed, guided_regex=r"[0-9]{3}-[a-z]{2,5}"))
        said = chat(seed, guided_grammar='start: "yes" | "no" | "n=" NUM\nNUM: /[0-9]{1,3}/',
                    guided_decoding_backend="guidance")
        assert said in ("yes", "no") or re.fullmatch(r"n=[0-9]{1,3}", said)
    colors = ["red", "green", "dark blue"]
    assert {chat(seed, guided_choice=colors) for seed in range(5)} <= set(colors)
    completion = sdk.completions.create(model="base", prompt="Pick:", max_tokens=20, temperature=0,
                                        extra_body={"guided_choice": colors}).choices[0]
    assert completion.text in colors and completion.finish_reason == "stop"
    completion = sdk.completions.create(model="base", prompt="A person:", max_tokens=150, temperature=1.0, seed=2,
                                        extra_body={"guided_json": SCHEMA}).choices[0]
    valid(json.loads(completion.text), SCHEMA)


def _between_tokens(text: str) -> list[str]:
    """The runs of whitespace of a JSON text outside its strings."""
    runs, inside, escaped, last = [], False, False, None
    for at, char in enumerate(text):
        if inside:
            inside, escaped = (escaped or char != '"'), (not escaped and char == "\\")
        elif char == '"':
            inside = True
        elif char.isspace():
            if last == at - 1:
                runs[-1] += char
            else:
                runs.append(char)
            last = at
    return runs


def test_whitespace_pattern(server):
    """guided_whitespace_pattern (and structured_outputs' whitespace_pattern): the JSON may hold that whitespace
    between its tokens (none without it). A random model picks a space where one is allowed often enough that some
    of six sampled answers hold one; every answer stays valid."""
    sdk = server["sdk"]
    response = sdk.chat.completions.create(model="base", messages=MESSAGES, max_tokens=150, n=6, seed=0,
                                           temperature=1.0, response_format=FORMAT,
                                           extra_body={"guided_whitespace_pattern": "[ ]{0,2}"})
    texts = [c.message.content for c in response.choices if c.finish_reason == "stop"]
    assert len(texts) >= 4
    for text in texts:
        valid(json.loads(text), SCHEMA)
        assert all(run in (" ", "  ") for run in _between_tokens(text))
    assert any(_between_tokens(text) for text in texts), texts
    compact = sdk.chat.completions.create(model="base", messages=MESSAGES, max_tokens=150, n=6, seed=0,
                                          temperature=1.0, response_format=FORMAT)
    assert not any(_between_tokens(c.message.content) for c in compact.choices)
    again = sdk.chat.completions.create(model="base", messages=MESSAGES, max_tokens=150, n=6, seed=0,
                                        temperature=1.0, extra_body={"structured_outputs": {
                                            "json": SCHEMA, "whitespace_pattern": "[ ]{0,2}"}})
    assert [c.message.content for c in again.choices if c.finish_reason == "stop"] == texts


@pytest.mark.parametrize("fields, words, param", [
    ({"guided_json": SCHEMA, "guided_regex": "a"}, "send guided_json or guided_regex, not both", "guided_regex"),
    ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "response_format or guided_choice",
     "guided_choice"),
    ({"structured_outputs": {"regex": "a"}, "guided_grammar": "start: \"a\"", "guided_json": {}},
     "one of structured_outputs, guided_json, guided_grammar, not several", "guided_json"),
    ({"guided_json": "{not json"}, "guided_json is not JSON", "guided_json"),
    ({"guided_json": "[1]"}, "guided_json must be a JSON schema", "guided_json"),
    ({"guided_regex": "(?=a)b"}, "guided_regex: the regex cannot be used", "guided_regex"),
    ({"guided_grammar": "start: nowhere"}, "nowhere", "guided_grammar"),
    ({"guided_choice": []}, "guided_choice", "guided_choice"),
    ({"guided_choice": ["a", 1]}, "guided_choice", "guided_choice.1"),
    ({"guided_decoding_backend": "xgramar"}, "not one of vLLM's", "guided_decoding_backend"),
    ({"guided_whitespace_pattern": " "}, "applies to a JSON format", "guided_whitespace_pattern"),
    ({"guided_regex": "a+", "guided_whitespace_pattern": " "}, "applies to a JSON format", "guided_whitespace_pattern"),
    ({"guided_json": {}, "guided_whitespace_pattern": "(("}, "unclosed group", "guided_json"),
    ({"structured_outputs": {"json": {}, "whitespace_pattern": " "}, "guided_whitespace_pattern": " "},
     "send the whitespace pattern once", "guided_whitespace_pattern"),
])
def test_bad_guided_fields_are_one_line_400s(server, fields, words, param):
    for path, body in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "x"})):
        response = httpx.post(server["url"] + path, timeout=30, json={"model": "base", "max_tokens": 5, **body,
                                                                      **fields})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert words in error["message"] and "\n" not in error["message"], error
        assert error["param"] == param, error


def test_sdk_parse_and_stream_still_work(server):
    """The openai package's chat.completions.parse with a pydantic model, and a streamed guided_json answer whose
    pieces add up to the non-streamed one."""
    from typing import Literal

    from pydantic import BaseModel

    class Answer(BaseModel):
        ok: bool
        color: Literal["red", "green"]

    sdk = server["sdk"]
    parsed = sdk.chat.completions.parse(model="base", messages=MESSAGES, response_format=Answer, max_tokens=60,
                                        temperature=1.0, seed=4)
    assert isinstance(parsed.choices[0].message.parsed, Answer)
    whole = sdk.chat.completions.create(model="base", messages=MESSAGES, max_tokens=150, temperature=1.0, seed=5,
                                        extra_body={"guided_json": SCHEMA}).choices[0].message.content
    pieces = [chunk.choices[0].delta.content or "" for chunk in sdk.chat.completions.create(
        model="base", messages=MESSAGES, max_tokens=150, temperature=1.0, seed=5, stream=True,
        extra_body={"guided_json": SCHEMA}) if chunk.choices]
    assert len([p for p in pieces if p]) > 3 and "".join(pieces) == whole
    valid(json.loads(whole), SCHEMA)
    assert "Traceback" not in server["process"].output()
