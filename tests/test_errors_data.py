"""Bad input to `nanoseek tokenizer`, `nanoseek data` and `nanoseek cost`: every case exits with status 2
and prints exactly one line, `nanoseek <cmd>: error: ...`, naming the problem; never a traceback, and
never "does not exist" for a path that exists but is the wrong kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nanoseek import cli
from nanoseek.config import PRESETS, preset
from nanoseek.data import synthetic_corpus, train_tokenizer, write_corpus


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the cases refer to as {name}: good inputs, and inputs of the wrong kind."""
    d = tmp_path_factory.mktemp("errors")
    corpus = write_corpus(synthetic_corpus(80, seed=0), d / "corpus.jsonl")
    train_tokenizer([corpus], 300, d / "tok", progress=False)
    (d / "a_dir").mkdir()
    (d / "a_file").write_text("just text\n")
    (d / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (d / "not_json.json").write_text("{nope")
    (d / "config_latin1.json").write_bytes(b'{"name": "\xe9"}')
    os.mkfifo(d / "fifo")
    bad = preset("tiny").to_dict()
    (d / "n_group3.json").write_text(json.dumps({**bad, "n_group": 3}))  # 8 experts in 3 groups
    (d / "str_int.json").write_text(json.dumps({**bad, "hidden_size": "64"}))
    (d / "gqa.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                            "num_attention_heads": 6, "num_key_value_heads": 4,
                                            "intermediate_size": 128, "vocab_size": 100}))
    (d / "ds_unknown.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "learning_rate": 0.1}))
    paths = {p.name: str(p) for p in d.iterdir()}
    return {**paths, "missing": str(d / "missing"), "out": str(d / "out_dir")}


def prepare(*extra):
    return ["data", "prepare", "--input", "{corpus.jsonl}", "--tokenizer", "{tok}", "--out", "{out}",
            "--quiet", "--workers", "1", *extra]


CASES = [
    # ---- nanoseek tokenizer
    (["tokenizer", "train", "--input", "{corpus.jsonl}", "--vocab-size", "300", "--out", "{a_file}"],
     "is a file; the tokenizer is saved into a directory"),
    (["tokenizer", "train", "--input", "{corpus.jsonl}", "--vocab-size", "10", "--out", "{out}"],
     "invalid setting `--vocab-size` = 10: must be at least 266"),
    (["tokenizer", "train", "--input", "{missing}", "--vocab-size", "300", "--out", "{out}"],
     "input file(s) not found"),
    (["tokenizer", "train", "--input", "{fifo}", "--vocab-size", "300", "--out", "{out}"],
     "exists but is neither a regular file nor a directory"),
    (["tokenizer", "train", "--input", "{latin1.txt}", "--vocab-size", "300", "--out", "{out}"],
     "line 1 is not valid UTF-8"),
    (["tokenizer", "encode", "--tokenizer", "{a_dir}", "x"], "exists but holds no tokenizer.json"),
    (["tokenizer", "encode", "--tokenizer", "{missing}", "x"], "no tokenizer at"),
    (["tokenizer", "encode", "--tokenizer", "{not_json.json}", "x"], "not a valid tokenizer.json"),
    # ---- nanoseek data
    (["data", "synthetic", "--out", "{a_dir}"], "is a directory; give a file name"),
    (["data", "synthetic", "--out", "{out}/c.jsonl", "--n-docs", "0"],
     "invalid setting `--n-docs` = 0: must be a positive integer"),
    (prepare("--val-fraction", "1.5"), "invalid setting `--val-fraction` = 1.5: must be in [0, 1)"),
    (prepare("--val-fraction", "-0.1"), "invalid setting `--val-fraction`"),
    (prepare("--shard-tokens", "0"), "invalid setting `--shard-tokens` = 0: must be a positive integer"),
    (prepare("--workers", "0"), "invalid setting `--workers` = 0: must be at least 1"),
    ([*prepare()[:7], "{a_file}", "--quiet"], "exists and is not a directory"),
    ([*prepare()[:3], "{latin1.txt}", *prepare()[4:]], "latin1.txt: line 1 is not valid UTF-8"),
    ([*prepare()[:5], "{a_dir}", *prepare()[6:]], "exists but holds no tokenizer.json"),
    (["data", "verify", "{a_file}"], "is a file, not a data directory"),
    (["data", "verify", "{missing}"], "does not exist"),
    (["data", "verify", "{a_dir}"], "has no manifest.json"),
    # ---- nanoseek cost
    (["cost", "tiny", "--mfu", "0"], "invalid setting `--mfu` = 0.0: must be in (0, 1]"),
    (["cost", "tiny", "--tokens", "14.8T", "--mfu", "-0.4"], "invalid setting `--mfu` = -0.4"),
    (["cost", "tiny", "--mfu", "nan"], "invalid setting `--mfu` = nan"),
    (["cost", "tiny", "--n-gpus", "0"], "invalid setting `--n-gpus` = 0: must be a positive integer"),
    (["cost", "tiny", "--seq-len", "0"], "invalid setting `--seq-len` = 0"),
    (["cost", "tiny", "--comm-sms", "200"], "invalid setting `--comm-sms` = 200: must be in [0, 132)"),
    (["cost", "tiny", "--usd-per-gpu-hour", "-2"], "invalid setting `--usd-per-gpu-hour` = -2.0"),
    (["cost", "tiny", "--grad-bytes", "inf"], "invalid setting `--grad-bytes` = inf"),
    (["cost", "tiny", "--tokens", "0"], "invalid setting `--tokens` = '0': must be a positive number"),
    (["cost", "tiny", "--tokens-per-s", "fast"], "invalid setting `--tokens-per-s` = 'fast'"),
    (["cost", "--stage", "pretraining"], "invalid setting `--stage` = 'pretraining': must be NAME=GPU_HOURS"),
    (["cost", "{n_group3.json}"], "invalid config field `n_group` = 3: n_routed_experts=8 is not divisible"),
    (["cost", "{str_int.json}"], "invalid config field `hidden_size` = '64': must be an integer"),
    (["cost", "{gqa.json}"], "`num_key_value_heads (config)` = 4: must be a divisor"),
    (["cost", "{ds_unknown.json}"], "unknown field(s) learning_rate in a DeepSeek inference config"),
    (["cost", "{config_latin1.json}"], "is not UTF-8 text"),
    (["cost", "{not_json.json}"], "is not valid JSON"),
    (["cost", "{a_dir}"], "is a directory without a config.json"),
    (["cost", "{fifo}"], "exists but is not a regular file"),
    (["cost", "huge"], "not a preset (" + ", ".join(PRESETS) + ")"),
]


def _fill(argv, files):
    """Replace each {name} by the path `files` gives it (names contain dots, so not str.format)."""
    out = []
    for a in argv:
        for name, path in files.items():
            a = a.replace("{" + name + "}", path)
        out.append(a)
    return out


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_is_one_error_line(files, capsys, argv, message):
    argv = _fill(argv, files)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"nanoseek {argv[0]}: error: "), err
    assert message in lines[0]
    assert "Traceback" not in err


def test_refused_runs_write_nothing(files):
    """The refused `data prepare` / `tokenizer train` above created no output directory."""
    assert not os.path.exists(files["out"])


def test_as_a_subprocess(files):
    """`python -m nanoseek` end to end: status 2, one line on stderr, nothing on stdout."""
    run = subprocess.run([sys.executable, "-m", "nanoseek", "cost", "tiny", "--n-gpus", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        "nanoseek cost: error: invalid setting `--n-gpus` = 0: must be a positive integer"]
