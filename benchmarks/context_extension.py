"""Context extension with YaRN (DeepSeek-V3's 4K -> 32K -> 128K stages, in miniature: L -> 4L).

For each corpus:
  1. pretrain the `small` preset at seq_len L (plain RoPE);
  2. measure validation loss at L and at 4L (positions beyond anything seen in training), and at 4L
     with YaRN switched on but no training (zero-shot);
  3. the YaRN stage: `init_from` the trained model, `yarn_factor=4 yarn_original_len=L seq_len=4L`,
     a modest number of steps; measure again at L and 4L.
  Two controls with the same number of extra steps and tokens: (a) continue at 4L with plain RoPE
  (no YaRN), (b) continue at L (extra training only, no longer context).

All losses at L and at 4L are over the *same* validation tokens (the first N tokens of the split, cut
into windows of L or of 4L), and the 4L numbers are also broken down by position in the window
(0..L-1, L..2L-1, ...): at a position >= L the model has more than L tokens of context, so a loss there
below the 0..L-1 bucket means it uses context from further back than it was pretrained on.

Corpora: `short` is the built-in synthetic corpus (one-line documents of ~45 tokens; packing
concatenates them with EOS, so a 4L window spans many unrelated documents and long context can hardly
help); `long` is generated here: documents of ~850 tokens in which a random "passage" of words is
stated and then repeated several times after fillers of 1-30 synthetic sentences, so predicting a
repeat needs context from up to ~350 tokens back. For that corpus the script also reports the loss on
repeated-passage tokens by where the previous statement is (< L back, >= L back, outside the window):
the direct test of whether long context is used. (At the default budget the model never learns to
copy, so those columns do not separate; see docs/context_extension.md.)

    python benchmarks/context_extension.py                  # both corpora, ~8-10 min on one thread
    python benchmarks/context_extension.py --corpus long
    python benchmarks/context_extension.py --quick          # seconds, tiny model (smoke test)

Writes OUT/results.json and OUT/results.md (the tables); runs (metrics.jsonl, models) under OUT/<corpus>/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.files import write_json, write_text

FULL = dict(model="small", overrides={"vocab_size": 1024}, vocab=1024, L=128, factor=4, batch_tokens=1024,
            steps=400, ext_steps=100, lr=3e-3, ext_lr=1e-3, warmup=20, ext_warmup=10, eval_tokens=16384,
            docs={"short": 10_000, "long": 800})
QUICK = dict(model="tiny", overrides={"vocab_size": 320}, vocab=300, L=16, factor=4, batch_tokens=64,
             steps=6, ext_steps=3, lr=3e-3, ext_lr=1e-3, warmup=2, ext_warmup=1, eval_tokens=256,
             docs={"short": 300, "long": 30})


# ---------------------------------------------------------------------------------- the long corpus
def long_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of ~850 tokens: "Remember: <passage>." then 3-5 x (a filler of 1-30 synthetic sentences
    and arithmetic facts, then "Remember: <passage>." again). The passage is 10-16 words drawn at random
    (names, animals, adjectives, objects, numbers 0-39), so a repeat is predictable only by copying the
    previous statement, which is ~10-350 tokens back: about a third of the repeats are within L = 128
    tokens (where the model can learn to copy), the rest only reachable with a longer context."""
    from nanoseek.data.synthetic import ADJECTIVES, ANIMALS, NAMES, OBJECTS, statement

    pool = NAMES + ANIMALS + ADJECTIVES + OBJECTS + [str(n) for n in range(40)]
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        passage = " ".join(rng.choice(pool) for _ in range(rng.randint(10, 16)))
        parts = [f"Remember: {passage}."]
        for _ in range(rng.randint(3, 5)):
            parts += [statement(rng) for _ in range(rng.randint(1, 30))]
            parts.append(f"Remember: {passage}.")
        docs.append(" ".join(parts))
    return docs


def prepare_data(root: Path, corpus: str, n_docs: int, vocab: int, seed: int) -> Path:
    from nanoseek.data import prepare, synthetic_corpus, write_corpus
    from nanoseek.data.tokenizer import train_tokenizer

    data = root / "data"
    if (data / "manifest.json").exists():
        return data
    docs = synthetic_corpus(n_docs, seed=seed) if corpus == "short" else long_corpus(n_docs, seed=seed)
    path = write_corpus(docs, root / "corpus.jsonl")
    tok = train_tokenizer([path], vocab, root / "tokenizer", progress=False)
    prepare([path], tok, data, val_fraction=0.05, workers=1, progress=False)
    return data


# ---------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def eval_windows(model, data: Path, seq_len: int, n_tokens: int, bucket: int, batch_tokens: int) -> dict:
    """Next-token loss over the first `n_tokens` validation tokens cut into `seq_len` windows (no shuffle),
    overall and per `bucket` positions of the window (the position of the token doing the predicting)."""
    from nanoseek.data import TokenLoader

    bs = max(1, batch_tokens // seq_len)
    loader = TokenLoader(data, "val", seq_len=seq_len, batch_size=bs, shuffle=False, verify=False)
    windows = n_tokens // seq_len
    assert windows <= loader.num_windows, (windows, loader.num_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ces = []
    done = 0
    while done < windows:
        x = loader.next_batch()[: windows - done].to(device)
        logits = model(x).logits[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        ces.append(ce.view(x.shape[0], -1).double().cpu())
        done += x.shape[0]
    model.train(was_training)
    ce = torch.cat(ces)  # [windows, seq_len - 1]: loss of predicting token w*seq_len + i + 1
    per_pos = ce.mean(0)
    out = {"loss": per_pos.mean().item()}
    out["buckets"] = [per_pos[i:i + bucket].mean().item() for i in range(0, seq_len - 1, bucket)]
    out["ce"] = ce
    return out


def repeat_classes(data: Path, seq_len: int, n_tokens: int, L: int) -> dict[str, torch.Tensor] | None:
    """For the `long` corpus: boolean masks [windows, seq_len - 1] over the predictions of `eval_windows`,
    selecting the tokens of a *repeated* passage ("Remember: <passage>." after the first statement of the
    document), split by where the previous statement of the same passage is: inside the window and
    < L tokens back, inside the window and >= L tokens back (reachable only with long context), or
    before the window start (not copyable)."""
    import numpy as np

    from nanoseek.data import TokenLoader
    from nanoseek.data.tokenizer import load_tokenizer

    tok = load_tokenizer(data / "tokenizer")
    marker = np.array(tok.encode(" Remember:"))  # pre-tokenization splits words, so these ids are fixed
    loader = TokenLoader(data, "val", seq_len=n_tokens, batch_size=1, shuffle=False, verify=False)
    stream = loader.next_batch()[0].numpy()
    is_dot = np.array(["." in tok.decode([i]) for i in range(loader.vocab_size)])
    dist = np.full(n_tokens, -1)  # for each token of a repeated passage: distance to the previous statement
    source = np.zeros(n_tokens, dtype=np.int64)  # ... and where that statement starts in the stream
    prev = 0  # where the current document's previous statement starts (a document starts with one)
    for i in range(n_tokens):
        if stream[i] == tok.eos_id:
            prev = i + 1
        elif np.array_equal(stream[i:i + len(marker)], marker):
            j = i + len(marker)
            while j < n_tokens and not is_dot[stream[j]] and stream[j] != tok.eos_id:
                dist[j], source[j] = i - prev, prev
                j += 1
            prev = i
    target = np.arange(n_tokens).reshape(-1, seq_len)[:, 1:]  # stream index predicted at each position
    d = torch.from_numpy(dist[target])
    window_start = torch.arange(0, n_tokens, seq_len).unsqueeze(1)
    reachable = d >= 0
    inside = reachable & (torch.from_numpy(source[target]) >= window_start)
    return {f"previous < {L} back": inside & (d < L), f"previous >= {L} back (in window)": inside & (d >= L),
            "previous before window": reachable & ~inside}


def load_model(model_dir: Path, yarn: tuple[float, int] | None = None):
    """The saved model, optionally with RoPE switched to YaRN (factor, original length) at load time."""
    from nanoseek.model import DeepseekV3ForCausalLM
    from nanoseek.train.config import PretrainConfig
    from nanoseek.hf import load_weights

    tc = PretrainConfig(model=str(model_dir))
    if yarn:
        tc.yarn_factor, tc.yarn_original_len = yarn
    model = DeepseekV3ForCausalLM(tc.model_config())
    load_weights(model, model_dir)
    return model.eval()


# ---------------------------------------------------------------------------------- runs
def base_config(p: dict, data: Path, out_dir: Path, seed: int, **kw):
    from nanoseek.train.config import PretrainConfig

    L = p["L"]
    cfg = dict(model=p["model"], model_overrides=dict(p["overrides"]), data=str(data), out_dir=str(out_dir),
               seq_len=L, batch_size=p["batch_tokens"] // L, max_steps=p["steps"], lr=p["lr"],
               warmup_steps=p["warmup"], eval_every=max(1, p["steps"] // 8), eval_batches=4, save_every=0,
               sample_prompt="", tensorboard=False, seed=seed)
    cfg.update(kw)
    return PretrainConfig(**cfg)


def stage_config(p: dict, data: Path, out_dir: Path, seed: int, init: Path, seq_len: int, yarn: bool):
    kw = dict(model=str(init), model_overrides={}, init_from=str(init), seq_len=seq_len,
              batch_size=max(1, p["batch_tokens"] // seq_len), max_steps=p["ext_steps"], lr=p["ext_lr"],
              warmup_steps=p["ext_warmup"], eval_every=max(1, p["ext_steps"] // 4))
    if yarn:
        kw.update(yarn_factor=float(p["factor"]), yarn_original_len=p["L"])
    return base_config(p, data, out_dir, seed, **kw)


def cli_command(cfg) -> str:
    return " ".join(["nanoseek pretrain", *cfg.override_args()])


def run_corpus(corpus: str, p: dict, out: Path, seed: int, reuse: bool = False) -> dict:
    from nanoseek.train.pretrain import run_pretraining

    L, LL = p["L"], p["L"] * p["factor"]
    root = out / corpus
    t0 = time.time()
    data = prepare_data(root, corpus, p["docs"][corpus], p["vocab"], 0)  # --seed varies training only
    manifest = json.loads((data / "manifest.json").read_text())
    val_tokens = manifest["splits"]["val"]["num_tokens"]
    n_tokens = min(p["eval_tokens"], val_tokens) // LL * LL
    docs = manifest["splits"]["train"]
    print(f"[{corpus}] data: {docs['num_tokens']:,} train tokens in {docs['num_docs']:,} docs "
          f"({docs['num_tokens'] / docs['num_docs']:.0f} tokens/doc); eval on {n_tokens:,} val tokens", flush=True)

    classes = {sl: repeat_classes(data, sl, n_tokens, L) for sl in (L, LL)} if corpus == "long" else {}

    def ev(model) -> dict:
        r = {"L": eval_windows(model, data, L, n_tokens, L, p["batch_tokens"]),
             "4L": eval_windows(model, data, LL, n_tokens, L, p["batch_tokens"])}
        for key, sl in (("L", L), ("4L", LL)):
            ce = r[key].pop("ce")
            if classes.get(sl):
                r[key]["repeats"] = {name: [ce[m].mean().item() if m.any() else float("nan"), int(m.sum())]
                                     for name, m in classes[sl].items()}
        return r

    def train(cfg):
        """Run `cfg`, or with --reuse take its saved model."""
        model_dir = Path(cfg.out_dir) / "model"
        if reuse and (model_dir / "config.json").exists():
            print(f"[{corpus}]   reusing {model_dir}", flush=True)
            return load_model(model_dir)
        shutil.rmtree(cfg.out_dir, ignore_errors=True)  # metrics.jsonl appends: start each run clean
        return run_pretraining(cfg).model

    commands, rows = {}, {}
    cfg = base_config(p, data, root / "base", seed)
    commands["base"] = cli_command(cfg)
    print(f"[{corpus}] pretrain at L={L}: {commands['base']}", flush=True)
    train(cfg)
    base_dir = root / "base" / "model"
    rows["pretrained, plain RoPE"] = ev(load_model(base_dir))
    rows["pretrained + YaRN, no training (zero-shot)"] = ev(load_model(base_dir, (float(p["factor"]), L)))

    stages = {"yarn": ("YaRN stage at 4L", LL, True),
              "plain_4L": ("control: plain RoPE, trained at 4L", LL, False),
              "more_L": ("control: plain RoPE, trained more at L", L, False)}
    for name, (label, seq_len, yarn) in stages.items():
        cfg = stage_config(p, data, root / name, seed, base_dir, seq_len, yarn)
        commands[name] = cli_command(cfg)
        print(f"[{corpus}] {label}: {commands[name]}", flush=True)
        rows[label] = ev(train(cfg))
    for label, r in rows.items():
        print(f"[{corpus}]   {label:45s} val@L {r['L']['loss']:.4f}  val@4L {r['4L']['loss']:.4f}  by position "
              + " ".join(f"{b:.3f}" for b in r["4L"]["buckets"]), flush=True)
    return {"rows": rows, "commands": commands, "seconds": time.time() - t0, "eval_tokens": n_tokens,
            "train_tokens": docs["num_tokens"], "tokens_per_doc": docs["num_tokens"] / docs["num_docs"]}


def markdown(results: dict, p: dict) -> str:
    L, LL = p["L"], p["L"] * p["factor"]
    out = []
    for corpus, res in results.items():
        out += [f"### `{corpus}` corpus ({res['tokens_per_doc']:.0f} tokens/document, "
                f"{res['eval_tokens']:,} validation tokens)", "",
                f"| model | val loss @ L={L} | val loss @ 4L={LL} | 4L loss by window position: "
                + " / ".join(f"{i * L}-{(i + 1) * L - 1}" for i in range(p["factor"])) + " |",
                "|---|---|---|---|"]
        for label, r in res["rows"].items():
            out.append(f"| {label} | {r['L']['loss']:.4f} | {r['4L']['loss']:.4f} | "
                       + " / ".join(f"{b:.3f}" for b in r["4L"]["buckets"]) + " |")
        out.append("")
        first = next(iter(res["rows"].values()))
        if "repeats" in first["4L"]:
            names = list(first["4L"]["repeats"])
            out += ["Loss on the tokens of *repeated* passages, by where the previous statement of the passage is "
                    "(tokens counted in brackets):", "",
                    "| model | window | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
            for label, r in res["rows"].items():
                for key, sl in (("L", L), ("4L", LL)):
                    out.append(f"| {label} | {sl} | " + " | ".join(
                        f"{v:.3f} ({n})" if n else "-" for v, n in r[key]["repeats"].values()) + " |")
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/experiments/context")
    ap.add_argument("--quick", action="store_true", help="tiny model, a few steps (smoke test)")
    ap.add_argument("--corpus", default="short,long", help="short, long or short,long")
    ap.add_argument("--steps", type=int, help="pretraining steps at L")
    ap.add_argument("--ext-steps", type=int, help="steps of the YaRN stage (and of each control)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="skip runs whose model is already saved under OUT "
                    "(re-evaluate only)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ.setdefault("NANOSEEK_NO_PROGRESS", "1")
    p = dict(QUICK if args.quick else FULL)
    if args.steps:
        p["steps"] = args.steps
    if args.ext_steps:
        p["ext_steps"] = args.ext_steps
    out = Path(args.out)
    t0 = time.time()
    results = {c: run_corpus(c, p, out, args.seed, args.reuse) for c in args.corpus.split(",")}
    table = markdown(results, p)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.md", table)
    write_json(out / "results.json", {"params": p, "seed": args.seed, "results": results})
    print("\n" + table)
    print(f"total {time.time() - t0:.0f}s")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
