"""Request routing for engine replicas: the pure policies (``conveyor.ray.routing``) on fake
replicas, the Ray glue (``conveyor.ray.router``) on fake ``RunningReplica``s, and one Serve app
on a real local Ray whose replicas answer with their own id."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.errors import ConfigError
from conveyor.ray.forward import ForwardedRequest
from conveyor.ray.routing import (PrefixIndex, PrefixPolicy, PrefixRoutingConfig, RoundRobin,
                                  RouteReason, chunk_hashes, request_text)

SYSTEMS = [f"You are assistant number {i}. " + f"Rule {i}: be brief and exact. " * 40
           for i in range(4)]


def chat(system: str, question: str, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "system", "content": system},
                                       {"role": "user", "content": question}], **extra}


def policy(**kwargs) -> PrefixPolicy:
    return PrefixPolicy(PrefixRoutingConfig(**kwargs))


# -- the text and its hashes ----------------------------------------------------------------

def test_request_text_renders_chat_completion_and_nothing_else():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    text = request_text(chat("SYS", "Q?", tools=tools))
    assert text.index("SYS") < text.index('"name": "f"') < text.index("Q?")
    parts = request_text({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert "ab" in parts and parts.startswith("user")
    assert request_text({"prompt": "hello"}) == "hello"
    assert request_text({"prompt": ["first", "second"]}) == "first"
    assert request_text({"prompt": [5, 6]}) == "5,6,"
    assert request_text({"model": "m"}) is None
    assert request_text(None) is None
    # roles are part of the text: the same words as user and as system are different prompts
    assert request_text({"messages": [{"role": "user", "content": "x"}]}) != \
        request_text({"messages": [{"role": "system", "content": "x"}]})


def test_chunk_hashes_are_chained_over_full_chunks():
    a, b = chunk_hashes("x" * 10 + "AAAA", 4), chunk_hashes("x" * 10 + "BBBB", 4)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]   # "xxAA" vs "xxBB"
    assert chunk_hashes("abc", 4) == []                       # no full chunk, nothing cached
    # the same chunk text at another depth is another hash (it stands for the whole prefix)
    h = chunk_hashes("abcdabcd", 4)
    assert h[0] != h[1]


def test_cache_salt_and_credential_scope_the_hashes_like_the_engine_cache():
    p = policy()
    base = p.hashes(chat(SYSTEMS[0], "q"), "Bearer k1")
    same_key = p.hashes(chat(SYSTEMS[0], "other q"), "Bearer k1")
    assert len(base) > 10 and same_key[:len(base) - 1] == base[:-1]
    assert p.hashes(chat(SYSTEMS[0], "q"), "Bearer k2")[0] != base[0]
    assert p.hashes(chat(SYSTEMS[0], "q", cache_salt="s"), "Bearer k1")[0] != base[0]
    shared = policy(per_credential=False)
    assert shared.hashes(chat(SYSTEMS[0], "q"), "Bearer k1") == \
        shared.hashes(chat(SYSTEMS[0], "q"), "Bearer k2")


# -- the policy -----------------------------------------------------------------------------

def test_prefix_routes_to_the_replica_holding_the_prompt_despite_small_extra_load():
    p = policy(imbalance_threshold=4)
    p.record("r1", p.hashes(chat(SYSTEMS[0], "first")))
    p.record("r2", p.hashes(chat(SYSTEMS[1], "first")))
    for system, home in ((SYSTEMS[0], "r1"), (SYSTEMS[1], "r2")):
        loads = {"r1": 3, "r2": 3}
        loads[home] += 4                                 # at the threshold: still its home
        decision = p.choose(p.hashes(chat(system, "another question")), loads)
        assert decision.ranked[0] == home and decision.reason is RouteReason.PREFIX
        assert decision.matched_chunks >= len(system) // 64
        assert sorted(decision.ranked) == ["r1", "r2"]


def test_prefix_picks_the_longest_match():
    p = policy(chunk_chars=8)
    shared = SYSTEMS[0][:400]
    p.record("short", p.hashes({"prompt": shared[:200] + "Z" * 300}))
    p.record("long", p.hashes({"prompt": shared + "Y" * 100}))
    decision = p.choose(p.hashes({"prompt": shared + "W" * 100}), {"short": 0, "long": 1})
    assert decision.ranked[0] == "long" and decision.matched_chunks == 50


def test_prefix_gives_way_to_load_imbalance():
    p = policy(imbalance_threshold=4)
    p.record("r1", p.hashes(chat(SYSTEMS[0], "q")))
    decision = p.choose(p.hashes(chat(SYSTEMS[0], "q2")), {"r1": 6, "r2": 1})
    assert decision.ranked == ("r2", "r1") and decision.reason is RouteReason.IMBALANCED


def test_without_a_match_least_loaded_then_fewest_indexed_chunks():
    p = policy()
    p.record("busy_index", p.hashes(chat(SYSTEMS[0], "q")))
    fresh = p.hashes(chat(SYSTEMS[2], "q"))
    assert p.choose(fresh, {"busy_index": 0, "idle": 2}).ranked[0] == "busy_index"
    decision = p.choose(fresh, {"busy_index": 1, "idle": 1})
    assert decision.ranked[0] == "idle" and decision.reason is RouteReason.NO_MATCH
    assert p.choose([], {"a": 2, "b": 0}).reason is RouteReason.NO_PROMPT


def test_a_match_below_min_match_fraction_is_none():
    p = policy(chunk_chars=10, min_match_fraction=0.5)
    p.record("r1", p.hashes({"prompt": "a" * 30 + "b" * 70}))
    decision = p.choose(p.hashes({"prompt": "a" * 30 + "c" * 70}), {"r1": 0, "r2": 0})
    assert decision.reason is RouteReason.NO_MATCH and decision.ranked[0] == "r2"


def test_distinct_system_prompts_spread_then_stick():
    p = policy()
    homes = {}
    for round_ in range(3):
        for i, system in enumerate(SYSTEMS):
            hashes = p.hashes(chat(system, f"question {round_}"))
            home = p.choose(hashes, {"r1": 0, "r2": 0}).ranked[0]
            p.record(home, hashes)
            assert homes.setdefault(i, home) == home
    assert sorted(homes.values()) == ["r1", "r1", "r2", "r2"]


def test_index_is_bounded_and_forgets_tail_first():
    index = PrefixIndex(max_chunks_per_replica=10)
    path = list(range(100, 108))
    index.record("r", path)
    index.record("r", [1, 2, 3, 4])
    assert index.num_chunks("r") == 10
    assert index.match_len("r", path) == 6          # the two deepest chunks went first
    for start in range(0, 10_000, 50):
        index.record("r", list(range(start, start + 50)))
    assert index.num_chunks("r") == 10


def test_departed_replicas_are_forgotten():
    p = policy()
    for r in ("a", "b", "c"):
        p.record(r, p.hashes(chat(SYSTEMS[0], r)))
    p.index.retain({"a", "c"})
    p.index.remove("c")
    assert p.index.replicas() == {"a"} and p.index.num_chunks("b") == 0


@settings(max_examples=60, deadline=None)
@given(loads=st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 20), min_size=1),
       recorded=st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 3))),
       ask=st.integers(0, 3), threshold=st.integers(0, 6))
def test_ranking_is_a_permutation_within_the_balance_bound(loads, recorded, ask, threshold):
    p = policy(imbalance_threshold=threshold, max_chunks_per_replica=40)
    for replica, i in recorded:
        p.record(replica, p.hashes(chat(SYSTEMS[i], "q")))
    decision = p.choose(p.hashes(chat(SYSTEMS[ask], "q")), loads)
    assert sorted(decision.ranked) == sorted(loads)
    assert loads[decision.ranked[0]] <= min(loads.values()) + threshold
    assert all(p.index.num_chunks(r) <= 40 for r in "abcdef")


def test_round_robin_rotates():
    rr = RoundRobin()
    firsts = [rr.order(["a", "b", "c"])[0] for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    assert rr.order(["a", "b", "c"]) == ("a", "b", "c") and rr.order([]) == ()
    assert rr.cursor <= 3


# -- the config -----------------------------------------------------------------------------

def test_router_names_and_options():
    from conveyor.ray.router import (PrefixAwareRouter, RoundRobinRouter,
                                     request_router_config)
    from ray.serve.config import RequestRouterConfig
    assert request_router_config("pow2").request_router_class == \
        RequestRouterConfig().request_router_class
    assert request_router_config("round-robin").get_request_router_class() is RoundRobinRouter
    config = request_router_config("prefix", imbalance_threshold=2)
    assert config.get_request_router_class() is PrefixAwareRouter
    assert config.request_router_kwargs == {"imbalance_threshold": 2}
    for name, kwargs in (("random", {}), ("pow2", {"x": 1}), ("prefix", {"chunk": 3}),
                         ("prefix", {"chunk_chars": 0}),
                         ("prefix", {"min_match_fraction": 2.0})):
        with pytest.raises(ConfigError) as info:
            request_router_config(name, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="pow2, round-robin, prefix"):
        request_router_config("random")


# -- the Ray glue on fake replicas ----------------------------------------------------------

class FakeReplica:
    """What a router reads of a ``RunningReplica``: id, capacity, queue length."""

    def __init__(self, unique_id: str, queue_len: int = 0):
        from ray.serve._private.common import DeploymentID, ReplicaID
        self.replica_id = ReplicaID(unique_id, DeploymentID(name="engine", app_name="app"))
        self.queue_len = queue_len
        self.max_ongoing_requests = 100

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len


def pending(body: dict):
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest
    forwarded = ForwardedRequest("POST", "/v1/chat/completions", body=json.dumps(body).encode())
    return PendingRequest(args=[forwarded], kwargs={},
                          metadata=RequestMetadata(request_id="r", internal_request_id="r"))


def test_prefix_router_glue_routes_records_and_forgets():
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID
    from conveyor.ray.router import PrefixAwareRouter

    async def scenario():
        router = PrefixAwareRouter(deployment_id=DeploymentID(name="engine", app_name="app"),
                                   handle_source=DeploymentHandleSource.UNKNOWN)
        router.initialize_state(imbalance_threshold=3)
        a, b = FakeReplica("a"), FakeReplica("b")
        router.update_replicas([a, b])
        request = pending(chat(SYSTEMS[0], "q"))
        first = (await router.choose_replicas([a, b], request))[0][0]
        router.on_request_routed(request, first.replica_id, None)
        other = b if first is a else a
        first.queue_len, other.queue_len = 3, 0          # within the threshold: stays home
        ranks = await router.choose_replicas([a, b], pending(chat(SYSTEMS[0], "q2")))
        assert [r for [r] in ranks] == [first, other]
        first.queue_len = 4                              # beyond it: the idle one
        ranks = await router.choose_replicas([a, b], pending(chat(SYSTEMS[0], "q3")))
        assert ranks[0] == [other]
        router.update_replicas([other])
        assert router._policy.index.replicas() == set()   # only `first` had entries
        router.on_request_routed(request, first.replica_id, None)   # left meanwhile: ignored
        assert router._policy.index.replicas() == set()

    asyncio.run(scenario())


def test_round_robin_router_glue_rotates_in_a_stable_order():
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID
    from conveyor.ray.router import RoundRobinRouter

    async def scenario():
        router = RoundRobinRouter(deployment_id=DeploymentID(name="engine", app_name="app"),
                                  handle_source=DeploymentHandleSource.UNKNOWN)
        router.initialize_state()
        replicas = [FakeReplica(x) for x in "bca"]
        router.update_replicas(replicas)
        firsts = [(await router.choose_replicas(replicas, None))[0][0].replica_id.unique_id
                  for _ in range(4)]
        assert firsts == ["a", "b", "c", "a"]

    asyncio.run(scenario())


# -- one Serve app on a real local Ray ------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    from ray import serve
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        yield serve
    finally:
        serve.shutdown()
        ray.shutdown()


def _whoami_app(serve, router: str):
    from conveyor.ray.router import request_router_config

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0},
                      request_router_config=request_router_config(router))
    class WhoAmI:
        def __call__(self, request: ForwardedRequest) -> str:
            return serve.get_replica_context().replica_id.unique_id

    return WhoAmI.bind()


def _ask(handle, body: dict) -> str:
    request = ForwardedRequest("POST", "/v1/chat/completions", body=json.dumps(body).encode())
    return handle.remote(request).result(timeout_s=60)


def test_on_real_ray_prefix_sticks_per_system_prompt_and_round_robin_alternates(local_ray):
    serve = local_ray
    handle = serve.run(_whoami_app(serve, "prefix"), name="prefix", route_prefix=None)
    homes: dict[int, set[str]] = {}
    for round_ in range(3):
        for i, system in enumerate(SYSTEMS):
            homes.setdefault(i, set()).add(_ask(handle, chat(system, f"q{round_}")))
    assert all(len(seen) == 1 for seen in homes.values()), homes
    assert len(set().union(*homes.values())) == 2, homes      # the prompts spread over both
    serve.delete("prefix")

    handle = serve.run(_whoami_app(serve, "round-robin"), name="rr", route_prefix=None)
    seen = [_ask(handle, chat(SYSTEMS[0], f"q{n}")) for n in range(6)]
    assert len(set(seen)) == 2 and all(a != b for a, b in zip(seen, seen[1:])), seen
    serve.delete("rr")
