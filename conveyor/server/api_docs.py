"""``/openapi.json`` and ``/docs``: the server's OpenAPI 3.1 document and an offline Swagger UI.

Owns how the routes' request bodies, headers and errors are described. The routes read their
bodies themselves (byte cap, strict JSON: ``app_state.read_json``) and validate them with the
strict pydantic models of ``protocol.py``, so FastAPI sees no body parameter; each route declares
its model with ``json_route(Model)`` instead, and the document's components are generated from
those same models. Invariants:

- a body's schema is the model the route validates with: ``extra="forbid"`` shows as
  ``additionalProperties: false``, required fields as ``required``, strict types as JSON types;
  ``model`` names the one model served (the document is built once it has loaded);
- ``PUBLIC_PATHS`` (``/health``, ``/openapi.json``, ``/docs`` and its assets) need no API key, as
  vLLM leaves everything outside ``/v1`` open: they are the same on every conveyor server and
  show no model, key or state. With keys configured the document declares bearer auth;
- Swagger UI's files come from the ``swagger-ui-py`` package (Swagger UI is Apache-2.0; its
  LICENSE ships beside them); the page loads nothing from the internet.
"""

from __future__ import annotations

import importlib.resources
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

import conveyor
from conveyor.server.protocol import (ChatCompletionRequest, CompletionRequest,
                                       DetokenizeRequest, TokenizeRequest)

OPENAPI_URL = "/openapi.json"
DOCS_URL = "/docs"
# Swagger UI's files: the URL path under /docs/assets/ -> the file in swagger_ui/static.
_ASSETS = {"swagger-ui-bundle.js": "swagger-ui-bundle.js", "swagger-ui.css": "swagger-ui.css",
           "favicon.png": "favicon-32x32.png", "LICENSE": "LICENSE"}
PUBLIC_PATHS = frozenset({"/health", OPENAPI_URL, DOCS_URL,
                          *(f"{DOCS_URL}/assets/{name}" for name in _ASSETS)})
REQUEST_MODELS: tuple[type[BaseModel], ...] = (CompletionRequest, ChatCompletionRequest,
                                               TokenizeRequest, DetokenizeRequest)
_BEARER = "bearer"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: OpenAI's error shape."""

    error: ErrorDetail


_ERRORS = {400: "invalid field, value or JSON (the message names the field)",
           401: "missing or wrong API key", 404: "unknown model name",
           413: "body over --max-body-bytes", 429: "queue full or tenant limit (Retry-After)",
           503: "loading, draining or engine dead"}
_TENANT_HEADERS = [
    {"name": "X-Tenant", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "tenant for limits and fair scheduling, where the operator allows it"},
    {"name": "X-Priority", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "an integer; lower is served first (the body's priority wins)"}]


def json_route(model: type[BaseModel], *, tenant_headers: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``add_api_route`` declaring ``model`` as the JSON body and the
    OpenAI-shaped error responses; the route still reads and validates the body itself."""
    if model not in REQUEST_MODELS:
        raise ValueError(f"{model.__name__} is not in REQUEST_MODELS")
    extra: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}
    if tenant_headers:
        extra["parameters"] = _TENANT_HEADERS
    return {"openapi_extra": extra, "responses": error_responses()}


def error_responses() -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": text}
            for status, text in _ERRORS.items()}


def add_api_docs(app: FastAPI, has_api_keys: bool, model_name: Callable[[], str]) -> None:
    """Serve ``/openapi.json`` and ``/docs`` with Swagger UI from local files. ``model_name()``
    is the served name, "" while loading. The app must be built with ``openapi_url=OPENAPI_URL,
    docs_url=None, redoc_url=None``."""
    app.openapi = _openapi_builder(app, has_api_keys, model_name)
    static = importlib.resources.files("swagger_ui") / "static"

    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + OPENAPI_URL, title="conveyor API",
            swagger_js_url=f"{root}{DOCS_URL}/assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_URL}/assets/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_URL}/assets/favicon.png")

    app.add_api_route(DOCS_URL, docs, methods=["GET"], include_in_schema=False)
    for name, filename in _ASSETS.items():
        app.add_api_route(f"{DOCS_URL}/assets/{name}", _file_route(str(static / filename)),
                          methods=["GET"], include_in_schema=False)


def _file_route(path: str) -> Callable[[], Any]:
    async def serve() -> FileResponse:
        return FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})
    return serve


def _openapi_builder(app: FastAPI, has_api_keys: bool,
                     model_name: Callable[[], str]) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = openapi_document(app, has_api_keys, model_name())
        if model_name():            # cached once complete; while loading it is rebuilt
            app.openapi_schema = doc
        return doc
    return build


def openapi_document(app: FastAPI, has_api_keys: bool, model_name: str = "") -> dict[str, Any]:
    """The document FastAPI generates from the routes, plus the request models' schemas (with
    ``model`` restricted to ``model_name`` when given) and, with API keys, bearer auth on every
    route outside ``PUBLIC_PATHS``."""
    doc = get_openapi(title="conveyor", version=conveyor.__version__, routes=app.routes,
                      description="OpenAI-compatible completions and chat completions, plus "
                                  "vLLM's /tokenize and /detokenize.")
    _, defs = models_json_schema([(m, "validation") for m in REQUEST_MODELS],
                                 ref_template="#/components/schemas/{model}")
    components = doc.setdefault("components", {})
    schemas = defs.get("$defs", {})
    if model_name:
        for model in REQUEST_MODELS:
            _restrict_model(schemas[model.__name__], model_name)
    components.setdefault("schemas", {}).update(schemas)
    if has_api_keys:
        components["securitySchemes"] = {_BEARER: {"type": "http", "scheme": "bearer"}}
        for path, operations in doc["paths"].items():
            if path not in PUBLIC_PATHS:
                for operation in operations.values():
                    operation["security"] = [{_BEARER: []}]
    return doc


def _restrict_model(schema: dict[str, Any], model_name: str) -> None:
    prop = schema["properties"].get("model")
    for option in (prop or {}).get("anyOf", [prop] if prop else []):
        if option.get("type") == "string":
            option["enum"] = [model_name]
