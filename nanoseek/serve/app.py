"""The HTTP side of `nanoseek serve`: OpenAI-compatible routes over one `EngineLoop`.

    POST /v1/chat/completions   the tokenizer's chat format; <think> part as `reasoning_content`
    POST /v1/completions        raw text prompts (or token ids)
    GET  /v1/models, /v1/models/{id}, /health

Routes only dispatch (to nanoseek.serve.handlers); this module wires the app: the engine's lifetime
(started with the app, stopped at shutdown), CORS, and the handlers that turn every error, including
FastAPI's own (malformed body, unknown route, wrong method), into OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.serve.bridge import Mailbox
from nanoseek.serve.engine_loop import EngineLoop
from nanoseek.serve.handlers import Server, chat_completion, completion
from nanoseek.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body


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
