"""Between the engine thread and the event loop: one HTTP request's engine request, the asyncio queue its
tokens arrive on, and noticing that the client went away.

The engine thread hands items over through a `Mailbox` (one loop wake-up per burst of tokens, not per
token); `Job.batches()` gives the handler what has arrived, and cancels the engine request when the
handler stops early: the client disconnected (polled every 0.25 s, before or during a stream) or the
stream was closed. The engine then frees the request's rows and cache blocks at its next step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from fastapi import Request

from nanoseek.inference.sampling import SamplingParams
from nanoseek.serve.engine_loop import (EngineLoop, QueueFull, Request as EngineRequest, RequestDone, RequestFailed,
                                        ShuttingDown)
from nanoseek.serve.protocol import APIError


class Disconnected:
    """Queue marker: the client went away."""


class Mailbox:
    """Hands items from the engine thread to asyncio queues on one event loop. The engine emits a token
    for every running row each step; waking the loop once per burst instead of once per token keeps the
    loop's share of the GIL, and its syscalls, small."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, object]] = []
        self._scheduled = False

    def post(self, queue: asyncio.Queue, item) -> None:  # any thread
        with self._lock:
            self._pending.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)  # RuntimeError once the loop is closed

    def _deliver(self) -> None:
        with self._lock:
            items, self._pending, self._scheduled = self._pending, [], False
        for queue, item in items:
            queue.put_nowait(item)


class Job:
    """One HTTP request's engine request and the queue its tokens arrive on."""

    def __init__(self, engine: EngineLoop, mailbox: Mailbox, http: Request, prompts: list[list[int]],
                 params: SamplingParams, top_logprobs: int):
        self.engine, self.http = engine, http
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request = EngineRequest(prompts, params, lambda item: mailbox.post(self.queue, item), top_logprobs)
        self.finished = False

    def submit(self) -> None:
        try:
            self.engine.submit(self.request)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry shortly", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), type="server_error", code="unavailable") from None

    async def batches(self) -> AsyncIterator[list[object]]:
        """The engine's messages for this request until it is done, in batches of what has arrived (a
        stream that fell behind catches up in one write); cancels the request if the consumer stops
        early (the client went away, or the stream was closed)."""
        watcher = asyncio.create_task(self._watch())
        try:
            while True:
                items = [await self.queue.get()]
                while not self.queue.empty():
                    items.append(self.queue.get_nowait())
                batch = []
                for item in items:
                    if isinstance(item, Disconnected):
                        return
                    batch.append(item)
                    if isinstance(item, (RequestDone, RequestFailed)):
                        self.finished = True
                        yield batch
                        return
                yield batch
        finally:
            watcher.cancel()
            if not self.finished:
                self.request.cancel()

    async def items(self) -> AsyncIterator[object]:
        async for batch in self.batches():
            for item in batch:
                yield item

    async def _watch(self) -> None:
        while not await self.http.is_disconnected():
            await asyncio.sleep(0.25)
        self.request.cancel()
        self.queue.put_nowait(Disconnected())
