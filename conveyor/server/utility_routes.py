"""``/health``, ``/metrics``, ``/v1/models``, ``/tokenize`` and ``/detokenize`` (vLLM shapes).

``/health`` needs no API key (nor do ``/openapi.json`` and ``/docs``, see ``api_docs``):
200 ``{"status": "ok"}`` when the engine runs, 503 with the reason while loading, after a load
failure, while draining, once the engine died, or while the watchdog finds it stalled.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from conveyor.errors import InvalidRequestError
from conveyor.server.admission import message_chars
from conveyor.server.api_docs import error_responses, json_route
from conveyor.server.app_state import app_state, read_json
from conveyor.server.protocol import DetokenizeRequest, TokenizeRequest, parse_body


def add_utility_routes(app: FastAPI) -> None:
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"], responses=error_responses())
    app.add_api_route("/tokenize", tokenize, methods=["POST"], **json_route(TokenizeRequest))
    app.add_api_route("/detokenize", detokenize, methods=["POST"], **json_route(DetokenizeRequest))


async def health(request: Request) -> JSONResponse:
    state = app_state(request)
    if state.engine is None:
        status = "failed" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
    if state.engine.is_dead:
        return JSONResponse({"status": "dead", "error": state.engine.error}, status_code=503)
    if state.engine.is_stalled:         # the watchdog: work pending, no step for its timeout
        return JSONResponse({"status": "stalled", "error": state.engine.stall_message()},
                            status_code=503)
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    return Response(app_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def list_models(request: Request) -> JSONResponse:
    state = app_state(request)
    state.require_engine()
    card = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "conveyor",
            "root": state.model_name, "parent": None, "max_model_len": state.max_model_len}
    return JSONResponse({"object": "list", "data": [card]})


async def tokenize(request: Request) -> JSONResponse:
    state = app_state(request)
    state.require_engine()
    req = parse_body(TokenizeRequest, await read_json(request, state.config.max_body_bytes))
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequestError("give exactly one of prompt and messages", "prompt")
    tok = state.tokenizer

    def run() -> tuple[list[int], list[str] | None]:
        if req.messages is not None:
            ids = tok.encode_chat(req.messages, add_generation_prompt=req.add_generation_prompt,
                                  add_special_tokens=bool(req.add_special_tokens))
        else:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = tok.encode(req.prompt, add_special_tokens=add)
        return ids, tok.convert_ids_to_tokens(ids) if req.return_token_strs else None

    cost = len(req.prompt) if req.messages is None else message_chars(req.messages)
    ids, strs = await state.run_tokenizer(run, cost=cost)
    return JSONResponse({"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids,
                         "token_strs": strs})


async def detokenize(request: Request) -> JSONResponse:
    state = app_state(request)
    state.require_engine()
    req = parse_body(DetokenizeRequest, await read_json(request, state.config.max_body_bytes))
    state.check_model(req.model)
    vocab = state.tokenizer.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})",
                                  "tokens")
    text = await state.run_tokenizer(state.tokenizer.decode, req.tokens, cost=4 * len(req.tokens))
    return JSONResponse({"prompt": text})
