"""Fourteenth new-user audit: folders of architectures no other test builds (transformers 5's newer families).

Each family is a tiny random model (transformers' own config classes: 2 layers, hidden 32, vocab 128) saved with
``save_pretrained`` beside the word-level test tokenizer, as a user's downloaded folder would be. Through
``lorakit.load_base`` it then takes the new user's path: LoRA on the default targets ("all-linear"), a training
step whose gradients reach every adapter tensor, ``save_adapter``, the folder loaded again with the adapter (same
logits), ``merge`` (same logits), and peft 0.21 reading lorakit's file (same logits). lorakit's batched generation
must give transformers' greedy tokens, and the static decoder must name why it does not run a family (a line, not
an exception), so callers keep transformers' forward. Layers a LoRA wrapper or an NF4Linear would break (routers that
subclass nn.Linear, weights their parent reads itself) are left alone, by "all-linear" and by ``--quantize nf4``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lorakit
from conftest import assert_close
from lorakit import generation as G
from lorakit.errors import LorakitError
from lorakit.inject import lora_layers
from model_helpers import hf_greedy, logits, seeded_model
from test_layers import randomize
from test_train_helpers import tiny_tokenizer

VOCAB = 128
# the tokenizer's <s> is 1 and <|im_end|> (eos, pad) is 3: the configs name the same ids
GQA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=3, pad_token_id=3)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=8)  # heads x head = 2 x hidden

# family -> (model class, config class, config arguments, the layer names "all-linear" adapts)
FAMILIES = {
    "olmo3": ("Olmo3ForCausalLM", "Olmo3Config", dict(sliding_window=16, **GQA), "qkvo+mlp"),
    "cohere2": ("Cohere2ForCausalLM", "Cohere2Config", dict(sliding_window=16, **GQA), "qkvo+mlp"),
    "glm4": ("Glm4ForCausalLM", "Glm4Config", dict(head_dim=8, **GQA), "qkvo+down_proj,gate_up_proj"),  # fused gate_up
    "exaone4": ("Exaone4ForCausalLM", "Exaone4Config", dict(head_dim=8, sliding_window=16, **GQA), "qkvo+mlp"),
    "smollm3": ("SmolLM3ForCausalLM", "SmolLM3Config", dict(**GQA), "qkvo+mlp"),
    "ernie4_5": ("Ernie4_5ForCausalLM", "Ernie4_5Config", dict(head_dim=8, **GQA), "qkvo+mlp"),
    "hunyuan_v1_dense": ("HunYuanDenseV1ForCausalLM", "HunYuanDenseV1Config", dict(head_dim=8, **GQA), "qkvo+mlp"),
    "apertus": ("ApertusForCausalLM", "ApertusConfig", dict(**GQA), "qkvo+down_proj,up_proj"),  # xIELU, no gate
    "seed_oss": ("SeedOssForCausalLM", "SeedOssConfig", dict(head_dim=8, **GQA), "qkvo+mlp"),
    # fused 3-D experts stay frozen (said in a warning); attention and the shared expert adapt
    "granitemoeshared": ("GraniteMoeSharedForCausalLM", "GraniteMoeSharedConfig",
                         dict(shared_intermediate_size=16, **MOE, **GQA), "qkvo+input_linear,output_linear"),
    "gpt_oss": ("GptOssForCausalLM", "GptOssConfig", dict(head_dim=8, layer_types=["sliding_attention", "full_attention"],
                                                          sliding_window=16, **MOE, **GQA), "qkvo"),
    # routers that are nn.Linear subclasses returning (scores, logits): skipped, not wrapped
    "llama4_text": ("Llama4ForCausalLM", "Llama4TextConfig", dict(head_dim=8, intermediate_size_mlp=48,
                                                                  **{**MOE, "num_experts_per_tok": 1}, **GQA),
                    "qkvo+mlp"),
    "phimoe": ("PhimoeForCausalLM", "PhimoeConfig", dict(**MOE, **GQA), "qkvo"),
    # hybrids: short convolutions (LFM2), lightning attention (MiniMax), Mamba-2 (Granite 4, Bamba, Falcon-H1)
    "lfm2": ("Lfm2ForCausalLM", "Lfm2Config", dict(layer_types=["conv", "full_attention"], **GQA),
             "in_proj,k_proj,out_proj,q_proj,v_proj,w1,w2,w3"),
    "minimax": ("MiniMaxForCausalLM", "MiniMaxConfig", dict(head_dim=8, layer_types=["linear_attention", "full_attention"],
                                                            **MOE, **GQA), "qkvo+out_proj,output_gate,qkv_proj"),
    # Mamba-2 mixers read out_proj.weight themselves on CUDA's fused path: only in_proj adapts there
    "mamba2": ("Mamba2ForCausalLM", "Mamba2Config", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=4,
                                                         head_dim=16, n_groups=1, chunk_size=8, state_size=8,
                                                         bos_token_id=1, eos_token_id=3, pad_token_id=3), "in_proj"),
    "granitemoehybrid": ("GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig",
                         dict(layer_types=["linear_attention", "attention"], shared_intermediate_size=16, **MAMBA2, **MOE,
                              **GQA), "qkvo+in_proj,input_linear,output_linear"),
    "bamba": ("BambaForCausalLM", "BambaConfig", dict(attn_layer_indices=[1], **MAMBA2, **GQA), "qkvo+mlp+in_proj"),
    "falcon_h1": ("FalconH1ForCausalLM", "FalconH1Config", dict(mamba_d_ssm=64, **MAMBA2, **GQA), "qkvo+mlp+in_proj"),
    # Mamba-1 mixers (x_proj, out_proj called on CPU and without the mamba kernels), attention, MoE every other layer
    "jamba": ("JambaForCausalLM", "JambaConfig", dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                                      expert_layer_offset=1, mamba_d_state=8, use_mamba_kernels=False,
                                                      **MOE, **GQA), "qkvo+mlp+in_proj,out_proj,x_proj"),
    # gated delta net (linear attention) beside full attention, MoE with a shared expert; peft 0.21 reads the shared
    # expert's gate_proj / up_proj / down_proj as the fused experts' (lorakit warns when saving): left out, the
    # file is one peft builds exactly
    "qwen3_next": ("Qwen3NextForCausalLM", "Qwen3NextConfig", dict(
        head_dim=8, layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=3, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=16, **GQA), "qkvo+in_proj_ba,in_proj_qkvz,out_proj,"
                   "shared_expert_gate"),
}
EXCLUDE = {"qwen3_next": ["gate_proj", "up_proj", "down_proj"]}
MLP_NAMES = "down_proj,gate_proj,up_proj"


# what these tests expect of a family is transformers 5's: on 4.x (4.56 is the lowest lorakit allows) these families
# are absent (olmo3, qwen3_next), keep per-expert linear layers or another router (the MoE ones), take other config
# values (jamba), or generate through their own cache, which lorakit refuses on 4.x in one line (the README says so)
NEEDS_TRANSFORMERS_5 = {"bamba", "falcon_h1", "granitemoehybrid", "granitemoeshared", "jamba", "lfm2", "mamba2",
                        "minimax", "olmo3", "phimoe", "qwen3_next"}


def skip_on_transformers_4(kind: str) -> None:
    import transformers

    if kind in NEEDS_TRANSFORMERS_5 and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"{kind}: these expectations are transformers 5's (running {transformers.__version__})")


def expected_names(spec: str) -> list[str]:
    names = spec.replace("qkvo", "k_proj,o_proj,q_proj,v_proj").replace("mlp", MLP_NAMES).replace("+", ",")
    return sorted(names.split(","))


def build(kind: str):
    """A tiny random model of one family (seeded: a second call gives the same weights)."""
    return seeded_model(*FAMILIES[kind][:3])


IDS = torch.tensor([[1, 7, 10, 11, 8, 3, 12, 13], [1, 9, 12, 14, 15, 8, 3, 3]])
PROMPTS = [[1, 7, 10, 11, 8, 12], [1, 9, 12]]


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_a_new_family_folder_adapts_trains_saves_merges_and_loads_in_peft(kind, tmp_path):
    skip_on_transformers_4(kind)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.decoding import static_decoding_unsupported

    folder = tmp_path / kind
    build(kind).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    model, _ = lorakit.load_base(str(folder), device="cpu")
    plain = logits(model, IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the MoE families say their experts stay frozen (tested elsewhere)
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, exclude_modules=EXCLUDE.get(kind)))
    assert sorted({path.rsplit(".", 1)[-1] for path in lora_layers(model)}) == expected_names(FAMILIES[kind][3])
    randomize(model)

    model.train()
    model(IDS, labels=IDS).loss.backward()
    model.eval()
    tensors = dict(lorakit.lora_parameters(model))
    assert tensors and all(p.grad is not None and p.grad.abs().sum() > 0 for p in tensors.values())
    expected = logits(model, IDS)
    assert (expected - plain).abs().max() > 1e-3

    lorakit.save_adapter(model, tmp_path / "adapter")
    again, _ = lorakit.load_base(str(folder), device="cpu")
    lorakit.load_adapter(again, tmp_path / "adapter")
    assert_close(logits(again, IDS), expected)
    lorakit.merge(again)
    assert_close(logits(again, IDS), expected)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder).eval(), tmp_path / "adapter")
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert_close(logits(theirs.eval(), IDS), expected)

    ours = [r.tokens for r in G.generate(model, PROMPTS, ["default"] * 2, G.SamplingParams(max_new_tokens=4))]
    assert ours == hf_greedy(model, PROMPTS, 4)
    reason = static_decoding_unsupported(model, 64)  # none of these is a family the static decoder runs
    assert isinstance(reason, str) and kind in reason, reason


@pytest.mark.parametrize("kind, router", [("llama4_text", "Llama4Router"), ("phimoe", "PhimoeTopKRouter")])
def test_routers_that_subclass_linear_are_skipped_or_refused_not_wrapped(kind, router, tmp_path):
    """Llama 4's and PhiMoE's routers are nn.Linear subclasses whose forward returns (scores, logits): "all-linear"
    wrapped them and the first forward failed ("too many values to unpack"), as peft's all-linear does. They are
    skipped with a warning naming them; named alone they are refused in one line; the saved file names the modules
    lorakit adapted, so peft builds the same adapter rather than its own all-linear with the router."""
    skip_on_transformers_4(kind)
    model = build(kind)
    with pytest.warns(UserWarning, match=rf"'all-linear' skips 2 modules \(router\): each is an nn.Linear subclass "
                                         rf"\({router}\) whose own forward computes more than x @ W.T \+ b"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8))
    assert not any(path.endswith("router") for path in lora_layers(model))
    randomize(model)
    expected = logits(model, IDS)
    lorakit.save_adapter(model, tmp_path / "adapter")
    config = lorakit.LoraConfig.from_peft_dict(__import__("json").loads((tmp_path / "adapter" / "adapter_config.json")
                                                                        .read_text()))
    assert isinstance(config.target_modules, list) and not any("router" in t for t in config.target_modules)

    untouched = build(kind)
    with pytest.raises(LorakitError, match=rf"matches only model.layers.0.\w+.router, model.layers.1.\w+.router: an "
                                           rf"nn.Linear subclass \({router}\).*remove 'router' from target_modules"):
        lorakit.inject(untouched, lorakit.LoraConfig(r=4, target_modules=["router"]))
    assert not lora_layers(untouched)
    assert_close(logits(model, IDS), expected)


def test_falcon_linear_written_out_is_still_a_linear_layer():
    """FalconLinear overrides forward with the same product (x @ W.T + b): "all-linear" keeps adapting it."""
    import transformers as tf

    model = tf.FalconForCausalLM(tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4)).eval()
    lorakit.inject(model, lorakit.LoraConfig(r=2))
    assert sorted({p.rsplit(".", 1)[-1] for p in lora_layers(model)}) == ["dense", "dense_4h_to_h", "dense_h_to_4h",
                                                                          "query_key_value"]


@pytest.mark.parametrize("kind, kept", [("llama4_text", "feed_forward.router"), ("phimoe", "mlp.router"),
                                        ("jamba", "mamba.dt_proj")])
def test_nf4_keeps_routers_and_weights_read_by_their_parent_dense(kind, kept, tmp_path):
    """``--quantize nf4`` (and ``lorakit.quantize``) replaced Llama 4's / PhiMoE's routers by NF4Linear, which
    returns one tensor where the MoE block unpacks two ("too many values to unpack"), and Jamba's dt_proj, whose
    weight the Mamba mixer reads itself ("'NF4Linear' object has no attribute 'weight'"). They stay dense; the
    folder loaded 4-bit equals the dense load quantized in memory, and QLoRA on it runs forward and backward."""
    skip_on_transformers_4(kind)
    from lorakit.quant import is_quantized
    from lorakit.quant.quantize import quantize

    folder = tmp_path / kind
    build(kind).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    loaded, _ = lorakit.load_base(str(folder), device="cpu", quantize="nf4")
    reference, _ = lorakit.load_base(str(folder), device="cpu")
    quantize(reference, "nf4")
    for model in (loaded, reference):
        layer = model.get_submodule(f"model.layers.0.{kept}")
        assert not is_quantized(layer) and isinstance(layer, torch.nn.Linear)
        assert sum(is_quantized(m) for m in model.modules()) > 0
    assert_close(logits(loaded, IDS), logits(reference, IDS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorakit.inject(loaded, lorakit.LoraConfig(r=4, alpha=8))
    loaded.train()
    loaded(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for _, p in lorakit.lora_parameters(loaded))


@pytest.mark.parametrize("family, words", [("rwkv", "its forward carries its state in 'state'"),
                                           ("openai-gpt", "its forward takes no KV cache")])
def test_generation_refuses_models_whose_forward_takes_no_cache(family, words):
    """RWKV keeps its recurrent state in ``state`` and OpenAI GPT takes no cache: lorakit's generation passed its
    cache into **kwargs, unread, so each decode step saw only its new token and every token after the first was
    silently not the model's (RWKV: [52, 58, 18, 20] where transformers' generate gives [52, 103, 103, 39]). Now one
    line says to use transformers' model.generate."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "rwkv":
        model = tf.RwkvForCausalLM(tf.RwkvConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                 attention_hidden_size=32, intermediate_size=48))
    else:
        model = tf.OpenAIGPTLMHeadModel(tf.OpenAIGPTConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                           n_positions=64))
    with pytest.raises(LorakitError, match=rf"generation does not support \w+: {words}, not a transformers cache; "
                                           r"generate with transformers' model.generate instead$"):
        G.generate(model.eval(), PROMPTS, [None] * 2, G.SamplingParams(max_new_tokens=4))
