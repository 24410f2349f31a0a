"""Text from the other side, made safe to show on a terminal.

A file name or an error message comes from the agent (or from the disk);
written raw to a terminal, its control characters would move the cursor,
rewrite what was shown or retitle the window: a name could hide another file
being copied, as in scp's CVE-2019-6109. What tether prints itself (errors,
listings, progress bars) goes through :func:`printable`. A command's output
is not: it is the command's, byte for byte.
"""

from __future__ import annotations

import re

__all__ = ["printable"]

# C0 controls, DEL and C1 controls; and the same C1 range as the lone
# surrogates (PEP 383) that stand for bytes 0x80-0x9f of a name that is not
# UTF-8, which a terminal in an 8-bit mode takes as controls too.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\udc80-\udc9f]")
# The same and the backslash itself, for a listing: an escape must not be
# mistaken for a name that holds those four characters (as ls -b does).
_CONTROL_OR_BACKSLASH = re.compile("[\\\\\x00-\x1f\x7f-\x9f\udc80-\udc9f]")


def printable(text: str, *, backslashes: bool = False) -> str:
    """``text`` with every control character written as its escape
    (``\\x1b``); with ``backslashes``, each backslash doubled too, so that
    the escapes can be undone (a listing; not a message, which may quote a
    ``repr`` whose backslashes are escapes already)."""
    return (_CONTROL_OR_BACKSLASH if backslashes else _CONTROL).sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    if match.group() == "\\":
        return "\\\\"
    code = ord(match.group())
    if code >= 0xDC80:
        code -= 0xDC00  # the byte a lone surrogate stands for
    return f"\\x{code:02x}"
