"""Prefix-cache hit rate and throughput of Ray Serve request routers, side by side in one run.

For each router (default: round-robin, prefix, pow2) the script deploys conveyor on Ray Serve
(``conveyor.ray.build_app``: N engine replicas of the default model, 1 CPU each, behind the
front door), sends the same shuffled workload of chat requests (several long system prompts x
short user questions) over HTTP at a fixed concurrency, and reads the replicas'
``conveyor:prefix_cache_hits`` / ``conveyor:prefix_cache_queries`` counters from the front
door's ``/metrics`` before and after. Each router gets fresh replicas (cold caches).

    python scripts/bench_ray_routing.py                        # 2 replicas, 8 prompts x 6
    python scripts/bench_ray_routing.py --routers prefix pow2 --concurrency 8 --json out.json

Output: one table (hit rate = hits / queries over prompt tokens; output tok/s over the wall time
of the workload; requests per replica) and, with --json, the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

WORDS = ("the model answers each question with care and keeps every rule listed here in mind "
         "when a user asks about orders shipping refunds accounts billing passwords devices "
         "network storage backups travel weather recipes history science music sports law "
         "always reply politely never reveal internal notes prefer short sentences cite the "
         "policy section number and ask a follow up question when the request is unclear").split()
QUESTIONS = ("How do I reset my password?", "What is your refund policy?", "Where is my order?",
             "Can I change my shipping address?", "How do I contact support?",
             "Is my data backed up?", "What devices are supported?", "How long does it take?")


@dataclass(slots=True)
class RouterResult:
    router: str
    requests: int
    errors: int
    wall_s: float
    output_tokens: int
    prompt_tokens: int
    cache_queries: int
    cache_hits: int
    requests_per_replica: dict

    @property
    def hit_rate(self) -> float:
        return self.cache_hits / self.cache_queries if self.cache_queries else 0.0

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0


def system_prompts(n: int, words: int, seed: int) -> list[str]:
    """``n`` distinct system prompts of ``words`` words (~1.3 tokens each), distinct from their
    first characters on, so that only a prompt's own requests share its prefix."""
    rng = random.Random(seed)
    return [f"Agent {i:02d} ({rng.random():.6f}). " + " ".join(rng.choice(WORDS)
                                                           for _ in range(words))
            for i in range(n)]


def workload(args: argparse.Namespace) -> list[dict]:
    systems = system_prompts(args.system_prompts, args.system_words, args.seed)
    bodies = [{"max_tokens": args.max_tokens, "temperature": 0.0,
               "ignore_eos": True,
               "messages": [{"role": "system", "content": system},
                            {"role": "user", "content": f"{QUESTIONS[q % len(QUESTIONS)]} ({q})"}]}
              for system in systems for q in range(args.questions)]
    random.Random(args.seed).shuffle(bodies)
    return bodies


def replica_counters(text: str) -> dict[str, dict[str, float]]:
    """replica -> {queries, hits, requests} summed from a front-door exposition."""
    wanted = {"conveyor:prefix_cache_queries": "queries", "conveyor:prefix_cache_hits": "hits",
              "conveyor:request_success": "requests"}
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        key = wanted.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and "replica" in sample.labels:
                row = out.setdefault(sample.labels["replica"], {})
                row[key] = row.get(key, 0.0) + sample.value
    return out


async def read_counters(client: httpx.AsyncClient, replicas: int, settle_s: float) -> dict:
    """The counters once every replica has reported twice more (reports are periodic)."""
    await asyncio.sleep(settle_s)
    for _ in range(60):
        response = await client.get("/metrics")
        if response.status_code != 200:
            raise RuntimeError(f"the front door's /metrics answered {response.status_code}: "
                               f"{response.text[:200]}")
        counters = replica_counters(response.text)
        if len(counters) >= replicas:
            return counters
        await asyncio.sleep(1.0)
    raise RuntimeError(f"the front door's /metrics shows {len(counters)} of {replicas} replicas")


async def send_all(client: httpx.AsyncClient, bodies: list[dict], concurrency: int):
    gate = asyncio.Semaphore(concurrency)
    usage = {"errors": 0, "completion_tokens": 0, "prompt_tokens": 0}

    async def one(body: dict) -> None:
        async with gate:
            response = await client.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            usage["errors"] += 1
            print(f"  error {response.status_code}: {response.text[:200]}", file=sys.stderr)
            return
        for key in ("completion_tokens", "prompt_tokens"):
            usage[key] += response.json()["usage"][key]

    start = time.perf_counter()
    await asyncio.gather(*(one(b) for b in bodies))
    return time.perf_counter() - start, usage


async def wait_ready(client: httpx.AsyncClient, replicas: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = await client.get("/health")
            if response.status_code == 200 and \
                    response.json().get("healthy_replicas", 0) >= replicas:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(1.0)
    raise RuntimeError(f"{replicas} replicas were not healthy after {timeout_s:.0f}s")


async def measure(router: str, args: argparse.Namespace, bodies: list[dict]) -> RouterResult:
    base = f"http://127.0.0.1:{args.port}"
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        await wait_ready(client, args.replicas)
        warm = [{"max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"}]}] * (2 * args.replicas)
        await send_all(client, warm, args.replicas)          # first-call costs, no shared prefix
        before = await read_counters(client, args.replicas, args.settle_s)
        wall_s, usage = await send_all(client, bodies, args.concurrency)
        after = await read_counters(client, args.replicas, args.settle_s)
    delta = {r: {k: after[r].get(k, 0) - before.get(r, {}).get(k, 0) for k in after[r]}
             for r in after}
    return RouterResult(
        router, len(bodies), usage["errors"], wall_s, usage["completion_tokens"],
        usage["prompt_tokens"], int(sum(d.get("queries", 0) for d in delta.values())),
        int(sum(d.get("hits", 0) for d in delta.values())),
        {r: int(d.get("requests", 0)) for r, d in sorted(delta.items())})


def run_router(router: str, args: argparse.Namespace, bodies: list[dict]) -> RouterResult:
    from ray import serve

    from conveyor.ray.app import build_app
    engine = {"num_blocks": args.num_kv_blocks, "max_model_len": 2048,
              "max_num_seqs": args.max_num_seqs}
    kwargs = json.loads(args.router_kwargs) if router == "prefix" and args.router_kwargs else None
    app = build_app(engine, num_replicas=args.replicas, request_router=router,
                    request_router_kwargs=kwargs,
                    ray_actor_options={"num_cpus": args.replica_cpus})
    serve.run(app, name=f"bench-{router}", route_prefix="/", blocking=False)
    try:
        return asyncio.run(measure(router, args, bodies))
    finally:
        serve.delete(f"bench-{router}")


def report(results: list[RouterResult], args: argparse.Namespace) -> None:
    print(f"\n{args.replicas} replicas x {args.replica_cpus:g} CPU, {args.system_prompts} system "
          f"prompts x {args.questions} questions = {results[0].requests} requests, concurrency "
          f"{args.concurrency}, max_tokens {args.max_tokens}, {args.num_kv_blocks} KV blocks "
          f"per replica, mean prompt {results[0].prompt_tokens / results[0].requests:.0f} tokens")
    print(f"{'router':<12} {'hit rate':>8} {'hits/queries':>16} {'out tok/s':>9} "
          f"{'wall s':>7} {'errors':>6}  requests per replica")
    for r in results:
        print(f"{r.router:<12} {r.hit_rate:>8.1%} {f'{r.cache_hits}/{r.cache_queries}':>16} "
              f"{r.output_tok_s:>9.1f} {r.wall_s:>7.1f} {r.errors:>6}  "
              f"{sorted(r.requests_per_replica.values())}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--routers", nargs="+", default=["round-robin", "prefix", "pow2"],
                   choices=["round-robin", "prefix", "pow2"])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--system-prompts", type=int, default=8)
    p.add_argument("--system-words", type=int, default=380, help="~500 tokens")
    p.add_argument("--questions", type=int, default=6, help="questions per system prompt")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=256,
                   help="per replica; 16-token blocks (256: about 7 of the system prompts)")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--router-kwargs", default=None, help="JSON options of the prefix router")
    p.add_argument("--settle-s", type=float, default=2.5,
                   help="wait for the replicas' periodic metric reports")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve
    ray.init(num_cpus=max(2, int(args.replicas * args.replica_cpus + 0.999)),
             include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    bodies = workload(args)
    try:
        results = []
        for router in args.routers:
            print(f"-- {router}", file=sys.stderr)
            results.append(run_router(router, args, bodies))
    finally:
        serve.shutdown()
        ray.shutdown()
    report(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": [
                {**asdict(r), "hit_rate": r.hit_rate, "output_tok_s": r.output_tok_s}
                for r in results]}, f, indent=2)
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
