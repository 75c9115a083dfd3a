import os

import pytest
import torch

# Deterministic and quiet on the 2-core CI machine.
torch.manual_seed(0)
torch.use_deterministic_algorithms(True, warn_only=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
