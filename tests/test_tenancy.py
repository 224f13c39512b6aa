"""A tenant is who its API key says: X-Tenant and priority only where the operator allows them,
quotas charged to the key's tenant (refunded when a request is refused), the prefix cache
isolated per tenant (and per ``cache_salt``), and start-up refusals of unsafe configurations.

The HTTP tests run the real app in-process (httpx ASGI transport) over the shared small engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

import httpx
import pytest
from engine_helpers import assert_all_blocks_free, prompt, small_engine

from conveyor.cli import main as cli_main
from conveyor.cli import serve
from conveyor.core.block_pool import BlockPool
from conveyor.core.kv_cache_manager import KVCacheManager
from conveyor.core.request import Request
from conveyor.errors import InvalidRequestError
from conveyor.sampling_params import SamplingParams
from conveyor.server.auth import ApiKey, KeyRing, load_api_key_file, parse_api_key
from conveyor.server import app as server_module
from conveyor.server.app import ServerConfig, build_app, server_config_from_args


@pytest.fixture(scope="module")
def engine():
    return small_engine()


@pytest.fixture
def seen(engine, monkeypatch):
    """(priority, tenant) of every request that reached the engine."""
    calls, original = [], engine.add_request

    def add_request(prompt_ids, params, **kw):
        calls.append((kw["priority"], kw["tenant"]))
        return original(prompt_ids, params, **kw)
    monkeypatch.setattr(engine, "add_request", add_request)
    return calls


def _serve(config: ServerConfig, engine, scenario):
    async def run():
        app = build_app(config, lambda: engine)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                while (await client.get("/health")).status_code != 200:
                    await asyncio.sleep(0.02)
                return await scenario(client)
    return asyncio.run(run())


def _as(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


def _short(seed: int, **fields) -> dict:
    return {"prompt": prompt(4, seed=seed), "max_tokens": 2, **fields}


# ---------------------------------------------------------------------------- identity over HTTP
def test_a_key_cannot_escape_its_concurrency_limit_with_fresh_x_tenant_names(engine, seen):
    async def scenario(client):
        # ka's first request runs until the client gives up on it (cancelled below: aborted)
        long = {"prompt": prompt(6, seed=1), "max_tokens": 370, "ignore_eos": True}
        first = asyncio.ensure_future(client.post("/v1/completions", json=long, headers=_as("ka")))
        while not engine.has_unfinished_requests():
            await asyncio.sleep(0.01)
        fresh = [await client.post("/v1/completions", json=_short(2 + i),
                                   headers=_as("ka", **{"X-Tenant": f"fresh{i}"})) for i in range(3)]
        other = await client.post("/v1/completions", json=_short(9),
                                  headers=_as("kb", **{"X-Tenant": "key0"}))
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        return fresh, other

    fresh, other = _serve(ServerConfig(api_keys=("ka", "kb"), tenant_max_concurrency=1),
                          engine, scenario)
    assert [r.status_code for r in fresh] == [429, 429, 429]
    assert {r.json()["error"]["code"] for r in fresh} == {"tenant_concurrency_limit"}
    assert other.status_code == 200
    assert seen == [(0, "key0"), (0, "key1")]       # kb's X-Tenant did not count either
    assert_all_blocks_free(engine)


def test_refused_requests_do_not_spend_any_tenants_token_budget(engine, seen):
    refused = {"prompt": [60000], "max_tokens": 190}          # outside the vocabulary: 400

    async def scenario(client):
        by_b = [await client.post("/v1/completions", json=refused,
                                  headers=_as("kb", **{"X-Tenant": "key0"})) for _ in range(2)]
        by_a = [await client.post("/v1/completions", json=refused, headers=_as("ka"))
                for _ in range(2)]
        ok = await client.post("/v1/completions", json=_short(11, max_tokens=20),
                               headers=_as("ka"))
        return by_b, by_a, ok

    config = ServerConfig(api_keys=("ka", "kb"), tenant_max_tokens_per_minute=200)
    by_b, by_a, ok = _serve(config, engine, scenario)
    assert [r.status_code for r in by_b + by_a] == [400] * 4
    assert ok.status_code == 200            # 4 + 20 tokens fit: nothing refused was charged
    assert_all_blocks_free(engine)


def test_priority_is_capped_per_key_with_a_400(engine, seen):
    async def scenario(client):
        post = lambda body, headers: client.post("/v1/completions", json=body, headers=headers)  # noqa: E731
        return [await post(_short(20, priority=-1), _as("ka")),
                await post(_short(21), _as("ka", **{"X-Priority": "-1"})),
                await post(_short(22, priority=3), _as("ka", **{"X-Tenant": "acme"})),
                await post(_short(23, priority=-5), _as("gw", **{"X-Tenant": "acme"})),
                await post(_short(24, priority=-6), _as("gw"))]

    config = ServerConfig(api_keys=(ApiKey("ka", "alpha"),
                                    parse_api_key("gw:tenant=gateway,trusted=1,min_priority=-5")))
    low, header, plain, gateway, too_low = _serve(config, engine, scenario)
    assert [r.status_code for r in (low, header, plain, gateway, too_low)] == [400, 400, 200, 200, 400]
    assert low.json()["error"]["param"] == "priority" and header.json()["error"]["param"] == "X-Priority"
    assert "-5" in too_low.json()["error"]["message"]
    assert seen == [(3, "alpha"), (-5, "acme")]     # a trusted gateway names the tenant
    assert_all_blocks_free(engine)


def test_without_keys_x_tenant_counts_and_the_default_class_is_the_cap(engine, seen):
    async def scenario(client):
        return [await client.post("/v1/completions", json=_short(30, priority=1),
                                  headers={"X-Tenant": "acme"}),
                await client.post("/v1/completions", json=_short(31)),
                await client.post("/v1/completions", json=_short(32, priority=-1))]

    tagged, plain, urgent = _serve(ServerConfig(), engine, scenario)
    assert (tagged.status_code, plain.status_code, urgent.status_code) == (200, 200, 400)
    assert seen == [(1, "acme"), (0, "default")]


# ---------------------------------------------------------------------------- prefix cache
def test_cached_tokens_only_reveal_the_callers_own_cache(engine):
    system = prompt(64, seed=40)                       # four full blocks

    def ask(client, key, last, **extra):
        return client.post("/v1/completions", headers=_as(key, **extra.pop("headers", {})),
                           json={"prompt": system + [last], "max_tokens": 1, **extra})

    async def scenario(client):
        await ask(client, "ka", 101)
        out = {"a_again": await ask(client, "ka", 102),
               "b_guess": await ask(client, "kb", 103),
               "c_as_a": await ask(client, "kc", 104, headers={"X-Tenant": "key0"}),
               "a_salted": await ask(client, "ka", 105, cache_salt="s1"),
               "a_salted_again": await ask(client, "ka", 106, cache_salt="s1")}
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        out["chat"] = await client.post("/v1/chat/completions", headers=_as("ka"),
                                        json={**chat, "cache_salt": "s2"})
        out["empty"] = await client.post("/v1/chat/completions", headers=_as("ka"),
                                         json={**chat, "cache_salt": ""})
        out["long"] = await ask(client, "ka", 107, cache_salt="x" * 10_000)
        return out

    out = _serve(ServerConfig(api_keys=("ka", "kb", "kc")), engine, scenario)
    cached = {k: r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
              for k, r in out.items() if r.status_code == 200 and k != "chat"}
    assert cached == {"a_again": 64, "b_guess": 0, "c_as_a": 0, "a_salted": 0, "a_salted_again": 64}
    assert out["chat"].status_code == 200
    for bad in ("empty", "long"):
        assert out[bad].status_code == 400 and out[bad].json()["error"]["param"] == "cache_salt"
    assert_all_blocks_free(engine)


def _req(rid: str, tenant: str = "", salt: str = "") -> Request:
    return Request(rid, list(range(12)), SamplingParams(max_tokens=4), 4, frozenset(), 1.0,
                   tenant=tenant, cache_salt=salt)


def _hits(kv: KVCacheManager, req: Request) -> int:
    blocks = kv.get_computed_blocks(req)
    kv.take_computed_blocks(req, blocks)
    kv.allocate_slots(req, req.num_tokens - req.num_computed_tokens)
    req.num_computed_tokens = req.num_tokens
    kv.cache_computed_blocks(req)
    return len(blocks)


@pytest.mark.parametrize("isolate", [True, False])
def test_the_tenant_and_the_salt_key_the_first_block(isolate):
    kv = KVCacheManager(BlockPool(32), 4, enable_prefix_caching=True, isolate_tenants=isolate)
    reqs = [_req("a1", "ab", "c"), _req("a2", "ab", "c"), _req("b", "a", "bc"), _req("c", "abc"),
            _req("d", "other", "c"), _req("e", "ab", "")]
    hits = [_hits(kv, r) for r in reqs]
    # Tenant-isolated: only a2 (same tenant, same salt) hits; a concatenation never collides.
    # Global scope: the tenant no longer counts, the salt still does (a2, d share "c"; e hits c).
    assert hits == ([0, 2, 0, 0, 0, 0] if isolate else [0, 2, 0, 0, 2, 2])
    for r in reqs:
        kv.free(r)
    kv.check_invariant()
    assert kv.pool.num_free_blocks == 32


# ---------------------------------------------------------------------------- operator config
def test_api_key_specs_and_files_name_tenants_and_rights(tmp_path):
    assert parse_api_key("sk-plain") == ApiKey("sk-plain")
    gw = parse_api_key("sk-gw:tenant=edge,trusted=true,min_priority=-10")
    assert (gw.key, gw.tenant, gw.trusted, gw.min_priority) == ("sk-gw", "edge", True, -10)
    assert "sk-gw" not in repr(gw)                               # never logged
    for bad in ("", "k:tenant=", "k:colour=red", "k:trusted=maybe", "k:min_priority=x", "k:tenant",
                "k:key=other", " k", "k:tenant=a\tb"):
        with pytest.raises(InvalidRequestError):
            parse_api_key(bad)
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"key": "sk-a", "tenant": "acme"},
                                         {"key": "sk-g", "trusted": True, "min_priority": -3}]}))
    path.chmod(0o600)
    assert load_api_key_file(str(path)) == [ApiKey("sk-a", "acme"), ApiKey("sk-g", None, True, -3)]
    ring = KeyRing((ApiKey("sk-a", "acme"), ApiKey("sk-b")))
    assert ring.authenticate("sk-b").tenant == "key1" and ring.authenticate("sk-a").tenant == "acme"
    assert ring.authenticate("sk-c") is None and ring.authenticate(None) is None
    for entries in ([{"key": ""}], [{"key": "a"}, {"key": "a"}], [{"key": "a", "admin": True}]):
        path.write_text(json.dumps({"keys": entries}))
        with pytest.raises(InvalidRequestError):
            server_config_from_args(_serve_args("--api-key-file", str(path)))


def _serve_args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *flags])


@pytest.mark.parametrize("flags", [["--api-key", ""], ["--api-key", "a", "--api-key", "a"],
                                   ["--tenant-max-concurrency", "0"],
                                   ["--tenant-max-tokens-per-minute", "-5"],
                                   ["--api-key-file", "/nonexistent/keys.json"]])
def test_unsafe_server_flags_are_refused_at_start_in_one_line(flags, capsys, monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("the server started with unsafe flags")
    monkeypatch.setattr(server_module, "build_app", started)
    assert cli_main(["serve", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_an_exposed_address_without_keys_logs_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="conveyor.serving"):
        server_config_from_args(_serve_args("--host", "127.0.0.1"))
        server_config_from_args(_serve_args("--host", "::1"))
        server_config_from_args(_serve_args("--host", "0.0.0.0", "--api-key", "k"))
        assert not caplog.records
        server_config_from_args(_serve_args("--host", "0.0.0.0"))
    (record,) = caplog.records
    assert "0.0.0.0" in record.getMessage() and "--api-key" in record.getMessage()
