"""KV cache events: the core's event log replays to the pool's cached hashes, the ZMQ publisher
speaks vLLM's wire format (live PUB and replay ROUTER), and bad configs are one-line errors."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq

from conftest import run_engine
from conveyor.config import SchedulerConfig
from conveyor.core.engine_core import EngineCore
from conveyor.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from conveyor.core.request import Request
from conveyor.engine.llm_engine import LLMEngine
from conveyor.errors import ConfigError
from conveyor.kv_events.config import KVEventsConfig
from conveyor.kv_events.wire import decode_batch, encode_batch, external_hash
from conveyor.sampling_params import SamplingParams
from fake_runner import FakeRunner


class CacheModel:
    """What a KV-aware router believes is cached, built from events alone."""

    def __init__(self):
        self.hashes: set = set()

    def apply(self, event) -> None:
        if isinstance(event, dict):
            kind, hashes = event["type"], event.get("block_hashes", [])
        else:
            kind, hashes = type(event).__name__, getattr(event, "block_hashes", ())
        if kind == "BlockStored":
            assert not self.hashes & set(hashes), "stored a hash the cache already held"
            self.hashes |= set(hashes)
        elif kind == "BlockRemoved":
            assert set(hashes) <= self.hashes, "removed a hash the cache did not hold"
            self.hashes -= set(hashes)
        else:
            self.hashes.clear()


def _request(rid: str, tokens: list[int], max_tokens: int) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True), max_tokens,
                   frozenset(), 1.0)


def test_core_events_track_the_pool_step_by_step():
    """Shared prefixes, eviction from a small pool and preemption: after every step the hashes
    the events describe are exactly the pool's."""
    bs = 4
    core = EngineCore(FakeRunner(bs), SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4),
                      num_blocks=20, block_size=bs, max_model_len=256,
                      enable_prefix_caching=True, record_kv_events=True)
    shared = list(range(1, 13))                                   # three full blocks
    for i in range(10):
        prompt = shared + [100 + i * 17 + j for j in range(6 + i % 3)]
        if i % 4 == 3:
            prompt = [900 + i * 31 + j for j in range(14)]            # shares nothing
        core.add_request(_request(f"r{i}", prompt, 12 + 3 * (i % 4)))
    model, stored_blocks = CacheModel(), 0
    while core.has_unfinished_requests():
        core.step()
        for event in core.take_kv_events():
            model.apply(event)
            if isinstance(event, BlockStored):
                assert len(event.token_ids) == bs * len(event.block_hashes)
                assert event.block_size == bs
                stored_blocks += len(event.block_hashes)
        assert model.hashes == core.kv_manager.pool.cached_hashes()
    core.check_invariants()
    assert core.stats().num_preemptions_total > 0 and core.kv_manager.pool.num_evictions > 0
    assert stored_blocks > len(model.hashes) > 0                  # some were removed again
    assert core.reset_prefix_cache()
    (cleared,) = core.take_kv_events()
    assert isinstance(cleared, AllBlocksCleared) and not core.kv_manager.pool.cached_hashes()


def test_no_events_are_recorded_unless_asked():
    core = EngineCore(FakeRunner(4), SchedulerConfig(), num_blocks=8, block_size=4,
                      max_model_len=64, enable_prefix_caching=True)
    core.add_request(_request("a", list(range(9)), 4))
    while core.has_unfinished_requests():
        core.step()
    assert core.kv_events is None and core.take_kv_events() == []
    assert core.kv_manager.pool.cached_hashes()


def test_reset_is_refused_while_a_block_is_held():
    core = EngineCore(FakeRunner(4), SchedulerConfig(), num_blocks=8, block_size=4,
                      max_model_len=64, enable_prefix_caching=True, record_kv_events=True)
    core.add_request(_request("a", list(range(9)), 4))
    core.step()
    assert not core.reset_prefix_cache()
    assert not any(isinstance(e, AllBlocksCleared) for e in core.take_kv_events())


# ---------------------------------------------------------------------------------- wire format
H1, H2 = bytes(range(16)), bytes(range(16, 32))


def test_map_encoding_is_vllms_tagged_maps_in_a_positional_batch():
    events = [BlockStored((H1, H2), None, tuple(range(8)), 4, cache_salt="s"),
              BlockRemoved((H1,)), AllBlocksCleared()]
    batch = msgpack.unpackb(encode_batch(12.5, events), raw=False)
    assert batch[0] == 12.5 and batch[2] == 0 and len(batch) == 3
    stored, removed, cleared = batch[1]
    assert list(stored) == ["type", "block_hashes", "parent_block_hash", "token_ids",
                            "block_size", "lora_id", "medium", "lora_name", "extra_keys",
                            "group_idx", "kv_cache_spec_kind"]         # tag first, field order
    assert stored["type"] == "BlockStored" and stored["parent_block_hash"] is None
    assert stored["block_hashes"] == [int.from_bytes(H1[8:], "big"), int.from_bytes(H2[8:], "big")]
    assert stored["token_ids"] == list(range(8)) and stored["block_size"] == 4
    assert stored["medium"] == "GPU" and stored["extra_keys"] == [["s"], None]
    assert removed == {"type": "BlockRemoved", "block_hashes": [external_hash(H1)],
                       "medium": "GPU", "group_idx": 0}
    assert cleared == {"type": "AllBlocksCleared"}


def test_array_encoding_is_the_older_positional_layout():
    events = [BlockStored((H2,), H1, (1, 2, 3, 4), 4), BlockRemoved((H2,)), AllBlocksCleared()]
    payload = encode_batch(1.0, events, "array")
    assert msgpack.unpackb(payload, raw=False)[1] == [
        ["BlockStored", [external_hash(H2)], external_hash(H1), [1, 2, 3, 4], 4, None, "GPU"],
        ["BlockRemoved", [external_hash(H2)], "GPU"], ["AllBlocksCleared"]]
    _, named, _ = decode_batch(payload)
    assert named[0]["parent_block_hash"] == external_hash(H1) and named[2]["type"] == \
        "AllBlocksCleared"


try:
    import msgspec
except ImportError:          # not a dependency: the check runs where vLLM's msgspec is installed
    msgspec = None

if msgspec is not None:      # vLLM's structs, written from vllm/distributed/kv_events.py
    class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list
        data_parallel_rank: int | None = None

    class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
        pass

    class Stored(KVCacheEvent, tag="BlockStored"):
        block_hashes: list[int]
        parent_block_hash: int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list | None = None
        group_idx: int | None = None
        kv_cache_spec_kind: str | None = None
        kv_cache_spec_sliding_window: int | None = None

    class Removed(KVCacheEvent, tag="BlockRemoved"):
        block_hashes: list[int]
        medium: str | None
        group_idx: int | None = None

    class Cleared(KVCacheEvent, tag="AllBlocksCleared"):
        pass

    class Batch(EventBatch):
        events: list[Stored | Removed | Cleared]

    class LegacyEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
        pass                 # before vLLM's switch to maps: every event a tagged array

    class LegacyStored(LegacyEvent, tag="BlockStored"):
        block_hashes: list[int]
        parent_block_hash: int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None

    class LegacyRemoved(LegacyEvent, tag="BlockRemoved"):
        block_hashes: list[int]
        medium: str | None

    class LegacyCleared(LegacyEvent, tag="AllBlocksCleared"):
        pass

    class LegacyBatch(EventBatch):
        events: list[LegacyStored | LegacyRemoved | LegacyCleared]


@pytest.mark.skipif(msgspec is None, reason="msgspec is not installed")
def test_vllms_own_msgspec_structs_decode_the_map_encoding():
    """Decoded with vLLM's struct definitions, and re-encoded by msgspec byte for byte."""
    payload = encode_batch(3.0, [BlockStored((H1,), None, (5, 6), 2), BlockRemoved((H1,)),
                                 AllBlocksCleared()])
    batch = msgspec.msgpack.Decoder(type=Batch).decode(payload)
    assert batch.events[0].block_hashes == [external_hash(H1)] and batch.events[0].medium == "GPU"
    assert isinstance(batch.events[2], Cleared) and batch.data_parallel_rank == 0
    assert msgspec.msgpack.encode(batch) == payload         # byte for byte what msgspec writes
    legacy = encode_batch(3.0, [BlockStored((H2,), H1, (5, 6), 2), BlockRemoved((H2,)),
                                AllBlocksCleared()], "array")
    old = msgspec.msgpack.Decoder(type=LegacyBatch).decode(legacy)
    assert old.events[0].parent_block_hash == external_hash(H1)
    assert isinstance(old.events[2], LegacyCleared) and msgspec.msgpack.encode(old) == legacy


# ----------------------------------------------------------------------------- ZMQ, end to end
class Subscriber:
    """A SUB socket on its own thread, keeping every ``(topic, seq, payload)`` it receives."""

    def __init__(self, endpoint: str, topic: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt_string(zmq.SUBSCRIBE, topic)
        self.sock.connect(endpoint)
        self.messages: list[tuple[bytes, int, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            if self.sock.poll(20):
                topic, seq, payload = self.sock.recv_multipart()
                self.messages.append((topic, int.from_bytes(seq, "big"), payload))

    def wait_for(self, seq: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (not self.messages or self.messages[-1][1] < seq):
            time.sleep(0.01)

    def close(self):
        self._stop.set()
        self._thread.join()
        self.sock.close(linger=0)
        self.ctx.term()


def _replay(endpoint: str, start: int) -> list[tuple[int, bytes]]:
    """vLLM's replay protocol: ``[b"", start]`` from a DEALER (a REQ socket would take only the
    first of the many replies), then ``[b"", seq, payload]`` per batch until seq -1."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send_multipart((b"", start.to_bytes(8, "big")))
    got = []
    try:
        while sock.poll(5000):
            _, seq, payload = sock.recv_multipart()
            if int.from_bytes(seq, "big", signed=True) == -1:
                return got
            got.append((int.from_bytes(seq, "big"), payload))
        raise AssertionError("replay ended without its end marker")
    finally:
        sock.close(linger=0)
        ctx.term()


def test_zmq_subscriber_replays_a_real_engine_workload(tiny_llama_dir, tmp_path):
    cfg = {"enable_kv_cache_events": True, "publisher": "zmq",
           "endpoint": f"ipc://{tmp_path}/kv.pub", "replay_endpoint": f"ipc://{tmp_path}/kv.rep",
           "topic": "kv-events", "buffer_steps": 100_000}
    engine = LLMEngine.from_kwargs(model=tiny_llama_dir, dtype="float32", num_blocks=12,
                                   block_size=16, max_num_seqs=4, max_num_batched_tokens=64,
                                   kv_events_config=cfg)
    pub = engine.kv_event_publisher
    sub = Subscriber(pub.endpoint, "kv-events")
    time.sleep(0.3)                    # let the subscription reach the PUB socket (late joiner)
    try:
        shared = [(7 * j) % 20000 + 11 for j in range(48)]       # three shared full blocks
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        for wave in range(2):
            for i in range(4):
                tail = [(13 * j + 101 * i + 997 * wave) % 20000 + 3 for j in range(20)]
                engine.add_request((shared if wave == 0 else []) + tail, params)
            run_engine(engine)
        engine.check_invariants()
        assert engine.stats().num_preemptions_total > 0
        assert engine.core.kv_manager.pool.num_evictions > 0
        last = pub._next_seq - 1
        sub.wait_for(last)
        seqs = [seq for _, seq, _ in sub.messages]
        assert seqs == list(range(seqs[0], last + 1))          # +1 per batch, nothing lost
        replayed = _replay(pub.replay_endpoint, 0)
        assert [s for s, _ in replayed] == list(range(last + 1))
        assert [p for s, p in replayed if s >= seqs[0]] == [p for _, _, p in sub.messages]
        model = CacheModel()
        for _, payload in replayed:
            ts, events, rank = decode_batch(payload)
            assert rank == 0 and abs(ts - time.time()) < 600
            for event in events:
                model.apply(event)
        pool_hashes = {external_hash(h) for h in engine.core.kv_manager.pool.cached_hashes()}
        assert model.hashes == pool_hashes and pool_hashes
        assert engine.reset_prefix_cache()
        sub.wait_for(last + 1)
        _, seq, payload = sub.messages[-1]
        assert seq == last + 1 and decode_batch(payload)[1] == [{"type": "AllBlocksCleared"}]
        assert pub.num_dropped == 0
    finally:
        sub.close()
        engine.shutdown()


def test_a_full_queue_drops_batches_without_blocking():
    from conveyor.kv_events.publisher import ZmqEventPublisher
    pub = ZmqEventPublisher(KVEventsConfig(enable_kv_cache_events=True,
                                           endpoint="inproc://kv-drop", max_queue_size=1))
    try:
        for _ in range(200):
            pub.publish([AllBlocksCleared()])
        assert pub.num_dropped > 0 and pub._next_seq == 200    # dropped numbers are not reused
    finally:
        pub.close()


# ------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("text, message", [
    ("{bad", "is not JSON"),
    ('{"enable_kv_cache_events": true, "publisher": "kafka"}', "unknown publisher"),
    ('{"enable_kv_cache_events": true, "endpoint": "localhost:5557"}', "is not a ZMQ endpoint"),
    ('{"enable_kv_cache_events": true, "endpoint": "tcp://host"}', "is not a ZMQ endpoint"),
    ('{"enable_kv_cache_events": true, "hwm": -1}', "hwm must be"),
    ('{"enable_kv_cache_events": true, "port": 1}', "unknown key"),
    ('[1]', "JSON object"),
])
def test_bad_kv_events_config_is_a_config_error(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        KVEventsConfig.from_json(text)
    assert info.value.param == "kv_events_config" and "\n" not in str(info.value)


def test_vllm_defaults_resolve_the_publisher():
    assert KVEventsConfig.from_json('{"enable_kv_cache_events": true}').publisher == "zmq"
    off = KVEventsConfig.from_json("{}")
    assert off.publisher == "null" and not off.is_enabled


def test_an_endpoint_in_use_is_a_config_error(tmp_path):
    from conveyor.kv_events.publisher import ZmqEventPublisher
    cfg = KVEventsConfig(enable_kv_cache_events=True, endpoint="tcp://127.0.0.1:*")
    first = ZmqEventPublisher(cfg)
    try:
        taken = KVEventsConfig(enable_kv_cache_events=True,
                               endpoint=first.endpoint.replace("127.0.0.1", "*"))
        with pytest.raises(ConfigError, match="cannot bind"):
            ZmqEventPublisher(taken)
    finally:
        first.close()


def test_bad_kv_events_config_is_a_one_line_cli_error():
    proc = subprocess.run([sys.executable, "-m", "conveyor.cli", "generate", "hi",
                           "--kv-events-config", '{"enable_kv_cache_events": true, '
                                                 '"publisher": "kafka"}'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown publisher" in proc.stderr
