"""Tensor parallelism across processes: rank 0 is the engine (scheduler, sampler, tokenizer) and
runs its shard of the model in-process; ranks 1..N-1 are worker processes (``group``) that each
hold their shard and their own KV cache and run the same forward on every step rank 0 sends them
(``runner``); the shards' partial sums meet in all-reduces over one torch.distributed process
group (``comm``: gloo on CPU, NCCL on CUDA). How the layers are split: ``models/parallel.py``.
"""
