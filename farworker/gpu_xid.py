"""Xid error counts per GPU, from NVML's event API: NVML keeps no Xid counter, it only delivers events."""

from __future__ import annotations

import logging
import threading
from collections import Counter

log = logging.getLogger(__name__)

WAIT_MS = 500  # longest NVML wait: a stop is noticed within this
ERROR_PAUSE = 5.0  # seconds between waits while NVML's wait itself fails (a lost GPU can make it fail at once)
# The Xids fleet operators act on; the rest are logged by number (NVIDIA's Xid catalog explains them).
MEANINGS = {
    13: "graphics engine exception (application fault)",
    31: "GPU memory page fault (application fault)",
    43: "GPU stopped processing (application fault)",
    48: "double-bit ECC error",
    63: "ECC page retirement or row remapping recorded",
    64: "ECC page retirement or row remapping failed",
    79: "GPU has fallen off the bus",
}
NOT_COUNTED = {"xid_errors": None, "xid_last": None, "xid_by_code": None}


class XidCounter:
    """One daemon thread waiting on one NVML event set that every GPU reports its Xid errors to."""

    def __init__(self, nvml, wait_ms: int = WAIT_MS):
        self._nvml = nvml
        self._wait_ms = wait_ms
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._codes: dict[int, Counter] = {}  # registered GPU index -> Xid code -> events
        self._last: dict[int, int] = {}
        self._event_set = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Register every GPU that reports Xid events and start waiting; False (no thread) when none does."""
        import pynvml

        nvml = self._nvml
        self._event_set = nvml.nvmlEventSetCreate()
        try:
            count = nvml.nvmlDeviceGetCount()
        except pynvml.NVMLError:
            self._free()
            raise
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, self._event_set)
            except pynvml.NVMLError_NotSupported:
                log.info("GPU %d reports no Xid events (consumer GPU or vGPU): its Xid count stays null", index)
                continue
            except pynvml.NVMLError as error:
                log.warning("GPU %d: Xid errors not counted: %s", index, error)
                continue
            self._codes[index] = Counter()
        if not self._codes:
            self._free()
            return False
        self._thread = threading.Thread(target=self._run, name="xid-counter", daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout: float = 2.0) -> bool:
        """End the thread; True once it has ended (it frees the event set itself)."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def readings(self, index: int) -> dict:
        """The telemetry fields for one GPU: all None when its Xid errors are not counted."""
        with self._lock:
            codes = self._codes.get(index)
            if codes is None:
                return dict(NOT_COUNTED)
            return {
                "xid_errors": sum(codes.values()),
                "xid_last": self._last.get(index),
                "xid_by_code": {str(code): count for code, count in sorted(codes.items())},
            }

    def _run(self) -> None:
        import pynvml

        failing = None
        try:
            while not self._stop.is_set():
                try:
                    event = self._nvml.nvmlEventSetWait(self._event_set, self._wait_ms)
                except pynvml.NVMLError_Timeout:
                    failing = None
                    continue
                except pynvml.NVMLError as error:
                    if str(error) != failing:  # once per kind of failure, not every few seconds
                        log.warning("Waiting for Xid events failed, retrying: %s", error)
                        failing = str(error)
                    self._stop.wait(ERROR_PAUSE)
                    continue
                failing = None
                self._record(event)
        finally:
            self._free()

    def _record(self, event) -> None:
        import pynvml

        if not event.eventType & self._nvml.nvmlEventTypeXidCriticalError:
            return
        code = int(event.eventData)
        try:
            index = int(self._nvml.nvmlDeviceGetIndex(event.device))
        except pynvml.NVMLError:
            index = None
        # the line an operator greps for; the kernel log has the driver's own NVRM line with the PCI address
        log.warning(
            "Xid %d on GPU %s: %s",
            code,
            "?" if index is None else index,
            MEANINGS.get(code, "see NVIDIA's Xid catalog"),
        )
        with self._lock:
            if index in self._codes:
                self._codes[index][code] += 1
                self._last[index] = code

    def _free(self) -> None:
        import pynvml

        if self._event_set is not None:
            try:
                self._nvml.nvmlEventSetFree(self._event_set)
            except pynvml.NVMLError as error:
                log.debug("Freeing the Xid event set: %s", error)
            self._event_set = None
