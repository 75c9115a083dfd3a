#!/usr/bin/env bash
# The CUDA checks run on a lent GPU machine (see README, Measured): training throughput vs transformers in
# float32 and bf16 autocast, one bf16 training step with MTP + balance loss, and the model/trainer tests.
set -x
nvidia-smi --query-gpu=name --format=csv,noheader
python -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())"
export PYTHONPATH=$PWD
python benchmarks/train_throughput.py --device cuda --steps 10 --warmup 3 2>&1 | grep -v Loading | tail -4
python benchmarks/train_throughput.py --device cuda --dtype bfloat16 --steps 10 --warmup 3 2>&1 | grep -v Loading | tail -4
python - <<'PY'
import torch, tempfile, os
from nanoseek.config import preset
from nanoseek.model import DeepseekV3ForCausalLM
m = DeepseekV3ForCausalLM(preset("bench", num_nextn_predict_layers=1)).cuda().train()
x = torch.randint(0, 4096, (4, 128), device="cuda")
with torch.autocast("cuda", dtype=torch.bfloat16):
    out = m(x, labels=x)
out.loss.backward()
print("cuda bf16 train step ok", out.loss.item(), out.mtp_loss.item(), out.balance_loss.item())
PY
python -m pytest -q -x tests/test_model.py tests/test_train.py -p no:cacheprovider 2>&1 | tail -2
