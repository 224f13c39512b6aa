"""Data-only messages between the scheduler, the model runner and the engine front end.

Lists and ints only (no tensors), so the core never waits on a device and these can cross a
process boundary later. Every field says who fills it and what it means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conveyor.sampling_params import SamplingParams
from conveyor.structured.request_state import GrammarBitmask


@dataclass(slots=True)
class NewRequestData:
    """A request the runner has no state for: first scheduled, or resumed after preemption."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]      # non-empty only when resuming after preemption
    sampling_params: SamplingParams
    block_ids: list[int]             # full block table so far
    num_computed_tokens: int         # KV already present (0 unless a prefix cache hit)
    history_scope: str = ""          # whose earlier outputs may feed its drafts (speculation)


@dataclass(slots=True)
class CachedRequestData:
    """A request the runner already holds; only what changed since the last step."""

    request_id: str
    new_block_ids: list[int]         # blocks appended to its table this step
    num_computed_tokens: int         # before this step's tokens


@dataclass(slots=True)
class SchedulerOutput:
    """What to compute this step. Batch order: cached (running) requests, then new ones."""

    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]      # request id -> tokens to compute this step
    total_num_scheduled_tokens: int
    finished_request_ids: set[str]            # runner drops their state (finished since last step)
    preempted_request_ids: set[str]           # runner drops their state; they come back as new
    # Compute the static/dynamic baselines really spend on padding: each entry is one dummy
    # sequence the runner executes and discards (a prompt padded to the batch's longest, or a
    # finished member still holding its slot: length 1, logits computed too). Empty in continuous.
    padding_seq_lens: list[int] = field(default_factory=list)
    # Swap preemption: copy (device block -> host block) first, then (host -> device), before
    # the forward pass.
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    # Structured outputs: the allowed next tokens of the constrained requests that sample this
    # step (filled by EngineCore after schedule(); None when no such request samples).
    grammar: GrammarBitmask | None = None
    # Speculative decoding: request id -> the draft tokens scheduled for it this step; they are
    # the last len(drafts) of its num_scheduled_tokens (after its one uncomputed token), and the
    # runner verifies them on the logits of all 1 + len(drafts) positions. Absent: no drafts.
    scheduled_spec_tokens: dict[str, list[int]] = field(default_factory=dict)
    # request id -> at most how many drafts the runner should propose for it after sampling this
    # step (the core's adaptive decision); absent: propose none.
    num_drafts_to_propose: dict[str, int] = field(default_factory=dict)

    @property
    def num_padding_tokens(self) -> int:
        return sum(self.padding_seq_lens)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0 and not self.swap_out


@dataclass(slots=True)
class ModelRunnerOutput:
    """Tokens sampled this step, one row per token, for the requests whose KV caught up.

    A request has one row, or, with speculative decoding, 1 + (accepted drafts) consecutive
    rows: the accepted drafts in order, then the recovered (or bonus) token.
    """

    request_ids: list[str]                                   # rows that sampled, in batch order
    sampled_token_ids: list[int]
    logprobs: list[float] | None = None                      # of the sampled token, per row
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # Requests whose own work failed this step (request id -> why): a non-finite logit row, a
    # seed the generator refused, a row the sampler raised on. They got no token; the core
    # finishes them with "error" and never caches their blocks. Everyone else is unaffected.
    failed: dict[str, str] = field(default_factory=dict)
    # Speculative decoding: request id -> draft tokens proposed for its next step (only for
    # requests listed in SchedulerOutput.num_drafts_to_propose that sampled and found drafts).
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)


@dataclass(slots=True)
class EngineCoreOutput:
    """New tokens for one request after a step, and whether it finished; with the request's
    timings and counts as they are after this step (``stamp``), so the front end never reads a
    live ``Request``. Times are the core clock's (``time.monotonic()``), 0.0 = not reached."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None        # FinishReason value
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0              # prompt tokens served from the prefix cache
    error: str | None = None                # why it finished with "error" (e.g. its grammar)
    arrival_time: float = 0.0
    first_scheduled_time: float = 0.0
    first_token_time: float = 0.0
    finished_time: float = 0.0
    num_preemptions: int = 0

    def stamp(self, req) -> "EngineCoreOutput":
        """Copy ``req``'s timings and counts (a ``core.request.Request``) into this output."""
        self.num_cached_tokens, self.num_preemptions = req.num_cached_tokens, req.num_preemptions
        self.arrival_time, self.first_scheduled_time = req.arrival_time, req.first_scheduled_time
        self.first_token_time, self.finished_time = req.first_token_time, req.finished_time
        return self

    @classmethod
    def of_finished(cls, req) -> "EngineCoreOutput":
        """The no-token output of a request finished outside a step (abort, stop string)."""
        return cls(req.request_id, [], finish_reason=req.finish_reason.value,
                   stop_reason=req.stop_reason).stamp(req)


class EngineCoreOutputs(list):
    """What ``EngineCore.step()`` returns: the step's ``EngineCoreOutput`` objects (a list), and
    ``stats``, the ``StepStats`` of the step's schedule (``num_scheduled_tokens`` 0: none ran)."""

    def __init__(self, outputs=(), stats: "StepStats | None" = None):
        super().__init__(outputs)
        self.stats = stats


@dataclass(slots=True)
class StepStats:
    """What one step did, for metrics and benchmarks (times are ``time.monotonic()``)."""

    step_index: int = 0
    start_time: float = 0.0
    end_time: float = 0.0
    max_num_seqs: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_scheduled_tokens: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_padding_tokens: int = 0
    num_new_admissions: int = 0
    num_preemptions: int = 0
    kv_usage: float = 0.0
    slot_of: dict[str, int] = field(default_factory=dict)       # every slot holder -> slot index
    useful_request_ids: list[str] = field(default_factory=list)  # computed real tokens this step
    # The prefill budget (``core.prefill_budget``): the step-time target (None: no target), the
    # tokens a fresh prompt's chunk could take at step start, and the step's predicted seconds.
    target_step_s: float | None = None
    prefill_budget_tokens: int = 0
    predicted_step_s: float = 0.0
    decode_request_ids: list[str] = field(default_factory=list)  # of which decoded (1 new token)
    tenant_slots: dict[str, int] = field(default_factory=dict)   # computing requests per tenant

    @classmethod
    def of_step(cls, out: "SchedulerOutput", requests: dict, num_running: int, num_waiting: int,
                max_num_seqs: int, num_admitted: int, num_preempted: int, kv_usage: float,
                slot_of: dict[str, int]) -> "StepStats":
        """The stats of a step just scheduled; a 1-token step (plus its drafts) of a request past
        its prompt that already has output is a decode, every other scheduled token is prefill."""
        def is_decode(rid: str, n: int) -> bool:
            req = requests[rid]
            return n == 1 + len(out.scheduled_spec_tokens.get(rid, ())) and \
                req.num_computed_tokens >= req.num_prompt_tokens and req.num_output_tokens > 0
        decode_ids = [rid for rid, n in out.num_scheduled_tokens.items() if is_decode(rid, n)]
        decode = sum(out.num_scheduled_tokens[rid] for rid in decode_ids)
        tenants: dict[str, int] = {}
        for rid in out.num_scheduled_tokens:
            tenants[requests[rid].tenant] = tenants.get(requests[rid].tenant, 0) + 1
        return cls(max_num_seqs=max_num_seqs, num_running=num_running, num_waiting=num_waiting,
                   num_scheduled_tokens=out.total_num_scheduled_tokens,
                   num_prefill_tokens=out.total_num_scheduled_tokens - decode,
                   num_decode_tokens=decode, num_padding_tokens=out.num_padding_tokens,
                   num_new_admissions=num_admitted, num_preemptions=num_preempted,
                   kv_usage=kv_usage, slot_of=dict(slot_of),
                   useful_request_ids=list(out.num_scheduled_tokens),
                   decode_request_ids=decode_ids, tenant_slots=tenants)
