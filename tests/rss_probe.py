"""Peak resident memory of this process, measured so that a parent's footprint cannot leak in.

`getrusage(...).ru_maxrss` of a subprocess includes the memory of the parent it was forked from
(Linux carries the pre-exec high-water mark over exec), so a test run from a big pytest process
would read the parent's size. VmHWM in /proc/self/status is this address space's own high-water
mark, and writing "5" to /proc/self/clear_refs resets it to the current RSS.

Run the measured process with `ENV` added to its environment: a fixed glibc mmap threshold makes
every large buffer its own mapping, returned on free, so the peak RSS follows the live tensors
instead of how much freed memory the allocator happens to keep (without it, the same run read
150-290 MB where ~80 MB is live).
"""

ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def start() -> int:
    """Reset the high-water mark; return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def peak() -> int:
    """Peak RSS in bytes since the last `start()`."""
    return _status_kb("VmHWM") * 1024
