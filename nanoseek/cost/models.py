"""Model configurations for cost accounting: the bundled `config.json` files, presets, paths.

Accepted everywhere a model is named (`nanoseek cost MODEL`, the functions of `nanoseek.cost`): a
bundled name (files in nanoseek/configs/), a preset name (`nanoseek.config.PRESETS`), a path to a
config.json or a directory holding one, a nanoseek `ModelConfig`, or a config dict. Dicts may use
Hugging Face's names (DeepseekV3 / DeepseekV2, Llama / Qwen2 / Mistral) or DeepSeek's own inference
format (`dim`, `n_layers`, ...: see `nanoseek.config.from_deepseek_inference`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nanoseek.config import PRESETS, is_deepseek_inference_config, from_deepseek_inference, preset
from nanoseek.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
HARDWARE_FILE = CONFIG_DIR / "hardware.json"


def bundled_names() -> list[str]:
    """Names of the bundled model configurations (files in nanoseek/configs/, minus hardware.json)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json") if p != HARDWARE_FILE)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding one object; one UserError for anything else (bad JSON, bad UTF-8, a list)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); expected a "
                        "config.json") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object (a config.json)")
    return data


def load_config(spec: str) -> tuple[str, dict[str, Any]]:
    """(display name, HF-style config dict) for a bundled name, a preset name, or a path to a
    config.json (or a directory holding one, e.g. a nanoseek run or checkpoint directory)."""
    if spec in bundled_names():
        return spec, read_json_object(CONFIG_DIR / f"{spec}.json")
    if spec in PRESETS:
        return spec, preset(spec).to_dict()
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise UserError(f"{spec} is a directory without a config.json")
    if path.is_file():
        return str(spec), hf_dict(read_json_object(path))
    if path.exists():
        raise UserError(f"{path} exists but is not a regular file (expected a config.json)")
    raise UserError(f"unknown model {spec!r}: not a bundled model ({', '.join(bundled_names())}), "
                    f"not a preset ({', '.join(PRESETS)}), and no config.json at {path}")


def hf_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """A config dict in Hugging Face's field names (DeepSeek's inference format is translated)."""
    return from_deepseek_inference(raw) if is_deepseek_inference_config(raw) else raw


def as_dict(cfg: Any) -> dict[str, Any]:
    """Accept a nanoseek ModelConfig, a raw config dict, or a name/path understood by `load_config`."""
    if isinstance(cfg, dict):
        return hf_dict(cfg)
    if isinstance(cfg, (str, Path)):
        return load_config(str(cfg))[1]
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    raise TypeError(f"expected a ModelConfig, a config dict or a model name, got {type(cfg).__name__}")
