"""Request bodies of the OpenAI-compatible endpoints, with tridlm's decoding knobs as extra fields.

Unknown fields are rejected rather than ignored, so a misspelt knob (`step` for `steps`) fails loudly
instead of silently decoding with the default; types are strict (no "8" for 8, no true for 1), and
every knob's range is the one `GenerationParams` / `ReviseOptions` declare. Standard fields tridlm
does not implement are accepted only at their neutral value (`logprobs: null`, `presence_penalty: 0`, ...).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..decoding.params import AUTO, POLICIES, GenerationParams, declaration
from ..decoding.revise import ReviseOptions

Policy = Literal[POLICIES]  # type: ignore[valid-type]
# ranges and help as GenerationParams declares them
KNOBS = ("temperature", "top_p", "seed", "block_length", "threshold", "commit_threshold", "draft_threshold", "steps",
         "top_k")
REVISE_KNOBS = ("rounds", "remask_threshold", "budget", "min_gain")  # as ReviseOptions declares them


def _knob(name: str, of=GenerationParams, default=None):
    return Field(default=default, description=declaration(of, name)["help"])


def _check_declared(of, name: str, value):
    d = declaration(of, name)
    if value is not None and value != AUTO and not d["ok"](value):
        raise ValueError(f"{name} must {d['rule']}, got {value!r}")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = _knob("temperature")
    top_p: float | None = _knob("top_p")
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = _knob("seed")
    user: str | None = None
    # accepted only at their neutral values
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    # tridlm's knobs
    mode: str | None = None
    block_length: int | Literal["auto"] | None = _knob("block_length")
    threshold: float | None = _knob("threshold")
    commit_threshold: float | None = _knob("commit_threshold")
    draft_threshold: float | None = _knob("draft_threshold")
    steps: int | None = _knob("steps")
    selection_policy: Policy | None = None
    top_k: int | None = _knob("top_k")
    ignore_eos: bool | None = None

    @field_validator(*KNOBS)
    @classmethod
    def _in_range(cls, value, info):
        return _check_declared(GenerationParams, info.field_name, value)

    @model_validator(mode="after")
    def _neutral(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs is not supported")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop takes at most 4 sequences")
        return self


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None  # text after the completion: the completion becomes the middle between them

    @model_validator(mode="after")
    def _unsupported(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.best_of not in (None, 1, self.n or 1):
            raise ValueError("best_of is not supported")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # name, tool_call_id, ...: passed to the chat template
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    metadata: dict | None = None
    store: bool | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.tools:
            raise ValueError("tools are not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("response_format other than text is not supported")
        if self.top_logprobs:
            raise ValueError("top_logprobs is not supported")
        return self


class RevisionRequest(BaseModel):
    """POST /v1/revise: re-mask the tokens of `text` the model is least sure of and re-denoise them with
    `prefix` and `suffix` as context that is never changed."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    text: str = Field(min_length=1)
    prefix: str = ""
    suffix: str = ""
    rounds: int = _knob("rounds", ReviseOptions, 1)
    remask_threshold: float | None = _knob("remask_threshold", ReviseOptions)
    threshold: float | None = Field(default=None, description="the older name of remask_threshold")
    budget: int | float | None = _knob("budget", ReviseOptions)
    min_gain: float = _knob("min_gain", ReviseOptions, 1.0)
    temperature: float = _knob("temperature", default=0.0)
    seed: int | None = _knob("seed")
    user: str | None = None

    @field_validator(*REVISE_KNOBS)
    @classmethod
    def _in_range(cls, value, info):
        return _check_declared(ReviseOptions, info.field_name, value)

    @field_validator("temperature", "seed")
    @classmethod
    def _sampler_in_range(cls, value, info):
        return _check_declared(GenerationParams, info.field_name, value)

    @field_validator("threshold")
    @classmethod
    def _alias_in_range(cls, value):
        return _check_declared(ReviseOptions, "remask_threshold", value)

    @model_validator(mode="after")
    def _one_remask_threshold(self):
        if self.threshold is not None:
            if self.remask_threshold is not None and self.remask_threshold != self.threshold:
                raise ValueError("threshold is the older name of remask_threshold; give one")
            self.remask_threshold = self.threshold
        return self
