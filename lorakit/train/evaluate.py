"""Scoring a model: loss and perplexity on tokenized data, exact match of greedy generations on records.

Loss is the mean over supervised tokens (sum of per-token cross-entropies / number of supervised tokens), the same
quantity the training loop optimises; perplexity is ``exp(loss)``. Exact match compares final answers: for reasoning
models (Qwen3, DeepSeek-R1, QwQ) the text after the last ``</think>`` of the generation and of the reference.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError
from lorakit.train.chat_turns import THINK_CLOSE, THINK_OPEN
from lorakit.train.batches import IGNORE_INDEX, Collator, eval_batches
from lorakit.train.data import generation_prompt, reference_text, render_examples, tokenizer_info


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
                 compute_dtype: torch.dtype | None = None, progress: bool | str = False) -> tuple[float, int]:
    """(mean loss per supervised token, supervised tokens) over every row of ``dataset``; ``progress`` shows a bar
    of batches, or plain lines for ``"lines"`` (``lorakit eval``; validation inside training reports through the
    training bar instead)."""
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


def _bar(items, total: int, what: str, enabled: bool | str, unit: str = "batch", delay_s: float = 0.0):
    """A tqdm bar over ``items`` (on stderr) when enabled; ``"lines"``: a plain line on stderr now and then (see
    :func:`_lines`); else the items themselves. ``unit`` names what is counted ("batch", "record"); ``delay_s``: show
    nothing until that long has passed (work that ends sooner says nothing)."""
    if enabled == "lines":
        return _lines(items, total, what, unit=unit, delay_s=delay_s)
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=what, unit=unit, leave=False, dynamic_ncols=True, delay=delay_s)


def _lines(items, total: int, what: str, every_s: float = 60.0, unit: str = "batch", delay_s: float = 0.0):
    """``items``, with a line on stderr after the first and the last item, every tenth of them and at least every
    ``every_s`` seconds, as training's --no-progress does (a log file gets no bar redraws, but is not silent for the
    length of a long eval). Example: ``loss: 40/400 batches, 0:01:20 elapsed, 0:12:00 left``. With ``delay_s``, no
    line until that long has passed; the first one then comes with the next item (about a dozen lines in all)."""
    from lorakit._progress import Lines

    shown = Lines(total, what, unit=unit, every_s=every_s, delay_s=delay_s)
    for item in items:
        yield item
        shown.update(1)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


@dataclass
class GenerationScore:
    """Exact-match result over ``len(references)`` records.

    Attributes:
        exact_match: the share (0..1) of records whose final answer equals the reference's (:func:`final_answer`).
        predictions / references / prompts: per record, the generated text (with its reasoning), the reference
            answer as the record holds it, and the last user turn (or the prompt).
        matches: per record, whether it was scored correct.
        unanswered: generations that opened ``<think>`` reasoning (or whose prompt opened it) and never closed it,
            so they hold no answer (scored wrong). cut: of those, the ones stopped by the token limit.
        max_new_tokens: the largest token limit a generation had.
    """

    exact_match: float
    predictions: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    matches: list[bool] = field(default_factory=list)
    unanswered: int = 0
    cut: int = 0
    max_new_tokens: int | None = None

    @property
    def correct(self) -> int:
        return sum(self.matches) if self.matches else round(self.exact_match * len(self.references))

    def note(self) -> str | None:
        """One line when generations ended inside their reasoning, before an answer (None otherwise)."""
        if not self.unanswered:
            return None
        n = len(self.references)
        parts = []
        if self.cut:
            parts.append(f"{self.cut} reached the token limit (up to {self.max_new_tokens} new tokens) inside their "
                         "<think> reasoning: raise --max-new-tokens (max_new_tokens= from Python)")
        if self.unanswered > self.cut:
            parts.append(f"{self.unanswered - self.cut} ended inside their reasoning without {THINK_CLOSE}")
        return (f"note: {self.unanswered} of {n} generation{'s' if n > 1 else ''} gave no answer after their "
                f"reasoning and scored as wrong: " + "; ".join(parts))


def final_answer(text: str, opened: bool = False) -> str | None:
    """The answer a text gives, as exact match compares it: the text after the last ``</think>``, stripped, for a
    reasoning model (Qwen3, DeepSeek-R1, QwQ); the whole text, stripped, when it holds no ``<think>`` block.

    None when reasoning was opened (``<think>`` in the text, or ``opened``: the prompt ended with ``<think>``) and
    never closed: the generation stopped before its answer.
    """
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1].strip()
    if opened or THINK_OPEN in text:
        return None
    return text.strip()


def scorable(records: Sequence[Any]) -> list[Any]:
    """The records that have a reference answer (prompt/completion or chat), in order."""
    return [r for r in records if getattr(r, "shape", None) in ("prompt_completion", "messages")]


def _opens_reasoning(tokenizer: Any, prompt: list[int]) -> bool:
    """Whether a generation prompt ends by opening ``<think>`` (DeepSeek-R1 distills, QwQ): what follows is reasoning."""
    return tokenizer.decode(prompt[-8:], skip_special_tokens=False).rstrip().endswith(THINK_OPEN)


def _decode(tokenizer: Any, ids: list[int]) -> str:
    """Decoded text without special tokens, except ``<think>`` / ``</think>`` when a tokenizer makes them special
    (the answer is found after ``</think>``, so it must stay in the text)."""
    kept = {}
    for tag in (THINK_OPEN, THINK_CLOSE):
        tag_id = tokenizer.convert_tokens_to_ids(tag)
        if isinstance(tag_id, int) and tag_id in set(getattr(tokenizer, "all_special_ids", ())) \
                and tag_id != getattr(tokenizer, "unk_token_id", None):
            kept[tag_id] = tag
    if not kept or not any(t in kept for t in ids):
        return tokenizer.decode(ids, skip_special_tokens=True)
    text, run = "", []
    for t in ids + [None]:
        if t is None or t in kept:
            text += tokenizer.decode(run, skip_special_tokens=True) + (kept[t] if t is not None else "")
            run = []
        else:
            run.append(t)
    return text


@dataclass
class Generation:
    """One greedy generation: its text (special tokens removed), whether the prompt opened ``<think>`` reasoning,
    and whether it stopped at an end-of-turn token (False: the token limit or the context ended it)."""

    text: str
    opened: bool
    stopped: bool


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer: Any, records: Sequence[Any], *, max_new_tokens: int | Sequence[int] = 64,
                     batch_size: int = 16, device: torch.device | None = None, compute_dtype: torch.dtype | None = None,
                     eot_token: str | None = None, progress: bool | str = False,
                     chat_template_kwargs: Mapping[str, Any] | None = None) -> list[str]:
    """Greedy generations for each record's prompt (the chat up to its last assistant turn, or the prompt).

    Prompts are left-padded and batched by length (less padding); generation stops at the end-of-turn token, or
    after ``max_new_tokens`` (one number, or one per record: a batch runs to the largest of its records). With
    ``progress`` (a bar, or ``"lines"`` for a log), the decode steps of each batch are counted on stderr
    (:mod:`lorakit.train.generation_progress`); the batches are the same either way, and so are the answers.
    ``chat_template_kwargs``: options of the chat template (Qwen3: ``{"enable_thinking": False}``), as in training.
    Returns the decoded answers (special tokens removed) in the records' order.
    """
    return [g.text for g in generate_records(model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                             device=device, compute_dtype=compute_dtype, eot_token=eot_token,
                                             progress=progress, chat_template_kwargs=chat_template_kwargs)]


@torch.no_grad()
def generate_records(model: nn.Module, tokenizer: Any, records: Sequence[Any], *, max_new_tokens: int | Sequence[int] = 64,
                     batch_size: int = 16, device: torch.device | None = None, compute_dtype: torch.dtype | None = None,
                     eot_token: str | None = None, progress: bool | str = False,
                     chat_template_kwargs: Mapping[str, Any] | None = None) -> list[Generation]:
    """:func:`generate_answers`, with whether each prompt opened reasoning and each generation stopped by itself."""
    from transformers import GenerationConfig

    device = device or next(model.parameters()).device
    info = tokenizer_info(tokenizer, eot_token)
    prompts = [generation_prompt(r, tokenizer, info=info, chat_template_kwargs=chat_template_kwargs) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop = [info.eot_id] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in (None, info.eot_id) else [])
    if info.chat_eot_id is not None and info.chat_eot_id not in stop:  # a chat's answer ends with the template's token
        stop.append(info.chat_eot_id)
    stop += sorted(t for t in info.call_end_ids if t not in stop)  # a tool-call turn ends there (Llama's <|eom_id|>)
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    from lorakit.models.loading import context_length

    context = context_length(model)  # learned position embeddings (GPT-2, OPT) fail with an index error beyond it
    answers = [Generation("", _opens_reasoning(tokenizer, p), False) for p in prompts]
    # each row's own budget, what it gets generated alone: its limit, within the context its prompt leaves
    own = [limits[i] if context is None else min(limits[i], context - len(prompts[i])) for i in range(len(prompts))]
    batches = []  # (rows, prompt width, step budget)
    chunk: list[int] = []
    for i in order:  # shortest prompt first
        # A batch runs to the context its longest prompt leaves: a row that needs more steps than that is not
        # batched with it (a short record's answer was cut where a prompt near the context ended the batch, and
        # every answer came out empty beside a prompt longer than the context: eval's exact match depended on
        # --batch-size)
        if chunk and (len(chunk) == batch_size or
                      (context is not None and context - len(prompts[i]) < max(own[j] for j in chunk))):
            batches.append(chunk)
            chunk = []
        chunk.append(i)
    if chunk:
        batches.append(chunk)
    batches = [(chunk, max(len(prompts[i]) for i in chunk), max(own[i] for i in chunk)) for chunk in batches]
    from lorakit.train.generation_progress import GenerationProgress

    shown = GenerationProgress(sum(max(b, 0) for _, _, b in batches), len(order), progress, stop)
    was_training = model.training
    model.eval()
    try:
        for chunk, width, new_tokens in batches:
            if new_tokens < 1:  # the prompt fills the context: nothing can be generated
                shown.skipped(len(chunk))
                continue
            input_ids = torch.full((len(chunk), width), info.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids = prompts[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                mask[row, width - len(ids):] = 1
            config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False,
                                      eos_token_id=stop, pad_token_id=info.pad_id)
            streamer = shown.streamer(len(chunk), new_tokens)
            with autocast_context(device, compute_dtype):
                out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config, **({"streamer": streamer} if streamer is not None else {}))
            shown.finished(streamer)
            for row, i in enumerate(chunk):
                new = out[row, width:width + max(own[i], 0)].tolist()  # its own limit, as alone (not the batch's)
                cut = next((k for k, t in enumerate(new) if t in stop), len(new))
                answers[i] = Generation(_decode(tokenizer, new[:cut]), answers[i].opened, cut < len(new))
    finally:
        shown.close()
        model.train(was_training)
    return answers


def score_generations(model: nn.Module, tokenizer: Any, records: Sequence[Any], *, max_new_tokens: int | None = None,
                      chat_template_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> GenerationScore:
    """Exact match of greedy generations against each record's answer, compared as :func:`final_answer` gives them:
    after the last ``</think>`` on both sides for reasoning models, else the whole texts (whitespace-trimmed).

    A generation more than a few tokens longer than its reference cannot match it, so each stops at the reference's
    length + 4 tokens (the untrained model, which rambles, is scored several times faster), at most
    ``max_new_tokens`` (default 64). An answer that reasons first (``</think>`` in what the model learnt to write for
    the record, or a prompt that opens ``<think>``) gets room for twice the reference's reasoning and answer + 16
    tokens (at most ``max_new_tokens`` when given); generations that end inside their reasoning are counted
    (``GenerationScore.unanswered``, ``.note()``). Other keywords go to :func:`generate_answers`.
    """
    records = scorable(records)
    if not records:
        raise LorakitError("no record with a reference answer to score; exact match needs prompt/completion or messages")
    references = [reference_text(r) for r in records]
    limits = []
    for record, ref in zip(records, references):
        target = _target_text(record, tokenizer, chat_template_kwargs)
        if THINK_CLOSE in target or THINK_CLOSE in ref:
            room = 2 * _count(tokenizer, target if THINK_CLOSE in target else ref) + 16
            limits.append(room if max_new_tokens is None else min(max_new_tokens, room))
        else:
            limits.append(min(64 if max_new_tokens is None else max_new_tokens, _count(tokenizer, ref) + 4))
    generations = generate_records(model, tokenizer, records, max_new_tokens=limits,
                                   chat_template_kwargs=chat_template_kwargs, **kwargs)
    answers = [final_answer(g.text, g.opened) for g in generations]
    matches = [a is not None and a == _reference_answer(ref) for a, ref in zip(answers, references)]
    unanswered = [a is None for a in answers]
    cut = sum(u and not g.stopped for u, g in zip(unanswered, generations))
    prompts = [_prompt_text(r) for r in records]
    return GenerationScore(sum(matches) / len(matches), [g.text for g in generations], references, prompts, matches,
                           sum(unanswered), cut, max(limits))


def _reference_answer(reference: str) -> str:
    answer = final_answer(reference)
    return reference.strip() if answer is None else answer


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _target_text(record: Any, tokenizer: Any, template_kwargs: Mapping[str, Any] | None) -> str:
    """What the model learnt to write for the record's last answer: the last target of its last training example
    (a chat's answer as the template writes it after the generation prompt: Qwen3's ``<think>`` block, the reasoning
    an R1 prompt opens), or the reference itself when the record does not render here."""
    try:
        text, spans = render_examples(record, tokenizer, chat_template_kwargs=template_kwargs)[-1]
        return text[spans[-1][0]:spans[-1][1]] if spans else reference_text(record)
    except LorakitError:
        return reference_text(record)


def _prompt_text(record: Any) -> str:
    if record.shape == "messages":
        users = [m["content"] for m in record["messages"][:-1] if m["role"] == "user"]
        return users[-1] if users else ""
    return record["prompt"]
