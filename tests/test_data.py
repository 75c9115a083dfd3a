"""Data pipeline: reading documents, bad input, shard preparation (determinism, split, atomicity,
checksums) and the packed, resumable TokenLoader."""

import errno
import gzip
import json
import re
import sys

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import models, pre_tokenizers

import nanoseek.data.preparation as prepare_module
from nanoseek import cli
from nanoseek.data import (
    TokenLoader, iter_documents, prepare, read_manifest, synthetic_corpus, verify_dataset, write_corpus,
)
from nanoseek.data.encoding import choose_dtype
from nanoseek.data.preparation import is_val_doc
from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer
from nanoseek.errors import UserError
from nanoseek.files import WriteError

DOCS = synthetic_corpus(600, seed=0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer([write_corpus(DOCS, d / "c.jsonl")], 400, d / "tok", progress=False)
    return load_tokenizer(d / "tok")


@pytest.fixture(scope="module")
def dataset(tok, tmp_path_factory):
    """600 documents, 10% validation, shards of 5000 tokens (several, so windows straddle shards)."""
    d = tmp_path_factory.mktemp("data")
    src = write_corpus(DOCS, d / "c.jsonl")
    prepare([src], tok, d / "out", val_fraction=0.1, shard_tokens=5000, workers=1, progress=False)
    return d / "out"


def _write(path, content):
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def _docs(*args, **kw):
    return list(iter_documents(*args, **kw))


# ---- synthetic corpus -------------------------------------------------------------------------------
def test_synthetic_corpus_is_deterministic_and_correct():
    assert synthetic_corpus(50, seed=1) == synthetic_corpus(50, seed=1)
    assert synthetic_corpus(50, seed=1) != synthetic_corpus(50, seed=2)
    text = " ".join(synthetic_corpus(300, seed=0))
    facts = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", text)
    assert len(facts) > 50
    for a, op, b, c in facts:
        assert eval(f"{a} {op} {b}") == int(c)
    assert all("\n" not in d and d.strip() for d in synthetic_corpus(100, seed=3))


# ---- reading documents ------------------------------------------------------------------------------
def test_text_modes(tmp_path):
    f = _write(tmp_path / "a.txt", b"\xef\xbb\xbfone\r\ntwo\r\n\r\n\n three\n\n")
    assert _docs([f]) == ["one\ntwo", " three"]
    assert _docs([f], text_docs="line") == ["one", "two", " three"]
    assert _docs([f], text_docs="file") == ["one\ntwo\n\n\n three"]


def test_jsonl_gz_and_directories(tmp_path):
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write('{"text": "first"}\n\n{"text": "  "}\n{"text": "second", "id": 2}\n')
    _write(tmp_path / "a.txt", "zero\n")
    _write(tmp_path / ".hidden", "ignored\n")
    assert _docs([tmp_path]) == ["zero", "first", "second"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["a doc", None, "another"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert _docs([tmp_path / "d.parquet"], text_field="content") == ["a doc", "another"]
    with pytest.raises(UserError, match="no 'text' column"):
        _docs([tmp_path / "d.parquet"])


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match="pip install pyarrow"):
        _docs([_write(tmp_path / "d.parquet", b"PAR1")])


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "", "contains no text"),
    ("blank.txt", "\n  \n\n", "contains no text"),
    ("latin1.txt", "ok\ncaf\xe9\n".encode("latin-1"), "line 2 is not valid UTF-8"),
    ("nul.bin", b"abc\x00def\n", "binary"),
    ("nofield.jsonl", '{"text": "a"}\n{"body": "b"}\n', "line 2 has no 'text' field .found: body"),
    ("badjson.jsonl", '{"text": "a"}\n\n{"text": \n', "line 3 is not valid JSON"),
    ("notstr.jsonl", '{"text": 5}\n', "line 1: field 'text' is int"),
    ("array.jsonl", '[1, 2]\n', "line 1 has no 'text' field"),
    ("corrupt.txt.gz", b"\x1f\x8b\x08\x00garbage", "cannot read"),
])
def test_bad_input_is_one_clear_error(tmp_path, name, content, message):
    path = _write(tmp_path / name, content)
    with pytest.raises(UserError, match=message) as err:
        _docs([path])
    assert name in str(err.value)


def test_missing_files_are_all_named(tmp_path):
    ok = _write(tmp_path / "ok.txt", "x")
    with pytest.raises(UserError, match="not found: .*a.txt, .*b.txt"):
        _docs([ok, tmp_path / "a.txt", tmp_path / "b.txt"])
    with pytest.raises(UserError, match="no input"):
        _docs([])


# ---- prepare ----------------------------------------------------------------------------------------
def _stream(out, split):
    m = read_manifest(out)
    parts = [np.fromfile(out / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=m["dtype"])


def test_manifest_and_shard_contents(dataset, tok):
    m = verify_dataset(dataset)
    assert (m["dtype"], m["vocab_size"], m["eos_id"]) == ("uint16", tok.vocab_size, tok.eos_id)
    assert m["tokenizer_sha256"] == tok.sha256 == load_tokenizer(dataset / "tokenizer").sha256
    val_idx = [i for i in range(len(DOCS)) if is_val_doc(i, 0.1)]
    assert len(val_idx) == 60 and m["splits"]["val"]["num_docs"] == 60
    for split, docs in [("val", [DOCS[i] for i in val_idx]),
                        ("train", [d for i, d in enumerate(DOCS) if i not in set(val_idx)])]:
        expected = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
        assert _stream(dataset, split).tolist() == expected
        shards = m["splits"][split]["shards"]
        assert sum(s["num_tokens"] for s in shards) == m["splits"][split]["num_tokens"] == len(expected)
        assert all(s["num_tokens"] == 5000 for s in shards[:-1])
    assert len(m["splits"]["train"]["shards"]) > 3


def test_workers_give_identical_shards(dataset, tok, tmp_path):
    src = write_corpus(DOCS, tmp_path / "c.jsonl")
    m = prepare([src], tok, tmp_path / "out", val_fraction=0.1, shard_tokens=5000, workers=2,
                progress=False)
    assert m["splits"] == read_manifest(dataset)["splits"]


def test_val_split_is_even_and_by_document():
    assert sum(is_val_doc(i, 0.01) for i in range(1000)) == 10
    assert sum(is_val_doc(i, 0.01) for i in range(60)) == 1
    assert not any(is_val_doc(i, 0.0) for i in range(1000))


def test_dtype_choice_and_overflow(tmp_path, tok):
    assert choose_dtype(65536) == "uint16" and choose_dtype(65537) == "uint32"
    with pytest.raises(UserError, match="do not fit uint16"):
        choose_dtype(70000, "uint16")
    # a foreign byte-level tokenizer with a huge dummy vocabulary (special tokens get appended)
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab.update({f"dummy{i}": 256 + i for i in range(70000)})
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.save(str(tmp_path / "tokenizer.json"))
    src = write_corpus(DOCS[:20], tmp_path / "c.txt")
    with pytest.raises(UserError, match="do not fit uint16"):
        prepare([src], tmp_path / "tokenizer.json", tmp_path / "o16", dtype="uint16", progress=False)
    assert not (tmp_path / "o16" / "manifest.json").exists()
    m = prepare([src], tmp_path / "tokenizer.json", tmp_path / "o32", workers=1, progress=False)
    assert m["dtype"] == "uint32"
    assert _stream(tmp_path / "o32", "train").max() == m["eos_id"] >= 70000


def test_bad_prepare_arguments(tmp_path, tok):
    src = write_corpus(DOCS[:5], tmp_path / "c.txt")
    for kw, msg in [({"val_fraction": 1.0}, "val-fraction"), ({"shard_tokens": 0}, "shard-tokens"),
                    ({"workers": 0}, "workers")]:
        with pytest.raises(UserError, match=msg):
            prepare([src], tok, tmp_path / "o", progress=False, **kw)
    with pytest.raises(UserError, match="no tokenizer"):
        prepare([src], tmp_path / "nope", tmp_path / "o", progress=False)


def test_interrupted_prepare_keeps_old_data_and_leaves_no_partials(tmp_path, tok, monkeypatch):
    src = write_corpus(DOCS, tmp_path / "c.jsonl")
    out = tmp_path / "out"
    prepare([src], tok, out, shard_tokens=3000, workers=1, progress=False)
    before = read_manifest(out)
    real = prepare_module.iter_documents

    def interrupted(*args, **kw):
        for i, doc in enumerate(real(*args, **kw)):
            if i == 400:
                raise KeyboardInterrupt
            yield doc

    monkeypatch.setattr(prepare_module, "iter_documents", interrupted)
    for target in (out, tmp_path / "fresh"):
        with pytest.raises(KeyboardInterrupt):
            prepare([src], tok, target, shard_tokens=1000, workers=1, progress=False)
        assert not list(target.glob(".*partial"))
    assert verify_dataset(out) == before  # the old dataset is untouched and still valid
    assert not (tmp_path / "fresh").exists()  # the directory the failed run created is gone again


def test_reprepare_removes_stale_shards(tmp_path, tok):
    src = write_corpus(DOCS, tmp_path / "c.jsonl")
    prepare([src], tok, tmp_path / "out", shard_tokens=2000, workers=1, progress=False)
    m = prepare([src], tok, tmp_path / "out", shard_tokens=10**6, workers=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.bin")) == ["train_000000.bin", "val_000000.bin"]
    assert len(m["splits"]["train"]["shards"]) == 1



def test_reprepare_keeps_files_it_did_not_write(tmp_path, tok):
    """Only the shards the previous manifest listed are removed; other files stay; a shard-named file
    that no manifest lists makes prepare refuse before it changes anything."""
    src = write_corpus(DOCS, tmp_path / "c.jsonl")
    out = tmp_path / "out"
    prepare([src], tok, out, shard_tokens=2000, workers=1, progress=False)
    notes = _write(out / "train_notes.bin", b"mine")
    prepare([src], tok, out, shard_tokens=10**6, workers=1, progress=False)
    assert notes.read_bytes() == b"mine"
    foreign = _write(out / "val_000007.bin", b"not from prepare")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(UserError, match="no manifest there lists.*val_000007.bin"):
        prepare([src], tok, out, shard_tokens=3000, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    foreign.unlink()
    verify_dataset(out)


def test_interrupted_commit_still_owns_its_shards(tmp_path, tok, monkeypatch):
    """Killed between moving shards into place and writing the manifest: the pending manifest says
    which shards were ours, so the next run replaces them instead of refusing."""
    src = write_corpus(DOCS, tmp_path / "c.jsonl")
    out = tmp_path / "out"
    real = prepare_module.write_json

    def killed(path, obj, **kw):
        if path.name == "manifest.json":
            raise KeyboardInterrupt
        return real(path, obj, **kw)

    monkeypatch.setattr(prepare_module, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], tok, out, shard_tokens=2000, workers=1, progress=False)
    assert (out / "train_000000.bin").exists() and not (out / "manifest.json").exists()
    monkeypatch.setattr(prepare_module, "write_json", real)
    m = prepare([src], tok, out, shard_tokens=10**6, workers=1, progress=False)
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_000000.bin", "val_000000.bin"]
    assert not (out / prepare_module.PENDING).exists() and verify_dataset(out) == m


def test_partials_of_a_killed_prepare_are_removed(tmp_path, tok):
    src = write_corpus(DOCS[:50], tmp_path / "c.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    left = [_write(out / ".train_000000.bin.4242.partial", b"x" * 100),
            _write(out / ".val_000003.bin.77.partial", b"y")]
    other = _write(out / ".notes.partial", b"not ours")
    prepare([src], tok, out, workers=1, progress=False)
    assert not any(p.exists() for p in left) and other.exists()


class _FullDisk:
    """A shard file on a full disk: writes fail after `room` bytes, and so does close (its buffer
    cannot be flushed), as with ENOSPC on a real filesystem."""

    def __init__(self, path, room):
        self._f, self.room = open(path, "wb"), room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self._f.write(data)

    def close(self):
        self._f.close()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.mark.parametrize("room", [0, 7000])
def test_full_disk_is_one_error_and_leaves_no_partials(tmp_path, tok, monkeypatch, room):
    import nanoseek.data.shards as shards

    src = write_corpus(DOCS, tmp_path / "c.jsonl")
    out = tmp_path / "out"
    prepare([src], tok, out, shard_tokens=3000, workers=1, progress=False)
    before = read_manifest(out)
    monkeypatch.setattr(shards, "open", lambda path, mode: _FullDisk(path, room), raising=False)
    for target in (out, tmp_path / "fresh"):
        with pytest.raises(WriteError, match="No space left on device") as info:
            prepare([src], tok, target, shard_tokens=2000, workers=1, progress=False)
        assert "\n" not in str(info.value)
        assert not list(target.glob(".*partial"))
    assert verify_dataset(out) == before


def test_full_disk_while_committing_leaves_no_partials(tmp_path, tok, monkeypatch):
    src = write_corpus(DOCS, tmp_path / "c.jsonl")

    def full(path, obj, **kw):
        raise WriteError(f"could not write {path} (No space left on device)")

    monkeypatch.setattr(prepare_module, "write_json", full)
    with pytest.raises(WriteError, match="No space left"):
        prepare([src], tok, tmp_path / "out", shard_tokens=2000, workers=1, progress=False)
    assert not list((tmp_path / "out").glob(".*partial")) and not list((tmp_path / "out").glob("*.bin"))

# ---- loader -----------------------------------------------------------------------------------------
def test_batches_are_windows_of_the_stream(dataset):
    loader = TokenLoader(dataset, seq_len=32, batch_size=4, seed=3)
    stream = _stream(dataset, "train").astype(np.int64)
    windows = {tuple(stream[i * 32:(i + 1) * 32]) for i in range(loader.num_windows)}
    assert loader.num_tokens == len(stream) and loader.num_windows == len(stream) // 32
    assert loader.vocab_size == read_manifest(dataset)["vocab_size"]
    batch = loader.next_batch()
    assert batch.shape == (4, 32) and batch.dtype == torch.long
    assert all(tuple(row.tolist()) in windows for row in batch)


def test_one_epoch_visits_every_window_once_in_seeded_order(dataset):
    def epoch_rows(seed, epochs=1):
        loader = TokenLoader(dataset, seq_len=64, batch_size=5, seed=seed, epochs=epochs, verify=False)
        return [tuple(r.tolist()) for b in loader for r in b], loader

    rows, loader = epoch_rows(0)
    assert len(rows) == len(set(rows)) == loader.num_windows  # last batch may be smaller
    assert rows == epoch_rows(0)[0]
    assert rows != epoch_rows(1)[0] and sorted(rows) == sorted(epoch_rows(1)[0])
    two, _ = epoch_rows(0, epochs=2)
    assert two[:len(rows)] == rows and two[len(rows):] != rows and sorted(two[len(rows):]) == sorted(rows)
    ordered = TokenLoader(dataset, seq_len=64, batch_size=5, shuffle=False, verify=False).next_batch()
    stream = _stream(dataset, "train")
    assert ordered.flatten().tolist() == stream[:320].tolist()


def test_resume_reproduces_the_uninterrupted_run(dataset):
    kw = dict(seq_len=48, batch_size=7, seed=5, verify=False)
    full = TokenLoader(dataset, **kw)
    n = full.batches_per_epoch + 3  # resume point after an epoch boundary
    reference = [full.next_batch() for _ in range(n + 6)]
    first = TokenLoader(dataset, **kw)
    for _ in range(n):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = TokenLoader(dataset, **kw)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    for expected in reference[n:]:
        assert torch.equal(resumed.next_batch(), expected)
    other = TokenLoader(dataset, **{**kw, "seq_len": 32})
    with pytest.raises(UserError, match="seq_len was 48"):
        other.load_state_dict(state)


def test_ranks_split_the_global_batch(dataset):
    kw = dict(seq_len=32, seed=2, verify=False)
    whole = TokenLoader(dataset, batch_size=6, **kw)
    ranks = [TokenLoader(dataset, batch_size=3, rank=r, world_size=2, **kw) for r in range(2)]
    for _ in range(3):
        assert torch.equal(whole.next_batch(), torch.cat([r.next_batch() for r in ranks]))


def test_val_split_and_too_small_split(dataset):
    val = TokenLoader(dataset, split="val", seq_len=16, batch_size=2)
    assert val.num_tokens == read_manifest(dataset)["splits"]["val"]["num_tokens"]
    with pytest.raises(UserError, match="fewer than one sequence"):
        TokenLoader(dataset, split="val", seq_len=10**6)
    with pytest.raises(UserError, match="unknown split"):
        TokenLoader(dataset, split="test")


def test_corruption_is_detected(dataset, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(dataset, out)
    shard = out / read_manifest(out)["splits"]["train"]["shards"][1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="checksum mismatch"):
        TokenLoader(out, seq_len=16)
    TokenLoader(out, seq_len=16, verify=False)  # skipping verification is allowed
    with pytest.raises(UserError, match="checksum mismatch"):  # verify checks the whole dataset
        TokenLoader(out, split="val", seq_len=16)
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(UserError, match="truncated"):
        TokenLoader(out, seq_len=16, verify=False)
    shard.unlink()
    with pytest.raises(UserError, match="missing"):
        TokenLoader(out, seq_len=16, verify=False)


def test_flipped_byte_in_the_val_shard_is_detected(dataset, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(dataset, out)
    shard = out / read_manifest(out)["splits"]["val"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    # the training loader verifies every split, so a run that evaluates with verify=False is covered
    with pytest.raises(UserError, match=r"val_000000.bin: checksum mismatch"):
        TokenLoader(out, split="train", seq_len=16)
    with pytest.raises(UserError, match="checksum mismatch"):
        verify_dataset(out)
    TokenLoader(out, split="val", seq_len=16, verify=False)  # sizes still match: only sha256 can tell


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.pop("splits"), "no 'splits' entry"),
    (lambda m: m.update(splits=[]), "'splits' must map"),
    (lambda m: m["splits"]["val"].pop("shards"), "split 'val' does not list its shards"),
    (lambda m: m["splits"]["train"]["shards"][0].pop("sha256"), "split 'train' does not list"),
    (lambda m: m["splits"]["train"]["shards"][0].update(file="../../etc/passwd"), "split 'train'"),
    (lambda m: m.update(dtype="float64"), "unknown token dtype"),
])
def test_damaged_manifest_is_one_clear_error(dataset, tmp_path, damage, message):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(dataset, out)
    manifest = json.loads((out / "manifest.json").read_text())
    damage(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=message):
        TokenLoader(out, seq_len=16)


def test_not_a_data_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        TokenLoader(tmp_path / "nope")
    with pytest.raises(UserError, match="is a file, not a data directory"):
        TokenLoader(_write(tmp_path / "file", "x"))
    with pytest.raises(UserError, match="no manifest.json"):
        TokenLoader(tmp_path)
    _write(tmp_path / "manifest.json", "{}")
    with pytest.raises(UserError, match="not a nanoseek token manifest"):
        TokenLoader(tmp_path)


# ---- CLI --------------------------------------------------------------------------------------------
def test_cli(tmp_path, tok, capsys):
    tok.save(tmp_path / "tok")
    corpus = tmp_path / "c.txt"
    assert cli.main(["data", "synthetic", "--out", str(corpus), "--n-docs", "100"]) == 0
    assert _docs([corpus]) == synthetic_corpus(100, 0)
    argv = ["data", "prepare", "--input", str(corpus), "--tokenizer", str(tmp_path / "tok"),
            "--out", str(tmp_path / "d"), "--workers", "1", "--quiet", "--val-fraction", "0.004"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "train:" in captured.out and "too few documents" in captured.err
    assert cli.main(["data", "verify", str(tmp_path / "d")]) == 0
    (tmp_path / "d" / "train_000000.bin").write_bytes(b"\0\0")
    assert cli.main(["data", "verify", str(tmp_path / "d")]) == 2
    bad = _write(tmp_path / "bad.jsonl", '{"txt": 1}\n')
    assert cli.main([*argv[:3], str(bad), *argv[4:]]) == 2
    assert "bad.jsonl: line 1 has no 'text' field" in capsys.readouterr().err
