"""The request bodies the server accepts (pydantic), in the OpenAI shape.

Both endpoints take the usual OpenAI fields plus an ``itscale`` object, which the
``openai`` client sends with ``extra_body={"itscale": {...}}``::

    {"method": "particle_filtering", "budget": 16, "params": {"temperature": 0.5}, "timeout": 30}

Supported OpenAI fields: ``model``, ``messages`` / ``prompt``, ``max_tokens`` (and
``max_completion_tokens``), ``temperature``, ``top_p``, ``n``, ``seed``, ``stream``,
``stream_options.include_usage``, ``user``. Fields that would change the answer in
ways a search method cannot honour (``logprobs``, ``tools``, ``stop``, a JSON
``response_format``, ``logit_bias``, penalties, ``echo``, ``suffix``, ``best_of``) are
rejected with a 400 naming them; any other unknown field is ignored and listed in
the response's ``itscale.warnings``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from .errors import ApiError, invalid

Number = StrictInt | StrictFloat


class ItscaleOptions(BaseModel):
    """The ``itscale`` field: which method, with which budget and parameters."""

    model_config = ConfigDict(extra="forbid")

    method: StrictStr | None = Field(None, description="a method name or alias (pf, bon, wbon, sc, beam, ...)")
    budget: StrictInt | None = Field(None, ge=1, description="the method's budget N (particles, samples)")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters")
    timeout: Number | None = Field(None, gt=0, description="seconds; at most the server's --request-timeout")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: StrictStr | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[ContentPart] | None = None


class _Request(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=128)
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    itscale: ItscaleOptions | None = None
    # accepted only with values that change nothing
    stop: StrictStr | list[StrictStr] | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: dict[str, Any] | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> ApiError | None:
        """A 400 for a field that asks for something this server cannot do."""
        if self.stop:
            return invalid("stop: stop sequences are not supported; the method ends solutions with the server's "
                           "step format (see `itscale serve --help`, --format)", "stop")
        if self.logprobs or self.top_logprobs:
            field = "logprobs" if self.logprobs else "top_logprobs"
            return invalid(f"{field}: log-probabilities are not supported: the answer is chosen among many "
                           "samples, so per-token log-probabilities of one sample would mislead", field)
        if self.logit_bias:
            return invalid("logit_bias: not supported", "logit_bias")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return invalid(f"{name}: not supported (only 0 or absent)", name)
        if self.response_format and self.response_format.get("type", "text") != "text":
            return invalid("response_format: only {'type': 'text'} is supported", "response_format")
        return None

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    def unsupported(self) -> ApiError | None:
        for name in ("tools", "functions"):
            if getattr(self, name):
                return invalid(f"{name}: tool and function calling are not supported", name)
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                return invalid(f"{name}: tool and function calling are not supported", name)
        return super().unsupported()

    def token_limit(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def problem(self) -> tuple[str, list[str]]:
        """The last user message's text (the problem), and warnings about the rest."""
        users = [i for i, m in enumerate(self.messages) if m.role == "user"]
        if not users:
            raise invalid("messages: no message with role 'user'; the last user message is the problem to solve",
                          "messages")
        i = users[-1]
        content = self.messages[i].content
        param = f"messages[{i}].content"
        if content is None:
            raise invalid(f"{param}: the user message has no content", param)
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise invalid(f"{param}[{j}]: only text content parts are supported, got type {part.type!r}",
                                  f"{param}[{j}]")
                parts.append(part.text)
            content = "".join(parts)
        if not content.strip():
            raise invalid(f"{param}: the problem text is empty", param)
        warnings = []
        others = len(self.messages) - 1
        if others:
            warnings.append(f"{others} other message(s) ignored: the last user message is the problem")
        return content, warnings


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    def unsupported(self) -> ApiError | None:
        if self.echo:
            return invalid("echo: not supported", "echo")
        if self.suffix:
            return invalid("suffix: not supported", "suffix")
        if self.best_of not in (None, 1):
            return invalid("best_of: use itscale.budget with method best_of_n (e.g. model 'NAME:bon-8')", "best_of")
        return super().unsupported()

    def token_limit(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"

    def problem(self) -> tuple[str, list[str]]:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                kind = "token ids" if prompt and not isinstance(prompt[0], str) else f"{len(prompt)} prompts"
                raise invalid(f"prompt: give one prompt as a string (got {kind}); send one request per prompt",
                              "prompt")
            prompt = prompt[0]
        if not prompt.strip():
            raise invalid("prompt: the problem text is empty", "prompt")
        return prompt, []
