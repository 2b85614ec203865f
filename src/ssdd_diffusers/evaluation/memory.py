"""Peak memory of a model call: CUDA allocator peaks on GPUs, the kernel's resident-set high-water mark on
Linux CPUs. Used by the evaluation runner and the decode benchmark."""

from __future__ import annotations

import torch


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _proc_status_kb("VmHWM") is not None


class PeakMemoryMeter:
    """Peak memory of a model's reconstruction calls, above a baseline taken before the model loads.

    * CUDA: ``torch.cuda.max_memory_allocated`` (reset before each call) minus the memory allocated
      before the model was loaded, i.e. weights + activations (``"cuda_peak_allocated"``).
    * CPU (Linux): the process's peak RSS (``VmHWM``, reset before each call through
      ``/proc/self/clear_refs``) minus the RSS before the model was loaded (``"cpu_peak_rss_delta"``).
      Approximate: allocator caching, threads and other memory of the process are included.
    * Elsewhere, or with ``enabled=False``: not measured (``"not_measured"``, value ``None``).
    """

    def __init__(self, device: torch.device | str, enabled: bool = True) -> None:
        self.device = torch.device(device)
        if not enabled:
            self.kind = "not_measured"
        elif self.device.type == "cuda":
            self.kind = "cuda_peak_allocated"
        elif self.device.type == "cpu" and _reset_rss_high_water_mark():
            self.kind = "cpu_peak_rss_delta"
        else:
            self.kind = "not_measured"
        self._baseline = 0
        self._peak: int | None = None

    def set_baseline(self) -> None:
        """Record the memory in use before the model is loaded."""
        if self.kind == "cuda_peak_allocated":
            torch.cuda.synchronize(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        elif self.kind == "cpu_peak_rss_delta":
            self._baseline = (_proc_status_kb("VmRSS") or 0) * 1024
        self._peak = None

    def start(self) -> None:
        """Reset the peak counter before a reconstruction call."""
        if self.kind == "cuda_peak_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_peak_rss_delta":
            _reset_rss_high_water_mark()

    def stop(self) -> None:
        """Fold the peak of the call that just ended into the running maximum."""
        if self.kind == "cuda_peak_allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "cpu_peak_rss_delta":
            peak = (_proc_status_kb("VmHWM") or 0) * 1024
        else:
            return
        used = max(0, peak - self._baseline)
        self._peak = used if self._peak is None else max(self._peak, used)

    @property
    def peak_mb(self) -> float | None:
        """Peak in MiB (``None`` when not measured)."""
        return None if self._peak is None else self._peak / 2**20


MEMORY_LABELS = {
    "cuda_peak_allocated": "CUDA peak allocated (weights + activations)",
    "cpu_peak_rss_delta": "CPU peak RSS increase over the pre-load baseline (approximate)",
    "not_measured": "not measured",
}
