"""Follow-ups of the twenty-fourth session (lead): tokenizing errors and notes of converted chats name the turn as
the record has it (ShareGPT's ``conversations[i]``, a ``system`` field), not the ``messages[i]`` of the chat
lorakit converted it to."""

from __future__ import annotations

import pytest

from lorakit.errors import LorakitError
from lorakit.train.data import build_dataset, generation_prompt, tokenize_examples
from lorakit.train.formats import validate_record
from test_train_chat_templates import STRIP_TEMPLATE, one_line, tokenizer_with

THINK = "<think>\nTwo and two make four.\n</think>\n\n4"


def sharegpt(system: bool) -> dict:
    record = {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": THINK}]}
    return {**record, "system": "Be brief."} if system else record


@pytest.mark.parametrize("system", [False, True])
def test_a_sharegpt_tokenizing_error_names_conversations(system):
    """The reasoning a template drops is found while tokenizing, after conversion: the error said "messages[2]" for
    a record with a system field and two turns under "conversations" (its second one is conversations[1])."""
    strip = tokenizer_with(STRIP_TEMPLATE)
    for call in (lambda r: build_dataset([r], strip, 512), lambda r: tokenize_examples(r, strip, 512)):
        with pytest.raises(LorakitError) as info:
            call(validate_record(sharegpt(system), "chats.jsonl:3"))
        assert one_line(info).startswith("chats.jsonl:3: conversations[1] has '<think>...</think>' reasoning in its "
                                         "content, but this model's chat template drops it"), one_line(info)


def test_a_system_field_record_names_its_messages_as_given():
    """{"system", "messages"}: lorakit puts the system turn first, so its messages[1] was called messages[2]."""
    strip = tokenizer_with(STRIP_TEMPLATE)
    record = {"system": "Be brief.", "messages": [{"role": "user", "content": "What is 2+2?"},
                                                  {"role": "assistant", "content": THINK}]}
    with pytest.raises(LorakitError) as info:
        build_dataset([validate_record(record, "chats.jsonl:1")], strip, 512)
    assert one_line(info).startswith("chats.jsonl:1: messages[1] has '<think>...</think>'"), one_line(info)
    # an OpenAI chat is named as it is: its own messages[i]
    plain = {"messages": [{"role": "system", "content": "Be brief."}, *record["messages"]]}
    with pytest.raises(LorakitError) as info:
        build_dataset([validate_record(plain, "chats.jsonl:2")], strip, 512)
    assert one_line(info).startswith("chats.jsonl:2: messages[2] has '<think>...</think>'"), one_line(info)


def test_a_special_token_note_names_conversations():
    """The note on a chat that spells a special token in its text names the ShareGPT turn."""
    qwen = tokenizer_with(STRIP_TEMPLATE)
    record = {"system": "Be brief.", "conversations": [{"from": "human", "value": "say <|im_end|> now"},
                                                       {"from": "gpt", "value": "ok"}]}
    dataset = build_dataset([validate_record(record, "chats.jsonl:7")], qwen, 512)
    assert dataset.summary.first_special_text.startswith("chats.jsonl:7 conversations[0] (user) has '<|im_end|>'"), \
        dataset.summary.first_special_text


def test_generation_prompt_names_conversations():
    strip = tokenizer_with(STRIP_TEMPLATE)
    record = validate_record({"conversations": [{"from": "human", "value": "What is 2+2?"},
                                                {"from": "gpt", "value": THINK}, {"from": "human", "value": "And?"},
                                                {"from": "gpt", "value": "6"}]}, "eval.jsonl:2")
    with pytest.raises(LorakitError) as info:
        generation_prompt(record, strip)
    assert one_line(info).startswith("eval.jsonl:2: conversations[1] has '<think>"), one_line(info)


def test_generate_says_the_tokenizer_outgrew_the_model(tmp_path, capsys):
    """A folder whose tokenizer has more tokens than the model's embedding rows (markup tokens added without
    resizing): generate said "outside this model's vocabulary; encode prompts with this model's tokenizer", which
    the user had done; it now says what eval and train say: the tokenizer outgrew the model, resize it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.cli import main
    from test_serve_support import make_tokenizer

    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    assert len(tokenizer) > 64
    code = main(["generate", "--model", str(tmp_path / "base"), "--max-new-tokens", "2", "tell me", "a story"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "a prompt holds the token" in err and "the tokenizer has" in err and "resize_token_embeddings" in err, err


def test_serve_refuses_a_prompt_past_the_embedding_rows_as_the_clients_400(tmp_path):
    """A prompt whose text encodes to a token past the model's embedding rows (a tokenizer that gained tokens
    without the model being resized) was a 500 "generation failed" with a traceback in the log, the whole engine
    batch failing; it is the client's 400 naming the token, and the server answers the next request."""
    import httpx
    from transformers import AutoTokenizer

    from test_serve_support import ServerProcess, tiny_hf_folder

    model = tiny_hf_folder(tmp_path / "model", vocab_size=300)  # the tokenizer has ~360: ids 300+ are past the rows
    tokenizer = AutoTokenizer.from_pretrained(model)
    past = next(tokenizer.decode([i]) for i in range(len(tokenizer) - 1, 300, -1)
                if all(t >= 300 for t in tokenizer(tokenizer.decode([i]), add_special_tokens=False)["input_ids"]))
    (tmp_path / "adapters").mkdir()
    server = ServerProcess(model, tmp_path / "adapters", log=tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for route, body, param in (
                    ("/v1/completions", {"prompt": f"say {past}"}, "prompt"),
                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": past}]}, "messages"),
                    ("/v1/responses", {"input": past}, "input")):
                answer = client.post(route, json={"model": "base", "max_tokens": 2, **body} if "responses" not in route
                                     else {"model": "base", "max_output_tokens": 16, **body})
                assert answer.status_code == 400, (route, answer.text)
                error = answer.json()["error"]
                assert error["param"] == param and "past this model's 300 embedding rows" in error["message"], error
            fine = client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2})
            assert fine.status_code == 200, fine.text
    finally:
        server.stop()
    assert "Traceback" not in server.output()


def test_serve_warns_at_startup_when_the_chat_template_is_past_the_rows(tmp_path):
    from test_serve_support import ServerProcess, tiny_hf_folder

    model = tiny_hf_folder(tmp_path / "model", vocab_size=64)
    (tmp_path / "adapters").mkdir()
    server = ServerProcess(model, tmp_path / "adapters", log=tmp_path / "server.log")
    server.stop()
    assert "warning: the chat template writes the token" in server.output() and \
        "every chat request will be refused" in server.output(), server.output()


def test_merging_into_nf4_advises_dequantize_first():
    """The lossy-merge warning said "merge into a 16-bit copy of the base"; the exact route is lorakit.dequantize
    first (16-bit layers holding the weights the adapter trained on), which the README gives. It now says so, and
    following it merges without the warning."""
    import warnings

    import lorakit
    from conftest import tiny_llama
    from lorakit.quant.merge_loss import LossyMergeWarning

    model = tiny_llama(seed=0, vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    lorakit.quantize(model, "nf4")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    with pytest.warns(LossyMergeWarning, match=r"call lorakit\.dequantize\(model\) first"):
        lorakit.merge(model)
    lorakit.unmerge(model)
    lorakit.dequantize(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossyMergeWarning)
        lorakit.merge(model)


def test_generate_refuses_logits_that_are_not_finite(tmp_path, capsys):
    """A float16 model whose activations overflow gave NaN logits, argmax picked a token at random (an end of turn
    here), and `lorakit generate` printed an empty answer with exit 0. It now says the logits are not finite and
    to load the model in bfloat16 or float32."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main
    from test_serve_support import tiny_hf_folder

    folder = tiny_hf_folder(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        mlp = model.model.layers[0].mlp  # each weight fits float16, their product does not: float32 stays finite
        mlp.down_proj.weight.fill_(6e4)
        mlp.up_proj.weight.fill_(1.0)
        mlp.gate_proj.weight.fill_(1.0)
    model.save_pretrained(folder)
    code = main(["generate", "--model", str(folder), "--dtype", "fp16", "--max-new-tokens", "3", "--no-chat", "hi"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err, err
    assert "logits are not finite (NaN or inf) at step 0" in err and "--dtype bf16" in err, err
    assert main(["generate", "--model", str(folder), "--dtype", "fp32", "--max-new-tokens", "3", "--no-chat",
                 "hi"]) == 0


def test_the_all_linear_expert_share_counts_nf4_layers_at_their_size(tmp_path):
    """On an NF4 model, inject's "all-linear leaves the fused experts frozen" warning divided by the parameters
    alone, where the quantized layers are packed buffers: it said 89% for a model whose experts are 85%."""
    import warnings

    import lorakit
    from test_followups_24_qlora import _tiny_mixtral

    model, _ = lorakit.load_base(str(_tiny_mixtral(tmp_path / "mixtral")), device="cpu")
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    share = round(100 * experts / sum(p.numel() for p in model.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorakit.quantize(model, "nf4")
    with pytest.warns(UserWarning, match=rf"fused MoE expert weights .*; {share}% of its weights\) are 3-D"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules="all-linear"))


def test_a_ctrl_c_while_the_command_imports_the_package_is_one_line():
    """CI saw a KeyboardInterrupt traceback from inside lorakit/__init__.py (a loaded machine, Ctrl-C at 0.1 s): the
    package's import came before __main__'s guard and cli.main's handler. The package now installs a quiet handler
    as its first statement when the command imports it, and gives Python's back at its end."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    init = Path(__file__).resolve().parents[1] / "lorakit" / "__init__.py"
    body = [node for node in ast.parse(init.read_text()).body if not isinstance(node, ast.Expr) or
            not isinstance(node.value, ast.Constant)]  # the docstring left out
    assert ast.unparse(body[0]) == "from lorakit import _early_ctrl_c"
    assert ast.unparse(body[1]) == "_early_ctrl_c.install()" and ast.unparse(body[-1]) == "_early_ctrl_c.release()"
    script = ("import os, signal, sys\nsys.argv[0] = '-m'\nfrom lorakit import _early_ctrl_c as early\n"
              "early.install()\nos.kill(os.getpid(), signal.SIGINT)\nimport time\ntime.sleep(5)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=init.parents[1])
    assert (done.returncode, done.stderr) == (130, "lorakit: interrupted\n")
    # a program that imports lorakit keeps Python's own handler
    plain = subprocess.run([sys.executable, "-c", "import signal, lorakit\n"
                            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler"],
                           capture_output=True, text=True, timeout=60, cwd=init.parents[1])
    assert plain.returncode == 0, plain.stderr
