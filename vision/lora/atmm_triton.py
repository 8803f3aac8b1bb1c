"""ATMM Triton kernels: grouped LoRA shrink and expand, one problem per adapter segment.

Same contract as :func:`vision.lora.atmm.atmm` (shapes below); the plain-torch twin is ``atmm_torch`` and
the test comparing them is ``tests/test_atmm.py`` (under ``TRITON_INTERPRET=1`` on the CPU, natively on CUDA)::

    x (T, d_in)  y (T, d_out)  lora_a (S, r_max, d_in)  lora_b (S, d_out, r_max)  scaling (S,)  slot_ranks (S,)
    workspace (T_a, R) float32, R = the batch's largest rank; row i belongs to token info.token_order[i]

1. shrink: ``workspace[i, :r] = scaling[s] * x[token_order[i]] @ lora_a[s, :r].T`` for each segment's rows;
   grid (m-tiles x n-tiles of the longest segment, segments, split_k); programs past their segment's
   length or past its rank exit at once, so a rank-8 adapter in a rank-64 batch runs one n-tile, not four.
   With ``split_k > 1`` the reduction over d_in is split over programs that add atomically into a zeroed
   workspace (more programs when tokens are few and d_in long).
2. expand: ``y[token_order[i]] += workspace[i, :r] @ lora_b[s, :, :r].T``; the loop over the rank stops at
   the segment's own rank. Tokens are unique, so the read-add-write of y needs no atomics.

Ranks are read per segment from ``info.seg_ranks`` (taken when the batch info was built), so the
workspace is never indexed past its width. Tokens with slot -1 are in no segment and never touched.
Tiles come from ``tiling.lookup`` per launch (separate keys for shrink and expand), or are given
explicitly (profiler, baselines, tests). Nothing is allocated per call: the workspace lives in the batch
info and is shared by every layer (a split-k shrink zeroes it first).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from vision.lora import tiling
from vision.lora.atmm import LoRABatchInfo
from vision.lora.tiling import TileConfig


def _patch_interpreter_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns scalars into Python ints with ``int(array)``, which numpy >= 2.4
    refuses for 1-element arrays (triton-lang/triton#9171, fixed upstream by #9172). Re-register that one
    conversion the way the fix does; only when interpreting, and only where the interpreter has the bug."""
    import numpy as np
    from triton.runtime import interpreter

    if getattr(interpreter, "_atmm_patched", False):
        return
    try:
        int(np.zeros(1, dtype=np.int64))
        return  # this numpy still converts 1-element arrays
    except TypeError:
        pass
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._atmm_patched = True


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_for_numpy_2_4()


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, out_ptr, scaling_ptr,
    order_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, seg_rank_ptr,
    d_in, n_tiles_n,
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_om, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    pid_k = tl.program_id(2)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    seg_len = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    rank = tl.load(seg_rank_ptr + seg)
    if (pid_m * BLOCK_M >= seg_len) | (pid_n * BLOCK_N >= rank):
        return  # past this segment's tokens or past this adapter's rank
    start = tl.load(seg_start_ptr + seg)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                     # rows of the segment
    m_mask = offs_m < seg_len
    rows = tl.load(order_ptr + start + offs_m, mask=m_mask, other=0)      # token index of each row
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                      # rank columns
    n_mask = offs_n < rank
    a_base = a_ptr + slot * stride_as
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(d_in, BLOCK_K * SPLIT_K)):                 # split j takes blocks j, j+SPLIT_K, ...
        offs_k = (kk * SPLIT_K + pid_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < d_in
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)                 # (BLOCK_M, BLOCK_K)
        at = tl.load(a_base + offs_n[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                     mask=k_mask[:, None] & n_mask[None, :], other=0.0)                 # (BLOCK_K, BLOCK_N)
        acc += tl.dot(xt, at, input_precision=DOT_PRECISION)
    acc *= tl.load(scaling_ptr + slot).to(tl.float32)
    out = out_ptr + (start + offs_m)[:, None] * stride_om + offs_n[None, :] * stride_or
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


@triton.jit
def _expand_kernel(
    in_ptr, b_ptr, y_ptr,
    order_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, seg_rank_ptr,
    d_out, n_tiles_n,
    stride_im, stride_ir, stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    seg_len = tl.load(seg_len_ptr + seg)
    if pid_m * BLOCK_M >= seg_len:
        return
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    rank = tl.load(seg_rank_ptr + seg)
    start = tl.load(seg_start_ptr + seg)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_len
    rows = tl.load(order_ptr + start + offs_m, mask=m_mask, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                      # output columns
    n_mask = offs_n < d_out
    b_base = b_ptr + slot * stride_bs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_K):                                    # stops at this adapter's rank
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < rank
        it = tl.load(in_ptr + (start + offs_m)[:, None] * stride_im + offs_k[None, :] * stride_ir,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)                 # (BLOCK_M, BLOCK_K)
        bt = tl.load(b_base + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_br,
                     mask=k_mask[:, None] & n_mask[None, :], other=0.0)                 # (BLOCK_K, BLOCK_N)
        acc += tl.dot(it.to(bt.dtype), bt, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    yt = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (yt.to(tl.float32) + acc).to(yt.dtype), mask=mask)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact products (tf32 would lose ~3 digits); 16-bit inputs ignore the setting
    return "ieee" if dtype == torch.float32 else "tf32"


def shrink(x: torch.Tensor, lora_a: torch.Tensor, scaling: torch.Tensor, info: LoRABatchInfo,
           config: TileConfig | None = None) -> torch.Tensor:
    """info.workspace[i, :r_s] = scaling[s] * x[token_order[i]] @ lora_a[s, :r_s].T; returns the workspace."""
    out = info.workspace
    if info.num_segments == 0:
        return out
    cfg = config or tiling.lookup("shrink", tokens=info.num_active, adapters=info.num_segments,
                                  hidden=x.shape[1], rank=info.max_rank, device=x.device)
    if cfg.split_k > 1:
        out.zero_()  # partial sums are added atomically
    n_tiles_n = triton.cdiv(info.max_rank, cfg.block_n)
    grid = (triton.cdiv(info.max_seg_len, cfg.block_m) * n_tiles_n, info.num_segments, cfg.split_k)
    _shrink_kernel[grid](
        x, lora_a, out, scaling,
        info.token_order, info.seg_starts, info.seg_lens, info.seg_slots, info.seg_ranks,
        x.shape[1], n_tiles_n,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        DOT_PRECISION=_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def expand(y: torch.Tensor, lora_b: torch.Tensor, info: LoRABatchInfo, config: TileConfig | None = None,
           inputs: torch.Tensor | None = None) -> torch.Tensor:
    """y[token_order[i]] += inputs[i, :r_s] @ lora_b[s, :, :r_s].T (inputs default: info.workspace)."""
    if info.num_segments == 0:
        return y
    inp = info.workspace if inputs is None else inputs
    cfg = config or tiling.lookup("expand", tokens=info.num_active, adapters=info.num_segments,
                                  hidden=y.shape[1], rank=info.max_rank, device=y.device)
    n_tiles_n = triton.cdiv(y.shape[1], cfg.block_n)
    grid = (triton.cdiv(info.max_seg_len, cfg.block_m) * n_tiles_n, info.num_segments)
    _expand_kernel[grid](
        inp, lora_b, y,
        info.token_order, info.seg_starts, info.seg_lens, info.seg_slots, info.seg_ranks,
        y.shape[1], n_tiles_n,
        inp.stride(0), inp.stride(1), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PRECISION=_precision(lora_b.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def atmm_triton(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: torch.Tensor, slot_ranks: torch.Tensor, info: LoRABatchInfo, *,
                shrink_config: TileConfig | None = None, expand_config: TileConfig | None = None) -> torch.Tensor:
    """Shrink then expand; tiles from the profiled table unless given. Inputs are checked by ``atmm``.

    ``slot_ranks`` is accepted for the common signature; the ranks used are ``info.seg_ranks``.
    """
    shrink(x, lora_a, scaling, info, shrink_config)
    return expand(y, lora_b, info, expand_config)
