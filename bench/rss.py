"""Peak resident-set growth of a block of CPU work (Linux): the CPU counterpart of
torch.cuda.max_memory_allocated in the benchmarks.

The kernel's high-water mark (VmHWM in /proc/self/status) is reset to the current resident set by
writing 5 to /proc/self/clear_refs, so the peak of the block is exact, not sampled. Where that is
not allowed (not Linux, or a kernel without it), `growth_bytes` is None.
"""

import os


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


class PeakRSS:
    """with PeakRSS() as m: work()  ->  m.growth_bytes = peak resident set during the block - before it."""

    growth_bytes: int | None = None

    def __enter__(self):
        try:
            with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
                f.write("5")
            self._before = _status_kib("VmRSS")
        except OSError:
            self._before = None
        return self

    def __exit__(self, *exc):
        if self._before is not None:
            self.growth_bytes = max(0, _status_kib("VmHWM") - self._before) * 1024
        return False
