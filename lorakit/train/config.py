"""``TrainConfig``: every training option in one dataclass, read from defaults, a YAML/TOML file and the command line.

Each field's ``metadata["help"]`` is its ``--help`` text (the CLI is generated from this class, so the two cannot
drift apart). Precedence: dataclass defaults < config file < command-line flags. The resolved config (every field,
after defaults were filled in) is written to the run folder as ``config.yaml`` and can be passed back with
``--config``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.config import INITS, VARIANTS, LoraConfig, shown
from lorakit.errors import LorakitError
from lorakit.schedules import SCHEDULES

DEFAULT_LORA_LR = 2e-3
DEFAULT_FULL_LR = 5e-5
QUANTIZE_CHOICES = ("nf4",)
FLOAT16_NAMES = ("float16", "fp16", "half", "torch.float16")
DEVICE_FORM = re.compile(r"(cuda(:\d+)?|mps|cpu)")


def _f(default: Any, help: str, group: str, **extra: Any) -> Any:
    """A dataclass field carrying its help text and CLI group; mutable defaults go through a factory."""
    metadata = {"help": help, "group": group, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Options of a training run. See ``lorakit train --help`` for each one."""

    # -- model and data ------------------------------------------------------------------------------------------
    model: str = _f("smollm2-135m", "base model: the embedded name (smollm2-135m), a local Hugging Face folder or an "
                    "org/name id in the Hugging Face cache", "model and data")
    data: list[str] | None = _f(None, "training data: JSONL, JSON, CSV, TSV, Parquet or Arrow files (or .gz, .zst, "
                                ".xz, .bz2), a folder of them or a datasets folder; records {text}, {prompt, completion}, {messages} "
                                "(OpenAI chat), Alpaca {instruction, input, output} or ShareGPT {conversations}; default: "
                                "the embedded 'orders' task", "model and data",
                                nargs="+")
    val_data: list[str] | None = _f(None, "validation files (same formats); default: none, or the embedded task's "
                                    "held-out set when --data is not given", "model and data", nargs="+")
    val_fraction: float | None = _f(None, "hold out this share of --data for validation instead of a file (e.g. 0.1)",
                                    "model and data")
    out: str | None = _f(None, "run folder for the adapter, checkpoints, metrics.jsonl, loss_curve.png and "
                         "config.yaml; default: runs/<date-time>", "model and data")
    max_length: int = _f(256, "most tokens per example; longer ones are handled by --overflow", "model and data")
    overflow: str = _f("drop", "what to do with an example longer than --max-length: drop, truncate, error, or "
                       "split (a text record into windows of --max-length tokens, every token trained once; other "
                       "records dropped)", "model and data", choices=("drop", "truncate", "error", "split"))
    pack: bool = _f(False, "pack several examples per row (no attention across them)", "model and data")
    chat_template_kwargs: dict = _f({}, "options of the model's chat template, as a JSON object, used to render the "
                                    "chats for training and scoring, e.g. '{\"enable_thinking\": false}' (Qwen3)",
                                    "model and data", json=True)

    # -- adapter ---------------------------------------------------------------------------------------------------
    rank: int = _f(16, "LoRA rank r", "adapter")
    alpha: float = _f(32.0, "LoRA alpha: the update is scaled by alpha/r (alpha/sqrt(r) for rslora)", "adapter")
    dropout: float = _f(0.0, "dropout on the adapter input during training", "adapter")
    targets: list[str] | None = _f(None, "module names to adapt (e.g. q_proj v_proj) or one regular expression; "
                                   "default: all-linear (every linear layer except the output head)", "adapter", nargs="+")
    exclude: list[str] | None = _f(None, "module names (or one regular expression) to leave out", "adapter", nargs="+")
    target_parameters: list[str] | None = _f(None, "raw parameters to adapt too (comma- or space-separated; peft's "
                                             "target_parameters): the fused MoE experts all-linear leaves frozen, e.g. "
                                             "mlp.experts.gate_up_proj,mlp.experts.down_proj (Mixtral, Qwen3-MoE)",
                                             "adapter", nargs="+")
    variant: str = _f("lora", "adapter variant", "adapter", choices=VARIANTS)
    init: str = _f("default", "adapter initialisation", "adapter", choices=INITS)
    lora_bias: bool = _f(False, "train a bias on lora_B too (peft's lora_bias): the update becomes (alpha/r) * (B A x + "
                         "b); such an adapter merges only into layers that have a bias of their own", "adapter")
    modules_to_save: list[str] | None = _f(None, "modules trained whole and saved with the adapter (e.g. lm_head)",
                                           "adapter", nargs="+")
    rank_pattern: dict = _f({}, "per-module rank overrides {regex: rank} (config file only)", "adapter", cli=False)
    alpha_pattern: dict = _f({}, "per-module alpha overrides {regex: alpha} (config file only)", "adapter", cli=False)
    full: bool = _f(False, "full fine-tuning of every weight instead of LoRA (the quality baseline)", "adapter")

    # -- optimisation ----------------------------------------------------------------------------------------------
    max_steps: int | None = _f(None, "optimizer steps to run (overrides --epochs)", "optimisation")
    epochs: float = _f(1.0, "passes over the training data when --max-steps is not given", "optimisation")
    batch_size: int = _f(8, "examples per device per micro-step; the global batch is batch size x grad accum x "
                         "processes", "optimisation")
    grad_accum: int = _f(1, "micro-steps accumulated per optimizer step (loss weighted by supervised tokens)",
                         "optimisation")
    global_batch: int | None = _f(None, "examples per optimizer step over all processes; sets --grad-accum to "
                                  "global batch / (batch size x processes), which must divide evenly", "optimisation")
    lr: float | None = _f(None, f"peak learning rate (of lora_A under LoRA+); default {DEFAULT_LORA_LR:g} for LoRA, "
                          f"{DEFAULT_FULL_LR:g} with --full", "optimisation")
    loraplus_ratio: float | None = _f(None, "LoRA+: learning rate of lora_B over that of lora_A (e.g. 16)", "optimisation")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay (matrices only)", "optimisation")
    adam_beta1: float = _f(0.9, "AdamW beta1", "optimisation")
    adam_beta2: float = _f(0.999, "AdamW beta2", "optimisation")
    adam_eps: float = _f(1e-8, "AdamW epsilon", "optimisation")
    schedule: str = _f("cosine", "learning-rate schedule after warmup", "optimisation", choices=SCHEDULES)
    warmup_ratio: float = _f(0.05, "warmup steps as a share of all steps (ignored when --warmup-steps is given)",
                             "optimisation")
    warmup_steps: int | None = _f(None, "linear warmup steps", "optimisation")
    min_lr_ratio: float = _f(0.0, "final learning rate as a share of the peak", "optimisation")
    max_grad_norm: float | None = _f(1.0, "clip the global gradient norm to this (0: no clipping)", "optimisation")
    seed: int = _f(0, "random seed (adapter init, data order, dropout)", "optimisation")

    # -- precision, memory, device --------------------------------------------------------------------------------
    device: str | None = _f(None, "cuda, cuda:N, mps or cpu; default: the best available", "precision and memory")
    dtype: str | None = _f(None, "base weight dtype (float32, bfloat16, float16); default float32 on CPU/MPS and "
                           "for --full, bfloat16 on CUDA (with bf16 autocast; adapters stay float32)",
                           "precision and memory")
    quantize: str | None = _f(None, "store the frozen base in 4-bit NF4 (QLoRA)", "precision and memory",
                              choices=QUANTIZE_CHOICES)
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory", "precision and memory")
    fsdp: bool = _f(False, "under torchrun, shard the frozen base over the processes with FSDP2 (per decoder "
                    "layer) for models that do not fit on one device; default: data parallel (whole base on each)",
                    "precision and memory")
    fast_kernels: bool = _f(True, "use lorakit's fused kernels on CUDA when the model supports them "
                            "(--no-fast-kernels to turn off)", "precision and memory")
    compile_layers: bool = _f(False, "with the fused kernels on CUDA, compile the decoder layers once with "
                              "torch.compile (one graph shared by all layers, ~10 s before the first step): removes "
                              "most Python overhead, 1.8x PEFT at batch 1 on an H200 (docs/PERFORMANCE.md)",
                              "precision and memory")
    offload_activations: bool = _f(False, "keep the activations saved for backward in pinned CPU memory "
                                   "(torch.autograd.graph.save_on_cpu): less GPU memory, slower steps",
                                   "precision and memory")

    # -- during training ----------------------------------------------------------------------------------------
    eval_every: int | None = _f(None, "validation loss every N steps (0: never); default: 4 times per run",
                                "during training")
    eval_batch_size: int | None = _f(None, "batch size for validation loss (default 2 x --batch-size) and for generation (default 64)",
                                     "during training")
    save_every: int | None = _f(50, "write a checkpoint every N steps (0: only at the end; Ctrl-C or SIGTERM also "
                                    "writes one where it stops)", "during training")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep (the best one is kept apart)", "during training")
    early_stopping_patience: int | None = _f(None, "stop after N validations without a better validation loss",
                                             "during training")
    tensorboard: bool = _f(False, "also log to TensorBoard in <out>/tensorboard (needs the tensorboard package)",
                           "during training")
    log_every: int = _f(1, "write a metrics.jsonl line every N steps", "during training")
    max_bad_steps: int = _f(5, "stop after this many steps in a row with a NaN/infinite loss or gradient "
                            "(each such step is skipped)", "during training")

    # -- evaluation before and after ------------------------------------------------------------------------------
    eval_examples: int = _f(60, "held-out examples scored by exact match of greedy generations before and after "
                            "training (0: skip)", "evaluation")
    samples: int = _f(3, "sample generations printed after training", "evaluation")
    max_new_tokens: int | None = _f(None, "most tokens generated per example when scoring; default: the reference's "
                                    "length + 4 up to 64, and twice the reference + 16 for answers that reason "
                                    "in <think> first", "evaluation")
    progress: bool | None = _f(None, "progress: a redrawn bar (--progress) or a plain line now and then (--no-progress); "
                               "default: the bar when stderr is a terminal, the lines when it goes to a log file "
                               "(nohup, CI, a batch job)", "evaluation")

    def __post_init__(self) -> None:
        for name in ("targets", "exclude", "modules_to_save"):  # "q_proj,v_proj" as two names
            if isinstance(getattr(self, name), list):
                setattr(self, name, _split_names(getattr(self, name)))
        if isinstance(self.out, (str, Path)) and str(self.out).startswith("~"):
            # "out: ~/runs/x" in a config file, --out=~/x (no shell expands a ~ after '=') or TrainConfig(out="~/x"):
            # unexpanded, the run's files went to a folder named '~' under the current one while the adapter was
            # saved through the expanded path into a hidden temporary folder, leaving RUN/adapter empty
            self.out = type(self.out)(Path(self.out).expanduser())
        if _number(self.val_fraction) and self.val_fraction == 0:
            # holding out nothing is no validation set: how a command line turns off a config file's val_fraction
            # (flags override the file, and there is no --no-val-fraction); it was refused as "not between 0 and 1"
            self.val_fraction = None
        self.validate()

    # -- checks and derived values ----------------------------------------------------------------------------
    def validate(self) -> None:
        # an example is at least one token to read and one to predict: 1 passed here and failed after the model loaded
        if isinstance(self.max_length, int) and not isinstance(self.max_length, bool) and self.max_length < 2:
            raise LorakitError(f"--max-length must be at least 2 (an example needs a token to read and one to predict; "
                               f"the default is 256), got {self.max_length}")
        positive = ("max_length", "rank", "batch_size", "grad_accum", "keep_checkpoints", "log_every", "max_bad_steps")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LorakitError(f"{_flag(name)} must be a positive integer, got {shown(value)}")
        for name in ("max_steps", "eval_batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise LorakitError(f"{_flag(name)} must be a positive integer, got {shown(value)}")
        for name in ("warmup_steps", "eval_every", "save_every", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise LorakitError(f"{_flag(name)} must be a non-negative integer, got {shown(value)}")
        if self.global_batch is not None and (isinstance(self.global_batch, bool)
                                              or not isinstance(self.global_batch, int) or self.global_batch < 1):
            raise LorakitError(f"--global-batch must be a positive integer, got {shown(self.global_batch)}")
        if self.global_batch is not None and self.grad_accum != 1:
            raise LorakitError("give --global-batch or --grad-accum, not both (--global-batch sets the accumulation)")
        if self.compile_layers and (not self.fast_kernels or self.fsdp):  # it compiles the fused path only
            other = "--no-fast-kernels" if not self.fast_kernels else "--fsdp (which keeps the fused kernels off)"
            raise LorakitError(f"--compile-layers compiles lorakit's fused kernels, which {other} turns off; drop one")
        if self.fsdp and self.full:
            raise LorakitError("--fsdp shards the frozen base under LoRA; --full with --fsdp is not supported: drop one")
        for name in ("eval_examples", "samples", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LorakitError(f"{_flag(name)} must be a non-negative integer, got {shown(value)}")
        for name, what in (("model", "the model folder or an embedded name, e.g. smollm2-135m"),
                           ("out", "the run folder, e.g. runs/mine (or leave it out: runs/<date-time>)")):
            value = getattr(self, name)  # "" (an unset shell variable): the current folder, or a default silently
            if isinstance(value, str) and not value.strip():
                raise LorakitError(f"{_flag(name)} is empty (an unset shell variable?); give {what}")
        for name in ("data", "val_data"):  # "" (an unset variable) would read every file in the current folder
            if any(not str(path).strip() for path in getattr(self, name) or []):
                raise LorakitError(f"{_flag(name)} holds an empty path (''); give a data file or a folder of them, "
                                   "e.g. train.jsonl")
            if "-" in (getattr(self, name) or []):  # Unix's "standard input": a run reads its files more than once
                raise LorakitError(f"{_flag(name)} -: lorakit reads data from files, not standard input; save the "
                                   "records to a file first, e.g. ... > train.jsonl, then --data train.jsonl")
        if self.seed >= 2**64:  # torch.manual_seed's limit: an OverflowError once the model is loaded, otherwise
            raise LorakitError(f"--seed must be below 2**64 (e.g. 42), got {self.seed}")
        if not _number(self.alpha):  # any finite alpha, as LoraConfig and peft; inject warns when it is 0 (a no-op)
            raise LorakitError(f"--alpha must be a finite number (e.g. 2 x --rank), got {shown(self.alpha)}")
        if not (_number(self.epochs) and self.epochs > 0):
            raise LorakitError(f"--epochs must be a positive number, got {shown(self.epochs)}")
        if self.lr is not None and not (_number(self.lr) and self.lr > 0):
            raise LorakitError(f"--lr must be a positive number, got {shown(self.lr)}")
        if self.lr is not None and self.lr >= 1:  # AdamW moves each weight by about lr a step: lost at the first step
            mantissa, exponent = f"{self.lr:e}".split("e")
            typo = f"; did you mean {float(mantissa):g}e-{int(exponent)}?" if int(exponent) > 0 else ""
            raise LorakitError(f"--lr {self.lr:g} is far above any learning rate AdamW trains with (LoRA: about 1e-4 to "
                               f"2e-3; --full: 1e-5 to 1e-4){typo}")
        if self.val_fraction is not None and not (_number(self.val_fraction) and 0 < self.val_fraction < 1):
            raise LorakitError(f"--val-fraction must be between 0 and 1 (e.g. 0.1), got {shown(self.val_fraction)}")
        if self.val_fraction is not None and self.val_data:
            raise LorakitError("give --val-data or --val-fraction, not both")
        if not (_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise LorakitError(f"--warmup-ratio must be in [0, 1), got {shown(self.warmup_ratio)}")
        for name in ("adam_beta1", "adam_beta2"):  # torch's AdamW would raise a ValueError at the first step
            if not (_number(getattr(self, name)) and 0 <= getattr(self, name) < 1):
                raise LorakitError(f"{_flag(name)} must be in [0, 1) (e.g. 0.9 and 0.999), got {shown(getattr(self, name))}")
        if not (_number(self.adam_eps) and self.adam_eps > 0):
            raise LorakitError(f"--adam-eps must be a small positive number (e.g. 1e-8), got {shown(self.adam_eps)}")
        if not (_number(self.weight_decay) and self.weight_decay >= 0):
            raise LorakitError(f"--weight-decay must be >= 0, got {shown(self.weight_decay)}")
        if not (_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise LorakitError(f"--min-lr-ratio must be in [0, 1], got {shown(self.min_lr_ratio)}")
        if self.max_grad_norm is not None and not (_number(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise LorakitError(f"--max-grad-norm must be >= 0, got {shown(self.max_grad_norm)}")
        for name, choices in (("overflow", ("drop", "truncate", "error", "split")), ("variant", VARIANTS), ("init", INITS),
                              ("schedule", SCHEDULES)):
            if getattr(self, name) not in choices:
                raise LorakitError(f"{_flag(name)} {shown(getattr(self, name))} is not one of {', '.join(choices)}")
        if self.device is not None and not (isinstance(self.device, str) and DEVICE_FORM.fullmatch(self.device)):
            raise LorakitError(f"--device {shown(self.device)} is not a device; use cpu, cuda, cuda:N or mps")
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise LorakitError(f"--quantize {shown(self.quantize)} is not one of {', '.join(QUANTIZE_CHOICES)}")
        if self.full and self.quantize:
            raise LorakitError("--full trains every weight, which a quantized (--quantize nf4) base cannot; drop one")
        if self.full and str(self.dtype).lower() in FLOAT16_NAMES:
            # AdamW on float16 weights: eps 1e-8 and the squared gradients underflow to 0, so the first step writes
            # NaN into every weight (seen on a tiny Llama: all 21 weights NaN after one step)
            raise LorakitError("--full with --dtype float16 keeps the trained weights and AdamW's state in float16, "
                               "which turns them to NaN; use --dtype bfloat16 or float32 (the default for --full)")
        if self.modules_to_save and not self.full and str(self.dtype).lower() in FLOAT16_NAMES:
            # adapters are kept float32, but a module trained whole is a copy in the base's dtype: NaN after a step
            raise LorakitError(f"--modules-to-save {' '.join(self.modules_to_save)} trains a copy in the base's "
                               "float16 (--dtype float16), which AdamW turns to NaN; use --dtype bfloat16 or float32")
        if self.quantize and self.init == "pissa" and not self.full:
            raise LorakitError(f"--init pissa rewrites the base weights from their SVD, which a quantized (--quantize "
                               f"{self.quantize}) base cannot hold; drop --quantize or use --init default or gaussian")
        for option in ("rank_pattern", "alpha_pattern"):  # keys are regular expressions (PEFT's): checked here, not
            for key in getattr(self, option) or {}:        # as a traceback from re after the model has loaded
                try:
                    re.compile(str(key))
                except re.error as error:
                    raise LorakitError(f"{option} key {shown(key)} is not a valid regular expression ({error}); write a "
                                       "module name such as 'q_proj' or escape the special characters") from None
        if not self.full and self.targets and len(self.targets) > 1 and "all-linear" in self.targets:
            others = " ".join(t for t in self.targets if t != "all-linear")
            raise LorakitError(f"--targets all-linear cannot be mixed with other names ({others}); list every module "
                               "to adapt by name, or give one regular expression (e.g. '.*(_proj|lm_head)')")
        if not self.full and self.targets and self.exclude:
            both = [name for name in self.targets if name in self.exclude]
            if both:
                raise LorakitError(f"{', '.join(both)} is in both --targets and --exclude; drop it from one of them")
        if self.early_stopping_patience and self.eval_every == 0:
            raise LorakitError("--early-stopping-patience watches the validation loss, which --eval-every 0 never "
                               "computes; give --eval-every N (or leave it out: 4 times per run)")
        if not self.full and self.targets and self.modules_to_save:
            both = [name for name in self.targets if name in self.modules_to_save]
            if both:
                raise LorakitError(f"{', '.join(both)} is in both --targets and --modules-to-save: a module is either "
                                   "adapted (LoRA) or trained whole and saved; drop it from one of them")
        check_template_kwargs(self.chat_template_kwargs)
        if self.loraplus_ratio is not None and not (_number(self.loraplus_ratio) and self.loraplus_ratio > 0):
            raise LorakitError(f"--loraplus-ratio must be a positive number (e.g. 16), got {shown(self.loraplus_ratio)}")
        if not self.full:
            try:
                self.lora_config()  # LoraConfig checks rank, alpha, dropout, targets
            except LorakitError as error:  # in the options' names, as every other check here says them
                raise LorakitError(_as_flags(str(error))) from None

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (DEFAULT_FULL_LR if self.full else DEFAULT_LORA_LR)

    def lora_config(self) -> LoraConfig:
        targets: Any = self.targets or "all-linear"
        if isinstance(targets, list) and len(targets) == 1 and (_looks_like_regex(targets[0]) or targets[0] == "all-linear"):
            targets = targets[0]
        exclude: Any = self.exclude
        if isinstance(exclude, list) and len(exclude) == 1 and _looks_like_regex(exclude[0]):
            exclude = exclude[0]
        return LoraConfig(r=self.rank, alpha=float(self.alpha), dropout=float(self.dropout), target_modules=targets,
                          exclude_modules=exclude, rank_pattern=dict(self.rank_pattern),
                          alpha_pattern=dict(self.alpha_pattern), variant=self.variant, init=self.init,
                          modules_to_save=self.modules_to_save, lora_bias=self.lora_bias,
                          target_parameters=[n for v in self.target_parameters or [] for n in str(v).split(",") if n] or None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _split_names(values: list[str] | None) -> list[str] | None:
    """``q_proj,v_proj`` (how peft's examples and many scripts write a list) as two names, as --target-parameters
    reads it; an item whose parts are not all plain names stays whole (a regular expression such as ``{0,3}``)."""
    if not values:
        return values
    names: list[str] = []
    for value in values:
        parts = [part.strip() for part in str(value).split(",")]
        plain = len(parts) > 1 and all(re.fullmatch(r"[\w.\-]+", part) for part in parts)
        names.extend(parts if plain else [value])
    return names


# apply_chat_template's own arguments: a template option of the same name would collide with them
TEMPLATE_RESERVED = ("conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                     "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                     "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")


def check_template_kwargs(value: Any, flag: str = "--chat-template-kwargs") -> dict[str, Any]:
    """The chat template's options: a mapping of names to values, or a JSON object in a string (the command line)."""
    example = "e.g. '{\"enable_thinking\": false}'"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise LorakitError(f"{flag}: not valid JSON ({error.msg} at column {error.colno}); give a JSON object, "
                               f"{example}") from None
    if not isinstance(value, dict):
        raise LorakitError(f"{flag} must be a JSON object of option names to values, {example}; got {shown(value)}")
    for key in value:
        if not isinstance(key, str) or not key.isidentifier():
            raise LorakitError(f"{flag}: {shown(key)} is not an option name a chat template can read (a name like "
                               "enable_thinking)")
        if key in TEMPLATE_RESERVED:
            raise LorakitError(f"{flag}: {shown(key)} is set by lorakit itself when it renders a chat, not a template "
                               "option; remove it")
        bad = _non_finite(value[key])
        if bad is not None:  # Python's json reads NaN / Infinity, which no JSON value is: a template would print "nan"
            raise LorakitError(f"{flag}: option {key!r} holds {bad}, which is not a JSON number; give a finite number")
    return dict(value)


def _non_finite(value: Any) -> float | None:
    """The first NaN or infinity inside a JSON-like value (nested lists and mappings), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        bad = _non_finite(item)
        if bad is not None:
            return bad
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _looks_like_regex(text: str) -> bool:
    return any(ch in text for ch in "*+?[](){}|^$\\")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# LoraConfig's words for its fields -> the options that set them ("lora_bias=True cannot be used with
# variant='dora'" was said to a command line that had typed --lora-bias --variant dora)
_LORA_CONFIG_WORDS = ((re.compile(r"\blora_bias=True\b"), "--lora-bias"),
                      (re.compile(r"\blora_bias=False\b"), "--no-lora-bias"),
                      (re.compile(r"\b(variant|init)=(['\"])([^'\"]*)\2"), r"--\1 \3"),
                      (re.compile(r"^dropout\b"), "--dropout"), (re.compile(r"^target_modules\b"), "--targets"),
                      (re.compile(r"^exclude_modules\b"), "--exclude"),
                      (re.compile(r"^modules_to_save\b"), "--modules-to-save"))


def _as_flags(message: str) -> str:
    """A LoraConfig error in the names of TrainConfig's options (the flags of lorakit train)."""
    for pattern, flag in _LORA_CONFIG_WORDS:
        message = pattern.sub(flag, message)
    return message


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# -- config files ---------------------------------------------------------------------------------------------------
_UNREADABLE = "nested too deep or holds a number too long to read; a config file holds option names and plain values"


def _yaml_unique_loader():
    """PyYAML's SafeLoader, except that a mapping key given twice is an error (PyYAML keeps the last one silently,
    so 'rank: 8' early in a file was overridden by a forgotten 'rank: 16' further down)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{shown(key)} is given twice ("
                        + (f"lines {seen[key]} and {line}" if seen[key] != line else f"line {line}") + "); keep one",
                        key_node.start_mark)
                if isinstance(key, (str, int, float, bool)):
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _unique_pairs(path: Path):
    """json.loads' object_pairs_hook: a key given twice in one object is an error (json keeps the last silently)."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in items]
        twice = next((key for key in keys if keys.count(key) > 1), None)
        if twice is not None:
            raise LorakitError(f"{path}: {shown(twice)} is given twice; keep one")
        return dict(items)

    return pairs


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file of ``TrainConfig`` fields (dashes or underscores).

    Unknown keys and values of the wrong type are refused by name, with the file in the message.
    """
    path = Path(path).expanduser()  # --config=~/run.yaml: the shell expands no ~ after '='
    if not path.is_file():
        where = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise LorakitError(f"config file {path} {where} (paths are read from the current folder, {Path.cwd()}); give "
                           "a YAML, TOML or JSON file of options, e.g. run.yaml holding the lines 'rank: 8' and "
                           "'epochs: 3' (`lorakit train --help` lists every option; each run writes its own as "
                           "RUN/config.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise LorakitError(f"cannot read config file {path}: {error}") from None
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.load(text, Loader=_yaml_unique_loader())  # safe_load's loader, refusing a key given twice
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or error
            if "is given twice" in str(problem):  # well-formed YAML, but one option set twice
                raise LorakitError(f"{path}{where}: {problem}") from None
            raise LorakitError(f"{path}{where}: malformed YAML ({problem})") from None
        except (RecursionError, ValueError):  # "[[[[..." deeper than the stack, a number of thousands of digits
            raise LorakitError(f"{path}: {_UNREADABLE}") from None
    elif suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise LorakitError(f"{path}: malformed TOML ({error})") from None
        except (RecursionError, ValueError):
            raise LorakitError(f"{path}: {_UNREADABLE}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_unique_pairs(path)) if text.strip() else None
        except json.JSONDecodeError as error:
            raise LorakitError(f"{path} line {error.lineno}: malformed JSON ({error.msg} at column {error.colno})") from None
        except LorakitError:  # a key given twice (_unique_pairs): already one line
            raise
        except (RecursionError, ValueError):
            raise LorakitError(f"{path}: {_UNREADABLE}") from None
    else:
        raise LorakitError(f"{path}: unknown config file type {shown(suffix)}; use .yaml, .yml, .toml or .json")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LorakitError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    if isinstance(data.get("train"), dict) and len(data) == 1:  # allow a [train] table in TOML
        data = data["train"]
    return check_values(data, source=str(path))


# what other tools (transformers' TrainingArguments, PEFT's LoraConfig, TRL) call our options: a config written
# for them gets "did you mean" with our name rather than a refusal without a hint
ALIASES = {
    "learning_rate": "lr", "r": "rank", "lora_r": "rank", "lora_rank": "rank", "lora_alpha": "alpha",
    "lora_dropout": "dropout", "target_modules": "targets", "exclude_modules": "exclude", "use_dora": "variant",
    "num_train_epochs": "epochs", "num_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size", "micro_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "max_length", "max_seq_len": "max_length", "sequence_len": "max_length",
    "output_dir": "out", "model_name_or_path": "model", "base_model": "model", "lr_scheduler_type": "schedule",
    "train_file": "data", "dataset": "data", "datasets": "data", "validation_file": "val_data",
    "val_set_size": "val_fraction", "per_device_eval_batch_size": "eval_batch_size", "eval_steps": "eval_every",
    "save_steps": "save_every", "logging_steps": "log_every", "save_total_limit": "keep_checkpoints",
    "load_in_4bit": "quantize", "bf16": "dtype", "fp16": "dtype",
}
_CLI_ONLY = ("resume", "overwrite", "config")
_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "list": "a list of strings (or one string)", "dict": "a mapping"}


def check_values(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Normalise keys (dashes -> underscores) and check each value's type against the field."""
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in FIELDS:
            if key in _CLI_ONLY:
                raise LorakitError(f"{source}: {shown(raw_key)} is a command-line flag only (--{key}), not a config option; "
                                   "remove it from the file")
            # a typo of our name or of another tool's name for it ("lerning_rate" -> learning_rate -> lr)
            close = ([ALIASES[key.lower()]] if key.lower() in ALIASES else
                     [ALIASES.get(m, m) for m in difflib.get_close_matches(key.lower(), [*FIELDS, *ALIASES], n=1)])
            hint = f"; did you mean {shown(close[0])}?" if close else "; `lorakit train --help` lists every option"
            if isinstance(value, dict) and key.lower() not in ALIASES:  # a [section] / a nested mapping of options
                inside = ", ".join(map(str, list(value)[:3])) + (", ..." if len(value) > 3 else "")
                hint = (f" (a section holding {inside}); options are top-level keys: move them out of it (a file "
                        "may also be one [train] section and nothing else)")
            raise LorakitError(f"{source}: unknown option {shown(raw_key)}{hint}")
        if key in out:  # 'max-steps: 2' and 'max_steps: 3': both spellings are read, so one would win unseen
            first = next(k for k in data if str(k).replace("-", "_") == key)
            raise LorakitError(f"{source}: {shown(first)} and {shown(raw_key)} set the same option ({key}); keep one")
        out[key] = _coerce(key, value, source)
    return out


def _plain_text(text: str) -> bool:
    """No NUL and no lone surrogate (the OS's undecodable bytes, U+DC80-U+DCFF, are paths' own)."""
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def _coerce(key: str, value: Any, source: str) -> Any:
    for text in (value if isinstance(value, list) else [value]):
        # a NUL ("\u0000") or a lone surrogate ("\ud800") in a file's string: no path or name holds one (the command
        # line cannot pass them), and os / pathlib raised ValueError / UnicodeEncodeError tracebacks on them
        if isinstance(text, str) and not _plain_text(text):
            raise LorakitError(f"{source}: option {shown(key)} holds a NUL character or a lone UTF-16 surrogate "
                               f"({shown(text)}); write the value as plain text")
    kind = str(FIELDS[key].type)
    base = kind.split("[")[0].split(" ")[0]
    expected = _KIND_WORDS.get(base, kind) + (" or null" if "None" in kind else "")
    bad = LorakitError(f"{source}: option {shown(key)} has the wrong type: {shown(value)} (expected {expected})")
    if kind.startswith("float") and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads 1e-4 (no dot) as a string: accept any number written that way
        try:
            value = float(value)
        except ValueError:
            raise bad from None
    if value is None:
        if "None" not in kind:
            raise bad
        return None
    if kind.startswith("list") or (FIELDS[key].metadata.get("nargs") == "+"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        return [str(v) for v in value]
    if kind == "dict":
        if FIELDS[key].metadata.get("json"):  # a JSON object on the command line, a mapping in a config file
            return check_template_kwargs(value, f"{source}: {_flag(key)}" if source != "command line" else _flag(key))
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if base == "bool":  # "bool | None" too (--progress: unset means decided at run time)
        if not isinstance(value, bool):
            raise bad
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if kind.startswith("str"):
        if not isinstance(value, str):
            raise bad
        return value
    return value


# the two ways to give a validation set: a layer that sets one replaces the other of the layers below it
_VALIDATION_CHOICES = ("val_data", "val_fraction")


def layered(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Option values, each layer overriding those before it (a run's config.yaml, a config file, the flags). A
    layer that gives --val-data or --val-fraction drops the other from the layers below: a config file's
    val_fraction and the flag --val-data were refused as "give --val-data or --val-fraction, not both", though
    the flag was the only one given on the command line and flags override the file."""
    values: dict[str, Any] = {}
    for layer in layers:
        layer = layer or {}
        for key in _VALIDATION_CHOICES:
            if layer.get(key) and not any(other in layer for other in _VALIDATION_CHOICES if other != key):
                values.pop(next(other for other in _VALIDATION_CHOICES if other != key), None)
        values.update(layer)
    return values


def resolve_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the config file's values, then command-line overrides (:func:`layered`)."""
    return TrainConfig(**layered(file_values, overrides))


def dump_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML (readable back with ``--config``), with the effective learning rate filled in."""
    import yaml

    data = config.to_dict()
    data["lr"] = config.learning_rate
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
