"""Training-data chat rendering, sixteenth audit: long chats whose template rewrites earlier turns, in linear time.

Templates that rewrite earlier turns (Qwen3 drops the reasoning of the turns before the last user query, Mistral
v0.3 writes the tools and the system prompt into the last user turn, DeepSeek-R1's generation prompt opens a
``<think>`` block its turns lack, Hermes closes the last tool result differently) train a chat as one example per
assistant turn; each turn rendered two prefixes of the chat (lorakit/train/chat_turns.py) and each example was
tokenized alone, both O(n^2) in the chat's messages. Measured on this shared 2-core machine (``tokenize_examples``,
max_length 10**7), before / after: 1,001 messages 53 / 2.8 s (Qwen3 with reasoning), 35 / 2.1 s (Mistral v0.3 with
tools), 31 / 1.3 s (DeepSeek-R1); 2,001 messages 450 / 6.8 s, 437 / 5.0 s, 393 / 3.5 s (its 1,000 examples hold 25,
18 and 19 million tokens: the output itself grows as n^2). The renders are now read from short windows
(lorakit/train/chat_rewrites.py) and each example reuses the tokens of the one before up to a special token they share
(lorakit/train/chat_tokens.py).

Every test compares with the exact renders and tokenizing each example alone (``MIN_MESSAGES`` and
``MIN_EXAMPLES`` raised) token for token and label for label, and checks which path was taken.
"""

from __future__ import annotations

import json
import random
import time
import warnings

import pytest

from lorakit.errors import LorakitError
from lorakit.train import chat_prefix, chat_rewrites, chat_tokens, chat_turns, data
from lorakit.train.data import build_dataset, tokenize_examples
from test_followups_15_data import FAMILY_TOOLS, long_chat, tokenizer
from test_serve_support import CHATML
from test_train_tool_calls import CHATML_SPECIALS, build_tokenizer


def tokenized(record: dict, tok, max_length: int = 10**6, **kwargs):
    """(input_ids, labels) of each example, or the error's text."""
    try:
        return [(ex["input_ids"], ex["labels"]) for ex in tokenize_examples(record, tok, max_length, **kwargs)]
    except LorakitError as error:
        return str(error)


def new_and_exact(record: dict, tok, monkeypatch, **kwargs) -> tuple[object, object, list, list]:
    """The examples the new way, with what :func:`rewritten_renders` and :func:`shared_tokens` returned (None: not
    taken) for each call, and the exact way (every prefix rendered, every example tokenized alone)."""
    renders: list = []
    tokens: list = []

    def spy(real, out):
        def call(*args):
            out.append(real(*args))
            return out[-1]
        return call

    monkeypatch.setattr(chat_turns, "rewritten_renders", spy(chat_rewrites.rewritten_renders, renders))
    monkeypatch.setattr(data, "shared_tokens", spy(chat_tokens.shared_tokens, tokens))
    new = tokenized(record, tok, **kwargs)
    monkeypatch.undo()
    monkeypatch.setattr(chat_prefix, "MIN_MESSAGES", 10**9)  # both windowed paths read it
    monkeypatch.setattr(chat_tokens, "MIN_EXAMPLES", 10**9)
    exact = tokenized(record, tok, **kwargs)
    monkeypatch.undo()
    return new, exact, renders, tokens


# ------------------------------------------------------------------------------------------------------------------
# random chats: turn counts, tool calls (parallel too), reasoning, system prompts, weight-0 answers
# ------------------------------------------------------------------------------------------------------------------


NO_CALLS = ("gemma3", "deepseek-r1")  # no tools section; R1's writes one call turn per chat (test_train_tool_calls)


def random_chat(rng: random.Random, family: str) -> dict:
    """A chat of 32-90 messages as users bring them for ``family``: questions answered directly or after 1-3 turns of
    tool calls (1-2 calls each, with their results; not :data:`NO_CALLS`); reasoning on some turns (Qwen3: ``reasoning_content`` or
    ``<think>`` in the content; DeepSeek-R1: every turn, which its prompt asks for); a system prompt or not."""
    messages = [{"role": "system", "content": rng.choice(["Be brief.", "You are a weather bot."])}] \
        if rng.random() < 0.6 else []
    count = 0

    def reasoning(answer: dict, text: str) -> dict:
        if family == "deepseek-r1" or (family == "qwen3" and rng.random() < 0.5):
            if family == "qwen3" and rng.random() < 0.5:
                answer["reasoning_content"] = text
            else:
                answer["content"] = f"<think>\n{text}\n</think>\n\n{answer['content'] or ''}"
        return answer

    while len(messages) < rng.randint(32, 90):
        q = len(messages)
        messages.append({"role": "user", "content": f"Question {q}: weather in city {rng.randint(0, 99)}?"})
        for step in range(rng.choice([0, 0, 1, 2, 3]) if family not in NO_CALLS else 0):
            calls = []
            for _ in range(rng.choice([1, 1, 2])):
                count += 1
                calls.append({"id": f"call{count:05d}", "type": "function", "function": {
                    "name": "get_weather", "arguments": json.dumps({"city": f"c{q}", "day": str(step)})}})
            messages.append(reasoning({"role": "assistant", "content": None, "tool_calls": calls}, f"Look up {q}."))
            messages += [{"role": "tool", "tool_call_id": call["id"], "content": f'{{"temp": {q + step}}}'}
                         for call in calls]
        answer = reasoning({"role": "assistant", "content": f"Mild, {q} degrees."}, f"The tool said {q}.")
        if rng.random() < 0.1:
            answer["weight"] = 0
        messages.append(answer)
    return {"tools": FAMILY_TOOLS, "messages": messages} if family not in NO_CALLS else {"messages": messages}


@pytest.mark.parametrize("family", ["qwen3", "mistral", "deepseek-r1", "hermes", "gemma3"])
def test_random_long_chats_give_the_tokens_and_labels_of_the_exact_renders(family, monkeypatch):
    """Six random chats per family: the same examples (or the same error) both ways; the windows and the shared
    tokens are taken for every chat that trains per turn (Gemma 3 is a prefix template: one example, chat_prefix's
    windows)."""
    tok = tokenizer(family)
    rng = random.Random(f"16-{family}")
    per_turn = 0
    for _ in range(6):
        record = random_chat(rng, family)
        if family == "mistral" and rng.random() < 0.5:  # Mistral v0.3 also without tools (the system prompt moves)
            record.pop("tools")
        new, exact, renders, tokens = new_and_exact(record, tok, monkeypatch)
        assert new == exact, family
        assert isinstance(new, list) and new, new
        if len(new) > 1:
            per_turn += 1
            assert renders and all(r is not None for r in renders), family
            assert tokens and all(t is not None for t in tokens), family
    # Mistral without tools or system prompt is a prefix template: one example, chat_prefix's windows
    assert per_turn == 0 if family == "gemma3" else per_turn >= 4, per_turn


def agent_chat(steps: list[int], reasoning: bool) -> dict:
    """A system prompt, then per entry of ``steps`` a question, that many turns of a tool call and its result, and
    the answer; each assistant turn with ``reasoning_content`` when ``reasoning``."""
    messages, count = [{"role": "system", "content": "Look the weather up."}], 0
    for q, calls in enumerate(steps):
        messages.append({"role": "user", "content": f"Weather in city {q}?"})
        for step in range(calls):
            count += 1
            call = {"id": f"call{count:05d}", "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"city": f"c{q}", "day": str(step)})}}
            messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": call["id"], "content": f'{{"temp": {step}}}'}]
        messages.append({"role": "assistant", "content": f"Mild in city {q}."})
    for message in messages:
        if reasoning and message["role"] == "assistant":
            message["reasoning_content"] = f"Step {len(message)}."
    return {"tools": FAMILY_TOOLS, "messages": messages}


@pytest.mark.parametrize("family", ["qwen3", "mistral", "hermes"])
def test_several_questions_each_with_a_long_tool_chain(family, monkeypatch):
    """A new question rewrites back to the one before it (Qwen3 drops all the reasoning since, Mistral moves the tool
    list from it), further back than a window of a few messages: the windows of a chain that a question arrives in
    hold everything since the last one (before, the edits were wrong, a check failed, and the chat took the exact
    renders)."""
    tok = tokenizer(family)
    for steps in ([12, 2, 20, 3], [3] * 8):
        new, exact, renders, tokens = new_and_exact(agent_chat(steps, family == "qwen3"), tok, monkeypatch)
        assert new == exact and isinstance(new, list) and len(new) > 1
        assert renders and all(r is not None for r in renders), (family, steps)


def test_template_options_and_weight_zero_turns(monkeypatch):
    """Qwen3 with enable_thinking=False (its prompt closes the <think> block: chats without reasoning train, chats
    with it fail with the same error both ways) and a chat whose first and last answers are not learnt."""
    qwen3 = tokenizer("qwen3")
    options = {"chat_template_kwargs": {"enable_thinking": False}}
    new, exact, renders, _ = new_and_exact(long_chat(25), qwen3, monkeypatch, **options)
    assert new == exact and isinstance(new, list) and len(new) > 1 and all(renders)
    new, exact, _, _ = new_and_exact(long_chat(25, reasoning=True), qwen3, monkeypatch, **options)
    assert new == exact and isinstance(new, str) and "closes the <think> block" in new
    record = long_chat(25, reasoning=True)
    record["messages"][2]["weight"] = record["messages"][-1]["weight"] = 0
    new, exact, renders, tokens = new_and_exact(record, qwen3, monkeypatch)
    assert new == exact and len(new) == 23 and all(renders) and all(tokens)


# ------------------------------------------------------------------------------------------------------------------
# the checks: a template the windows get wrong is rendered exactly
# ------------------------------------------------------------------------------------------------------------------

# ChatML whose generation prompt changes once the chat is long (a space after the header, which a turn is still
# located after), so a (short) window writes it differently; it is never in the whole chat: only the spot renders
# see it
COUNTING = CHATML.replace("{% if add_generation_prompt %}<|im_start|>assistant\n",
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{{ ' ' if messages | length > 24 }}")
# ChatML that numbers the assistant turns; earlier ones drop their number (so a chat trains per turn), the last keeps
# it: a window numbers from its own start, which the whole chat shows
NUMBERED = CHATML.replace("{{ message['content'] }}", "{% if message['role'] == 'assistant' and loop.last %}"
                          "[{{ loop.index }}] {% endif %}{{ message['content'] }}")


@pytest.mark.parametrize("template", [COUNTING, NUMBERED])
def test_templates_the_windows_get_wrong_take_the_exact_renders(template, monkeypatch):
    """Both templates fail a check (the spot renders; the whole chat), so the chat renders exactly, with the same
    examples; without the spot renders the counting template's examples would be wrong, which shows they matter."""
    assert template != CHATML
    tok = build_tokenizer(template, CHATML_SPECIALS, None, "<|im_end|>", "<|endoftext|>")
    record = long_chat(40)
    new, exact, renders, _ = new_and_exact(record, tok, monkeypatch)
    assert new == exact and isinstance(new, list) and len(new) > 1
    assert renders == [None]
    if template is COUNTING:
        monkeypatch.setattr(chat_prefix, "spot_turns", lambda count: [])
        assert tokenized(record, tok) != exact


def test_a_long_chat_that_takes_the_exact_renders_says_so(monkeypatch):
    """A chat whose exact renders would take a while (their number lowered here) warns, in one line, why the record
    takes long and what to do; one the windows render does not."""
    monkeypatch.setattr(chat_turns, "SLOW_RENDERS", 1000)
    numbered = build_tokenizer(NUMBERED, CHATML_SPECIALS, None, "<|im_end|>", "<|endoftext|>")
    with pytest.warns(UserWarning) as caught:
        assert len(tokenize_examples(long_chat(40), numbered, 10**6)) == 40
    (warning,) = [str(w.message) for w in caught]
    assert warning.startswith("<record>: this chat of 81 messages is rendered prefix by prefix, once per assistant "
                              "turn (40), which takes time growing with the square of its length") and \
        warning.endswith("split it into shorter chats if this is too slow") and "\n" not in warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(tokenize_examples(long_chat(40, reasoning=True), tokenizer("qwen3"), 10**6)) == 40


def test_shared_tokens_are_checked_against_tokenizing_alone(monkeypatch):
    """A tokenizer whose tokens before a special token depend on what follows it (simulated: each text's ids end with
    its length) fails the spot check, and every example is then tokenized alone."""
    tok = tokenizer("qwen3")
    examples = chat_turns.chat_examples(  # the per-turn examples of a Qwen3 chat with reasoning
        long_chat(30, reasoning=True)["messages"], list(range(2, 61, 2)),
        lambda msgs, prompt: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt), "chat",
        lambda i, text: None)[0]
    assert len(examples) == 30
    shared = chat_tokens.shared_tokens(examples, tok)
    alone = [data._tokenize_with_spans(text, spans, tok, data.tokenizer_info(tok)) for text, spans in examples]
    assert shared == alone

    class Marking:  # the tokenizer, but the ids of a whole text (not of a piece from a special token on) end marked
        all_special_ids = tok.all_special_ids

        def __call__(self, text, **kwargs):
            out = tok(text, **kwargs)
            if text.startswith("<|im_start|>system"):
                out["input_ids"] = out["input_ids"][:-1] + [len(text)]
            return out

    assert chat_tokens.shared_tokens(examples, Marking()) is None

    class Counting:  # the tokenizer, counting the characters it is given
        all_special_ids, added_tokens_decoder = tok.all_special_ids, tok.added_tokens_decoder

        def __call__(self, text, **kwargs):
            given.append(len(text))
            return tok(text, **kwargs)

    given: list = []
    assert chat_tokens.shared_tokens(examples, Counting()) == alone
    # the tails (a turn or two each), the first example and the spot checks (a third, two thirds and all of the
    # chat): linear in the chat, where tokenizing each example alone is quadratic (15x the last example here)
    assert sum(given) < 5 * len(examples[-1][0]) < sum(len(text) for text, _ in examples) / 2.5, given


# ------------------------------------------------------------------------------------------------------------------
# linear time
# ------------------------------------------------------------------------------------------------------------------


def mistral_with_tools(turns: int) -> dict:
    record = long_chat(turns, system=False)
    record["tools"] = FAMILY_TOOLS
    return record


@pytest.mark.parametrize("family,chat", [("qwen3", lambda turns: long_chat(turns, reasoning=True)),
                                         ("mistral", mistral_with_tools)])
def test_a_two_thousand_message_chat_is_linear(family, chat):
    """2,001 messages take well under what the exact renders took for 1,001 (53 s and 35 s on this machine; 2,001:
    450 s and 437 s), and about 4x what 501 take (16x if quadratic); generous bounds for a loaded machine."""
    tok = tokenizer(family)
    took = {}
    for turns in (250, 1000):
        start = time.perf_counter()
        examples = tokenize_examples(chat(turns), tok, 4096)
        took[turns] = time.perf_counter() - start
        assert len(examples) > 50 and all(len(ex["input_ids"]) <= 4096 for ex in examples)
    assert took[1000] < 9 * took[250] + 1.0, took
    assert took[1000] < 40, took


def test_build_dataset_counts_a_long_per_turn_chat_in_linear_time():
    """build_dataset's summary counted the supervised tokens of each example in a Python loop (25 million tokens for
    a 2,001-message per-turn chat); the counts are what the examples hold."""
    tok = tokenizer("qwen3")
    ds = build_dataset([long_chat(300, reasoning=True)], tok, 10**5)
    assert ds.summary.examples == len(ds.rows) == 300 and ds.summary.per_turn_chats == 1
    assert ds.summary.supervised_tokens == sum(sum(lab != -100 for lab in row["labels"]) for row in ds.rows)
    assert ds.summary.tokens == sum(len(row["input_ids"]) for row in ds.rows)
