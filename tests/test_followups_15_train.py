"""Follow-ups 15 on `lorakit train` / `lorakit eval`: scoring that shows progress in a log, a 0-column terminal,
--device cuda:N, a resume of a finished run, the Python API's vocabulary check, and the wording of two refusals.

Every run is a tiny random Llama (tests/test_train_helpers.py) trained a few steps on CPU."""

from __future__ import annotations

import json
import re

import pytest

from lorakit.cli import main
from test_train_helpers import task_records, tiny_folder  # noqa: F401 (fixtures)

# scoring counts decode steps (test_followups_16_progress: no longer batches split for the display)
GENERATING = re.compile(r"^generating: (\d+)/(\d+) steps, \d+/\d+ records done, \d:\d\d:\d\d elapsed, "
                        r"\d:\d\d:\d\d left$", re.M)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _cli_train(tmp_path, folder, *extra):
    train = _write(tmp_path / "train.jsonl", task_records(12, seed=1))
    val = _write(tmp_path / "val.jsonl", task_records(12, seed=2))
    return main(["train", "--model", str(folder), "--data", train, "--val-data", val, "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--rank", "2", "--batch-size", "4", "--eval-examples", "8", "--max-new-tokens",
                 "2", "--samples", "0", "--eval-every", "0", "--save-every", "1", *extra])


# -- 1. scoring shows progress in a log --------------------------------------------------------------------------
def test_train_scoring_shows_plain_progress_lines_in_a_log(tmp_path, tiny_folder, capsys):  # noqa: F811
    """8 held-out examples with the default generation batch (64): before, one silent batch before and after
    training (no bar in a log, and no lines either); now that one batch's 2 decode steps, each with a plain line,
    no redraws."""
    code = _cli_train(tmp_path, tiny_folder)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "\r" not in err
    seen = [(int(m.group(1)), int(m.group(2))) for m in GENERATING.finditer(err)]
    assert seen == [(1, 2), (2, 2)] * 2, err  # before and after training


def test_eval_scores_in_several_batches_with_lines(tmp_path, tiny_folder, capsys):  # noqa: F811
    """`lorakit eval` of 12 records at its default --batch-size 16: before, one batch and a single line once all was
    done; now the one batch's decode steps (2), a line after each."""
    assert _cli_train(tmp_path, tiny_folder) == 0
    capsys.readouterr()
    code = main(["eval", "--model", str(tiny_folder), "--adapter", str(tmp_path / "run" / "adapter"), "--data",
                 str(tmp_path / "val.jsonl"), "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "\r" not in captured.err
    assert [int(m.group(1)) for m in GENERATING.finditer(captured.err)] == [1, 2], captured.err
    assert "exact match" in captured.out


# -- 2. a terminal 0 columns wide --------------------------------------------------------------------------------
def _pty_stream(columns: int):
    """The writing end of a real pseudo-terminal whose window is ``columns`` wide (0: `script`, `docker -t` in CI)."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24 if columns else 0, columns, 0, 0))
    return os.fdopen(master, "rb"), os.fdopen(slave, "w")


@pytest.mark.parametrize("columns, bar", [(0, False), (80, True)])
def test_a_terminal_without_columns_gets_the_plain_lines(columns, bar):
    """tqdm draws nothing on a 0-column terminal: training showed neither a bar nor its plain lines there."""
    from lorakit.train.loop import show_bar

    master, stream = _pty_stream(columns)
    try:
        assert stream.isatty()
        assert show_bar(None, stream) is bar
        assert show_bar(True, stream) is True  # --progress still forces the bar
    finally:
        stream.close()
        master.close()


# -- 3. --device cuda:N ------------------------------------------------------------------------------------------
def test_train_and_eval_take_cuda_n_as_generate_does(tmp_path, tiny_folder, capsys):  # noqa: F811
    """Before: argparse's "invalid choice: 'cuda:1'" for train and eval, which generate / serve / combine take. On
    this CPU machine both now get generate's own line; a malformed name gets generate's wording too."""
    import torch

    from lorakit.errors import LorakitError
    from lorakit.train.config import TrainConfig

    if torch.cuda.is_available():
        pytest.skip("the refusal checked here is the one of a machine without CUDA")
    data = _write(tmp_path / "d.jsonl", task_records(8, seed=1))
    for command in (["train", "--model", str(tiny_folder), "--data", data, "--out", str(tmp_path / "run")],
                    ["eval", "--model", str(tiny_folder), "--data", data]):
        assert main([*command, "--device", "cuda:1"]) != 0
        err = capsys.readouterr().err
        assert "--device cuda:1: no CUDA GPU is visible to PyTorch; use --device cpu" in err, err
        assert "invalid choice" not in err
        assert main([*command, "--device", "cuda:x"]) != 0
        assert "--device 'cuda:x' is not a device; use cpu, cuda, cuda:N or mps" in capsys.readouterr().err
    assert TrainConfig(device="cuda:0").device == "cuda:0"
    for bad in ("gpu", "cuda:", "cuda:-1", "CPU"):
        with pytest.raises(LorakitError, match=r"is not a device; use cpu, cuda, cuda:N or mps"):
            TrainConfig(device=bad)


# -- 4. --resume of a finished run -------------------------------------------------------------------------------
def test_resume_of_a_finished_run_stops_before_loading_the_model(tmp_path, tiny_folder, capsys, monkeypatch):  # noqa: F811
    """Before: "nothing to do" from the training loop, after the model had loaded, then the held-out set was scored
    again. Now the runner says it first and returns the run's results; a resume asking for more steps still trains."""
    from lorakit.train import runner

    assert _cli_train(tmp_path, tiny_folder) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    capsys.readouterr()

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded for a finished run")

    monkeypatch.setattr(runner, "load_model", no_load)
    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "is at step 2, the end of this run; nothing to do (raise --max-steps or --epochs to train further); " \
           f"the run's results are in {run / 'results.json'}" in captured.out, captured
    assert "scoring" not in captured.out + captured.err
    assert json.loads((run / "results.json").read_text()) == results
    # a resume with more steps is not finished: it goes on to load the model
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(["train", "--resume", "--out", str(run), "--max-steps", "3"])


# -- 5. the Python API checks the data's token ids -------------------------------------------------------------
def test_python_train_refuses_data_tokens_past_the_embedding_rows():
    """lorakit.train.train(model, tokenizer, records) with tokens added to the tokenizer and not to the model: the CLI
    refused it by name (commit 357c66c); the API still stopped at the first step with "IndexError: index out of
    range in self"."""
    from lorakit.errors import LorakitError
    from lorakit.train import TrainConfig, train
    from test_train_helpers import tiny_tokenizer, tiny_train_model

    tokenizer = tiny_tokenizer()
    model = tiny_train_model()
    rows = model.get_input_embeddings().weight.shape[0]
    tokenizer.add_tokens([f"w{i}" for i in range(len(tokenizer), rows + 2)])
    assert len(tokenizer) > rows
    word = tokenizer.convert_ids_to_tokens(len(tokenizer) - 1)
    records = [{"prompt": f"reverse a b {word} :", "completion": f"{word} b a"}] * 4
    with pytest.raises(LorakitError, match=rf"the training data holds the token '{word}' \(id {len(tokenizer) - 1}; "
                                           rf"4 rows hold ids past the model's {rows} embedding rows\)"):
        train(model, tokenizer, records, TrainConfig(rank=2, batch_size=4, max_steps=1, eval_examples=0, save_every=0))


# -- 6. chat_template_kwargs naming a field of the server's request ----------------------------------------------
@pytest.mark.parametrize("key", ["add_generation_prompt", "continue_final_message", "documents", "chat_template"])
def test_server_says_to_send_rendering_options_as_request_fields(key):
    """A chat request's chat_template_kwargs {"add_generation_prompt": false} was refused with training's words,
    "set by lorakit itself ... remove it", though the server takes it as a field of the request (commit 88808dd)."""
    from pydantic import ValidationError

    from lorakit.errors import LorakitError
    from lorakit.serve.protocol import ChatRequest, ResponsesRequest
    from lorakit.train.config import check_template_kwargs

    body = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {key: False}}
    with pytest.raises(ValidationError) as refused:
        ChatRequest.model_validate(body)
    message = str(refused.value)
    assert f"chat_template_kwargs: {key!r} is a field of the request, not a template option; send it beside " \
           f"\"messages\" (\"{key}\": ...) instead of inside chat_template_kwargs" in message, message
    assert "set by lorakit itself" not in message
    # the Responses API has no such fields, and training's option keeps its words
    with pytest.raises(ValidationError, match="set by lorakit itself"):
        ResponsesRequest.model_validate({"model": "base", "input": "Hi", "chat_template_kwargs": {key: False}})
    with pytest.raises(LorakitError, match=rf"--chat-template-kwargs: '{key}' is set by lorakit itself when it renders "
                                           "a chat, not a template option; remove it"):
        check_template_kwargs({key: False})


# -- 7. the bitsandbytes refusals name the flag and the keyword ------------------------------------------------
def test_bitsandbytes_refusals_read_right_on_the_command_line_and_in_python():
    """They said "quantize='nf4'" to command-line users too, who type --quantize nf4."""
    from lorakit.errors import LorakitError
    from lorakit.quant.bnb_checkpoint import QUANT_STATE_PREFIX, bnb_quantization, read_bnb_linear

    both = 'the original 16-bit model with --quantize nf4 instead (quantize="nf4" from Python)'
    for config, what in (({"load_in_8bit": True}, "8-bit (LLM.int8)"),
                         ({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "bnb_4bit_quant_type is 'fp4'")):
        with pytest.raises(LorakitError) as refused:
            bnb_quantization({"quantization_config": {"quant_method": "bitsandbytes", **config}})
        assert what in str(refused.value) and both in str(refused.value), refused.value
        assert "quantize='nf4'" not in str(refused.value)
    keys = {"layer.weight", f"layer{QUANT_STATE_PREFIX}fp4"}
    with pytest.raises(LorakitError, match=r"FP4 weights are not supported \(lorakit reads NF4\); re-quantize the "
                                           r"original 16-bit model with --quantize nf4 \(quantize=\"nf4\" from Python\)"):
        read_bnb_linear("layer.weight", lambda key: None, keys)
