"""Synthetic benchmark workloads: length distributions, prompts cut from real text, shared prefixes.

Owns ``BenchRequest`` / ``Workload`` (what a benchmark sends) and the generators that build them.
Invariants:

- Every generator is a pure function of its arguments and ``seed``: the same seed gives the same
  workload, and prompts, output lengths and arrivals draw from separate seeded streams, so changing
  the request rate does not change the prompts.
- A synthetic prompt has exactly the requested number of tokens (as token ids). Its text is the
  tokenizer's decoding of those ids; a server that re-tokenizes it may count a few tokens more or
  less, which is why HTTP runs report the server's own ``usage`` counts when it sends them.
- Prompts start at a random offset in the built-in text, so unrelated prompts share no prefix
  (no accidental prefix-cache hits); the shared-prefix workload shares one on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from conveyor.errors import InvalidRequestError

# Written for this benchmark: ordinary English prose, so the model sees text rather than noise.
BUILTIN_TEXT = (
    "The harbour town woke slowly on winter mornings. Fishermen checked their nets by lantern light "
    "while the baker on the corner pulled the first loaves from an oven that had burned since "
    "midnight. Children walked to the school on the hill in pairs, arguing about the tides, the "
    "weather and whose turn it was to feed the rabbits kept behind the library. In the market square "
    "the clock was always four minutes slow, and nobody had ever agreed to fix it, because the whole "
    "town had quietly learned to arrive four minutes early. The ferry left at nine, crossed the grey "
    "water to the island, and came back at noon with letters, tools and the occasional visitor who "
    "had read about the lighthouse in an old travel guide. The lighthouse keeper, a patient woman "
    "who kept careful notes on every ship that passed, liked to say that the sea was a library with "
    "no catalogue: everything you needed was in there somewhere, but you had to learn how to look. "
    "In spring the hills turned green, the orchards flowered and the roads filled with carts carrying "
    "wool, apples and timber to the mainland. Summer brought storms that rolled in from the west, "
    "rattling shutters and sending the gulls inland. By autumn the harbour was quiet again, the "
    "boats were painted and repaired, and the long evenings were spent telling stories about the "
    "years when the river froze, the bridge washed away, and the whole town rebuilt it in a single "
    "month, working by torchlight, singing to keep warm."
)


class WorkloadError(InvalidRequestError):
    """A workload specification or file is invalid; the message says what to change."""


@dataclass(slots=True)
class BenchRequest:
    """One benchmark request.

    prompt: what an HTTP client sends (text when known, else token ids).
    prompt_token_ids: the exact tokens when known (the in-process engine uses them as is).
    arrival_s: seconds after the benchmark starts at which the request is sent.
    ignore_eos: generate exactly ``max_tokens`` (the default, so every system does the same work);
        False lets the request end at EOS (a chat answered as a user would see it).
    """

    request_id: str
    prompt: str | list[int]
    prompt_len: int
    max_tokens: int
    arrival_s: float = 0.0
    priority: int = 0
    tenant: str = ""
    prompt_token_ids: list[int] | None = None
    ignore_eos: bool = True


@dataclass(slots=True)
class Workload:
    """A named list of requests plus a JSON-able description of how it was made."""

    name: str
    requests: list[BenchRequest]
    spec: dict = field(default_factory=dict)

    @property
    def max_request_tokens(self) -> int:
        """The largest prompt + max_tokens of any request (the worst case a KV budget must hold)."""
        return max((r.prompt_len + r.max_tokens for r in self.requests), default=0)


def stream_rng(seed: int, stream: int) -> np.random.Generator:
    """An independent generator per purpose (0 prompts, 1 outputs, 2 arrivals, ...) for one seed."""
    return np.random.default_rng([seed, stream])


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A distribution of token counts, parsed from a short spec string.

    Specs: ``"128"`` fixed; ``"uniform:32:512"`` integers in [32, 512]; ``"normal:128:32"`` mean 128,
    std 32, rounded and clipped to [1, mean + 4 std] (``"normal:128:32:64:256"`` clips to [64, 256]);
    ``"32,128,512"`` an equal mix and ``"32:1,128:2,512:1"`` a weighted mix. A mix is drawn by quota:
    n samples hold each value round(n * weight) times (largest remainders), in a seeded random order.
    """

    kind: str
    values: tuple[float, ...]
    weights: tuple[float, ...] = ()

    @classmethod
    def parse(cls, spec: str | int) -> "LengthDist":
        text = str(spec).strip().lower()
        try:
            if "," in text:
                return cls._parse_mix(text)
            head, _, rest = text.partition(":")
            if head == "uniform":
                lo, hi = (int(v) for v in rest.split(":"))
                return cls._checked("uniform", (lo, hi), lo <= hi)
            if head == "normal":
                nums = tuple(float(v) for v in rest.split(":"))
                ok = len(nums) in (2, 4) and nums[1] >= 0 and (len(nums) == 2 or nums[2] <= nums[3])
                return cls._checked("normal", nums, ok)
            return cls._checked("fixed", (int(text),), True)
        except ValueError:
            pass
        raise WorkloadError(
            f"not a length distribution: {spec!r}; use 128, uniform:32:512, normal:128:32, "
            "normal:128:32:64:256, 32,128,512 or 32:1,128:2")

    @classmethod
    def _parse_mix(cls, text: str) -> "LengthDist":
        values, weights = [], []
        for item in text.split(","):
            value, _, weight = item.partition(":")
            values.append(int(value))
            weights.append(float(weight) if weight else 1.0)
        return cls._checked("mix", tuple(values), all(w > 0 for w in weights), tuple(weights))

    @classmethod
    def _checked(cls, kind, values, ok, weights=()) -> "LengthDist":
        bounds = values if kind != "normal" else values[2:]
        if not ok or any(v < 1 for v in bounds) or (kind == "normal" and values[0] < 1):
            raise ValueError(kind)
        return cls(kind, values, weights)

    def sample(self, n: int, rng: np.random.Generator) -> list[int]:
        """n token counts, each >= 1."""
        if self.kind == "fixed":
            return [int(self.values[0])] * n
        if self.kind == "uniform":
            return rng.integers(self.values[0], self.values[1], size=n, endpoint=True).tolist()
        if self.kind == "normal":
            mean, std = self.values[:2]
            lo, hi = self.values[2:] if len(self.values) == 4 else (1, mean + 4 * std)
            draws = np.rint(rng.normal(mean, std, size=n))
            return np.clip(draws, lo, max(lo, hi)).astype(int).tolist()
        return self._sample_mix(n, rng)

    def _sample_mix(self, n: int, rng: np.random.Generator) -> list[int]:
        share = np.asarray(self.weights) / sum(self.weights) * n
        counts = np.floor(share).astype(int)
        leftover = n - int(counts.sum())
        counts[np.argsort(-(share - counts), kind="stable")[:leftover]] += 1
        out = np.repeat(np.asarray(self.values, dtype=int), counts)
        return rng.permutation(out).tolist()

    def describe(self) -> str:
        if self.kind == "mix":
            return ",".join(f"{int(v)}:{w:g}" for v, w in zip(self.values, self.weights))
        if self.kind == "fixed":
            return str(int(self.values[0]))
        return ":".join([self.kind] + [f"{v:g}" for v in self.values])


class TextSource:
    """Token ids cut from ``BUILTIN_TEXT`` (cyclically), or random ids when there is no tokenizer.

    With a tokenizer, ``take`` returns real text tokens starting at a random offset, and ``text``
    decodes them. Without one, ids are uniform in [10, vocab_size) and ``text`` returns None.
    """

    def __init__(self, tokenizer=None, vocab_size: int = 32000):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        # The leading space makes the cyclic join read "... warm. The harbour ...".
        self.pool = tokenizer.encode(" " + BUILTIN_TEXT, add_special_tokens=False) if tokenizer else []

    def take(self, n: int, rng: np.random.Generator) -> list[int]:
        if not self.pool:
            return rng.integers(10, self.vocab_size, size=n).tolist()
        start = int(rng.integers(len(self.pool)))
        idx = (start + np.arange(n)) % len(self.pool)
        return np.asarray(self.pool)[idx].tolist()

    def text(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer else None


def _request(i: int, ids: list[int], max_tokens: int, source: TextSource) -> BenchRequest:
    text = source.text(ids)
    return BenchRequest(str(i), text if text is not None else ids, len(ids), int(max_tokens),
                        prompt_token_ids=ids)


def synthetic_workload(num_requests: int, prompt_len: LengthDist, output_len: LengthDist,
                       tokenizer=None, seed: int = 0, vocab_size: int = 32000) -> Workload:
    """num_requests prompts with lengths from ``prompt_len`` and max_tokens from ``output_len``."""
    _check_count(num_requests)
    source = TextSource(tokenizer, vocab_size)
    prompt_rng, out_rng = stream_rng(seed, 0), stream_rng(seed, 1)
    lens = prompt_len.sample(num_requests, prompt_rng)
    outs = output_len.sample(num_requests, out_rng)
    reqs = [_request(i, source.take(n, prompt_rng), m, source) for i, (n, m) in enumerate(zip(lens, outs))]
    spec = {"kind": "synthetic", "num_requests": num_requests, "prompt_len": prompt_len.describe(),
            "output_len": output_len.describe(), "seed": seed, "real_text": tokenizer is not None}
    return Workload("synthetic", reqs, spec)


def shared_prefix_workload(num_requests: int, prefix_len: int, question_len: LengthDist,
                           output_len: LengthDist, tokenizer=None, seed: int = 0,
                           vocab_size: int = 32000) -> Workload:
    """num_requests prompts = one shared ``prefix_len``-token system prompt + a distinct question."""
    _check_count(num_requests)
    if prefix_len < 1:
        raise WorkloadError(f"the shared prefix needs at least 1 token, got {prefix_len}")
    source = TextSource(tokenizer, vocab_size)
    prompt_rng, out_rng = stream_rng(seed, 0), stream_rng(seed, 1)
    prefix = source.take(prefix_len, prompt_rng)
    qlens = question_len.sample(num_requests, prompt_rng)
    outs = output_len.sample(num_requests, out_rng)
    reqs = [_request(i, prefix + source.take(q, prompt_rng), m, source)
            for i, (q, m) in enumerate(zip(qlens, outs))]
    spec = {"kind": "shared_prefix", "num_requests": num_requests, "prefix_len": prefix_len,
            "question_len": question_len.describe(), "output_len": output_len.describe(),
            "seed": seed, "real_text": tokenizer is not None}
    return Workload("shared-prefix", reqs, spec)


def _check_count(n: int) -> None:
    if n < 1:
        raise WorkloadError(f"a workload needs at least one request, got {n}")
