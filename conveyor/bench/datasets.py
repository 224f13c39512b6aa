"""Workloads read from files: conveyor's JSONL replay format and ShareGPT conversations.

JSONL: one JSON object per line with ``prompt`` (text or token ids) or ``messages`` (chat, rendered
with the tokenizer's chat template), ``max_tokens``, and optional ``arrival_s`` (seconds after the
start), ``priority``, ``tenant``, ``id``, ``ignore_eos`` (default true: exactly ``max_tokens``
tokens; false: the request may end at EOS). Blank lines are skipped. ShareGPT: a JSON list of
``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}``;
the first turn is the prompt and the second turn's token count is ``max_tokens``.

Every malformed input raises ``WorkloadError`` naming the file, the line or entry, and the field.
"""

from __future__ import annotations

import json
import math

import numpy as np

from conveyor.bench.workloads import BenchRequest, Workload, WorkloadError, stream_rng


def load_workload_file(path: str, tokenizer=None, num_requests: int | None = None,
                       max_tokens: int | None = None, seed: int = 0) -> Workload:
    """Read a ``.jsonl`` replay file or a ShareGPT ``.json`` file (told apart by content).

    ``num_requests`` keeps the first N rows (JSONL) or samples N conversations (ShareGPT);
    ``max_tokens`` overrides every request's.
    """
    text = _read(path)
    if text.lstrip().startswith("["):
        return load_sharegpt(path, tokenizer, num_requests, max_tokens, seed, text=text)
    workload = load_jsonl(path, tokenizer, max_tokens, text=text)
    if num_requests is not None:
        workload.requests = workload.requests[:num_requests]
        workload.spec["num_requests"] = len(workload.requests)
    return workload


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise WorkloadError(f"cannot read workload file {path!r}: {e}") from e


def load_jsonl(path: str, tokenizer=None, max_tokens: int | None = None,
               text: str | None = None) -> Workload:
    """Parse a JSONL replay file; ``max_tokens`` (if given) overrides every row's."""
    text = _read(path) if text is None else text
    reqs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise WorkloadError(f"{where}: expected a JSON object, got {type(row).__name__}")
        reqs.append(_row_to_request(row, where, len(reqs), tokenizer, max_tokens))
    if not reqs:
        raise WorkloadError(f"{path}: no requests in the file")
    has_arrivals = any(r.arrival_s > 0 for r in reqs)
    spec = {"kind": "jsonl", "path": path, "num_requests": len(reqs), "file_arrivals": has_arrivals}
    return Workload("jsonl", reqs, spec)


def _row_to_request(row: dict, where: str, index: int, tokenizer,
                    override_max_tokens: int | None) -> BenchRequest:
    prompt, ids = _row_prompt(row, where, tokenizer)
    max_tokens = override_max_tokens if override_max_tokens is not None else row.get("max_tokens")
    if not _is_int(max_tokens) or max_tokens < 1:
        raise WorkloadError(f"{where}: 'max_tokens' must be a positive integer, got {max_tokens!r}"
                            + ("" if "max_tokens" in row else " (or pass --output-len)"))
    arrival = row.get("arrival_s", 0.0)
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not (
            math.isfinite(arrival) and arrival >= 0):
        raise WorkloadError(f"{where}: 'arrival_s' must be a number >= 0, got {arrival!r}")
    priority, tenant = row.get("priority", 0), row.get("tenant", "")
    if not _is_int(priority):
        raise WorkloadError(f"{where}: 'priority' must be an integer, got {priority!r}")
    if not isinstance(tenant, str):
        raise WorkloadError(f"{where}: 'tenant' must be a string, got {tenant!r}")
    ignore_eos = row.get("ignore_eos", True)
    if not isinstance(ignore_eos, bool):
        raise WorkloadError(f"{where}: 'ignore_eos' must be true or false, got {ignore_eos!r}")
    prompt_len = len(ids) if ids is not None else _declared_len(row, prompt)
    return BenchRequest(str(row.get("id", index)), prompt, prompt_len, max_tokens, float(arrival),
                        priority, tenant, ids, ignore_eos)


def _row_prompt(row: dict, where: str, tokenizer) -> tuple[str | list[int], list[int] | None]:
    if ("prompt" in row) == ("messages" in row):
        raise WorkloadError(f"{where}: give exactly one of 'prompt' or 'messages'")
    if "messages" in row:
        _check_messages(row["messages"], where, tokenizer)
        text = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True)
        return text, tokenizer.encode_chat(row["messages"])
    prompt = row["prompt"]
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        return prompt, list(prompt)
    if not isinstance(prompt, str) or not prompt:
        raise WorkloadError(f"{where}: 'prompt' must be a non-empty string or a list of token ids")
    return prompt, tokenizer.encode(prompt) if tokenizer is not None else None


def _check_messages(messages, where: str, tokenizer) -> None:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        raise WorkloadError(f"{where}: 'messages' must be a non-empty list of "
                            '{"role": str, "content": str} objects')
    if tokenizer is None:
        raise WorkloadError(f"{where}: 'messages' need a tokenizer to apply the chat template; "
                            "pass --tokenizer (a model directory or .gguf file)")


def _declared_len(row: dict, prompt: str) -> int:
    declared = row.get("prompt_tokens")
    return declared if _is_int(declared) and declared > 0 else len(prompt.split())


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_sharegpt(path: str, tokenizer, num_requests: int | None = None,
                  max_tokens: int | None = None, seed: int = 0, max_len: int = 4096,
                  text: str | None = None) -> Workload:
    """Sample ``num_requests`` conversations (seeded; all if None) whose prompt + reply fit max_len.

    Conversations with fewer than two turns, a prompt under 4 tokens, or an over-long total are
    skipped, as vLLM's benchmark does. ``max_tokens`` overrides the reply length.
    """
    if tokenizer is None:
        raise WorkloadError(f"{path}: ShareGPT files need a tokenizer to count tokens; pass --tokenizer")
    try:
        data = json.loads(_read(path) if text is None else text)
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, list):
        raise WorkloadError(f"{path}: a ShareGPT file is a JSON list of conversations")
    order = stream_rng(seed, 0).permutation(len(data)) if num_requests is not None else np.arange(len(data))
    reqs = []
    for pos in order:
        if num_requests is not None and len(reqs) >= num_requests:
            break
        req = _sharegpt_entry(data[int(pos)], f"{path} entry {int(pos)}", tokenizer, max_tokens, max_len)
        if req is not None:
            req.request_id = str(len(reqs))
            reqs.append(req)
    if not reqs:
        raise WorkloadError(f"{path}: no usable conversation (each needs a prompt and a reply that "
                            f"fit in {max_len} tokens)")
    spec = {"kind": "sharegpt", "path": path, "num_requests": len(reqs), "seed": seed}
    return Workload("sharegpt", reqs, spec)


def _sharegpt_entry(entry, where: str, tokenizer, max_tokens, max_len) -> BenchRequest | None:
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        raise WorkloadError(f"{where}: expected an object with a 'conversations' list")
    if len(turns) < 2:
        return None
    values = [t.get("value") if isinstance(t, dict) else None for t in turns[:2]]
    if not all(isinstance(v, str) for v in values):
        raise WorkloadError(f"{where}: each turn needs a string 'value'")
    ids = tokenizer.encode(values[0])
    out_len = max_tokens
    if out_len is None:
        out_len = len(tokenizer.encode(values[1], add_special_tokens=False))
    if len(ids) < 4 or out_len < 1 or len(ids) + out_len > max_len:
        return None
    return BenchRequest("", values[0], len(ids), out_len, prompt_token_ids=ids)
