"""Which programs an agent runs: ``--no-exec`` and ``--allow PATTERN``, without I/O."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ExecPolicy"]


@dataclass(frozen=True, slots=True)
class ExecPolicy:
    """``enabled`` false refuses every exec; ``allow`` (if not empty) limits programs.

    A pattern with a ``/`` is matched (fnmatch) against the program's absolute
    path; one without, against a bare program name looked up in ``PATH``
    (``ls``, ``python3*``), never against a path the client wrote, so
    ``./ls`` does not pass as ``ls``. ``--shell`` runs ``/bin/sh``: allow that
    path to allow command lines.
    """

    enabled: bool = True
    allow: Sequence[str] = ()

    def refusal(self, program: str, resolved: str | None) -> str | None:
        """Why ``program`` (argv[0]; ``resolved`` is its absolute path) may not run."""
        if not self.enabled:
            return "exec is disabled on this agent"
        if not self.allow:
            return None
        for pattern in self.allow:
            if "/" in pattern:
                if resolved is not None and fnmatch.fnmatchcase(resolved, pattern):
                    return None
            elif "/" not in program and fnmatch.fnmatchcase(program, pattern):
                return None
        return f"{program} is not allowed on this agent"
