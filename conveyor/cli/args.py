"""Engine flags shared by every subcommand, spelled as vLLM spells them."""

from __future__ import annotations

import argparse
import re

from conveyor.errors import InvalidRequestError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """'512MiB', '4GiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512MiB or 4GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct GGUF)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--quantization", "-q", default=None, choices=["int8"],
                   help="int8: int8 weights and per-token int8 activations in the layer GEMMs "
                        "(CPU, VNNI where present); accuracy and speed in BENCHMARKS.md")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache size in blocks")
    g.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="KV cache size in bytes (e.g. 2GiB); default: enough for max-num-seqs full contexts, at most 4GiB")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--no-chunked-prefill", action="store_true")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn automatic prefix caching off")
    g.add_argument("--prefix-cache-scope", default="tenant", choices=["tenant", "global"],
                   help="tenant: each tenant only hits its own cached prefixes (default); "
                        "global: share them across tenants (reveals shared prompts' cache hits)")
    g.add_argument("--batching", default="continuous", choices=["continuous", "static", "dynamic"],
                   help="scheduling policy; static/dynamic are the measured baselines")
    g.add_argument("--batch-timeout", type=float, default=None,
                   help="static/dynamic: launch a partial batch after this many seconds (30 / 0.05)")
    g.add_argument("--kv-allocation", default="paged", choices=["paged", "reservation"],
                   help="reservation: reserve prompt + max_tokens at admission (Orca-era baseline)")
    g.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap", "auto"],
                   help="swap: copy preempted KV to host memory; auto: per request, by estimated cost")
    g.add_argument("--swap-space", type=parse_bytes, default=1 << 30, help="host swap pool size (1GiB)")
    g.add_argument("--fair-scheduling", action="store_true",
                   help="weighted fair queueing of the token budget across tenants")
    g.add_argument("--tenant-weight", action="append", default=[], metavar="TENANT=WEIGHT",
                   help="weight of a tenant under --fair-scheduling (repeatable; default 1)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, vLLM spelling: {"method":"ngram"|"suffix"|'
                        '"draft_model","num_speculative_tokens":K,"prompt_lookup_max":N,'
                        '"prompt_lookup_min":M,"model":PATH}')
    g.add_argument("--attention-backend", default="auto", choices=["auto", "cpu", "sdpa", "reference"],
                   help="auto: the C++ paged kernel on CPU where it builds, else sdpa")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def engine_kwargs(args: argparse.Namespace) -> dict:
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
        if getattr(args, name) <= 0:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be positive")
    return dict(model=args.model, dtype=args.dtype, device=args.device,
                quantization=args.quantization,
                max_model_len=args.max_model_len, block_size=args.block_size,
                num_blocks=args.num_kv_blocks, kv_cache_bytes=args.kv_cache_memory,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                enable_chunked_prefill=not args.no_chunked_prefill, seed=args.seed,
                enable_prefix_caching=not args.no_prefix_caching,
                prefix_cache_scope=args.prefix_cache_scope, batching=args.batching,
                batch_timeout_s=args.batch_timeout, kv_allocation=args.kv_allocation,
                fair_scheduling=args.fair_scheduling, tenant_weights=_tenant_weights(args),
                preemption_mode=args.preemption_mode, swap_space_bytes=args.swap_space,
                speculative_config=args.speculative_config)


def _tenant_weights(args) -> dict[str, float]:
    weights = {}
    for item in args.tenant_weight:
        name, sep, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name or weights[name] <= 0:
            raise InvalidRequestError(f"--tenant-weight expects TENANT=WEIGHT with WEIGHT > 0, got {item!r}")
    return weights
