"""The argument checks of the ops, one layer that every entry point uses: the typed wrappers of
:mod:`deft_kernels.ops` and the Triton kernels of :mod:`deft_kernels.triton_ops` (which must not reach
into ``ops``' privates, nor ``ops`` into theirs). Each check raises ``TypeError``/``ValueError``
naming the argument.

Two kinds of check. Those on the arguments themselves (type, dtype, rank, device, lengths) are
O(1) and always run. Those that read data (offsets increasing, k in range, ids and indices in
bounds, thresholds not NaN) run when ``validate`` is true; they read host metadata on the host and
``indices`` where they are (a synchronisation on a GPU). With ``validate=False`` the caller vouches
for the data and nothing is read: a wrapper that has run these checks calls its op with
``validate=False`` (``sparse_pack``/``sparse_unpack``, whose check is a pass over device data), so no
layer below scans the same data again. The kernels below stay memory safe whatever they are given:
the C++ ops re-check the O(F) host metadata they read anyway to plan a launch, and an unvalidated
out-of-range index is skipped, never read or written (docs/api.md, "Input checks").
"""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(name: str, t, *, dtypes=None, dim: int | None = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(_name(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {_name(t.dtype)}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must be on one device")


def check_metadata_device(ref_name: str, ref: torch.Tensor, **metadata: torch.Tensor | None) -> None:
    for name, t in metadata.items():
        if t is not None and isinstance(t, torch.Tensor) and t.device.type != "cpu" and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but must be on the CPU (no synchronisation) or on "
                             f"{ref_name}'s device {ref.device}")


def host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU: itself if it is there, else a copy (which synchronises with its device)."""
    return t if t.device.type == "cpu" else t.cpu()


def check_offsets(offsets, n: int, validate: bool) -> None:
    check_tensor("offsets", offsets, dtypes=(torch.int64,))
    if offsets.numel() < 1:
        raise ValueError("offsets must have at least one element (F + 1 for F fragments)")
    if not validate:
        return
    offsets = host(offsets)
    first, last = offsets[0].item(), offsets[-1].item()
    if first != 0:
        raise ValueError(f"offsets[0] must be 0, got {first}")
    if last != n:
        raise ValueError(f"offsets[-1] must equal the vector length {n}, got {last}")
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        bad = int(torch.nonzero(offsets[1:] < offsets[:-1])[0]) + 1
        raise ValueError(f"offsets must be non-decreasing, but offsets[{bad}] < offsets[{bad - 1}]")


def check_ids(name: str, kind: str, ids: torch.Tensor | None, count: int) -> None:
    """Fragment or segment ids (``kind``) in ``[0, count)``, read on the host."""
    if ids is not None and ids.numel() > 0:
        lo, hi = torch.aminmax(host(ids))
        if lo.item() < 0 or hi.item() >= count:
            raise ValueError(f"{name} must hold {kind} ids in [0, {count}), got values in [{lo.item()}, {hi.item()}]")


def check_indices(indices, n: int, validate: bool) -> None:
    check_tensor("indices", indices, dtypes=(torch.int64,))
    if validate and indices.numel() > 0:
        lo, hi = torch.aminmax(indices)
        if lo.item() < 0 or hi.item() >= n:
            raise ValueError(f"indices must lie in [0, {n}), got values in [{lo.item()}, {hi.item()}]")


# The 16-bit dtypes whose gradient may accumulate into a float32 residual.
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def accumulate_norms_args(grad, residual, offsets, validate: bool) -> None:
    check_tensor("grad", grad, dtypes=SUPPORTED_DTYPES)
    check_tensor("residual", residual, dtypes=SUPPORTED_DTYPES)
    check_same_device("grad", grad, residual=residual)
    check_metadata_device("grad", grad, offsets=offsets)
    if residual.dtype != grad.dtype and not (grad.dtype in _HALF_DTYPES and residual.dtype == torch.float32):
        raise TypeError(f"residual dtype {_name(residual.dtype)} does not go with grad dtype {_name(grad.dtype)}: "
                        "residual must have grad's dtype, or be float32 under a bfloat16 or float16 grad")
    if residual.numel() != grad.numel():
        raise ValueError(f"residual length {residual.numel()} must match grad length {grad.numel()}")
    if not residual.is_contiguous():
        raise ValueError("residual must be contiguous (it is updated in place)")
    check_offsets(offsets, grad.numel(), validate)


def segmented_topk_args(values, offsets, k, fragments, index_base, validate: bool) -> None:
    check_tensor("values", values, dtypes=SUPPORTED_DTYPES)
    check_metadata_device("values", values, offsets=offsets, k=k, fragments=fragments)
    check_offsets(offsets, values.numel(), validate)
    check_tensor("k", k, dtypes=(torch.int64,))
    num_frags = offsets.numel() - 1
    if k.numel() != num_frags:
        raise ValueError(f"k must have one entry per fragment ({num_frags}), got {k.numel()}")
    if fragments is not None:
        check_tensor("fragments", fragments, dtypes=(torch.int64,))
    if not isinstance(index_base, int) or index_base < 0:
        raise ValueError(f"index_base must be a non-negative int, got {index_base!r}")
    if validate:
        offsets, k = host(offsets), host(k)
        sizes = offsets[1:] - offsets[:-1]
        bad = (k < 0) | (k > sizes)
        if bool(bad.any()):
            f = int(torch.nonzero(bad)[0])
            raise ValueError(f"k[{f}] = {int(k[f])} must lie in [0, {int(sizes[f])}] (the size of fragment {f})")
        check_ids("fragments", "fragment", fragments, num_frags)


def threshold_select_args(values, offsets, thresholds, segments, index_base, validate: bool) -> None:
    check_tensor("values", values, dtypes=SUPPORTED_DTYPES)
    check_metadata_device("values", values, offsets=offsets, thresholds=thresholds, segments=segments)
    check_offsets(offsets, values.numel(), validate)
    check_tensor("thresholds", thresholds, dtypes=(torch.float32,))
    num_segs = offsets.numel() - 1
    if thresholds.numel() != num_segs:
        raise ValueError(f"thresholds must have one entry per segment ({num_segs}), got {thresholds.numel()}")
    if segments is not None:
        check_tensor("segments", segments, dtypes=(torch.int64,))
    if not isinstance(index_base, int) or index_base < 0:
        raise ValueError(f"index_base must be a non-negative int, got {index_base!r}")
    if validate:
        nan = torch.isnan(host(thresholds))
        if bool(nan.any()):
            raise ValueError(f"thresholds[{int(torch.nonzero(nan)[0])}] is NaN; a threshold must be a number "
                             "(+inf selects only infinities and NaNs, 0 every non-zero element)")
        check_ids("segments", "segment", segments, num_segs)


def sparse_pack_args(values, indices, validate: bool) -> None:
    check_tensor("values", values, dtypes=SUPPORTED_DTYPES)
    check_same_device("values", values, indices=indices)
    check_indices(indices, values.numel(), validate)


def sparse_unpack_args(residual, indices, values, scale, validate: bool) -> None:
    check_tensor("residual", residual, dtypes=SUPPORTED_DTYPES)
    check_tensor("values", values, dtypes=SUPPORTED_DTYPES)
    check_same_device("residual", residual, indices=indices, values=values)
    if values.dtype != residual.dtype:
        raise TypeError(f"values dtype {values.dtype} must match residual dtype {residual.dtype}")
    if not residual.is_contiguous():
        raise ValueError("residual must be contiguous (it is updated in place)")
    check_indices(indices, residual.numel(), validate)
    if values.numel() != indices.numel():
        raise ValueError(f"values length {values.numel()} must match indices length {indices.numel()}")
    if not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")
