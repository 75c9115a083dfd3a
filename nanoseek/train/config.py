"""Typed training settings, and how TOML files and `key=value` overrides map onto them.

Every recipe's settings are one flat namespace of dataclass fields, built from parts:

* `TrainerConfig`: what every recipe shares (the model to start from, optimizer and LR schedule, MoE
  balancing, checkpointing, logging, runtime, divergence handling); the `Trainer` reads only these.
* `LanguageModelingConfig`: + token sequences from `data` (`seq_len`, `batch_size`) and the MTP loss
  weight schedule: the part pretraining and SFT share.
* `PretrainConfig`: + YaRN context extension, validation batches and text samples.
* The R1 recipes (`nanoseek.r1.configs`): SFT = LanguageModelingConfig + its own part; GRPO =
  TrainerConfig + task, rollout and objective settings (no `data`, `seq_len` or `yarn_*`).

A key that is not a field of the recipe's config is one error naming it. TOML values are type-checked
exactly like `key=value` strings are parsed (an int where an int is declared, `true`/`false` for a bool).

One name per setting. These model fields are set by training settings, so they cannot be given as
`model.<field>` overrides (the exported config.json records the values used):
  `aux_alpha`  -> ModelConfig.aux_loss_alpha (the sequence-wise balance loss weight; 0 when balance=none)
  `balance`    -> ModelConfig.seq_aux (False for balance=aux_loss: the classic batch-wise loss)
  `mtp_lambda`, `mtp_lambda_final`, `mtp_lambda_switch_frac` -> the MTP weight given to the forward at
               every step; ModelConfig.mtp_loss_weight is set to the weight of the final steps
               (pretraining and SFT; GRPO trains no MTP loss and keeps the starting model's value).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from nanoseek.config import PRESETS, ModelConfig, preset
from nanoseek.device import resolve_device
from nanoseek.errors import UserError, require
from nanoseek.parallel.config import ParallelConfig
from nanoseek.fp8 import require_fp8
from nanoseek.train.schedule import piecewise

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def _finite(x: float, low: float = 0.0, high: float = math.inf, low_open: bool = False,
            high_open: bool = False) -> bool:
    if not math.isfinite(x):
        return False
    above = x > low if low_open else x >= low
    below = x < high if high_open else x <= high
    return above and below


def _can_be_directory(path: Path) -> bool:
    """True when `path` is a directory or could be made one (its nearest existing ancestor is a directory)."""
    for p in (path, *path.parents):
        if p.exists():
            return p.is_dir()
    return True


@dataclass
class TrainerConfig:
    """The settings every training recipe shares."""

    # model fields set from training settings (model field -> setting): not accepted as model.<field>
    model_fields_owned: ClassVar[dict[str, str]] = {"aux_loss_alpha": "aux_alpha", "seq_aux": "balance"}

    # the model
    model: str = ""  # preset name or a config.json / model directory; "" = init_from's config, else "small"
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields, e.g. {"n_routed_experts": 16}
    init_from: str = ""  # start from these weights (HF-format dir)
    out_dir: str = "runs/train"
    # steps and optimizer (V3: AdamW (0.9, 0.95), wd 0.1, clip 1.0)
    max_steps: int = 200
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_frac: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = no clipping
    # MoE load balancing (DeepSeek-V3)
    balance: str = "aux_free"  # aux_free (bias updates) | aux_loss (classic batch-wise loss) | none
    bias_gamma: float = 0.001  # bias update speed
    bias_gamma_off_frac: float = 0.0  # V3 sets gamma = 0 for the final share of training
    aux_alpha: float = 1e-4  # sequence-wise balance loss (aux_free) or classic aux loss weight (aux_loss)
    # runtime
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    device: str = "auto"  # auto | cpu | cuda[:N] | mps
    seed: int = 0
    compile: bool = False
    # processes (torchrun): `parallel.dp_shard=2 parallel.ep=2 ...` or a [parallel] TOML table (docs/distributed.md)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fp8: bool = False  # DeepSeek-V3's FP8 recipe for projections and routed experts (docs/fp8.md)
    adam_moments: str = "float32"  # float32 | bfloat16 (V3 keeps AdamW's moments in BF16)
    export_fp8: bool = False  # the final model's projections in DeepSeek's FP8 format (float8 + 128x128 scales)
    # checkpointing and logging
    log_every: int = 1
    eval_every: int = 50  # 0 = only at the end
    save_every: int = 100  # 0 = only at the end
    keep_last: int = 3
    peak_tflops: float = 0.0  # declared peak for MFU; 0 = from the hardware table by device name
    tensorboard: bool = True
    # divergence: a step with non-finite loss or gradients is never applied
    nonfinite: str = "stop"  # stop: end the run after `nonfinite_patience` such steps in a row | skip: go on
    nonfinite_patience: int = 3

    def model_config(self) -> ModelConfig:
        """Resolve `model` + overrides + the balancing settings into a ModelConfig."""
        name = self.model or self.init_from or "small"
        if name in PRESETS:
            cfg = preset(name)
        elif Path(name).exists():
            cfg = ModelConfig.from_json(name)
        elif "/" in name or name.endswith(".json"):
            raise UserError(f"model directory (or config.json) {name} does not exist")
        else:
            raise UserError(f"model={name!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json "
                            "or model directory")
        owned = sorted(set(self.model_overrides) & set(self.model_fields_owned))
        if owned:
            raise UserError(f"model.{owned[0]} is set by the training setting "
                            f"`{self.model_fields_owned[owned[0]]}`: use that instead")
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.model_overrides) - model_fields)
        if unknown:
            raise UserError(f"unknown model field {unknown[0]!r} (model.{unknown[0]}=...); model fields: "
                            f"{', '.join(sorted(model_fields))}")
        try:
            cfg = cfg.replace(**self.model_overrides)
        except TypeError as e:
            raise UserError(f"bad model override: {e}") from None
        # aux_free: bias updates + V3's small sequence-wise loss; aux_loss: classic batch-wise loss only
        alpha = 0.0 if self.balance == "none" else self.aux_alpha
        return cfg.replace(aux_loss_alpha=alpha, seq_aux=self.balance != "aux_loss")

    def checks(self) -> list[tuple[bool, str, str]]:
        """(ok, setting, allowed range) for every field; subclasses add theirs."""
        return [
            (isinstance(self.model_overrides, dict), "model_overrides", "a table of ModelConfig fields"),
            (bool(self.out_dir) and _can_be_directory(Path(self.out_dir)), "out_dir",
             "a directory (this path, or a folder above it, is a file)"),
            (self.max_steps >= 1, "max_steps", ">= 1"),
            (self.grad_accum >= 1, "grad_accum", ">= 1"),
            (_finite(self.lr, 0, low_open=True), "lr", "a finite number > 0"),
            (_finite(self.min_lr_ratio, 0, 1), "min_lr_ratio", "in [0, 1]"),
            (self.warmup_steps >= 0, "warmup_steps", ">= 0"),
            (self.schedule in ("cosine", "wsd", "constant"), "schedule", "cosine, wsd or constant"),
            (_finite(self.decay_frac, 0, 1), "decay_frac", "in [0, 1]"),
            (_finite(self.weight_decay), "weight_decay", "a finite number >= 0"),
            (_finite(self.beta1, 0, 1, high_open=True), "beta1", "in [0, 1)"),
            (_finite(self.beta2, 0, 1, high_open=True), "beta2", "in [0, 1)"),
            (_finite(self.grad_clip), "grad_clip", "a finite number >= 0 (0 = no clipping)"),
            (self.balance in ("aux_free", "aux_loss", "none"), "balance", "aux_free, aux_loss or none"),
            (_finite(self.bias_gamma), "bias_gamma", "a finite number >= 0"),
            (_finite(self.bias_gamma_off_frac, 0, 1), "bias_gamma_off_frac", "in [0, 1]"),
            (_finite(self.aux_alpha), "aux_alpha", "a finite number >= 0"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype", "auto, float32 or bfloat16"),
            (self.adam_moments in ("float32", "bfloat16"), "adam_moments", "float32 or bfloat16"),
            (0 <= self.seed < 2**32, "seed", "in [0, 2**32)"),
            (self.log_every >= 1, "log_every", ">= 1"),
            (self.eval_every >= 0, "eval_every", ">= 0 (0 = only at the end)"),
            (self.save_every >= 0, "save_every", ">= 0 (0 = only at the end)"),
            (self.keep_last >= 1, "keep_last", ">= 1"),
            (_finite(self.peak_tflops), "peak_tflops", "a finite number >= 0 (0 = from the hardware table)"),
            (self.nonfinite in ("stop", "skip"), "nonfinite", "stop or skip"),
            (self.nonfinite_patience >= 1, "nonfinite_patience", ">= 1"),
        ]

    def validate(self) -> None:
        """Every setting, before any work starts: one SettingError naming the first bad one."""
        for ok, name, allowed in self.checks():
            require(ok, name, getattr(self, name), allowed)
        device = resolve_device(self.device, "device")
        if self.fp8:
            require_fp8(device)
        model = self.model_config()  # an unknown preset or a bad model override fails here, not after loading data
        if not isinstance(self.parallel, ParallelConfig):
            raise UserError("setting `parallel` must be a table of parallel.* settings")
        self.parallel.validate(model, device_type=device.type)  # before any process group exists

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def override_args(self) -> list[str]:
        """The `key=value` arguments that rebuild this config on the command line (defaults omitted)."""
        default = type(self)()
        args = []
        for k, v in self.to_dict().items():
            if k == "model_overrides":
                args += [f"model.{mk}={json.dumps(mv)}" for mk, mv in v.items()]
            elif k == "parallel":
                base = dataclasses.asdict(ParallelConfig())
                args += [f"parallel.{pk}={str(pv).lower() if isinstance(pv, bool) else pv}"
                         for pk, pv in v.items() if pv != base[pk]]
            elif v != getattr(default, k):
                v = json.dumps(v) if isinstance(v, dict) else str(v).lower() if isinstance(v, bool) else v
                args.append(f"{k}={v}" if v != "" else f'{k}=""')
        return args


@dataclass
class LanguageModelingConfig(TrainerConfig):
    """+ next-token training on token sequences, with DeepSeek-V3's MTP loss weight schedule."""

    model_fields_owned: ClassVar[dict[str, str]] = {**TrainerConfig.model_fields_owned,
                                                    "mtp_loss_weight": "mtp_lambda"}
    data: str = ""
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch
    mtp_lambda: float = 0.3
    mtp_lambda_final: float = 0.1  # V3: 0.3 for the first 10T tokens, then 0.1
    mtp_lambda_switch_frac: float = 0.7

    def mtp_weight(self, step: int) -> float:
        """The MTP loss weight at optimizer step `step`."""
        return piecewise(step, self.max_steps, self.mtp_lambda, self.mtp_lambda_final, self.mtp_lambda_switch_frac)

    def model_config(self) -> ModelConfig:
        return super().model_config().replace(mtp_loss_weight=self.mtp_lambda_final)

    def validate(self) -> None:
        super().validate()
        dp = self.parallel.data_parallel
        require(self.batch_size % dp == 0, "batch_size", self.batch_size,
                f"a multiple of the data-parallel ranks ({dp} = parallel.dp_shard x parallel.ep): batch_size "
                "is the global batch, split over them")
        longest = self.model_config().max_position_embeddings
        require(self.seq_len <= longest, "seq_len", self.seq_len,
                f"<= the model's max_position_embeddings ({longest}); longer contexts: YaRN (yarn_factor=...) "
                "or a larger model.max_position_embeddings")

    def checks(self) -> list[tuple[bool, str, str]]:
        return super().checks() + [
            (self.seq_len >= 2, "seq_len", ">= 2"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (_finite(self.mtp_lambda), "mtp_lambda", "a finite number >= 0"),
            (_finite(self.mtp_lambda_final), "mtp_lambda_final", "a finite number >= 0"),
            (_finite(self.mtp_lambda_switch_frac, 0, 1), "mtp_lambda_switch_frac", "in [0, 1]"),
        ]


@dataclass
class PretrainConfig(LanguageModelingConfig):
    """`nanoseek pretrain`: + YaRN context extension, validation batches and text samples."""

    data: str = "runs/data"  # token shards made by `nanoseek data prepare`
    out_dir: str = "runs/pretrain"
    # context extension (YaRN): factor > 1 switches RoPE to YaRN with original length `yarn_original_len`
    yarn_factor: float = 0.0
    yarn_original_len: int = 0  # 0 = the model's max_position_embeddings
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    eval_batches: int = 4  # validation batches per evaluation
    sample_every: int = 0  # 0 = only at the end
    sample_prompt: str = "The"  # "" = no samples

    def model_config(self) -> ModelConfig:
        """+ YaRN: RoPE scaled by `yarn_factor` from `yarn_original_len`."""
        cfg = super().model_config()
        if self.yarn_factor > 1:
            original = self.yarn_original_len or cfg.max_position_embeddings
            cfg = cfg.replace(
                rope_scaling={"rope_type": "yarn", "factor": self.yarn_factor,
                              "original_max_position_embeddings": original, "beta_fast": self.yarn_beta_fast,
                              "beta_slow": self.yarn_beta_slow, "mscale": 1.0, "mscale_all_dim": 1.0},
                max_position_embeddings=max(cfg.max_position_embeddings, int(original * self.yarn_factor)))
        return cfg

    def checks(self) -> list[tuple[bool, str, str]]:
        return super().checks() + [
            (bool(self.data), "data", "a directory of token shards"),
            (_finite(self.yarn_factor), "yarn_factor", "a finite number >= 0 (> 1 enables YaRN)"),
            (self.yarn_original_len >= 0, "yarn_original_len", ">= 0 (0 = max_position_embeddings)"),
            (_finite(self.yarn_beta_fast, 0, low_open=True), "yarn_beta_fast", "a finite number > 0"),
            (_finite(self.yarn_beta_slow, 0, low_open=True), "yarn_beta_slow", "a finite number > 0"),
            (self.eval_batches >= 1, "eval_batches", ">= 1"),
            (self.sample_every >= 0, "sample_every", ">= 0 (0 = only at the end)"),
        ]


# ---------------------------------------------------------------------------------------------- loading
def _kind(annotation: Any) -> Any:
    return annotation if isinstance(annotation, type) else typing.get_origin(annotation) or annotation


def coerce_setting(value: str, annotation: Any, name: str) -> Any:
    """Parse a `key=value` string into the field's declared type (bool: true/false/yes/no/on/off/1/0)."""
    kind = _kind(annotation)
    try:
        if kind is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
        if kind is dict:
            parsed = json.loads(value)
            if not isinstance(parsed, dict):
                raise ValueError(value)
            return parsed
        return value
    except (ValueError, json.JSONDecodeError):
        raise UserError(f"setting `{name}={value}`: expected {_type_name(kind)}") from None


def check_setting_type(value: Any, annotation: Any, name: str, where: str) -> Any:
    """A value read from TOML must already have the declared type (an int is accepted for a float)."""
    kind = _kind(annotation)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise UserError(f"{where}: setting `{name}` = {value!r}: expected {_type_name(kind)}")
    return value


def _type_name(kind: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a table / JSON object"}.get(kind, str(kind))


def _parse_literal(value: str) -> Any:
    """Model-field overrides have no declared type here: read them as JSON, else keep the string."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def read_toml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise UserError(f"config file {path} does not exist")
    if not p.is_file():
        raise UserError(f"config file {path} is not a file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None


def load_train_config(cls: type, toml_path: str | None, overrides: list[str]) -> Any:
    """Build the settings dataclass `cls` from an optional TOML file and `key=value` overrides
    (applied after the file), type-checked and validated."""
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    recipe = cls.__name__.removesuffix("Config")

    def unknown(key: str, where: str) -> UserError:
        return UserError(f"{where}: unknown setting {key!r} (not a {recipe} setting); known: "
                         f"{', '.join(sorted(fields))}")

    values: dict[str, Any] = {}
    parallel: dict[str, Any] = {}
    parallel_hints = typing.get_type_hints(ParallelConfig)

    def parallel_key(key: str, where: str) -> str:
        if key not in parallel_hints:
            raise UserError(f"{where}: unknown setting 'parallel.{key}'; known: "
                            f"{', '.join('parallel.' + k for k in parallel_hints)}")
        return key

    if toml_path:
        for key, value in read_toml(toml_path).items():
            if key == "parallel" and "parallel" in fields:
                if not isinstance(value, dict):
                    raise UserError(f"{toml_path}: `parallel` must be a table ([parallel])")
                for pk, pv in value.items():
                    parallel[parallel_key(pk, toml_path)] = check_setting_type(pv, parallel_hints[pk],
                                                                              f"parallel.{pk}", toml_path)
                continue
            if key not in fields:
                raise unknown(key, toml_path)
            values[key] = check_setting_type(value, hints[key], key, toml_path)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        if key.startswith("model."):
            values["model_overrides"] = {**values.get("model_overrides", {}), key[6:]: _parse_literal(value)}
        elif key.startswith("parallel.") and "parallel" in fields:
            pk = parallel_key(key[9:], "override")
            parallel[pk] = coerce_setting(value, parallel_hints[pk], key)
        elif key in fields:
            values[key] = coerce_setting(value, hints[key], key)
        else:
            raise unknown(key, "override")
    if parallel:
        values["parallel"] = ParallelConfig(**parallel)
    cfg = cls(**values)
    cfg.validate()
    return cfg
