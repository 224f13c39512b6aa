"""Rank 0's handle on its worker processes: start them, send each step, notice a death, stop them.

``TPWorkerGroup.start`` spawns ranks 1..N-1 (``torch.multiprocessing``, spawn: no forked copy
of rank 0's threads or model), waits for each to report "ready" (or its error, or its exit) and
only then joins the process group, so a worker that fails to load is reported by name instead of
leaving rank 0 waiting in a rendezvous. Each worker has its own pipe: ``send`` pickles a message
once and writes it to every pipe (vLLM broadcasts through a shared-memory ring; a pipe per worker
is the simple version of the same thing, and its closing is what ends a worker when rank 0 dies).

Invariants: no worker outlives the group: ``close`` (engine shutdown) stops them, a garbage-
collected or forgotten group is reaped by a finalizer at exit, and the workers end themselves
when rank 0 dies (``worker``). ``failure()`` names a dead worker; the runner calls it before
every step and after a failed forward, so a crash fails the engine with that message.
"""

from __future__ import annotations

import pickle
import time
import weakref

import torch
import torch.multiprocessing as mp

from conveyor.distributed.comm import TPComm, open_store
from conveyor.distributed.worker import WorkerSpec, rank_device, worker_main
from conveyor.errors import TensorParallelError

_START_TIMEOUT_S = 600.0     # loading a shard (the whole checkpoint is read, then sliced)
_STOP_TIMEOUT_S = 5.0


class TPWorkerGroup:
    """Ranks 1..N-1 of one engine, and rank 0's ``comm`` (its end of the process group)."""

    def __init__(self, procs: list, conns: list, comm: TPComm | None = None):
        self.procs, self.conns, self.comm = procs, conns, comm
        self.errors: dict[int, str] = {}          # rank -> the error it sent
        self._finalizer = weakref.finalize(self, _reap, procs, conns)

    @classmethod
    def start(cls, spec: WorkerSpec) -> "TPWorkerGroup":
        """Spawn the workers, wait until every one has loaded, connect rank 0. Raises
        ``TensorParallelError`` (after stopping the others) when one fails to start."""
        store = open_store(spec.tp_size)
        spec = _with_port(spec, store.port)
        ctx = mp.get_context("spawn")
        procs, conns = [], []
        group = cls(procs, conns)
        try:
            for rank in range(1, spec.tp_size):
                parent, child = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=worker_main, args=(rank, spec, child), daemon=True,
                                   name=f"conveyor-tp-rank{rank}")
                proc.start()
                child.close()             # only the worker holds its end: EOF when rank 0 dies
                procs.append(proc)
                conns.append(parent)
            group._wait_ready()
            group.comm = TPComm(store, 0, spec.tp_size, rank_device(spec.device, 0))
        except BaseException:
            group.close()
            raise
        return group

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            while not conn.poll(0.05):
                if not proc.is_alive() or time.monotonic() > deadline:
                    self._collect_errors()
                    raise TensorParallelError(f"tensor-parallel rank {rank} did not start: "
                                              f"{self._describe(rank, proc)}")
            reply = conn.recv()
            if reply[0] != "ready":
                self.errors[rank] = reply[1]
                raise TensorParallelError(f"tensor-parallel rank {rank} failed to load: {reply[1]}")

    def send(self, msg: tuple) -> None:
        """Hand ``msg`` to every worker; ``TensorParallelError`` if one can no longer take it."""
        payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self.conns:
            try:
                conn.send_bytes(payload)
            except OSError as exc:
                self.raise_failure(exc)

    def failure(self) -> str | None:
        """Why the group cannot step (a worker has exited), or None while all are alive."""
        dead = [(r, p) for r, p in enumerate(self.procs, start=1) if not p.is_alive()]
        if not dead:
            return None
        self._collect_errors()
        return "; ".join(f"tensor-parallel rank {r} {self._describe(r, p)}" for r, p in dead)

    def raise_failure(self, cause: BaseException) -> None:
        """Raise ``TensorParallelError`` naming the dead worker, else re-raise ``cause``. A
        worker that died mid-collective is noticed a moment after the collective fails."""
        for _ in range(40):
            why = self.failure()
            if why is not None:
                raise TensorParallelError(f"{why}; the engine cannot step any more") from cause
            time.sleep(0.025)
        raise cause

    def _collect_errors(self) -> None:
        for rank, conn in enumerate(self.conns, start=1):
            try:
                while conn.poll(0):
                    reply = conn.recv()
                    if reply[0] == "error":
                        self.errors[rank] = reply[1]
            except (EOFError, OSError):
                continue

    def _describe(self, rank: int, proc) -> str:
        code = proc.exitcode
        how = ("is still starting" if code is None else
               f"was killed by signal {-code}" if code < 0 else f"exited with status {code}")
        return how + (f" ({self.errors[rank]})" if rank in self.errors else "")

    def close(self) -> None:
        """Stop every worker (asks, then terminates what did not stop); idempotent."""
        if self.comm is not None:
            self.comm.close()
            self.comm = None
        self._finalizer()


def _reap(procs: list, conns: list) -> None:
    payload = pickle.dumps(("stop",))
    for conn in conns:
        try:
            conn.send_bytes(payload)
        except OSError:
            pass
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
    for conn in conns:
        conn.close()


def _with_port(spec: WorkerSpec, port: int) -> WorkerSpec:
    import dataclasses
    return dataclasses.replace(spec, store_port=port)


def default_num_threads(tp_size: int) -> int:
    """Each worker's share of the cores (rank 0 keeps the process's setting)."""
    return max(1, torch.get_num_threads() // tp_size)
