"""Helpers of the tests that drive step programs by hand (tests/test_driver.py,
tests/test_plan_protocols.py): a program watched request by request."""

from __future__ import annotations

from deft_kernels.driver import GatherProposals
from deft_kernels.transfer import HOST_READS


def watch(program, log: list, *, padded: bool = False):
    """``program``, also appending ``(kind, dtype, shape)`` of every request it makes and
    ``("reads", k)``: the ``to_host`` reads of each stretch of its own work. ``padded``: a
    ``GatherProposals`` logged at its length on the wire (the longest count), not this rank's."""
    value = None
    while True:
        before = HOST_READS.count
        try:
            request = program.send(value)
        except StopIteration as stop:
            log.append(("reads", HOST_READS.count - before))
            return stop.value
        except Exception:
            log.append(("reads", HOST_READS.count - before))
            raise
        log.append(("reads", HOST_READS.count - before))
        if isinstance(request, GatherProposals):
            shape = (max(request.counts),) if padded else tuple(request.mine.shape)
            log.append(("GatherProposals", request.mine.dtype, shape))
        else:
            log.append((type(request).__name__, request.tensor.dtype, tuple(request.tensor.shape)))
        value = yield request
