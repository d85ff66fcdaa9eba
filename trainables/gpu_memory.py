"""A trial's GPU memory budget, split between the CUDA context and PyTorch's caching allocator.

A process on a GPU holds two kinds of memory: its CUDA context (driver, kernels, cuBLAS
and cuDNN handles), which PyTorch neither counts nor caps, and what PyTorch's caching
allocator reserves. `torch.cuda.set_per_process_memory_fraction` caps only the second.
A trial's share of the GPU budgets the whole process, so its allocator gets the share
less the context: capped at the share itself, a trial at its cap would use a context
more than its budget, and trials packed side by side would run the card out of memory.

Standard library only: the search's GPU arithmetic (search.study.gpu_share) uses it
without torch.
"""

from __future__ import annotations

MiB = 2**20
GiB = 2**30
CUDA_CONTEXT_BYTES = 500 * MiB
"""What a process's CUDA context takes outside PyTorch's allocator: about 300-500 MiB on recent drivers with lazy
module loading (on an H200, a cnn trial's process used 3.95 GiB where its allocator had reserved about 3.46)."""
SMALLEST_CAP_SHARE = 0.5
"""A share too small to hold the context keeps this part of itself for the allocator: the trial then fails with
an out-of-memory error that names the fix, rather than with a cap of zero."""


def allocator_fraction(share: float, total_bytes: int, context_bytes: int = CUDA_CONTEXT_BYTES) -> float:
    """The fraction of the GPU's memory that a trial's caching allocator may reserve, for a trial whose process
    may use `share` of the GPU's `total_bytes`: the share less the CUDA context. A share of the whole GPU (1 or
    more) is the whole GPU: nothing else is budgeted on it."""
    if share >= 1:
        return 1.0
    if share <= 0 or total_bytes <= 0:
        raise ValueError(f"allocator_fraction: a share in (0, 1] of a positive total, not {share} of {total_bytes}")
    return max(share - context_bytes / total_bytes, share * SMALLEST_CAP_SHARE)
