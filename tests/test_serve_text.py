"""What a client reads (nanoseek.serve.detokenize): stop strings held back while they may still be
forming and cut when they appear, the reasoning split of chat replies, and token bytes for log-probs."""

import pytest

from nanoseek.data.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK, train_tokenizer
from nanoseek.serve.detokenize import ChatText, TextDeltas, TokenNames

PIECES = ["Hel", "lo", " wor", "ld", "! ", "EN", "D", " more"]


def deltas(stops, pieces=PIECES):
    text = TextDeltas(lambda ids: "".join(pieces[i] for i in ids), stops)
    out = [text.push(i) for i in range(len(pieces))]
    return out + [text.finish()]


def test_text_without_stop_strings_streams_as_it_comes():
    assert deltas([]) == PIECES + [""]


def test_stop_strings_are_held_back_then_cut():
    out = deltas(["END"])
    assert "".join(out) == "Hello world! "
    assert out[5] == ""  # "EN" could be the start of "END": held back
    assert deltas(["ENX"])[5] == "" and "".join(deltas(["ENX"])) == "".join(PIECES)  # ... and released at the end
    assert "".join(deltas(["o w"])) == "Hell"  # a stop string across tokens
    assert "".join(deltas(["zzz", "ld!"])) == "Hello wor"  # the earliest of several


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "c.txt").write_text("The quick brown fox. 12 + 7 = 19. Think, then answer. Grüße, 東京!\n" * 30)
    return train_tokenizer([root / "c.txt"], 300, None, progress=False)


def test_chat_reply_splits_reasoning_from_content(tok):
    reply = ([tok.token_id(THINK)] + tok.encode(" 12 + 7 is 19") + [tok.token_id(END_THINK), tok.token_id(ANSWER)]
             + tok.encode("19") + [tok.token_id(END_ANSWER), tok.eos_id])
    text = ChatText(tok, [])
    parts = [text.push(t) for t in reply] + [text.finish()]
    assert "".join(p[0] for p in parts) == " 12 + 7 is 19"
    assert "".join(p[1] for p in parts) == "19"
    assert text.reasoning_tokens == len(tok.encode(" 12 + 7 is 19")) + 2
    plain = ChatText(tok, [])  # no <think>: all content, nothing counted as reasoning
    parts = [plain.push(t) for t in tok.encode("just an answer")] + [plain.finish()]
    assert "".join(p[1] for p in parts) == "just an answer" and plain.reasoning_tokens == 0
    open_ended = ChatText(tok, [])  # cut off while thinking: the reasoning so far, no content
    parts = [open_ended.push(t) for t in [tok.token_id(THINK)] + tok.encode("hmm")] + [open_ended.finish()]
    assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == ("hmm", "")


def test_token_bytes_rebuild_the_text(tok):
    names = TokenNames(tok)
    ids = tok.encode("Grüße, 東京! <think>")
    assert b"".join(names.bytes(i) for i in ids).decode() == "Grüße, 東京! <think>"
    assert names.text(tok.token_id(THINK)) == "<think>"
