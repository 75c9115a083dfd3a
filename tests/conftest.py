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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random `tiny` model saved with a small trained tokenizer (the inference CLI and server tests;
    test files that need another model define their own `model_dir`)."""
    import nanoseek
    from nanoseek.config import preset
    from nanoseek.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    corpus = root / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. 12 + 7 = 19. Think, then answer.\n" * 40)
    torch.manual_seed(0)
    nanoseek.DeepseekV3ForCausalLM(preset("tiny")).save_pretrained(root / "model")
    train_tokenizer([corpus], 300, root / "model", progress=False)
    return root / "model"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Token shards of the built-in synthetic corpus (400 documents) with a 300-token BPE tokenizer, for the
    pretraining tests; read-only (a test that alters it copies it first)."""
    from nanoseek.data import prepare, synthetic_corpus, write_corpus
    from nanoseek.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("pretrain-data")
    corpus = root / "corpus.jsonl"
    write_corpus(synthetic_corpus(400, seed=0), corpus)
    tok = train_tokenizer([corpus], 300, root / "tok", progress=False)
    prepare([corpus], tok, root / "data", val_fraction=0.05, progress=False)
    return root / "data"
