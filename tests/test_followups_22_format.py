"""The prompt format an adapter was trained in travels with what a user ships (twenty-second follow-up).

``lorakit train`` on Alpaca (or question/answer) records with a tokenizer that has no chat template trains them in
Alpaca's prompt format ("### Instruction:\\n...\\n\\n### Response:\\n"; "Question: ...\\nAnswer: "), the run's
system text before it, and records that in results.json; ``lorakit generate --adapter RUN/adapter`` framed its
prompts so. But ``lorakit merge`` wrote a folder whose tokenizer had no template (transformers' apply_chat_template
refused it, a plain question lost the "### Response:" cue the model answers after), and ``lorakit serve`` refused
every chat request to such an adapter ("this tokenizer has no chat template"). Now the merged folder's tokenizer
gets a chat template in the run's format (``lorakit.train.formats.frame_chat_template``), and the server gives
the adapter of such a run the same template: both render a user turn as training's prompt, token for token.
Each test fails on the code before the change. Tiny random models and BPE tokenizers throughout.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from lorakit.cli import main
from test_serve_support import ServerProcess, make_tokenizer, tiny_hf_folder
from test_train_helpers import write_jsonl

SYSTEM = 'Answer in "quotes" }} {% \\ é 🙂\nbriefly.'  # Jinja's and JSON's special characters, non-ASCII, a newline


def _records(kind: str, system: str | None = SYSTEM) -> list[dict]:
    said = {"system": system} if system else {}
    if kind == "alpaca":
        return [{"instruction": f"The capital of {c}?", "input": "", "output": f"{c} has one.", **said}
                for c in ("France", "Germany", "Italy", "Spain")]
    return [{"question": f"The capital of {c}?", "answer": f"{c} has one.", **said}
            for c in ("France", "Germany", "Italy", "Spain")]


def _ask(record: dict) -> str:
    return record.get("instruction") or record["question"]


def _trained_prompt_ids(record: dict, tokenizer) -> list[int]:
    """The prompt ids training put before the record's answer (``train.data.generation_prompt`` of the record on
    ``tokenizer``, which has no chat template: the fallback prompt/completion record)."""
    from lorakit.train.data import generation_prompt
    from lorakit.train.formats import validate_record

    assert not tokenizer.chat_template
    return generation_prompt(validate_record(record), tokenizer)


def _bpe(bos: bool):
    """A byte-level BPE tokenizer without a chat template; ``bos``: it puts BOS in front of text (Llama's rule)."""
    from tokenizers import processors

    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    if bos:
        core = tokenizer.backend_tokenizer
        core.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                                            special_tokens=[("<|im_start|>", tokenizer.bos_token_id)])
        assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("kind", ["alpaca", "question"])
def test_the_frame_template_renders_the_training_prompt_token_for_token(kind, bos):
    """The template's render of [system?, user] with the generation prompt is ``frame_prompt``'s text, and its ids
    are training's prompt ids (BOS where the tokenizer puts it); without a system turn it writes the run's system
    text, an empty system turn drops it; later turns continue the frame, each answer ended by EOS as trained."""
    import copy

    from lorakit.train.formats import frame_prompt, with_frame_template

    for system in (SYSTEM, None):
        bare = _bpe(bos)
        framed = with_frame_template(copy.deepcopy(bare), kind, system)
        for record in _records(kind, system):
            ids = framed.apply_chat_template([{"role": "user", "content": _ask(record)}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
            assert list(ids) == _trained_prompt_ids(record, bare), (kind, bos, system)
        lead = bare.bos_token if bos else ""
        text = framed.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                          tokenize=False)
        assert text == lead + frame_prompt(kind, "Hi", system)
        for turn, said in (("Be short.", "Be short."), ("", None)):  # a system turn replaces the run's text
            text = framed.apply_chat_template([{"role": "system", "content": turn}, {"role": "user", "content": "Hi"}],
                                              add_generation_prompt=True, tokenize=False)
            assert text == lead + frame_prompt(kind, "Hi", said)
    two = framed.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                      {"role": "user", "content": "Again"}], add_generation_prompt=True, tokenize=False)
    first = frame_prompt(kind, "Hi")
    assert two == lead + first + "Yo" + bare.eos_token + frame_prompt(kind, "Again")
    with pytest.raises(Exception, match="user and assistant turns only"):
        framed.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama with a BPE tokenizer that has no chat template, and a one-step run per kind on it."""
    root = tmp_path_factory.mktemp("f22")
    base = tiny_hf_folder(root / "base", max_position_embeddings=512)
    config_file = base / "tokenizer_config.json"
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    out = {"base": base}
    for kind in ("alpaca", "question"):
        data = write_jsonl(root / f"{kind}.jsonl", _records(kind))
        code = main(["train", "--model", str(base), "--data", str(data), "--out", str(root / kind), "--max-steps", "1",
                     "--rank", "2", "--batch-size", "4", "--eval-examples", "0", "--no-progress"])
        assert code == 0
        results = json.loads((root / kind / "results.json").read_text())
        assert (results["prompt_format"], results["system_prompt"]) == (kind, SYSTEM)
        out[kind] = root / kind
    return out


@pytest.mark.parametrize("kind", ["alpaca", "question"])
def test_merge_writes_a_chat_template_in_the_runs_prompt_format(kind, runs, tmp_path, capsys):
    """The merged folder's tokenizer renders a question as training's prompt, token for token, with the run's
    system text (transformers alone loads it); before, it had no chat template at all. The adapter folder is
    untouched, and peft still loads it. A copy of the adapter out of its run merges as before (no template).
    The run is copied and its adapter's tokenizer files removed: an adapter lorakit train wrote before it kept
    the template beside the adapter (tests/test_followups_22_train_template.py checks the folders written now)."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(runs[kind], tmp_path / "run")
    adapter = tmp_path / "run" / "adapter"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (adapter / name).unlink(missing_ok=True)
    before = sorted(p.name for p in adapter.iterdir())
    assert main(["merge", "--model", str(runs["base"]), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "chat template: " in out and "with the run's system text" in out, out
    merged = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert merged.chat_template, sorted(p.name for p in (tmp_path / "m").iterdir())
    base = AutoTokenizer.from_pretrained(runs["base"])
    for record in _records(kind):
        ids = merged.apply_chat_template([{"role": "user", "content": _ask(record)}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
        assert list(ids) == _trained_prompt_ids(record, base)
    assert sorted(p.name for p in adapter.iterdir()) == before
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["base"]), str(adapter))
    # an adapter out of its run (copied elsewhere: no results.json) has nothing to say: no template is invented
    shutil.copytree(adapter, tmp_path / "copied")
    assert main(["merge", "--model", str(runs["base"]), "--adapter", str(tmp_path / "copied"),
                 "--out", str(tmp_path / "m2")]) == 0
    assert "chat template: " not in capsys.readouterr().out
    assert not AutoTokenizer.from_pretrained(tmp_path / "m2").chat_template


def test_serve_renders_the_runs_chats_in_its_prompt_format(runs, tmp_path):
    """`lorakit serve --adapters RUN` (what serve suggests for a run folder): a chat request to the run's adapter
    is rendered in the run's prompt format, its prompt ids training's; before, a 400 ("this tokenizer has no chat
    template"). The base itself (no template, no run) still refuses chats, and /v1/completions sends text as it is.
    The run is an older one's: its adapter holds no tokenizer (a run now saves the framed one beside it, which
    test_followups_22_train_template serves), so the format comes from results.json; /v1/models and /v1/adapters
    say the adapter's chats are its own ("tokenizer": "adapter"; /v1/models said "base" until session 23)."""
    import shutil

    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(runs["base"])
    record = _records("alpaca")[0]
    run = shutil.copytree(runs["alpaca"], tmp_path / "run")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (run / "adapter" / name).unlink(missing_ok=True)
    server = ServerProcess(runs["base"], run, "--max-tokens", "4", log=tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
            assert listed["adapter"]["tokenizer"] == "adapter", listed
            assert client.get("/v1/models/adapter").json()["tokenizer"] == "adapter"
            def chat(model, messages):
                return client.post("/v1/chat/completions", json={
                    "model": model, "messages": messages, "max_tokens": 1, "temperature": 0, "return_token_ids": True})

            answer = chat("adapter", [{"role": "user", "content": _ask(record)}])
            assert answer.status_code == 200, answer.text
            assert answer.json()["prompt_token_ids"] == _trained_prompt_ids(record, base)
            answer = chat("adapter", [{"role": "system", "content": "Be short."},
                                      {"role": "user", "content": _ask(record)}])
            assert answer.status_code == 200, answer.text
            assert answer.json()["prompt_token_ids"] == _trained_prompt_ids({**record, "system": "Be short."}, base)
            assert chat("base", [{"role": "user", "content": "Hi"}]).status_code == 400
            text = client.post("/v1/completions", json={"model": "adapter", "prompt": "Hi", "max_tokens": 1,
                                                         "return_token_ids": True})
            assert text.status_code == 200, text.text
            assert text.json()["choices"][0]["prompt_token_ids"] == base("Hi")["input_ids"]
            [loaded] = [a for a in client.get("/v1/adapters").json()["data"] if a["name"] == "adapter"]
            assert loaded["tokenizer"] == "adapter", loaded
    finally:
        server.stop()
    assert "adapters with their own chat template" in server.output() and "adapter" in server.output()


def test_run_prompt_frame_reads_only_a_runs_results(tmp_path):
    """The server reads the format from the results.json beside the adapter folder (or above a checkpoint's), not
    through a link, and nothing from a file that is not a run's."""
    from lorakit.serve.adapter_tokenizer import run_prompt_frame

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "checkpoints" / "step-000001" / "adapter").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"prompt_format": "question", "system_prompt": None}))
    assert run_prompt_frame(run / "adapter") == ("question", None)
    assert run_prompt_frame(run / "checkpoints" / "step-000001" / "adapter") == ("question", None)
    for results in ({"prompt_format": "chat"}, {"prompt_format": "alpaca", "system_prompt": 3}, [1], "{"):
        (run / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
        assert run_prompt_frame(run / "adapter") is None, results
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"prompt_format": "alpaca", "system_prompt": "x"}))
    (run / "results.json").unlink()
    (run / "results.json").symlink_to(elsewhere)
    assert run_prompt_frame(run / "adapter") is None
