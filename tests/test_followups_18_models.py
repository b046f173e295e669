"""Eighteenth follow-ups: other models' folders as a new user brings them, where the earlier audits did not look.

Each model is a tiny random one (transformers' own config classes, hidden 32, vocab 128) saved with
``save_pretrained`` beside the word-level test tokenizer. The README's workflows (``lorakit.load_base`` + inject +
save + merge in Python; ``lorakit merge`` / ``generate`` / ``train`` on the command line) must work on them, the
merged folder giving the unmerged adapter's logits, or fail in one line that says what to do. Here: DeepSeek-V3's
float32 router tensors through a bf16 merge, an activation transformers lacks, weights saved under a DDP /
torch.compile prefix, a Mistral GGUF with a sliding window, BART-style decoders in batched generation, an index
naming a pickle as a shard, and pipes / devices / folders where a model's or adapter's files go.

(Checked and left without a test, all fine: train / generate / merge / peft of 35 more families, among them CodeGen,
GPT-J, GPT-Neo, MPT, Persimmon, Nemotron, Helium, GLM, DeepSeek-V2, MiniCPM3, JetMoE, BitNet, CTRL, dots1, Hunyuan
MoE, EXAONE MoE, LFM2 MoE, FlexOlmo; merged == unmerged with random A and B, LoRA and DoRA, also on embeddings, on
96 families; llama3 / yarn / dynamic / linear / longrope rotary through merge; real-world generation_config.json
shapes; safetensors without metadata.)
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import lorakit
from conftest import assert_close
from lorakit.cli import main
from model_helpers import logits, seeded_model
from test_train_helpers import task_records, tiny_tokenizer, write_jsonl

VOCAB = 128
# the tokenizer's <s> is 1 and <|im_end|> (eos, pad) is 3: the configs name the same ids
GQA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=3, pad_token_id=3)
IDS = torch.tensor([[1, 7, 10, 11, 8, 3, 12, 13, 40, 41, 90, 91], [1, 9, 12, 14, 15, 8, 3, 3, 60, 61, 100, 101]])


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def random_adapter(model, std: float = 0.1) -> None:
    """Non-zero B matrices (a freshly injected adapter is the identity)."""
    for name, parameter in lorakit.lora_parameters(model):
        if name.endswith("lora_B"):
            torch.nn.init.normal_(parameter, std=std)


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as weights:
        return {key: weights.get_tensor(key) for key in weights.keys()}


# -- tensors transformers keeps in float32 -------------------------------------------------------------------------
def deepseek_v3_with_router_bias():
    """DeepSeek-V3 (a dense first layer, then 4 routed experts + a shared one) whose router bias
    ``e_score_correction_bias`` holds values like a trained model's: close to each other, a few thousandths apart,
    so that which experts a token goes to depends on digits bfloat16 does not keep (3.0050 and 3.0077 are both 3.0
    there). transformers keeps that bias and the router weight in float32 even when it loads the model in bfloat16
    (``_keep_in_fp32_modules_strict``)."""
    model = seeded_model("DeepseekV3ForCausalLM", "DeepseekV3Config", dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1, first_k_dense_replace=1,
        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1,
        **{**GQA, "num_key_value_heads": 4}))
    generator = torch.Generator().manual_seed(0)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(3.0 + 0.01 * torch.rand(buffer.shape, generator=generator))
    return model


KEPT = ("model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.mlp.gate.weight")


def test_a_bf16_merge_keeps_the_router_tensors_transformers_keeps_in_float32(tmp_path, capsys):
    """``lorakit merge`` writes bfloat16 by default; it cast every tensor, the DeepSeek router's float32 bias too
    ([3.0050, 3.0077, 3.0009, 3.0013] became [3, 3, 3, 3]), and transformers upcast those rounded values on load: the
    merged folder sent tokens to other experts than the model it came from. Those tensors stay float32 now, bit for
    bit, and the merged folder gives the unmerged adapter's logits (bfloat16 tolerance)."""
    base = deepseek_v3_with_router_bias()
    folder = tmp_path / "deepseek"
    base.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    model, _ = lorakit.load_base(str(folder), device="cpu")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_b_proj", "o_proj"]))
    random_adapter(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    expected = logits(model, IDS)

    code, out, err = cli(capsys, "merge", "--model", folder, "--adapter", tmp_path / "adapter", "--out",
                         tmp_path / "merged")
    assert code == 0, err
    written, original = saved_tensors(tmp_path / "merged"), dict(base.named_parameters()) | dict(base.named_buffers())
    for key in KEPT:
        assert written[key].dtype == torch.float32, key
        assert torch.equal(written[key], original[key]), key
    assert written["model.layers.0.self_attn.q_b_proj.weight"].dtype == torch.bfloat16  # the rest: bfloat16, as asked

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).eval()
    assert_close(logits(merged, IDS), expected)


# -- config.json values this transformers does not know ------------------------------------------------------------
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_an_activation_transformers_lacks_names_its_field(quantize, tmp_path):
    """An activation transformers has no entry for (a typo, or one a newer transformers added: "relu2", "xielu"
    on an older install) failed as "cannot load the model in DIR: 'swishy'", a bare KeyError's words that named no
    field and no fix; the NF4 load raised the KeyError itself, a traceback."""
    import json

    from conftest import tiny_llama
    from lorakit.errors import LorakitError

    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "swishy"}))
    with pytest.raises(LorakitError) as refused:
        lorakit.load_base(str(folder), device="cpu", quantize=quantize)
    assert str(refused.value) == (f'{folder / "config.json"}: "hidden_act": "swishy" is not a value transformers '
                                  f"{__import__('transformers').__version__} knows (a typo, or one a newer transformers "
                                  "added?); use the config.json saved with the weights, or upgrade transformers")


# -- weights saved under a wrapper's names -------------------------------------------------------------------------
@pytest.mark.parametrize("prefix, wrapper", [("module.", "DistributedDataParallel or DataParallel: model.module"),
                                             ("_orig_mod.", "torch.compile: model._orig_mod")])
def test_weights_saved_from_a_wrapper_are_named_with_the_prefix_and_the_fix(prefix, wrapper, tmp_path, capsys):
    """A state_dict taken from a DistributedDataParallel or torch.compile wrapper and written with safetensors'
    save_file has every name prefixed ("module.model.layers.0..."): transformers finds none of the model's tensors,
    and lorakit said "the safetensors weights lack 21 of the model's tensors; the folder is incomplete or its
    config.json is for another model", though every weight is there. The line names the prefix, the wrapper and a
    fix, and the fix it gives makes the folder load with the saved weights."""
    from safetensors.torch import load_file, save_file

    from conftest import tiny_llama

    original = tiny_llama()
    folder = tmp_path / "own loop"
    original.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    weights = folder / "model.safetensors"
    save_file({prefix + key: value.contiguous() for key, value in original.state_dict().items()}, weights,
              metadata={"format": "pt"})
    data = write_jsonl(tmp_path / "train.jsonl", task_records(8, seed=1))
    code, out, err = cli(capsys, "train", "--model", folder, "--data", data, "--out", tmp_path / "run")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.strip() == (
        f"lorakit train: error: {folder}: the weights are saved under the prefix {prefix!r} (e.g. "
        f"'{prefix}lm_head.weight' for 'lm_head.weight'), as a wrapper's state_dict names them ({wrapper}); save the "
        "model itself with save_pretrained; or take the prefix off once: from safetensors.torch import load_file, "
        f"save_file; f = '{weights}'; save_file({{k.removeprefix({prefix!r}): v for k, v in load_file(f).items()}}, f, "
        "metadata={'format': 'pt'})")
    save_file({k.removeprefix(prefix): v for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    model, _ = lorakit.load_base(str(folder), device="cpu")
    assert_close(logits(model, IDS), logits(original, IDS))


# -- GGUF of a Mistral with a sliding window -----------------------------------------------------------------------
def test_a_mistral_gguf_declares_the_context_its_sliding_window_allows(tmp_path):
    """Mistral 7B v0.1 attends over a 4096-token window within a 32768-token context; llama.cpp runs Mistral as
    llama, whose graph has no window, and the GGUF declared the full context: past the window llama.cpp attended
    to every earlier token (here, 10 tokens past a window of 4: logits off by 11). The file now declares the window
    as its context, within which it gives the merged model's logits, and the export says so."""
    import warnings

    import gguf
    from transformers import AutoModelForCausalLM

    from lorakit.export import export_merged
    from test_gguf_architectures import IDS as LONG, SHAPE, qwen_tokenizer

    tokenizer = qwen_tokenizer()
    model = seeded_model("MistralForCausalLM", "MistralConfig", dict(vocab_size=len(tokenizer), sliding_window=4,
                                                                     **SHAPE))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["o_proj"]), adapter="x")
    random_adapter(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_merged(model, tokenizer, "x", tmp_path / "out", gguf_type="f16", name="m")
    assert [str(w.message) for w in caught if "sliding window" in str(w.message)] == [
        "llama.cpp runs this mistral model without its sliding window (4 tokens), so the GGUF declares a context of 4 "
        "tokens, not 256: within it llama.cpp attends as the model does, past it to every earlier token"]
    assert gguf.GGUFReader(tmp_path / "out" / "m-f16.gguf").fields["llama.context_length"].contents() == 4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="m-f16.gguf").eval()
    within = LONG[:, :4]
    expected = logits(merged, within)
    torch.testing.assert_close(logits(from_gguf, within), expected, rtol=0, atol=0.02 * float(expected.abs().max()))


# -- decoders that number positions from the cache's length -------------------------------------------------------
BART_DECODER = dict(vocab_size=VOCAB, d_model=32, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4,
                    encoder_attention_heads=4, decoder_ffn_dim=48, encoder_ffn_dim=48, max_position_embeddings=128,
                    bos_token_id=1, eos_token_id=3, pad_token_id=3)


def test_a_decoder_numbering_positions_from_the_cache_is_refused_by_generation(tmp_path, capsys):
    """BlenderbotForCausalLM (and BART's, mBART's, Pegasus', Marian's, TrOCR's decoders) take no position_ids: they
    number positions from the cache's length, so a prompt left-padded beside a longer one was read at shifted
    positions and lorakit's batched generation answered it otherwise than alone ([12, 12, 12, 109] beside a longer
    prompt, [56, 56, 56, 56] alone, on this seeded model). Its generation now refuses such models in one line, as it
    does RWKV's; GPT-2, Bloom and MPT (positions from position_ids or from the mask) are not affected."""
    from lorakit import generation as G
    from lorakit.errors import LorakitError

    model = seeded_model("BlenderbotForCausalLM", "BlenderbotConfig", BART_DECODER)
    with torch.no_grad():  # transformers' own greedy: the second prompt alone and beside the first
        alone = model.generate(torch.tensor([[1, 9, 12]]), max_new_tokens=4, do_sample=False, eos_token_id=None,
                               forced_eos_token_id=None)[0, 3:].tolist()
        batch = model.generate(torch.tensor([[1, 7, 10, 11, 8, 12], [0, 0, 0, 1, 9, 12]]),
                               attention_mask=torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]]), max_new_tokens=4,
                               do_sample=False, eos_token_id=None, forced_eos_token_id=None, pad_token_id=0)
    assert batch[1, 6:].tolist() != alone  # the batch changes the answer: the model cannot run left-padded rows
    with pytest.raises(LorakitError, match=r"^lorakit's generation does not support BlenderbotForCausalLM: it numbers "
                                           r"positions from the cache's length \(its forward takes no position_ids\)"):
        G.generate(model, [[1, 7, 10, 11, 8, 12], [1, 9, 12]], [None, None], G.SamplingParams(max_new_tokens=4))
    others = [("GPT2LMHeadModel", "GPT2Config", dict(n_embd=32, n_layer=1, n_head=4)),
              ("BloomForCausalLM", "BloomConfig", dict(hidden_size=32, n_layer=1, n_head=4)),
              ("MptForCausalLM", "MptConfig", dict(d_model=32, n_layers=1, n_heads=4))]
    for model_class, config_class, shape in others:
        assert G.unsupported(seeded_model(model_class, config_class, dict(vocab_size=VOCAB, **shape))) is None

    folder = tmp_path / "blenderbot decoder"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    code, out, err = cli(capsys, "generate", "--model", folder, "--max-new-tokens", 3, "reverse a b :")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "BlenderbotForCausalLM" in err, err


# -- an index naming shards that are not safetensors ---------------------------------------------------------------
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_an_index_naming_a_pickle_as_a_shard_is_refused_before_anything_unpickles_it(quantize, tmp_path, monkeypatch):
    """transformers picks a shard's reader by its name's ending, even for model.safetensors.index.json and with
    use_safetensors=True: an index naming "model-00002-of-00002.bin" (a pickle, as old sharded saves wrote them) sent
    that file to torch.load, which unpickled it (lorakit never unpickles), and a shard named "config.json" failed as
    an UnpicklingError traceback. Such an index is refused in one line before any weight is read."""
    import json

    from conftest import tiny_llama
    from lorakit.errors import LorakitError

    folder = tmp_path / "sharded"
    tiny_llama().save_pretrained(folder, max_shard_size="30KB")
    tiny_tokenizer().save_pretrained(folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    renamed = last.replace(".safetensors", ".bin")
    (folder / last).rename(folder / renamed)
    index["weight_map"] = {key: renamed if shard == last else shard for key, shard in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    unpickled = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: unpickled.append(args) or {})
    with pytest.raises(LorakitError) as refused:
        lorakit.load_base(str(folder), device="cpu", quantize=quantize)
    assert str(refused.value) == (f"{index_path}: shard {renamed!r} is not a .safetensors file; lorakit reads "
                                  "safetensors weights only (it never unpickles a file): download "
                                  "model.safetensors.index.json again")
    assert unpickled == []


# -- a pipe, device or folder where a tokenizer or generation file goes --------------------------------------------
@pytest.mark.timeout(60)  # the old load waited for the pipe's writer forever
@pytest.mark.parametrize("name, kind", [("tokenizer.json", "fifo"), ("generation_config.json", "fifo"),
                                        ("tokenizer_config.json", "device"), ("chat_template.jinja", "folder")])
def test_a_pipe_device_or_folder_in_a_model_files_place_is_one_line(name, kind, tmp_path):
    """A FIFO named tokenizer.json, tokenizer_config.json or generation_config.json made lorakit.load_base (and every
    command) wait forever, as transformers opened it; a link to /dev/zero there read without end. Such files are
    named before anything is opened, as check_weights_file names them in a safetensors file's place."""
    import os

    from conftest import tiny_llama
    from lorakit.errors import LorakitError

    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    path = folder / name
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    what = "a folder" if kind == "folder" else "not a regular file (a pipe, socket or device)"
    with pytest.raises(LorakitError) as refused:
        lorakit.load_base(str(folder), device="cpu")
    assert str(refused.value) == f"{folder}: {name} is {what}; it must be the file itself: download or copy it again"


@pytest.mark.timeout(60)
def test_a_pipe_in_an_adapter_folders_tokenizer_is_one_line(tmp_path, capsys):
    """An adapter folder carrying its own tokenizer (as transformers' Trainer saves it) with a FIFO for
    tokenizer_config.json: lorakit generate --adapter waited forever; now one line (lorakit serve already said it)."""
    import os

    from conftest import tiny_llama

    folder = tmp_path / "model"
    model = tiny_llama()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    adapter = tmp_path / "adapter"
    lorakit.save_adapter(model, adapter)
    tiny_tokenizer().save_pretrained(adapter)
    (adapter / "tokenizer_config.json").unlink()
    os.mkfifo(adapter / "tokenizer_config.json")
    code, out, err = cli(capsys, "generate", "--model", folder, "--adapter", adapter, "--max-new-tokens", 2, "a")
    assert code == 2 and err.strip() == (f"lorakit generate: error: {adapter}: tokenizer_config.json is not a regular "
                                         "file (a pipe, socket or device); it must be the file itself: download or "
                                         "copy it again"), err
