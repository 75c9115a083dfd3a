"""Model configuration.

Field names are Hugging Face's `DeepseekV3Config` names, so a `config.json` written here loads in
`transformers` and DeepSeek's released `config.json` files load here. Fields that only nanoseek uses
(`aux_loss_alpha`, `mtp_loss_weight`) keep the names DeepSeek's own configs use where one exists.

DeepSeek's inference code uses a second format (`inference/configs/config_671B.json` in the
DeepSeek-V3 repository: `dim`, `n_layers`, `n_routed_experts`, ...); `ModelConfig.from_dict` and
`from_json` accept it too, translated by `from_deepseek_inference`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.errors import UserError
from nanoseek.files import write_json


class ConfigError(UserError, ValueError):
    """A configuration value is invalid. The message names the field."""


ROPE_TYPES = ("default", "yarn")


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # MLA: informational, always equal to num_attention_heads
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3), "group_limited_greedy" / "greedy" (V2)
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006  # V3's init std (DeepSeek-V3 technical report, §4.2)
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    # nanoseek training knobs stored with the model (DeepSeek-V2 config names where they exist)
    aux_loss_alpha: float = 1e-4  # sequence-wise balance loss weight; 0 disables it
    seq_aux: bool = True  # balance loss per sequence (V3); False = classic batch-wise auxiliary loss
    mtp_loss_weight: float = 0.3  # lambda in L_MTP = lambda / D * sum_k CE_k
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
        self.validate()

    # ---------------------------------------------------------------- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        """Attention scale (d_n + d_r)^-0.5, times mscale^2 under YaRN (docs/design.md, math conventions;
        YaRN: Peng et al. 2023, §3.4)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0) or 0
            factor = self.rope_scaling.get("factor") or 1.0
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale = scale * m * m
        return scale

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ConfigError(f"invalid config field `{name}` = {getattr(self, name)!r}: {why}")

        self._check_types(fail)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                fail(name, "must be a positive integer")
        if self.qk_nope_head_dim < 0:
            fail("qk_nope_head_dim", "must be >= 0")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            fail("q_lora_rank", "must be a positive integer or null (no query compression)")
        if self.num_key_value_heads != self.num_attention_heads:
            fail("num_key_value_heads", "MLA uses one latent for all heads; set it to num_attention_heads")
        if self.hidden_act != "silu":
            fail("hidden_act", "only 'silu' is supported")
        if self.scoring_func not in ("sigmoid", "softmax"):
            fail("scoring_func", "must be 'sigmoid' or 'softmax'")
        if self.topk_method not in ("noaux_tc", "group_limited_greedy", "greedy"):
            fail("topk_method", "must be 'noaux_tc', 'group_limited_greedy' or 'greedy'")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            fail("first_k_dense_replace", f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.moe_layer_freq < 1:
            fail("moe_layer_freq", "must be >= 1")
        if self.n_routed_experts < 0:
            fail("n_routed_experts", "must be >= 0")
        if self.n_routed_experts > 0:
            if self.n_group < 1:
                fail("n_group", "must be >= 1")
            if self.n_routed_experts % self.n_group:
                fail("n_group", f"n_routed_experts={self.n_routed_experts} is not divisible by n_group")
            if not 1 <= self.topk_group <= self.n_group:
                fail("topk_group", f"must be in [1, n_group={self.n_group}]")
            kept = self.topk_group * (self.n_routed_experts // self.n_group)
            if not 1 <= self.num_experts_per_tok <= kept:
                fail("num_experts_per_tok", f"must be in [1, {kept}] (experts in the {self.topk_group} kept groups)")
            if self.n_group > 1 and self.scoring_func == "sigmoid" and self.n_routed_experts // self.n_group < 2:
                fail("n_group", "sigmoid routing scores a group by its top-2 experts: need >= 2 experts per group")
            if self.moe_intermediate_size <= 0:
                fail("moe_intermediate_size", "must be a positive integer")
            if self.n_shared_experts < 0:
                fail("n_shared_experts", "must be >= 0")
        if self.intermediate_size <= 0:
            fail("intermediate_size", "must be a positive integer")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"invalid config field `rope_scaling` = {self.rope_scaling!r}: "
                              f"unknown rope type {self.rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
        if self.rope_type == "yarn":
            for key in ("factor", "original_max_position_embeddings"):
                if not self.rope_scaling.get(key):
                    raise ConfigError(f"invalid config field `rope_scaling`: yarn needs `{key}`")
            if self.rope_scaling["factor"] < 1:
                raise ConfigError("invalid config field `rope_scaling`: yarn `factor` must be >= 1")
        if self.num_nextn_predict_layers < 0:
            fail("num_nextn_predict_layers", "must be >= 0")
        if self.aux_loss_alpha < 0:
            fail("aux_loss_alpha", "must be >= 0")
        if self.mtp_loss_weight < 0:
            fail("mtp_loss_weight", "must be >= 0")
        if self.routed_scaling_factor <= 0:
            fail("routed_scaling_factor", "must be > 0")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be > 0")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be > 0")
        if self.initializer_range < 0:
            fail("initializer_range", "must be >= 0")

    def _check_types(self, fail) -> None:
        """Each field holds its declared type (an int where an int is declared, a finite number where
        a float is, ...), so a config.json with `"n_group": "8"` fails here, naming the field, rather
        than as a TypeError deep inside the model."""
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), str(f.type).replace(" ", "").split("|")
            if value is None and "None" in kinds:
                continue
            if "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
                continue
            if "float" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isfinite(value):
                    continue
                fail(f.name, "must be a finite number")
            if ("bool" in kinds and isinstance(value, bool) or "str" in kinds and isinstance(value, str)
                    or "dict" in kinds and isinstance(value, dict)):
                continue
            wanted = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                      "dict": "an object", "None": "null"}
            fail(f.name, "must be " + " or ".join(wanted[k] for k in kinds if k in wanted))

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = "deepseek_v3"
        d["architectures"] = ["DeepseekV3ForCausalLM"]
        # transformers 5 reads `rope_parameters`; older readers and DeepSeek's code read `rope_scaling`.
        d["rope_parameters"] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                                **{k: v for k, v in (self.rope_scaling or {}).items() if k not in ("type", "rope_type")}}
        d["num_mtp_layers"] = self.num_nextn_predict_layers
        d["head_dim"] = self.qk_rope_head_dim  # what transformers derives; written so both agree
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """From a config dict in Hugging Face's names (what `to_dict` writes, DeepSeek's released
        config.json) or in DeepSeek's inference format. Unknown keys are ignored (HF configs carry many
        that do not concern the architecture)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(raw).__name__}")
        d = from_deepseek_inference(raw) if is_deepseek_inference_config(raw) else dict(raw)
        rope_parameters = d.pop("rope_parameters", None)
        if rope_parameters and not d.get("rope_scaling"):
            rope_parameters = dict(rope_parameters)
            if "rope_theta" in rope_parameters:
                d.setdefault("rope_theta", rope_parameters.pop("rope_theta"))
            rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
            d["rope_scaling"] = None if rope_type == "default" else rope_parameters
        if d.get("rope_scaling") and "type" in d["rope_scaling"] and "rope_type" not in d["rope_scaling"]:
            d["rope_scaling"] = {**d["rope_scaling"], "rope_type": d["rope_scaling"]["type"]}
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        if isinstance(d.get("torch_dtype", d.get("dtype")), str):
            d["torch_dtype"] = d.get("torch_dtype") or d.get("dtype")
        names = {f.name for f in dataclasses.fields(cls)}
        # DeepSeek-V2 configs have n_group/topk_group null for ungrouped routing.
        for key in ("n_group", "topk_group"):
            if key in d and d[key] is None:
                d[key] = 1
        if d.get("n_routed_experts") is None and "n_routed_experts" in d:
            d["n_routed_experts"] = 0
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if path.exists() and not path.is_file():
            raise ConfigError(f"{path} exists but is not a regular file (expected a config.json)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(raw)

    def save(self, path: str | Path) -> None:
        """Write config.json (into `path` if it is a directory name), atomically."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, dict(sorted(self.to_dict().items())))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------- presets
def _tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=512, num_nextn_predict_layers=1,
        initializer_range=0.02,
    )


def _small() -> ModelConfig:
    return ModelConfig(
        vocab_size=2048, hidden_size=192, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=2, routed_scaling_factor=2.5,
        first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=1024, num_nextn_predict_layers=1,
        initializer_range=0.02,
    )


def _bench() -> ModelConfig:
    return ModelConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, n_shared_experts=1, n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=1024, num_nextn_predict_layers=0,
        initializer_range=0.02,
    )


def _v2_lite() -> ModelConfig:
    # DeepSeek-V2-Lite (15.7B total / 2.4B active): softmax gate, no query compression.
    return ModelConfig(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64,
        num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        scoring_func="softmax", topk_method="greedy", first_k_dense_replace=1, kv_lora_rank=512,
        q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        max_position_embeddings=163840, rope_interleave=True, num_nextn_predict_layers=0,
        bos_token_id=100000, eos_token_id=100001, aux_loss_alpha=0.001,
        rope_scaling={"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    )


def _v3_671b() -> ModelConfig:
    return ModelConfig(
        max_position_embeddings=163840, bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=1,
        rope_scaling={"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    )


PRESETS = {"tiny": _tiny, "small": _small, "bench": _bench, "v2-lite": _v2_lite, "v3-671b": _v3_671b}


# ---------------------------------------------------------------------- DeepSeek's inference format
#: DeepSeek inference name -> our (Hugging Face) name, for the fields that map one to one.
DEEPSEEK_INFERENCE_NAMES = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size", "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace", "n_heads": "num_attention_heads",
    "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok", "n_expert_groups": "n_group",
    "n_limited_groups": "topk_group", "route_scale": "routed_scaling_factor",
    "score_func": "scoring_func", "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim", "rope_theta": "rope_theta",
}
#: The defaults of DeepSeek's `ModelArgs` (a DeepSeek-V2-Lite-sized model), for keys a file leaves out.
DEEPSEEK_INFERENCE_DEFAULTS: dict[str, Any] = {
    "max_batch_size": 8, "max_seq_len": 4096 * 4, "dtype": "bf16", "vocab_size": 102400, "dim": 2048,
    "inter_dim": 10944, "moe_inter_dim": 1408, "n_layers": 27, "n_dense_layers": 1, "n_heads": 16,
    "n_routed_experts": 64, "n_shared_experts": 2, "n_activated_experts": 6, "n_expert_groups": 1,
    "n_limited_groups": 1, "score_func": "softmax", "route_scale": 1.0, "q_lora_rank": 0,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "original_seq_len": 4096, "rope_theta": 10000.0, "rope_factor": 40, "beta_fast": 32, "beta_slow": 1,
    "mscale": 1.0,
}
#: Runtime settings that do not change the architecture (batch size, fp8 scale format).
DEEPSEEK_INFERENCE_RUNTIME = ("max_batch_size", "scale_fmt")


def is_deepseek_inference_config(raw: dict[str, Any]) -> bool:
    """DeepSeek's inference format names the width `dim` and the depth `n_layers`."""
    return "dim" in raw and "n_layers" in raw and "hidden_size" not in raw


def from_deepseek_inference(raw: dict[str, Any]) -> dict[str, Any]:
    """Translate a config in DeepSeek's inference format (the DeepSeek-V3 repository's
    `inference/model.py` ModelArgs, e.g. `inference/configs/config_671B.json`) into our names.

    Beyond renaming: `q_lora_rank` 0 means no query compression (None here); `rope_factor` > 1 means
    YaRN with `original_seq_len`, `beta_fast`, `beta_slow` and `mscale` (which DeepSeek's code applies
    to the softmax scale, as `mscale_all_dim` does in Hugging Face's); the routing method follows the
    score function as in DeepSeek's Gate (sigmoid: V3's bias-adjusted "noaux_tc" with renormalised
    weights; softmax: V2's greedy, group-limited when there are groups). That code has no MTP module,
    so `num_nextn_predict_layers` is 0. Keys a file leaves out take `ModelArgs`' defaults; unknown
    keys are refused, naming them."""
    known = {*DEEPSEEK_INFERENCE_DEFAULTS, *DEEPSEEK_INFERENCE_RUNTIME}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)} in a DeepSeek inference config "
                          f"(known: {', '.join(sorted(known))})")
    a = {**DEEPSEEK_INFERENCE_DEFAULTS, **raw}
    for key in ("max_seq_len", "original_seq_len", "rope_factor", "n_expert_groups", "q_lora_rank"):
        if not isinstance(a[key], (int, float)) or isinstance(a[key], bool) or not math.isfinite(a[key]):
            raise ConfigError(f"invalid config field `{key}` = {a[key]!r}: must be a number")
    d: dict[str, Any] = {ours: a[theirs] for theirs, ours in DEEPSEEK_INFERENCE_NAMES.items()}
    d["model_type"] = "deepseek_v3"
    d["q_lora_rank"] = a["q_lora_rank"] or None
    d["num_nextn_predict_layers"] = 0
    d["norm_topk_prob"] = a["score_func"] == "sigmoid"
    d["topk_method"] = ("noaux_tc" if a["score_func"] == "sigmoid"
                        else "group_limited_greedy" if a["n_expert_groups"] > 1 else "greedy")
    factor, original = a["rope_factor"], a["original_seq_len"]
    d["max_position_embeddings"] = a["max_seq_len"]
    if factor > 1 and a["max_seq_len"] > original:  # DeepSeek's code applies YaRN only then
        # as long as YaRN stretches the original context (Hugging Face's value for V3: 163840)
        d["max_position_embeddings"] = max(a["max_seq_len"], int(original * factor))
        d["rope_scaling"] = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                             "beta_fast": a["beta_fast"], "beta_slow": a["beta_slow"],
                             "mscale": a["mscale"], "mscale_all_dim": a["mscale"]}
    else:
        d["rope_scaling"] = None
    # fp8 checkpoints run their matmuls on bf16 activations; bf16 is what this model can use
    d["torch_dtype"] = "bfloat16" if a["dtype"] in ("bf16", "fp8") else "float32"
    return d


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named configuration, optionally with fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
