"""Bad input to the R1 commands (eval, sample, sft, grpo, distill): exit status 2, exactly one
`nanoseek <cmd>: error: ...` line naming the problem, no traceback, and nothing written."""

import pytest
import torch

from nanoseek.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    """A real model directory (config.json + weights) without a tokenizer."""
    from nanoseek.config import preset
    from nanoseek.hf import save_pretrained
    from nanoseek.model import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bare") / "model"
    save_pretrained(DeepseekV3ForCausalLM(preset("tiny", vocab_size=320)), path)
    return path


@pytest.fixture(scope="module")
def full_model(tmp_path_factory, bare_model):
    """The same model directory with a tokenizer."""
    import shutil

    from nanoseek.data import synthetic_corpus, write_corpus
    from nanoseek.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("full")
    corpus = write_corpus(synthetic_corpus(50, seed=0), root / "c.jsonl")
    shutil.copytree(bare_model, root / "model")
    train_tokenizer([corpus], 300, root / "model", progress=False)
    return root / "model"


@pytest.fixture
def paths(tmp_path, bare_model, full_model):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "a_file").write_text("not a model\n")
    return {"MODEL": str(bare_model), "FULL": str(full_model), "DIR.jsonl": str(tmp_path / "dir.jsonl"),
            "DIR": str(tmp_path / "a_dir"), "FILE": str(tmp_path / "a_file"),
            "MISSING": str(tmp_path / "missing.jsonl")}


EVAL = ["eval", "--model", "MODEL", "--task", "arithmetic"]
SAMPLE = ["sample", "--model", "MODEL", "--task", "arithmetic", "--out", "MISSING"]
GRPO = ["grpo", "--model", "MODEL", "--task", "arithmetic"]

CASES = [
    # (argv, fragments the error line must contain, fragments it must not contain)
    (EVAL + ["-k", "-1"], ["`-k` = -1", ">= 0"], []),
    (EVAL + ["--batch-size", "0"], ["`--batch-size` = 0", ">= 1"], []),
    (EVAL + ["--temperature", "-1"], ["`--temperature` = -1.0", ">= 0"], []),
    (EVAL + ["--temperature", "nan"], ["`--temperature` = nan", "finite"], []),
    (EVAL + ["--top-p", "0"], ["`--top-p`", "(0, 1]"], []),
    (EVAL + ["--verifier-timeout", "nan"], ["`--verifier-timeout` = nan"], []),
    (EVAL + ["--n-test", "-1"], ["`--n-test` = -1"], []),
    (["eval", "--model", "FULL", "--task", "DIR.jsonl"], ["DIR.jsonl", "not a regular file"], []),
    (EVAL + ["--samples-out", "DIR"], ["--samples-out", "is a directory"], []),
    (["eval", "--model", "FILE", "--task", "arithmetic"], ["is a file, not a model directory"],
     ["does not exist"]),
    (SAMPLE + ["-k", "0"], ["`-k` = 0", ">= 1"], []),
    (SAMPLE + ["--batch-size", "0"], ["`--batch-size` = 0"], []),
    (SAMPLE + ["--temperature", "nan"], ["`--temperature` = nan"], []),
    (["sample", "--model", "MODEL", "--task", "arithmetic", "--out", "DIR"],
     ["--out", "is a directory"], []),
    (["sample", "--model", "MODEL", "--task", "arithmetic", "--out", "FILE/traces.jsonl"],
     ["is a file, not a directory"], []),
    (GRPO + ["temperature=-1"], ["`temperature` = -1.0"], []),
    (GRPO + ["temperature=nan"], ["`temperature` = nan"], []),
    (GRPO + ["rollout_batch_size=0"], ["`rollout_batch_size` = 0"], []),
    (GRPO, ["tokenizer.json", "MODEL"], ["SFT"]),
    (["grpo", "--model", "FILE", "--task", "arithmetic"], ["FILE"], ["does not exist"]),
    (["sft", "--model", "FILE", "--data", "MISSING"], ["FILE"], ["does not exist"]),
    (["sft", "--model", "DIR/nope", "--data", "MISSING"], ["model directory"], []),
    (["grpo", "--model", "FULL", "--task", "DIR.jsonl"], ["DIR.jsonl", "not a regular file"], []),
    (["sft", "--model", "FULL", "--data", "MISSING"], ["MISSING", "no such file"], []),
    (["sft", "--model", "FULL", "--data", "DIR"], ["DIR", "not a regular file"], []),
    (["distill", "--teacher-traces", "MISSING"], ["MISSING", "no such file"], ["--tokenizer"]),
    (["distill", "--teacher-traces", "DIR"], ["DIR", "not a file"], ["--tokenizer"]),
    (["distill", "--teacher-traces", "MISSING", "batch_size=0"], ["`batch_size` = 0"], []),
]


def fill(items, paths):
    out = []
    for item in items:
        for key, value in paths.items():
            item = item.replace(key, value)
        out.append(item)
    return out


@pytest.mark.parametrize("argv, wanted, unwanted", CASES, ids=[" ".join(c[0][:1] + c[0][5:])
                                                               for c in CASES])
def test_bad_r1_input_is_one_error_line(argv, wanted, unwanted, paths, tmp_path, capsys):
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(fill(argv, paths)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"nanoseek {argv[0]}: error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    for fragment in fill(wanted, paths):
        assert fragment in lines[0], (fragment, lines[0])
    for fragment in fill(unwanted, paths):
        assert fragment not in lines[0], (fragment, lines[0])
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # a refused run writes nothing
