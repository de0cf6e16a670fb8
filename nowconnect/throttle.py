"""
Backoff for failed agent authentications, per source address.  Pure: the caller passes the
time.  After C{burst} failures in a row an address is refused for 1 s, then 2 s, 4 s, ... up to
C{max_delay}; a success forgets the address.  Bounded: the least recently seen addresses are
dropped past C{capacity}.
"""
# -*- test-case-name: tests.test_throttle -*-

from __future__ import annotations

from collections import OrderedDict

import attrs


@attrs.define
class _Record:
    failures: int = 0
    blocked_until: float = 0.0
    announced: bool = False


class AuthThrottle:
    def __init__(self, burst: int = 5, max_delay: float = 300.0, capacity: int = 10000) -> None:
        self._burst = burst
        self._max_delay = max_delay
        self._capacity = capacity
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def blocked_for(self, host: str, now: float) -> float:
        """Seconds C{host} must still wait before it may try again (0: it may try now)."""
        record = self._records.get(host)
        if record is None:
            return 0.0
        return max(0.0, record.blocked_until - now)

    def should_log_block(self, host: str) -> bool:
        """Log a refusal once per block period, not once per attempt (a flood would flood logs)."""
        record = self._records.get(host)
        if record is None or record.announced:
            return False
        record.announced = True
        return True

    def failed(self, host: str, now: float) -> float:
        """Record a failure; return the block that starts now (0 while under the burst)."""
        record = self._records.pop(host, None) or _Record()
        self._records[host] = record
        while len(self._records) > self._capacity:
            self._records.popitem(last=False)
        record.failures += 1
        over = record.failures - self._burst
        if over < 0:
            return 0.0
        delay = min(self._max_delay, 2.0 ** min(over, 30))
        record.blocked_until = now + delay
        record.announced = False
        return delay

    def succeeded(self, host: str) -> None:
        self._records.pop(host, None)

    def tracked(self) -> int:
        return len(self._records)
