"""Typed messages: one class per op and direction (docs/protocol.md §3-4).

Each class names its op and its fields; :mod:`.codec` turns messages into
frames and back, checking field types from these annotations, so a class
here is all it takes to add an op. Checks beyond a field's type (a path, a
mode, a digest) are the class's own ``problem()``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar, Self, dataclass_transform

from .frames import Body

__all__ = [
    "CLIENT_MESSAGES",
    "FILE_TYPES",
    "HASH_NAME",
    "NO_DEFAULT",
    "SERVER_MESSAGES",
    "SIGNAL_NAMES",
    "Cancel",
    "Credit",
    "Data",
    "Done",
    "Echo",
    "Entries",
    "Error",
    "ErrorCode",
    "Exec",
    "Exit",
    "Field",
    "FileInfo",
    "Get",
    "Hello",
    "HelloReply",
    "ListDir",
    "Message",
    "Mkdir",
    "Ok",
    "Op",
    "Put",
    "Ready",
    "SetAttr",
    "Signal",
    "Stat",
    "StatReply",
    "Stderr",
    "Stdin",
    "Stdout",
    "Symlink",
    "is_os_string",
]


class Op(StrEnum):
    """Every op on the wire (docs/protocol.md §3)."""

    HELLO = "hello"
    ECHO = "echo"
    EXEC = "exec"
    STDIN = "stdin"
    SIGNAL = "signal"
    STDOUT = "stdout"
    STDERR = "stderr"
    EXIT = "exit"
    OK = "ok"
    ERROR = "error"
    STAT = "stat"
    LIST = "list"
    ENTRIES = "entries"
    GET = "get"
    PUT = "put"
    FILE = "file"
    READY = "ready"
    DATA = "data"
    DONE = "done"
    CANCEL = "cancel"
    MKDIR = "mkdir"
    SYMLINK = "symlink"
    SETATTR = "setattr"
    CREDIT = "credit"


class ErrorCode(StrEnum):
    """The closed set of error codes (docs/protocol.md §6)."""

    # Connection errors: the frame is sent with id 0 and the connection closed.
    BAD_FRAME = "bad_frame"
    TOO_LARGE = "too_large"
    UNAUTHENTICATED = "unauthenticated"
    AUTH_FAILED = "auth_failed"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_OP = "unknown_op"
    PROTOCOL_ERROR = "protocol_error"
    HELLO_TIMEOUT = "hello_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    # Request errors: the frame carries the request's id; the connection goes on.
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    PERMISSION_DENIED = "permission_denied"
    EXEC_FAILED = "exec_failed"
    FORBIDDEN = "forbidden"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"
    PATH_OUTSIDE_ROOT = "path_outside_root"
    IS_A_DIRECTORY = "is_a_directory"
    NOT_A_DIRECTORY = "not_a_directory"
    NO_SPACE = "no_space"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    SOURCE_CHANGED = "source_changed"
    BUSY = "busy"
    CANCELLED = "cancelled"
    IO_ERROR = "io_error"


# Signals a client may ask for, by their POSIX names without "SIG".
SIGNAL_NAMES = frozenset(
    {"HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "TERM", "CONT", "STOP", "WINCH"}
)


NO_DEFAULT: Any = object()  # the default of a field that has none: it must be given


class Field:
    """One field of a message class: its name, its annotation as written, its default."""

    __slots__ = ("default", "name", "type")

    def __init__(self, name: str, type: str, default: Any) -> None:
        self.name, self.type, self.default = name, type, default


@dataclass_transform(eq_default=False)
class _MessageClass(type):
    """Makes each message class a slotted record of its annotated fields.

    What ``@dataclass(slots=True)`` did for these classes, for well under
    half of its cost at import, which every process pays (5-9 ms for 26
    classes here): dataclasses inspected every annotation, compiled each
    ``__init__`` inside a function made for the purpose, and made every class
    twice to give it slots. Here the fields are read from the annotations as
    written (strings, under postponed annotations; ``ClassVar`` ones are not
    fields), ``__slots__`` is set before the class is made, and ``__init__``
    takes the fields in order, the base's first, as a dataclass does.
    """

    FIELDS: tuple[Field, ...]

    def __new__(
        mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any]
    ) -> _MessageClass:
        annotations: dict[str, str] = namespace.get("__annotations__", {})
        own = [n for n, kind in annotations.items() if not kind.startswith("ClassVar")]
        defaults = {n: namespace.pop(n) for n in own if n in namespace}
        namespace["__slots__"] = tuple(own)
        cls = super().__new__(mcs, name, bases, namespace)
        inherited: tuple[Field, ...] = getattr(cls, "FIELDS", ())
        fields = (
            *inherited,
            *(Field(n, annotations[n], defaults.get(n, NO_DEFAULT)) for n in own),
        )
        cls.FIELDS = fields
        cls.__init__ = _make_init(name, fields)  # type: ignore[misc]
        return cls


def _make_init(class_name: str, fields: tuple[Field, ...]) -> Any:
    names = [f.name for f in fields]
    defaults = [f.default for f in fields if f.default is not NO_DEFAULT]
    if any(f.default is NO_DEFAULT for f in fields[len(fields) - len(defaults) :]):
        raise TypeError(f"{class_name}: a field without a default follows one with a default")
    source = f"def __init__(self, {', '.join(names)}):\n" + "".join(
        f"    self.{n} = {n}\n" for n in names
    )
    namespace: dict[str, Any] = {}
    exec(source, {}, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{class_name}.__init__"
    init.__defaults__ = tuple(defaults) or None
    return init


class Message(metaclass=_MessageClass):
    """Base of every message; ``id`` routes it (0 is the connection itself).

    Nothing changes a message once made; two are equal when their class and
    fields are.
    """

    OP: ClassVar[Op]
    HAS_BODY: ClassVar[bool] = False
    FIELDS: ClassVar[tuple[Field, ...]]  # every field in order, ``id`` first
    id: int

    def problem(self) -> str | None:
        """What makes this message invalid beyond its field types, if anything."""
        return None

    def replace(self, **changes: Any) -> Self:
        """This message with ``changes`` to some of its fields (as ``dataclasses.replace``)."""
        values = {f.name: getattr(self, f.name) for f in self.FIELDS}
        return type(self)(**(values | changes))

    def _values(self) -> list[Any]:
        return [getattr(self, f.name) for f in self.FIELDS]

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Message)
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # equal by value, and not frozen

    def __repr__(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self.FIELDS)
        return f"{type(self).__name__}({args})"


# Client -> server ---------------------------------------------------------


class Hello(Message):
    """First frame of every connection: protocol version and token."""

    OP = Op.HELLO
    version: int
    token: str


class Echo(Message):
    """Ask the agent to send ``body`` back in an ``ok`` reply."""

    OP = Op.ECHO
    HAS_BODY = True
    body: Body = b""


class Exec(Message):
    """Run a program: ``argv`` directly, or ``shell`` through ``/bin/sh -c``."""

    OP = Op.EXEC
    argv: list[str] | None = None
    shell: str | None = None
    cwd: str | None = None
    env: dict[str, str] | None = None
    timeout: float | None = None
    stdin: bool = False

    def problem(self) -> str | None:
        if (self.argv is None) == (self.shell is None):
            return "exec needs exactly one of argv and shell"
        if self.argv is not None and not self.argv:
            return "exec argv is empty"
        if self.timeout is not None and self.timeout <= 0:
            return "exec timeout must be > 0"
        strings = [*(self.argv or ()), self.shell or "", self.cwd or ""]
        for key, value in (self.env or {}).items():
            if not key or "=" in key:
                return f"bad environment variable name {shorten(key)!r}"
            strings += (key, value)
        for text in strings:
            if not is_os_string(text):
                return f"{shorten(text)!r} cannot be passed to a program"
        return None


class Stdin(Message):
    """Bytes for a running exec's standard input; ``eof`` closes it."""

    OP = Op.STDIN
    HAS_BODY = True
    body: Body = b""
    eof: bool = False


class Signal(Message):
    """Send a signal (a name from :data:`SIGNAL_NAMES`) to a running exec's group."""

    OP = Op.SIGNAL
    signal: str

    def problem(self) -> str | None:
        if self.signal not in SIGNAL_NAMES:
            return f"unknown signal {shorten(self.signal)!r}"
        return None


# Server -> client ---------------------------------------------------------


class HelloReply(Message):
    """The agent's answer to a good ``hello``."""

    OP = Op.HELLO
    version: int
    server: str
    encoding: str
    max_header: int
    max_body: int
    stdin_window: int  # bytes of an exec's stdin a client may send ahead of its credits
    idle_timeout: float | None = None  # seconds; keep a quiet connection alive with echo

    def problem(self) -> str | None:
        return None if self.stdin_window > 0 else "stdin_window must be > 0"


class Credit(Message):
    """The agent took ``bytes`` more of an exec's stdin (into the program's
    pipe, or dropped): the client may send as many more (§4.6)."""

    OP = Op.CREDIT
    bytes: int

    def problem(self) -> str | None:
        return None if self.bytes > 0 else "credit bytes must be > 0"


class Stdout(Message):
    OP = Op.STDOUT
    HAS_BODY = True
    body: Body = b""


class Stderr(Message):
    OP = Op.STDERR
    HAS_BODY = True
    body: Body = b""


class Exit(Message):
    """Last frame of an exec: exit status, or the signal that ended it."""

    OP = Op.EXIT
    status: int | None = None
    signal: int | None = None
    signal_name: str | None = None
    timed_out: bool = False


class Ok(Message):
    """Success reply of a request that has no richer reply (``echo``)."""

    OP = Op.OK
    HAS_BODY = True
    body: Body = b""


class Error(Message):
    """A failure: of a request (its id) or of the connection (id 0)."""

    OP = Op.ERROR
    code: str
    message: str = ""


# Files (docs/protocol.md §5) ------------------------------------------------

HASH_NAME = "blake3"  # the only transfer hash of protocol version 1
_DIGEST_LEN = 64  # hex characters of a 32-byte BLAKE3 digest
FILE_TYPES = frozenset({"file", "dir", "link", "other"})


def _path_problem(path: str) -> str | None:
    # Only emptiness here: a NUL or a string that is no file name is refused
    # by the agent's confinement check as path_outside_root (§5.1).
    return "path is empty" if not path else None


def _mode_problem(mode: int | None) -> str | None:
    if mode is not None and not 0 <= mode <= 0o7777:
        return f"mode {mode} is not a permission mode"
    return None


_MTIME_RANGE = range(-(2**63), 2**63)  # what the kernel's signed 64-bit time in ns holds


def _mtime_problem(mtime_ns: int | None) -> str | None:
    if mtime_ns is not None and mtime_ns not in _MTIME_RANGE:
        return "mtime_ns is out of range"
    return None


def _digest_problem(digest: str | None) -> str | None:
    if digest is not None and (
        len(digest) != _DIGEST_LEN or digest.strip("0123456789abcdef") != ""
    ):
        return "digest is not 64 lowercase hex digits"
    return None


def _first(*problems: str | None) -> str | None:
    return next((p for p in problems if p is not None), None)


class Stat(Message):
    """Describe one path; a final symlink is described itself unless ``follow``."""

    OP = Op.STAT
    path: str
    follow: bool = False

    def problem(self) -> str | None:
        return _path_problem(self.path)


class ListDir(Message):
    """List a directory: ``entries`` frames, then ``done``."""

    OP = Op.LIST
    path: str

    def problem(self) -> str | None:
        return _path_problem(self.path)


class Get(Message):
    """Download a file from ``offset`` if ``prefix_digest`` matches its first bytes."""

    OP = Op.GET
    path: str
    offset: int = 0
    prefix_digest: str | None = None

    def problem(self) -> str | None:
        if self.offset < 0:
            return "offset must be >= 0"
        if self.offset and self.prefix_digest is None:
            return "an offset needs its prefix_digest"
        return _first(_path_problem(self.path), _digest_problem(self.prefix_digest))


class Put(Message):
    """Upload a file of ``size`` bytes; the agent answers ``ready``."""

    OP = Op.PUT
    path: str
    size: int
    mode: int = 0o644
    mtime_ns: int | None = None
    hash: str = HASH_NAME
    resume: bool = False

    def problem(self) -> str | None:
        if self.size < 0:
            return "size must be >= 0"
        if self.hash != HASH_NAME:
            return f"hash {shorten(self.hash)!r} is not supported (only {HASH_NAME})"
        return _first(
            _path_problem(self.path), _mode_problem(self.mode), _mtime_problem(self.mtime_ns)
        )


class Data(Message):
    """A piece of a file, either way; a put's first one carries ``offset``."""

    OP = Op.DATA
    HAS_BODY = True
    body: Body = b""
    offset: int | None = None

    def problem(self) -> str | None:
        if self.offset is not None and self.offset < 0:
            return "offset must be >= 0"
        return None


class Done(Message):
    """End of a transfer (with the whole file's digest) or of a listing."""

    OP = Op.DONE
    digest: str | None = None

    def problem(self) -> str | None:
        return _digest_problem(self.digest)


class Cancel(Message):
    """Abandon a running request; it ends with ``error`` code ``cancelled``.

    ``keep`` asks a put to keep its partial file for a later resume (the
    sender was interrupted); without it the partial file is removed (the
    sender gave up, e.g. its source changed).
    """

    OP = Op.CANCEL
    reason: str = ""
    keep: bool = False


class Mkdir(Message):
    """Make a directory (its parents must exist; an existing one is fine)."""

    OP = Op.MKDIR
    path: str
    mode: int | None = None

    def problem(self) -> str | None:
        return _first(_path_problem(self.path), _mode_problem(self.mode))


class Symlink(Message):
    """Make ``path`` a symbolic link to ``target`` (replacing a link or file there)."""

    OP = Op.SYMLINK
    path: str
    target: str

    def problem(self) -> str | None:
        if not self.target or not is_os_string(self.target):
            return "symlink target is not a file name"
        return _path_problem(self.path)


class SetAttr(Message):
    """Set the mode and/or modification time of a path."""

    OP = Op.SETATTR
    path: str
    mode: int | None = None
    mtime_ns: int | None = None

    def problem(self) -> str | None:
        return _first(
            _path_problem(self.path), _mode_problem(self.mode), _mtime_problem(self.mtime_ns)
        )


class StatReply(Message):
    """What a path is: ``type`` is file, dir, link or other."""

    OP = Op.STAT
    type: str
    size: int
    mode: int
    mtime_ns: int
    target: str | None = None

    def problem(self) -> str | None:
        return None if self.type in FILE_TYPES else f"unknown file type {shorten(self.type)!r}"


class Entries(Message):
    """Some entries of a listing: the body is a JSON array of stat objects with names."""

    OP = Op.ENTRIES
    HAS_BODY = True
    body: Body = b""


class FileInfo(Message):
    """Start of a download: what the file is, and where the data starts."""

    OP = Op.FILE
    size: int
    mode: int
    mtime_ns: int
    offset: int = 0
    hash: str = HASH_NAME


class Ready(Message):
    """The agent takes a put's data from ``offset`` (a resumable prefix it holds)."""

    OP = Op.READY
    offset: int = 0
    prefix_digest: str | None = None

    def problem(self) -> str | None:
        return _digest_problem(self.prefix_digest)


CLIENT_MESSAGES: dict[str, type[Message]] = {
    cls.OP: cls
    for cls in (
        Hello, Echo, Exec, Stdin, Signal, Stat, ListDir, Get, Put, Data, Done, Cancel, Mkdir,
        Symlink, SetAttr,
    )
}  # fmt: skip
SERVER_MESSAGES: dict[str, type[Message]] = {
    cls.OP: cls
    for cls in (
        HelloReply, Stdout, Stderr, Exit, Ok, Error, StatReply, Entries, FileInfo, Ready, Data,
        Done, Credit,
    )
}  # fmt: skip


ALL_MESSAGES = (*CLIENT_MESSAGES.values(), *SERVER_MESSAGES.values())  # Data and Done twice


def is_os_string(text: str) -> bool:
    """Whether ``text`` maps to bytes a program can receive (argv, env, paths).

    No NUL, and nothing but UTF-8 or PEP 383 surrogates for undecodable bytes.
    """
    if "\0" in text:
        return False
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def shorten(text: str, limit: int = 64) -> str:
    """``text`` cut to ``limit`` characters: the peer's text goes back out in our
    error frames."""
    return text if len(text) <= limit else text[:limit] + "..."
