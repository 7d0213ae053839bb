"""Which autocast dtype a run trains in: fp16 (+ GradScaler) on CUDA, bf16 where the hardware has it, else fp32.

    train.fp16 on CUDA                       float16 autocast, GradScaler
    train.fp16 without CUDA                  bfloat16 where the CPU has native bf16 units, else fp32 (a warning)
    train.bf16: true / "auto" / false        bfloat16 (a warning where it would be emulated) / only where native / no

A CPU without AVX512-BF16 or AMX emulates bf16 matmuls, far slower than fp32: "auto" is the choice that is never
slower than fp32.
"""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Does this device run bf16 matmuls natively?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast_dtype(fp16: bool, bf16: bool | str, device: torch.device) -> tuple[torch.dtype | None, str | None]:
    """(the autocast dtype, None for fp32; a warning to print, or None) for `train.fp16` / `train.bf16`."""
    if fp16 and device.type == "cuda":
        return torch.float16, None
    native = native_bf16(device)
    if fp16:
        return (torch.bfloat16 if native else None), (
            "train.fp16 needs CUDA and this machine has none: training with "
            + ("bfloat16 autocast instead (no GradScaler needed)." if native
               else "fp32 instead (this CPU has no native bfloat16)."))
    if bf16 == "auto":
        return (torch.bfloat16 if native else None), None
    if bf16 and not native:
        return torch.bfloat16, (f"train.bf16: {device.type} has no native bfloat16 matmuls, so bf16 is emulated and "
                                "much slower than fp32 here; bf16=\"auto\" picks it only where it is fast.")
    return (torch.bfloat16 if bf16 else None), None
