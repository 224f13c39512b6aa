"""Suffix-index drafts: a variable-order continuation model over the request's own prompt and
output and, optionally, the outputs of the last finished requests (agents' repetitive loops).

The index maps every context of ``n_min``..``n_max`` tokens seen in a sequence to counts of the
token that followed it. A draft extends the request's tokens one token at a time with the most
frequent continuation of the longest context found (the request's own index first, then the
shared one), so it follows a repeated passage across branches a single n-gram match would miss.
Each request's index covers exactly its committed tokens (extended incrementally); the shared
index holds the outputs of at most ``max_requests`` finished requests (oldest evicted).
"""

from __future__ import annotations

from collections import Counter, deque


class SuffixIndex:
    """Context (tuple of tokens) -> Counter of the next token."""

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.table: dict[tuple[int, ...], Counter] = {}

    def update(self, tokens: list[int], start: int, sign: int = 1) -> None:
        """Count (sign=1) or uncount (sign=-1) the continuations at positions ``start..``."""
        for p in range(max(start, self.n_min), len(tokens)):
            for n in range(self.n_min, min(self.n_max, p) + 1):
                key = tuple(tokens[p - n:p])
                counts = self.table.setdefault(key, Counter())
                counts[tokens[p]] += sign
                if counts[tokens[p]] <= 0:
                    del counts[tokens[p]]
                    if not counts:
                        del self.table[key]

    def next_token(self, context: list[int]) -> tuple[int, int] | None:
        """(length of the longest matching context, its most frequent next token) or None."""
        for n in range(min(self.n_max, len(context)), self.n_min - 1, -1):
            counts = self.table.get(tuple(context[len(context) - n:]))
            if counts:
                return n, counts.most_common(1)[0][0]
        return None


class SuffixProposer:
    """Per-request suffix indices plus a shared one over finished requests' outputs."""

    def __init__(self, n_min: int, n_max: int, max_requests: int):
        self.n_min, self.n_max = n_min, n_max
        self.max_requests = max_requests
        self.own: dict[str, tuple[SuffixIndex, list[int]]] = {}   # index, tokens indexed
        self.shared = SuffixIndex(n_min, n_max)
        self.finished: deque[list[int]] = deque()

    def propose(self, requests: dict[str, tuple[list[int], int]]) -> dict[str, list[int]]:
        drafts = {}
        for rid, (tokens, k) in requests.items():
            index = self._own_index(rid, tokens)
            d = self._extend(index, tokens, k)
            if d:
                drafts[rid] = d
        return drafts

    def _own_index(self, rid: str, tokens: list[int]) -> SuffixIndex:
        index, seen = self.own.get(rid, (None, None))
        if index is None:
            index, seen = SuffixIndex(self.n_min, self.n_max), []
        start = len(seen)
        seen.extend(tokens[start:])
        index.update(seen, start)
        self.own[rid] = (index, seen)
        return index

    def _extend(self, index: SuffixIndex, tokens: list[int], k: int) -> list[int]:
        context, drafts = list(tokens[-self.n_max:]), []
        for _ in range(k):
            mine, shared = index.next_token(context), self.shared.next_token(context)
            best = mine if shared is None or (mine is not None and mine[0] >= shared[0]) \
                else shared
            if best is None:
                break
            drafts.append(best[1])
            context = context[1:] + [best[1]] if len(context) >= self.n_max else \
                context + [best[1]]
        return drafts

    def drop(self, request_id: str, finished: bool) -> None:
        index, seen = self.own.pop(request_id, (None, None))
        if finished and seen and self.max_requests:
            self.shared.update(seen, 0)
            self.finished.append(seen)
            if len(self.finished) > self.max_requests:
                self.shared.update(self.finished.popleft(), 0, sign=-1)
