"""The doors between host and device in a step: :func:`to_host`, :func:`to_host_later` and
:func:`to_device`.

**Sync contract** (docs/exchange.md): a DEFT step that plans one step ahead reads no device data on
the host at all: what the host needs from it (the status block and the summed fragment norms) leaves
the device by :func:`to_host_later`, a non-blocking copy into pinned memory, and is read one step
later, when the copy is long done. The paper's protocol (``plan="leader"``) and the baselines read
device data where they need it, through :func:`to_host`, which

- packs all its tensors into one buffer, so that data wanted at the same point costs one transfer;
- counts the call in :data:`HOST_READS` (also on CPU tensors, where nothing moves: that is how a CPU
  test checks the count a GPU step would make);
- is the one place allowed to synchronise while ``torch.cuda.set_sync_debug_mode("error")`` is on
  (the GPU test runs a DEFT step that way).

Host metadata goes to the device with :func:`to_device`, from pinned memory, without blocking.
Reads the kernels make implicitly (an output whose size depends on the data: ``torch.nonzero``,
``torch.unique``, boolean indexing) cannot go through these doors; the baselines that need them are
listed with their counts in docs/exchange.md.

Status: the CUDA side of this module has not run on a GPU yet (no GPU on the development machines).
"""

from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["HOST_READS", "LATER_READS", "Later", "to_host", "to_host_later", "to_device"]


class _Counter:
    """A thread-safe running count (the DDP hook's steps run in the collectives' callback threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def add(self) -> None:
        with self._lock:
            self._count += 1

    @property
    def count(self) -> int:
        return self._count


#: Calls of :func:`to_host` in this process so far.
HOST_READS = _Counter()
#: Reads of a :class:`Later` in this process so far (each waits at most for its own copy).
LATER_READS = _Counter()


@contextlib.contextmanager
def _sync_allowed(device: torch.device):
    """CUDA's sync debug mode off for the one transfer that is meant to synchronise."""
    if device.type != "cuda":
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def to_host(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The given tensors on the host, in one device-to-host transfer (counted in :data:`HOST_READS`).

    Tensors already on the host come back as they are (not copied: treat them as read-only)."""
    HOST_READS.add()
    remote = [t for t in tensors if t.device.type != "cpu"]
    if not remote:
        return tuple(tensors)
    packed = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in remote])
    with _sync_allowed(packed.device):
        host = packed.cpu()
    out, offset = [], 0
    for t in tensors:
        if t.device.type == "cpu":
            out.append(t)
            continue
        nbytes = t.numel() * t.element_size()
        # clone: a fresh, aligned buffer for the dtype view
        out.append(host[offset:offset + nbytes].clone().view(t.dtype).reshape(t.shape))
        offset += nbytes
    return tuple(out)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; host data goes to a GPU from pinned memory without blocking the host
    (the caching host allocator keeps the pinned buffer until the copy is done)."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class Later:
    """A device tensor on its way to the host, read one step later (:func:`to_host_later`).

    On CUDA the copy into pinned memory is issued on the current stream without blocking, and an
    event recorded after it; :meth:`get` waits for that event (long done by the time it is read)
    and returns the host tensor. On the CPU the tensor is the host tensor. On other devices (``meta``,
    which holds no data, among them) nothing is copied until :meth:`get`, which then copies."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event = None
        tensor = tensor.detach()
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        elif tensor.device.type == "cpu":
            self._host = tensor
        else:
            self._host, self._device_tensor = None, tensor

    @property
    def ready(self) -> bool:
        """Whether :meth:`get` would return without waiting."""
        return self._event is None or self._event.query()

    def get(self) -> torch.Tensor:
        """The host tensor (counted in :data:`LATER_READS`); waits only for its own copy."""
        LATER_READS.add()
        if self._event is not None:
            with _sync_allowed(torch.device("cuda")):
                self._event.synchronize()
            self._event = None
        if self._host is None:
            self._host = self._device_tensor.to("cpu")
        return self._host


def to_host_later(tensor: torch.Tensor) -> Later:
    """Start ``tensor``'s way to the host without waiting for it; read it later with ``.get()``."""
    return Later(tensor)
