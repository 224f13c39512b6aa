"""/openapi.json and /docs: a valid OpenAPI 3 document of the real request models, a Swagger UI
that loads nothing from the internet, and request schemas that reject what the server rejects."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import httpx
import jsonschema
import pytest
from engine_helpers import assert_all_blocks_free, small_engine
from openapi_spec_validator import validate
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from conveyor.server.app import ServerConfig, build_app

BODY_ROUTES = {"/v1/completions": "CompletionRequest",
               "/v1/chat/completions": "ChatCompletionRequest",
               "/tokenize": "TokenizeRequest", "/detokenize": "DetokenizeRequest"}
# A minimal body each route accepts (the server answers 200).
VALID = {"/v1/completions": {"prompt": "Hi", "max_tokens": 1},
         "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}],
                                  "max_tokens": 1},
         "/tokenize": {"prompt": "Hi"}, "/detokenize": {"tokens": [1, 2]}}
# Values of every JSON type; for each field the first its schema refuses is sent.
WRONG_VALUES = ({"__wrong__": [[1]]}, [[["nested"]]], "a string", 1.5, True, 7)


async def _with_app(app, scenario):
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            while (await client.get("/health")).status_code != 200:
                await asyncio.sleep(0.05)
            return await scenario(client)


def _serve(scenario, **config):
    return asyncio.run(_with_app(build_app(ServerConfig(**config), small_engine), scenario))


@pytest.fixture(scope="module")
def document():
    async def get(client):
        return (await client.get("/openapi.json")).json()
    return _serve(get, api_keys=("k",))


def _validator(document, model: str) -> jsonschema.Draft202012Validator:
    registry = Registry().with_resource("urn:doc", DRAFT202012.create_resource(document))
    schema = {"$ref": f"urn:doc#/components/schemas/{model}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_document_is_valid_openapi_3_with_the_five_routes_and_their_bodies(document):
    validate(document)
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path, model in BODY_ROUTES.items():
        body = paths[path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"}
        assert paths[path]["post"]["security"] == [{"bearer": []}]
        assert "400" in paths[path]["post"]["responses"]
    assert "get" in paths["/v1/models"] and "security" not in paths["/health"]["get"]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    completion = document["components"]["schemas"]["CompletionRequest"]
    assert completion["additionalProperties"] is False and completion["required"] == ["prompt"]
    assert document["components"]["schemas"]["StreamOptions"]["additionalProperties"] is False
    served = small_engine().model_path.rsplit("/", 1)[-1]
    assert {"type": "string", "enum": [served]} in completion["properties"]["model"]["anyOf"]


def test_document_declares_no_auth_without_api_keys():
    async def get(client):
        return (await client.get("/openapi.json")).json()
    doc = _serve(get)
    assert "securitySchemes" not in doc.get("components", {})
    assert all("security" not in op for ops in doc["paths"].values() for op in ops.values())


def _rejected_bodies(document, path: str, model: str) -> list[dict]:
    """The valid body with one change each: an unknown field, another model's name, every field
    with a value of a JSON type its schema does not allow, every required field missing."""
    valid, validator = VALID[path], _validator(document, model)
    schema = document["components"]["schemas"][model]
    bodies = [{**valid, "no_such_field": 1}, {**valid, "model": "no-such-model"}]
    for name in schema["properties"]:
        changed = ({**valid, name: value} for value in WRONG_VALUES)
        bodies.append(next(body for body in changed if not validator.is_valid(body)))
    bodies += [{k: v for k, v in valid.items() if k != name} for name in schema.get("required", ())]
    return bodies


def test_schemas_reject_what_the_server_rejects(document):
    cases = [(path, body) for path, model in BODY_ROUTES.items()
             for body in [VALID[path], *_rejected_bodies(document, path, model)]]

    async def send_all(client):
        headers = {"Authorization": "Bearer k"}
        return [await client.post(path, json=body, headers=headers) for path, body in cases]

    responses = _serve(send_all, api_keys=("k",))
    for (path, body), response in zip(cases, responses):
        schema_ok = _validator(document, BODY_ROUTES[path]).is_valid(body)
        assert schema_ok == (response.status_code == 200), (path, body, response.text)
        if not schema_ok:
            expected = 404 if body.get("model") == "no-such-model" else 400
            assert response.status_code == expected and response.json()["error"]["message"]
    assert_all_blocks_free(small_engine())


def test_docs_and_the_document_need_no_key_and_load_nothing_from_outside():
    async def scenario(client):
        page = await client.get("/docs")
        urls = re.findall(r'(?:src|href|url)[=:]\s*["\']([^"\']+)["\']', page.text)
        assets = {u: await client.get(u) for u in urls}
        licence = await client.get("/docs/assets/LICENSE")
        guarded = await client.get("/v1/models")
        return page, assets, licence, guarded

    page, assets, licence, guarded = _serve(scenario, api_keys=("k",))
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assert "http://" not in page.text and "https://" not in page.text
    assert {"/openapi.json", "/docs/assets/swagger-ui-bundle.js",
            "/docs/assets/swagger-ui.css"} <= set(assets)
    for url, response in assets.items():
        assert url.startswith("/") and response.status_code == 200 and response.content, url
    assert "Apache License" in licence.text
    assert guarded.status_code == 401


@pytest.mark.fuzz
def test_schemathesis_finds_no_5xx_and_leaves_the_pool_whole(tiny_llama_dir, tmp_path):
    # scripts/fuzz_api.sh checks /metrics (free == total blocks) and /health itself.
    env = dict(os.environ, FUZZ_MODEL=tiny_llama_dir, FUZZ_LOG_DIR=str(tmp_path),
               OMP_NUM_THREADS="1", PYTHON=sys.executable)
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "fuzz_api.sh")
    done = subprocess.run(["bash", script, "20"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fuzz_api: passed" in done.stdout and "KV blocks free 64/64" in done.stdout
