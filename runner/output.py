"""Cutting a run's output into the segments a terminal shows (SPEC section 5.6).

The executor reads stdout and stderr from separate pipes, each through its own
:class:`Segments`, and hands the scraper whole segments only: a segment ends at ``\\n`` or
at ``\\r`` (a progress bar redrawing its line), so a line of one stream is never cut by
bytes of the other.  The bytes themselves are passed on unchanged, in the order they were
read; :func:`scrape_view` is the form the scraper looks for JSON lines in.

Memory is bounded: a stream's unterminated text is held up to ``max_line`` bytes.  Past that
the text is handed on as *plain output* (written to the logs, never parsed), cut after a
space or tab where one is in its second half (so that a secret word is not cut in two), and
so is the rest of that line up to its end.
"""
from __future__ import annotations

MAX_LINE = 1024 * 1024  # bytes: longer lines are plain output (written, not scraped)


def _last_terminator(data: bytes) -> int:
    return max(data.rfind(b"\n"), data.rfind(b"\r"))


def _first_terminator(data: bytes) -> int:
    found = [i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0]
    return min(found) if found else -1


class Segments:
    """One stream's bytes → ``(data, scrape)`` pieces of whole segments, in order.

    ``scrape`` is False for the pieces of a line longer than ``max_line`` bytes."""

    def __init__(self, max_line: int = MAX_LINE):
        if max_line < 2:
            raise ValueError("max_line must be 2 bytes or more")
        self.max_line = max_line
        self.pending = b""
        self.overlong = False  # inside a line already handed on as plain output

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """The pieces ``data`` completes (possibly none)."""
        pieces: list[tuple[bytes, bool]] = []
        data = self.pending + data if self.pending else data
        cut = _last_terminator(data) + 1
        head, self.pending = data[:cut], data[cut:]
        if head and self.overlong:
            end = _first_terminator(head) + 1  # the overlong line ends here
            pieces.append((head[:end], False))
            head = head[end:]
            self.overlong = False
        if head:
            pieces.append((head, True))
        while len(self.pending) > self.max_line:
            pending = self.pending
            space = max(pending.rfind(b" ", 0, self.max_line), pending.rfind(b"\t", 0, self.max_line))
            cut = space + 1 if space >= self.max_line // 2 else self.max_line
            pieces.append((pending[:cut], False))
            self.pending = pending[cut:]
            self.overlong = True
        return pieces

    def close(self) -> list[tuple[bytes, bool]]:
        """The last piece at the end of the stream: unterminated text gets a ``\\n``."""
        if not self.pending:
            return []
        piece = (self.pending + b"\n", not self.overlong)
        self.pending, self.overlong = b"", False
        return [piece]


def join_pieces(pieces: list[tuple[bytes, bool]]) -> list[tuple[bytes, bool]]:
    """``pieces`` with neighbours of the same kind joined (fewer, larger messages)."""
    joined: list[tuple[bytes, bool]] = []
    for data, scrape in pieces:
        if joined and joined[-1][1] == scrape:
            joined[-1] = (joined[-1][0] + data, scrape)
        else:
            joined.append((data, scrape))
    return joined


def scrape_view(data: bytes) -> bytes:
    """``data`` as lines for JSON scraping: ``\\r`` ends a line as ``\\n`` does."""
    return data.replace(b"\r", b"\n") if b"\r" in data else data
