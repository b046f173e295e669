"""Adapters saved by the real peft package in configurations the other peft tests do not build, loaded by lorakit
(twenty-third session, peft_wild).

peft's ``trainable_token_indices`` may give the embedding and the output head tied to it different rows
(``{"wte": [3, 4], "lm_head": [9]}``): peft then wraps each with rows of its own (no tying; the head's rows 3 and 4
stay the base's) and saves both deltas. lorakit spread the embedding's rows onto every module sharing its weight and
let whichever delta it met last win; safetensors hands the keys back in a random order, so the same folder loaded with
peft's logits on one run and with the embedding's rows on the head (other logits, other greedy answers) on the next.
"""

from __future__ import annotations

import peft
import pytest
import safetensors.torch
import torch

import lorakit
from conftest import assert_close
from model_helpers import logits
from test_peft_sweep import build, peft_saved


@pytest.mark.parametrize("kind, embedding", [("gpt2", "wte"), ("llama-tied", "embed_tokens")])
@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_tied_head_with_rows_of_its_own_keeps_them_whatever_the_key_order(kind, embedding, order, tmp_path,
                                                                         monkeypatch):
    ids = torch.randint(0, 100, (2, 7))
    target = ["c_attn"] if kind == "gpt2" else ["q_proj"]
    theirs = peft_saved(kind, tmp_path / "peft", target_modules=target,
                        trainable_token_indices={embedding: [3, 4], "lm_head": [9]})
    expected = logits(theirs, ids)
    head = theirs.get_output_embeddings()  # peft's head: its own rows (9), not the embedding's (3, 4)
    assert not head.token_adapter.tied_adapter

    # the file's keys in a fixed order each time, as safetensors may hand them back on any run
    real_load = safetensors.torch.load
    monkeypatch.setattr(safetensors.torch, "load", lambda data: dict(
        sorted(real_load(data).items(), reverse=order == "reversed")))
    ours = build(kind)
    lorakit.load_adapter(ours, tmp_path / "peft")
    assert_close(logits(ours, ids), expected)
    with torch.no_grad():  # the head's rows 3 and 4 are the base's, its row 9 is trained; the embedding's the reverse
        prompt = ids[:, :3]
        greedy = ours.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert greedy.tolist() == theirs.generate(input_ids=prompt, max_new_tokens=5, do_sample=False,
                                                  pad_token_id=0).tolist()
    lorakit.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(build(kind), tmp_path / "ours").eval()
    assert_close(logits(again, ids), expected)
    lorakit.merge_and_unload(ours)
    assert_close(logits(ours, ids), expected)


def test_serve_names_the_adapters_peft_saved_in_subfolders_of_an_adapter(tmp_path, capsys):
    """peft's save_pretrained of several adapters writes the first at the top of the folder and each other one in a
    subfolder named after it. ``--adapters`` naming that folder was refused with advice that served the top adapter
    alone, and serving its parent did so without a word about the others. Both now name the subfolders and say how
    to serve one; a training run's folder (adapter/ and best/, nothing on top) keeps its own note only."""
    import argparse
    import warnings

    import transformers as tf

    from lorakit.cli import main
    from lorakit.serve.cli import add_arguments, build_state
    from cli_helpers import cli_error
    from test_serve_support import make_adapter, tiny_hf_folder

    pytest.importorskip("fastapi")
    base = tiny_hf_folder(tmp_path / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base),
                                     peft.LoraConfig(r=2, target_modules=["q_proj"]))
        theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["v_proj"]))
        theirs.add_adapter("third", peft.LoraConfig(r=2, target_modules=["k_proj"]))
        theirs.save_pretrained(tmp_path / "adapters" / "multi")
    run = tmp_path / "adapters" / "run"
    model, _ = lorakit.load_base(str(base))
    make_adapter(model, run / "adapter", seed=1)
    make_adapter(model, run / "best", seed=2)

    multi = tmp_path / "adapters" / "multi"
    line = cli_error(capsys, main(["serve", "--model", str(base), "--adapters", str(multi), "--port", "0"]))
    assert line.startswith(f"lorakit serve: error: --adapters {multi} is one adapter's folder"), line
    assert ("its subfolders other, third hold adapters of their own (peft's other adapters, or checkpoints), which "
            f"are not served: copy one beside it under a name of its own (cp -r {multi / 'other'} "
            f"{tmp_path / 'adapters' / 'multi-other'})") in line

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    state = build_state(parser.parse_args(["--model", str(base), "--adapters", str(tmp_path / "adapters"),
                                           "--decoder", "transformers"]))
    try:
        out = capsys.readouterr().out
        assert f"folder 'multi' in {tmp_path / 'adapters'} is served as one adapter; its subfolders other, third " in out
        assert "folder 'run' in" in out and "'run' in {} is served as one".format(tmp_path / "adapters") not in out
        assert state.pool.available() == ["multi"]
    finally:
        state.engine.close()
