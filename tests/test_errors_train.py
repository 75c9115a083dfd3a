"""Bad input to the training commands: exit status 2, one `nanoseek <cmd>: error: ...` line, no traceback,
and nothing written."""

import pytest
import torch

from nanoseek.cli import main


@pytest.fixture
def files(tmp_path):
    (tmp_path / "a_file").write_text("not a directory\n")
    (tmp_path / "latin1.toml").write_bytes('data = "caf\xe9"\n'.encode("latin-1"))
    (tmp_path / "conf_dir").mkdir()
    for name, line in (("words.toml", 'seq_len = "sixty-four"'), ("float.toml", "batch_size = 2.5"),
                       ("string_bool.toml", 'compile = "false"'), ("unknown.toml", "nope = 1"),
                       ("broken.toml", "max_steps = = 3")):
        (tmp_path / name).write_text(line + "\n")
    return tmp_path


CASES = [
    # (argv with {tmp} for the temporary directory, text the error line must contain)
    (["pretrain", "out_dir={tmp}/a_file"], "`out_dir` = '{tmp}/a_file': must be a directory (this path, or a"),
    (["pretrain", "out_dir={tmp}/a_file/run"], "`out_dir` = '{tmp}/a_file/run': must be a directory"),
    (["pretrain", "model.nope=3"], "unknown model field 'nope'"),
    (["pretrain", "--config", "{tmp}/conf_dir"], "config file {tmp}/conf_dir is not a file"),
    (["pretrain", "--config", "{tmp}/missing.toml"], "config file {tmp}/missing.toml does not exist"),
    (["pretrain", "--config", "{tmp}/latin1.toml"], "config file {tmp}/latin1.toml is not UTF-8 text"),
    (["pretrain", "--config", "{tmp}/words.toml"], "setting `seq_len` = 'sixty-four': expected an integer"),
    (["pretrain", "--config", "{tmp}/float.toml"], "setting `batch_size` = 2.5: expected an integer"),
    (["pretrain", "--config", "{tmp}/string_bool.toml"], "setting `compile` = 'false': expected true or false"),
    (["pretrain", "--config", "{tmp}/unknown.toml"], "unknown setting 'nope'"),
    (["pretrain", "--config", "{tmp}/broken.toml"], "invalid TOML"),
    (["pretrain", "eval_batches=0"], "`eval_batches` = 0: must be >= 1"),
    (["pretrain", "log_every=0"], "`log_every` = 0: must be >= 1"),
    (["pretrain", "beta1=1.5"], "`beta1` = 1.5: must be in [0, 1)"),
    (["pretrain", "save_every=-1"], "`save_every` = -1: must be >= 0"),
    (["pretrain", "lr=inf"], "`lr` = inf: must be a finite number > 0"),
    (["pretrain", "lr=nan"], "`lr` = nan: must be a finite number > 0"),
    (["pretrain", "device=tpu"], "`device` = 'tpu': must be auto, cpu, cuda[:N] or mps"),
    (["pretrain", "max_steps=ten"], "setting `max_steps=ten`: expected an integer"),
    (["pretrain", "model=huge"], "model='huge' is neither a preset (tiny, small"),
    (["pretrain", "model.aux_loss_alpha=0.1"], "model.aux_loss_alpha is set by the training setting `aux_alpha`"),
    (["pretrain", "max_steps"], "override 'max_steps' is not key=value"),
    (["pretrain", "data={tmp}/nowhere", "out_dir={tmp}/out"], "{tmp}/nowhere"),
    (["demo", "--out", "{tmp}/a_file"], "--out {tmp}/a_file is a file, not a directory"),
    (["demo", "--threads", "-2"], "`--threads` = -2: must be >= 0"),
]
if not torch.cuda.is_available():
    CASES.append((["pretrain", "device=cuda"], "`device` = 'cuda', but CUDA is not available on this machine"))


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_training_input_is_one_error_line(files, capsys, argv, message):
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    before = sorted(p.relative_to(files) for p in files.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"nanoseek {argv[0]}: error: "), err
    assert message.replace("{tmp}", str(files)) in lines[0]
    assert "Traceback" not in err
    assert sorted(p.relative_to(files) for p in files.rglob("*")) == before  # a refused run writes nothing
