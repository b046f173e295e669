"""``LoraConfig``: what an adapter is (rank, alpha, targets, variant), and its PEFT ``adapter_config.json`` form.

The base weights' storage (dense or quantized) is not part of this config: it belongs to the base model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import LorakitError
from lorakit.functional import scaling

VARIANTS = ("lora", "rslora", "dora")
INITS = ("default", "gaussian", "pissa")


@dataclass
class LoraConfig:
    """An adapter's hyper-parameters.

    Attributes:
        r: rank of the update (A is r x in, B is out x r).
        alpha: scaling numerator: the update is (alpha / r) * B A (alpha / sqrt(r) for rsLoRA).
        dropout: dropout on the adapter's input during training.
        target_modules: module names (a module matches when its full path equals a name or ends with ``.name``),
            a regular expression (matched against the full path), or ``"all-linear"`` (every linear layer but the
            output head).
        exclude_modules: names or a regular expression removed from the targets.
        rank_pattern / alpha_pattern: per-module overrides ``{pattern: value}``; a pattern is a regular expression
            matched against the end of the module path (PEFT's rule).
        variant: ``"lora"``, ``"rslora"`` or ``"dora"``.
        init: ``"default"`` (A Kaiming-uniform, B zero), ``"gaussian"`` (A normal(0, 1/r)), or ``"pissa"``
            (A, B from the top-r singular vectors of W, removed from the base).
        bias: only ``"none"`` (biases stay frozen).
        modules_to_save: modules (such as the output head) trained and saved as whole copies.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = "all-linear"
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    variant: str = "lora"
    init: str = "default"
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (tuple, set)):
            self.modules_to_save = list(self.modules_to_save)
        self.validate()

    def validate(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        for name, value in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise LorakitError(f"{name} must map module-name patterns to numbers, got {value!r}")
        for pattern, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{pattern!r}]", rank)
        for pattern, alpha in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{pattern!r}]", alpha)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise LorakitError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.variant not in VARIANTS:
            raise LorakitError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.init not in INITS:
            raise LorakitError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.bias != "none":
            raise LorakitError(f"bias={self.bias!r} is not supported; lorakit keeps biases frozen (bias='none')")
        if self.target_modules is None or self.target_modules == [] or self.target_modules == "":
            raise LorakitError("target_modules is empty; name modules (e.g. ['q_proj', 'v_proj']), a regex, or 'all-linear'")
        for name, value in (("target_modules", self.target_modules), ("exclude_modules", self.exclude_modules),
                            ("modules_to_save", self.modules_to_save)):
            if value is not None and not isinstance(value, str) and not (
                    isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
                raise LorakitError(f"{name} must be a list of module names or one regular expression, got {value!r}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        for name, value in (("target_modules", self.target_modules), ("exclude_modules", self.exclude_modules)):
            if isinstance(value, str) and value != "all-linear":
                try:
                    re.compile(value)
                except re.error as error:
                    raise LorakitError(f"{name} {value!r} is not a valid regular expression: {error}") from None

    # -- per-module values -------------------------------------------------------------------------------------
    def rank_for(self, module_path: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_path, self.r))

    def alpha_for(self, module_path: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_path, self.alpha))

    def scaling_for(self, module_path: str) -> float:
        return scaling(self.variant, self.rank_for(module_path), self.alpha_for(module_path))

    # -- PEFT adapter_config.json ------------------------------------------------------------------------------
    def to_peft_dict(self, base_model_name_or_path: str | None = None, fan_in_fan_out: bool = False) -> dict[str, Any]:
        """The ``adapter_config.json`` that PEFT writes for the same adapter (``peft.LoraConfig`` reads it)."""
        target = self.target_modules
        return {
            **PEFT_DEFAULTS,
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": target if isinstance(target, str) else sorted(target),
            "exclude_modules": self.exclude_modules,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_rslora": self.variant == "rslora",
            "use_dora": self.variant == "dora",
            # a PiSSA adapter is saved converted to plain LoRA form, so it loads with the default init
            "init_lora_weights": "gaussian" if self.init == "gaussian" else True,
            "bias": self.bias,
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "fan_in_fan_out": fan_in_fan_out,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> "LoraConfig":
        """Read PEFT's ``adapter_config.json``; a field lorakit does not support is refused by name."""
        if not isinstance(data, dict):
            raise LorakitError(f"{source}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise LorakitError(f"{source}: peft_type {peft_type!r} is not LoRA; lorakit reads LoRA adapters only")
        for key, value in data.items():
            if key in _READ_FIELDS or key in _IGNORED_FIELDS:
                continue
            if key in PEFT_DEFAULTS:
                if not _is_default(value, PEFT_DEFAULTS[key]):
                    raise LorakitError(f"{source}: PEFT option {key}={value!r} is not supported by lorakit")
                continue
            if value not in (None, False, {}, [], ""):
                raise LorakitError(f"{source}: unknown field {key!r}={value!r}; lorakit cannot apply it")
        use_rslora, use_dora = bool(data.get("use_rslora", False)), bool(data.get("use_dora", False))
        if use_rslora and use_dora:  # PEFT allows DoRA with rsLoRA scaling; lorakit's variants are exclusive
            raise LorakitError(f"{source}: use_rslora and use_dora together are not supported by lorakit")
        variant = "dora" if use_dora else "rslora" if use_rslora else "lora"
        init = data.get("init_lora_weights", True)
        init_name = {True: "default", "gaussian": "gaussian"}.get(init)
        if init_name is None:
            if init is False or (isinstance(init, str) and init.lower().startswith(("pissa", "olora", "loftq", "eva", "corda"))):
                init_name = "default"  # the saved weights are final; the init only mattered before training
            else:
                raise LorakitError(f"{source}: init_lora_weights={init!r} is not supported by lorakit")
        try:
            return cls(
                r=data.get("r", 8),
                alpha=data.get("lora_alpha", 8),
                dropout=data.get("lora_dropout", 0.0) or 0.0,
                target_modules=data.get("target_modules"),
                exclude_modules=data.get("exclude_modules"),
                rank_pattern=data.get("rank_pattern") or {},
                alpha_pattern=data.get("alpha_pattern") or {},
                variant=variant,
                init=init_name,
                bias=data.get("bias", "none"),
                modules_to_save=data.get("modules_to_save"),
            )
        except LorakitError as error:
            raise LorakitError(f"{source}: {error}") from None
        except (TypeError, ValueError) as error:
            raise LorakitError(f"{source}: malformed field: {error}") from None

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LorakitError(f"{name} must be a positive integer, got {value!r}")


def _check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LorakitError(f"{name} must be a finite number, got {value!r}")


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default


def _is_default(value: Any, default: Any) -> bool:
    return value == default or (value in (None, {}, [], False) and default in (None, {}, [], False))


# Fields lorakit reads (mapped onto LoraConfig) or that only describe the file, never the math.
_READ_FIELDS = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
    "use_rslora", "use_dora", "init_lora_weights", "bias", "modules_to_save", "fan_in_fan_out",
}
_IGNORED_FIELDS = {
    "base_model_name_or_path", "revision", "inference_mode", "task_type", "auto_mapping", "peft_version",
    "megatron_core", "qalora_group_size", "runtime_config",
}

# PEFT 0.21 LoraConfig fields lorakit does not implement, with the value that means "off". Any other value is refused.
PEFT_DEFAULTS: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "inference_mode": True,
    "revision": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}
