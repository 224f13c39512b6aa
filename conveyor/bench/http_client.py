"""HTTP load generator for any OpenAI-compatible server (conveyor, vLLM, llama.cpp, ...).

Owns ``conveyor bench serve``'s client side: each request is sent at its arrival time (at most
``max_concurrency`` in flight) to ``/v1/completions`` with ``stream: true``, ``ignore_eos`` and
``max_tokens``; the arrival time of every streamed chunk is recorded. Streams go through
``sse_stream`` (a lean asyncio HTTP/1.1 client: the generator shares the CPU with the server it
measures); httpx only reads the model list. Output tokens are counted
from the final ``usage`` object (asked for with ``stream_options.include_usage``) when the server
sends one, else as the number of chunks carrying text. A failed request (HTTP error, connection
error, an ``error`` event in the stream) is recorded with its message; the run goes on.

A request's group travels as conveyor's server reads it: a non-zero priority as the body field
``priority`` (left out at 0, so servers without priorities see the plain OpenAI body), a tenant as
the ``X-Tenant`` header. Prefix-cache hits are read from ``usage.prompt_tokens_details.cached_tokens``
when the server reports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import httpx
from tqdm import tqdm

from conveyor.bench.offline import RunResult
from conveyor.bench.records import RequestRecord
from conveyor.bench.sse_stream import Endpoint, StreamingPost
from conveyor.bench.workloads import BenchRequest, Workload
from conveyor.errors import InvalidRequestError


class ServerError(InvalidRequestError):
    """The server cannot be benchmarked as asked (unreachable, no model list); says what to do."""


def completion_payload(req: BenchRequest, model: str, send_token_ids: bool = False) -> dict:
    """The /v1/completions body for one benchmark request (greedy, streamed, EOS ignored unless
    the request says otherwise)."""
    use_ids = send_token_ids and req.prompt_token_ids is not None
    prompt = req.prompt_token_ids if use_ids else req.prompt
    body = {"model": model, "prompt": prompt, "max_tokens": req.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": req.ignore_eos}
    if req.priority:
        body["priority"] = req.priority
    return body


def request_headers(req: BenchRequest) -> dict[str, str]:
    """Per-request headers: ``X-Tenant`` when the request has a tenant."""
    return {"X-Tenant": req.tenant} if req.tenant else {}


async def fetch_model_name(client: httpx.AsyncClient) -> str:
    """The first model id of GET /v1/models."""
    try:
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as e:
        url = f"{str(client.base_url).rstrip('/')}/v1/models"
        raise ServerError(f"could not read the model name from {url} ({e}); pass --model NAME") from e


async def _stream_one(endpoint: Endpoint, payload: dict, headers: dict, rec: RequestRecord,
                      t0: float) -> None:
    content_chunks, usage = 0, None
    async with StreamingPost(endpoint, "/v1/completions", payload, headers) as resp:
        if resp.status != 200:
            body = (await resp.read()).decode("utf-8", "replace")
            rec.error = f"HTTP {resp.status}: {body[:300]}"
            return
        async for data in resp.events():
            if not data:
                continue
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if event.get("error"):
                rec.error = f"server error: {json.dumps(event['error'])[:300]}"
                return
            now = time.perf_counter() - t0
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                rec.first_token = now if rec.first_token is None else rec.first_token
                rec.chunk_times.append(now)
                content_chunks += 1
            usage = event.get("usage") or usage
    rec.finish = time.perf_counter() - t0
    rec.output_len = content_chunks
    _read_usage(usage or {}, rec)


def _read_usage(usage: dict, rec: RequestRecord) -> None:
    if isinstance(usage.get("completion_tokens"), int):
        rec.output_len = usage["completion_tokens"]
    if isinstance(usage.get("prompt_tokens"), int):
        rec.prompt_len = usage["prompt_tokens"]
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        rec.cached_tokens = details["cached_tokens"]


async def _one(endpoint: Endpoint, headers: dict, req: BenchRequest, payload: dict, t0: float,
               gate: asyncio.Semaphore | None, bar, timeout_s: float) -> RequestRecord:
    await asyncio.sleep(max(0.0, req.arrival_s - (time.perf_counter() - t0)))
    async with gate if gate is not None else contextlib.nullcontext():
        rec = RequestRecord(req.request_id, req.prompt_len, req.max_tokens, time.perf_counter() - t0,
                            tenant=req.tenant, priority=req.priority)
        try:
            await asyncio.wait_for(
                _stream_one(endpoint, payload, headers | request_headers(req), rec, t0), timeout_s)
        except (ConnectionRefusedError, socket.gaierror) as e:
            rec.error = f"ConnectError: {e}"
        except TimeoutError:
            rec.error = f"Timeout: no complete answer within {timeout_s:g} s"
        except (json.JSONDecodeError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                OSError, ValueError) as e:
            rec.error = f"{type(e).__name__}: {e}"
    bar.update(1)
    return rec


async def run_http_async(base_url: str, workload: Workload, model: str | None = None,
                         label: str = "serve", max_concurrency: int | None = None,
                         api_key: str | None = None, send_token_ids: bool = False,
                         progress: bool = True, timeout_s: float = 3600.0) -> RunResult:
    """Send ``workload`` to ``base_url`` and record every request; see the module docstring."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = Endpoint.parse(base_url)
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers,
                                 timeout=httpx.Timeout(60.0, connect=30.0)) as client:
        model = model or await fetch_model_name(client)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(workload.requests), desc=label, unit="req", disable=not progress, leave=False)
        t0, cpu0 = time.perf_counter(), time.process_time()
        tasks = [_one(endpoint, headers, r, completion_payload(r, model, send_token_ids), t0, gate,
                      bar, timeout_s) for r in workload.requests]
        records = await asyncio.gather(*tasks)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        bar.close()
    # the load generator's own CPU time during the run: on a machine it shares with the server,
    # this is time taken from the server under test
    config = {"base_url": base_url, "model": model, "max_concurrency": max_concurrency,
              "send_token_ids": send_token_ids, "client_cpu_s": round(cpu, 3)}
    return RunResult(label, list(records), [], config, wall)


def run_http(base_url: str, workload: Workload, **kwargs) -> RunResult:
    """Synchronous wrapper around ``run_http_async`` (same keyword arguments)."""
    return asyncio.run(run_http_async(base_url, workload, **kwargs))
