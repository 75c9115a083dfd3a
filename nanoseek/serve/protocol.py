"""The OpenAI API as this server reads it: request bodies (pydantic) and the error JSON.

Request fields follow OpenAI's Chat Completions and (legacy) Completions APIs. Fields a client may send
that do not change generation (`user`, `metadata`, ...) are ignored. Fields that would change it but are
not implemented (`presence_penalty`, `frequency_penalty`, `logit_bias`, `tools`, a JSON
`response_format`, `echo`, `suffix`, `best_of`) are accepted only at their neutral value; anything else
is a 400 naming the field, never silently dropped. `top_k` and `min_p` are accepted as extensions (as
vLLM does).

Every error is `{"error": {"message", "type", "param", "code"}}` with the HTTP status of `APIError`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 16


class APIError(Exception):
    """An HTTP error in OpenAI's error format."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def checked_text(text: str, param: str) -> str:
    """`text` if it is valid Unicode; JSON can carry lone surrogates ("\\ud800"), which no tokenizer reads."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} is not valid Unicode (a lone surrogate at character {e.start})",
                       param=param) from None
    return text


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(Lenient):
    include_usage: bool = False


class ContentPart(Lenient):
    type: str
    text: str | None = None


class ChatMessage(Lenient):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class Sampling(Lenient):
    """The fields both endpoints share."""
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return [checked_text(s, "stop") for s in stops]

    def refuse_unsupported(self, extra: dict[str, Any] | None = None) -> None:
        """400 for a field set to a value this server would have to ignore."""
        neutral = {"presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {})}
        for name, values in {**neutral, **(extra or {})}.items():
            if getattr(self, name) not in values:
                raise APIError(400, f"{name} is not supported by this server", param=name)
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        self.refuse_unsupported({"tools": (None, []), "tool_choice": (None, "none")})
        if self.response_format not in (None, {"type": "text"}):
            raise APIError(400, "response_format other than text is not supported", param="response_format")
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        self.refuse_unsupported({"echo": (False,), "suffix": (None, "")})
        if self.best_of not in (None, self.n):
            raise APIError(400, "best_of other than n is not supported by this server", param="best_of")

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

