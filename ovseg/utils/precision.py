"""The inference precision (MODEL.INFERENCE_DTYPE), one rule for every front-end: `train_net.py --eval-only`
(the engine's test loop), tools/eval_all.py, `ovseg.Predictor` and the demo."""
from typing import ContextManager, Union

import torch

INFERENCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_inference_dtype(name: str, device: Union[str, torch.device]) -> torch.dtype:
    """MODEL.INFERENCE_DTYPE -> the autocast dtype on `device`. "auto" is bfloat16 on a CUDA device that supports it
    (compute capability >= 8.0: A100, H100, RTX 30xx and newer) and float32 elsewhere (CPU, older GPUs)."""
    device = torch.device(device)
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if name not in INFERENCE_DTYPES:
        raise ValueError(f"MODEL.INFERENCE_DTYPE={name!r}; choose one of {sorted(INFERENCE_DTYPES) + ['auto']}")
    return INFERENCE_DTYPES[name]


def inference_autocast(name: str, device: Union[str, torch.device]) -> ContextManager:
    """`torch.autocast` on `device`'s type in the dtype of `name`; "fp32" enters it disabled, so that an outer
    autocast does not lower the precision either. Post-processing casts to float32 itself (postprocessing.py)."""
    dtype = resolve_inference_dtype(name, device)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
