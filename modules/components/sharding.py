"""Sharded training of a LLaMA decoder (`trainer=fsdp`): FSDP2 per decoder layer, with activation checkpointing.

    decoder.layers[i]   checkpoint: its activations are recomputed in backward instead of kept (optional)
                        fully_shard: its weights live as 1/N shards (DTensors) on each of the N ranks, are gathered
                        just before its forward and again before its backward, and its gradients reduce-scattered
    decoder             fully_shard as the root group: the embedding, the final norm and lm_head (tied or not)
    everything else     untouched: Loong's frozen video tokenizer stays whole, in eval mode, on every rank

`Loong.configure_model` calls `shard_decoder` with the device mesh Lightning's `ModelParallelStrategy` builds;
`FSDP2Strategy` is that strategy with the settings this project needs (every process data-parallel, a single-file
checkpoint) and the activation-checkpointing switch `configure_model` reads.

Why FSDP2 under `ModelParallelStrategy` and not Lightning's `FSDPStrategy` (FSDP1): `FSDPStrategy` refuses a CPU
accelerator, so the sharded path could not be tested here, and FSDP2 shards each parameter as a DTensor in place:
parameter and state-dict names stay those of the unsharded model, so a sharded run's checkpoint is an ordinary
one (sample.py and `model.init_from` read it unchanged). The composable `checkpoint` used here (hooks on the layer)
keeps the names too; torch's `checkpoint_wrapper` would put each layer inside a wrapper module, adding
`_checkpoint_wrapped_module.` to its parameter names (state dicts strip it, `named_parameters` does not).
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed._composable import _get_registry, checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from modules.components.llama import LlamaDecoder


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure sharded data parallelism (FSDP2, no tensor parallelism).

    data_parallel_size: "all" (default) shards over every process, num_nodes x devices (Lightning's own "auto" means
        one data-parallel group per node, with tensor parallelism inside the node, which no model here implements).
    save_distributed_checkpoint: False (default) gathers the full weights and optimizer states on rank 0 into one
        .ckpt file, what sample.py and `model.init_from` read; True writes a folder with one shard file per rank
        (faster and lighter for paper sizes, but only a sharded run can read it).
    activation_checkpointing: recompute each decoder layer's activations in backward (read by the model's
        `configure_model`): activation memory of one layer instead of all, for about a third more compute.
    """

    def __init__(
        self,
        data_parallel_size: int | Literal["all"] = "all",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = False,
        activation_checkpointing: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if tensor_parallel_size != 1:
            raise ValueError(f"trainer.strategy.tensor_parallel_size must be 1 (FSDP2 only; no model here implements "
                             f"tensor parallelism), got {tensor_parallel_size}")
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.activation_checkpointing = bool(activation_checkpointing)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "all":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def activation_checkpointing_of(strategy: Any) -> bool:
    """The strategy's activation-checkpointing setting: on unless it says otherwise (a plain ModelParallelStrategy)."""
    return bool(getattr(strategy, "activation_checkpointing", True))


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh to shard over: ModelParallelStrategy's ("data_parallel", "tensor_parallel") mesh must have a
    tensor-parallel size of 1; a 1-D mesh is used as it is."""
    if mesh.ndim == 1:
        return mesh
    names = mesh.mesh_dim_names or ()
    if "data_parallel" not in names or mesh.size() != mesh["data_parallel"].size():
        raise ValueError(f"the decoder is sharded over data parallelism only, but the device mesh is "
                         f"{dict(zip(names, mesh.shape))}: set trainer.strategy.tensor_parallel_size=1")
    return mesh["data_parallel"]


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether composable activation checkpointing (`checkpoint`) was applied to `module`."""
    return "checkpoint" in (_get_registry(module) or {})


def shard_decoder(owner: nn.Module, decoder: LlamaDecoder, mesh: DeviceMesh,
                  activation_checkpointing: bool = True) -> None:
    """Shard `decoder` in place over `mesh`: each of its layers is its own FSDP2 group (gathered one at a time) and
    the decoder the root group holding the rest. `owner` is the module being trained (Loong): every trainable
    parameter must lie in the decoder, since nothing else reduces gradients across ranks under this strategy. A
    decoder sharded already (configure_model called again) is left as it is."""
    if is_sharded(decoder):
        return
    outside = [name for name, p in owner.named_parameters() if p.requires_grad
               and not any(p is q for q in decoder.parameters())]
    if outside:
        raise ValueError(f"sharded training reduces the gradients of the decoder only, but these parameters outside "
                         f"it train too: {outside[:5]}{' ...' if len(outside) > 5 else ''}")
    mesh = data_parallel_mesh(mesh)
    for layer in decoder.layers:
        if activation_checkpointing:
            checkpoint(layer)  # before fully_shard: its hooks run inside the recomputed region, as torch's tests do
        fully_shard(layer, mesh=mesh)
    fully_shard(decoder, mesh=mesh)
