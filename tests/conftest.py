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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run many tiny ops: one thread is about as fast as two, and on a busy 2-core machine
    two OpenMP threads can stall for a scheduler slice per op. Used by the decode and RL tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
