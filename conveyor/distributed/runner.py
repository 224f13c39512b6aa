"""Rank 0's model runner under tensor parallelism, and the step inputs it sends to the workers.

``TPModelRunner`` is the ordinary ``ModelRunner`` (scheduling state, flat batch, sampling: rank 0
alone) whose forward is first handed to the workers: every rank then runs the same layers on the
same flat batch, each on its shard, meeting in the row-parallel all-reduces. KV swaps are sent
the same way, before the forward of their step, so every rank's cache moves the same blocks.
Only plain data crosses (``StepInputs``: arrays and the attention metadata's host lists): the
workers keep no request state at all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from conveyor.attention.backend import AttentionMetadata
from conveyor.core.outputs import ModelRunnerOutput, SchedulerOutput
from conveyor.distributed.group import TPWorkerGroup
from conveyor.errors import TensorParallelError
from conveyor.runner.input_batch import FlatBatch
from conveyor.runner.model_runner import ModelRunner


@dataclass(frozen=True, slots=True)
class StepInputs:
    """One forward's inputs as plain data: ``attn`` maps each ``AttentionMetadata`` field to a
    numpy array (its tensors) or the value itself (its host lists and ints)."""

    input_ids: np.ndarray             # [T] int64
    positions: np.ndarray             # [T] int64
    attn: dict


def pack_step(batch: FlatBatch) -> StepInputs:
    attn = {f.name: _plain(getattr(batch.attn, f.name)) for f in dataclasses.fields(batch.attn)}
    return StepInputs(_plain(batch.input_ids), _plain(batch.positions), attn)


def unpack_step(step: StepInputs, device: torch.device):
    """``(input_ids, positions, AttentionMetadata)`` on ``device``."""
    to = lambda a: torch.from_numpy(a).to(device) if isinstance(a, np.ndarray) else a  # noqa: E731
    attn = AttentionMetadata(**{k: to(v) for k, v in step.attn.items()})
    return to(step.input_ids), to(step.positions), attn


def _plain(value):
    return value.cpu().numpy() if isinstance(value, torch.Tensor) else value


class TPModelRunner(ModelRunner):
    """A ``ModelRunner`` on rank 0's shard whose every forward and swap also runs on ``workers``.
    ``execute`` raises ``TensorParallelError`` once a worker has died (the engine fails with it:
    the server's /health answers 503); ``shutdown`` stops the workers."""

    def __init__(self, *args, workers: TPWorkerGroup, **kwargs):
        super().__init__(*args, **kwargs)
        self.workers = workers

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if self.workers.comm is None:
            raise TensorParallelError("the tensor-parallel workers were shut down")
        why = self.workers.failure()
        if why is not None:
            raise TensorParallelError(f"{why}; the engine cannot step any more")
        return super().execute(sched)

    def _swap(self, sched: SchedulerOutput) -> None:
        if sched.swap_out or sched.swap_in:
            self.workers.send(("swap", sched.swap_out, sched.swap_in))
        super()._swap(sched)

    def _forward(self, batch: FlatBatch) -> torch.Tensor:
        self.workers.send(("forward", pack_step(batch)))
        try:
            return super()._forward(batch)
        except Exception as exc:  # noqa: BLE001 - a peer's death shows up here as a gloo error
            self.workers.raise_failure(exc)
            raise

    def shutdown(self) -> None:
        self.workers.close()
