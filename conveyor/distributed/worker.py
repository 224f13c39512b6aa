"""A tensor-parallel worker process (ranks 1..N-1): its shard of the model, its KV cache, its loop.

What a worker does, in order: load its shard (``build_model`` with its rank), allocate its KV
cache (the pool's block count and layout are rank 0's, with its own 1/N of the KV heads) and host
swap pool, tell rank 0 "ready" over its pipe, join the process group, then run each message rank
0 sends until "stop". Messages (pickled tuples, see ``runner``): ``("swap", out_pairs, in_pairs)``,
``("forward", StepInputs)``, ``("stop",)``.

Lifecycle invariants: a worker never outlives rank 0 (rank 0's end of the pipe closes when it
exits, however it exits, and the worker's blocking read then ends it; rank 0 dying inside a
collective fails that collective here); a failure here is sent to rank 0 as
``("error", text)`` when the pipe still works and ends the process with status 1.
"""

from __future__ import annotations

import logging
import pickle
import traceback
from dataclasses import dataclass

import torch

logger = logging.getLogger("conveyor.distributed")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What every worker needs to build its rank (plain data: it crosses the spawn)."""

    model_path: str
    dtype: str                        # a torch dtype's name, e.g. "float32"
    device: str                       # rank 0's device; CUDA rank r uses index base + r
    attention_backend: str
    quantization: str | None
    tp_size: int
    num_blocks: int                   # the pool's blocks (each cache has one scratch block more)
    block_size: int
    num_host_blocks: int | None       # swap pool blocks; None: no swap pool
    num_threads: int                  # torch intra-op threads of this process
    store_port: int = 0               # rank 0's TCPStore


def rank_device(device: str, rank: int) -> torch.device:
    """The device of rank ``rank`` when rank 0 runs on ``device``."""
    d = torch.device(device)
    if d.type == "cuda":
        return torch.device("cuda", (d.index or 0) + rank)
    return d


def worker_main(rank: int, spec: WorkerSpec, conn) -> None:
    """The process entry point (``torch.multiprocessing`` spawn target)."""
    logging.basicConfig(level=logging.WARNING)
    try:
        torch.set_num_threads(spec.num_threads)
        model, kv, host_kv = _load(rank, spec)
        conn.send(("ready",))
        from conveyor.distributed.comm import TPComm
        from conveyor.models.parallel import parallelize
        comm = TPComm.connect(spec.store_port, rank, spec.tp_size, rank_device(spec.device, rank))
        parallelize(model, comm)
        _serve(conn, model, kv, host_kv, comm.device)
    except EOFError:
        return                            # rank 0 is gone: nothing left to serve
    except BaseException as exc:  # noqa: BLE001 - whatever it was, rank 0 must hear of it
        text = f"{type(exc).__name__}: {exc}"
        logger.error("tensor-parallel rank %d failed: %s\n%s", rank, text, traceback.format_exc())
        try:
            conn.send(("error", text))
        except OSError:
            pass
        raise SystemExit(1) from None


def _load(rank: int, spec: WorkerSpec):
    from conveyor.runner.model_runner import allocate_kv_caches
    from conveyor.weights.loader import build_model
    dtype, device = getattr(torch, spec.dtype), rank_device(spec.device, rank)
    model = build_model(spec.model_path, dtype, device, spec.attention_backend,
                        spec.quantization, tp_rank=rank, tp_size=spec.tp_size)
    kv = allocate_kv_caches(model, spec.num_blocks, spec.block_size, dtype, device)
    host_kv = None
    if spec.num_host_blocks is not None:
        host_kv = allocate_kv_caches(model, spec.num_host_blocks - 1, spec.block_size, dtype,
                                     torch.device("cpu"))
    return model, kv, host_kv


@torch.inference_mode()
def _serve(conn, model, kv, host_kv, device: torch.device) -> None:
    from conveyor.distributed.runner import unpack_step
    from conveyor.runner.model_runner import swap_blocks
    while True:
        msg = pickle.loads(conn.recv_bytes())
        if msg[0] == "stop":
            return
        if msg[0] == "swap":
            swap_blocks(kv, host_kv, msg[1], msg[2])
        elif msg[0] == "forward":
            input_ids, positions, attn = unpack_step(msg[1], device)
            model(input_ids, positions, kv, attn)
        else:
            raise ValueError(f"unknown message {msg[0]!r} from rank 0")
