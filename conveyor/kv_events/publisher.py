"""``ZmqEventPublisher``: KV-event batches out over ZMQ PUB, on a thread of its own.

The engine thread calls ``publish(events)`` once per step that changed the prefix cache; that
stamps the batch with the next sequence number and the wall-clock time and puts it on a bounded
queue without waiting. The publisher thread encodes it (``wire``), sends ``[topic, seq, payload]``
on the PUB socket and keeps the last ``buffer_steps`` payloads for replay. Invariants:

- a step never blocks on a subscriber: a full queue drops the batch (counted in
  ``num_dropped``, logged), and the PUB socket drops for a subscriber past its high-water mark;
  a dropped batch's number is never reused, so subscribers see the gap;
- sequence numbers start at 0 and rise by 1 per batch, in the order the cache changed;
- replay (vLLM's protocol): a client sends the first sequence number it wants (8 bytes,
  big-endian) on the ROUTER socket and gets one ``[seq, payload]`` reply per buffered batch from
  there, then ``[-1, b""]``.

Each publisher has its own ZMQ context; ``close()`` stops the thread and closes the sockets.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

from conveyor.core.kv_events import KVEvent
from conveyor.errors import ConfigError
from conveyor.kv_events.config import KVEventsConfig
from conveyor.kv_events.wire import encode_batch

logger = logging.getLogger("conveyor.kv_events")

END_SEQ = (-1).to_bytes(8, "big", signed=True)
_POLL_S = 0.05


def _zmq():
    try:
        import zmq
    except ImportError:
        raise ConfigError("kv_events_config: the zmq publisher needs pyzmq and msgpack "
                          "(pip install 'conveyor[kv-events]')", "kv_events_config") from None
    return zmq


class ZmqEventPublisher:
    """Publishes ``KVEvent`` lists as vLLM ``KVEventBatch`` messages (see the module doc)."""

    def __init__(self, config: KVEventsConfig):
        zmq = _zmq()
        self.config = config
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._replay = None
        try:
            _attach(self._pub, config.endpoint, bind=_binds(config.endpoint))
            if config.replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                _attach(self._replay, config.replay_endpoint, bind=True)
        except ConfigError:
            self._close_sockets()
            raise
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT) or config.endpoint
        self.replay_endpoint = (self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
                                if self._replay is not None else None)
        self._topic = config.topic.encode("utf-8")
        self._queue: queue.Queue = queue.Queue(maxsize=config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._next_seq = 0
        self.num_published = 0          # batches sent (publisher thread)
        self.num_dropped = 0            # batches dropped on a full queue (engine thread)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()
        logger.info("KV events: publishing on %s%s", self.endpoint,
                    f", replay on {self.replay_endpoint}" if self.replay_endpoint else "")

    def publish(self, events: list[KVEvent]) -> None:
        """Queue one batch (never blocks; a full queue drops it and counts the drop)."""
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        try:
            self._queue.put_nowait((seq, time.time(), events))
        except queue.Full:
            self.num_dropped += 1
            if self.num_dropped == 1 or self.num_dropped % 1000 == 0:
                logger.warning("KV events: %d batch(es) dropped so far, the publisher queue "
                               "(max_queue_size %d) is full", self.num_dropped,
                               self.config.max_queue_size)

    def close(self, timeout: float = 1.0) -> None:
        """Send what is queued (for up to ``timeout`` seconds), stop, close the sockets."""
        self._stop.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._close_sockets()

    def _run(self) -> None:
        while True:
            if self._replay is not None and self._replay.poll(0):
                self._serve_replay()
            try:
                seq, ts, events = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            try:
                payload = encode_batch(ts, events, self.config.event_encoding)
                self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
                self._buffer.append((seq, payload))
                self.num_published += 1
            except Exception:  # noqa: BLE001 - a failed send must not stop later batches
                logger.exception("KV events: sending batch %d failed", seq)

    def _serve_replay(self) -> None:
        frames = self._replay.recv_multipart()
        if len(frames) != 3:
            logger.warning("KV events: ignored a replay request of %d frames (want 3)",
                           len(frames))
            return
        client, _, start = frames
        first = int.from_bytes(start, "big")
        for seq, payload in list(self._buffer):
            if seq >= first:
                self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", END_SEQ, b""))

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._ctx.term()


def _binds(endpoint: str) -> bool:
    """vLLM's rule: bind a wildcard, ipc or inproc address; connect to anything else."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def _attach(sock, endpoint: str, bind: bool) -> None:
    import zmq
    try:
        sock.bind(endpoint) if bind else sock.connect(endpoint)
    except zmq.ZMQError as exc:
        raise ConfigError(f"kv_events_config: cannot {'bind' if bind else 'connect'} "
                          f"{endpoint}: {exc}", "kv_events_config") from None
