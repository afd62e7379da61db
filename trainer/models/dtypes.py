"""The one table from config words to torch dtypes (mixed precision and saved weights)."""

from __future__ import annotations

import torch

# "no" is train.mixed_precision's word for full precision; "fp32" is the saved weights'.
DTYPES = {
    "no": torch.float32,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
