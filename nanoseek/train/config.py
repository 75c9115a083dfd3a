"""Typed training configuration. TOML files and `key=value` overrides map onto the dataclass fields;
model fields are set in a `[model_overrides]` TOML table or with `model.<field>=value` on the command line
(e.g. `model.n_routed_experts=16`)."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.config import PRESETS, ModelConfig, preset
from nanoseek.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass
class TrainConfig:
    # what to train
    model: str = ""  # preset name or a config.json / model directory; "" = init_from's config, else "small"
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields, e.g. {"n_routed_experts": 16}
    init_from: str = ""  # start from these weights (HF-format dir), e.g. for context extension or SFT
    data: str = "runs/data"  # token shards made by `nanoseek data prepare`
    out_dir: str = "runs/pretrain"
    # batch
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1
    max_steps: int = 200
    # optimiser (V3: AdamW (0.9, 0.95), wd 0.1, clip 1.0)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_frac: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # DeepSeek-V3 specifics
    balance: str = "aux_free"  # aux_free (bias updates) | aux_loss (classic batch-wise loss) | none
    bias_gamma: float = 0.001  # bias update speed
    bias_gamma_off_frac: float = 0.0  # V3 sets gamma = 0 for the final share of training
    aux_alpha: float = 1e-4  # sequence-wise balance loss (aux_free) or classic aux loss weight (aux_loss)
    mtp_lambda: float = 0.3
    mtp_lambda_final: float = 0.1  # V3: 0.3 for the first 10T tokens, then 0.1
    mtp_lambda_switch_frac: float = 0.7
    # context extension (YaRN): factor > 1 switches RoPE to YaRN with original length `yarn_original_len`
    yarn_factor: float = 0.0
    yarn_original_len: int = 0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    # runtime
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    device: str = "auto"
    seed: int = 0
    compile: bool = False
    # bookkeeping
    log_every: int = 1
    eval_every: int = 50
    eval_batches: int = 4
    sample_every: int = 0  # 0 = only at the end
    sample_prompt: str = "The"
    save_every: int = 100
    keep_last: int = 3
    peak_tflops: float = 0.0  # declared peak for MFU; 0 = pick from the device
    tensorboard: bool = True

    def model_config(self) -> ModelConfig:
        """Resolve `model` + overrides + YaRN settings into a ModelConfig."""
        name = self.model or self.init_from or "small"
        cfg = preset(name) if name in PRESETS else ModelConfig.from_json(name)
        try:
            cfg = cfg.replace(**self.model_overrides)
        except TypeError as e:
            raise UserError(f"bad model override: {e}") from None
        if self.yarn_factor > 1:
            original = self.yarn_original_len or cfg.max_position_embeddings
            cfg = cfg.replace(
                rope_scaling={"rope_type": "yarn", "factor": self.yarn_factor,
                              "original_max_position_embeddings": original, "beta_fast": self.yarn_beta_fast,
                              "beta_slow": self.yarn_beta_slow, "mscale": 1.0, "mscale_all_dim": 1.0},
                max_position_embeddings=max(cfg.max_position_embeddings, int(original * self.yarn_factor)))
        # aux_free: bias updates + V3's small sequence-wise loss; aux_loss: classic batch-wise loss only
        alpha = 0.0 if self.balance == "none" else self.aux_alpha
        return cfg.replace(aux_loss_alpha=alpha, seq_aux=self.balance != "aux_loss")

    def validate(self) -> None:
        checks = [
            (self.schedule in ("cosine", "wsd", "constant"), "schedule", "cosine, wsd or constant"),
            (self.balance in ("aux_free", "aux_loss", "none"), "balance", "aux_free, aux_loss or none"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype", "auto, float32 or bfloat16"),
            (self.seq_len > 1, "seq_len", "> 1"),
            (self.batch_size > 0 and self.grad_accum > 0, "batch_size", "batch_size and grad_accum > 0"),
            (self.max_steps > 0, "max_steps", "> 0"),
            (self.lr > 0, "lr", "> 0"),
            (0 <= self.warmup_steps, "warmup_steps", ">= 0"),
            (self.keep_last >= 1, "keep_last", ">= 1"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise UserError(f"invalid training setting `{name}` = {getattr(self, name)!r}: must be {want}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def override_args(self) -> list[str]:
        """The `key=value` arguments that rebuild this config on the command line (defaults omitted)."""
        default = type(self)()
        args = []
        for k, v in self.to_dict().items():
            if k == "model_overrides":
                args += [f"model.{mk}={json.dumps(mv)}" for mk, mv in v.items()]
            elif v != getattr(default, k):
                v = str(v).lower() if isinstance(v, bool) else v
                args.append(f"{k}={v}" if v != "" else f'{k}=""')
        return args


def _coerce(value: str, annotation: Any, name: str) -> Any:
    """Parse an override string into the field's declared type."""
    kind = annotation if isinstance(annotation, type) else typing.get_origin(annotation) or annotation
    try:
        if kind is bool or annotation == "bool":
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int or annotation == "int":
            return int(value)
        if kind is float or annotation == "float":
            return float(value)
        if kind is dict or annotation == "dict":
            return json.loads(value)
        return value
    except (ValueError, json.JSONDecodeError):
        raise UserError(f"override `{name}={value}`: expected {annotation}") from None


def _parse_literal(value: str) -> Any:
    """Model-field overrides have no declared type here: read them as JSON, else keep the string."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def load_train_config(cls: type, toml_path: str | None, overrides: list[str]) -> Any:
    """Build a config dataclass `cls` from an optional TOML file and `key=value` overrides."""
    values: dict[str, Any] = {}
    if toml_path:
        try:
            values = tomllib.loads(Path(toml_path).read_text())
        except FileNotFoundError:
            raise UserError(f"config file {toml_path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{toml_path}: invalid TOML: {e}") from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        if key.startswith("model."):
            values.setdefault("model_overrides", {})[key[6:]] = _parse_literal(value)
        elif key in fields:
            values[key] = _coerce(value, hints[key], key)
        else:
            raise UserError(f"unknown setting {key!r}; known: {', '.join(sorted(fields))}")
    unknown = set(values) - set(fields)
    if unknown:
        raise UserError(f"unknown setting(s) in {toml_path}: {', '.join(sorted(unknown))}")
    cfg = cls(**values)
    cfg.validate()
    return cfg
