"""Data-parallel FSDP2 for adapted models: the strategy and the one function that shards.

`FSDP2Strategy` is Lightning's `ModelParallelStrategy` with every process on the data-parallel
axis (no tensor parallelism) and a mixed-precision policy set in the config. Lightning calls the
task's `configure_model`, which calls `shard_model` after injecting the adapters. Units,
innermost first: each adapter (so its small parameters are gathered on their own), each
transformer block (the frozen base, one block at a time), then the root for the rest.
It runs on CPU with gloo too, which is how the tests drive two processes.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lightning_moe.adapters.files import replace_folder
from lightning_moe.errors import UserInputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str | None, argument: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise UserInputError(f"{argument}={name!r} is not a dtype; expected one of {sorted(DTYPES)} or null")
    return DTYPES[name]


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all processes, with adapter-only checkpoints.

    Args:
        param_dtype: Dtype the gathered parameters compute in (e.g. "bfloat16"); null keeps
            the stored dtype.
        reduce_dtype: Dtype gradients are reduced in across processes (e.g. "float32" with
            bf16 parameters); null uses param_dtype.
        save_distributed_checkpoint: Each process writes its own shard of the checkpoint (a
            folder); False gathers one file on rank 0.
        process_group_backend: "nccl", "gloo", ...; default: the device's usual one.
        timeout: Timeout of collective operations.
    """

    def __init__(
        self,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta = timedelta(minutes=30),
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.mixed_precision = MixedPrecisionPolicy(
            param_dtype=_dtype(param_dtype, "param_dtype"), reduce_dtype=_dtype(reduce_dtype, "reduce_dtype")
        )

    def setup_environment(self) -> None:
        # the parent's "auto" puts only the nodes on the data axis; here every process is on it
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """A sharded checkpoint is written into a staging folder beside the target, which then
        replaces it in one step (`replace_folder`): a crash mid-save keeps the previous one whole."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        staging = path.with_name(f".{path.name}.partial")
        if self.global_rank == 0 and staging.exists():
            shutil.rmtree(staging)  # left by a killed save
        self.barrier()
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier()
        if self.global_rank == 0:
            if path.is_file():
                path.unlink()
            replace_folder(staging, path)
        self.barrier()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the classes transformers and diffusers mark as not
    to be split (`_no_split_modules`), else the members of every `nn.ModuleList`. Such classes
    can nest (a diffusers up block holds transformer blocks), and FSDP2 units must be applied
    from the inside out, so every block comes before the blocks that contain it."""
    block_names = {
        name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or [])
    }
    if block_names:
        blocks = [module for module in model.modules() if type(module).__name__ in block_names]
    else:
        blocks = [
            block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module
        ]
    return blocks[::-1]  # modules() lists a container before its contents


def shard_model(
    model: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy, units: list[nn.Module]
) -> None:
    """`fully_shard` the given units (a task's adapters), then the blocks, then the root, in
    place, over a 1-D mesh."""
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel axis of Lightning's (data_parallel, tensor_parallel) mesh."""
    tensor_parallel = (
        mesh["tensor_parallel"].size() if "tensor_parallel" in (mesh.mesh_dim_names or ()) else 1
    )
    if tensor_parallel != 1:
        raise UserInputError(
            f"tensor_parallel_size={tensor_parallel}: adapters support data-parallel sharding only; "
            "set tensor_parallel_size=1 (FSDP2Strategy does)"
        )
    return mesh["data_parallel"] if mesh.ndim > 1 else mesh


def mixed_precision_policy(strategy: object) -> MixedPrecisionPolicy:
    """The strategy's policy (FSDP2Strategy), else compute in the stored dtype."""
    return getattr(strategy, "mixed_precision", None) or MixedPrecisionPolicy()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every process must call it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
