"""Output segments (runner.output) and what the scraper makes of them, driven directly."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from runner import metadata, protocol
from runner.config import load
from runner.output import MAX_LINE, Segments, join_pieces, scrape_view
from runner.roles.base import Role
from runner.roles.scraper import Scraper


def test_segments_end_at_newline_and_carriage_return() -> None:
    segments = Segments()
    assert segments.feed(b"  10%|#    |\r  20%|##   |\r 30") == [(b"  10%|#    |\r  20%|##   |\r", True)]
    assert segments.feed(b"%|###  |\n{\"a\"") == [(b" 30%|###  |\n", True)]
    assert segments.feed(b": 1}\n") == [(b'{"a": 1}\n', True)]
    assert segments.close() == []


def test_an_unterminated_tail_gets_a_newline_at_the_end() -> None:
    segments = Segments()
    assert segments.feed(b"done\nno newline") == [(b"done\n", True)]
    assert segments.close() == [(b"no newline\n", True)]


def test_an_overlong_line_is_plain_output_and_memory_stays_bounded() -> None:
    segments = Segments(max_line=1000)
    pieces = []
    for _ in range(50):  # 50 KB without a line end, fed 1 KB at a time
        pieces += segments.feed(b'{"a": "' + b"x" * 1017 + b'"}')
        assert len(segments.pending) <= 1000
    pieces += segments.feed(b'tail of it\n{"b": 2}\n')
    assert all(not scrape for _data, scrape in pieces[:-1])
    assert pieces[-1] == (b'{"b": 2}\n', True), "the next line is scraped again"
    assert b"".join(data for data, _ in pieces) == (b'{"a": "' + b"x" * 1017 + b'"}') * 50 \
        + b'tail of it\n{"b": 2}\n', "every byte is passed on, in order"


def test_an_overlong_line_is_cut_after_a_space_where_it_can_be() -> None:
    segments = Segments(max_line=100)
    words = b"word " * 30
    pieces = segments.feed(words)
    assert pieces and all(data.endswith(b" ") and not scrape for data, scrape in pieces)


def test_join_and_scrape_view() -> None:
    assert join_pieces([(b"a\n", True), (b"b\n", True), (b"c", False), (b"d\n", False),
                        (b"e\n", True)]) == [(b"a\nb\n", True), (b"cd\n", False), (b"e\n", True)]
    assert scrape_view(b"x\r{\"a\": 1}\r\n") == b"x\n{\"a\": 1}\n\n"
    assert MAX_LINE >= 64 * 1024


@pytest.fixture
def scraper(tmp_path: Path):
    config = load(["--working-dir", str(tmp_path / "work"), "--runtime-dir", str(tmp_path / "run"),
                   "--debug"], environ={})
    role = Scraper(config, bus=None)
    role.initialize()
    workdir = tmp_path / "work" / "host-1r31eq"
    request = {"experiment": {"key": "exp-1", "project": "p", "filename": "x.py",
                              "artifacts": {}}, "config": {"env": {}}}
    attempt = protocol.Attempt(attempt_id="host-1r31eq", queue="local_q", token="t", attempts=0,
                       key="exp-1", project="p", request=request, workdir=str(workdir),
                       resources={}, taken_at=time.time(), save_frequency=60.0)
    role.open(attempt)
    return role, attempt


def _end(role: Scraper, attempt: protocol.Attempt) -> tuple[dict, bytes]:
    role.close(protocol.AttemptEnded(attempt=attempt, outcome=protocol.Outcome(
        status="completed", error="", message="", exit_code=0), facts={}))
    folder = metadata.metadata_folder(attempt.workdir)
    text = (folder / metadata.scrape_name(attempt.attempt_id)).read_text()
    document = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} written"))
    return document, (folder / metadata.output_name(attempt.attempt_id)).read_bytes()


def test_json_behind_a_progress_bar_segment_is_scraped(scraper) -> None:
    role, attempt = scraper
    chunk = b'  5%|#   | 1/20\r{"experiment": {"epoch_1": 0.5}}\n 10%|##  | 2/20\r'
    role.handle(protocol.OutputChunk(attempt_id=attempt.attempt_id, data=chunk))
    document, output = _end(role, attempt)
    assert document["experiment"] == {"epoch_1": 0.5}
    assert output == chunk, "the output log keeps the bytes as they came"


def test_non_finite_numbers_are_written_as_strings(scraper) -> None:
    role, attempt = scraper
    role.handle(protocol.OutputChunk(attempt_id=attempt.attempt_id, data=(
        b'{"experiment": {"loss": NaN, "big": 1e400, "low": -Infinity, "ok": 1.5}}\n')))
    document, _output = _end(role, attempt)
    assert document["experiment"] == {"loss": "NaN", "big": "Infinity", "low": "-Infinity",
                                      "ok": 1.5}


def test_pieces_of_an_overlong_line_are_written_not_scraped(scraper) -> None:
    role, attempt = scraper
    piece = b'{"experiment": {"x": 1}}'
    role.handle(protocol.OutputChunk(attempt_id=attempt.attempt_id, data=piece, scrape=False))
    role.handle(protocol.OutputChunk(attempt_id=attempt.attempt_id, data=b'{"experiment": {"y": 2}}\n',
                                     offset=len(piece)))
    document, output = _end(role, attempt)
    assert document["experiment"] == {"y": 2}
    assert output == b'{"experiment": {"x": 1}}{"experiment": {"y": 2}}\n'


class _BusyBus:
    """A stand-in for runner.bus.Bus (no sockets): an inbox that is never empty, and a
    record of what the loop posted."""

    def __init__(self):
        self.posted: list = []
        self.empty = False

    def watch_fd(self, fd):
        pass

    def recv(self, timeout=0.0, drained=False):
        return None if self.empty else protocol.RunnerLog(attempt_id="j", text="x")

    recv_nowait = recv

    def post(self, destination, message):
        self.posted.append(message)

    def flush(self):
        return True


def test_a_role_kept_busy_by_its_inbox_still_sends_heartbeats(tmp_path: Path) -> None:
    class Slow(Role):
        name = "slow"
        HEARTBEAT = 0.05

        def handle(self, message):
            time.sleep(0.01)  # each message takes a while; the inbox never empties

    bus = _BusyBus()
    role = Slow(load(["--working-dir", str(tmp_path), "--runtime-dir", str(tmp_path / "run")],
                     environ={}), bus)
    thread = threading.Thread(target=role.loop, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum(
            isinstance(m, protocol.Heartbeat) for m in list(bus.posted)) < 3:
        time.sleep(0.05)
    bus.empty = True
    role.request_stop()
    thread.join(10)
    assert sum(isinstance(m, protocol.Heartbeat) for m in bus.posted) >= 3
