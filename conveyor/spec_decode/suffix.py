"""Suffix-index drafts: a variable-order continuation model over the request's own prompt and
output and, optionally, the outputs of the last finished requests of the same tenant (agents'
repetitive loops).

The index maps every context of ``n_min``..``n_max`` tokens seen in a sequence to counts of the
token that followed it. A draft extends the request's tokens one token at a time with the most
frequent continuation of the longest context found (the request's own index first, then the
shared one), so it follows a repeated passage across branches a single n-gram match would miss. As for
``ngram``, a draft is at most twice as long as the context its first token was matched on.
Each request's index covers exactly its committed tokens (extended incrementally); the shared
indices (one per tenant scope) hold the outputs of at most ``max_requests`` finished requests
in all (oldest evicted).
"""

from __future__ import annotations

from collections import deque


class SuffixIndex:
    """Context (tuple of tokens) -> {next token: count} (plain dicts: this runs on every step)."""

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.table: dict[tuple[int, ...], dict[int, int]] = {}

    def update(self, tokens: list[int], start: int, sign: int = 1) -> None:
        """Count (sign=1) or uncount (sign=-1) the continuations at positions ``start..``."""
        table, n_min, n_max = self.table, self.n_min, self.n_max
        for p in range(max(start, n_min), len(tokens)):
            token = tokens[p]
            for n in range(n_min, min(n_max, p) + 1):
                key = tuple(tokens[p - n:p])
                counts = table.get(key)
                if counts is None:
                    counts = table[key] = {}
                c = counts.get(token, 0) + sign
                if c > 0:
                    counts[token] = c
                else:
                    counts.pop(token, None)
                    if not counts:
                        del table[key]

    def next_token(self, context: list[int]) -> tuple[int, int] | None:
        """(length of the longest matching context, its most frequent next token, the first
        seen among equals) or None."""
        for n in range(min(self.n_max, len(context)), self.n_min - 1, -1):
            counts = self.table.get(tuple(context[len(context) - n:]))
            if counts:
                return n, max(counts, key=counts.__getitem__)
        return None


class SuffixProposer:
    """Per-request suffix indices plus, per history scope, one over finished requests' outputs.

    A request's drafts come from its own tokens and from the finished outputs of its own scope
    only (``core.speculation.history_scope``: its tenant and cache salt), never from another
    tenant's text. The shared indices hold at most ``max_requests`` finished outputs in all
    (oldest evicted first, whatever its scope), so memory is bounded however many tenants come.
    """

    def __init__(self, n_min: int, n_max: int, max_requests: int):
        self.n_min, self.n_max = n_min, n_max
        self.max_requests = max_requests
        self.own: dict[str, tuple[SuffixIndex, list[int], str]] = {}  # index, indexed, scope
        self.shared: dict[str, SuffixIndex] = {}
        self.finished: deque[tuple[str, list[int]]] = deque()

    def propose(self, requests: dict[str, tuple[list[int], int]],
                scopes: dict[str, str] | None = None) -> dict[str, list[int]]:
        drafts = {}
        for rid, (tokens, k) in requests.items():
            scope = (scopes or {}).get(rid, "")
            index = self._own_index(rid, tokens, scope)
            d = self._extend(index, self.shared.get(scope), tokens, k)
            if d:
                drafts[rid] = d
        return drafts

    def _own_index(self, rid: str, tokens: list[int], scope: str) -> SuffixIndex:
        index, seen, _ = self.own.get(rid, (None, None, None))
        if index is None:
            index, seen = SuffixIndex(self.n_min, self.n_max), []
        start = len(seen)
        seen.extend(tokens[start:])
        index.update(seen, start)
        self.own[rid] = (index, seen, scope)
        return index

    def _extend(self, index: SuffixIndex, shared: SuffixIndex | None, tokens: list[int],
                k: int) -> list[int]:
        context, drafts = list(tokens[-self.n_max:]), []
        while len(drafts) < k:
            mine = index.next_token(context)
            theirs = shared.next_token(context) if shared is not None else None
            best = mine if theirs is None or (mine is not None and mine[0] >= theirs[0]) \
                else theirs
            if best is None:
                break
            if not drafts:
                k = min(k, 2 * best[0])   # as long as the evidence: twice the matched context
            drafts.append(best[1])
            context = context[1:] + [best[1]] if len(context) >= self.n_max else \
                context + [best[1]]
        return drafts

    def drop(self, request_id: str, finished: bool) -> None:
        _, seen, scope = self.own.pop(request_id, (None, None, ""))
        if not (finished and seen and self.max_requests):
            return
        self.shared.setdefault(scope, SuffixIndex(self.n_min, self.n_max)).update(seen, 0)
        self.finished.append((scope, seen))
        if len(self.finished) > self.max_requests:
            old_scope, old = self.finished.popleft()
            index = self.shared[old_scope]
            index.update(old, 0, sign=-1)
            if not index.table:
                del self.shared[old_scope]
