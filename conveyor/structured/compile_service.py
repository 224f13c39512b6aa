"""Grammar compilation off the engine thread: a small thread pool and an LRU cache of results.

``submit(spec)`` returns a ``concurrent.futures.Future`` of the compiled ``Grammar`` at once; the
compile runs on one of the service's threads. Invariants:

- One compile per spec key while its entry is cached: concurrent and later requests with the
  same spec share the future (a hit); the cache holds at most ``cache_size`` entries (least
  recently used evicted first). A spec that fails to compile stays cached as a failed future, so
  repeating it fails fast; a backend fault (anything but ``InvalidRequestError``) is not cached.
- Nobody waits longer than ``timeout_s`` for a compile: ``await_grammar`` (event loop) raises
  ``InvalidRequestError`` on timeout, and the engine (``request_state``) fails a request whose
  grammar is not ready by then. A timed-out compile keeps running (a thread cannot be killed;
  llguidance bounds its own work) and its result is kept for later requests.
- Thread-safe: the engine thread and the event loop both submit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import OrderedDict

from conveyor.errors import InvalidRequestError
from conveyor.structured.backend import Backend, Grammar, GrammarCompileError
from conveyor.structured.params import StructuredOutputsParams


class CompileService:
    """Compiles specs with ``backend`` on ``max_workers`` threads, caching by ``spec.key()``."""

    def __init__(self, backend: Backend, *, max_workers: int = 2, cache_size: int = 128,
                 timeout_s: float = 10.0):
        if cache_size < 1 or max_workers < 1 or not timeout_s > 0:
            raise ValueError("cache_size and max_workers must be >= 1 and timeout_s > 0")
        self.backend = backend
        self.cache_size = cache_size
        self.timeout_s = timeout_s
        self.num_hits = 0
        self.num_misses = 0
        self._cache: OrderedDict[str, concurrent.futures.Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers, thread_name_prefix="conveyor-grammar")

    def submit(self, spec: StructuredOutputsParams) -> concurrent.futures.Future:
        """The future of ``spec``'s grammar (cached, or compiling from now on)."""
        key = spec.key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                self.num_hits += 1
                return future
            self.num_misses += 1
            future = self._pool.submit(self.backend.compile, spec)
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        future.add_done_callback(lambda f: self._drop_if_fault(key, f))
        return future

    def _drop_if_fault(self, key: str, future: concurrent.futures.Future) -> None:
        if future.cancelled() or not isinstance(future.exception(),
                                                (InvalidRequestError, type(None))):
            with self._lock:
                if self._cache.get(key) is future:
                    del self._cache[key]

    async def await_grammar(self, spec: StructuredOutputsParams) -> Grammar:
        """Compile (or find) ``spec`` without blocking the event loop; raises
        ``InvalidRequestError`` if it does not compile or takes longer than ``timeout_s``."""
        future = self.submit(spec)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)),
                                          self.timeout_s)
        except asyncio.TimeoutError:
            raise compile_timeout_error(spec, self.timeout_s) from None
        except GrammarCompileError as exc:
            raise exc.for_spec(spec) from None

    def close(self) -> None:
        """Stop taking work; compiles already running finish on their own."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def compile_timeout_error(spec: StructuredOutputsParams, timeout_s: float) -> InvalidRequestError:
    return InvalidRequestError(
        f"{spec.param} took longer than {timeout_s:g} s to compile; simplify it", spec.param)
