"""The OpenAI-compatible HTTP front: `create_app(model)` -> a FastAPI app over one `Engine`.

    GET  /v1/models            the served model
    POST /v1/completions       text or token-id prompts; with `suffix`, the completion is the middle
    POST /v1/chat/completions  messages rendered with the chat template
    POST /v1/revise            re-denoise the least certain tokens of a text; says which tokens changed
    GET  /health               liveness and load
    GET  /metrics              Prometheus text

Requests pick their decoding per call with extra body fields (mode, block_length, threshold, steps,
selection_policy, top_k, ignore_eos). The event loop only does I/O: validation, submission to the
engine (whose worker thread runs the model), and relaying the engine's events to the client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask

from ..decoding import GenerationError, GenerationParams
from ..decoding.params import MODES
from ..edit import revision_body
from ..engine import AUTO, Delta, Engine, EngineClosed, EngineConfig, Failed, Finished, QueueFull
from . import errors, prometheus
from .errors import APIError, from_validation_error, invalid
from .openai_format import Formatter, sse, usage
from .prompts import Limits, chat_prompt, check_request_size, completion_prompts, generation_params
from .schemas import ChatCompletionRequest, CompletionRequest, RevisionRequest


@dataclass
class ServerConfig:
    model_name: str = "tridlm"
    api_key: str | None = None  # None: no auth
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0  # a body not fully sent by then is refused (408): no stalled read holds a slot
    limits: Limits = field(default_factory=Limits)
    engine: EngineConfig = field(default_factory=EngineConfig)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


async def read_json(request: Request, limit: int, timeout: float = 30.0) -> dict:
    """The body as a JSON object of valid Unicode text, refusing bodies over `limit` bytes before reading
    them whole and bodies still arriving after `timeout` seconds."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit}")
    buf = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > limit:
                    raise APIError(413, f"request body exceeds the limit of {limit} bytes")
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s") from None
    try:
        data = json.loads(bytes(buf), parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, "malformed JSON body: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the JSON body must be an object, got {type(data).__name__}")
    try:  # JSON may spell lone UTF-16 surrogates ("\ud800"), which are no text any tokenizer can read
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the JSON body holds a lone UTF-16 surrogate (such as \\ud800), which is not text; "
                       "send valid Unicode") from None
    except RecursionError:
        raise APIError(400, "malformed JSON body: nested too deeply") from None
    return data


def parse(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


class _HTTPStatsMiddleware:
    """Counts every response by endpoint and status, timing streams until their last byte."""

    KNOWN = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/revise", "/health", "/metrics")

    def __init__(self, app, stats: prometheus.HTTPStats):
        self.app, self.stats = app, stats

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [499]  # no answer at all: the client left before one (not a server error)

        async def send_(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_)
        finally:
            path = scope.get("path", "")
            self.stats.record(path if path in self.KNOWN else "other", status[0], time.perf_counter() - t0)


async def _cancel_on_disconnect(request: Request, req) -> None:
    """Cancel `req` when the client goes away (the ASGI server reports it as http.disconnect)."""
    while not req.done:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            req.cancel()
            return


def create_app(model, tokenizer=None, config: ServerConfig | None = None, engine: Engine | None = None) -> FastAPI:
    """The app; it starts its engine's worker on startup and stops it on shutdown (unless one is passed in)."""
    config = config or ServerConfig()
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    owns_engine = engine is None
    engine = engine or Engine(model, tokenizer, config.engine, start=False)
    limits = config.limits
    if limits.default_mode not in (*MODES, AUTO):
        raise ValueError(f"default mode {limits.default_mode!r} is not one of {', '.join((*MODES, AUTO))}")
    started = time.time()
    server_metrics = prometheus.ServerMetrics(engine.stats, started)  # a registry of this app's own
    http_stats = server_metrics.http

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        if owns_engine:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="tridlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.config = config
    app.state.drain = engine.drain  # SIGTERM: `tridlm serve` ends every request with a 503 before exiting
    errors.install(app)
    app.add_middleware(errors.CatchAll)
    app.add_middleware(_HTTPStatsMiddleware, stats=http_stats)

    def check_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="missing_api_key")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {config.model_name!r}",
                           "model", code="model_not_found")

    def client_of(request: Request) -> str:
        """Who a request comes from, for the engine's fair shares: its connection."""
        c = request.client
        return f"{c.host}:{c.port}" if c else "unknown"

    def submit(request: Request, prompts: list[list[int]], params, n: int, kind: str = "generate", stream: bool = True,
               **row_options):
        try:
            return engine.submit(prompts, params, n=n, loop=asyncio.get_running_loop(), kind=kind,
                                 client=client_of(request), stream=stream, **row_options)
        except GenerationError as e:
            raise invalid(str(e)) from None
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineClosed as e:
            raise APIError(503, str(e)) from None

    async def run(request: Request, body, prompts, params, chat: bool, kind: str = "generate", **row_options):
        req = submit(request, prompts, params, body.n or 1, kind, bool(body.stream), **row_options)
        fmt = Formatter(chat, config.model_name, req.mode)
        lengths = [len(p) for p in prompts]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            async def cancel():  # also when the client left before the stream began
                req.cancel()

            return StreamingResponse(_stream(req, fmt, lengths, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(cancel))
        texts, reasons, metrics = await collect(request, req)
        return JSONResponse(fmt.response(texts, reasons, usage(lengths, metrics, req.mode, req.block_length)))

    async def collect(request: Request, req):
        """Wait for a request's rows to finish (cancelling it if the client leaves): texts, reasons, metrics."""
        watch = asyncio.create_task(_cancel_on_disconnect(request, req))
        try:
            texts, reasons, metrics = [""] * len(req.rows), [""] * len(req.rows), [None] * len(req.rows)
            async for ev in req.events():
                if isinstance(ev, Delta):
                    texts[ev.index] += ev.text
                elif isinstance(ev, Finished):
                    reasons[ev.index], metrics[ev.index] = ev.reason, ev.metrics
                    if ev.text is not None:  # a request that does not stream gets its text here, whole
                        texts[ev.index] = ev.text
                elif isinstance(ev, Failed):
                    if ev.reason == "cancelled":  # the client left: nobody reads this answer
                        raise APIError(499, "the client closed the request")
                    raise APIError(503 if ev.reason == "closed" else 500, ev.message)
        finally:
            watch.cancel()
            if not req.done:
                req.cancel()
        return texts, reasons, metrics

    async def _stream(req, fmt: Formatter, lengths: list[int], include_usage: bool):
        try:
            if fmt.chat:
                for i in range(len(req.rows)):
                    yield sse(fmt.chunk(i, role=True))
            metrics: list = [None] * len(req.rows)
            left = len(req.rows)
            async for ev in req.events():
                if isinstance(ev, Delta):
                    if ev.text:
                        yield sse(fmt.chunk(ev.index, ev.text))
                elif isinstance(ev, Finished):
                    metrics[ev.index], left = ev.metrics, left - 1
                    u = None
                    if left == 0 and not include_usage:  # no usage chunk was asked for: the last chunk has it
                        u = usage(lengths, metrics, req.mode, req.block_length)
                    yield sse(fmt.chunk(ev.index, reason=ev.reason, usage_=u))
                elif isinstance(ev, Failed):  # e.g. the server is shutting down: the stream says so, then ends
                    yield sse(errors.error_body(503 if ev.reason == "closed" else 500, ev.message))
                    break
            else:
                if include_usage:
                    yield sse(fmt.usage_chunk(usage(lengths, metrics, req.mode, req.block_length)))
            yield sse("[DONE]")
        finally:  # the client went away (the stream is cancelled) or we are done: free the rows
            if not req.done:
                req.cancel()

    @app.get("/health")
    async def health():
        s = engine.stats()
        failure = engine.failure
        body = {"status": "error" if failure else "ok", "model": config.model_name,
                "active_requests": s.active_requests, "running_rows": s.running_rows, "waiting_rows": s.waiting_rows}
        if failure:
            body["error"] = failure
        return JSONResponse(body, status_code=503 if failure else 200)

    @app.get("/metrics", dependencies=[Depends(check_api_key)])  # what runs and how much: not for anyone
    async def metrics():
        return PlainTextResponse(server_metrics.render(), media_type=prometheus.CONTENT_TYPE)

    @app.get("/openapi.json", dependencies=[Depends(check_api_key)], include_in_schema=False)
    async def openapi():
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=[Depends(check_api_key)], include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="tridlm")

    @app.get("/v1/models", dependencies=[Depends(check_api_key)])
    async def models():
        cfg = model.config
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": int(started), "owned_by": "tridlm",
            "max_model_len": cfg.max_position_embeddings, "modes": [*MODES, AUTO]}]}

    has_drafter = getattr(model, "draft_adapter", None) is not None  # as model.infill / model.revise decide

    @app.post("/v1/completions", dependencies=[Depends(check_api_key)])
    async def completions(request: Request):
        body = parse(CompletionRequest, await read_json(request, config.max_body_bytes, config.body_timeout_s))
        check_model(body.model)
        max_tokens = body.max_tokens or limits.default_max_tokens
        params = generation_params(body, limits, max_tokens)
        prompts = completion_prompts(body, tokenizer, model.config, limits)
        if body.suffix:
            if tokenizer is None:
                raise invalid("suffix needs a tokenizer; this server has none", "suffix")
            return await run(request, body, prompts, params, chat=False, kind="infill",
                             suffix_ids=tokenizer.encode(body.suffix), drafter=has_drafter)
        return await run(request, body, prompts, params, chat=False)

    @app.post("/v1/revise", dependencies=[Depends(check_api_key)])
    async def revise(request: Request):
        body = parse(RevisionRequest, await read_json(request, config.max_body_bytes, config.body_timeout_s))
        check_model(body.model)
        if tokenizer is None:
            raise invalid("revision needs a tokenizer; this server has none", "text")
        text_ids, prefix_ids, suffix_ids = (tokenizer.encode(t) if t else [] for t in (body.text, body.prefix,
                                                                                         body.suffix))
        total = len(prefix_ids) + len(text_ids) + len(suffix_ids)
        if total > model.config.max_position_embeddings:
            raise invalid(f"prefix + text + suffix hold {total} tokens, more than the model's context window of "
                          f"{model.config.max_position_embeddings}", "text")
        check_request_size([prefix_ids + text_ids + suffix_ids], 1, 1, limits, "text")
        per_round = len(text_ids) if body.budget is None else min(len(text_ids), int(body.budget * len(text_ids))
                                                                  if isinstance(body.budget, float) else body.budget)
        if body.rounds * per_round > limits.max_revise_tokens:
            raise invalid(f"rounds x tokens re-masked per round = {body.rounds} x {per_round}; at most "
                          f"{limits.max_revise_tokens}: lower rounds or budget", "rounds")
        params = GenerationParams(mode="diffusion", max_new_tokens=max(1, len(text_ids)), temperature=body.temperature,
                                  seed=body.seed)
        req = submit(request, [text_ids], params, 1, "revise", prefix_ids=prefix_ids, suffix_ids=suffix_ids,
                     rounds=body.rounds, remask_threshold=body.remask_threshold, budget=body.budget,
                     min_gain=body.min_gain, drafter=has_drafter)
        await collect(request, req)
        out = revision_body(req.rows[0], tokenizer)
        return JSONResponse({"id": f"rev-{int(time.time() * 1000)}", "model": config.model_name,
                             "created": int(time.time()), **out})

    @app.post("/v1/chat/completions", dependencies=[Depends(check_api_key)])
    async def chat_completions(request: Request):
        body = parse(ChatCompletionRequest, await read_json(request, config.max_body_bytes, config.body_timeout_s))
        check_model(body.model)
        prompt, stop_ids, extra_stop = chat_prompt(body, tokenizer, model.config)
        max_tokens = body.max_completion_tokens or body.max_tokens
        check_request_size([prompt], body.n or 1, max_tokens or limits.max_tokens_cap, limits, "messages")
        params = generation_params(body, limits, max_tokens, stop_ids, extra_stop)
        return await run(request, body, [prompt], params, chat=True)

    return app

