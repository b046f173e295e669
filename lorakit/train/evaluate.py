"""Scoring a model: loss and perplexity on tokenized data, exact match of greedy generations on records.

Loss is the mean over supervised tokens (sum of per-token cross-entropies / number of supervised tokens), the same
quantity the training loop optimises; perplexity is ``exp(loss)``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError
from lorakit.train.data import IGNORE_INDEX, Collator, eval_batches, generation_prompt, reference_text, tokenizer_info


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on CUDA when the compute dtype asks for it; nothing elsewhere (float32 on CPU)."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def supervised_tokens(labels: torch.Tensor) -> int:
    """Targets in a (B, T) label tensor: positions 1..T-1 that are not IGNORE_INDEX (position t predicts t+1)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# Architectures whose logits are exactly ``output_embeddings(last_hidden_state)``: no soft-capping (Gemma 2/3),
# no logit scale (Cohere, Granite). For these the head runs only where a label is supervised.
PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "olmo2", "gpt2", "gpt_neox",
                     "smollm3", "starcoder2"}


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    if getattr(getattr(model, "config", None), "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    decoder = getattr(model, getattr(model, "base_model_prefix", "") or "model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module):
        return None
    # lorakit wraps the head when it is adapted or trained whole; the wrapper is the module to call
    for module in model.modules():
        if getattr(module, "base_layer", None) is head:
            head = module
    return decoder, head


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the batch's supervised tokens of the next-token cross-entropy (float32 scalar).

    Position t predicts label t + 1. Three ways, the same number:

    * lorakit's fused kernels on (``lorakit.models.fast``, CUDA): the model computes it from the last hidden states
      without building the logits (``num_items_in_batch=1`` turns its mean into this sum);
    * architectures with a plain output head: the head runs only on positions whose next token is supervised
      (about half of the tokens of a chat dataset; the 49k-vocabulary head of SmolLM2 is ~21% of its compute);
    * otherwise: the model's full logits, upcast to float32.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if getattr(model, "_lorakit_fast_kernels", {}).get("forward") is not None and torch.is_grad_enabled():
        out = model(**inputs, labels=labels, num_items_in_batch=1, use_cache=False)
        return out.loss.float()
    targets = labels[:, 1:]
    parts = _decoder_and_head(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs, use_cache=False)[0]  # (B, T, H)
        chosen = targets != IGNORE_INDEX  # (B, T-1)
        logits = head(hidden[:, :-1][chosen])  # (N, V), N supervised tokens
        return F.cross_entropy(logits.float(), targets[chosen], reduction="sum")
    logits = model(**inputs, use_cache=False).logits  # (B, T, V)
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(shift_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def dataset_loss(model: nn.Module, dataset: Sequence[dict], batch_size: int, collator: Collator, device: torch.device,
                 compute_dtype: torch.dtype | None = None, progress: bool = False) -> tuple[float, int]:
    """(mean loss per supervised token, supervised tokens) over every row of ``dataset``; ``progress`` shows a bar
    of batches (``lorakit eval``; validation inside training reports through the training bar instead)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for batch in _bar(eval_batches(dataset, batch_size, collator), -(-len(dataset) // batch_size), "loss", progress):
            n = supervised_tokens(batch["labels"])
            if n == 0:
                continue
            with autocast_context(device, compute_dtype):
                total += float(loss_sum(model, to_device(batch, device)))
            tokens += n
    finally:
        model.train(was_training)
    if tokens == 0:
        raise LorakitError("the evaluation data has no supervised token; give records with a completion or assistant turn")
    return total / tokens, tokens


def _bar(items, total: int, what: str, enabled: bool):
    """A tqdm bar over ``items`` (on stderr) when enabled, else the items themselves."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=what, unit="batch", leave=False, dynamic_ncols=True)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


@dataclass
class GenerationScore:
    """Exact-match result over ``len(references)`` records."""

    exact_match: float
    predictions: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)

    @property
    def correct(self) -> int:
        return round(self.exact_match * len(self.references))


def scorable(records: Sequence[Any]) -> list[Any]:
    """The records that have a reference answer (prompt/completion or chat), in order."""
    return [r for r in records if getattr(r, "shape", None) in ("prompt_completion", "messages")]


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer: Any, records: Sequence[Any], *, max_new_tokens: int | Sequence[int] = 64,
                     batch_size: int = 16, device: torch.device | None = None, compute_dtype: torch.dtype | None = None,
                     eot_token: str | None = None, progress: bool = False) -> list[str]:
    """Greedy generations for each record's prompt (the chat up to its last assistant turn, or the prompt).

    Prompts are left-padded and batched by length (less padding); generation stops at the end-of-turn token, or
    after ``max_new_tokens`` (one number, or one per record: a batch runs to the largest of its records).
    Returns the decoded answers (special tokens removed) in the records' order.
    """
    from transformers import GenerationConfig

    device = device or next(model.parameters()).device
    info = tokenizer_info(tokenizer, eot_token)
    prompts = [generation_prompt(r, tokenizer, info=info) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop = [info.eot_id] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in (None, info.eot_id) else [])
    if info.chat_eot_id is not None and info.chat_eot_id not in stop:  # a chat's answer ends with the template's token
        stop.append(info.chat_eot_id)
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    from lorakit.models.loading import context_length

    context = context_length(model)  # learned position embeddings (GPT-2, OPT) fail with an index error beyond it
    answers: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in _bar(range(0, len(order), batch_size), -(-len(order) // batch_size), "generating", progress):
            chunk = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), info.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids = prompts[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                mask[row, width - len(ids):] = 1
            new_tokens = max(limits[i] for i in chunk)
            if context is not None:
                new_tokens = min(new_tokens, context - width)
            if new_tokens < 1:  # the prompt fills the context: nothing can be generated
                continue
            config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False,
                                      eos_token_id=stop, pad_token_id=info.pad_id)
            with autocast_context(device, compute_dtype):
                out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config)
            for row, i in enumerate(chunk):
                new = out[row, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stop), len(new))
                answers[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers


def score_generations(model: nn.Module, tokenizer: Any, records: Sequence[Any], **kwargs: Any) -> GenerationScore:
    """Exact match (leading/trailing whitespace ignored) of greedy generations against each record's answer."""
    from lorakit.data import exact_match_score

    records = scorable(records)
    if not records:
        raise LorakitError("no record with a reference answer to score; exact match needs prompt/completion or messages")
    references = [reference_text(r) for r in records]
    # a generation more than a few tokens longer than its reference cannot match it: stop there (the score is the
    # same, and the untrained model, which rambles, is scored several times faster)
    longest = kwargs.pop("max_new_tokens", 64)
    limits = [min(longest, len(tokenizer(ref, add_special_tokens=False)["input_ids"]) + 4) for ref in references]
    predictions = generate_answers(model, tokenizer, records, max_new_tokens=limits, **kwargs)
    prompts = [_prompt_text(r) for r in records]
    return GenerationScore(exact_match_score(predictions, references), predictions, references, prompts)


def _prompt_text(record: Any) -> str:
    if record.shape == "messages":
        users = [m["content"] for m in record["messages"][:-1] if m["role"] == "user"]
        return users[-1] if users else ""
    return record["prompt"]
