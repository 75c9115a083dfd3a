"""The engine loop: one thread owns the model and serves every request with continuous batching.

    submit() -> waiting queue (bounded) -> admitted between steps -> batched prefill of the newcomers
             -> one decode step for every running row -> a row leaves the batch the step it finishes

Each iteration: drop rows whose client went away (their cache blocks go back to the pool), admit
waiting requests while the batch and the cache have room, prefill the newcomers in one left-padded
forward (at most `max_prefill_tokens` padded tokens, which bounds the pass's transient memory and how
long running rows wait for it; a longer single request is prefilled alone), then advance every running row by one decode step (one trunk token, or with `speculative=True`
one MTP verification step of up to two tokens). A request with `n` choices (or several prompts) is one
row per choice.

Cache admission is conservative: a request is admitted only when the pool can hold every admitted
row's worst case (prompt + its token limit), so no row is ever preempted. Blocks are still taken as the
rows grow and returned when they finish, so the pool holds live tokens only; the promise just decides
how many requests run at once (docs/serving.md).

Faults: the forward and sampling of a step run as one unit over a set of rows. If it raises, the rows'
random generators are restored, nothing is committed to the cache, and the rows are retried in two
halves, down to single rows; a row that still fails fails its own request only. Emitting a request's
tokens (stop strings, the client's queue) is guarded per request. Nothing a request does ends the loop.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from nanoseek.inference.engine import next_token_logits
from nanoseek.inference.requests import Decode, PromptError, Tracker, pad_left
from nanoseek.inference.row_sampler import RowSampler
from nanoseek.inference.sampling import SamplingParams
from nanoseek.inference.speculative import Drafts, prefill as speculative_prefill, verify
from nanoseek.serve.paged_cache import BlockPool, PagedLatentCache

log = logging.getLogger("nanoseek.serve")


class QueueFull(Exception):
    """The waiting queue is at its bound; the client should retry later (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests (HTTP 503)."""


# ---------------------------------------------------------------------------------------------- messages
@dataclass
class TokenOut:
    """One generated token of choice `choice`. `top` holds the top-k (token id, logprob) pairs when the
    request asked for them; `finish_reason` is set on the choice's last token ("stop" or "length")."""
    choice: int
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestDone:
    """Every choice of the request has finished."""


@dataclass
class RequestFailed:
    message: str


Sink = Callable[[object], None]


class Request:
    """What a client asked for: one prompt per choice (token ids), shared sampling parameters, and a
    thread-safe `sink` that receives `TokenOut`, then `RequestDone` or `RequestFailed`.
    Choice i samples with seed + i when `params.seed` is an int."""

    _ids = itertools.count()

    def __init__(self, prompts: Sequence[Sequence[int]], params: SamplingParams, sink: Sink, top_logprobs: int = 0):
        self.id = next(self._ids)
        self.prompts = [list(p) for p in prompts]
        self.params, self.sink, self.top_logprobs = params, sink, top_logprobs
        self.cancelled = False
        self.failed = False
        self.tracker: Tracker | None = None
        self.rows: list[Row] = []
        self.blocks_promised = 0
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """Called from any thread (a client that went away); the loop frees the rows at its next step."""
        self.cancelled = True


@dataclass(eq=False)
class Row:
    """One choice being generated: one cache sequence."""
    request: Request
    index: int
    sid: int
    params: SamplingParams
    generator: torch.Generator | None
    pending: int | None = None  # the last emitted token, not yet in the cache
    draft: int | None = None  # speculative: the MTP draft for the token after `pending`
    q: torch.Tensor | None = None  # speculative sampling: the draft distribution
    finished: bool = False

    @property
    def prompt(self) -> list[int]:
        return self.request.prompts[self.index]


@dataclass
class StepOut:
    """What one step computed for its rows, applied only once the whole step succeeded."""
    tokens: list[list[int]]  # per row: the tokens it emits (1, or 2 after an accepted draft)
    logprobs: list[list[float]]
    top: list[list[list[tuple[int, float]] | None]]
    pending: list[int]
    drafts: list[int] | None = None
    q: list[torch.Tensor | None] | None = None


@dataclass
class Stats:
    steps: int = 0
    prefills: int = 0
    tokens: int = 0
    requests_done: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    busy_seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)  # running rows at each decode step (last 10k)


# ---------------------------------------------------------------------------------------------- the loop
class EngineLoop:
    def __init__(self, model, *, eos_token_id: int | Sequence[int] | None, decode: Decode, max_batch: int = 32,
                 queue: int = 64, cache_tokens: int | None = None, block_size: int = 16, speculative: bool = False,
                 max_prefill_tokens: int = 4096):
        if speculative and not len(model.mtp):
            raise ValueError("speculative decoding needs an MTP module (num_nextn_predict_layers >= 1)")
        self.model, self.eos, self.decode = model, eos_token_id, decode
        self.max_batch, self.queue_size, self.speculative = max_batch, queue, speculative
        self.max_prefill_tokens = max_prefill_tokens  # rows x longest prompt of one batched prefill
        self.context = model.config.max_position_embeddings
        tokens = cache_tokens if cache_tokens is not None else max_batch * self.context
        self.pool = BlockPool.for_model(model, tokens, block_size, extra_layers=1 if speculative else 0)
        self.cache = PagedLatentCache(self.pool)
        self.device = self.pool.kv.device
        self.stats = Stats()
        self._waiting: deque[Request] = deque()
        self._running: list[Row] = []
        self._promised = 0  # blocks promised to admitted requests (their worst case)
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sids = itertools.count()
        self.error: BaseException | None = None  # set if the loop itself died (it should not)

    # -- what the HTTP side calls (any thread) ----------------------------------------------------
    def blocks_needed(self, prompt_len: int, max_new_tokens: int) -> int:
        """Worst-case blocks of one row: the prompt, its tokens, and one speculative draft slot."""
        room = self.context - prompt_len
        return self.pool.blocks_for(prompt_len + min(max_new_tokens, room) + 1)

    def check(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> None:
        """PromptError (a client error) for a request this server can never run."""
        params.validate()
        vocab = self.model.config.vocab_size
        for p in prompts:
            if not p:
                raise PromptError("the prompt is empty")
            if len(p) >= self.context:
                raise PromptError(f"the prompt has {len(p)} tokens; this model's context is {self.context} tokens, "
                                  "which leaves no room to generate")
            if min(p) < 0 or max(p) >= vocab:
                raise PromptError(f"the prompt holds token ids outside the vocabulary [0, {vocab})")
        if len(prompts) > self.max_batch:
            raise PromptError(f"the request needs {len(prompts)} rows (prompts x n); this server runs at most "
                              f"{self.max_batch} at once (--max-batch)")
        need = sum(self.blocks_needed(len(p), params.max_new_tokens) for p in prompts)
        if need > self.pool.capacity_blocks:
            raise PromptError(f"the request needs {need * self.pool.block_size} cache tokens; this server's cache "
                              f"holds {self.pool.capacity_blocks * self.pool.block_size} (--cache-tokens)")

    def submit(self, request: Request) -> None:
        with self._cv:
            if self._stopping or self.error is not None:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self._cv.notify()

    def load(self) -> dict:
        with self._cv:
            return {"running_rows": len(self._running), "waiting_requests": len(self._waiting),
                    "cache_blocks_free": self.pool.free_blocks, "cache_blocks_total": self.pool.capacity_blocks,
                    "cache_block_tokens": self.pool.block_size, "cache_bytes": self.pool.nbytes(),
                    "cache_max_bytes": self.pool.max_nbytes()}

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current step, fail what is left ("shutting down") and end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self._waiting and not self._running:
                        self._cv.wait()
                    if self._stopping:
                        break
                try:
                    self._iteration()
                except Exception as e:  # a bug in the loop itself: fail the batch, keep serving
                    log.exception("engine step failed")
                    for request in {row.request for row in self._running}:
                        self._fail(request, f"internal error: {type(e).__name__}: {e}")
        with self._cv:
            left = list(self._waiting) + list({row.request: None for row in self._running})
            self._waiting.clear()
        for request in left:
            self._fail(request, "the server is shutting down")

    def _iteration(self) -> None:
        began = time.perf_counter()
        self._drop_cancelled()
        newcomers = self._admit()
        if newcomers:
            self._step(newcomers, self._prefill_step)
            self.stats.prefills += 1
        rows = [r for r in self._running if not r.finished and r.pending is not None]
        if rows:
            self._step(rows, self._decode_step)
            self.stats.steps += 1
            self.stats.batch_sizes.append(len(rows))
            del self.stats.batch_sizes[:-10_000]
        self.stats.busy_seconds += time.perf_counter() - began

    # -- admission and leaving ---------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
        for request in {row.request: None for row in self._running if row.request.cancelled}:
            self._release(request)
            self.stats.requests_cancelled += 1
        self.stats.requests_cancelled += len(gone)

    def _admit(self) -> list[Row]:
        rows: list[Row] = []
        longest = 0
        with self._cv:
            while self._waiting:
                request = self._waiting[0]
                need = sum(self.blocks_needed(len(p), request.params.max_new_tokens) for p in request.prompts)
                padded = (len(rows) + len(request.prompts)) * max(longest, *map(len, request.prompts))
                if (len(self._running) + len(rows) + len(request.prompts) > self.max_batch
                        or self._promised + need > self.pool.capacity_blocks
                        or rows and padded > self.max_prefill_tokens):
                    break  # first come, first served: later requests wait behind this one
                self._waiting.popleft()
                longest = max(longest, *map(len, request.prompts))
                try:
                    rows += self._start(request, need)
                except Exception as e:  # e.g. parameters the engine refuses
                    self._fail(request, f"{type(e).__name__}: {e}")
        return rows

    def _start(self, request: Request, blocks: int) -> list[Row]:
        params = request.params
        request.tracker = Tracker(self.model, request.prompts, params, self.eos, self.decode)
        seeds = params.row_seeds(len(request.prompts)) if params.seed is not None else [
            int.from_bytes(os.urandom(8), "little") >> 2 for _ in request.prompts]
        for i, _ in enumerate(request.prompts):
            generator = None if params.greedy else torch.Generator(device=self.device).manual_seed(seeds[i])
            request.rows.append(Row(request, i, next(self._sids), replace(params, seed=None), generator))
        request.blocks_promised = blocks
        self._promised += blocks
        for row in request.rows:
            self.cache.add(row.sid)
        self._running += request.rows
        return list(request.rows)

    def _release(self, request: Request) -> None:
        """Take a request's rows out of the batch and give their blocks back."""
        for row in request.rows:
            row.finished = True
            self.cache.release(row.sid)
        self._running = [r for r in self._running if r.request is not request]
        self._promised -= request.blocks_promised
        request.blocks_promised = 0

    def _fail(self, request: Request, message: str) -> None:
        if request.failed:
            return
        request.failed = True
        self._release(request)
        self.stats.requests_failed += 1
        try:
            request.sink(RequestFailed(message))
        except Exception:
            pass

    # -- one step over a set of rows, isolated per row on failure ---------------------------------
    def _step(self, rows: list[Row], compute: Callable[[list[Row]], StepOut]) -> None:
        for part, out in self._guarded(rows, compute):
            for request in {row.request: None for row in part}:
                try:
                    self._emit(request, part, out)
                except Exception as e:
                    log.exception("request %s failed while emitting", request.id)
                    self._fail(request, f"{type(e).__name__}: {e}")

    def _guarded(self, rows: list[Row], compute) -> list[tuple[list[Row], StepOut]]:
        rows = [r for r in rows if not r.finished]
        if not rows:
            return []
        states = [None if r.generator is None else r.generator.get_state() for r in rows]
        try:
            return [(rows, compute(rows))]
        except Exception as e:
            for r, s in zip(rows, states):
                if r.generator is not None:
                    r.generator.set_state(s)
            if len(rows) == 1:
                log.warning("request %s failed in the model step: %s: %s", rows[0].request.id, type(e).__name__, e)
                self._fail(rows[0].request, f"{type(e).__name__}: {e}")
                return []
            half = len(rows) // 2
            return self._guarded(rows[:half], compute) + self._guarded(rows[half:], compute)

    def _emit(self, request: Request, part: list[Row], out: StepOut) -> None:
        if request.failed or request.cancelled:
            return
        tracker = request.tracker
        for b, row in enumerate(part):
            if row.request is not request or row.finished:
                continue
            row.pending = out.pending[b]
            if out.drafts is not None:
                row.draft, row.q = out.drafts[b], out.q[b]
            for token, logprob, top in zip(out.tokens[b], out.logprobs[b], out.top[b]):
                event = tracker.push(row.index, token, logprob)
                self.stats.tokens += 1
                request.sink(TokenOut(row.index, token, logprob, top, event.finish_reason,
                                      tracker.rows[row.index].stop_reason))
                if event.finish_reason is not None:
                    row.finished = True
                    self.cache.release(row.sid)
                    break
        if all(r.finished for r in request.rows):
            self._release(request)
            self.stats.requests_done += 1
            request.sink(RequestDone())

    # -- the computations (pure until the cache commit at their end) ------------------------------
    def _sampler(self, rows: list[Row]) -> RowSampler:
        return RowSampler([r.params for r in rows], [r.generator for r in rows], self.device)

    def _top(self, rows: list[Row], sampler: RowSampler, logits: torch.Tensor) -> list[list | None]:
        k = max(r.request.top_logprobs for r in rows)
        if k == 0:
            return [None] * len(rows)
        values, ids = sampler.logprobs(logits).topk(min(k, logits.shape[-1]), dim=-1)
        values, ids = values.tolist(), ids.tolist()
        return [list(zip(ids[b], values[b]))[:r.request.top_logprobs] if r.request.top_logprobs else None
                for b, r in enumerate(rows)]

    def _prefill_step(self, rows: list[Row]) -> StepOut:
        for r in rows:
            self.cache.reserve(r.sid, len(r.prompt))
        view = self.cache.view([r.sid for r in rows])
        sampler = self._sampler(rows)
        if self.speculative:
            drafts, first, logprobs = speculative_prefill(self.model, [r.prompt for r in rows], view, sampler)
            view.commit()
            q = [None] * len(rows) if drafts.q is None else list(drafts.q.unbind(0))
            return StepOut([[t] for t in first], [[lp] for lp in logprobs], [[None] for _ in rows], first,
                           drafts.draft.tolist(), q)
        ids, valid = pad_left([r.prompt for r in rows], 0, self.device)
        logits = next_token_logits(self.model, ids, view, valid).float()
        tokens, logprobs = sampler(logits)
        top = self._top(rows, sampler, logits)
        view.commit()
        tokens = tokens.tolist()
        return StepOut([[t] for t in tokens], [[lp] for lp in logprobs.tolist()], [[t] for t in top], tokens)

    def _decode_step(self, rows: list[Row]) -> StepOut:
        n = 2 if self.speculative else 1
        for r in rows:
            self.cache.reserve(r.sid, self.cache.length(r.sid) + n)
        view = self.cache.view([r.sid for r in rows])
        sampler = self._sampler(rows)
        cur = torch.tensor([r.pending for r in rows], dtype=torch.long, device=self.device)
        if self.speculative:
            return self._verify_step(rows, view, sampler, cur)
        logits = next_token_logits(self.model, cur[:, None], view).float()
        tokens, logprobs = sampler(logits)
        top = self._top(rows, sampler, logits)
        view.commit()
        tokens = tokens.tolist()
        return StepOut([[t] for t in tokens], [[lp] for lp in logprobs.tolist()], [[t] for t in top], tokens)

    def _verify_step(self, rows: list[Row], view, sampler: RowSampler, cur: torch.Tensor) -> StepOut:
        draft = torch.tensor([r.draft for r in rows], dtype=torch.long, device=self.device)
        q = None
        if not sampler.params.greedy:  # greedy rows drafted in an all-greedy batch kept no q: one-hot
            V = self.model.config.vocab_size
            q = torch.stack([torch.nn.functional.one_hot(draft[b], V).float() if r.q is None else r.q
                             for b, r in enumerate(rows)])
        nxt, accepted, tokens, logprobs = verify(self.model, view, sampler, Drafts(cur, draft, q))
        view.commit()
        emitted = [pair if ok else pair[:1] for ok, pair in zip(accepted, tokens)]
        lps = [pair if ok else pair[:1] for ok, pair in zip(accepted, logprobs)]
        nq = [None] * len(rows) if nxt.q is None else list(nxt.q.unbind(0))
        return StepOut(emitted, lps, [[None] * len(e) for e in emitted], nxt.cur.tolist(), nxt.draft.tolist(), nq)
