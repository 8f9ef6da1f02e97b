"""The density controller: how much of each update a node sends, from what it measured.

Each update, the node sends the top `density` fraction of entries. The controller picks the
density so that uploading takes at most `upload_fraction` of the time a step takes to compute
(so the link never becomes what the node waits on), within [min_density, max_density], under
the server's cap, and so that an upload takes at most half the server's round deadline.

The link is modelled as `upload seconds = rtt + bytes / throughput`: the round-trip time comes
from small requests, the throughput from each submission (its bytes over its time minus the
rtt), both smoothed. Bytes per entry (index + value after container compression) come from the
last submissions, so the controller turns a byte budget into a density.

Like Deep Gradient Compression's warm-up, the first `warmup` updates are sent denser: a floor
falls geometrically from max_density to min_density, so the early, large gradients are not
held back in the residual for long.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

SMOOTHING = 0.3  # weight of the newest measurement in the running averages
MAX_CHANGE = 2.0  # density changes at most this factor per update (no oscillation)
DEADLINE_SHARE = 0.5  # an upload may take at most this share of the server's round deadline


@dataclass(frozen=True)
class DensityPolicy:
    min_density: float = 0.001
    max_density: float = 0.25
    upload_fraction: float = 0.2
    warmup: int = 20


@dataclass(frozen=True)
class LinkReport:
    """What the node measured, as it reports it to the server and shows it."""

    density: float
    upload_bytes_per_s: float | None
    rtt_s: float | None
    compute_s: float | None


def _smooth(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new


class DensityController:
    """Thread-safe: the main thread reports compute time, the upload thread the rest."""

    def __init__(self, policy: DensityPolicy, fixed: float | None = None):
        self.policy = policy
        self.fixed = fixed
        self.server_cap = 1.0
        self.deadline_s: float | None = None
        self.updates = 0  # submissions measured so far
        self.compute_s: float | None = None
        self.rtt_s: float | None = None
        self.upload_bytes_per_s: float | None = None
        self.bytes_per_entry: float | None = None
        self.density = fixed if fixed is not None else policy.max_density
        self._lock = threading.Lock()

    # ---- measurements ---------------------------------------------------------------------

    def observe_compute(self, seconds: float) -> None:
        with self._lock:
            self.compute_s = _smooth(self.compute_s, max(seconds, 1e-6))

    def observe_rtt(self, seconds: float) -> None:
        with self._lock:
            self.rtt_s = _smooth(self.rtt_s, max(seconds, 1e-6))

    def observe_upload(self, wire_bytes: int, entries: int, seconds: float) -> None:
        """One submission: its body size, how many entries it carried, how long the POST took."""
        with self._lock:
            self.updates += 1
            if entries > 0:
                self.bytes_per_entry = _smooth(self.bytes_per_entry, wire_bytes / entries)
            transfer = max(seconds - (self.rtt_s or 0.0), seconds * 0.1, 1e-6)
            self.upload_bytes_per_s = _smooth(self.upload_bytes_per_s, wire_bytes / transfer)

    def set_server_cap(self, cap: float | None) -> None:
        if cap is not None and 0 < cap <= 1:
            with self._lock:
                self.server_cap = cap

    # ---- the decision ---------------------------------------------------------------------

    def next_density(self, numel: int) -> float:
        """The density of the next update of a model with `numel` entries."""
        with self._lock:
            if self.fixed is not None:
                self.density = min(self.fixed, self.server_cap)
                return self.density
            p = self.policy
            high = min(p.max_density, self.server_cap)
            low = min(p.min_density, high)
            wanted = self._from_link(numel)
            if wanted is None:  # nothing measured yet: start at the top, like the warm-up
                wanted = high
            else:
                wanted = min(max(wanted, self.density / MAX_CHANGE), self.density * MAX_CHANGE)
            self.density = min(max(wanted, self._warmup_floor(low, high), low), high)
            return self.density

    def _from_link(self, numel: int) -> float | None:
        if None in (self.compute_s, self.upload_bytes_per_s, self.bytes_per_entry):
            return None
        rtt = self.rtt_s or 0.0
        budget_s = self.policy.upload_fraction * self.compute_s
        if self.deadline_s is not None:
            # a round closes deadline_s after its first update arrives: an upload that takes
            # longer than half of that misses the round when the others are on time
            budget_s = min(budget_s, DEADLINE_SHARE * self.deadline_s)
        budget_bytes = max(budget_s - rtt, 0.0) * self.upload_bytes_per_s
        return budget_bytes / self.bytes_per_entry / max(numel, 1)

    def _warmup_floor(self, low: float, high: float) -> float:
        warmup = self.policy.warmup
        if self.updates >= warmup or warmup == 0:
            return low
        return high * math.pow(low / high, self.updates / warmup)

    def report(self) -> LinkReport:
        with self._lock:
            return LinkReport(self.density, self.upload_bytes_per_s, self.rtt_s, self.compute_s)
