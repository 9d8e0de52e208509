"""CUDA errors that poison the process: after an illegal address, a device-side assert or an Xid,
every later CUDA call of the process fails. Such an error is the device's, not the batch's:
splitting the batch or failing its images would only fail every later capture too.

The engine stops using the device at the first one and raises DeviceFault to every caller; the
worker sends its chunks back to the queue and exits with its own code (tasks.worker.boot), and
its supervisor starts a fresh process with a fresh CUDA context.
"""

from __future__ import annotations

import torch

# What CUDA, cuBLAS and cuDNN errors say when torch raises them as a plain RuntimeError (older
# torch) or as torch.AcceleratorError (torch >= 2.8); out-of-memory is not among them.
_MARKERS = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "illegal instruction",
    "unspecified launch failure",
    "misaligned address",
    "CUBLAS_STATUS_",
    "CUDNN_STATUS_",
    "cuDNN error",
    "NCCL error",
)


class DeviceFault(Exception):
    """The device failed in a way that lasts for the process: retry the work elsewhere."""


def is_device_fault(exc: BaseException) -> bool:
    """A CUDA error other than out-of-memory, which the engine handles by splitting batches."""
    if isinstance(exc, DeviceFault):
        return True
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    # By its text otherwise: a RuntimeError, or a torch.jit.Error (not a RuntimeError) when
    # the error came up inside a TorchScript model.
    text = str(exc)
    return "out of memory" not in text and any(marker in text for marker in _MARKERS)


def fault_line(exc: BaseException) -> str:
    """The line of the error that names the CUDA fault (TorchScript puts its own traceback
    first), else its first line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    named = [line for line in lines if any(marker in line for marker in _MARKERS)]
    line = (named or lines or [type(exc).__name__])[0]
    return line[:300]
