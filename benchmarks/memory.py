"""Peak-memory helpers shared by the benchmark scripts (GPU: allocator stats; CPU: the process's peak RSS)."""
import os
import resource


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM, the process's peak RSS, so a peak is that of what follows
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Context manager: `.mib` = peak memory above the level at entry (GPU allocated, or CPU RSS)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.mib = 0.0

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.base = rss_mib()
            reset_peak_rss()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.mib = torch.cuda.max_memory_allocated() / 2**20 - self.base
        else:
            self.mib = peak_rss_mib() - self.base
        return False
