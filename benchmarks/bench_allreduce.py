"""All-reduce time and bandwidth between the ranks of a torchrun group, at the size of one DDP bucket (25 MiB) and of
all the paper suite model's fp32 gradients (134 MiB), in float32 and bfloat16 (the same bytes, so the same time).
Bandwidth = bytes / time (the algorithm bandwidth). `TAG` names the NCCL settings of the run in the output.

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_allreduce.py
    NCCL_PROTO=Simple TAG=PROTO=Simple torchrun --standalone --nproc_per_node 2 benchmarks/bench_allreduce.py
"""
import os, time

import torch
import torch.distributed as dist

SIZES_MIB = (25, 134)  # one DDP bucket; all fp32 gradients of the paper suite model (~34M parameters)


def time_all_reduce(x: torch.Tensor, repeats: int = 10, warmup: int = 3) -> float:
    "Milliseconds per `dist.all_reduce(x)`, averaged over `repeats` after `warmup` calls."
    for _ in range(warmup): dist.all_reduce(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats): dist.all_reduce(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1e3


def main():
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    for mib in SIZES_MIB:
        n_bytes = mib * 2**20
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.ones(n_bytes * 8 // torch.finfo(dtype).bits, dtype=dtype, device="cuda")  # n_bytes of dtype
            ms = time_all_reduce(x)
            if rank == 0:
                print(f"  {os.environ.get('TAG', 'default'):22s} {mib:5d} MiB {str(dtype):15s} {ms:7.2f} ms  "
                      f"{n_bytes / ms / 1e6:7.1f} GB/s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
