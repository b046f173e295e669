"""Adapters saved by the real peft package (0.21) that users bring to lorakit, in the ways earlier peft tests left
out (seventeenth session): peft's conversion of a PiSSA / OLoRA / CorDA adapter to a plain LoRA
(path_initial_model_for_weight_conversion), which drops every tensor but the linear layers' lora_A / lora_B.

Each case builds the adapter with peft on a tiny random model (random non-zero weights) and compares lorakit's
logits with peft's, element by element (conftest's float32 tolerance), or checks a one-line refusal that names the
cause.
"""

from __future__ import annotations

import re
import warnings

import peft
import pytest
import torch

import lorakit
from conftest import assert_close
from test_peft_sweep import build, logits, randomize_peft, refusal

IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 99], [2, 4, 8, 16, 32, 63, 98]])


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes (tied embeddings, pissa on an embedding it leaves alone, ...)
        return function(*args, **kwargs)


# -- peft's conversion of a base-rewriting init to a plain LoRA ------------------------------------------------------
CONVERTED = {  # what peft's conversion drops, on the init that peft rewrites the base with
    "dora-magnitudes": ("llama", dict(target_modules=["q_proj", "v_proj"], init_lora_weights="olora", use_dora=True)),
    "embedding-lora": ("llama", dict(target_modules=["q_proj", "embed_tokens"], init_lora_weights="pissa")),
    "head-copy": ("llama", dict(target_modules=["q_proj"], init_lora_weights="pissa", modules_to_save=["lm_head"])),
    "token-rows": ("llama-tied", dict(target_modules=["q_proj"], init_lora_weights="olora", trainable_token_indices=[3, 4])),
    "conv1d-norm-copy-dora": ("gpt2", dict(target_modules=["c_attn"], init_lora_weights="pissa", modules_to_save=["ln_f"],
                                           use_dora=True)),
}


@pytest.mark.parametrize("case", list(CONVERTED))
def test_a_conversion_that_dropped_tensors_says_so_and_the_unconverted_file_loads(case, tmp_path):
    """peft's save_pretrained(..., path_initial_model_for_weight_conversion=...) (which lorakit's refusal of a CorDA
    or pissa_niter adapter suggests) writes only the linear layers' lora_A / lora_B: DoRA magnitudes, an embedding's
    LoRA, modules_to_save copies and trained token rows are dropped, and peft's own load then fails (a KeyError) or
    runs without them. lorakit said "missing tensor keys: ..." or "... disagree ...; save the adapter again with
    peft", which cannot help. Now the refusal says what the conversion dropped and what to load instead; the file
    saved without the conversion loads with the trained adapter's logits."""
    kind, options = CONVERTED[case]
    theirs = quiet(peft.get_peft_model, build(kind), peft.LoraConfig(r=4, lora_alpha=8, **options)).eval()
    theirs.peft_config["default"].init_lora_weights = True  # peft's recipe: the starting A0, B0 as a plain file
    quiet(theirs.save_pretrained, tmp_path / "start")
    theirs.peft_config["default"].init_lora_weights = options["init_lora_weights"]
    randomize_peft(theirs)  # "training"
    expected = logits(theirs, IDS)
    quiet(theirs.save_pretrained, tmp_path / "converted",
          path_initial_model_for_weight_conversion=str(tmp_path / "start"))
    quiet(theirs.save_pretrained, tmp_path / "as-trained")
    message = refusal(tmp_path / "converted", build(kind))
    assert re.search(r"(missing tensor keys|disagree).*; the file holds only the lora_A / lora_B weights of linear "
                     r"layers, as peft's save_pretrained\(\.\.\., path_initial_model_for_weight_conversion=\.\.\.\) "
                     r"writes them: that conversion .* drops DoRA magnitudes, LoRA on embeddings, modules_to_save copies "
                     r"and trained token rows", message), message
    ours = build(kind)
    lorakit.load_adapter(ours, tmp_path / "as-trained")
    assert_close(logits(ours, IDS), expected)
    assert (expected - logits(build(kind), IDS)).abs().max() > 1e-2  # the adapter matters


def test_a_converted_file_of_linear_layers_alone_loads_with_the_trained_logits(tmp_path):
    """The conversion of an adapter on linear layers only loses nothing: lorakit loads it (rank 2r) with the trained
    model's logits, and a file missing a linear layer's factor is still refused without the conversion's note."""
    theirs = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights="pissa_niter_2")).eval()
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "start")
    theirs.peft_config["default"].init_lora_weights = "pissa_niter_2"
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "start"))
    ours = build("llama")
    lorakit.load_adapter(ours, tmp_path / "converted")
    assert_close(logits(ours, IDS), logits(theirs, IDS))
    assert ours.model.layers[0].self_attn.q_proj.adapters["default"].rank == 8
    from safetensors.torch import load_file, save_file

    from lorakit.io import WEIGHTS_NAME

    tensors = load_file(tmp_path / "converted" / WEIGHTS_NAME)
    save_file({k: v for k, v in tensors.items() if "layers.1.self_attn.v_proj.lora_B" not in k},
              tmp_path / "converted" / WEIGHTS_NAME)
    message = refusal(tmp_path / "converted", build("llama"))
    assert "missing tensor keys: base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in message
    assert "path_initial_model_for_weight_conversion" not in message


# -- KaSA with an init ---------------------------------------------------------------------------------------------
def test_kasa_with_an_init_that_leaves_the_base_alone_loads_both_ways(tmp_path):
    """peft makes KaSA adapters with init_lora_weights 'orthogonal' or 'eva' (inits of A and B only, the saved
    weights are final): lorakit refused them as "not an adapter peft makes". They load as KaSA does: peft's logits,
    its merge, and a plain LoRA file that peft reads back."""
    from peft.tuners.lora.config import KasaConfig

    from test_peft_sweep import peft_saved, round_trip

    quiet(round_trip, "llama", tmp_path / "orthogonal", target_modules=["q_proj", "v_proj"], init_lora_weights="orthogonal",
          kasa_config=KasaConfig())
    theirs = quiet(peft_saved, "llama", tmp_path / "eva", target_modules=["q_proj"], init_lora_weights="eva",
                   kasa_config=KasaConfig())
    ours = build("llama")
    lorakit.load_adapter(ours, tmp_path / "eva")
    assert_close(logits(ours, IDS), logits(theirs, IDS))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_kasa_on_a_pissa_or_olora_base_is_refused_saying_what_peft_did(init, tmp_path):
    """KaSA with init_lora_weights 'pissa' / 'olora': peft makes it (the init rewrites the base, then KaSA truncates
    what it left) and reloads it with the same logits. lorakit's refusal said "is not an adapter peft makes"; it now
    says the base was rewritten twice and to merge with peft, which gives the adapter's logits."""
    from peft.tuners.lora.config import KasaConfig

    theirs = quiet(peft.get_peft_model, build("llama"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init, kasa_config=KasaConfig())).eval()
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path)
    expected = logits(theirs, IDS)
    message = refusal(tmp_path, build("llama"))
    assert (f"kasa_config with init_lora_weights='{init}': peft rewrote the base twice (the init, then KaSA's truncation "
            "of what it left), and lorakit repeats one such rewrite only; merge the adapter with peft (merge_and_unload)"
            in message), message
    merged = quiet(peft.PeftModel.from_pretrained, build("llama"), tmp_path).merge_and_unload().eval()
    assert_close(logits(merged, IDS), expected)  # the advice works


# -- options no merge can carry ------------------------------------------------------------------------------------
def test_layer_replication_is_not_sent_to_peft_s_merge(tmp_path):
    """A layer_replication adapter (layers repeated, sharing their base weights, one LoRA per copy) was refused with
    "merge the adapter with peft (merge_and_unload) and load the merged model", but peft's merge adds each copy's
    update into the shared weights: a model with other logits. The refusal now says to run it with peft."""
    from test_peft_sweep import peft_saved

    theirs = peft_saved("llama", tmp_path, target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 2]])
    expected = logits(theirs, IDS)
    merged = peft.PeftModel.from_pretrained(build("llama"), tmp_path).merge_and_unload()
    assert (logits(merged, IDS) - expected).abs().max() > 1e-2  # why merging is not the advice
    message = refusal(tmp_path, build("llama"))
    assert re.search(r"PEFT option layer_replication=\[\[0, 2\], \[1, 2\]\] is not supported by lorakit \(layers "
                     r"duplicated inside the model\); run it with peft \(PeftModel.from_pretrained\): peft's "
                     r"merge_and_unload gives wrong weights for it", message), message


def test_activated_lora_and_arrow_are_not_sent_to_a_merge_peft_refuses(tmp_path):
    """aLoRA (alora_invocation_tokens) acts only after its invocation tokens and Arrow routes each token among LoRA
    experts: peft's merge_and_unload raises for both, so the advice to merge them could not be followed."""
    from test_peft_sweep import edit, peft_saved

    peft_saved("llama", tmp_path, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[3, 4])
    with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
        peft.PeftModel.from_pretrained(build("llama"), tmp_path).merge_and_unload()
    message = refusal(tmp_path, build("llama"))
    assert "alora_invocation_tokens=[3, 4] is not supported by lorakit (activated LoRA, switched on by tokens); run it " \
           "with peft (PeftModel.from_pretrained): it acts only after its invocation tokens" in message, message
    edit(tmp_path, config=lambda c: {**c, "alora_invocation_tokens": None, "arrow_config": {"top_k": 2}})
    message = refusal(tmp_path, build("llama"))
    assert "arrow_config={'top_k': 2} is not supported by lorakit (Arrow's routing of each token among several LoRA " \
           "experts); run it with peft (PeftModel.from_pretrained)" in message, message
    assert "merge the adapter with peft" not in message


def test_a_convolution_target_says_what_to_do(tmp_path):
    """peft's LoRA on a Conv2d (a vision tower's patch embedding) was refused with "target ... is a Conv2d; lorakit
    adapts nn.Linear, ... only", which says what is wrong but not what to do. It now says to leave it out of
    target_modules, or, for peft's file, to merge with peft (whose merge gives the adapter's outputs)."""
    import transformers as tf

    def clip():
        torch.manual_seed(0)
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2, image_size=16, patch_size=8)).eval()

    pixels = torch.randn(2, 3, 16, 16)
    theirs = peft.get_peft_model(clip(), peft.LoraConfig(r=2, target_modules=["q_proj", "patch_embedding"])).eval()
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path)
    model = clip()
    with pytest.raises(lorakit.LorakitError, match=r"target 'embeddings.patch_embedding' is a Conv2d; lorakit adapts .*: "
                                                   r"leave it out of target_modules \(an adapter peft saved for such a "
                                                   r"layer: merge it with peft's merge_and_unload") as error:
        lorakit.load_adapter(model, tmp_path)
    assert "\n" not in str(error.value) and not lorakit.adapter_names(model)
    with torch.no_grad():  # the advice works: peft's merge keeps the adapter's outputs
        merged = peft.PeftModel.from_pretrained(clip(), tmp_path).merge_and_unload()
        assert_close(merged(pixel_values=pixels).last_hidden_state, theirs(pixel_values=pixels).last_hidden_state)
    with pytest.raises(lorakit.LorakitError, match="is a Conv2d; .*leave it out of target_modules"):
        lorakit.inject(clip(), lorakit.LoraConfig(r=2, target_modules=["patch_embedding"]))


# -- ensure_weight_tying with per-module ranks -----------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    dict(rank_pattern={"embed_tokens": 2}, alpha_pattern={"embed_tokens": 5}),
    dict(use_rslora=True, rank_pattern={"embed_tokens": 2, "lm_head": 6}, alpha_pattern={"embed_tokens": 5}),
], ids=["lora", "rslora-head-pattern"])
def test_a_tied_head_takes_the_embedding_s_rank_and_its_own_scaling(options, tmp_path):
    """ensure_weight_tying with a rank_pattern on the embedding: peft gives the tied lm_head the embedding's A and B
    (rank 2), scaled by lm_head's own rank and alpha from the config (4 and 8: scaling 2, where the embedding's is
    2.5). lorakit refused the head's tensors ("the tensors have rank 2, the config says 4: fix r / rank_pattern"),
    advice that would have changed the scaling. Now peft's logits both ways (its own merge is off on tied weights)."""
    from test_peft_sweep import round_trip

    quiet(round_trip, "llama-tied", tmp_path, target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True,
          peft_merge_ok=False, **options)


def test_trainable_tokens_listing_an_id_twice_are_refused_saying_so(tmp_path):
    """peft saves trainable_token_indices=[5, 9, 5] (two trained rows for token 5; torch's index_copy keeps one of
    them, which one undefined). lorakit refused it as "must be a list of token ids", which it is; it now names the
    id listed twice and why that cannot load."""
    from test_peft_sweep import edit, peft_saved

    peft_saved("llama", tmp_path, target_modules=["q_proj"], trainable_token_indices=[5, 9, 5])
    message = refusal(tmp_path, build("llama"))
    assert "trainable_token_indices lists token id 5 more than once; peft writes each entry's trained row into that " \
           "one row, and which write wins is undefined" in message, message
    edit(tmp_path, config=lambda c: {**c, "trainable_token_indices": {"embed_tokens": [1, 2, 3, 2]}})
    assert "lists token id 2 more than once" in refusal(tmp_path, build("llama"))


# -- transformers-4 per-expert MoE adapters of more families -----------------------------------------------------------
def _moe(kind):
    import transformers as tf

    tiny = dict(vocab_size=100, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
    torch.manual_seed(0)
    if kind == "deepseek_v3":  # a dense first layer and a shared expert beside the routed ones
        return tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, n_group=1,
            topk_group=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
            **tiny)).eval()
    return tf.PhimoeForCausalLM(tf.PhimoeConfig(num_local_experts=4, num_experts_per_tok=2, **tiny)).eval()


@pytest.mark.parametrize("kind, block, names", [("deepseek_v3", "mlp", ("gate_proj", "up_proj", "down_proj")),
                                                ("phimoe", "block_sparse_moe", ("w1", "w3", "w2"))])
def test_transformers4_expert_adapters_of_more_moe_families(kind, block, names, tmp_path):
    """Already right (kept so it stays that way): a hub adapter trained on transformers 4's per-expert layers of
    DeepSeek-V3 (gate_proj / up_proj / down_proj, also on its dense layer and shared expert) or PhiMoE
    (block_sparse_moe.experts.N.w1 / w3 / w2, now mlp.experts) loads onto transformers 5's fused experts with the
    logits of the base plus each update added by hand. (peft 0.21's own load gives other logits for DeepSeek-V3,
    and finds no target on PhiMoE.)"""
    import json

    from safetensors.torch import save_file

    gate, up, down = names
    model, reference = _moe(kind), _moe(kind)
    generator = torch.Generator().manual_seed(3)
    tensors, weights, modules = {}, dict(reference.named_parameters()), dict(reference.named_modules())

    def lora(key, in_features, out_features):
        A, B = torch.randn(2, in_features, generator=generator), 0.2 * torch.randn(out_features, 2, generator=generator)
        tensors[f"base_model.model.{key}.lora_A.weight"], tensors[f"base_model.model.{key}.lora_B.weight"] = A, B
        return 2.0 * B @ A  # lora_alpha 4 / r 2

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".experts.gate_up_proj"):  # (E, 2 x ffn, hidden) = [gate; up]
                fused, old = name[: -len(".gate_up_proj")], name.split(".mlp.")[0] + f".{block}.experts"
                ffn, hidden = parameter.shape[1] // 2, parameter.shape[2]
                for e in range(parameter.shape[0]):
                    weights[f"{fused}.gate_up_proj"][e, :ffn] += lora(f"{old}.{e}.{gate}", hidden, ffn)
                    weights[f"{fused}.gate_up_proj"][e, ffn:] += lora(f"{old}.{e}.{up}", hidden, ffn)
                    weights[f"{fused}.down_proj"][e] += lora(f"{old}.{e}.{down}", ffn, hidden)
        for name, module in model.named_modules():  # the dense MLP and the shared expert: plain linear layers
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in names:
                modules[name].weight += lora(name, module.in_features, module.out_features)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                              "target_modules": list(names), "task_type": "CAUSAL_LM"}))
    expected = logits(reference, IDS)
    assert (expected - logits(_moe(kind), IDS)).abs().max() > 1e-2
    lorakit.load_adapter(model, tmp_path)
    assert_close(logits(model, IDS), expected)


def test_token_rows_with_lora_on_the_tied_head_are_not_sent_to_peft_s_merge(tmp_path):
    """Trained token rows (of the embedding and of the lm_head tied to it) with LoRA on lm_head: lorakit cannot hold
    both on lm_head and said to merge with peft, whose merge_and_unload puts the rows and the LoRA into the one weight
    the two share (logits off by far more than any rounding). The refusal now says to run the adapter with peft."""
    from test_peft_sweep import peft_saved

    theirs = peft_saved("llama-tied", tmp_path, target_modules=["v_proj", "lm_head"], trainable_token_indices=[3, 7])
    merged = peft.PeftModel.from_pretrained(build("llama-tied"), tmp_path).merge_and_unload()
    assert (logits(merged, IDS) - logits(theirs, IDS)).abs().max() > 1e-1  # why merging is not the advice
    message = refusal(tmp_path, build("llama-tied"))
    assert "lm_head is also a LoRA target; lorakit cannot put trained token rows and LoRA on one module, and peft's " \
           "merge_and_unload adds both into the weight lm_head shares with model.embed_tokens" in message, message
    assert message.endswith("run this adapter with peft (PeftModel.from_pretrained)")


def test_token_rows_beside_an_embedding_target_that_layers_to_transform_leaves_out(tmp_path):
    """target_modules naming embed_tokens with layers_to_transform: peft adapts only modules with a layer index, so
    the embedding gets no LoRA and trainable_token_indices may train its rows. lorakit refused the file ("embed_tokens
    is also a LoRA target"), reading target_modules rather than what the file holds; peft's logits both ways now."""
    from test_peft_sweep import round_trip

    round_trip("llama", tmp_path, target_modules=["embed_tokens", "q_proj"], layers_to_transform=[1],
               trainable_token_indices=[3, 7])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_pissa_adapter_on_lm_head_with_peft_s_copy_of_the_rewritten_head(init, tmp_path):
    """target_modules naming lm_head makes peft save a full copy of its base (save_embedding_layers "auto"); with a
    pissa / olora init that base is the rewritten W - s B0 A0, so lorakit refused the copy as "differs from this
    model's", though peft's load rewrites the original W the same way. The copy equal to that rewrite is accepted:
    peft's logits both ways and in the merge. A copy from another base is still refused."""
    from safetensors.torch import load_file

    from lorakit.io import WEIGHTS_NAME
    from test_peft_sweep import round_trip

    round_trip("llama", tmp_path, target_modules=["q_proj", "lm_head"], init_lora_weights=init)
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "peft" / WEIGHTS_NAME)
    other = build("llama", seed=5)
    message = refusal(tmp_path / "peft", other)
    assert "lm_head.base_layer.weight is a full copy of lm_head.weight (peft's save_embedding_layers) that differs" \
        in message, message


@pytest.mark.parametrize("options", [dict(target_modules=["q_proj", "embed_tokens"]),
                                     dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])],
                         ids=["tied-lora", "tied-copy"])
def test_the_conversion_of_a_pickled_file_with_shared_tensors_works(options, tmp_path):
    """peft's save_pretrained(..., safe_serialization=False) of an ensure_weight_tying adapter pickles views: the
    head's LoRA is the embedding's transposed (not contiguous), a tied copy shares storage. The one-line conversion
    lorakit's refusal gives failed on them (safetensors refuses both); it copies each tensor now, and the converted
    folder loads with peft's logits."""
    theirs = quiet(peft.get_peft_model, build("llama-tied"),
                   peft.LoraConfig(r=4, ensure_weight_tying=True, **options)).eval()
    randomize_peft(theirs)
    quiet(theirs.save_pretrained, tmp_path, safe_serialization=False)
    message = refusal(tmp_path, build("llama-tied"))
    assert "is a pickled checkpoint; lorakit never unpickles files" in message
    exec(message.split('python -c "', 1)[1].split('"', 1)[0], {})  # weights_only=True: no code runs from the file
    ours = build("llama-tied")
    lorakit.load_adapter(ours, tmp_path)
    assert_close(logits(ours, IDS), logits(theirs, IDS))


@pytest.mark.parametrize("save_embedding_layers", ["auto", False])
def test_a_pissa_adapter_on_an_lm_head_tied_to_the_embedding_is_refused(save_embedding_layers, tmp_path):
    """pissa on an lm_head tied to the embedding: peft rewrites the one weight both use, so the embedding reads the
    rewritten W too. lorakit loaded the rewrite as a LoRA on lm_head alone: logits off by ~14 without a word (with
    peft's copy of the head in the file since it is accepted above; before that, when saved without it). Refused
    now, saying to run it with peft."""
    theirs = quiet(peft.get_peft_model, build("llama-tied"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                                            init_lora_weights="pissa")).eval()
    randomize_peft(theirs)
    quiet(theirs.save_pretrained, tmp_path, save_embedding_layers=save_embedding_layers)
    assert (logits(quiet(peft.PeftModel.from_pretrained, build("llama-tied"), tmp_path).eval(), IDS)
            - logits(theirs, IDS)).abs().max() < 1e-5  # peft itself is consistent
    message = refusal(tmp_path, build("llama-tied"))
    assert f"{tmp_path}: lm_head: init_lora_weights='pissa' rewrote its base weight, which lm_head shares with " \
           "model.embed_tokens (tied weights), so peft changed model.embed_tokens too" in message, message
    assert message.endswith("run this adapter with peft (PeftModel.from_pretrained)")
