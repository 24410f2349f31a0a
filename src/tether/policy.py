"""Which programs an agent runs: ``--no-exec`` and ``--allow PATTERN``, without I/O."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from .messages import shorten

__all__ = ["LOADER_VARIABLES", "ExecPolicy"]

# Environment variables that make an allowed program load or run other code.
LOADER_VARIABLES = (
    *("LD_*", "GCONV_PATH", "BASH_ENV", "ENV", "BASH_FUNC_*", "SHELLOPTS", "BASHOPTS", "PS4"),
    *("PYTHON*", "PERL5*", "PERLLIB", "RUBYOPT", "RUBYLIB", "NODE_OPTIONS", "NODE_PATH"),
    *("GIT_*", "PATH", "IFS"),
)


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
        return f"{shorten(program)} is not allowed on this agent"

    def env_refusal(self, names: Sequence[str]) -> str | None:
        """Why these client environment variables may not be set.

        With an allow-list, variables that make a program load other code
        (``LD_PRELOAD``...) would let any code run inside an allowed program.
        """
        if not self.allow:
            return None
        for name in names:
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in LOADER_VARIABLES):
                return f"{shorten(name)} may not be set on this agent (it has an --allow list)"
        return None
