"""``/v1/completions`` and ``/v1/chat/completions``: streaming (SSE) and non-streaming.

Owns the life of one HTTP generation: parse and check the body, tokenize the prompt on the
front-end tokenizer thread, hand it to the ``AsyncEngine``, and turn outputs into OpenAI bodies
or ``data: {...}`` events ending with ``data: [DONE]``. Invariants:

- Every check that can fail (auth, body, fields, model, prompt length, queue, grammar compile,
  the engine's own validation) runs before a response starts, so it gets its proper status code.
- Admission before expensive work: a full queue, a draining or dead engine and a prompt with
  more characters than the context could hold are refused before the prompt is tokenized;
  tokenization itself is bounded and ordered by ``TokenizerPool``.
- A client that leaves (mid-stream, before its first token, or while a non-streaming request
  runs) has its request aborted: the SSE generator is cancelled or closed and closes the stream;
  non-streaming requests watch for ``http.disconnect``.
- After a stream started, an error is reported as ``data: {"error": ...}`` followed by
  ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from conveyor.sampling_params import SamplingParams
from conveyor.server.admission import message_chars
from conveyor.server.api_docs import json_route
from conveyor.server.app_state import AppState, app_state, read_json, request_identity
from conveyor.engine.async_engine import RequestStream
from conveyor.server.http_errors import ApiError, error_event, to_api_error
from conveyor.engine.outputs import RequestOutput
from conveyor.server.protocol import ChatCompletionRequest, CompletionRequest, parse_body
from conveyor.server.responses import (ResponseMeta, delta_chunk, full_response,
                                        logprob_token_ids, role_chunk, sse, usage_chunk)
from conveyor.server.tool_calls import ChatTools, stream_chunks

_CLIENT_CLOSED = 499     # nginx's convention; nobody reads it, the client is gone


def add_openai_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/completions", create_completion, methods=["POST"],
                      **json_route(CompletionRequest, tenant_headers=True))
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"],
                      **json_route(ChatCompletionRequest, tenant_headers=True))


async def create_completion(request: Request) -> Response:
    state, req = await _parse(request, CompletionRequest)
    params = req.sampling_params(state.limits)
    prompt = req.single_prompt()
    state.require_engine().check_admission(params.n)    # refuse before tokenizing
    if isinstance(prompt, str):
        state.check_prompt_chars(len(prompt))
        prompt_ids = await state.run_tokenizer(state.tokenizer.encode, prompt, cost=len(prompt))
    else:
        prompt_ids = prompt
    return await _generate(state, request, req, params, prompt_ids, chat=False)


async def create_chat_completion(request: Request) -> Response:
    state, req = await _parse(request, ChatCompletionRequest)
    tools = ChatTools.from_request(req, state.config.tool_call_parser,
                                   state.tokenizer.chat_template)
    params = tools.sampling_params(req.sampling_params(state.limits))
    state.require_engine().check_admission(params.n)    # refuse before rendering and tokenizing
    num_chars = message_chars(req.messages)
    state.check_prompt_chars(num_chars)
    prompt_ids = await state.run_tokenizer(tools.render_prompt, state.tokenizer, req.messages,
                                           cost=num_chars)
    return await _generate(state, request, req, params, prompt_ids, chat=True, tools=tools)


async def _parse(request: Request, model: type) -> tuple[AppState, Any]:
    state = app_state(request)
    state.require_engine()
    req = parse_body(model, await read_json(request, state.config.max_body_bytes))
    state.check_model(req.model)
    return state, req


async def _generate(state: AppState, request: Request, req: Any, params: SamplingParams,
                    prompt_ids: list[int], chat: bool, tools: ChatTools | None = None) -> Response:
    if params.structured_outputs is not None:    # a bad or slow grammar is a 400, before any byte
        await state.require_engine().engine.structured.precompile(params)
    priority, tenant = request_identity(request, req.priority)
    prefix = "chatcmpl" if chat else "cmpl"
    meta = ResponseMeta(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), state.model_name, chat)
    max_new = params.max_tokens or max(0, state.max_model_len - len(prompt_ids))
    lease = state.tenant_limiter.acquire(tenant, len(prompt_ids) + max_new * params.n)
    try:
        stream = await state.require_engine().add_request(
            prompt_ids, params, request_id=meta.id, priority=priority, tenant=tenant,
            cache_salt=req.cache_salt or "")
    except BaseException:
        lease.refund()      # refused (engine validation, queue full, ...): nothing was spent
        raise
    if req.stream:          # the event generator releases the lease when it ends
        return _respond_stream(state, meta, stream, req.include_usage, lease, tools)
    try:
        return await _respond(state, request, meta, stream, tools)
    finally:
        lease.release()


def _respond_stream(state: AppState, meta: ResponseMeta, stream: RequestStream,
                    include_usage: bool, lease, tools: ChatTools | None) -> Response:
    events = _stream_events(state, meta, stream, include_usage, lease, tools)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _respond(state: AppState, request: Request, meta: ResponseMeta,
                   stream: RequestStream, tools: ChatTools | None) -> Response:
    out = await _final_output(stream, request)
    if out is None:
        return Response(status_code=_CLIENT_CLOSED)
    if out.error is not None:
        raise ApiError(500, out.error, code="engine_error")
    texts = await _texts_for(state, out)
    body = full_response(meta, out, texts)
    return JSONResponse(tools.rewrite_response(body) if tools is not None else body)


async def _texts_for(state: AppState, out: RequestOutput, delta: bool = False) -> dict[int, str]:
    ids: set[int] = set()
    for c in out.outputs:
        ids |= logprob_token_ids(c.delta_logprobs if delta else c.logprobs)
    return await state.token_texts(ids) if ids else {}


async def _final_output(stream: RequestStream, request: Request) -> RequestOutput | None:
    """The finished output, or None if the client disconnected first (the request is aborted)."""
    async def consume() -> RequestOutput:
        last = None
        async for out in stream:
            last = out
        return last

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
        stream.close()
    return consumer.result() if consumer.done() and not consumer.cancelled() else None


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (if the client leaves).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream_events(state: AppState, meta: ResponseMeta, stream: RequestStream,
                         include_usage: bool, lease,
                         tools: ChatTools | None = None) -> AsyncIterator[str]:
    """SSE events of one request. Cancellation (client gone) or an early close aborts it."""
    last, tool_stream = None, tools.stream() if tools is not None else None
    try:
        async for out in stream:
            if last is None and meta.chat:
                for c in out.outputs:
                    yield sse(role_chunk(meta, c.index, include_usage))
            last = out
            if out.error is not None:
                yield error_event(500, out.error, code="engine_error")
                break
            texts = await _texts_for(state, out, delta=True)
            for c in out.outputs:
                chunk = delta_chunk(meta, c, texts, include_usage)
                for part in stream_chunks(tool_stream, chunk, c):
                    yield sse(part)
        if include_usage and last is not None and last.error is None:
            yield sse(usage_chunk(meta, last))
    except Exception as exc:  # noqa: BLE001 - a started stream can only report errors in-band
        err = to_api_error(exc)
        yield error_event(err.status, err.message, err.code)
    finally:
        stream.close()
        lease.release()
    yield sse("[DONE]")
