"""The training system: one core (`Trainer`) shared by pretraining, SFT and GRPO."""
