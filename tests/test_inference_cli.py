"""`nanoseek generate` and `nanoseek chat`, driven through `nanoseek.cli.main` with a tiny model and a
tokenizer trained on the spot."""

import io
import json

import pytest
import torch

import nanoseek
from nanoseek.cli import main
from nanoseek.config import preset


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_streams_and_reports(model_dir, capsys):
    rc, out, err = run_cli(["generate", "--model", str(model_dir), "--prompt", "The quick", "--max-new-tokens", "12",
                            "--seed", "0", "--temperature", "0.8"], capsys)
    assert rc == 0 and out.endswith("\n")
    assert "12 tokens" in err and "tokens/s" in err
    rc, out2, _ = run_cli(["generate", "--model", str(model_dir), "--prompt", "The quick", "--max-new-tokens", "12",
                           "--seed", "0", "--temperature", "0.8"], capsys)
    assert out2 == out  # seeded
    rc, out, err = run_cli(["generate", "--model", str(model_dir), "--prompt", "a", "--prompt", "b c", "--chat",
                            "--max-new-tokens", "5", "--speculative", "--quiet"], capsys)
    assert rc == 0 and "=== 0: a\n" in out and "=== 1: b c\n" in out and err == ""
    rc, _, err = run_cli(["generate", "--model", str(model_dir), "--prompt", "x", "--max-new-tokens", "8",
                          "--speculative"], capsys)
    assert rc == 0 and "MTP acceptance" in err


def test_generate_user_errors(model_dir, tmp_path, capsys):
    rc, _, err = run_cli(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"], capsys)
    assert rc == 2 and "does not exist" in err
    bare = tmp_path / "bare"
    nanoseek.DeepseekV3ForCausalLM(preset("tiny", num_nextn_predict_layers=0)).save_pretrained(bare)
    rc, _, err = run_cli(["generate", "--model", str(bare), "--prompt", "x"], capsys)
    assert rc == 2 and "no tokenizer.json" in err and "--tokenizer" in err
    # the tokenizer from elsewhere works, but this model has no MTP module
    rc, _, err = run_cli(["generate", "--model", str(bare), "--tokenizer", str(model_dir), "--prompt", "x",
                          "--speculative"], capsys)
    assert rc == 2 and "MTP" in err
    long_prompt = "The quick brown fox " * 200
    rc, _, err = run_cli(["generate", "--model", str(model_dir), "--prompt", long_prompt], capsys)
    assert rc == 2 and "context" in err
    small = tmp_path / "small"
    nanoseek.DeepseekV3ForCausalLM(preset("tiny", vocab_size=280)).save_pretrained(small)
    rc, _, err = run_cli(["generate", "--model", str(small), "--tokenizer", str(model_dir), "--prompt", "x"], capsys)
    assert rc == 2 and "300 tokens" in err and "vocab_size is 280" in err
    rc, _, err = run_cli(["generate", "--model", str(model_dir), "--prompt", "x", "--top-p", "0"], capsys)
    assert rc == 2 and "top_p" in err


def test_chat_repl(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n\n/reset\nand again\n"))
    rc, out, _ = run_cli(["chat", "--model", str(model_dir), "--max-new-tokens", "6", "--seed", "1",
                          "--system", "Be brief."], capsys)
    assert rc == 0
    assert out.count("you> ") == 5  # four lines, then end of input
    assert out.count("assistant: ") == 2 and "(conversation reset)" in out


def test_chat_shows_or_hides_the_reasoning(model_dir):
    from rich.console import Console

    from nanoseek.inference.chat import ReplyView
    from nanoseek.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    reply = ([tok.token_id("<think>")] + tok.encode(" 12 + 7 is 19")
             + [tok.token_id("</think>"), tok.token_id("<answer>")] + tok.encode("19")
             + [tok.token_id("</answer>"), tok.eos_id])
    shown = {}
    for show in (True, False):
        buf = io.StringIO()
        view = ReplyView(Console(file=buf, highlight=False, markup=False), tok, show_think=show)
        for t in reply:
            view.push(t)
        assert view.finish() == "<answer>19</answer>"  # back into the conversation: all but the reasoning
        shown[show] = buf.getvalue()
    assert shown[True] == "thinking:  12 + 7 is 19\nassistant: 19\n"
    assert shown[False] == "assistant: 19\n"


def test_chat_session_drops_old_turns_to_fit(model_dir):
    from nanoseek.errors import UserError
    from nanoseek.inference.chat import ChatSession
    from nanoseek.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    session = ChatSession(tok, context=120)
    for i in range(6):
        ids = session.prompt(f"message number {i} " * 3, room=20)
        assert len(ids) + 20 <= 120
        session.reply("ok " * 5)
    assert session.turns[0]["content"] != "message number 0 " * 3  # the oldest turns went
    with pytest.raises(UserError, match="too long"):
        session.prompt("The quick brown fox " * 100, room=20)
    assert json.dumps(session.turns)  # still a valid conversation
