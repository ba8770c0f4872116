"""Multi-process training through torch.distributed: launched by `torchrun`, DDP by default,
FSDP (fully_shard, FSDP2) as an option for students that do not fit one device.

    torchrun --nproc-per-node 2 -m edgellm.cli distill TEACHER -o OUT ...

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the run is
a single process. Backend: NCCL for CUDA, gloo for CPU. Every rank holds its own frozen teacher;
rank 0 evaluates, writes checkpoints, the log and the output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False  # a process group exists

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def mean(self, value: float, device) -> float:
        """The mean of a float over ranks (for logging the loss)."""
        if not self.active:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def gather_bytes(self, t):
        """Every rank's copy of a uint8 tensor of equal size (e.g. RNG states) -> list, on all ranks."""
        if not self.active:
            return [t]
        import torch
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return out


def setup(device: str) -> Dist:
    """Join the process group torchrun describes in the environment (or run as one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, active=True)


def teardown(d: Dist, ok: bool = True) -> None:
    """Leave the process group; `ok` = this rank finished normally (only then wait for the others)."""
    if d.active:
        import torch.distributed as dist

        if dist.is_initialized():
            # Wait for every rank (rank 0 is still writing the output) before tearing gloo down:
            # a rank that destroys its group and exits early aborted now and then with
            # "terminate called without an active exception" (seen in a 2-process FSDP run).
            if ok:
                dist.barrier()
            dist.destroy_process_group()
        if ok:
            # The barrier made that abort rare, not impossible: it came back once more in a
            # fresh-clone `make test` on a loaded machine (2-process FSDP, rank 1, exit -6 after
            # the output was written). It comes from gloo's threads during the interpreter's
            # finalization, so a rank that finished leaves without one: nothing is left to do
            # (rank 0 wrote and renamed the output before the barrier).
            import sys

            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def wrap(student, d: Dist, device: str, fsdp: bool):
    """DDP (or FSDP2 with --fsdp) around the student; the bare module when single-process."""
    if fsdp and d.active:
        from torch.distributed.fsdp import fully_shard

        from ..arch import decoder_layers

        for block in decoder_layers(student):  # shard block by block, then the rest (embeddings, head)
            fully_shard(block)
        fully_shard(student)
        return student
    if not d.active:
        return student
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(student, device_ids=[d.local_rank] if device == "cuda" else None)


def unwrap(model):
    return getattr(model, "module", model)
