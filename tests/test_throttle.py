"""Backoff for failed agent authentications."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from nowconnect.throttle import AuthThrottle


class ThrottleTests(SynchronousTestCase):
    def test_burst_then_doubling_capped(self) -> None:
        """
        The first `burst - 1` failures are free and the `burst`-th starts a block of 1 s; each
        further failure doubles it, up to the cap.
        """
        t = AuthThrottle(burst=3, max_delay=5)
        self.assertEqual([t.failed("a", 0) for _ in range(2)], [0, 0])
        self.assertEqual(t.blocked_for("a", 0), 0)
        self.assertEqual(t.failed("a", 10), 1)
        self.assertEqual(t.blocked_for("a", 10.5), 0.5)
        self.assertEqual(t.blocked_for("a", 11), 0)
        self.assertEqual([t.failed("a", 20) for _ in range(4)], [2, 4, 5, 5])

    def test_success_forgets(self) -> None:
        """A successful authentication clears the address's record."""
        t = AuthThrottle(burst=2)
        t.failed("a", 0)
        self.assertEqual(t.failed("a", 0), 1)
        t.succeeded("a")
        self.assertEqual(t.blocked_for("a", 0), 0)
        self.assertEqual(t.tracked(), 0)

    def test_addresses_independent(self) -> None:
        """One address's failures do not block another."""
        t = AuthThrottle(burst=1)
        t.failed("a", 0)
        t.failed("a", 0)
        self.assertGreater(t.blocked_for("a", 0), 0)
        self.assertEqual(t.blocked_for("b", 0), 0)

    def test_bounded(self) -> None:
        """Past capacity the least recently failing addresses are forgotten."""
        t = AuthThrottle(burst=1, capacity=10)
        for i in range(100):
            t.failed(f"10.0.0.{i}", 0)
        self.assertEqual(t.tracked(), 10)
        self.assertEqual(t.blocked_for("10.0.0.0", 0), 0)

    def test_block_logged_once(self) -> None:
        """Refusals during one block period are announced once."""
        t = AuthThrottle(burst=0)
        t.failed("a", 0)
        self.assertTrue(t.should_log_block("a"))
        self.assertFalse(t.should_log_block("a"))
        t.failed("a", 5)
        self.assertTrue(t.should_log_block("a"))
