"""What the routes do: a request body -> token ids and `SamplingParams` -> an engine job, and the job's
tokens -> OpenAI's response JSON or server-sent events in OpenAI's chunk format (a final chunk per choice
with `finish_reason`, an optional usage chunk, then `data: [DONE]`).

Message text is untrusted: `Tokenizer.encode_chat` puts role, bos and eos ids in by structure and
encodes every content string with control tokens spelled as plain text, so typing `<|system|>` into a
user message cannot forge a system turn; a system (or `developer`) message is honoured only as that role.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.errors import UserError
from nanoseek.inference.cli import encode_prompt
from nanoseek.inference.sampling import SamplingParams
from nanoseek.serve.bridge import Job, Mailbox
from nanoseek.serve.detokenize import ChatText, CompletionText, TokenNames
from nanoseek.serve.engine_loop import EngineLoop, RequestFailed, TokenOut
from nanoseek.serve.protocol import (APIError, ChatCompletionRequest, ChatMessage, CompletionRequest, Sampling,
                                     checked_text, error_body)

ROLE_OF = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SEED_RANGE = 2**63  # torch generators take 64-bit seeds; choice i uses seed + i


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


def chunk_writer(rid: str, obj: str, created: int, model: str, include_usage: bool) -> Callable[..., str]:
    """`chunk(choices, usage=None)` -> one SSE event of a streamed response in OpenAI's chunk format (with
    `stream_options.include_usage`, every chunk carries `usage`: null until the final one)."""

    def chunk(choice_list: list[dict], usage: dict | None = None) -> str:
        data = {"id": rid, "object": obj, "created": created, "model": model, "choices": choice_list}
        if include_usage:
            data["usage"] = usage
        return sse(data)

    return chunk


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
        chunk = chunk_writer(rid, "chat.completion.chunk", created, server.model_name, include_usage)

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
        chunk = chunk_writer(rid, "text_completion", created, server.model_name, include_usage)

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
