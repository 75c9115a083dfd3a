"""Published figures for the bundled models and, where our calculator differs from one by more than
3%, why. Compared, never used in a calculation.

Sources: the DeepSeek-V3 technical report (671B total / 37B active parameters; 2.664M H800 GPU-hours
for 14.8T pre-training tokens at $2 per GPU-hour), the DeepSeek-V2 paper (236B / 21B; V2-Lite
15.7B / 2.4B), the Llama 3 and Qwen2.5 reports (405B, 72.7B), and, for per-token training FLOPs and
KV-cache bytes, the ISCA 2025 paper "Insights into DeepSeek-V3: Scaling Challenges and Reflections
on Hardware for AI Architectures"."""

from __future__ import annotations

PUBLISHED: dict[str, dict[str, float]] = {
    "deepseek-v3": {"params_total": 671e9, "params_active": 37e9, "kv_cache_bytes_per_token": 70272,
                    "train_flops_per_token": 250e9},
    "deepseek-v2": {"params_total": 236e9, "params_active": 21e9, "train_flops_per_token": 155e9},
    "deepseek-v2-lite": {"params_total": 15.7e9, "params_active": 2.4e9},
    "qwen2.5-72b": {"params_total": 72.7e9, "kv_cache_bytes_per_token": 327680,
                    "train_flops_per_token": 394e9},
    "llama-3.1-405b": {"params_total": 405e9, "kv_cache_bytes_per_token": 516096,
                       "train_flops_per_token": 2448e9},
}
PUBLISHED_NOTES: dict[tuple[str, str], str] = {
    ("qwen2.5-72b", "train_flops_per_token"): (
        "The ISCA 2025 figure (394 GFLOPs/token for 'Qwen-72B') cannot come from Qwen2.5-72B's released "
        "config under any standard convention: even the smallest, 6 x non-embedding parameters with no "
        "attention and no output head, gives 6 x 70.2B = 421 GFLOPs (+7%); 6 x all 72.7B parameters "
        "gives 436 (+11%); ours (the convention that reproduces V2, V3 and Llama-3.1-405B within 1%) "
        "gives 445 (+13%). 394 corresponds to ~65.7B parameter-equivalents, so the published number used "
        "different architecture inputs, which the source does not state (an FFN width of 24,576 instead "
        "of 29,568 would give 386 under our convention, but that is a guess). Not adjusted."),
    ("deepseek-v3", "params_active"): (
        "'37B' is rounded to whole billions: 36.63B without the input embedding table (our "
        "params_active, -1.0%), 37.55B with it (+1.5%)."),
}

