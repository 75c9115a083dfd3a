"""Byte-level BPE tokenizer with the special tokens the R1 recipe needs.

`nanoseek tokenizer train --input FILES... --vocab-size N --out DIR` trains one with the Hugging Face
`tokenizers` library and saves `tokenizer.json`, `tokenizer_config.json` (with a Jinja `chat_template`)
and `special_tokens_map.json`, so `transformers.AutoTokenizer.from_pretrained(DIR)` loads it too.

Design choices (why):
- Byte-level: every byte string is encodable, there is no unknown token, and `decode(encode(s)) == s`.
- Digits are split one per token before BPE, so numbers are spelled digit by digit. Small models learn
  arithmetic far more easily that way (DeepSeek-V3 itself groups up to three digits).
- Control tokens (`<|bos|>`, `<|eos|>`, `<|pad|>`, roles) are *special*: `decode(..., skip_special=True)`
  drops them. The reasoning tags (`<think>`, `</think>`, `<answer>`, `</answer>`) are atomic added tokens
  but *not* special, as in DeepSeek-R1's tokenizer, so decoded completions keep them and reward
  functions can parse them.
- Text is untrusted by default: `encode(text)` spells control tokens typed in the text (`<|eos|>`,
  `<|system|>`, ...) as plain characters, so a user cannot forge a turn boundary or a system message.
  Control ids enter a sequence only structurally (`encode_chat`, `add_bos`, the EOS `data prepare`
  appends) or through the explicit opt-in `encode(text, special=True)` for text the caller wrote itself.
  The reasoning tags are single tokens either way.
- `encode` never adds tokens on its own; `add_bos=True` prepends `<|bos|>`.

Chat format (the same in Python and in the Jinja template):

    <|bos|><|system|>SYSTEM<|eos|><|user|>QUESTION<|eos|><|assistant|>ANSWER<|eos|>

and, with `add_generation_prompt`, a trailing `<|assistant|>` for the model to continue. `encode_chat`
builds the same ids structurally; `apply_chat_template` renders the string (for display and for
`transformers`).

The CLI (`nanoseek tokenizer train|encode`) lives in `nanoseek.data.tokenizer_cli`.

Loading someone else's `tokenizer.json` works: special tokens it lacks are appended to its vocabulary
(with a warning) unless `add_missing=False`, which raises a `UserError` naming them instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

from nanoseek.data.readers import check_input_files, iter_documents
from nanoseek.errors import UserError, require, warn
from nanoseek.files import write_json, write_text

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"

#: Dropped by `decode(skip_special=True)`. The order fixes their ids: pad=0, bos=1, eos=2, ...
CONTROL_TOKENS = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT)
#: Atomic, but kept when decoding, so rewards can parse completions. The one home of these tags:
#: prompts, rewards and the tokenizer all take them from here.
REASONING_TOKENS = (THINK, END_THINK, ANSWER, END_ANSWER)
SPECIAL_TOKENS = CONTROL_TOKENS + REASONING_TOKENS
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

#: Smallest useful vocabulary: the 256 byte tokens plus the special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with the ids and chat format nanoseek relies on.

    It needs neither `transformers` nor Jinja at runtime: `apply_chat_template` is plain Python that
    produces exactly what the stored Jinja template produces.
    """

    def __init__(self, backend: tokenizers.Tokenizer):
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise UserError(f"tokenizer lacks special tokens {missing}; load it with load_tokenizer()")
        self.backend = _mark_reasoning_tokens_plain(backend)
        # the same tokenizer with special tokens spelled out as text, for untrusted input; a second
        # object (not a toggled flag) so one Tokenizer can be used from several threads
        self._text_backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
        self._text_backend.encode_special_tokens = True

    @classmethod
    def from_str(cls, tokenizer_json: str) -> Tokenizer:
        """From the text of a tokenizer.json (what `backend.to_str()` returns)."""
        return cls(tokenizers.Tokenizer.from_str(tokenizer_json))

    # ---- ids -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: the model's embedding needs at least this many rows."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.token_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.token_id(EOS)

    @property
    def pad_id(self) -> int:
        return self.token_id(PAD)

    def token_id(self, token: str) -> int:
        """Id of one token string (e.g. `"<think>"`); KeyError if it is not in the vocabulary."""
        i = self.backend.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def sha256(self) -> str:
        """Fingerprint of the full tokenizer definition; data manifests record it so a run can
        check it is not pairing token shards with a different tokenizer."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    # ---- text <-> ids ----------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, *, special: bool = False) -> list[int]:
        """Token ids of `text`. Control tokens written in the text (`<|eos|>`, `<|system|>`, ...) are
        encoded as the plain characters they consist of, unless `special=True`: only for text the
        caller produced itself (a rendered chat template), never for text from users, files or
        requests. `<think>`, `</think>`, `<answer>`, `</answer>` are single tokens either way."""
        backend = self.backend if special else self._text_backend
        ids = backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, *,
                     special: bool = False) -> list[list[int]]:
        """`encode` for many texts at once; the Rust side runs them in parallel."""
        backend = self.backend if special else self._text_backend
        encs = backend.encode_batch(list(texts), add_special_tokens=False)
        head = [self.bos_id] if add_bos else []
        return [head + e.ids for e in encs]

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """The ids of the chat format (module docstring), built structurally: bos, role and eos ids are
        inserted by position and every message's content is encoded as text (`special=False`), so a
        message cannot contain a turn boundary. For contents without control-token strings this
        equals `encode(apply_chat_template(messages, ...), special=True)`."""
        ids = [self.bos_id]
        for role, content in _checked_messages(messages):
            ids += [self.token_id(ROLE_TOKENS[role]), *self.encode(content), self.eos_id]
        if add_generation_prompt:
            ids.append(self.token_id(ASSISTANT))
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Accepts lists, numpy arrays and tensors. `skip_special` drops control tokens but keeps
        `<think>`/`<answer>` tags."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render `[{"role": ..., "content": ...}, ...]` exactly as `CHAT_TEMPLATE` does."""
        parts = [BOS]
        for role, content in _checked_messages(messages):
            parts.append(ROLE_TOKENS[role] + content + EOS)
        if add_generation_prompt:
            parts.append(ASSISTANT)
        return "".join(parts)

    # ---- files -----------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise UserError(f"{out} is a file; the tokenizer is saved into a directory")
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "tokenizer.json", self.backend.to_str(pretty=True))
        write_json(out / "tokenizer_config.json", self._hf_config())
        write_json(out / "special_tokens_map.json", _special_tokens_map())
        return out

    def _hf_config(self) -> dict:
        added = {
            str(self.token_id(t)): {
                "content": t, "special": t in CONTROL_TOKENS, "lstrip": False, "rstrip": False,
                "normalized": False, "single_word": False,
            }
            for t in SPECIAL_TOKENS
        }
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **_special_tokens_map(),
            "added_tokens_decoder": added,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def _special_tokens_map() -> dict:
    return {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT],
    }


def _checked_messages(messages: Sequence[dict]) -> Iterable[tuple[str, str]]:
    """(role, content) of each message; UserError naming the message for a bad role or content."""
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise UserError(f"message {i}: unknown chat role {role!r} (expected one of {ROLES})")
        if not isinstance(content, str):
            raise UserError(f"message {i}: content must be a string, got {type(content).__name__}")
        yield role, content


# ---- building and loading ------------------------------------------------------------------------
def _empty_bpe() -> tokenizers.Tokenizer:
    """Untrained byte-level BPE pipeline: digits isolated, then GPT-2 style byte-level splitting."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _mark_reasoning_tokens_plain(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """The trainer registers every token it is given as special (and so may a foreign tokenizer);
    flip the reasoning tags back to non-special so `decode(skip_special=True)` keeps them and
    `encode(special=False)` still reads them as single tokens."""
    if not any(t.special and t.content in REASONING_TOKENS
               for t in tok.get_added_tokens_decoder().values()):
        return tok
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        if added["content"] in REASONING_TOKENS:
            added["special"] = False
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def _add_missing_tokens(tok: tokenizers.Tokenizer, source: str, add_missing: bool) -> tokenizers.Tokenizer:
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if not missing:
        return tok
    if not add_missing:
        raise UserError(f"{source}: tokenizer lacks the special tokens {missing}")
    warn(f"{source}: appending missing special tokens {missing} to the vocabulary")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing
                            if t in CONTROL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing
                    if t in REASONING_TOKENS])
    return tok


def load_tokenizer(path: str | Path, add_missing: bool = True) -> Tokenizer:
    """Load a tokenizer from a directory holding `tokenizer.json`, or from the JSON file itself.

    A foreign tokenizer that lacks some of nanoseek's special tokens gets them appended (new ids after
    its vocabulary); pass `add_missing=False` to get a `UserError` instead.
    """
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not p.exists():
        raise UserError(f"no tokenizer at {path} (expected a directory with tokenizer.json, or the file)")
    if not file.is_file():
        raise UserError(f"{path} exists but holds no tokenizer.json (expected a tokenizer directory "
                        "or the tokenizer.json file itself)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise UserError(f"{file}: not a valid tokenizer.json ({e})") from None
    return Tokenizer(_add_missing_tokens(backend, str(file), add_missing))


def train_tokenizer(
    files: Sequence[str | Path],
    vocab_size: int,
    out_dir: str | Path | None,
    text_field: str = "text",
    text_docs: str = "paragraph",
    progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE on text / jsonl / parquet files and save it to `out_dir` (if given).

    Input handling (formats, bad-file errors) is shared with `nanoseek data prepare`; see
    `nanoseek.data.readers.iter_documents`. On a small corpus BPE may run out of merges before
    reaching `vocab_size`, so the result can be smaller; `Tokenizer.vocab_size` is the real size.
    """
    require(isinstance(vocab_size, int) and vocab_size >= MIN_VOCAB_SIZE, "--vocab-size", vocab_size,
            f"at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"--out {out_dir} is a file; the tokenizer is saved into a directory")
    paths = check_input_files(files)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    backend = _empty_bpe()
    docs = iter_documents(paths, text_field=text_field, text_docs=text_docs)
    backend.train_from_iterator(_batched(docs, 1000), trainer=trainer)
    tok = Tokenizer(backend)  # flips the reasoning tags the trainer made special back to plain
    if out_dir is not None:
        tok.save(out_dir)
    return tok


def _batched(items: Iterable[str], n: int) -> Iterable[list[str]]:
    """`train_from_iterator` is faster fed lists of texts than single texts."""
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
