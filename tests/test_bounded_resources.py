"""Bounded resources under hostile clients, in-process: a reader that falls behind gets merged
outputs (never a queue of snapshots), one that stops reading is aborted, outputs cost O(new
tokens), and prompts are refused before tokenizing when the queue is full or they have more
characters than the context could hold; the tokenizer queue is bounded and serves small jobs
first."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from conveyor import SamplingParams
from conveyor.engine.async_engine import AsyncEngine, EngineStoppedError
from conveyor.engine.outputs import PrefixView
from conveyor.server.app import ServerConfig, build_app
from conveyor.server.tokenizer_pool import TokenizerBusyError, TokenizerPool
from engine_helpers import assert_all_blocks_free, greedy, prompt, small_engine


@pytest.fixture(scope="module")
def engine():
    return small_engine()


async def _finished(ae: AsyncEngine) -> None:
    while ae.num_in_flight:
        await asyncio.sleep(0.01)


def test_a_reader_that_falls_behind_gets_one_merged_output(engine):
    params = SamplingParams(n=2, max_tokens=16, logprobs=5, seed=1, ignore_eos=True)

    async def scenario():
        ae = AsyncEngine(engine)
        ae.start()
        stream = await ae.add_request(prompt(10), params)
        unread = []
        while ae.num_in_flight:              # the engine runs to the end; nobody reads
            unread.append(stream.num_unread)
            await asyncio.sleep(0.005)
        outs = [out async for out in stream]
        await ae.shutdown()
        return unread, outs

    unread, outs = asyncio.run(scenario())
    assert max(unread) <= 1
    assert len(outs) == 1 and outs[0].finished
    for c in outs[0].outputs:
        assert len(c.token_ids) == 16 and c.delta_token_ids == list(c.token_ids)
        assert c.delta_text == c.text and len(c.delta_logprobs) == 16
        assert [lp.token_id for lp in c.delta_logprobs] == list(c.token_ids)
        assert all(len(lp.top) == 5 for lp in c.delta_logprobs)
    assert_all_blocks_free(engine)


def test_a_reader_that_stops_reading_is_aborted_and_others_go_on(engine):
    stalled_params = SamplingParams(n=3, max_tokens=300, logprobs=20, seed=2, ignore_eos=True)

    async def scenario():
        ae = AsyncEngine(engine, stream_write_timeout=0.5)
        ae.start()
        stalled = await ae.add_request(prompt(10), stalled_params)
        plain = [out async for out in await ae.add_request(prompt(12, 1), greedy(8))]
        await _finished(ae)           # the stalled one ends too: its reader timed out
        stalled_outs = [out async for out in stalled]
        await ae.shutdown()
        return plain, stalled_outs

    plain, stalled_outs = asyncio.run(scenario())
    assert plain[-1].outputs[0].finish_reason == "length"
    assert len(plain[-1].outputs[0].token_ids) == 8
    assert len(stalled_outs) == 1
    for c in stalled_outs[0].outputs:
        assert c.finish_reason == "abort" and len(c.token_ids) < 300
        assert c.delta_token_ids == list(c.token_ids)
    assert_all_blocks_free(engine)


def test_step_outputs_are_constant_time_views_that_never_change(engine):
    engine.add_request(prompt(8), SamplingParams(n=2, max_tokens=6, seed=4, ignore_eos=True,
                                                 logprobs=1), request_id="views")
    held, deltas = [], [[], []]
    while engine.has_unfinished_requests():
        for out in engine.step():
            held.append((out, [len(c.token_ids) for c in out.outputs]))
            for c in out.outputs:
                deltas[c.index] += c.delta_token_ids
    *running, (final, _) = held
    for out, lengths in running:
        assert not out.finished
        for c, length in zip(out.outputs, lengths):
            assert isinstance(c.token_ids, PrefixView) and isinstance(c.logprobs, PrefixView)
            assert len(c.token_ids) == length == len(c.logprobs)    # unchanged by later steps
            assert c.token_ids == deltas[c.index][:length]
    for c in final.outputs:
        assert type(c.token_ids) is list and c.token_ids == deltas[c.index]
        assert len(c.token_ids) == 6
    assert_all_blocks_free(engine)


def test_prefix_view_reads_like_a_list():
    items = [1, 2, 3]
    view = PrefixView(items, 2)
    items.append(4)
    assert len(view) == 2 and list(view) == [1, 2] and view == [1, 2] and [1, 2] == view
    assert view[-1] == 2 and view[0:5] == [1, 2] and view[::-1] == [2, 1] and view != [1, 2, 3]
    with pytest.raises(IndexError):
        view[2]


def test_tokenizer_pool_runs_small_jobs_first_and_bounds_queued_work():
    async def scenario():
        pool = TokenizerPool(max_queued_chars=5_000_000)
        release, order = threading.Event(), []
        blocker = asyncio.ensure_future(pool.run(release.wait, 10, cost=1))
        await asyncio.sleep(0.05)             # the worker is inside the blocker now
        big = [asyncio.ensure_future(pool.run(order.append, f"big{i}", cost=900_000))
               for i in range(5)]
        small = asyncio.ensure_future(pool.run(order.append, "small", cost=20))
        await asyncio.sleep(0.05)
        with pytest.raises(TokenizerBusyError):
            await pool.run(order.append, "one too many", cost=900_000)
        gone = asyncio.ensure_future(pool.run(order.append, "cancelled", cost=5))
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        release.set()
        await asyncio.gather(blocker, small, *big)
        pool.shutdown(wait=True)
        return order, pool.queued_chars

    order, queued = asyncio.run(scenario())
    assert order == ["small"] + [f"big{i}" for i in range(5)] and queued == 0


def test_tokenizer_pool_shutdown_fails_queued_jobs():
    async def scenario():
        pool, release = TokenizerPool(max_queued_chars=100), threading.Event()
        running = asyncio.ensure_future(pool.run(release.wait, 10))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(pool.run(len, "queued"))
        await asyncio.sleep(0.01)
        pool.shutdown()
        with pytest.raises(EngineStoppedError):
            await queued
        with pytest.raises(EngineStoppedError):
            await pool.run(len, "late")
        release.set()
        assert await running is True

    asyncio.run(scenario())


class CountingTokenizer:
    """The front end's tokenizer, recording the length of every text it encodes."""

    def __init__(self, inner):
        self.inner, self.encoded = inner, []

    def encode(self, text, *args, **kwargs):
        self.encoded.append(len(text))
        return self.inner.encode(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def _serve(config: ServerConfig, scenario):
    app = build_app(config, small_engine)
    async with app.router.lifespan_context(app):
        state = app.state.conveyor
        while state.engine is None:
            await asyncio.sleep(0.01)
        state.tokenizer = CountingTokenizer(state.tokenizer)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app",
                                     timeout=120) as client:
            return await scenario(client, state)


def test_prompts_that_cannot_fit_are_refused_before_tokenizing(engine):
    huge = "word " * 180_000                          # 900 KB
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": huge}]}]}

    async def scenario(client, state):
        posts = [client.post("/v1/completions", json={"prompt": huge, "max_tokens": 2})
                 for _ in range(48)]
        posts.append(client.post("/v1/chat/completions", json={**chat, "max_tokens": 2}))
        posts.append(client.post("/v1/completions", json={"prompt": "small", "max_tokens": 2}))
        responses = await asyncio.gather(*posts)
        return responses, state.tokenizer.encoded, state.max_prompt_chars

    responses, encoded, bound = asyncio.run(_serve(ServerConfig(max_body_bytes=2 << 20),
                                                   scenario))
    *refused, small = responses
    assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 2
    for r in refused:
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and "characters" in error["message"]
    assert 0 < bound < len(huge) and encoded == [len("small")]
    assert_all_blocks_free(engine)


def test_a_full_queue_or_tokenizer_backlog_refuses_before_tokenizing(engine, monkeypatch):
    reached, proceed = threading.Event(), threading.Event()
    original = engine.step

    def step():
        reached.set()
        proceed.wait(60)
        return original()
    monkeypatch.setattr(engine, "step", step)
    config = ServerConfig(max_waiting_requests=1, max_tokenizer_queue_chars=50_000)

    async def scenario(client, state):
        first = asyncio.ensure_future(client.post("/v1/completions",
                                                  json={"prompt": "first", "max_tokens": 2}))
        assert await asyncio.to_thread(reached.wait, 60)
        full = await client.post("/v1/completions", json={"prompt": "second", "max_tokens": 2})
        encoded_when_full = list(state.tokenizer.encoded)
        proceed.set()
        await first
        long_prompt = "hello " * 3_500                 # under the character bound
        backlog = await asyncio.gather(*(client.post(
            "/v1/completions", json={"prompt": long_prompt, "max_tokens": 2}) for _ in range(10)))
        return full, encoded_when_full, backlog, state.tokenizer.encoded

    full, encoded_when_full, backlog, encoded = asyncio.run(_serve(config, scenario))
    assert full.status_code == 429 and full.headers["Retry-After"] == "1"
    assert encoded_when_full == [len("first")]
    statuses = [r.status_code for r in backlog]
    assert set(statuses) == {400, 429}        # 400: tokenized, longer than the context
    assert statuses.count(400) == len(encoded) - 1 and statuses.count(429) >= 1
    assert_all_blocks_free(engine)
