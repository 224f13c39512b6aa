"""The collective that joins the shards: one gloo (CPU) or NCCL (CUDA) process group per engine.

The group is a ``ProcessGroup`` object over its own ``TCPStore``, not torch.distributed's default
group: nothing process-wide is initialised, so two engines (each with its workers) can live in
one process. Rank 0 opens the store on a free local port; the workers connect to it.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

# A collective waits this long for its peers (a long prefill on a slow, loaded CPU included).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def open_store(size: int) -> dist.TCPStore:
    """Rank 0's store on a free port of 127.0.0.1 (``store.port`` is the one the OS chose)."""
    return dist.TCPStore("127.0.0.1", 0, size, True, timeout=COLLECTIVE_TIMEOUT,
                         wait_for_workers=False)


class TPComm:
    """Rank ``rank`` of ``size`` in the engine's process group; ``all_reduce`` sums in place."""

    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device):
        """Blocks until every rank has joined (the store's rendezvous)."""
        self.rank, self.size, self.device = rank, size, device
        self._store = store            # the group reads it for as long as it lives
        if device.type == "cuda":
            torch.cuda.set_device(device)
            self.group = dist.ProcessGroupNCCL(store, rank, size)
        else:
            self.group = dist.ProcessGroupGloo(store, rank, size, COLLECTIVE_TIMEOUT)

    @classmethod
    def connect(cls, port: int, rank: int, size: int, device: torch.device) -> "TPComm":
        """A worker's side: join rank 0's store at ``port``."""
        store = dist.TCPStore("127.0.0.1", port, size, False, timeout=COLLECTIVE_TIMEOUT)
        return cls(store, rank, size, device)

    def all_reduce(self, x: torch.Tensor) -> None:
        self.group.allreduce([x]).wait()

    def close(self) -> None:
        """Drop the group (its sockets close; a peer blocked in a collective gets an error)."""
        self.group = None
        self._store = None
