"""The `nanoseek` entry points: `python -m nanoseek`, and a reader that stops early is not an error."""

import subprocess
import sys


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "nanoseek", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "usage: nanoseek" in out.stdout


def test_closed_stdout_pipe_is_not_an_error():
    """`nanoseek cost ... | head -1`: the command stops quietly when its reader goes away."""
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "cost", "--compare", "deepseek-v3", "qwen2.5-72b",
                             "llama-3.1-405b", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader leaves before the command has written anything
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "error" not in stderr.lower() and "Traceback" not in stderr


def test_a_bad_setting_is_said_once_per_torchrun_job(monkeypatch, capsys):
    """Every torchrun rank checks the same settings; only rank 0 prints the error (all exit with status 2)."""
    from nanoseek.cli import main

    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert main(["pretrain", "model=tiny", "lr=-1"]) == 2
        err = capsys.readouterr().err
        assert ("nanoseek pretrain: error: invalid setting `lr`" in err) == said, err
