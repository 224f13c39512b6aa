"""Turns the core's per-step token deltas into ``RequestOutput`` objects.

Owns one incremental detokenizer per (child) request. When a stop string appears in the text, the
request is finished in the core right here, in the same step, so its blocks are freed before the
next schedule. A request with ``n > 1`` is one parent with n children in the core; its output
lists the children's completions in index order and is finished when all of them are. Every
``RequestOutput`` handed out holds its own completions: a later step never changes an output a
caller already has (the prompt token list is shared; nothing writes to it). Emitting an output is
O(new tokens): cumulative token and logprob lists are handed out as ``PrefixView`` objects, never
copied. A request's failure is its own: when one of its children finishes with "error" or its
output work raises (detokenizing, stop strings, logprobs), every unfinished child of that request
ends with "error" in the same step (blocks freed) and its final output carries ``error``; the
other requests in the step are processed as if nothing happened. It reads data only: the core's
``EngineCoreOutput`` objects (deltas, finish, timings and counts) and never a live ``Request``;
it finishes requests through ``EngineCore.finish_requests``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from conveyor.core.engine_core import EngineCore
from conveyor.core.outputs import EngineCoreOutput
from conveyor.core.request import FinishReason
from conveyor.sampling_params import SamplingParams
from conveyor.engine.outputs import (CompletionOutput, Logprob, PrefixView, RequestMetrics,
                                      RequestOutput)
from conveyor.tokenizer import IncrementalDetokenizer

logger = logging.getLogger("conveyor")


@dataclass(slots=True)
class _Child:
    request_id: str
    parent: "_Parent"
    detok: IncrementalDetokenizer
    completion: CompletionOutput
    metrics: RequestMetrics          # as of this child's latest core output
    num_cached_tokens: int = 0

    def note(self, out: EngineCoreOutput) -> None:
        """Take the timings and counts the core stamped on ``out``."""
        m = self.metrics
        m.arrival_time = out.arrival_time or m.arrival_time
        m.first_scheduled_time, m.first_token_time = out.first_scheduled_time, out.first_token_time
        m.finished_time, m.num_preemptions = out.finished_time, out.num_preemptions
        self.num_cached_tokens = out.num_cached_tokens


@dataclass(slots=True)
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[_Child] = field(default_factory=list)
    error: str | None = None          # why a child finished with "error", if one did

    @property
    def finished(self) -> bool:
        return all(c.completion.finished for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer, core: EngineCore):
        self.tokenizer = tokenizer
        self.core = core
        self.parents: dict[str, _Parent] = {}
        self.children: dict[str, _Child] = {}

    def add(self, request_id: str, prompt: str | None, prompt_ids: list[int],
            params: SamplingParams, child_ids: list[str], arrival_time: float) -> None:
        """Track a request whose ``child_ids`` (one per choice, in index order) the core runs."""
        parent = _Parent(request_id, prompt, prompt_ids, params)
        for i, child_id in enumerate(child_ids):
            detok = IncrementalDetokenizer(
                self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
            comp = CompletionOutput(i, "", [], logprobs=[] if params.logprobs is not None else None,
                                    cumulative_logprob=0.0 if params.logprobs is not None else None)
            child = _Child(child_id, parent, detok, comp, RequestMetrics(arrival_time))
            parent.children.append(child)
            self.children[child_id] = child
        self.parents[request_id] = parent

    def child_ids(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        return [] if parent is None else [c.request_id for c in parent.children]

    def process(self, core_outputs: list[EngineCoreOutput]) -> list[RequestOutput]:
        touched: dict[str, _Parent] = {}
        updated: set[str] = set()
        for out in core_outputs:
            child = self.children.get(out.request_id)
            if child is not None:
                self._apply_isolated(child, out)
                touched[child.parent.request_id] = child.parent
                updated.add(out.request_id)
        for parent in touched.values():
            if parent.error is not None:
                self._fail_unfinished(parent)
            for c in parent.children:
                if c.request_id not in updated:
                    _clear_delta(c.completion)       # a sibling that got no token this step
        return [self._emit(p) for p in touched.values()]

    def finish_aborted(self, child_ids: list[str],
                       finished: list[EngineCoreOutput]) -> list[RequestOutput]:
        """Mark children finished: as ``finished`` (the core's outputs of the ones it just
        finished, blocks already freed) says, or with "abort" when the core no longer held them."""
        by_id = {out.request_id: out for out in finished}
        touched = {}
        for cid in child_ids:
            child = self.children.get(cid)
            if child is not None and not child.completion.finished:
                _clear_delta(child.completion)
                out = by_id.get(cid)
                if out is not None:
                    child.note(out)
                child.completion.finish_reason = out.finish_reason if out is not None \
                    else FinishReason.ABORT.value
                touched[child.parent.request_id] = child.parent
        return [self._emit(p) for p in touched.values()]

    def _apply_isolated(self, child: _Child, out: EngineCoreOutput) -> None:
        """``_apply``; if it raises (detokenizing, stop strings, logprobs of this request), the
        request fails alone: the error is recorded and ``process`` finishes it."""
        try:
            self._apply(child, out)
        except Exception as exc:  # noqa: BLE001 - this request's own output work failed
            logger.warning("request %s failed while building its output", out.request_id,
                           exc_info=exc)
            _clear_delta(child.completion)
            child.parent.error = child.parent.error or \
                f"building the output failed: {type(exc).__name__}: {exc}"

    def _fail_unfinished(self, parent: _Parent) -> None:
        """A child failed, so the request failed: its unfinished children end with "error" too
        (their blocks are freed now) and its client gets ``parent.error``."""
        open_children = [c for c in parent.children if not c.completion.finished]
        finished = self.core.finish_requests([c.request_id for c in open_children],
                                             FinishReason.ERROR)
        for out in finished:
            self.children[out.request_id].note(out)
        for c in open_children:
            c.completion.finish_reason, c.completion.stop_reason = FinishReason.ERROR.value, None

    def _apply(self, child: _Child, out: EngineCoreOutput) -> None:
        child.note(out)
        comp = child.completion
        delta = child.detok.add_tokens(out.new_token_ids)
        comp.token_ids.extend(out.new_token_ids)
        comp.delta_token_ids = list(out.new_token_ids)
        comp.delta_logprobs = []
        if out.new_logprobs is not None and comp.logprobs is not None:
            for i, tok in enumerate(out.new_token_ids):
                lp = Logprob(tok, out.new_logprobs[i],
                             out.new_top_logprobs[i] if out.new_top_logprobs else [])
                comp.logprobs.append(lp)
                comp.delta_logprobs.append(lp)
                comp.cumulative_logprob += lp.logprob
        if child.detok.stop_matched is not None and out.finish_reason is None:
            for done in self.core.finish_requests([out.request_id], FinishReason.STOP,
                                                  child.detok.stop_matched):
                child.note(done)
            comp.finish_reason, comp.stop_reason = FinishReason.STOP.value, child.detok.stop_matched
        elif child.detok.stop_matched is not None:
            comp.finish_reason, comp.stop_reason = FinishReason.STOP.value, child.detok.stop_matched
        elif out.finish_reason is not None:
            if out.error is not None:
                child.parent.error = out.error
            delta += child.detok.flush()
            comp.finish_reason, comp.stop_reason = out.finish_reason, out.stop_reason
        comp.text = child.detok.output_text
        comp.delta_text = delta

    def _emit(self, parent: _Parent) -> RequestOutput:
        first = parent.children[0]
        metrics = RequestMetrics(
            first.metrics.arrival_time, first.metrics.first_scheduled_time,
            first.metrics.first_token_time,
            max(c.metrics.finished_time for c in parent.children) if parent.finished else 0.0,
            sum(c.metrics.num_preemptions for c in parent.children))
        out = RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids,
                            [_snapshot(c.completion, parent.finished) for c in parent.children],
                            parent.finished,
                            metrics, num_cached_tokens=first.num_cached_tokens,
                            error=parent.error if parent.finished else None)
        if parent.finished:
            self.parents.pop(parent.request_id, None)
            for c in parent.children:
                self.children.pop(c.request_id, None)
        return out


def _snapshot(comp: CompletionOutput, final: bool) -> CompletionOutput:
    """A copy the caller keeps, made in O(1): the cumulative lists are ``PrefixView`` objects of
    the processor's own append-only lists (a final output gets the lists themselves: nothing
    appends to them any more). The delta lists are shared: each step replaces them with new ones,
    never appends to them."""
    token_ids, logprobs = comp.token_ids, comp.logprobs
    if not final:
        token_ids = PrefixView(token_ids)
        logprobs = None if logprobs is None else PrefixView(logprobs)
    return CompletionOutput(
        comp.index, comp.text, token_ids, comp.finish_reason, comp.stop_reason, logprobs,
        comp.cumulative_logprob, comp.delta_text, comp.delta_token_ids, comp.delta_logprobs)


def _clear_delta(comp: CompletionOutput) -> None:
    comp.delta_text, comp.delta_token_ids, comp.delta_logprobs = "", [], []
