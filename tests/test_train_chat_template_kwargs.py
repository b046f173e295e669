"""Chat template options (Qwen3's ``enable_thinking``) through training, scoring and ``lorakit eval``.

Before: there was no way to pass them; a Qwen3 user who wanted answers without reasoning could not train the model
as it is prompted with ``enable_thinking=False`` (``<think>\\n\\n</think>\\n\\n`` in the prompt, not in the target).
Now ``chat_template_kwargs`` (Python) / ``--chat-template-kwargs JSON`` (``lorakit train``, ``lorakit eval``) reach
every render of a chat: training examples, generation prompts, the scoring; the run's config.yaml keeps them and
``lorakit eval --adapter RUN/adapter`` reuses them.
"""

from __future__ import annotations

import json

import pytest
import yaml

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.generation import encode_prompt
from lorakit.train.config import TrainConfig, read_config_file
from lorakit.train.data import build_dataset, generation_prompt
from lorakit.train.evaluate import score_generations
from lorakit.train.formats import validate_record
from test_eval_reasoning import QUESTIONS, question_of, scripted_generate
from test_train_chat_templates import (QWEN3_TEMPLATE, chat, context, one_line, qwen3_model_folder, targets,
                                      tokenizer_with)

NO_THINKING = {"enable_thinking": False}
EMPTY_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def qwen():
    return tokenizer_with(QWEN3_TEMPLATE)


def test_enable_thinking_false_moves_the_empty_think_block_into_the_prompt(qwen):
    thinking = build_dataset([chat("none")], qwen, 512)
    plain = build_dataset([chat("none")], qwen, 512, chat_template_kwargs=NO_THINKING)
    assert [targets(e, qwen) for e in thinking] == [["<think>\n\n</think>\n\n4<|im_end|>"],
                                                    ["<think>\n\n</think>\n\n6<|im_end|>"]]
    assert [targets(e, qwen) for e in plain] == [["4<|im_end|>"], ["6<|im_end|>"]]
    assert all(context(e, qwen).endswith(EMPTY_THINK) for e in plain)
    record = validate_record(chat("none"))
    prompt = qwen.decode(generation_prompt(record, qwen, chat_template_kwargs=NO_THINKING))
    assert prompt.endswith(EMPTY_THINK) and not qwen.decode(generation_prompt(record, qwen)).endswith(EMPTY_THINK)
    assert qwen.decode(encode_prompt(qwen, "Hi", chat_template_kwargs=NO_THINKING)).endswith(EMPTY_THINK)


def test_reasoning_with_thinking_turned_off_is_refused_in_one_line(qwen):
    with pytest.raises(LorakitError) as info:
        build_dataset([validate_record(chat("reasoning_content"), "q.jsonl:4")], qwen, 512,
                      chat_template_kwargs=NO_THINKING)
    assert one_line(info).startswith("q.jsonl:4: messages[2] has reasoning, but the generation prompt already closes "
                                     "the <think> block")


def test_scoring_renders_prompts_with_the_options(qwen, monkeypatch):
    from conftest import tiny_llama

    model = tiny_llama(vocab_size=len(qwen), max_position_embeddings=256)
    records = [validate_record({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
               for q, (_, a) in QUESTIONS.items()]

    def reply(prompt):
        assert prompt.endswith(EMPTY_THINK)  # the answer follows the empty block the prompt wrote
        return QUESTIONS[question_of(prompt)][1]

    monkeypatch.setattr(model, "generate", scripted_generate(qwen, reply), raising=False)
    result = score_generations(model, qwen, records, chat_template_kwargs=NO_THINKING)
    assert result.exact_match == 1.0


def test_config_values_and_one_line_refusals(tmp_path):
    assert TrainConfig(chat_template_kwargs=NO_THINKING).chat_template_kwargs == NO_THINKING
    assert TrainConfig().chat_template_kwargs == {}
    path = tmp_path / "run.yaml"
    path.write_text("chat_template_kwargs:\n  enable_thinking: false\n", encoding="utf-8")
    assert read_config_file(path) == {"chat_template_kwargs": NO_THINKING}
    path.write_text("chat_template_kwargs: 3\n", encoding="utf-8")
    with pytest.raises(LorakitError, match=r"run.yaml: --chat-template-kwargs must be a JSON object"):
        read_config_file(path)
    with pytest.raises(LorakitError, match="'add_generation_prompt' is set by lorakit itself"):
        TrainConfig(chat_template_kwargs={"add_generation_prompt": True})


@pytest.mark.parametrize("value, expected", [
    ("{enable_thinking: false}", "lorakit train: error: --chat-template-kwargs: not valid JSON (Expecting property "
                                 "name enclosed in double quotes at column 2); give a JSON object, e.g. "
                                 "'{\"enable_thinking\": false}'"),
    ("false", "lorakit train: error: --chat-template-kwargs must be a JSON object of option names to values, e.g. "
              "'{\"enable_thinking\": false}'; got False"),
])
def test_cli_bad_json_is_one_line(value, expected, capsys):
    assert main(["train", "--chat-template-kwargs", value, "--max-steps", "1"]) == 2
    assert capsys.readouterr().err.strip() == expected


def test_train_saves_the_options_and_eval_reuses_them(tmp_path, capsys, monkeypatch):
    folder, tok = qwen3_model_folder(tmp_path / "model")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(chat("none")) + "\n" for _ in range(4)), encoding="utf-8")
    run = tmp_path / "run"
    code = main(["train", "--model", str(folder), "--data", str(data), "--out", str(run), "--max-steps", "1",
                 "--eval-examples", "0", "--rank", "2", "--batch-size", "2", "--no-progress",
                 "--chat-template-kwargs", '{"enable_thinking": false}'])
    assert code == 0, capsys.readouterr()
    assert yaml.safe_load((run / "config.yaml").read_text())["chat_template_kwargs"] == NO_THINKING
    capsys.readouterr()

    def loss(extra):
        assert main(["eval", "--model", str(folder), "--data", str(data), "--no-generate", *extra]) == 0
        out = capsys.readouterr().out
        return out, next(line for line in out.splitlines() if line.startswith("loss "))

    out, with_run = loss(["--adapter", str(run / "adapter")])
    # said in eval's one line of what came from the run's config.yaml
    assert "from the adapter's run:" in out and "--chat-template-kwargs '{\"enable_thinking\": false}'" in out
    _, given = loss(["--adapter", str(run / "adapter"), "--chat-template-kwargs", '{"enable_thinking": false}'])
    out, other = loss(["--adapter", str(run / "adapter"), "--chat-template-kwargs", "{}"])
    assert with_run == given != other and "--chat-template-kwargs '{" not in out  # other targets: other tokens

    # lorakit generate: the run's options by default (said once), --chat-template-kwargs over them, bad JSON refused
    import lorakit.generation as generation

    seen, real = [], generation.encode_prompt
    monkeypatch.setattr(generation, "encode_prompt", lambda *a, **kw: seen.append(kw.get("chat_template_kwargs")) or real(*a, **kw))
    base = ["generate", "--model", str(folder), "--adapter", str(run / "adapter"), "--max-new-tokens", "2", "Hi"]
    assert main(base) == 0
    assert "chat template options of the adapter's run" in capsys.readouterr().err
    assert main([*base, "--chat-template-kwargs", "{}"]) == 0
    assert seen == [NO_THINKING, {}]
    assert main([*base, "--chat-template-kwargs", "{nope"]) == 2
    assert "--chat-template-kwargs: not valid JSON" in capsys.readouterr().err
