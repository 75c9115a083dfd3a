"""Cost and efficiency accounting: parameters, FLOPs, KV cache, memory, GPU-hours, dollars and MFU.

Works on nanoseek `ModelConfig` objects, raw Hugging Face `config.json` dicts of the DeepseekV3 /
DeepseekV2 (MLA + MoE) and Llama / Qwen2 / Mistral (GQA, dense) families, DeepSeek's own inference
configs (`dim`, `n_layers`, ...), preset names (`nanoseek.config.PRESETS`) and the bundled
configurations in `nanoseek/configs/`.

One job per module: `models` (reading configurations), `arch` (a model's blocks as cost sees them),
`accounting` (the formulas below), `hardware` (the GPU table: peaks, prices, device-name lookup),
`measured` (FLOPs counted by torch on a real model), `published` (the papers' figures), `summary`
(every metric of one model), `tables` (rendering), `cli` (`nanoseek cost`).

Conventions (every number this module prints follows them):
- **Parameters.** `params_total` counts every weight of the main model once (embedding table, output
  head unless tied, norms, biases, all experts). `params_active` counts the weights one token uses:
  everything except the routed experts it was not sent to and except the input embedding table (a
  lookup reads one row of it); the output head is included. This is the convention that reproduces
  DeepSeek's published "37B active" (V3), "21B" (V2) and "2.4B" (V2-Lite). `*_with_embed` adds the
  embedding table back; `*_no_embed` removes both the embedding table and the output head.
  MTP modules (`num_nextn_predict_layers`) are *not* in these totals; they are reported separately as
  `params_mtp_total` / `params_mtp_active` (their own weights only: the embedding and output head are
  shared with the main model; DeepSeek's checkpoint stores copies of both, which is how its "14B of MTP
  weights" arises). The MoE bias `e_score_correction_bias` is a buffer and is not counted.
- **FLOPs.** 2 FLOPs per multiply-accumulate. Forward FLOPs per token = 2 x (weights in matmuls that
  token goes through: attention projections, dense FFN or shared + top-k routed experts, the router
  gate, the output head) + the attention core. The embedding lookup, norms, activations, softmax,
  biases and RoPE are free. The attention core (scores q.k and the value product p.v) is
  `2 * heads * (qk_head_dim + v_head_dim) * ctx` per token per layer, with `ctx = seq_len / 2` for
  causal attention (it counts half of the T x T matrices) and `ctx = seq_len` with `causal=False`.
  MLA is counted on its training ("naive") path: keys/values are expanded per head by `kv_b_proj`.
  Training = 3 x forward (the backward pass costs two forwards: gradients w.r.t. inputs and weights).
  MTP is excluded unless `include_mtp=True` (the published per-token figures exclude it); each MTP
  module adds its eh_proj, one transformer block and one more pass through the shared output head,
  counted per token at the same seq_len (module k really sees T - k positions: a k/T overcount).
- **KV cache.** Per token, main-model layers only: MLA caches the latent and the shared RoPE key,
  `(kv_lora_rank + qk_rope_head_dim) * layers * bytes`; GQA caches `2 * kv_heads * head_dim * layers
  * bytes`.
- **Memory.** Weights at `weight_dtype` (bf16: 2 bytes); training state adds fp32 master weights (4),
  two AdamW moments (4 each) and gradients (2), all per parameter and configurable. MTP weights are
  included (they are trained and held). GB/TB are decimal (1e9 / 1e12 bytes).
- **Time and money.** `gpu_hours = tokens * train_flops_per_token / (peak_flops * mfu) / 3600`,
  dollars = gpu_hours x $/GPU-hour. `mfu = tokens_per_s * flops_per_token / (peak_flops * n_gpus)`.
  Peaks come from `configs/hardware.json` (dense tensor-core TFLOPS); `comm_sms` removes SMs reserved
  for communication (DeepSeek-V3 used 20 of the H800's 132), scaling the peak by (sms - comm_sms)/sms.

For the trainer: per-token training FLOPs of a `ModelConfig` at sequence length T, counting the MTP
modules the model actually runs, and the MFU of a measured throughput::

    from nanoseek import cost
    fpt = cost.train_flops_per_token(cfg, seq_len=T, include_mtp=cfg.num_nextn_predict_layers > 0)
    peak = cost.peak_flops("H100", "bf16")              # or cost.peak_flops_for_device(cuda_name)
    print(f"MFU {cost.mfu(tokens_per_s, fpt, peak):.1%}")  # tokens_per_s per GPU (or pass n_gpus=)

`measured_forward_flops(model, input_ids)` counts what torch's FlopCounterMode sees on a real model;
the tests check the formula against it.
"""

from nanoseek.cost.accounting import (
    DTYPE_BYTES, attention_flops_per_token, dollars, dtype_bytes, forward_flops_per_token, gpu_hours,
    kv_cache_bytes_per_token, memory_bytes, mfu, mfu_from_gpu_hours, params, train_flops_per_token,
)
from nanoseek.cost.arch import Arch, Part, arch
from nanoseek.cost.hardware import (
    gpu_for_device, gpu_spec, load_hardware, peak_flops, peak_flops_for_device, usd_per_gpu_hour,
)
from nanoseek.cost.measured import measured_forward_flops
from nanoseek.cost.models import bundled_names, load_config
from nanoseek.cost.published import PUBLISHED, PUBLISHED_NOTES
from nanoseek.cost.summary import published_notes, summarize

__all__ = [
    "DTYPE_BYTES", "PUBLISHED", "PUBLISHED_NOTES", "Arch", "Part", "arch", "attention_flops_per_token",
    "bundled_names", "dollars", "dtype_bytes", "forward_flops_per_token", "gpu_for_device", "gpu_hours",
    "gpu_spec", "kv_cache_bytes_per_token", "load_config", "load_hardware", "measured_forward_flops",
    "memory_bytes", "mfu", "mfu_from_gpu_hours", "params", "peak_flops", "peak_flops_for_device",
    "published_notes", "summarize", "train_flops_per_token", "usd_per_gpu_hour",
]
