"""Batched multi-LoRA for the vision-language model (VaLoRA, METHODS.md §2).

``atmm`` adds every token's adapter product to a base layer's output in one grouped operator, for a batch
whose tokens use different adapters of different ranks: a Triton kernel on CUDA whose tile shapes come from
an offline-profiled table (``tiling``, ``python -m vision.lora.profile``), a grouped PyTorch path elsewhere,
and a per-token reference that both are tested against.
"""

from vision.lora.atmm import (
    BACKENDS,
    LoRABatchInfo,
    atmm,
    atmm_reference,
    atmm_torch,
    fill_batch_info,
    make_batch_info,
    static_batch_info,
)
from vision.lora.tiling import TileConfig, TileKey, TileTable, default_config, lookup, make_key

__all__ = [
    "BACKENDS", "LoRABatchInfo", "TileConfig", "TileKey", "TileTable", "atmm", "atmm_reference", "atmm_torch",
    "default_config", "fill_batch_info", "lookup", "make_batch_info", "make_key", "static_batch_info",
]
