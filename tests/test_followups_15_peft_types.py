"""peft adapters of another peft_type whose update is a low-rank product load as the plain LoRA they equal
(fifteenth session, peft-types; lorakit/peft_types.py).

Before, every peft_type but LORA was refused in one line. AdaLoRA (``B (A * E) * s / (ranknum + 1e-5)``, here saved
after rank pruning, with per-module ranks and lora_alpha 0), VeRA (shared vera_A / vera_B saved with
save_projection, sliced per layer), LoHa (a Hadamard product of two rank-r products: a rank r^2 LoRA; with a
rank_pattern and an alpha_pattern) and LoKr (a Kronecker product: kron(P1 Q1, P2 Q2) = kron(P1, P2) kron(Q1, Q2))
now load with peft's logits, through ``load_adapter``, ``lorakit generate``, ``lorakit merge`` and ``lorakit serve``;
``inspect`` says what each was converted from; ``trainable=True`` is refused; ``save_adapter`` writes a plain LoRA
that peft loads with the same logits. The other peft types keep a refusal, each with the right one of the two
messages (merge with peft first, or run with peft: no weight update to merge).
"""

from __future__ import annotations

import json
import re
import warnings

import httpx
import peft
import pytest
import torch
import transformers as tf

import lorakit
from conftest import TOLERANCE, assert_close
from lorakit.cli import main
from lorakit.io import CONFIG_NAME
from model_helpers import logits

IDS = torch.tensor([[7, 11, 12, 10, 9, 13], [4, 4, 8, 2, 15, 6]])


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _base(folder):
    return tf.AutoModelForCausalLM.from_pretrained(folder).eval()


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _adalora(base_folder, out):
    """Trained for 8 steps with AdaLoRA's budget schedule, so the saved file holds peft's rank_pattern: modules of
    different ranks (one pruned to nothing), each resized; lora_alpha 0 (peft scales by the layer's r then)."""
    config = peft.AdaLoraConfig(init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8, lora_alpha=0,
                                target_modules=["q_proj", "v_proj", "down_proj"])
    model = _quiet(peft.get_peft_model, _base(base_folder), config)
    _randomize(model, 1)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(0)
    ids = torch.randint(0, 18, (2, 7))
    for step in range(8):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    _quiet(model.save_pretrained, out)


def _vera(base_folder, out, save_projection=True):
    """q_proj (32 -> 32), up_proj (32 -> 40), down_proj (40 -> 32): each layer slices the shared matrices."""
    config = _quiet(peft.VeraConfig, r=4, target_modules=["q_proj", "up_proj", "down_proj"], save_projection=save_projection)
    model = _quiet(peft.get_peft_model, _base(base_folder), config)
    _randomize(model, 2)
    _quiet(model.save_pretrained, out)


def _loha(base_folder, out, r=3):
    config = peft.LoHaConfig(r=r, alpha=5, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
                             alpha_pattern={"down_proj": 3})
    model = _quiet(peft.get_peft_model, _base(base_folder), config)
    _randomize(model, 3)
    _quiet(model.save_pretrained, out)


def _lokr(base_folder, out):
    """Factor 1 whole, factor 2 a rank-2 product (3 for down_proj); decompose_factor 4 splits 32 as 4 x 8."""
    config = peft.LoKrConfig(r=2, alpha=3, decompose_factor=4, target_modules=["q_proj", "up_proj", "down_proj"],
                             rank_pattern={"down_proj": 3}, alpha_pattern={"q_proj": 7})
    model = _quiet(peft.get_peft_model, _base(base_folder), config)
    _randomize(model, 6)
    _quiet(model.save_pretrained, out)


MAKERS = {"adalora": _adalora, "vera": _vera, "loha": _loha, "lokr": _lokr}
ORIGINS = {"adalora": "AdaLoRA (ADALORA)", "vera": "VeRA (VERA)", "loha": "LoHa (LOHA)", "lokr": "LoKr (LOKR)"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from conftest import tiny_llama
    from test_train_helpers import tiny_tokenizer

    root = tmp_path_factory.mktemp("peft_types")
    base = root / "base"
    tokenizer = tiny_tokenizer()
    # the tokenizer's own vocabulary, so that every token an answer picks is text `lorakit generate` prints
    tiny_llama(seed=0, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=40).save_pretrained(base)
    tokenizer.save_pretrained(base)
    for name, make in MAKERS.items():
        make(base, root / "adapters" / name)
    return {"root": root, "base": base, "adapters": root / "adapters"}


def _theirs(saved, name):
    return _quiet(peft.PeftModel.from_pretrained, _base(saved["base"]), saved["adapters"] / name).eval()


@pytest.mark.parametrize("name", list(MAKERS))
def test_loads_with_peft_logits_saves_a_plain_lora_and_refuses_training(saved, name, tmp_path):
    folder = saved["adapters"] / name
    want = logits(_theirs(saved, name), IDS)
    assert (want - logits(_base(saved["base"]), IDS)).abs().max() > 1e-2  # the adapter matters
    model = _base(saved["base"])
    lorakit.load_adapter(model, folder)
    assert_close(logits(model, IDS), want)
    # a plain LoRA that peft loads with the same logits, and that lorakit trains as one
    lorakit.save_adapter(model, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / CONFIG_NAME).read_text())["peft_type"] == "LORA"
    again = _quiet(peft.PeftModel.from_pretrained, _base(saved["base"]), tmp_path / "plain").eval()
    assert_close(logits(again, IDS), want)
    trained = _base(saved["base"])
    lorakit.load_adapter(trained, tmp_path / "plain", trainable=True)
    assert_close(logits(trained, IDS), want)
    # training it as loaded would not be the method peft trains: one line, the model untouched
    fresh = _base(saved["base"])
    with pytest.raises(lorakit.LorakitError, match=re.escape(ORIGINS[name].split(" (")[0] + " (peft trains")
                       + ".*trainable=False.*lorakit.save_adapter") as error:
        lorakit.load_adapter(fresh, folder, trainable=True)
    assert "\n" not in str(error.value) and not lorakit.adapter_names(fresh)


def test_adalora_pruned_ranks_are_dropped(saved):
    """The saved file holds modules of several ranks (peft's rank_pattern), one with none left: read at those ranks,
    the empty module dropped (no update), each scaled by lora_alpha 0's rule (its own r / (init_r + 1e-5))."""
    raw = json.loads((saved["adapters"] / "adalora" / CONFIG_NAME).read_text())
    kept = {k.rsplit(".", 1)[0]: sum(v) for k, v in raw["rank_pattern"].items()}
    assert len(set(kept.values())) > 1 and 0 in kept.values()
    adapter = lorakit.read_adapter(saved["adapters"] / "adalora")
    assert {p: adapter.config.rank_for(p) for p in adapter.config.target_modules} == {
        p: r for p, r in kept.items() if r}
    assert all(adapter.config.scaling_for(p) == 1 for p in adapter.config.target_modules)


def test_cli_generate_merge_and_inspect(saved, tmp_path, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(saved["base"])
    for name in MAKERS:
        folder = saved["adapters"] / name
        theirs = _theirs(saved, name)
        for prompt in ("reverse b c a :", "copy a b", "a b c d", "d e f"):  # the first whose answer is some text
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                answer = theirs.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            expected = tokenizer.decode(answer[0, ids.shape[1]:], skip_special_tokens=True).strip()
            if expected:
                break
        capsys.readouterr()
        assert main(["generate", "--model", str(saved["base"]), "--adapter", str(folder), "--no-chat",
                     "--max-new-tokens", "6", prompt]) == 0
        printed = capsys.readouterr().out
        assert expected and expected in printed, (name, expected, printed)
        assert main(["merge", "--model", str(saved["base"]), "--adapter", str(folder),
                     "--out", str(tmp_path / name)]) == 0
        assert_close(logits(_base(tmp_path / name), IDS), logits(theirs, IDS))
        capsys.readouterr()
        assert main(["inspect", str(folder)]) == 0
        assert f"peft {ORIGINS[name]}, loaded as the plain LoRA it equals" in capsys.readouterr().out


def test_served_with_peft_logprobs(saved):
    """``lorakit serve`` (the CPU path, a real socket) answers each adapter greedily with peft's log-probabilities."""
    from test_serve_support import ServerProcess

    prompt = IDS[0].tolist()
    process = ServerProcess(saved["base"], saved["adapters"], "--max-tokens", "8", "--max-batch", "2", "--max-context", "64",
                            log=saved["root"] / "server.log")
    try:
        with httpx.Client(base_url=process.url, timeout=60) as client:
            for name in MAKERS:
                response = client.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 5,
                                                                 "temperature": 0, "logprobs": 1})
                assert response.status_code == 200, response.text
                got = response.json()["choices"][0]["logprobs"]["token_logprobs"]
                theirs, ids, want = _theirs(saved, name), torch.tensor([prompt]), []
                for _ in range(len(got)):
                    scores = torch.log_softmax(logits(theirs, ids)[0, -1], -1)
                    token = int(scores.argmax())
                    want.append(float(scores[token]))
                    ids = torch.cat([ids, torch.tensor([[token]])], 1)
                rtol, atol = TOLERANCE[torch.float32]
                torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=rtol, atol=atol, msg=name)
    finally:
        process.stop()


def test_vera_only_bias_on_a_base_without_biases(saved, tmp_path):
    """VeRA's bias="vera_only" (LoRA's "lora_only") on layers with no bias saves none: peft's logits; it was refused
    as an unsupported bias option."""
    config = _quiet(peft.VeraConfig, r=4, target_modules=["q_proj"], save_projection=True, bias="vera_only")
    model = _quiet(peft.get_peft_model, _base(saved["base"]), config)
    _randomize(model, 4)
    _quiet(model.save_pretrained, tmp_path / "vera")
    ours = _base(saved["base"])
    lorakit.load_adapter(ours, tmp_path / "vera")
    assert_close(logits(ours, IDS), logits(_theirs({**saved, "adapters": tmp_path}, "vera"), IDS))


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 4, 1)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.conv(x).transpose(1, 2))


def test_loha_of_a_convolution_is_refused_in_one_line(tmp_path):
    """A LoHa of a Conv1d (kernel 1: its factors are matrices too) is not read as a linear layer's: refused, the
    model left as it was."""
    torch.manual_seed(0)
    model = _quiet(peft.get_peft_model, _ConvNet(), peft.LoHaConfig(r=2, target_modules=["conv", "lin"]))
    _randomize(model, 5)
    _quiet(model.save_pretrained, tmp_path / "loha")
    ours = _ConvNet()
    with pytest.raises(lorakit.LorakitError, match=r": conv is a Conv1d, and lorakit reads LoHa adapters of linear "
                                                   r"layers only: merge this one with peft") as error:
        lorakit.load_adapter(ours, tmp_path / "loha")
    assert "\n" not in str(error.value) and not lorakit.adapter_names(ours)


def _refused(folder, pattern):
    with pytest.raises(lorakit.LorakitError, match=pattern) as error:
        lorakit.read_adapter(folder)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_what_is_still_refused_says_why(saved, tmp_path):
    # VeRA whose config says its shared matrices were saved, and whose weights lack them (save_projection=False
    # files, which peft draws again from projection_prng_key, load: test_followups_20_peft)
    from safetensors.torch import load_file, save_file

    _vera(saved["base"], tmp_path / "vera-key")
    weights = tmp_path / "vera-key" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if k != "base_model.vera_B"}, weights)
    _refused(tmp_path / "vera-key", r"lack the shared matrices vera_A / vera_B that its config says were saved")
    # LoHa of ranks 17 x 17: a plain LoRA of rank 289
    _loha(saved["base"], tmp_path / "loha-wide", r=17)
    _refused(tmp_path / "loha-wide", r"LoHa of ranks 17 and 17, which is a LoRA of rank 289 .*merge_and_unload")
    # an update that is no low-rank product: merge it with peft, then load the merged model
    for name, config in {"hra": peft.HRAConfig(r=2, target_modules=["q_proj"]),
                         "ia3": peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
                         "oft": peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj"]),
                         "fourierft": peft.FourierFTConfig(n_frequency=16, target_modules=["q_proj"])}.items():
        _quiet(peft.get_peft_model, _base(saved["base"]), config).save_pretrained(tmp_path / name)
        _refused(tmp_path / name, rf"peft_type '{name.upper()}' is not LoRA; .*merge this one into the base with peft")
    # no weight update at all (virtual tokens, or layers of its own whose merge peft refuses): run it with peft
    _quiet(peft.get_peft_model, _base(saved["base"]), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=2)).save_pretrained(tmp_path / "prefix")
    _refused(tmp_path / "prefix", r"peft_type 'PREFIX_TUNING' is not LoRA \(it adds trained virtual tokens.*PeftModel")
    for kind in ("LILY", "SHADOW"):
        with pytest.raises(lorakit.LorakitError, match=rf"'{kind}' is not LoRA \(it adds .*run this one with peft"):
            lorakit.LoraConfig.from_peft_dict({"peft_type": kind, "target_modules": ["q_proj"]})
    # the converted types come from a whole folder, not from their config alone
    raw = json.loads((saved["adapters"] / "adalora" / CONFIG_NAME).read_text())
    with pytest.raises(lorakit.LorakitError, match=r"'ADALORA' \(AdaLoRA\) is read from its whole adapter folder.*"
                                                   r"lorakit.load_adapter\(model, folder\)"):
        lorakit.LoraConfig.from_peft_dict(raw)
