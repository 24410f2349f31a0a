"""Who may connect: token identities and the brake on guessing, without I/O.

Tokens are compared in constant time against every authorized token; an
address with too many failures in a minute is blocked for a while (its right
token too), while other addresses keep working.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict, deque
from dataclasses import dataclass, field

__all__ = ["AuthFailure", "Authenticator", "FailureLimiter"]

MAX_FAILURES = 10  # failed hellos from one address per FAILURE_WINDOW before it is blocked
FAILURE_WINDOW = 60.0  # seconds
BLOCK_SECONDS = 60.0  # how long a blocked address stays blocked


@dataclass
class FailureLimiter:
    """Counts failed hellos per address over a sliding window.

    Both tables are kept in the order of their last change, oldest first, so
    what has expired is always at the front: each failure drops it there, in
    time proportional to what it drops. (Scanning the whole table, once it
    held 10,000 addresses, cost the agent 4 ms per failed hello under a
    spray of addresses, and blocks were never dropped at all.)
    """

    max_failures: int = MAX_FAILURES
    window: float = FAILURE_WINDOW
    block_seconds: float = BLOCK_SECONDS
    _failures: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)
    _blocked_until: OrderedDict[str, float] = field(default_factory=OrderedDict)

    def blocked(self, address: str, now: float) -> float:
        """Seconds ``address`` stays blocked (0 if it is not)."""
        until = self._blocked_until.get(address, 0.0)
        if until <= now:
            self._blocked_until.pop(address, None)
            return 0.0
        return until - now

    def failed(self, address: str, now: float) -> None:
        times = self._failures.setdefault(address, deque())
        self._failures.move_to_end(address)
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.max_failures:
            self._blocked_until[address] = now + self.block_seconds
            self._blocked_until.move_to_end(address)
            times.clear()
        self._forget_old(now)

    def _forget_old(self, now: float) -> None:
        # Bounded memory under a spray of addresses: what has expired goes.
        failures = self._failures
        while failures:
            times = failures[next(iter(failures))]
            if times and times[-1] > now - self.window:
                break
            failures.popitem(last=False)
        blocked = self._blocked_until
        while blocked and blocked[next(iter(blocked))] <= now:
            blocked.popitem(last=False)


@dataclass(frozen=True, slots=True)
class AuthFailure:
    reason: str  # for the log and the client: never contains a token


class Authenticator:
    """Maps a presented token to the name it was issued under."""

    def __init__(self, tokens: dict[str, str], limiter: FailureLimiter | None = None) -> None:
        self.tokens = tokens  # token -> name
        self.limiter = limiter or FailureLimiter()

    def check(self, token: str, address: str | None, now: float) -> str | AuthFailure:
        """The identity for ``token``, or why not.

        ``address`` is None for peers that are not rate limited (Unix sockets,
        which only their owner can reach).
        """
        if address is not None and (wait := self.limiter.blocked(address, now)):
            return AuthFailure(f"too many failed attempts from {address}; blocked for {wait:.0f}s")
        offered = token.encode("utf-8", "surrogatepass")  # any str JSON can carry
        identity = None
        for known, name in self.tokens.items():
            # Every token is compared, whichever matches: no early exit to time.
            if hmac.compare_digest(offered, known.encode()) and offered:
                identity = name
        if identity is None:
            if address is not None:
                self.limiter.failed(address, now)
            return AuthFailure("authentication failed")
        return identity
