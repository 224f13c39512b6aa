"""The engine's structured-outputs front: request checks, per-request state, precompiling.

``LLMEngine`` owns one ``StructuredOutputManager``. It refuses what the engine could never honour
(a ``logit_bias`` id outside the vocabulary), gives each constrained (child) request its own
``StructuredRequest`` (the compile is submitted, never awaited, so ``add_request`` stays quick on
the engine thread), and lets the HTTP layer compile a spec before its response starts, so a bad
schema gets a 400 rather than a failed stream. The compile service (and its threads) is created
on the first constrained request; ``close()`` stops it.
"""

from __future__ import annotations

import threading
from typing import Any

from conveyor.errors import InvalidRequestError
from conveyor.sampling_params import SamplingParams
from conveyor.structured.backend import Backend
from conveyor.structured.compile_service import CompileService
from conveyor.structured.request_state import StructuredRequest

DEFAULT_COMPILE_TIMEOUT_S = 10.0


class StructuredOutputManager:
    """backend: compiles specs (default: llguidance over ``hf_tokenizer``); vocab_size: the
    model's logits width; compile_timeout_s: how long a request may wait for its grammar."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int], *,
                 compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S, cache_size: int = 128,
                 max_workers: int = 2, backend: Backend | None = None):
        if not compile_timeout_s > 0:
            raise InvalidRequestError("the structured outputs compile timeout must be > 0 s")
        self.vocab_size = vocab_size
        self.compile_timeout_s = compile_timeout_s
        self._hf, self._eos = hf_tokenizer, eos_token_ids
        self._backend = backend
        self._cache_size, self._max_workers = cache_size, max_workers
        self._service: CompileService | None = None
        self._lock = threading.Lock()

    @property
    def service(self) -> CompileService:
        with self._lock:
            if self._service is None:
                if self._backend is None:
                    from conveyor.structured.llguidance_backend import LLGuidanceBackend
                    self._backend = LLGuidanceBackend(self._hf, self.vocab_size, self._eos)
                self._service = CompileService(self._backend, max_workers=self._max_workers,
                                               cache_size=self._cache_size,
                                               timeout_s=self.compile_timeout_s)
            return self._service

    def check(self, params: SamplingParams) -> None:
        """Refuse ``logit_bias`` ids outside the vocabulary (``InvalidRequestError``)."""
        bad = [t for t in (params.logit_bias or {}) if t >= self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"logit_bias token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                "logit_bias")

    def request_state(self, params: SamplingParams, now: float) -> StructuredRequest | None:
        """A fresh constraint state for one (child) request, or None if it has none."""
        spec = params.structured_outputs
        if spec is None:
            return None
        return StructuredRequest(spec, self.service.submit(spec), now + self.compile_timeout_s,
                                 self.vocab_size, self.compile_timeout_s)

    async def precompile(self, params: SamplingParams) -> None:
        """Compile ``params``' spec off the event loop; raises ``InvalidRequestError`` (a 400)
        if it does not compile in time. A no-op for unconstrained requests."""
        if params.structured_outputs is not None:
            await self.service.await_grammar(params.structured_outputs)

    def close(self) -> None:
        if self._service is not None:
            self._service.close()
