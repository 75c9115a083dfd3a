"""The HTTP side of `nanoseek serve`: OpenAI-compatible routes over one `EngineLoop`.

    POST /v1/chat/completions   the tokenizer's chat format; <think> part as `reasoning_content`
    POST /v1/completions        raw text prompts (or token ids)
    GET  /v1/models, /v1/models/{id}, /health

Handlers only translate: body -> token ids + `SamplingParams` -> `engine_loop.Request`, whose tokens
come back through an asyncio queue (the engine thread hands them over with `call_soon_threadsafe`) and go
out as one JSON response or as server-sent events in OpenAI's chunk format (a final chunk per choice
with `finish_reason`, an optional usage chunk, then `data: [DONE]`). A client that disconnects, before
or during its stream, cancels its request; the engine frees its rows and cache blocks at the next step.

Message text is untrusted: `Tokenizer.encode_chat` puts role, bos and eos ids in by structure and
encodes every content string with control tokens spelled as plain text, so typing `<|system|>` into a
user message cannot forge a system turn; a system (or `developer`) message is honoured only as that role.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.errors import UserError
from nanoseek.inference.cli import encode_prompt
from nanoseek.inference.sampling import SamplingParams
from nanoseek.serve.detokenize import ChatText, CompletionText, TokenNames
from nanoseek.serve.engine_loop import (EngineLoop, QueueFull, Request as EngineRequest, RequestDone, RequestFailed,
                                        ShuttingDown, TokenOut)
from nanoseek.serve.protocol import (APIError, ChatCompletionRequest, ChatMessage, CompletionRequest, Sampling,
                                     checked_text, error_body)

ROLE_OF = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SEED_RANGE = 2**63  # torch generators take 64-bit seeds; choice i uses seed + i


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


class Server:
    """What every route needs: the engine, the tokenizer and the served model's name."""

    def __init__(self, engine: EngineLoop, tokenizer: Tokenizer, model_name: str):
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.names = TokenNames(tokenizer)
        self.context = engine.context
        self.mailbox: Mailbox | None = None  # made on the server's event loop, at startup
        self.created = int(time.time())

    # -- request -> engine ---------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        turns = []
        for i, m in enumerate(messages):
            if m.role not in ROLE_OF:
                raise APIError(400, f"messages[{i}]: role {m.role!r} is not supported (system, developer, user, "
                               "assistant)", param=f"messages.{i}.role")
            if isinstance(m.content, list):
                if any(part.type != "text" or part.text is None for part in m.content):
                    raise APIError(400, f"messages[{i}]: only text content parts are supported",
                                   param=f"messages.{i}.content")
                content = "".join(part.text for part in m.content)
            elif m.content is None:
                if m.role != "assistant":
                    raise APIError(400, f"messages[{i}]: content is required", param=f"messages.{i}.content")
                content = ""
            else:
                content = m.content
            turns.append({"role": ROLE_OF[m.role], "content": checked_text(content, f"messages.{i}.content")})
        return self._encode(lambda: self.tok.encode_chat(turns, add_generation_prompt=True), "messages")

    def completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        out = []
        for p in prompt:
            if isinstance(p, str):
                checked_text(p, "prompt")
                out.append(self._encode(lambda: encode_prompt(self.tok, p, chat=False), "prompt"))
            else:
                out.append(list(p))
        return out

    def _encode(self, fn, param: str) -> list[int]:
        try:
            return fn()
        except UserError as e:
            raise APIError(400, str(e), param=param) from None
        except Exception as e:  # text the tokenizer cannot read (lone surrogates, ...)
            raise APIError(400, f"{param} cannot be encoded: {e}", param=param) from None

    def params(self, body: Sampling, prompts: list[list[int]], limit: int | None) -> SamplingParams:
        longest = max(len(p) for p in prompts)
        if longest >= self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                           f"{longest}, which leaves no room to generate", param="messages",
                           code="context_length_exceeded")
        if limit is not None and longest + limit > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                           f"requested {longest + limit} tokens ({longest} in the prompt, {limit} for the "
                           "completion). Please reduce the length of the prompt or of the completion.",
                           param="max_tokens", code="context_length_exceeded")
        params = SamplingParams(
            max_new_tokens=limit if limit is not None else self.context - longest,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, min_p=body.min_p or 0.0,
            stop_strings=tuple(body.stop_strings()), seed=None if body.seed is None else body.seed % SEED_RANGE)
        try:
            params.validate()
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return params

    def job(self, http: Request, body: Sampling, prompts: list[list[int]], limit: int | None, top: int) -> Job:
        self.check_model(body.model)
        params = self.params(body, prompts, limit)
        if top and self.engine.speculative:
            raise APIError(400, "top log-probabilities are not available with --speculative", param="top_logprobs")
        rows = [p for p in prompts for _ in range(body.n)]
        try:
            self.engine.check(rows, params)
        except UserError as e:
            raise APIError(400, str(e), param="n" if len(rows) > 1 else None) from None
        job = Job(self.engine, self.mailbox, http, rows, params, top)
        job.submit()
        return job

    # -- engine -> response ------------------------------------------------------------------------
    def usage(self, prompts: list[list[int]], completion: int, reasoning: int | None = None) -> dict:
        n_prompt = sum(len(p) for p in prompts)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": completion, "total_tokens": n_prompt + completion}
        if reasoning is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        return usage

    def chat_logprob(self, item: TokenOut) -> dict:
        def entry(token: int, logprob: float) -> dict:
            return {"token": self.names.text(token), "logprob": logprob, "bytes": list(self.names.bytes(token))}
        return {**entry(item.token_id, item.logprob),
                "top_logprobs": [entry(t, lp) for t, lp in (item.top or [])]}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def failure(message: str) -> APIError:
    return APIError(500, f"the request failed: {message}", type="server_error")


# ---------------------------------------------------------------------------------------------- chat
class ChatChoice:
    def __init__(self, server: Server, stops: list[str]):
        self.text = ChatText(server.tok, stops)
        self.reasoning, self.content = [], []
        self.logprobs: list[dict] = []
        self.tokens = 0
        self.finish_reason: str | None = None

    def push(self, item: TokenOut) -> tuple[str, str]:
        self.tokens += 1
        r, c = self.text.push(item.token_id)
        if item.finish_reason is not None:
            r2, c2 = self.text.finish()
            r, c = r + r2, c + c2
            self.finish_reason = item.finish_reason
        self.reasoning.append(r)
        self.content.append(c)
        return r, c


async def chat_completion(server: Server, http: Request, body: ChatCompletionRequest):
    body.check()
    server.check_model(body.model)
    prompt = server.chat_prompt(body.messages)
    top = (body.top_logprobs or 0) if body.logprobs else 0
    job = server.job(http, body, [prompt], body.token_limit, top)
    stops = body.stop_strings()
    choices = [ChatChoice(server, stops) for _ in range(body.n)]
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def usage() -> dict:
        return server.usage([prompt], sum(c.tokens for c in choices), sum(c.text.reasoning_tokens for c in choices))

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choice_list: list[dict], **extra) -> str:
            data = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name,
                    "choices": choice_list}
            if include_usage:
                data["usage"] = extra.get("usage")
            return sse(data)

        def render(item: TokenOut) -> list[str]:
            r, c = choices[item.choice].push(item)
            delta = {**({"reasoning_content": r} if r else {}), **({"content": c} if c else {})}
            logprobs = {"content": [server.chat_logprob(item)]} if body.logprobs else None
            out = []
            if delta or logprobs:
                out.append(chunk([{"index": item.choice, "delta": delta, "logprobs": logprobs, "finish_reason": None}]))
            if item.finish_reason is not None:
                out.append(chunk([{"index": item.choice, "delta": {}, "logprobs": None,
                                   "finish_reason": item.finish_reason}]))
            return out

        head = chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None} for i in range(body.n)])
        return streaming(events(job, render, head, lambda: chunk([], usage=usage()) if include_usage else ""))


    async for item in job.items():
        if isinstance(item, RequestFailed):
            raise failure(item.message)
        if isinstance(item, TokenOut):
            choices[item.choice].push(item)
            if body.logprobs:
                choices[item.choice].logprobs.append(server.chat_logprob(item))
    if not job.finished:
        return JSONResponse(error_body("client disconnected"), status_code=499)
    return {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(c.content),
                                                 "reasoning_content": "".join(c.reasoning) or None},
                         "logprobs": {"content": c.logprobs} if body.logprobs else None,
                         "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
            "usage": usage()}


# ---------------------------------------------------------------------------------------------- completions
class CompletionChoice:
    def __init__(self, server: Server, stops: list[str]):
        self.server, self.text = server, CompletionText(server.tok, stops)
        self.parts: list[str] = []
        self.tokens, self.token_logprobs, self.top, self.offsets = [], [], [], []
        self.finish_reason: str | None = None

    def push(self, item: TokenOut) -> str:
        self.offsets.append(self.text.length)
        delta = self.text.push(item.token_id)
        if item.finish_reason is not None:
            delta += self.text.finish()
            self.finish_reason = item.finish_reason
        self.parts.append(delta)
        names = self.server.names
        self.tokens.append(names.text(item.token_id))
        self.token_logprobs.append(item.logprob)
        self.top.append({names.text(t): lp for t, lp in (item.top or [])})
        return delta

    def logprobs(self, start: int = 0) -> dict:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top[start:], "text_offset": self.offsets[start:]}


async def completion(server: Server, http: Request, body: CompletionRequest):
    body.check()
    server.check_model(body.model)
    prompts = server.completion_prompts(body.prompt)
    job = server.job(http, body, prompts, body.token_limit, body.logprobs or 0)
    stops = body.stop_strings()
    choices = [CompletionChoice(server, stops) for _ in range(len(prompts) * body.n)]
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    want_logprobs = body.logprobs is not None

    def usage() -> dict:
        return server.usage(prompts, sum(len(c.tokens) for c in choices))

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choice_list: list[dict], **extra) -> str:
            data = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                    "choices": choice_list}
            if include_usage:
                data["usage"] = extra.get("usage")
            return sse(data)

        def render(item: TokenOut) -> list[str]:
            c = choices[item.choice]
            delta = c.push(item)
            out = []
            if delta or want_logprobs:
                out.append(chunk([{"index": item.choice, "text": delta,
                                   "logprobs": c.logprobs(len(c.tokens) - 1) if want_logprobs else None,
                                   "finish_reason": None}]))
            if item.finish_reason is not None:
                out.append(chunk([{"index": item.choice, "text": "", "logprobs": None,
                                   "finish_reason": item.finish_reason}]))
            return out

        return streaming(events(job, render, "", lambda: chunk([], usage=usage()) if include_usage else ""))

    async for item in job.items():
        if isinstance(item, RequestFailed):
            raise failure(item.message)
        if isinstance(item, TokenOut):
            choices[item.choice].push(item)
    if not job.finished:
        return JSONResponse(error_body("client disconnected"), status_code=499)
    return {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
            "choices": [{"index": i, "text": "".join(c.parts), "logprobs": c.logprobs() if want_logprobs else None,
                         "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
            "usage": usage()}


async def events(job: Job, render: Callable[[TokenOut], list[str]], head: str,
                 tail: Callable[[], str]) -> AsyncIterator[str]:
    """The server-sent events of one request: `head`, the chunks `render` makes of each token (what has
    arrived together is written together), `tail()` and `[DONE]`; a failure is one error event."""
    if head:
        yield head
    async for batch in job.batches():
        out = []
        for item in batch:
            if isinstance(item, RequestFailed):
                yield "".join(out) + sse(failure(item.message).body())
                return
            if isinstance(item, TokenOut):
                out += render(item)
        if out:
            yield "".join(out)
    yield tail() + sse("[DONE]")


def streaming(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------------------------------------- the app
def create_app(engine: EngineLoop, tokenizer: Tokenizer, model_name: str,
               cors_origins: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine thread and stops it on shutdown. `cors_origins`
    lets browser pages from those origins call the API directly (a chat UI served from elsewhere)."""
    server = Server(engine, tokenizer, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.mailbox = Mailbox(asyncio.get_running_loop())
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request body"}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{loc}: {first.get('msg')}" if loc else str(first.get("msg"))
        return JSONResponse(error_body(message, param=loc or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        body = {"status": "ok" if engine.alive else "stopped", "model": model_name, **engine.load()}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": server.created, "owned_by": "nanoseek",
                "context_length": server.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        return await chat_completion(server, request, body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await completion(server, request, body)

    return app
