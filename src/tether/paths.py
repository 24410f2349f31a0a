"""Confinement of request paths to the agent's root, without I/O (docs/protocol.md §5.1).

The agent resolves every path a client names in two steps: lexically here
(:func:`confine`: no NUL, ``..`` may not climb out, absolute paths must lie
under the root), then against the file system in the I/O layer, which
resolves symlinks with ``os.path.realpath`` and asks :func:`is_within` again.
Both answers must be yes.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat

from .exceptions import RemoteError
from .messages import ErrorCode, is_os_string

__all__ = [
    "LINK_SUFFIX",
    "PARTIAL_SUFFIX",
    "UNFINISHED_TREE_MODE",
    "confine",
    "is_unfinished_tree",
    "is_within",
    "link_temp_name",
    "looks_partial",
    "outside_root",
    "partial_name",
]

PARTIAL_SUFFIX = ".tether-part"
LINK_SUFFIX = ".tether-link"
NAME_MAX = 255  # bytes in one file name (Linux, and most file systems)

# The mode of the top directory a tree copy has made, until the copy has
# copied everything: the sticky bit on a private directory, which nobody sets
# by hand, tells "an unfinished copy" (that --resume goes on with) from a
# directory that was there before (that receives the source by name).
UNFINISHED_TREE_MODE = 0o1700


def is_unfinished_tree(mode: int) -> bool:
    """Whether a directory of ``mode`` (its permission bits, or a whole
    ``st_mode``) is the top of a tree copy that has not copied everything."""
    return stat.S_IMODE(mode) == UNFINISHED_TREE_MODE


def partial_name(name: str) -> str:
    """The hidden name, beside ``name``, under which a transfer to ``name``
    collects its bytes until they are verified (and keeps them for a resume)."""
    return _beside("." + name, PARTIAL_SUFFIX)


def link_temp_name(name: str) -> str:
    """The name beside ``name`` under which a symlink is made, to be renamed
    over ``name``."""
    return _beside(name, LINK_SUFFIX)


def looks_partial(name: str) -> bool:
    """Whether ``name`` has the form of a partial file's name."""
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


def _beside(base: str, suffix: str) -> str:
    # A name of 243 to 255 bytes plus the suffix is over NAME_MAX, and could
    # never be copied: such a name gets a fixed-length one made from it.
    name = base + suffix
    if len(os.fsencode(name)) <= NAME_MAX:
        return name
    return "." + hashlib.sha256(os.fsencode(base)).hexdigest()[:32] + suffix


def is_within(root: str, path: str) -> bool:
    """Whether normalized absolute ``path`` is ``root`` or below it."""
    if root == "/":
        return path.startswith("/")
    return path == root or path.startswith(root + "/")


def outside_root(requested: str) -> RemoteError:
    """The error for a path that leaves the root."""
    shown = requested if len(requested) <= 200 else requested[:200] + "..."
    return RemoteError(ErrorCode.PATH_OUTSIDE_ROOT, f"{shown!r} is outside the agent's root")


def confine(root: str, requested: str) -> str:
    """The absolute, normalized path ``requested`` names under ``root``.

    ``root`` must be absolute and normalized. A relative ``requested`` is
    taken from the root; an absolute one must lie under it.

    Raises:
        RemoteError: ``path_outside_root`` for an escape, a NUL byte or a
            string that is not a file name; ``bad_request`` for an empty one.
    """
    if not requested:
        raise RemoteError(ErrorCode.BAD_REQUEST, "path is empty")
    if not is_os_string(requested):
        raise outside_root(requested)  # NUL, or not bytes a file name can hold
    if requested.startswith("/"):
        # An absolute path must name the root as it is written, then walk on.
        collapsed = "/" + "/".join(part for part in requested.split("/") if part)
        if not is_within(root, collapsed):
            raise outside_root(requested)
        relative = collapsed[len(root) :]
    else:
        relative = requested
    # A relative path is walked lexically, before any symlink is looked at: a
    # ".." that would climb above the root at any point is an escape, even if
    # later components come back down ("../root/x").
    parts: list[str] = []
    for part in relative.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise outside_root(requested)
            parts.pop()
        else:
            parts.append(part)
    return posixpath.join(root, *parts) if parts else root
