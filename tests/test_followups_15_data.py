"""Training data rendering, fifteenth audit (lorakit/train/data.py, formats.py, sources.py, chat_prefix.py).

1. Long chats rendered in linear time (lorakit/train/chat_prefix.py): every assistant turn was located by rendering
   two growing prefixes of the chat, O(n^2) in its messages (a 2,000-message ChatML chat took 12 s). Each test
   here compares the new spans with the exact renders (``MIN_MESSAGES`` raised so that no chat takes the new path)
   token for token and label for label, on many templates, and checks which path was taken.
"""

from __future__ import annotations

import time

import pytest

from lorakit.errors import LorakitError
from lorakit.train import chat_prefix, chat_turns
from lorakit.train.data import tokenize_examples
from test_serve_support import CHATML, make_tokenizer
from test_train_tool_calls import FAMILIES, build_tokenizer, family

# ------------------------------------------------------------------------------------------------------------------
# templates beyond the tool-call families of test_train_tool_calls
# ------------------------------------------------------------------------------------------------------------------

GEMMA3 = (  # Gemma 3's, string contents only: the system prompt goes into the first user turn; roles must alternate
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + "
    "'\\n\\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}")
LLAMA2 = (  # Llama 2's: <<SYS>> inside the first [INST], no generation prompt, alternation enforced by parity
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
MISTRAL_V1 = (  # Mistral 7B v0.1's [INST] template (no system turn)
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}")
ROUNDS = (  # ChatGLM2-like: numbers the rounds, so a window of the chat numbers them differently
    "{% for m in messages %}{% if m['role'] == 'user' %}[Round {{ loop.index0 // 2 + 1 }}]\n\nQ: {{ m['content'] }}"
    "\n\n{% else %}A: {{ m['content'] }}<|im_end|>\n\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
DEFAULT_SYSTEM = (  # a ChatML template that writes a system prompt of its own when the chat has none
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

GEMMA2 = (  # Gemma 2's: refuses any system turn
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}" + GEMMA3.split("{%- endif -%}", 1)[1].replace("(first_user_prefix if loop.first else '')", "''")
    .replace("loop_messages", "messages"))

ZEPHYR = (  # HuggingFaceH4/zephyr-7b-beta's: <|user|> is text on Mistral's tokenizer; each turn ends with </s>
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}")

EXTRA = {  # name: (template, special tokens, bos added by the tokenizer or None, eos, pad)
    "gemma2": (GEMMA2, ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<end_of_turn>",
               "<pad>"),
    "gemma3": (GEMMA3, ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<end_of_turn>",
               "<pad>"),
    "llama2": (LLAMA2, ("<unk>", "<s>", "</s>"), "<s>", "</s>", "<unk>"),
    "mistral-v0.1": (MISTRAL_V1, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>", "<unk>"),
    "rounds": (ROUNDS, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", "<|endoftext|>"),
    "chatml-on-llama2": (CHATML, ("<unk>", "<s>", "</s>"), "<s>", "</s>", "<unk>"),  # a template without its tokens
    "zephyr": (ZEPHYR, ("<unk>", "<s>", "</s>"), "<s>", "</s>", "<unk>"),  # role markup that is text by design
    "default-system": (DEFAULT_SYSTEM, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>",
                       "<|endoftext|>"),
}
_BUILT: dict = {}


def tokenizer(name: str):
    """The tokenizer of a family of test_train_tool_calls, of :data:`EXTRA`, or "chatml" (the serve tests' one)."""
    if name in FAMILIES:
        return family(name)
    if name == "chatml":
        return _BUILT.setdefault(name, make_tokenizer())
    if name not in _BUILT:
        _BUILT[name] = build_tokenizer(*EXTRA[name])
    return _BUILT[name]


# ------------------------------------------------------------------------------------------------------------------
# 1. long chats in linear time, token for token as the exact renders
# ------------------------------------------------------------------------------------------------------------------


def long_chat(turns: int, system: bool = True, weight_zero: bool = False, reasoning: bool = False) -> dict:
    """``turns`` questions and answers (2 * turns messages, plus a system turn); every fifth answer has weight 0 when
    ``weight_zero``; answers carry ``reasoning_content`` when ``reasoning``."""
    messages = [{"role": "system", "content": "Be brief."}] if system else []
    for k in range(turns):
        messages.append({"role": "user", "content": f"Question {k}: what is {k} + {k}?"})
        answer = {"role": "assistant", "content": f"It is {2 * k}."}
        if weight_zero and k % 5 == 2:
            answer["weight"] = 0
        if reasoning:
            answer["reasoning_content"] = f"Adding {k} twice."
        messages.append(answer)
    return {"messages": messages}


def agent_trace(calls: int, system: bool = True, cities: tuple = ("Paris",)) -> dict:
    """One question, then ``calls`` turns of tool calls (one per city, in parallel) each with their results, then the
    answer: an agent's long trace."""
    messages = [{"role": "system", "content": "You are a weather bot."}] if system else []
    messages.append({"role": "user", "content": "Weather in Paris, day by day?"})
    for k in range(calls):
        ids = [f"call{k:04d}{c}" for c in range(len(cities))]  # 9 characters: Mistral's template wants them
        messages.append({"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": city, "day": str(k)}}}
                         for call_id, city in zip(ids, cities)]})
        messages += [{"role": "tool", "tool_call_id": call_id, "content": f'{{"temp": {k}}}'} for call_id in ids]
    messages.append({"role": "assistant", "content": "It was mild all week."})
    return {"tools": FAMILY_TOOLS, "messages": messages}


FAMILY_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "day": {"type": "string"}}, "required": ["city"]}}}]


def tokenized(record: dict, tok, **kwargs):
    """(input_ids, labels) of each example, or the error's text."""
    try:
        return [(ex["input_ids"], ex["labels"]) for ex in tokenize_examples(record, tok, 10**6, **kwargs)]
    except LorakitError as error:
        return str(error)


def new_and_exact(record: dict, tok, monkeypatch, **kwargs) -> tuple[object, object, list]:
    """The examples with the windows (and what :func:`prefix_spans` returned for each chat) and with the exact
    renders only."""
    taken: list = []
    real = chat_prefix.prefix_spans

    def spy(*args):
        taken.append(real(*args))
        return taken[-1]

    monkeypatch.setattr(chat_turns, "prefix_spans", spy)
    new = tokenized(record, tok, **kwargs)
    monkeypatch.undo()
    monkeypatch.setattr(chat_prefix, "MIN_MESSAGES", 10**9)
    exact = tokenized(record, tok, **kwargs)
    monkeypatch.undo()
    return new, exact, taken


# templates that render a prefix of a chat as a prefix of it: the windows must be taken (and agree)
PREFIX = ["chatml", "llama3.1", "qwen2.5", "hermes", "gemma2", "gemma3", "llama2", "mistral-v0.1", "default-system",
          "deepseek-v3.1"]
NO_SYSTEM = ("mistral-v0.1", "rounds", "gemma2")  # templates that take no system turn


@pytest.mark.parametrize("name", PREFIX + ["qwen3", "mistral", "rounds", "deepseek-r1"])
def test_long_chats_give_the_tokens_and_labels_of_the_exact_renders(name, monkeypatch):
    """A 41-turn chat (and one with weight-0 answers) tokenizes identically; prefix templates take the windows,
    while Qwen3 (rewrites earlier turns), Mistral v0.3 with a system prompt (writes it into the last user turn only)
    and a template that numbers rounds fall back to the exact renders."""
    tok = tokenizer(name)
    for system in (False, True) if name == "mistral" else (name not in NO_SYSTEM,):
        for record in (long_chat(41, system=system), long_chat(41, system=system, weight_zero=True)):
            new, exact, taken = new_and_exact(record, tok, monkeypatch)
            assert new == exact
            if name == "deepseek-r1":  # its prompt opens <think>, and these answers have no reasoning
                assert "starts each answer with '<think>" in new
                continue
            assert isinstance(new, list) and new, new
            windows = [spans is not None for spans in taken]
            if name in PREFIX or (name == "mistral" and not system):
                assert windows and all(windows), name
                assert len(new) == 1  # one example per chat, as before
            elif name in ("qwen3", "rounds", "mistral"):
                assert not any(windows), name


@pytest.mark.parametrize("name", ["llama3.1", "qwen2.5", "hermes", "mistral", "qwen3", "deepseek-v3.1",
                                  "deepseek-r1"])
def test_long_agent_traces_with_tool_calls(name, monkeypatch):
    """30 tool calls and their results after one question: the same examples (or the same error) both ways; the
    tool-call variants (JSON-text arguments, null content) go through the windows too."""
    tok = tokenizer(name)
    record = agent_trace(30, system=name != "mistral")
    new, exact, taken = new_and_exact(record, tok, monkeypatch)
    assert new == exact
    if name in ("llama3.1", "qwen2.5", "mistral"):  # Hermes closes the last tool result differently: per turn
        assert isinstance(new, list) and any(spans is not None for spans in taken), name
    if name in ("qwen2.5", "mistral", "deepseek-v3.1"):  # two calls at once, two results in a row (Llama 3.1: one)
        new, exact, taken = new_and_exact(agent_trace(20, system=False, cities=("Paris", "Rome")), tok, monkeypatch)
        assert new == exact
        if name == "qwen2.5":  # its user turn of tool results closes after the last: no target ends inside it
            assert len(new) == 1 and any(spans is not None for spans in taken)


def test_reasoning_chats_and_template_options(monkeypatch):
    """Qwen3 with reasoning_content (one example per turn) and with enable_thinking=False (whose prompt closes the
    <think> block: the same error both ways), and a DeepSeek-V3.1 chat with the thinking option."""
    qwen3 = tokenizer("qwen3")
    new, exact, _ = new_and_exact(long_chat(20, reasoning=True), qwen3, monkeypatch)
    assert new == exact and isinstance(new, list) and len(new) > 1
    new, exact, _ = new_and_exact(long_chat(20, reasoning=True), qwen3, monkeypatch,
                                  chat_template_kwargs={"enable_thinking": False})
    assert new == exact and isinstance(new, str) and "closes the <think> block" in new
    new, exact, _ = new_and_exact(long_chat(20), qwen3, monkeypatch, chat_template_kwargs={"enable_thinking": False})
    assert new == exact and isinstance(new, list)
    deepseek = tokenizer("deepseek-v3.1")
    new, exact, _ = new_and_exact(long_chat(20), deepseek, monkeypatch, chat_template_kwargs={"thinking": True})
    assert new == exact and isinstance(new, list)


def test_a_one_turn_chat_renders_twice_not_three_times(monkeypatch):
    """The chat through its last (trimmed: assistant) turn is the whole chat: it was rendered again for every record,
    a third of the renders of a dataset of one-turn chats (5,000 ChatML records: 1.02 -> 0.81 ms each)."""
    from lorakit.train.data import tokenizer_info

    tok = make_tokenizer()
    info = tokenizer_info(tok)  # its end-of-turn probe renders two chats of its own
    calls = []
    real = type(tok).apply_chat_template

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("add_generation_prompt", False))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "apply_chat_template", counted)
    (example,) = tokenize_examples(chat_saying("Hi", "Hello."), tok, 64, info=info)
    assert sorted(calls) == [False, True], calls  # the whole chat, and the prompt of its answer
    assert tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]) == \
        "Hello.<|im_end|>"


def test_a_thousand_turn_chat_is_linear():
    """Measured on this (shared, 2-core) machine before the change: ChatML 201 / 1,001 / 2,001 messages 0.09 / 2.1 /
    12.3 s, Llama 3.1 0.12 / 5.6 / 21.5 s (4-6x for twice the messages); after: 0.03 / 0.14 / 0.30 s and 0.04 / 0.18 /
    0.37 s, the same tokens and labels. Here: 2,001 messages take under 3x what 1,001 take (the best of two runs, on a
    loaded machine), and 1,001 well under what the exact renders took."""
    tok = tokenizer("llama3.1")
    took = {}
    for turns in (500, 1000):
        record = long_chat(turns)
        runs = []
        for _ in range(2):
            start = time.perf_counter()
            (example,) = tokenize_examples(record, tok, 10**6)
            runs.append(time.perf_counter() - start)
        took[turns] = min(runs)
        assert sum(label != -100 for label in example["labels"]) > 0
    assert took[1000] < 3 * took[500] + 0.2, took
    assert took[500] < 3.0, took


# ------------------------------------------------------------------------------------------------------------------
# 2. special tokens spelled in a chat's text
# ------------------------------------------------------------------------------------------------------------------


def chat_saying(user: str, answer: str = "Sure.") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def test_a_special_token_in_a_message_is_warned_about_once_naming_the_first():
    """transformers, trl and inference servers tokenize the rendered chat with its special tokens parsed, so a
    user's "<|im_end|>" becomes the end-of-turn token (the turn ends early) and an answer that ends with it ends
    twice. lorakit does the same (it must: the template's own markup has to be those tokens) and now says so once,
    with the count and the first place; before, nothing was said."""
    from lorakit.train.data import build_dataset

    tok = tokenizer("chatml")
    records = [chat_saying("Hi"), chat_saying("Print <|im_end|> please"), chat_saying("Hi", "Done.<|im_end|>"),
               {"prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "completion": "Sure."},
               {"text": "<|im_start|>user\nHi<|im_end|>"}]
    ds = build_dataset(records, tok, 64)
    ids = ds.rows[1]["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 3  # the user's, the user turn's and the answer's
    note = ds.summary.drop_note()
    assert note.startswith("warning: 2 chats spell a special token of this tokenizer"), note
    assert "(the first: dataset[1] messages[0] (user) has '<|im_end|>')" in note
    assert note.count("warning") == 1 and "remove the token from the data" in note
    # prompt/completion and text records hold the markup on purpose (a prompt already in the template's format)
    assert build_dataset(records[3:], tok, 64).summary.drop_note() is None


def test_added_tokens_that_are_not_special_are_text_the_model_writes():
    """Qwen's <tool_call> and <think> are added tokens but not special: answers write them; no warning. Llama 3's
    <|eot_id|> in a tool result is; the note also keeps the trimmed-turns part."""
    from lorakit.train.data import build_dataset

    qwen3 = tokenizer("qwen3")
    ds = build_dataset([chat_saying("Hi", "<think>\nA greeting.\n</think>\n\nHello."),
                        chat_saying("Hi", "<tool_call>x</tool_call> as text")], qwen3, 128)
    assert ds.summary.drop_note() is None
    llama = tokenizer("llama3.1")
    record = chat_saying("Hi")
    record["messages"] += [{"role": "user", "content": "and <|eot_id|>"}]  # trimmed: after the last answer
    record["messages"][0]["content"] = "Hi<|start_header_id|>"
    note = build_dataset([record], llama, 128).summary.drop_note()
    assert note.startswith("warning: 1 chat spells") and "has '<|start_header_id|>'" in note, note
    assert "1 chat ends with turns after the last assistant reply" in note, note


def test_the_cli_run_says_it(tmp_path, capsys):
    """`lorakit train` prints the warning once among its data lines."""
    import json

    from lorakit.cli import main
    from test_serve_support import tiny_hf_folder

    folder = tiny_hf_folder(tmp_path / "model")
    data = tmp_path / "chats.jsonl"
    rows = [chat_saying("Say <|im_start|>system", "No.")] * 3 + [chat_saying("Hi", "Hello.")] * 3
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code = main(["train", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps",
                 "1", "--eval-examples", "0", "--rank", "2", "--batch-size", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("warning: 3 chats spell a special token") == 1, out
    assert "(the first: chats.jsonl:1 messages[0] (user) has '<|im_start|>')" in out, out


# ------------------------------------------------------------------------------------------------------------------
# 3. what other tools' files hold, and cut answers
# ------------------------------------------------------------------------------------------------------------------


def rendered(record: dict, name: str = "chatml") -> tuple[str, list[str]]:
    """The text an example trains on and its supervised runs."""
    from lorakit.train.data import build_dataset

    tok = tokenizer(name)
    row = build_dataset([record], tok, 256).rows[0]
    runs, run = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            run.append(token)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return tok.decode(row["input_ids"]), runs + ([tok.decode(run)] if run else [])


def refusal(record: dict) -> str:
    from lorakit.train.formats import validate_record

    with pytest.raises(LorakitError) as info:
        validate_record(record, "data.jsonl:3")
    text = str(info.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("answer, says", [
    ("<think>\nThe user greets me; I should greet back.\n</think>\n\n", "only <think> reasoning, with no answer"),
    ("<think>\nThe user greets me; I should", "opens <think> but never closes it"),
])
def test_an_answer_that_is_all_reasoning_is_refused(answer, says):
    """A distilled answer cut at its token limit: before, it trained, teaching the model to end its turn after (or
    while) thinking; an empty content beside reasoning_content was already refused. Calls after reasoning train."""
    text = refusal(chat_saying("Hi", answer))
    assert text.startswith("data.jsonl:3: messages[1]: the assistant turn") and says in text, text
    assert "drop the record" in text
    call = {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    record = chat_saying("Weather?", "<think>\nI need the weather tool.\n</think>\n\n")
    record["messages"][1]["tool_calls"] = [call]
    from lorakit.train.formats import validate_record

    assert validate_record(record).shape == "messages"


def test_axolotl_training_flags_read_as_openai_weights():
    """Axolotl's per-turn "training": false leaves an answer untrained, as "weight": 0 does (ShareGPT turns too);
    before, the key was refused as unknown. true on a user turn (Axolotl can train those) is refused in one line."""
    record = {"messages": [{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Old answer.", "training": False},
                           {"role": "user", "content": "Again"},
                           {"role": "assistant", "content": "New answer.", "training": True}]}
    text, runs = rendered(record)
    assert "Old answer." in text and runs == ["New answer.<|im_end|>"]
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Old.", "training": False},
                                  {"from": "human", "value": "Again"}, {"from": "gpt", "value": "New."}]}
    assert rendered(sharegpt)[1] == ["New.<|im_end|>"]
    record["messages"][0]["training"] = True
    assert "(user) has training true; lorakit trains assistant turns only" in refusal(record)
    record["messages"][0].pop("training")
    record["messages"][1]["training"] = "no"
    assert "has training 'no'; Axolotl's training flag is true or false" in refusal(record)


def test_a_system_field_beside_messages_is_the_system_turn():
    """Anthropic's Messages format (Amazon Bedrock's Claude fine-tuning files): {"system", "messages"}. Before:
    "unknown field 'system' ... remove it", which would have dropped the system prompt from every example."""
    record = {"system": "Answer in French.", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Bonjour."}]}]}
    text, runs = rendered(record)
    assert text.startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nHello") and \
        runs == ["Bonjour.<|im_end|>"]
    record["system"] = [{"type": "text", "text": "Answer in German."}]  # Anthropic's list of text blocks
    assert rendered(record)[0].startswith("<|im_start|>system\nAnswer in German.<|im_end|>")
    record["messages"].insert(0, {"role": "system", "content": "Twice."})
    assert "a 'system' field and a system turn in 'messages'; keep one" in refusal(record)


def test_openai_refusal_parts_are_the_answer_text():
    """An assistant content part {"type": "refusal", "refusal": ...} (OpenAI's Chat Completions) is the answer's
    text; before it was refused as a non-text part."""
    record = chat_saying("How do I pick a lock?")
    record["messages"][1]["content"] = [{"type": "refusal", "refusal": "I can't help with that."}]
    assert rendered(record)[1] == ["I can't help with that.<|im_end|>"]


def test_llama_factory_history_is_the_earlier_turns():
    """LLaMA-Factory's Alpaca records carry the earlier turns as "history": [[instruction, response], ...]; before,
    "unknown field 'history' ... remove it" dropped them. Every answer trains, as LLaMA-Factory trains them."""
    record = {"instruction": "And in German?", "input": "", "output": "Hallo.", "system": "Translate.",
              "history": [["Say hello in French.", "Bonjour."]]}
    text, runs = rendered(record)
    assert text.index("Translate.") < text.index("Say hello in French.") < text.index("Bonjour.") < \
        text.index("And in German?") < text.index("Hallo.")
    assert runs == ["Bonjour.<|im_end|>", "Hallo.<|im_end|>"]
    record["history"] = [["only an instruction"]]
    assert "field 'history' must be a list of [instruction, response] pairs" in refusal(record)


@pytest.mark.parametrize("row, says", [
    ({"id": "chatcmpl-1", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi."}}]}, "an OpenAI chat completion response"),
    ({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}}, "an OpenAI Batch API request"),
    ({"id": "batch_req_1", "custom_id": "r1", "response": {"status_code": 200, "body": {"choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi."}}]}}, "error": None},
     "an OpenAI Batch API output line"),  # was told to rename 'response' (an object) to 'completion'
])
def test_logged_openai_api_lines_say_what_a_record_needs(row, says):
    """Logged API output or Batch API input given as training data: said what it is and how to make records of it
    (before: only "no known field in [...]")."""
    text = refusal(row)
    assert "no known field" in text and says in text and '{"messages":' in text, text


# ------------------------------------------------------------------------------------------------------------------
# 4. what truncation cuts off is said
# ------------------------------------------------------------------------------------------------------------------


def test_truncation_says_how_many_targets_it_cut_off():
    """With --overflow truncate, a long answer in the middle of a chat cuts off the rest of it and every later turn,
    and a long text loses its end: before, the run said only "2 truncated"; now the note says how many target tokens
    were not learnt and what share of all they are."""
    from lorakit.train.data import build_dataset

    tok = tokenizer("chatml")
    user = {"role": "user", "content": "Hi"}
    chat = {"messages": [user, {"role": "assistant", "content": "Hello there."}, user,
                         {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog. " * 8}, user,
                         {"role": "assistant", "content": "Bye."}]}
    records = [chat, {"text": "Paris is the capital of France. " * 20}, {"prompt": "a ", "completion": "b"}]
    whole = build_dataset(records, tok, 1000).summary.supervised_tokens
    summary = build_dataset(records, tok, 60, "truncate").summary
    cut = whole - summary.supervised_tokens
    assert summary.truncated == 2 and summary.cut_targets == cut > 0
    note = summary.drop_note()
    assert note.startswith(f"note: 2 examples were truncated at max_length=60, cutting off {cut} target tokens "
                           f"({cut / whole:.0%} of all targets"), note
    assert "raise --max-length" in note
    assert build_dataset(records, tok, 1000, "truncate").summary.drop_note() is None


# ------------------------------------------------------------------------------------------------------------------
# 5. compressed files: xz, bzip2 and zstd besides gzip
# ------------------------------------------------------------------------------------------------------------------


def test_xz_bzip2_and_zstd_files_read_like_gzip(tmp_path):
    """Hub datasets ship JSONL as .jsonl.zst / .json.gz (and older dumps .xz / .bz2): before, only gzip was read and
    the others were refused ("decompress it first"). xz and bzip2 read with Python's own modules, in a folder too;
    zstd with Python 3.14's compression.zstd or the zstandard package, else one line saying what to install."""
    import bz2
    import importlib.util
    import json
    import lzma
    import sys

    from lorakit.train.sources import read_many

    rows = "".join(json.dumps(chat_saying(f"Question {k}?", f"Answer {k}.")) + "\n" for k in range(3))
    (tmp_path / "plain.jsonl").write_text(rows)
    plain = read_many(tmp_path / "plain.jsonl")
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "part-0.jsonl.xz").write_bytes(lzma.compress(rows.encode()))
    (folder / "part-1.jsonl.bz2").write_bytes(bz2.compress(rows.encode()))
    (folder / "part-2.csv.xz").write_bytes(lzma.compress(b"prompt,completion\nBZh9 first,row\n"))
    for name in ("part-0.jsonl.xz", "part-1.jsonl.bz2"):
        assert [r.fields for r in read_many(folder / name)] == [r.fields for r in plain]
    records = read_many(folder)
    assert len(records) == 7 and records[-1].fields == {"prompt": "BZh9 first", "completion": "row"}
    assert records[3].where == "part-1.jsonl.bz2:1"
    text_csv = tmp_path / "bzh.csv"  # a text file whose first bytes spell bzip2's magic is text
    text_csv.write_text("BZh,prompt,completion\nx,a,b\n")
    with pytest.raises(LorakitError, match="bzh.csv:2: unknown field 'BZh'"):
        read_many(text_csv)
    named = tmp_path / "not.jsonl.xz"
    named.write_text(rows)
    with pytest.raises(LorakitError, match=r"named \.xz but not xz-compressed; rename or recompress it"):
        read_many(named)
    damaged = tmp_path / "cut.jsonl.bz2"
    damaged.write_bytes(bz2.compress(rows.encode())[:40])
    with pytest.raises(LorakitError, match=r"cut\.jsonl\.bz2: a damaged bzip2 file \(.*\); compress it again"):
        read_many(damaged)
    zst = tmp_path / "data.jsonl.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 8)  # zstd's magic, then no valid frame
    with pytest.raises(LorakitError) as info:
        read_many(zst)
    if importlib.util.find_spec("zstandard") is None and sys.version_info < (3, 14):
        assert "reading it needs Python 3.14 or the zstandard package (pip install zstandard), or decompress it " \
               "first: zstd -d data.jsonl.zst" in str(info.value)
    else:
        assert "a damaged zstd file" in str(info.value)


# ------------------------------------------------------------------------------------------------------------------
# 6. folders as macOS and compression leave them
# ------------------------------------------------------------------------------------------------------------------


def test_a_folder_from_macos_and_a_compressed_twin(tmp_path):
    """macOS writes "._train.jsonl" (AppleDouble metadata, binary) beside each file it copies to a USB stick or packs
    into a zip: before, the folder was refused ("some files are named for a split ... and some not (._train.jsonl)");
    hidden files are now skipped, as a shell's * skips them. A file beside its compressed copy (train.jsonl and
    train.jsonl.gz) read every record twice, silently: refused, naming both (as a folder and as a pattern)."""
    import gzip

    from lorakit.train.sources import read_many

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "a ", "completion": "b"}\n')
    (data / "val.jsonl").write_text('{"prompt": "c ", "completion": "d"}\n')
    for name in ("._train.jsonl", "._val.jsonl"):
        (data / name).write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    assert [r.where for r in read_many(data)] == ["train.jsonl:1"]
    (data / "train.jsonl.gz").write_bytes(gzip.compress((data / "train.jsonl").read_bytes()))
    for given in (data, data / "train*"):
        with pytest.raises(LorakitError, match=r"holds train\.jsonl and train\.jsonl\.gz, the same data compressed and "
                                               r"not, so every record would be read twice; remove one"):
            read_many(given)
    (data / "train.jsonl").unlink()
    assert [r.where for r in read_many(data)] == ["train.jsonl.gz:1"]


def test_an_empty_system_turn_a_template_refuses_is_told_to_be_removed():
    """Gemma 2's template refuses any system turn; exports that always write one (SlimOrca, OpenHermes: an empty
    "system" turn) were told to "put the system text at the start of the first user turn", of which there is none."""
    from lorakit.train.data import build_dataset

    tok = tokenizer("gemma2")
    record = chat_saying("Hi", "Hello.")
    assert build_dataset([record], tok, 64).summary.examples == 1
    record["messages"].insert(0, {"role": "system", "content": " "})
    with pytest.raises(LorakitError) as info:
        build_dataset([record], tok, 64)
    assert str(info.value).endswith("(System role not supported); this model's template takes no system turn, and "
                                    "this chat's is empty: remove it"), info.value
    record["messages"][0]["content"] = "Be brief."
    with pytest.raises(LorakitError, match="put the system text at the start of the first user turn"):
        build_dataset([record], tok, 64)


@pytest.mark.parametrize("row, field", [
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}], "images": ["cat.png"]},
     "images"),  # TRL's / LLaMA-Factory's vision SFT rows
    ({"id": "0", "image": "coco/1.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                           {"from": "gpt", "value": "A cat."}]}, "image"),  # LLaVA's
])
def test_multimodal_rows_are_refused_as_such_not_told_to_drop_their_media(row, field):
    """Before: "unknown field 'images' ...: remove it", and removing it trains answers about a picture the model never
    sees ("<image>" left in the text). A text-only row of a mixed set ("images": []) trains."""
    text = refusal(row)
    assert text == (f"data.jsonl:3: a multimodal record (its {field!r} field holds media); lorakit trains text-only "
                    "language models, and the text alone would teach answers about media the model never sees; give "
                    "text-only records (drop the rows that have media)")
    from lorakit.train.formats import validate_record

    assert validate_record({**chat_saying("Hi", "Hello."), "images": []}).shape == "messages"


def test_a_chat_template_whose_markup_the_tokenizer_lacks_is_warned_about():
    """A ChatML template on a base model without ChatML's tokens (a chat_template.jinja copied into a Mistral or Llama 2
    folder): <|im_start|> / <|im_end|> were trained as plain text pieces, silently, and the model learnt to write
    them. Zephyr's <|user|> is text by design (its turns end with </s>, a special token): not reported."""
    from lorakit.train.data import build_dataset

    record = chat_saying("Hi", "Hello.")
    tok = tokenizer("chatml-on-llama2")
    ds = build_dataset([record, {"text": "Hello."}], tok, 128)
    assert len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1  # the pieces trained
    assert ds.summary.untokenized_markup == ("<|im_start|>", "<|im_end|>")
    assert ds.summary.drop_note() == (
        "warning: this model's chat template writes '<|im_start|>', '<|im_end|>', which are not tokens of its "
        "tokenizer, so the chat markup trains as plain text that the model learns to write (and no end of turn is "
        "found in it): use the chat template made for this tokenizer (its instruct version's chat_template.jinja), or "
        "give prompt/completion records")
    assert build_dataset([{"text": "Hello."}], tok, 128).summary.drop_note() is None  # no chat, no template used
    for name in ("zephyr", "chatml", "llama3.1", "gemma2", "mistral", "qwen3"):
        assert build_dataset([record], tokenizer(name), 256).summary.drop_note() is None, name


def test_special_tokens_are_found_quickly_among_thousands():
    """Gemma 3's tokenizer has over 6,000 special tokens (<unused0>...): one regex alternation of them took ~40 ms per
    2,000-character message full of "<" (HTML, code). Each candidate of a special token's shape is looked up instead;
    tokens of other shapes, and one inside brackets, are still found."""
    from lorakit.train.special_text import SpecialTexts, special_token_texts

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [f"<unused{i}>" for i in range(6000)] + ["@@END@@"]})
    specials = special_token_texts(tok)
    assert {"<unused5999>", "<|im_end|>", "@@END@@"} <= specials.shaped | {"@@END@@"}
    html = "<div><p>Hello</p><unusedX><br/></div> [a] " * 60
    start = time.perf_counter()
    for _ in range(50):
        assert specials.search(html) is None
    assert time.perf_counter() - start < 2.0  # 50 messages; the alternation took ~2 s for them on an idle machine
    assert specials.search(html + "[<unused17>]") == "<unused17>"
    assert specials.search("the end @@END@@ here") == "@@END@@"
    assert SpecialTexts(["<s>"]).search("a <<s> b") == "<s>"


def test_anthropic_tool_blocks_say_how_openai_writes_tool_use():
    """A tool_use / tool_result content block (Anthropic's Messages format) was "a 'tool_use' part; lorakit trains on
    text only"; tool use does train, in OpenAI's form, which the line now spells."""
    record = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                           {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather",
                                                              "input": {"city": "Paris"}}]},
                           {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "21"}]},
                           {"role": "assistant", "content": "It is 21 degrees."}]}
    text = refusal(record)
    assert text.startswith("data.jsonl:3: messages[1] (assistant) content[0] is an Anthropic 'tool_use' block; write "
                           "tool use as OpenAI's: the assistant turn's 'tool_calls'"), text
