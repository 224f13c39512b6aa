"""AsyncEngine in-process: aborts from every request state free their blocks, leaving a stream
aborts, timeouts and drains end requests with "abort", an idle engine sleeps, and an exception in
``step()`` ends every in-flight request with "error" and marks the engine dead."""

from __future__ import annotations

import asyncio
import threading

import pytest

from conveyor import SamplingParams
from conveyor.core.request import RequestStatus
from conveyor.errors import InvalidRequestError
from conveyor.engine.async_engine import (AsyncEngine, EngineDeadError, EngineStoppedError,
                                           QueueFullError)
from engine_helpers import NUM_BLOCKS, assert_all_blocks_free, greedy, prompt, small_engine


@pytest.fixture(scope="module")
def engine():
    return small_engine()


async def collect(stream) -> list:
    return [out async for out in stream]


class StepGate:
    """Pauses the engine thread right after the first step where ``predicate(engine)`` holds, so a
    test can queue an abort while the request is in a known state."""

    def __init__(self, engine, monkeypatch, predicate):
        self.reached, self.proceed = threading.Event(), threading.Event()
        original = engine.step

        def step():
            outputs = original()
            if not self.reached.is_set() and predicate(engine):
                self.status = {rid: r.status for rid, r in engine.core.scheduler.requests.items()}
                self.reached.set()
                self.proceed.wait(60)
            return outputs
        monkeypatch.setattr(engine, "step", step)

    async def wait(self) -> None:
        assert await asyncio.to_thread(self.reached.wait, 120), "the state was never reached"


def _request(engine, rid):
    return engine.core.scheduler.requests.get(rid)


STATES = {
    "waiting": lambda e: (r := _request(e, "target")) is not None
    and r.status == RequestStatus.WAITING and len(e.core.scheduler.running) == 4,
    "prefilling": lambda e: (r := _request(e, "target")) is not None
    and r.status == RequestStatus.RUNNING and 0 < r.num_computed_tokens < r.num_prompt_tokens,
    "decoding": lambda e: (r := _request(e, "target")) is not None
    and r.status == RequestStatus.RUNNING and r.num_output_tokens >= 3,
    "preempted": lambda e: (r := _request(e, "target")) is not None
    and r.status == RequestStatus.PREEMPTED,
}
EXPECTED = {"waiting": RequestStatus.WAITING, "prefilling": RequestStatus.RUNNING,
            "decoding": RequestStatus.RUNNING, "preempted": RequestStatus.PREEMPTED}


@pytest.mark.parametrize("state", list(STATES))
def test_abort_in_any_state_frees_blocks(engine, monkeypatch, state):
    gate = StepGate(engine, monkeypatch, STATES[state])

    async def scenario():
        ae = AsyncEngine(engine)
        ae.start()
        if state == "preempted":
            # Four requests of 80 + 40 tokens need 28 blocks; the target, admitted last, is the
            # newest running request and so the first victim.
            others = [await ae.add_request(prompt(80, i), greedy(40)) for i in range(3)]
            target = await ae.add_request(prompt(80, 9), greedy(40), request_id="target")
        else:
            num_others = 4 if state == "waiting" else 0
            others = [await ae.add_request(prompt(8, i), greedy(40)) for i in range(num_others)]
            target_prompt = prompt(100) if state == "prefilling" else prompt(12)
            target = await ae.add_request(target_prompt, greedy(40), request_id="target")
        await gate.wait()
        ae.abort("target")
        gate.proceed.set()
        target_outs = await collect(target)
        for s in others:
            s.close()
            await collect(s)
        await ae.shutdown()
        return target_outs

    outs = asyncio.run(scenario())
    assert gate.status["target"] == EXPECTED[state]
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 40
    assert_all_blocks_free(engine)


class FinishRecorder:
    """An output observer keeping each request's finished output."""

    def __init__(self):
        self.finished = {}

    def on_outputs(self, outputs, now):
        self.finished.update((o.request_id, o) for o in outputs if o.finished)

    def on_step(self, engine, started, finished):
        pass


def test_stream_deltas_add_up_and_leaving_a_stream_aborts_it(engine):
    recorder = FinishRecorder()

    async def scenario():
        ae = AsyncEngine(engine, observer=recorder)
        ae.start()
        text, tokens = "", []
        async for out in ae.generate(prompt(10), SamplingParams(n=2, max_tokens=12, seed=3,
                                                                ignore_eos=True)):
            text += out.outputs[1].delta_text
            tokens += out.outputs[1].delta_token_ids
        final = out.outputs[1]
        gen = ae.generate(prompt(10, 1), greedy(200), request_id="left-after-first-token")
        async for _ in gen:
            break
        await gen.aclose()

        async def consume():
            async for _ in ae.generate(prompt(10, 2), greedy(200), request_id="cancelled"):
                pass
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()            # cancelled while waiting (possibly before its first token)
        with pytest.raises(asyncio.CancelledError):
            await task
        while ae.num_in_flight:
            await asyncio.sleep(0.01)
        snap = ae.snapshot
        await ae.shutdown()
        return text, tokens, final, snap

    text, tokens, final, snap = asyncio.run(scenario())
    assert text == final.text and tokens == final.token_ids and len(tokens) == 12
    for request_id in ("left-after-first-token", "cancelled"):
        choice = recorder.finished[request_id].outputs[0]
        assert choice.finish_reason == "abort" and len(choice.token_ids) < 200
    assert snap.num_free_blocks == snap.num_total_blocks == NUM_BLOCKS
    assert snap.num_running == snap.num_waiting == 0
    assert_all_blocks_free(engine)


def test_bad_request_raises_and_timeout_aborts(engine):
    async def scenario():
        ae = AsyncEngine(engine, request_timeout=0.5)
        ae.start()
        with pytest.raises(InvalidRequestError) as err:
            await ae.add_request(prompt(10), greedy(1000))
        outs = await collect(await ae.add_request(prompt(10), greedy(300)))
        await ae.shutdown()
        return err.value, outs, ae.num_in_flight

    err, outs, in_flight = asyncio.run(scenario())
    assert err.param == "max_tokens"
    assert outs[-1].outputs[0].finish_reason == "abort" and len(outs[-1].outputs[0].token_ids) < 300
    assert in_flight == 0
    assert_all_blocks_free(engine)


def test_queue_bound_and_drain(engine):
    async def scenario():
        ae = AsyncEngine(engine, max_waiting_requests=2)
        ae.start()
        streams = [await ae.add_request(prompt(8, i), greedy(4 if i == 0 else 340))
                   for i in range(2)]
        with pytest.raises(QueueFullError):
            for i in range(8):    # two are at most waiting (or on their way to the engine)
                streams.append(await ae.add_request(prompt(8, i), greedy(340)))
        tasks = [asyncio.create_task(collect(s)) for s in streams]
        await ae.drain(timeout=3.0)
        with pytest.raises(EngineStoppedError):
            await ae.add_request(prompt(8), greedy(4))
        results = [await t for t in tasks]
        await ae.shutdown()
        return results

    results = asyncio.run(scenario())
    reasons = [r[-1].outputs[0].finish_reason for r in results]
    assert reasons[0] == "length" and len(results[0][-1].outputs[0].token_ids) == 4
    assert set(reasons[1:]) == {"abort"}
    assert_all_blocks_free(engine)


def test_idle_engine_sleeps(engine, monkeypatch):
    calls = []
    original = engine.has_unfinished_requests
    monkeypatch.setattr(engine, "has_unfinished_requests", lambda: calls.append(1) or original())

    async def scenario():
        ae = AsyncEngine(engine)
        ae.start()
        await asyncio.sleep(0.5)
        idle_calls = len(calls)
        await ae.shutdown()
        return idle_calls

    assert asyncio.run(scenario()) <= 2


def test_step_failure_fails_in_flight_requests_and_kills_engine(engine, monkeypatch):
    runner, original = engine.runner, engine.runner.execute
    num_steps = []

    def execute(sched):
        num_steps.append(1)
        if len(num_steps) > 5:
            raise RuntimeError("simulated device failure")
        return original(sched)

    async def scenario():
        ae = AsyncEngine(engine)
        ae.start()
        streams = [await ae.add_request(prompt(8, i), greedy(100)) for i in range(3)]
        results = [await collect(s) for s in streams]
        with pytest.raises(EngineDeadError):
            await ae.add_request(prompt(8), greedy(4))
        await ae.shutdown()
        return results, ae.is_dead, ae.error

    monkeypatch.setattr(runner, "execute", execute)
    results, is_dead, error = asyncio.run(scenario())
    monkeypatch.setattr(runner, "execute", original)
    assert is_dead and "simulated device failure" in error
    for outs in results:
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "error"
        assert "simulated device failure" in outs[-1].error
    assert_all_blocks_free(engine)

