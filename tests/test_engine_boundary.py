"""The engine/server seam (issue 14): data-only core outputs, ``finish_requests``, ``EngineStats``,
and the layering rules (HTTP libraries only in server/, cli/ and bench's HTTP clients; server/
never imports cli/; nothing above core/ and engine/ reaches into the scheduler or KV manager)."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

from conveyor.config import SchedulerConfig
from conveyor.core.engine_core import EngineCore
from conveyor.core.outputs import EngineCoreOutput, EngineCoreOutputs
from conveyor.core.request import FinishReason, Request
from conveyor.core.stats import EngineStats
from conveyor.sampling_params import SamplingParams

from fake_runner import FakeRunner

ROOT = Path(__file__).resolve().parent.parent / "conveyor"
HTTP = {"fastapi", "starlette", "uvicorn", "httpx"}


def _core(prefix_caching=True, max_seqs=4, num_blocks=64, clock=None):
    cfg = SchedulerConfig(32, max_seqs, True, "continuous", 0.0)
    kw = {} if clock is None else {"clock": clock}
    return EngineCore(FakeRunner(4), cfg, num_blocks, 4, 256,
                      enable_prefix_caching=prefix_caching, **kw)


def _req(rid, prompt, max_tokens, arrival=1.0):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens), max_tokens,
                   frozenset(), arrival_time=arrival)


def _run(core) -> dict[str, list[EngineCoreOutput]]:
    seen: dict[str, list[EngineCoreOutput]] = {}
    while core.has_unfinished_requests():
        outs = core.step()
        assert isinstance(outs, EngineCoreOutputs) and outs.stats is not None
        for o in outs:
            seen.setdefault(o.request_id, []).append(o)
    return seen


def test_step_outputs_are_stamped_data_that_pickles():
    now = [10.0]
    core = _core(clock=lambda: now[0])
    core.add_request(_req("a", range(1, 10), 3, arrival=9.0))
    outs = core.step()
    assert outs.stats.num_scheduled_tokens == 9 and outs.stats.num_running == 1
    (first,) = outs
    assert (first.arrival_time, first.first_scheduled_time, first.first_token_time) == \
        (9.0, 10.0, 10.0)
    assert first.finished_time == 0.0 and first.finish_reason is None
    now[0] = 11.0
    seen = _run(core)
    last = seen["a"][-1]
    assert last.finish_reason == "length" and last.finished_time == 11.0
    back = pickle.loads(pickle.dumps(outs))
    assert list(back) == list(outs) and back.stats == outs.stats
    core.check_invariants()


def test_num_cached_tokens_is_set_from_the_prefix_cache():
    core = _core()
    prompt = list(range(1, 18))                           # 4 full blocks + 1 token
    core.add_request(_req("a", prompt, 2))
    _run(core)
    core.add_request(_req("b", prompt, 2))
    seen = _run(core)
    assert {o.num_cached_tokens for o in seen["b"]} == {16}
    stats = core.stats()
    assert stats.prefix_cache_hits == 16 and stats.prefix_cache_queries == 34
    core.check_invariants()


def test_finish_requests_returns_data_and_frees_blocks():
    core = _core(prefix_caching=False)
    core.add_request(_req("a", range(1, 9), 50))
    core.add_request(_req("b", range(1, 9), 50))
    core.step()
    done = core.finish_requests(["a", "missing"], FinishReason.STOP, "</s>")
    assert [(o.request_id, o.finish_reason, o.stop_reason, o.new_token_ids) for o in done] == \
        [("a", "stop", "</s>", [])]
    assert done[0].finished_time > 0 and done[0].first_token_time > 0
    assert core.finish_requests(["a"]) == []               # already finished: skipped
    stats = core.stats()
    assert (stats.num_running, stats.num_waiting) == (1, 0)
    core.finish_requests(["b"])
    stats = core.stats()
    assert stats.num_free_blocks == stats.num_total_blocks == 64
    core.check_invariants()


def test_engine_stats_counts_preemptions_and_steps():
    core = _core(prefix_caching=False, max_seqs=4, num_blocks=6)
    for i in range(3):
        core.add_request(_req(str(i), range(1 + i, 9 + i), 12))
    _run(core)
    stats = core.stats()
    assert isinstance(stats, EngineStats)
    assert stats.num_preemptions_total > 0
    assert stats.preemptions == {"recompute": stats.num_preemptions_total, "swap": 0}
    assert stats.num_steps == core.num_steps > 0
    core.check_invariants()


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _modules(*parts: str) -> list[Path]:
    return sorted((ROOT.joinpath(*parts)).rglob("*.py"))


def test_http_libraries_only_in_server_cli_and_bench_http_clients():
    allowed = {"server", "cli", "ray"}     # ray: the Ray Serve front door is an HTTP edge
    for path in _modules():
        rel = path.relative_to(ROOT)
        if rel.parts[0] in allowed or (rel.parts[0] == "bench" and rel.stem in
                                       {"http_client", "sse_stream", "soak", "soak_clients", "server_counters",
                                        "soak_probe"}):
            continue
        bad = {m for m in _imports(path) if m.split(".")[0] in HTTP}
        assert not bad, f"{rel} imports {sorted(bad)}"


def test_server_never_imports_cli_and_engine_never_imports_server():
    for path in _modules("server"):
        assert not any(m.startswith("conveyor.cli") for m in _imports(path)), path
    for path in _modules("engine") + _modules("core"):
        assert not any(m.startswith(("conveyor.server", "conveyor.cli"))
                       for m in _imports(path)), path


def test_nothing_above_the_engine_reads_core_internals():
    internals = {"kv_manager", "last_stats", "scheduler"}
    for path in _modules():
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {"core", "engine"}:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in internals:
                owner = node.value
                # config.scheduler is the SchedulerConfig, not the scheduler
                if node.attr == "scheduler" and isinstance(owner, ast.Name) and \
                        owner.id in {"config", "cfg", "engine_config"}:
                    continue
                raise AssertionError(f"{rel}:{node.lineno} reads .{node.attr}")
            if isinstance(node, ast.Attribute) and node.attr == "core" and \
                    isinstance(node.value, (ast.Name, ast.Attribute)):
                raise AssertionError(f"{rel}:{node.lineno} reaches into the engine's core")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and \
                    len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and \
                    node.args[1].value in internals | {"core"}:
                raise AssertionError(f"{rel}:{node.lineno} probes .{node.args[1].value}")
