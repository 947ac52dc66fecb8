"""Frame counters and a sliding window of latencies, reported on /diagnostics.

The subscription callback and the worker thread both update the counters, so every
update takes the lock. ``frames_received == processed + dropped + rejected + unheard +
in_flight`` holds at every instant a reader takes the lock, which is what the tests and the replay
report rely on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue


@dataclass(frozen=True)
class StatsSnapshot:
    """Consistent copy of the counters and window summaries."""

    received: int
    processed: int
    dropped: int
    rejected: int
    unheard: int
    in_flight: int
    rate_hz: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_max_ms: float
    idle_s: float  # since the last processed frame (inf before the first)
    unheard_idle_s: float = float("inf")  # since the last frame nobody was subscribed for


class FrameStats:
    """Counts frames through the node and keeps the last ``window`` processing latencies."""

    def __init__(self, window: int = 100) -> None:
        self._lock = threading.Lock()
        self._done_at: deque[float] = deque(maxlen=window)
        self._latency_ms: deque[float] = deque(maxlen=window)
        self.received = 0
        self.processed = 0
        self.dropped = 0  # overwritten in the one-slot buffer before the worker took them
        self.rejected = 0  # taken, but refused as bad input or failed in processing
        # Decoded (so checked) but not processed: no output had a subscriber. Not counted
        # as processed, so rate and latency describe frames someone received.
        self.unheard = 0
        self.in_flight = 0  # in the slot or being processed right now
        self._unheard_at: float | None = None

    def on_received(self, replaced_pending: bool) -> None:
        with self._lock:
            self.received += 1
            if replaced_pending:
                self.dropped += 1  # the pending frame left the slot unprocessed
            else:
                self.in_flight += 1

    def on_finished(
        self, latency_ms: float | None, now: float | None = None, unheard: bool = False
    ) -> None:
        """A taken frame left the worker: published (latency given), unheard or refused."""
        with self._lock:
            self.in_flight -= 1
            if unheard:
                self.unheard += 1
                self._unheard_at = time.monotonic() if now is None else now
                return
            if latency_ms is None:
                self.rejected += 1
                return
            self.processed += 1
            self._done_at.append(time.monotonic() if now is None else now)
            self._latency_ms.append(latency_ms)

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            done = list(self._done_at)
            lat = np.asarray(self._latency_ms, dtype=np.float64)
            unheard_at = self._unheard_at
            counts = (
                self.received,
                self.processed,
                self.dropped,
                self.rejected,
                self.unheard,
                self.in_flight,
            )
        span = done[-1] - done[0] if len(done) > 1 else 0.0
        rate = (len(done) - 1) / span if span > 0 else 0.0
        if lat.size:
            p50, p95 = np.percentile(lat, [50, 95])
            mx = float(lat.max())
        else:
            p50 = p95 = mx = float("nan")
        now = time.monotonic()
        idle = now - done[-1] if done else float("inf")
        unheard_idle = now - unheard_at if unheard_at is not None else float("inf")
        return StatsSnapshot(*counts, rate, float(p50), float(p95), mx, idle, unheard_idle)


def diagnostic_status(
    name: str,
    hardware_id: str,
    snap: StatsSnapshot,
    device: str,
    stale_after_s: float = 5.0,
    faults: dict[str, str] | None = None,
) -> DiagnosticStatus:
    """One DiagnosticStatus for the node: OK while frames flow, WARN when none came lately.

    Each active fault is a ``fault: <name>`` value, and the message names them all, so a
    monitor sees every cause at once rather than the newest only. ``stale_after_s``: no
    processed frame for longer is a WARN (a node paced by ``max_rate`` passes its period).
    ``rate_hz`` is 0 while frames are not processed: the window's rate is of the past.
    """
    faults = faults or {}
    level, message = DiagnosticStatus.OK, "processing"
    # The newest frame found no subscriber: nothing is wrong, the node only checks frames.
    unheard = snap.unheard and (
        snap.processed == 0 or snap.unheard_idle_s < min(snap.idle_s, stale_after_s)
    )
    if faults:
        level, message = DiagnosticStatus.WARN, "faults: " + ", ".join(sorted(faults))
    elif unheard:
        message = "no output is subscribed: frames are only checked"
    elif snap.processed == 0 and snap.rejected:
        level, message = DiagnosticStatus.WARN, "every frame so far is refused as bad input"
    elif snap.processed == 0:
        level, message = DiagnosticStatus.WARN, "no frame processed yet"
    elif snap.idle_s > stale_after_s:
        level, message = DiagnosticStatus.WARN, f"no frame processed for {snap.idle_s:.1f} s"
    elif snap.rejected and snap.rejected >= snap.processed:
        level, message = DiagnosticStatus.WARN, "most frames are refused as bad input"

    def kv(key: str, value: float | int | str) -> KeyValue:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        return KeyValue(key=key, value=text)

    return DiagnosticStatus(
        level=level,
        name=name,
        message=message,
        hardware_id=hardware_id,
        values=[
            kv("device", device),
            kv("rate_hz", 0.0 if unheard or snap.idle_s > stale_after_s else snap.rate_hz),
            kv("latency_p50_ms", snap.latency_p50_ms),
            kv("latency_p95_ms", snap.latency_p95_ms),
            kv("latency_max_ms", snap.latency_max_ms),
            kv("frames_received", snap.received),
            kv("frames_processed", snap.processed),
            kv("frames_dropped", snap.dropped),
            kv("frames_rejected", snap.rejected),
            kv("frames_unheard", snap.unheard),
            kv("frames_in_flight", snap.in_flight),
            kv("faults", ", ".join(sorted(faults))),
            *(kv(f"fault: {k}", v) for k, v in sorted(faults.items())),
        ],
    )
