"""``LoraConfig``: what an adapter is (rank, alpha, targets, variant), and its PEFT ``adapter_config.json`` form.

The base weights' storage (dense or quantized) is not part of this config: it belongs to the base model.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import LorakitError

VARIANTS = ("lora", "rslora", "dora", "rsdora")
INITS = ("default", "gaussian", "pissa")
SHOWN_CHARS = 80  # an error message quotes at most this much of a value that came from a file


# -- quoting file data in error messages ----------------------------------------------------------------------------
# A value read from a file can be 20 MB long, nested thousands deep, or an int whose repr() raises: error messages
# quote it through these, so they stay one short line whatever the file holds.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, SHOWN_CHARS, SHOWN_CHARS, SHOWN_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 5


def clipped(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` on one line, at most ``limit`` characters (cut ones end in ``...``)."""
    cut = len(text) > limit
    text = text[:limit]  # first, so a 20 MB text costs nothing
    text = text if text.isprintable() else repr(text)[1:-1]  # newlines and control characters escaped
    return text[: limit - 3] + "..." if cut or len(text) > limit else text


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message: one line, at most ``limit`` characters, never raises."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"  # repr() may raise on these
    try:
        text = _REPR.repr(value)
    except Exception:  # a hostile object's __repr__, or an int nested in a list
        text = f"<{type(value).__name__}>"
    return clipped(text, limit)


def listed(items: Any, limit: int = 5) -> str:
    """The first ``limit`` items (each cut by ``clipped``), then "and N more": ``a, b, c and 7 more``."""
    items = list(items)
    text = ", ".join(clipped(str(item)) for item in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


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
        variant: ``"lora"``, ``"rslora"``, ``"dora"`` or ``"rsdora"`` (DoRA scaled by alpha / sqrt(r), as PEFT's
            ``use_dora`` with ``use_rslora``).
        init: ``"default"`` (A Kaiming-uniform, B zero), ``"gaussian"`` (A normal(0, 1/r)), or ``"pissa"``
            (A, B from the top-r singular vectors of W, removed from the base).
        bias: only ``"none"`` (biases stay frozen).
        modules_to_save: modules (such as the output head) trained and saved as whole copies; a module is one when
            its path ends with a name, PEFT's rule (``"norm"`` also covers every ``*_layernorm``).
        layers_to_transform: only modules in these layer indices (an int or a list) are targeted, PEFT's rule: the
            index is the first number in the module path after ``<layers_pattern>.`` (any segment when no pattern);
            needs ``target_modules`` as a list of names, as in PEFT (an entry that is a module's whole path adapts
            that module whatever its layer, as in PEFT).
        layers_pattern: the name(s) of the layer list (``"layers"``, ``"h"``), used with ``layers_to_transform``.
        lora_bias: a trained bias on ``lora_B`` (PEFT's option of that name): the update is
            ``s * (B A x + b)``, ``b (out,)`` trained with B and saved as ``lora_B.bias``. A base layer without a bias
            cannot have the adapter merged (there is nowhere to fold ``s * b``; peft refuses that merge too). Not with
            DoRA, ``init`` other than ``"default"``, embeddings, ``nn.MultiheadAttention`` or ``target_parameters``
            (peft 0.21 refuses each of those too).
        target_parameters: raw parameters to adapt, PEFT's option of that name (a list; ``<module path>.<name>``
            matches when it equals an entry or ends with ``.entry``): the fused MoE experts of transformers 5
            (``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``), a router's ``mlp.gate.weight``. 3-D
            parameters get one rank-r LoRA per expert (see ``lorakit.param_lora``). With it, ``target_modules`` may be
            None or [] (the parameters only). No dropout, DoRA or PiSSA on these (peft refuses them too).
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
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    target_parameters: list[str] | None = None
    lora_bias: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (tuple, set)):  # peft's to_dict() keeps these two as sets
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (tuple, set)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (tuple, set)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.target_parameters, (tuple, set)):
            self.target_parameters = sorted(self.target_parameters)
        if self.target_parameters == []:
            self.target_parameters = None
        self.validate()

    def validate(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        for name, value in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise LorakitError(f"{name} must map module-name patterns to numbers, got {shown(value)}")
        for pattern, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{shown(pattern)}]", rank)
        for pattern, alpha in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{shown(pattern)}]", alpha)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise LorakitError(f"dropout must be in [0, 1), got {shown(self.dropout)} (the chance of zeroing each adapter "
                               "input while training; 0 turns it off)")
        if self.variant not in VARIANTS:
            hint = f" (did you mean {self.variant.lower()!r}?)" if str(self.variant).lower() in VARIANTS else ""
            raise LorakitError(f"unknown variant {shown(self.variant)}{hint}; choose one of {', '.join(VARIANTS)}")
        if self.init not in INITS:
            raise LorakitError(f"unknown init {shown(self.init)}; choose one of {', '.join(INITS)}")
        if self.bias != "none":
            raise LorakitError(f"bias={shown(self.bias)} is not supported: lorakit keeps biases frozen, use bias='none' (an "
                               "adapter peft trained with biases: merge it with peft's merge_and_unload and load the merged model)")
        if not isinstance(self.lora_bias, bool):  # bool("false") is True: a string would switch it on
            raise LorakitError(f"lora_bias must be true or false, got {shown(self.lora_bias)}")
        if self.lora_bias and self.variant in ("dora", "rsdora"):  # peft 0.21's LoraConfig refuses both too
            raise LorakitError(f"lora_bias=True cannot be used with variant={self.variant!r} (peft does not support a bias "
                               "on DoRA's lora_B either); use variant='lora' or 'rslora', or lora_bias=False")
        if self.lora_bias and self.init != "default":
            raise LorakitError(f"lora_bias=True needs init='default', got init={self.init!r} (peft allows lora_bias only "
                               "with init_lora_weights true or false, so it could not load the saved adapter)")
        _check_target_parameters(self)
        if (self.target_modules is None or self.target_modules == []) and self.target_parameters:
            pass  # the parameters only, as peft's target_modules=[] with target_parameters
        elif self.target_modules is None or self.target_modules == [] or self.target_modules == "":
            raise LorakitError("target_modules is empty; name modules (e.g. ['q_proj', 'v_proj']), a regex, or 'all-linear'")
        for name, value in (("target_modules", self.target_modules), ("exclude_modules", self.exclude_modules),
                            ("modules_to_save", self.modules_to_save)):
            if value is not None and not isinstance(value, str) and not (
                    isinstance(value, list) and all(isinstance(v, str) and v for v in value)) and not (
                    name == "target_modules" and value == []):
                raise LorakitError(f"{name} must be a list of module names or one regular expression, got {shown(value)}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        layers = self.layers_to_transform
        if layers is not None and not (_is_index(layers) or (isinstance(layers, list) and all(_is_index(i) for i in layers))):
            raise LorakitError(f"layers_to_transform must be a layer index or a list of them, got {shown(layers)}")
        pattern = self.layers_pattern
        if pattern is not None and not isinstance(pattern, str) and not (
                isinstance(pattern, list) and all(isinstance(p, str) and p for p in pattern)):
            raise LorakitError(f"layers_pattern must be a name (such as 'layers') or a list of names, got {shown(pattern)}")
        if isinstance(self.target_modules, str) and (layers is not None or pattern):  # PEFT's LoraConfig refuses it too
            raise LorakitError("layers_to_transform / layers_pattern need target_modules as a list of module names (such as "
                               f"['q_proj', 'v_proj']), not {shown(self.target_modules)}; a regex can name the layers itself")
        if pattern and layers is None:
            raise LorakitError(f"layers_pattern={shown(pattern)} needs layers_to_transform (the layer indices to adapt)")
        regexes = [(name, value) for name, value in (("target_modules", self.target_modules),
                                                     ("exclude_modules", self.exclude_modules))
                   if isinstance(value, str) and value != "all-linear"]
        regexes += [(f"{name} key", key) for name, table in (("rank_pattern", self.rank_pattern),
                                                             ("alpha_pattern", self.alpha_pattern)) for key in table]
        for name, value in regexes:
            try:
                re.compile(value)
            except (re.error, RecursionError, OverflowError) as error:  # "((((..." deep enough makes re recurse
                raise LorakitError(f"{name} {shown(value)} is not a valid regular expression: "
                                   f"{clipped(str(error) or type(error).__name__)}") from None

    def in_chosen_layers(self, module_path: str) -> bool:
        """PEFT's ``layers_to_transform`` rule (true when no layers are chosen or targets are a regular expression)."""
        layers = self.layers_to_transform
        if layers is None or layers == []:
            return True
        patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else (self.layers_pattern or [])
        match = None
        if not patterns:  # the first numbered segment is the layer index (not an expert index further in)
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_path)
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_path)
            if match is not None:
                break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers

    # -- per-module values -------------------------------------------------------------------------------------
    def rank_for(self, module_path: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_path, self.r))

    def alpha_for(self, module_path: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_path, self.alpha))

    def scaling_for(self, module_path: str) -> float:
        from lorakit.functional import scaling  # here, not at the top: functional imports torch, and this module
        # is read by `lorakit train --help` (TrainConfig's fields) before any tensor exists

        kind = "rslora" if self.variant in ("rslora", "rsdora") else self.variant
        return scaling(kind, self.rank_for(module_path), self.alpha_for(module_path))

    # -- PEFT adapter_config.json ------------------------------------------------------------------------------
    def to_peft_dict(self, base_model_name_or_path: str | None = None, fan_in_fan_out: bool = False,
                     task_type: str | None = "CAUSAL_LM") -> dict[str, Any]:
        """The ``adapter_config.json`` that PEFT writes for the same adapter (``peft.LoraConfig`` reads it).

        ``task_type`` picks the class ``peft.PeftModel.from_pretrained`` wraps the base in (None: the generic one,
        for a model that is not a causal LM)."""
        target = self.target_modules
        if target in (None, []):  # the parameters only; peft would fill None with its per-model defaults (q, v)
            target = []
        return {
            **PEFT_DEFAULTS,
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": target if isinstance(target, str) else sorted(target),
            "exclude_modules": self.exclude_modules,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_rslora": self.variant in ("rslora", "rsdora"),
            "use_dora": self.variant in ("dora", "rsdora"),
            # a PiSSA adapter is saved converted to plain LoRA form, so it loads with the default init
            "init_lora_weights": "gaussian" if self.init == "gaussian" else True,
            "bias": self.bias,
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "fan_in_fan_out": fan_in_fan_out,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "target_parameters": list(self.target_parameters) if self.target_parameters else None,
            "lora_bias": self.lora_bias,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> "LoraConfig":
        """Read PEFT's ``adapter_config.json``; a field lorakit does not support is refused by name."""
        if not isinstance(data, dict):
            raise LorakitError(f"{source}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", "LORA")
        if not isinstance(peft_type, str) or peft_type.upper() != "LORA":  # str() of a deep list would recurse
            if isinstance(peft_type, str) and peft_type.upper() in FOLDER_TYPES:  # converted with the tensors (peft_types)
                raise LorakitError(f"{source}: peft_type {shown(peft_type)} ({FOLDER_TYPES[peft_type.upper()]}) is read from "
                                   "its whole adapter folder, as the plain LoRA it equals: lorakit.load_adapter(model, "
                                   "folder) or lorakit.read_adapter(folder), not LoraConfig.from_peft_dict")
            if isinstance(peft_type, str) and peft_type.upper() == "TRAINABLE_TOKENS":  # rows read with the tensors
                raise LorakitError(f"{source}: peft_type {shown(peft_type)} (peft's TrainableTokens: trained rows of the "
                                   "embedding, no LoRA) is read from its whole adapter folder: lorakit.load_adapter(model, "
                                   "folder) or lorakit.read_adapter(folder), not LoraConfig.from_peft_dict")
            if isinstance(peft_type, str) and peft_type.upper() in _UNMERGEABLE_TYPES:  # no weight update to merge
                raise LorakitError(f"{source}: peft_type {shown(peft_type)} is not LoRA (it adds trained virtual tokens or "
                                   "layers of its own, which no merge turns into base weights); lorakit reads LoRA adapters "
                                   "only: run this one with peft (PeftModel.from_pretrained)")
            if isinstance(peft_type, str) and peft_type.upper() == "BEFT":  # peft's merge raises on a layer without a bias
                raise LorakitError(f"{source}: peft_type {shown(peft_type)} is not LoRA (it adds a trained bias to each target "
                                   "layer); lorakit reads LoRA adapters only: merge this one into the base with peft "
                                   "(merge_and_unload) if every target layer has a bias of its own (peft cannot merge it "
                                   "into one without, as Llama's), else run it with peft (PeftModel.from_pretrained)")
            raise LorakitError(f"{source}: peft_type {shown(peft_type)} is not LoRA; lorakit reads LoRA adapters only "
                               "(merge this one into the base with peft: merge_and_unload, then load the merged model)")
        ignored = []  # fields lorakit does not know, set to values that switch nothing on
        version = data.get("peft_version")
        origin = f"saved by peft {clipped(version, 20)}" if isinstance(version, str) else "from a newer peft?"
        for key, value in data.items():
            if key in _READ_FIELDS or key in _IGNORED_FIELDS:
                continue
            if key in PEFT_DEFAULTS:
                # peft reads a sub-config given as {} as one of default settings: switched on
                default = value is None if key in _SUBCONFIGS else _is_default(value, PEFT_DEFAULTS[key])
                if not default and key in _FOLDER_OPTIONS:
                    raise LorakitError(f"{source}: PEFT option {key}={shown(value)} cannot be part of a LoraConfig; "
                                       "lorakit.load_adapter(model, folder) loads such an adapter from its folder")
                if not default:
                    hint = _UNSUPPORTED_HINTS.get(key, "it changes the adapter's math in a way lorakit does not implement")
                    advice = _NO_MERGE.get(key, "merge the adapter with peft (merge_and_unload) and load the merged "
                                                "model instead")
                    raise LorakitError(f"{source}: PEFT option {key}={shown(value)} is not supported by lorakit ({hint}); "
                                       f"{advice}")
                continue
            if value not in (None, False, {}, [], "") and key == "enable_lora":
                raise LorakitError(f"{source}: enable_lora={shown(value)} is early peft's (0.1 - 0.2) LoRA on parts of a "
                                   "fused layer (MergedLinear, tensors of another layout), which later peft versions dropped; "
                                   "lorakit cannot apply it: merge the adapter with the peft version that saved it and load "
                                   "the merged model")
            if not _is_off(value):
                raise LorakitError(f"{source}: unknown field {shown(key)}={shown(value)} ({origin}; lorakit knows peft 0.21's "
                                   "fields); lorakit cannot apply it. If it does not change the adapter's math, delete it from "
                                   "the file")
            if key != "enable_lora":  # early peft's, known: off is the plain LoRA lorakit reads
                ignored.append(key)
        if ignored:  # a newer peft writes every field of its own, off by default: said, not refused
            import warnings

            warnings.warn(f"{source}: ignored field(s) lorakit does not know, all off ({listed(map(shown, ignored))}; "
                          f"{origin}; lorakit knows peft 0.21's)", UserWarning, stacklevel=2)
        for flag in ("use_rslora", "use_dora", "lora_bias"):  # bool("false") is True: a hand-edited string would switch it on
            if not isinstance(data.get(flag), (bool, type(None))):
                raise LorakitError(f"{source}: {flag} must be true or false, got {shown(data.get(flag))}")
        use_rslora, use_dora = bool(data.get("use_rslora", False)), bool(data.get("use_dora", False))
        variant = {(True, True): "rsdora", (False, True): "dora", (True, False): "rslora"}.get((use_rslora, use_dora), "lora")
        init = data.get("init_lora_weights", True)
        # the saved weights are final: the init only mattered before training (but see _warn_residual_base)
        init_name = "gaussian" if init == "gaussian" else "default"
        if not isinstance(init, (bool, str, type(None))):
            raise LorakitError(f"{source}: init_lora_weights={shown(init)} must be true, false or a method name")
        if isinstance(init, str) and not _known_init(init):  # peft raises "Unknown initialization" for these too
            raise LorakitError(f"{source}: init_lora_weights={shown(init)} is not an init lorakit knows (peft 0.21's: "
                               f"{', '.join(_KNOWN_INITS)}, pissa_niter_K), so it cannot tell whether it rewrote the base "
                               "weights; if it did not (A and B are the whole update), set it to true in the file")
        _warn_residual_base(init, source)
        bias = data.get("bias")
        try:
            return cls(
                r=_integral(data.get("r", 8)),
                alpha=data.get("lora_alpha", 8),
                dropout=data.get("lora_dropout", 0.0) or 0.0,
                target_modules=data.get("target_modules"),
                exclude_modules=data.get("exclude_modules"),
                rank_pattern={k: _integral(v) for k, v in (data.get("rank_pattern") or {}).items()}
                if isinstance(data.get("rank_pattern"), dict) else data.get("rank_pattern") or {},
                alpha_pattern=data.get("alpha_pattern") or {},
                variant=variant,
                init=init_name,
                bias="none" if bias is None else bias,
                modules_to_save=data.get("modules_to_save") or None,
                layers_to_transform=None if data.get("layers_to_transform") == [] else data.get("layers_to_transform"),
                layers_pattern=data.get("layers_pattern") or None,
                target_parameters=data.get("target_parameters") or None,
                lora_bias=bool(data.get("lora_bias", False)),
            )
        except LorakitError as error:  # named as the file names them: alpha -> lora_alpha, dropout -> lora_dropout
            message = re.sub(r"^(alpha|dropout)\b", r"lora_\1", str(error))
            raise LorakitError(f"{source}: {message}") from None
        except (TypeError, ValueError) as error:
            raise LorakitError(f"{source}: malformed field: {clipped(str(error), 4 * SHOWN_CHARS)}") from None

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)


# peft.LoraConfig's names for lorakit's fields: code copied from peft gets a line saying what to write instead
_PEFT_FIELD_NAMES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "rank": "r", "lora_r": "r",
                     "use_dora": "variant='dora'", "use_rslora": "variant='rslora'", "init_lora_weights": "init",
                     "task_type": None, "inference_mode": None, "fan_in_fan_out": None}
_dataclass_init = LoraConfig.__init__


@functools.wraps(_dataclass_init)
def _init_naming_peft_fields(self, *args: Any, **kwargs: Any) -> None:
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = [key for key in kwargs if key not in fields]
    if unknown:  # all of them in one line: code copied from peft often has three
        advice = []
        for key in unknown:
            if key in _PEFT_FIELD_NAMES:
                instead = _PEFT_FIELD_NAMES[key]
                advice.append(f"{key!r} (peft's name): " + (f"write {instead}" if instead else "not needed, leave it out"))
            else:
                close = difflib.get_close_matches(key, sorted(fields), n=1)
                advice.append(f"{key!r}" + (f": did you mean {close[0]!r}?" if close else ""))
        listing = "" if all(key in _PEFT_FIELD_NAMES or difflib.get_close_matches(key, sorted(fields), n=1)
                            for key in unknown) else f" (its fields: {', '.join(sorted(fields))})"
        raise LorakitError(f"LoraConfig has no field {'; '.join(advice)}{listing}")
    _dataclass_init(self, *args, **kwargs)


LoraConfig.__init__ = _init_naming_peft_fields


def _check_target_parameters(config: LoraConfig) -> None:
    """``target_parameters``: a list of names, and only the options peft's ParamWrapper supports."""
    names = config.target_parameters
    if names is None:
        return
    if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)):
        raise LorakitError(f"target_parameters must be a list of parameter names (such as ['mlp.experts.gate_up_proj', "
                           f"'mlp.experts.down_proj']), got {shown(names)}; regular expressions are not supported (as in peft)")
    if config.variant in ("dora", "rsdora"):
        raise LorakitError(f"variant={config.variant!r} cannot be used with target_parameters (DoRA has no form for raw "
                           "parameters such as MoE experts, in peft either); use variant='lora' or 'rslora'")
    if config.dropout:
        raise LorakitError(f"dropout={shown(config.dropout)} cannot be used with target_parameters: the adapter is added to "
                           "the weight, so there is no input to drop (peft refuses it too); set dropout=0")
    if config.lora_bias:
        raise LorakitError("lora_bias=True cannot be used with target_parameters (the update is added to the weight, "
                           "which has no bias to train; peft refuses it too); set lora_bias=False")
    if config.init == "pissa":
        raise LorakitError("init='pissa' cannot be used with target_parameters (it needs one weight matrix per layer); "
                           "use init='default' or 'gaussian'")


def _integral(value: Any) -> Any:
    """4.0 -> 4 (some tools write JSON numbers as floats); anything else unchanged, for the checks to report."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# Inits after which PEFT's saved A, B belong to a changed base (W minus the initial B A, or LoftQ's quantized one)
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# peft 0.21's init_lora_weights methods (besides true / false); lorakit reads the saved weights of any of them
_KNOWN_INITS = ("gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal", "mica", "lora_ga")


def _known_init(init: str) -> bool:
    """peft's own tests: pissa / pissa_niter_K and corda by prefix, the rest by name (any case, as peft lowers some)."""
    init = init.lower()
    return init in _KNOWN_INITS or re.fullmatch(r"pissa_niter_\d+", init) is not None or init.startswith("corda")


def _warn_residual_base(init: Any, source: str) -> None:
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        import warnings

        warnings.warn(f"{source}: init_lora_weights={shown(init)}: {clipped(init)} rewrites the base weights when the adapter is "
                      "created, and peft saved A and B for that rewritten base, not for the original model: load it on "
                      "the base saved with it, or re-save it from peft with path_initial_model_for_weight_conversion to get an "
                      "adapter for the original model", UserWarning, stacklevel=4)


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LorakitError(f"{name} must be a positive integer, got {shown(value)} (a rank such as 8 or 16)")
    if value >= 2**31:  # no layer is that wide; the shape errors further on quoted all its digits (8 KB for 10**4000)
        raise LorakitError(f"{name} {shown(value)} is larger than any layer (2**31 or more); use a rank such as 8 or 16")


_FLOAT32_MAX = 3.4028234663852886e38  # the scale is applied in float32 (or narrower): above this it is inf there


def _check_alpha(name: str, value: Any) -> None:
    # an int is finite (math.isfinite(10**400) raised OverflowError: a traceback): only its size is checked, below
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise LorakitError(f"{name} must be a finite number, got {shown(value)} (the update is scaled by alpha / r; "
                           "often 2 x r)")
    if abs(value) > _FLOAT32_MAX:  # 1e300 is finite in Python: it turned every output of the model to inf / NaN
        raise LorakitError(f"{name} {shown(value)} is beyond float32's range (3.4e38), so every output of the model would "
                           "be inf or NaN; use a value such as 2 x r")


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's rule: the value of the first pattern that matches the path's end (whole dotted parts), else default."""
    for pattern, value in patterns.items():
        if _suffix_regex(pattern).match(module_path):
            return value
    return default


@functools.lru_cache(maxsize=1 << 16)
def _suffix_regex(pattern: str) -> re.Pattern:
    # compiled once per pattern: re's own cache holds 512, so a file with thousands of pattern keys recompiled each
    # key for every module (20,000 keys over 14 modules: 20 s, against 2 s compiled once)
    return re.compile(rf"(.*\.)?({pattern})$")


def _is_off(value: Any) -> bool:
    """None, false, 0, empty, or an object of settings that are all off: an option of a newer peft left unused."""
    if isinstance(value, dict):
        return all(_is_off(v) for v in value.values())
    return value is None or (isinstance(value, (bool, int, float, str, list)) and not value)


def _is_default(value: Any, default: Any) -> bool:
    return value == default or (value in (None, {}, [], False) and default in (None, {}, [], False))


# peft 0.21's methods that merge_and_unload cannot fold into the base: prompt learning (virtual tokens), the
# LLaMA-Adapter's gated prompts, and mixtures that pick adapters per input
_UNMERGEABLE_TYPES = {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "CPT", "CARTRIDGE",
                      "ADAPTION_PROMPT", "XLORA", "POLY", "LILY", "SHADOW"}  # Lily's and ShadowPEFT's merge raises
# peft types whose update is a low-rank product: lorakit.peft_types reads their folders as that plain LoRA
FOLDER_TYPES = {"ADALORA": "AdaLoRA", "VERA": "VeRA", "LOHA": "LoHa", "LOKR": "LoKr"}

# Fields lorakit reads (mapped onto LoraConfig) or that only describe the file, never the math.
_READ_FIELDS = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
    "use_rslora", "use_dora", "init_lora_weights", "bias", "modules_to_save", "fan_in_fan_out", "layers_to_transform",
    "layers_pattern", "target_parameters", "lora_bias",
}
# Fields that never change a saved adapter's math: file metadata, and settings of inits (the weights are final).
_IGNORED_FIELDS = {
    "base_model_name_or_path", "revision", "inference_mode", "task_type", "auto_mapping", "peft_version",
    "megatron_core", "qalora_group_size", "runtime_config", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config",
    "merge_weights",  # peft 0.1 - 0.2 (alpaca-lora's files): whether eval() merged the update; same outputs either way
}

# Options lorakit.io reads from a whole adapter folder (they need its tensors), not from the config alone.
_FOLDER_OPTIONS = {"trainable_token_indices", "ensure_weight_tying",
                   # peft's variants that load as the plain LoRA they equal (lorakit.peft_variants): their tensors change
                   "velora_config", "monteclora_config", "kasa_config", "use_bdlora", "use_qalora"}

# peft 0.21's options given as an object of settings, on whenever present (``{}``: the default settings)
_SUBCONFIGS = {"velora_config", "monteclora_config", "kasa_config", "use_bdlora", "arrow_config"}

# Why an unsupported option is refused, said in the error.
_UNSUPPORTED_HINTS = {
    "layer_replication": "layers duplicated inside the model",
    "use_qalora": "QA-LoRA's pooled input",
    "alora_invocation_tokens": "activated LoRA, switched on by tokens",
    "megatron_config": "Megatron parallel layers",
    "arrow_config": "Arrow's routing of each token among several LoRA experts",
}
# Unsupported options for which merging with peft is no way out either: what to say instead
_NO_MERGE = {
    # peft's merge_and_unload adds every copy's update into the base weights the copies share (a wrong model)
    "layer_replication": "run it with peft (PeftModel.from_pretrained): peft's merge_and_unload gives wrong weights for "
                         "it, since the repeated layers share their base weights and each would take the others' updates",
    # peft raises NotImplementedError / RuntimeError in merge_and_unload for these two
    "alora_invocation_tokens": "run it with peft (PeftModel.from_pretrained): it acts only after its invocation tokens, "
                               "which no merged weight can do (peft's merge_and_unload refuses it too)",
    "arrow_config": "run it with peft (PeftModel.from_pretrained): a merged weight cannot route tokens (peft's "
                    "merge_and_unload refuses it too)",
}

# PEFT 0.21 LoraConfig fields lorakit does not implement, with the value that means "off". Any other value is refused.
PEFT_DEFAULTS: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "inference_mode": True,
    "revision": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}
