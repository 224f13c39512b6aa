"""What a benchmark run observed: one ``RequestRecord`` per request, one ``StepSample`` per step.

Owns the plain records that metrics, reports and plots read, and the conversion from the engine's
step log (``engine.step_log``, a list of ``StepStats``) into ``StepSample``. All times are
seconds since the run started (the first request's arrival), so records from an in-process run
and from an HTTP run read the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conveyor.core.outputs import StepStats


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it.

    arrival: when it was sent (HTTP) or when it arrived (in-process; queueing counts as latency).
    chunk_times: when each piece of output arrived (a streamed chunk or an engine step's delta);
    their gaps are the inter-token latencies. output_len counts tokens (server ``usage`` when given).
    tenant / priority: the request's group, for per-group breakdowns.
    """

    request_id: str
    prompt_len: int
    max_tokens: int
    arrival: float
    first_token: float | None = None
    finish: float | None = None
    output_len: int = 0
    chunk_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0
    error: str = ""
    tenant: str = ""                    # the tenant it was sent as ("" = none)
    priority: int = 0                   # its priority class (lower = more urgent)
    cached_tokens: int | None = None    # prompt tokens served from a prefix cache, when known

    @property
    def success(self) -> bool:
        return not self.error and self.finish is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finish is None else self.finish - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None for fewer than two tokens."""
        if self.first_token is None or self.finish is None or self.output_len < 2:
            return None
        return (self.finish - self.first_token) / (self.output_len - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


@dataclass(slots=True)
class StepSample:
    """One executed engine step, in the bench's own terms (independent of core's classes).

    slot_of: request id -> batch slot for every request holding a slot this step (including
    finished members a static batch keeps); useful_ids: requests that computed real tokens.
    """

    index: int
    num_running: int = 0
    num_waiting: int = 0
    num_scheduled_tokens: int = 0
    num_padding_tokens: int = 0
    num_new_admissions: int = 0
    num_preemptions: int = 0
    kv_usage: float = 0.0
    max_num_seqs: int = 1
    slot_of: dict[str, int] = field(default_factory=dict)
    useful_ids: list[str] = field(default_factory=list)
    start: float | None = None
    end: float | None = None


def samples_from_step_log(step_log: list[StepStats], t0: float,
                          max_num_seqs: int) -> list[StepSample]:
    """Convert the engine's ``StepStats`` (times in ``time.monotonic()``) into samples.

    ``max_num_seqs`` stands in where a step recorded none; when no step recorded ``slot_of``,
    slots are assigned here by ``assign_slots`` (exact for continuous batching, where a request
    holds its slot from first to last scheduled step).
    """
    samples = []
    for i, st in enumerate(step_log):
        samples.append(StepSample(
            index=i, num_running=st.num_running, num_waiting=st.num_waiting,
            num_scheduled_tokens=st.num_scheduled_tokens, num_padding_tokens=st.num_padding_tokens,
            num_new_admissions=st.num_new_admissions, num_preemptions=st.num_preemptions,
            kv_usage=st.kv_usage, max_num_seqs=st.max_num_seqs or max_num_seqs,
            slot_of=dict(st.slot_of), useful_ids=list(st.useful_request_ids),
            start=st.start_time - t0, end=st.end_time - t0))
    if samples and not any(s.slot_of for s in samples):
        assign_slots(samples)
    return samples


def assign_slots(samples: list[StepSample]) -> None:
    """Fill ``slot_of``: each request holds the lowest free slot from its first useful step to its
    last (interval colouring in order of first appearance)."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for s in samples:
        for rid in s.useful_ids:
            first.setdefault(rid, s.index)
            last[rid] = s.index
    free_at: list[int] = []          # slot -> first step index at which it is free again
    slot: dict[str, int] = {}
    for rid in sorted(first, key=lambda r: first[r]):
        open_slots = [k for k, t in enumerate(free_at) if t <= first[rid]]
        k = open_slots[0] if open_slots else len(free_at)
        if k == len(free_at):
            free_at.append(0)
        free_at[k] = last[rid] + 1
        slot[rid] = k
    pos = {s.index: s for s in samples}
    for rid, k in slot.items():
        for i in range(first[rid], last[rid] + 1):
            pos[i].slot_of[rid] = k
