"""The training system: one core (`Trainer`) shared by pretraining, SFT and GRPO.

- `config`         settings: TrainerConfig (shared) -> LanguageModelingConfig -> PretrainConfig; TOML and
                   `key=value` loading, type-checked and validated before any work
- `core`           Trainer: optimizer step, V3 balancing, divergence handling, the loop, resume, export;
                   print_summary (the end-of-run lines of every training command)
- `checkpoint`     atomic, checksummed step_N directories, keep-last-N, finding the newest valid one
- `trainer_state`  optimizer / RNG / data position as JSON + safetensors (never a pickle)
- `metrics_log`    metrics.jsonl (+ TensorBoard), cut back to the checkpoint's step on resume
- `mfu`            the peak FLOP/s MFU is measured against (hardware table by device name)
- `schedule`       LR and loss-weight schedules as pure functions of the step
- `pretrain`       `nanoseek pretrain`: token-shard pretraining and YaRN context extension
"""
