"""N-gram (prompt lookup) drafts: continue the latest earlier occurrence of the request's last
n tokens (n from ``prompt_lookup_max`` down to ``prompt_lookup_min``) in its own prompt + output.

A draft is at most ``2 n`` tokens long (and at most the ``k`` asked for): a match on one or two
tokens is a weak guess (a common word seen before), a match on eight is a passage being copied,
likely to go on for about as long again. Rejected draft tokens are not free (each is a token of
the verifying step), so sizing the draft by the evidence for it beats drafting ``k`` every time:
on the grounded chats of ``scripts/workloads/grounded_chats.jsonl`` replayed offline through the
measured step cost, ``k = 16`` with the cap gives 2.13x the tokens per second of no speculation,
against 2.07x without it (BENCHMARKS.md, issue 16).

Stateless and cheap: one vectorised scan of the history per proposal. Drafts are a
deterministic function of the committed tokens (their draft probability is 1).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Proposer(Protocol):
    """Proposes draft tokens after a step for some of the runner's requests."""

    def propose(self, requests: dict[str, tuple[list[int], int]],
                scopes: dict[str, str]) -> dict[str, list[int]]:
        """request id -> (committed token ids, most drafts) in; request id -> drafts out
        (requests without a proposal are absent). ``scopes``: request id -> its history scope
        (``core.speculation.history_scope``); only requests of one scope may share history."""
        ...

    def drop(self, request_id: str, finished: bool) -> None:
        """Forget a request (``finished``: for good; else preempted, it may come back)."""
        ...


def ngram_continuation(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> list[int]:
    """The tokens after the latest earlier occurrence of the longest suffix of ``tokens`` (length
    n_max down to n_min) that occurs before, at most ``min(k, 2 n)`` of them; [] when none does."""
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = tokens[length - n:]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)  # [L-n, n]
        starts = np.flatnonzero((windows == suffix).all(axis=1))
        if len(starts):
            start = int(starts[-1]) + n
            return tokens[start:start + min(k, 2 * n)].tolist()
    return []


class NgramProposer:
    """Prompt-lookup drafts over each request's own tokens."""

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max

    def propose(self, requests: dict[str, tuple[list[int], int]],
                scopes: dict[str, str] | None = None) -> dict[str, list[int]]:
        drafts = {}
        for rid, (tokens, k) in requests.items():
            d = ngram_continuation(np.asarray(tokens, dtype=np.int64), self.n_min, self.n_max, k)
            if d:
                drafts[rid] = d
        return drafts

    def drop(self, request_id: str, finished: bool) -> None:
        pass
