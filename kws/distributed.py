"""Training on several processes (torchrun): one model, each process a share of every batch.

`torchrun --nproc-per-node N -m kws train RECIPE` starts N processes (on one machine or, through
torchrun's rendezvous, on several); each trains on its slice of every batch of the recipe's
`train.batch_size`, and their gradients are averaged, weighed by slice size, before each step, so the
recipe's batch size and learning rate mean what they mean on one process. gloo on CPU, NCCL on CUDA.
A single process is `Processes()`: every method is then a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Processes:
    """This process's place among those training one model: rank (0 writes the files) and how many."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where tensors are exchanged: the GPU for NCCL

    @classmethod
    def join(cls, environment: Mapping[str, str] = os.environ, device: str = "cpu") -> Processes:
        """Join torchrun's process group when it launched this process (WORLD_SIZE above 1)."""
        world = int(environment.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        cuda = device in ("cuda", "auto") and torch.cuda.is_available()
        local_rank = int(environment.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), f"cuda:{local_rank}" if cuda else "cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's slice of a batch (every world-th item, from its rank)."""
        return batch[self.rank :: self.world]

    def average_gradients(self, model: nn.Module, share: float) -> None:
        """Sum every process's gradients, each weighed by `share` (its slice of the batch), in place."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for parameter in model.parameters():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            parameter.grad.mul_(share)
            dist.all_reduce(parameter.grad)

    def average_buffers(self, model: nn.Module) -> None:
        """BatchNorm's running statistics averaged over the processes, so every copy scores alike."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer.div_(self.world)

    def total(self, *values: float) -> list[float]:
        """Each value summed over the processes."""
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        summed = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        return summed.cpu().tolist()

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every process's copy of `tensor` (same shape everywhere), in rank order."""
        if self.world == 1:
            return [tensor]
        import torch.distributed as dist

        tensor = tensor.to(self.device)
        gathered = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(gathered, tensor)
        return [item.cpu() for item in gathered]

    def wait(self) -> None:
        """Until every process gets here (e.g. after rank 0 wrote a file the others read)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
