"""How long the all-reduce of the LoRA gradients takes between the GPUs of this host, and over which
link: the most that data parallelism can add to an optimizer step of the default recipe.

    NCCL_DEBUG=INFO torchrun --nproc_per_node 2 bench/allreduce_check.py

NCCL_DEBUG=INFO prints the transport NCCL chose (P2P over NVLink or PCIe, or SHM through host memory).
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

# LoRA r=8 on the 7 projections of Mistral-7B's 32 layers: 32 x 8 x (2x8192 + 2x5120 + 3x18432).
LORA_PARAMETERS = 20_971_520


def timed_all_reduce(tensor, repeats: int) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(tensor)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    gradients = torch.ones(LORA_PARAMETERS, device="cuda")  # float32, as the LoRA weights train
    timed_all_reduce(gradients, 5)  # connection set-up
    seconds = timed_all_reduce(gradients, 20)
    world = dist.get_world_size()
    bus_gb_s = gradients.numel() * 4 * 2 * (world - 1) / world / seconds / 1e9
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    where = [None] * world
    dist.all_gather_object(where, f"{props.name} pci {props.pci_bus_id:02x}:{props.pci_device_id:02x}")
    if dist.get_rank() == 0:
        print(json.dumps({"processes": world, "devices": where, "megabytes": gradients.numel() * 4 / 1e6,
                          "all_reduce_ms": round(seconds * 1e3, 2), "bus_gb_per_s": round(bus_gb_s, 1)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
