"""Steadier measurements on a virtual machine: free page reporting paused for the run.

On a KVM guest with virtio-balloon free page reporting (this kind of machine),
memory the guest frees is handed back to the host a second or two later, and
touching it again costs the host a fault per page: writing 1 GiB into freshly
allocated page cache then took 2-3 s of kernel time instead of 0.3 s. Every
file a benchmark writes lands in memory some earlier measurement freed, so
whichever way ran at the wrong moment paid it: the same transfer moved 300 or
1,300 MB/s from one round to the next, for tether and its peers alike.

``paused_page_reporting`` raises the guest kernel's reporting threshold above
the largest block it has (``page_reporting_order``, the blocks it reports) for
the duration and puts the old value back afterwards, Ctrl-C included; then it
touches and frees some memory, so that pages the host already took back are
faulted in once before anything is timed. It changes nothing where the knob
is missing or not writable (not a KVM guest, not root): the run says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

KNOB = Path("/sys/module/page_reporting/parameters/page_reporting_order")
OFF = "11"  # above the largest buddy block (order 10 on x86-64): no block is ever reported
WARM_BYTES = 4 << 30  # memory touched once after pausing: the files of a transfer round


@contextlib.contextmanager
def paused_page_reporting() -> Iterator[str]:
    """Pause free page reporting while the block runs; yield a note for the report."""
    try:
        before = KNOB.read_text().strip()
        KNOB.write_text(OFF)
    except OSError as exc:
        yield f"machine: free page reporting left as it is ({exc.strerror or exc})"
        return
    try:
        _warm(min(WARM_BYTES, _available_bytes() // 2))
        yield (
            "machine: the guest's free page reporting (virtio-balloon) was paused for the run "
            f"({KNOB} {before} -> {OFF}, restored at the end): freed memory stays with the "
            "guest, so no measurement pays the host to fault it back in (bench/machine.py)"
        )
    finally:
        with contextlib.suppress(OSError):
            KNOB.write_text(before)


def _available_bytes() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _warm(size: int) -> None:
    """Touch ``size`` bytes in 64 MiB pieces, then free them: back in the guest's free lists."""
    pieces = [bytearray(64 << 20) for _ in range(size >> 26)]  # zeroed: every page touched
    del pieces
