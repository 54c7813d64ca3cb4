"""Bounded input from outsiders: small regular files read without blocking, JSON with a size and depth limit,
and one-line text for log lines and reasons.

Everything here fails with UnsafeInput (a ValueError) whose message completes a sentence about the input:
f"status file x.json {exc}" -> "status file x.json is larger than 65536 bytes".
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from typing import Any

MAX_SMALL_FILE = 64 * 1024
MAX_JSON_DEPTH = 20

_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))

# A JSON string (possibly unterminated, so a torn file still scans) or one bracket. Unrolled: no backtracking.
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)


class UnsafeInput(ValueError):
    """Input refused before it could do harm: too big, too deep, not a regular file."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_small_file(path: str | os.PathLike[str], limit: int = MAX_SMALL_FILE) -> bytes:
    """The bytes of a regular file (a symlink only if it resolves to one) of at most `limit` bytes.

    Never blocks on a FIFO and never reads more than limit + 1 bytes. OSError (FileNotFoundError, ...)
    passes through; anything that is not a small regular file raises UnsafeInput."""
    st = os.stat(path)  # follows symlinks: a link to a regular file is fine, one to /dev/zero is not
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeInput(f"is {_kind(st.st_mode)}, not a regular file")
    fd = os.open(path, _OPEN_FLAGS)  # O_NONBLOCK: swapped for a FIFO after the stat, open still returns
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeInput(f"is {_kind(st.st_mode)}, not a regular file")
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            try:
                chunk = os.read(fd, limit + 1 - total)
            except BlockingIOError:
                raise UnsafeInput("would block on read") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise UnsafeInput(f"is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def check_json_depth(text: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise UnsafeInput if the brackets of `text` (outside strings) nest deeper than max_depth.

    Run before json.loads, whose recursive parser would otherwise hit RecursionError on deep input."""
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        char = text[match.start()]
        if char in "[{":
            depth += 1
            if depth > max_depth:
                raise UnsafeInput(f"is nested more than {max_depth} levels deep")
        elif char in "]}":
            depth = max(depth - 1, 0)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_bounded(text: str | bytes | bytearray, *, max_bytes: int = MAX_SMALL_FILE,
                  max_depth: int = MAX_JSON_DEPTH, parse_float: Callable[[str], Any] | None = None,
                  parse_int: Callable[[str], Any] | None = None) -> Any:
    """json.loads for outsiders' input: size and depth checked first, NaN/Infinity refused.

    Raises UnsafeInput (too big, too deep) or ValueError (not JSON; includes UnicodeDecodeError);
    nothing else, provided the parse_float / parse_int hooks raise only ValueError."""
    if len(text) > max_bytes:
        raise UnsafeInput(f"is larger than {max_bytes} bytes")
    if isinstance(text, (bytes, bytearray)):
        data = bytes(text)
        text = data.decode(json.detect_encoding(data), "surrogatepass")  # as json.loads would decode it
    check_json_depth(text, max_depth)
    try:
        return json.loads(text, parse_float=parse_float, parse_int=parse_int, parse_constant=_no_constant)
    except RecursionError:  # belt and braces: the depth check should make this impossible
        raise UnsafeInput("is nested too deeply") from None


def one_line(value: object, limit: int = 200) -> str:
    """Text safe for one log line or reason: control characters escaped, at most `limit` characters."""
    text = str(value)
    if len(text) > 4 * limit:
        text = text[:4 * limit]
    out = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return out if len(out) <= limit else out[:limit - 3] + "..."
