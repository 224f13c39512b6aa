"""The clients a soak run mixes: valid, invalid, bad-JSON, oversize, cancelled and slow-reading.

Owns what each kind sends and how its answer is judged. ``run_client`` returns a
``ClientResult`` whose outcome is one of: ``COMPLETED`` (a whole answer: JSON with every choice
finished, or a stream ending in ``[DONE]`` without an error event), ``REFUSED`` (a 4xx with an
OpenAI error body), ``CANCELLED`` (the client left on purpose) or ``FAILED``: a 5xx, an error
event inside a 200 stream, a stream or connection the server cut, no answer within
``timeout_s``, an invalid request the server accepted, or a valid one it refused with 400.
Invariants: every request is bounded by ``timeout_s``; the random choices come from the
caller's seeded ``random.Random``.
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from conveyor.bench.sse_stream import Endpoint, StreamingPost
from conveyor.bench.soak_cases import BAD_JSON, INVALID, BodyCase, valid_request


class Kind(str, enum.Enum):
    VALID = "valid"
    INVALID = "invalid"
    BAD_JSON = "bad_json"
    OVERSIZE = "oversize"
    CANCELLED = "cancelled"
    SLOW_READER = "slow_reader"


class Outcome(str, enum.Enum):
    COMPLETED = "completed"
    REFUSED = "refused"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SoakTarget:
    """The server under test and what the clients need to know about it."""

    base_url: str
    model: str
    api_key: str | None
    max_body_bytes: int
    timeout_s: float

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(slots=True)
class ClientResult:
    kind: Kind
    outcome: Outcome
    case: str
    status: int | None = None
    detail: str = ""
    started: float = 0.0        # time.monotonic() when the request was sent


@dataclass(slots=True)
class Progress:
    """What one request got so far, so a timeout can say where it stopped: the case (known
    before the first await), when the response head arrived and how many events followed."""

    case: str = "?"
    started: float = field(default_factory=time.monotonic)
    status: int | None = None
    head_after_s: float | None = None
    events: int = 0
    last_event_after_s: float | None = None

    def got_head(self, status: int) -> None:
        self.status = status
        self.head_after_s = time.monotonic() - self.started

    def got_event(self) -> None:
        self.events += 1
        self.last_event_after_s = time.monotonic() - self.started

    def describe(self) -> str:
        if self.head_after_s is None:
            return "no response head"
        where = f"HTTP {self.status} after {self.head_after_s:.1f} s"
        if self.last_event_after_s is None:
            return f"{where}, no event"
        return f"{where}, {self.events} event(s), the last at {self.last_event_after_s:.1f} s"


class _Failed(Exception):
    """The answer to ``case`` is wrong for its kind; the message says how."""

    def __init__(self, case: str, message: str):
        super().__init__(message)
        self.case = case


async def run_client(kind: Kind, client: httpx.AsyncClient, target: SoakTarget,
                     rng: random.Random) -> ClientResult:
    """Send one request of ``kind`` and judge the answer; never raises (but on cancellation)."""
    run = _RUNNERS[kind]
    progress = Progress()
    try:
        async with asyncio.timeout(target.timeout_s):
            case, outcome, status = await run(client, target, rng, progress)
        return ClientResult(kind, outcome, case, status, started=progress.started)
    except TimeoutError:
        return ClientResult(kind, Outcome.FAILED, progress.case, progress.status,
                            f"no complete answer within {target.timeout_s:.0f} s "
                            f"({progress.describe()})", progress.started)
    except _Failed as exc:
        return ClientResult(kind, Outcome.FAILED, exc.case, None, str(exc), progress.started)
    except (httpx.HTTPError, OSError, asyncio.IncompleteReadError) as exc:
        return ClientResult(kind, Outcome.FAILED, progress.case, None,
                            f"{type(exc).__name__}: {exc} ({progress.describe()})",
                            progress.started)


def _judge_refusal(case: str, response: httpx.Response, must_reject: bool) -> Outcome:
    """An answer to a request that may (or must) be refused."""
    status = response.status_code
    if 400 <= status < 500:
        _check_error_body(case, response.content, status)
        return Outcome.REFUSED
    if status == 200 and not must_reject:
        return Outcome.COMPLETED
    raise _Failed(case, f"HTTP {status} for a request that must be refused: {response.text[:300]}")


def _check_error_body(case: str, content: bytes, status: int) -> None:
    try:
        message = json.loads(content)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        raise _Failed(case, f"HTTP {status} without an OpenAI error body: "
                            f"{content[:200]!r}") from None
    if not isinstance(message, str) or not message:
        raise _Failed(case, f"HTTP {status} with an empty error message")


async def _post(client: httpx.AsyncClient, target: SoakTarget, case: BodyCase,
                progress: Progress) -> httpx.Response:
    progress.case = case.name
    headers = {**target.headers(), "Content-Type": "application/json", **case.headers}
    content = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    response = await client.post(target.base_url + case.path, content=content, headers=headers)
    progress.got_head(response.status_code)
    return response


async def _valid(client, target, rng, progress):
    path, body = valid_request(rng, target.model)
    case = f"{path} stream" if body.get("stream") else path
    if not body.get("stream"):
        response = await _post(client, target, BodyCase(case, path, body), progress)
        return case, _judge_complete(case, response, body.get("n", 1)), response.status_code
    progress.case = case
    async with client.stream("POST", target.base_url + path, json=body,
                             headers=target.headers()) as response:
        progress.got_head(response.status_code)
        if response.status_code != 200:
            await response.aread()
            return case, _judge_not_ok(case, response), response.status_code
        events = []
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                events.append(line[5:].strip())
                progress.got_event()
    _check_events(case, events)
    return case, Outcome.COMPLETED, 200


def _judge_complete(case: str, response: httpx.Response, n: int) -> Outcome:
    if response.status_code != 200:
        return _judge_not_ok(case, response)
    choices = response.json().get("choices", [])
    if len(choices) != n or any(c.get("finish_reason") is None for c in choices):
        raise _Failed(case, f"200 with {len(choices)} choice(s) for n={n} or an unfinished one")
    return Outcome.COMPLETED


def _judge_not_ok(case: str, response: httpx.Response) -> Outcome:
    """A valid request may be turned away only for load (429), never as invalid or by a 5xx."""
    if response.status_code == 429:
        _check_error_body(case, response.content, 429)
        return Outcome.REFUSED
    raise _Failed(case, f"HTTP {response.status_code} for a valid request: {response.text[:300]}")


def _check_events(case: str, events: list[str | bytes]) -> None:
    if not events or events[-1] not in ("[DONE]", b"[DONE]"):
        raise _Failed(case, f"the stream ended without [DONE] after {len(events)} event(s)")
    for event in events[:-1]:
        if '"error"' in (event if isinstance(event, str) else event.decode(errors="replace")):
            raise _Failed(case, f"an error event inside a 200 stream: {str(event)[:300]}")


async def _invalid(client, target, rng, progress):
    case = rng.choice(INVALID)
    response = await _post(client, target, case.with_model(target.model), progress)
    return case.name, _judge_refusal(case.name, response, case.must_reject), response.status_code


async def _bad_json(client, target, rng, progress):
    case = rng.choice(BAD_JSON)
    response = await _post(client, target, case, progress)
    return case.name, _judge_refusal(case.name, response, case.must_reject), response.status_code


async def _oversize(client, target, rng, progress):
    size = target.max_body_bytes + rng.randint(1, 4096)
    body = json.dumps({"model": target.model, "prompt": "x" * size, "max_tokens": 1}).encode()
    headers = {**target.headers(), "Content-Type": "application/json"}
    if rng.random() < 0.5:
        case = progress.case = "oversize content-length"
        response = await client.post(target.base_url + "/v1/completions", content=body,
                                     headers=headers)
    else:
        case = progress.case = "oversize chunked"

        async def pieces():
            for start in range(0, len(body), 65536):
                yield body[start:start + 65536]
        response = await client.post(target.base_url + "/v1/completions", content=pieces(),
                                     headers=headers)
    progress.got_head(response.status_code)
    return case, _judge_refusal(case, response, must_reject=True), response.status_code


async def _cancelled(client, target, rng, progress):
    path, body = valid_request(rng, target.model)
    body["max_tokens"] = max(body["max_tokens"], 32)
    if rng.random() < 0.5:
        body.pop("stream", None)
        case = f"{path} left while waiting"
        try:
            async with asyncio.timeout(rng.uniform(0.05, 1.0)):
                response = await _post(client, target, BodyCase(case, path, body), progress)
        except TimeoutError:
            return case, Outcome.CANCELLED, None
        return case, _judge_complete(case, response, body.get("n", 1)), response.status_code
    return await _leave_stream(client, target, path, {**body, "stream": True}, rng.randint(0, 3),
                               progress)


async def _leave_stream(client, target, path, body, read_events: int, progress):
    case = progress.case = f"{path} stream left after {read_events} event(s)"
    async with client.stream("POST", target.base_url + path, json=body,
                             headers=target.headers()) as response:
        progress.got_head(response.status_code)
        if response.status_code != 200:
            await response.aread()
            return case, _judge_not_ok(case, response), response.status_code
        seen: list[str] = []
        async for line in response.aiter_lines() if read_events else _nothing():
            if line.startswith("data:"):
                seen.append(line[5:].strip())
                progress.got_event()
                if len(seen) >= read_events or seen[-1] == "[DONE]":
                    break
    if seen and seen[-1] == "[DONE]":
        _check_events(case, seen)
        return case, Outcome.COMPLETED, 200
    _check_events(case, [*seen, "[DONE]"])     # what was read carries no error event
    return case, Outcome.CANCELLED, 200


async def _nothing():
    return
    yield


async def _slow_reader(client, target, rng, progress):
    path, body = valid_request(rng, target.model)
    body.update(stream=True, max_tokens=rng.randint(16, 96), logprobs=5)
    if path.endswith("chat/completions"):
        body.update(logprobs=True, top_logprobs=5)
    case = progress.case = f"{path} slow reader"
    pause = rng.uniform(0.02, 0.1)
    post = StreamingPost(Endpoint.parse(target.base_url), path, body, target.headers(),
                         receive_buffer=4096)
    async with post as response:
        progress.got_head(response.status)
        if response.status != 200:
            content = await response.read()
            if response.status == 429:
                _check_error_body(case, content, 429)
                return case, Outcome.REFUSED, 429
            raise _Failed(case, f"HTTP {response.status} for a valid request: {content[:300]!r}")
        events = []
        async for event in response.events():
            events.append(event)
            progress.got_event()
            await asyncio.sleep(pause)
    _check_events(case, events)
    return case, Outcome.COMPLETED, 200


_RUNNERS: dict[Kind, Any] = {Kind.VALID: _valid, Kind.INVALID: _invalid, Kind.BAD_JSON: _bad_json,
                             Kind.OVERSIZE: _oversize, Kind.CANCELLED: _cancelled,
                             Kind.SLOW_READER: _slow_reader}
