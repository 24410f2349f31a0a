"""The combined benchmark's rows, targets and table (used by ``bench/run.py``).

Not a benchmark itself. A ``Row`` compares one tether figure with one peer's
figure, measured in the same run; its ``Target`` says what the performance
issue asks of that comparison, and the table says whether it is met.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import common


@dataclass(frozen=True)
class Target:
    """What a row must reach: a ratio tether/peer, or (``unit``) tether's own value.

    ``at_least`` True means the value must be >= ``value``, else strictly below
    ``value`` for an absolute bound and <= for a ratio.
    """

    value: float
    at_least: bool = True
    unit: str = ""  # "" for a ratio tether/peer; "MiB" for a bound on tether's value

    def text(self) -> str:
        if self.unit:
            sign = ">=" if self.at_least else "<"
            return f"{sign} {self.value:g} {self.unit}"
        return f"{'>=' if self.at_least else '<='} {self.value:g}x"

    def met(self, tether: float, peer: float | None) -> bool | None:
        """Whether the target is met; None when it cannot be told (no peer for a ratio)."""
        if self.unit:
            return tether >= self.value if self.at_least else tether < self.value
        if peer is None or peer == 0:
            return None
        ratio = tether / peer
        return ratio >= self.value if self.at_least else ratio <= self.value


@dataclass
class Row:
    """One line of the table: tether's figure beside one peer's, with a target."""

    section: str
    what: str  # with the unit, e.g. "put plaintext, MB/s"
    tether: float | None  # None: tether's measurement failed
    peer: str  # the peer's name; "-" when there is none
    peer_value: float | None  # None: the peer is missing or failed
    target: Target | None = None
    decimals: int = 0  # of the tether and peer values
    peer_missing: str = field(default="", repr=False)  # why the peer value is n/a

    def cells(self) -> tuple[str, ...]:
        ratio = (
            self.tether / self.peer_value if self.tether is not None and self.peer_value else None
        )
        met = None
        if self.target is not None and self.tether is not None:
            met = self.target.met(self.tether, self.peer_value)
        return (
            self.section,
            self.what,
            self._number(self.tether, "failed"),
            self.peer,
            self._number(self.peer_value, "n/a" if self.peer != "-" else "-"),
            f"{ratio:.2f}" if ratio is not None else "-",
            self.target.text() if self.target is not None else "-",
            "-" if self.target is None else {True: "yes", False: "NO", None: "n/a"}[met],
        )

    def _number(self, value: float | None, absent: str) -> str:
        return absent if value is None else f"{value:,.{self.decimals}f}"


# Agents for the benchmark: 200 commands at once on one connection (default cap 64),
# and no idle timeout during a long transfer section (default 300 s).
AGENT_OPTIONS = ("--max-execs-per-connection", "256", "--idle-timeout", "3600")


@dataclass(frozen=True)
class Settings:
    """What the runner's options ask for (``bench/run.py``)."""

    runs: int  # rounds per section; medians over them
    fresh_runs: int  # fresh processes of each kind
    size_mib: int  # the transfer's file
    exec_count: int  # exec calls per rate measurement
    exec_concurrency: int  # exec calls at once in the concurrent rows
    echo_count: int  # echo round trips per rate measurement
    echo_clients: int  # connections at once in the many-client echo rows
    idle_count: int  # idle connections


@dataclass
class Section:
    """What a section gives the runner: its rows, notes and whether tether failed."""

    rows: list[Row]
    notes: list[str]
    failed: bool = False  # a tether measurement or check failed: the runner exits 1


HEADER = ("section", "what", "tether", "peer", "peer value", "tether/peer", "target", "met")


def print_rows(rows: Sequence[Row]) -> None:
    """The one Markdown table; numbers right-aligned."""
    common.print_markdown_table(HEADER, [row.cells() for row in rows], right={2, 4, 5})


def median(values: Sequence[float] | None) -> float | None:
    """The median, or None when there is nothing (a failed or missing measurement)."""
    return statistics.median(values) if values else None


def rate(size: int, seconds: Sequence[float] | None) -> float | None:
    """MB/s (10^6 bytes) of moving ``size`` bytes in the median of ``seconds``."""
    middle = median(seconds)
    return None if middle is None else size / middle / 1e6
