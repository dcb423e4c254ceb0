"""Every message that crosses a process boundary inside the runner.

Frame layout (one ZeroMQ frame per message, or one per batch of messages)::

    message:  msgpack array [PROTOCOL_VERSION: int, type_name: str, field_1, field_2, ...]
    batch:    msgpack array [PROTOCOL_VERSION: int, "batch", message_1, message_2, ...]

where each ``message_i`` of a batch is a whole message array as above (version included),
nested as an array, not as bytes: :func:`batch` joins frames made by :func:`encode` under
one array header, and :func:`decode_many` reads the whole batch with one msgpack call.  A
batch holds messages for one destination in the order they were sent (see
:meth:`runner.bus.Bus.post`); a lone message always travels as an ordinary frame.  Version 3
added the batch frame (ordinary frames are laid out as in version 2); a reader of another
version drops every frame of this one, loudly, rather than some of them silently.

The fields follow in the order the dataclass declares them (positional: no field names
on the wire, which keeps encoding and decoding cheap on the output path); a field typed
as another protocol dataclass (``Attempt``, ``Outcome``) is itself an array of its fields in
declaration order.  New fields are only ever appended, with defaults: a frame with more
fields than this version knows (a newer sender) has the extra ones ignored, and one with
fewer (an older sender) gets the defaults.  Packing uses ``use_bin_type=True``; unpacking
uses ``raw=False`` and refuses frames larger than ``MAX_FRAME_BYTES``.  A frame with
another version, an unknown type or missing required fields raises
:class:`runner.errors.ProtocolError`; in a batch, such an entry is skipped and reported
while the others are delivered.  ``to_map``/``from_map`` give the named form, used
where a message carries attempts as data (``Adopt.attempts``).

Who sends what (role inboxes are PULL sockets, see :mod:`runner.bus`)::

    fetcher        --AttemptAssigned-->   cache manager
    cache manager  --AttemptOpened--> scraper, --AttemptPrepared--> executor,
                   --AttemptEnded-->  scraper (preparation failed)
    executor       --OutputChunk-->   scraper, --AttemptEnded--> scraper,
                   --RunEnded-->      fetcher, cache manager (releases a container image)
    scraper        --UploadRequest--> uploader
    uploader       --AttemptDone-->       fetcher
    any role       --RunnerLog-->     scraper, --AttemptPhase--> supervisor,
                   --Heartbeat-->     supervisor
    supervisor     --Shutdown/StopTaking/StartTaking/StopRuns/Adopt/Reload--> roles
    runner-ctl     --CtlRequest-->    supervisor (REQ/ROUTER) --CtlReply-->
"""
from __future__ import annotations

import dataclasses
import operator
import threading
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from .errors import ProtocolError

PROTOCOL_VERSION = 5
BATCH = "batch"  # the type name of a batch frame (no message class)
MAX_FRAME_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Attempt:
    """One attempt of one request, as it travels through the pipeline.

    ``attempt_id`` is the attempt id ``<hostname>-<base62 seconds>`` and is unique on a host.
    ``attempts`` counts attempts of the experiment's own code made *before* this one.
    Times are unix seconds (float); ``deadline`` is the earliest absolute stop time
    from ``experimentLifetime`` (None when unbounded); ``max_duration`` is seconds.
    """

    attempt_id: str
    queue: str
    token: str
    attempts: int
    key: str
    project: str
    request: dict
    workdir: str
    resources: dict
    taken_at: float
    deadline: float | None = None
    max_duration: float | None = None
    save_frequency: float = 60.0
    queue_type: str = ""  # the back end's kind ("rmq", "sqs", "pubsub", "local")
    # label -> seconds for mutable artifacts with their own saveFrequency (the rest, and
    # the _metadata files unless it has one, follow save_frequency)
    artifact_save_frequency: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, before its fate is decided.

    ``status`` is the scrape document's final ``studioml.status`` (completed, failed,
    expired, cancelled); ``kind`` is what ended it (one of :mod:`runner.fates`' outcome
    kinds; the fate is decided by it); ``error`` names the exception class that ended it,
    if any, for people only.
    """

    status: str
    error: str = ""
    message: str = ""
    exit_code: int | None = None
    kind: str = ""


@dataclass(frozen=True)
class Message:
    """Base of every frame type; ``TYPE`` is the wire name."""

    TYPE: ClassVar[str] = ""


@dataclass(frozen=True)
class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"
    role: str
    pid: int
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Shutdown(Message):
    """Supervisor → role: leave ``loop()`` now and run ``shutdown()``."""

    TYPE: ClassVar[str] = "shutdown"
    reason: str = ""


@dataclass(frozen=True)
class StopTaking(Message):
    """Supervisor → fetcher: take no new requests (drain)."""

    TYPE: ClassVar[str] = "stop_taking"


@dataclass(frozen=True)
class StartTaking(Message):
    """Supervisor → fetcher: take requests again (``runner-ctl resume`` undoing a drain)."""

    TYPE: ClassVar[str] = "start_taking"


@dataclass(frozen=True)
class Reload(Message):
    """Supervisor → every role: new values of the live-changeable options (SIGHUP).

    ``options`` maps :class:`runner.config.Config` field names (only those in
    ``config.RELOADABLE``) to their new, already validated values.
    """

    TYPE: ClassVar[str] = "reload"
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StopRuns(Message):
    """Supervisor or fetcher → cache manager and executor: end every attempt (or ``attempt_ids``).

    ``cause`` names why, as :func:`runner.fates.stop_exception` understands it
    (``shutdown``: handed back uncounted; ``queue_deleted``: the user aborted the run;
    ``client_stopped``: the StudioML client marked the record stopped; ``cancelled``:
    ``runner-ctl cancel``; ``disk_full``, ``files_unwritable``: the scraper could not write
    the attempt's files, for want of space or another error, and
    :func:`runner.fates.files_fault` decides).
    """

    TYPE: ClassVar[str] = "stop_runs"
    reason: str = "shutdown"
    attempt_ids: list = field(default_factory=list)
    cause: str = "shutdown"


@dataclass(frozen=True)
class Cancel(Message):
    """Supervisor → fetcher (``runner-ctl cancel``): stop the attempts of experiment ``key``
    (in ``project`` when not empty) and end them ``cancelled``; a request of that key not
    held here is acked as ``cancelled`` when this runner takes it."""

    TYPE: ClassVar[str] = "cancel"
    key: str
    project: str = ""


@dataclass(frozen=True)
class Adopt(Message):
    """Supervisor → restarted fetcher: these attempts are in flight; hold them again."""

    TYPE: ClassVar[str] = "adopt"
    attempts: list = field(default_factory=list)  # list of Attempt maps


@dataclass(frozen=True)
class AttemptAssigned(Message):
    TYPE: ClassVar[str] = "attempt_assigned"
    attempt: Attempt


@dataclass(frozen=True)
class AttemptOpened(Message):
    TYPE: ClassVar[str] = "attempt_opened"
    attempt: Attempt


@dataclass(frozen=True)
class AttemptPrepared(Message):
    """Cache manager → executor: inputs in place.  Python mode: ``python`` and ``env_path``
    of the run's environment.  Container mode (:mod:`runner.containers`): ``container`` names
    the runtime and ``image`` is what it runs (a local image file, a reference, or an
    unpacked image folder); ``python`` and ``env_path`` are empty."""

    TYPE: ClassVar[str] = "attempt_prepared"
    attempt: Attempt
    python: str
    env_path: str
    container: str = ""
    image: str = ""


@dataclass(frozen=True)
class OutputChunk(Message):
    """Executor → scraper: complete segments (bytes ending in ``\\n`` or ``\\r``) in output
    order; ``scrape`` is False for pieces of a line too long to scrape (plain output).

    ``offset`` is the number of bytes of the run's output sent before this chunk (a gap
    means output was lost), or :data:`RUNNER_NOTE` for a line the runner adds itself.
    """

    TYPE: ClassVar[str] = "output_chunk"
    attempt_id: str
    data: bytes
    scrape: bool = True
    offset: int = 0


RUNNER_NOTE = -1
"""``OutputChunk.offset`` of a line written by the runner, not by the run."""


@dataclass(frozen=True)
class RunnerLog(Message):
    TYPE: ClassVar[str] = "runner_log"
    attempt_id: str
    text: str


@dataclass(frozen=True)
class AttemptEnded(Message):
    TYPE: ClassVar[str] = "attempt_ended"
    attempt: Attempt
    outcome: Outcome
    facts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class UploadRequest(Message):
    """Scraper → uploader: upload the attempt's mutable artifacts and metadata files.

    ``final`` uploads everything and is followed by a ``AttemptDone``; a periodic request
    skips unchanged artifacts and reports nothing; ``record_only`` (sent when the attempt
    opens) writes the metadata-store record and uploads nothing.  ``labels`` limits a
    periodic request to the artifacts whose save period is due (``_metadata``: the
    metadata files); None means every one.  ``metadata`` False (an attempt handed back
    before its run started) leaves the metadata files out of a final upload.
    ``scrape_document`` (JSON text; "" when none) is the attempt's final scrape document
    when the scraper could not write it to disk (a full disk): the uploader uploads it in
    place of the file.
    """

    TYPE: ClassVar[str] = "upload_request"
    attempt: Attempt
    final: bool
    outcome: Outcome | None = None
    record_only: bool = False
    labels: tuple | None = None
    metadata: bool = True
    scrape_document: str = ""


@dataclass(frozen=True)
class RecordState(Message):
    """Uploader → scraper: how the StudioML database record of an attempt is doing
    (:mod:`runner.studio_db`); shown in the scrape document as ``runner.studio_record``."""

    TYPE: ClassVar[str] = "record_state"
    attempt_id: str
    state: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AttemptDone(Message):
    """Uploader → fetcher: the attempt is over and its uploads are done (or failed)."""

    TYPE: ClassVar[str] = "attempt_done"
    attempt: Attempt
    outcome: Outcome
    upload_error: str = ""       # "<ErrorType>: <message>" when the uploads failed, for people
    upload_error_kind: str = ""  # its outcome kind (runner.fates), which decides


@dataclass(frozen=True)
class RunEnded(Message):
    """Executor → fetcher: the attempt's process (its whole unit) has ended; the run's slot,
    CPUs, RAM and GPUs may go to the next request while its uploads finish.  Executor →
    cache manager: the container image the run used may be evicted again."""

    TYPE: ClassVar[str] = "run_ended"
    attempt_id: str


# An attempt's phases (``AttemptPhase.phase``), in the order they follow each other, with
# the role that announces each.
PHASE_TAKEN = "taken"          # fetcher: taken from its queue, its resources reserved
PHASE_PREPARING = "preparing"  # cache manager: downloads, image, environment ("step")
PHASE_RUNNING = "running"      # executor: the run's process started
PHASE_ENDING = "ending"        # executor or cache manager: ended; the scraper closes it
PHASE_UPLOADING = "uploading"  # scraper: closed; the uploader's final upload
PHASE_SETTLING = "settling"    # never sent: the supervisor's own, for an attempt it handed
#                                to the fetcher to settle after the role holding it died
PHASE_FINISHED = "finished"    # fetcher: the request's fate is settled
PHASES = (PHASE_TAKEN, PHASE_PREPARING, PHASE_RUNNING, PHASE_ENDING, PHASE_UPLOADING,
          PHASE_SETTLING, PHASE_FINISHED)
# The steps of PHASE_PREPARING (``AttemptPhase.detail["step"]``), in order.
STEP_DOWNLOAD, STEP_IMAGE, STEP_ENVIRONMENT = "download", "image", "environment"


@dataclass(frozen=True)
class AttemptPhase(Message):
    """Any role → supervisor: where an attempt is now (for status, restarts and metrics).

    ``phase`` is one of the ``PHASE_*`` names above (never ``settling``).
    ``detail`` carries phase facts: ``step`` while preparing (``download``, ``image`` for a
    container, then ``environment``), ``pid`` when running, ``status`` and ``tail`` (the last KB of the
    masked output) when uploading, ``fate``/``status``/``reason`` when finished.
    """

    TYPE: ClassVar[str] = "attempt_phase"
    attempt: Attempt
    phase: str
    role: str
    at: float
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class QueueStats(Message):
    """Fetcher → supervisor: what the fetcher sees of its queues."""

    TYPE: ClassVar[str] = "queue_stats"
    queues: dict  # name -> {"depth": int, "waiting": [{"key", "project"}...]}
    taking: bool


@dataclass(frozen=True)
class CtlRequest(Message):
    TYPE: ClassVar[str] = "ctl_request"
    command: str
    args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CtlReply(Message):
    TYPE: ClassVar[str] = "ctl_reply"
    ok: bool
    data: dict = field(default_factory=dict)
    error: str = ""


_NESTED = {"Attempt": Attempt, "Outcome": Outcome, "Attempt | None": Attempt, "Outcome | None": Outcome}
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (Heartbeat, Shutdown, StopTaking, StartTaking, Reload, StopRuns, Cancel, Adopt,
                AttemptAssigned, AttemptOpened, AttemptPrepared, OutputChunk, RunnerLog, AttemptEnded,
                UploadRequest, RecordState, AttemptDone, RunEnded,
                AttemptPhase, QueueStats, CtlRequest, CtlReply)
}


_FIELDS: dict[type, tuple[tuple[str, Any], ...]] = {}


def _fields_of(cls: type) -> tuple[tuple[str, Any], ...]:
    """``(name, nested protocol class or None)`` of each field, worked out once per class."""
    found = _FIELDS.get(cls)
    if found is None:
        found = tuple(
            (f.name, _NESTED.get(f.type if isinstance(f.type, str)
                                 else getattr(f.type, "__name__", "")))
            for f in dataclasses.fields(cls))
        _FIELDS[cls] = found
    return found


def to_map(value: Any) -> dict:
    """Fields of a protocol dataclass as a plain map (nested dataclasses too)."""
    out = {}
    for name, _nested in _fields_of(type(value)):
        v = getattr(value, name)
        if hasattr(type(v), "__dataclass_fields__"):
            v = to_map(v)
        out[name] = v
    return out


def from_map(cls: type, data: dict) -> Any:
    """Build ``cls`` from a map made by :func:`to_map`; unknown keys are ignored."""
    kwargs = {}
    for name, nested in _fields_of(cls):
        if name not in data:
            continue
        value = data[name]
        if nested is not None and isinstance(value, dict):
            value = from_map(nested, value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ProtocolError(f"cannot build {cls.__name__}: {exc}") from exc


class _Layout:
    """How one protocol class goes to and from its positional array (built once per class)."""

    __slots__ = ("cls", "count", "get", "nested")

    def __init__(self, cls: type):
        fields = _fields_of(cls)
        names = [name for name, _ in fields]
        self.cls = cls
        self.count = len(names)
        self.get: typing.Callable[[Any], tuple]
        if not names:
            self.get = lambda value: ()
        elif len(names) == 1:
            single = operator.attrgetter(names[0])
            self.get = lambda value: (single(value),)
        else:
            self.get = operator.attrgetter(*names)
        self.nested = tuple((i, nested) for i, (_, nested) in enumerate(fields) if nested)


_LAYOUTS: dict[type, _Layout] = {}


def _layout(cls: type) -> _Layout:
    layout = _LAYOUTS.get(cls)
    if layout is None:
        layout = _LAYOUTS[cls] = _Layout(cls)
    return layout


def _to_list(value: Any) -> list:
    layout = _layout(type(value))
    values: list = list(layout.get(value))
    for index, _nested in layout.nested:
        if values[index] is not None:
            values[index] = _to_list(values[index])
    return values


def _from_list(cls: type, values: list) -> Any:
    layout = _layout(cls)
    if len(values) > layout.count:
        values = values[:layout.count]  # fields appended by a newer sender
    for index, nested in layout.nested:
        if index < len(values) and isinstance(values[index], list):
            values[index] = _from_list(nested, values[index])
    try:
        return cls(*values)
    except TypeError as exc:
        raise ProtocolError(f"cannot build {cls.__name__}: {exc}") from exc


def encode(message: Message) -> bytes:
    """One frame for ``message``."""
    layout = _layout(type(message))
    frame = [PROTOCOL_VERSION, message.TYPE, *layout.get(message)]
    for index, _nested in layout.nested:
        if frame[index + 2] is not None:
            frame[index + 2] = _to_list(frame[index + 2])
    return _pack(frame)


def batch(frames: list[bytes]) -> bytes:
    """One batch frame holding ``frames`` (each made by :func:`encode`), in order."""
    return b"".join([_array_header(len(frames) + 2), _BATCH_PREFIX, *frames])


def decode(frame: bytes) -> Message:
    """The message in ``frame``; raises :class:`ProtocolError` when it is not one.

    A batch frame is not one message: it raises too (see :func:`decode_many`).
    """
    values = _unpack(frame)
    if type(values) is list and len(values) >= 2 and values[1] == BATCH:
        raise ProtocolError("a batch frame holds several messages (decode_many)")
    return _message(values)


def decode_many(frame: bytes) -> tuple[list[Message], list[str]]:
    """The messages in an ordinary or a batch frame, in order, and what was wrong.

    Raises :class:`ProtocolError` when the frame as a whole is not one; an entry of a batch
    that is not a message is left out and described in the second list.
    """
    values = _unpack(frame)
    if type(values) is not list or len(values) < 2 or values[1] != BATCH:
        return [_message(values)], _NO_PROBLEMS
    if values[0] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {values[0]!r}, expected {PROTOCOL_VERSION}")
    messages: list[Message] = []
    problems = _NO_PROBLEMS
    for index in range(2, len(values)):
        try:
            messages.append(_message(values[index]))
        except ProtocolError as exc:
            if problems is _NO_PROBLEMS:
                problems = []
            problems.append(f"batch entry {index - 2}: {exc}")
    return messages, problems


_NO_PROBLEMS: list[str] = []  # shared, never appended to


def _unpack(frame: bytes) -> Any:
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        return _unpackb(frame, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        raise ProtocolError(f"undecodable frame: {exc}") from exc


def _message(values: Any) -> Message:
    """The message of one unpacked message array ``[version, type, fields...]``."""
    if type(values) is not list or len(values) < 2:
        raise ProtocolError("a frame is an array [version, type, fields...]")
    if values[0] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {values[0]!r}, expected {PROTOCOL_VERSION}")
    type_name = values[1]
    cls = _BY_TYPE.get(type_name) if type(type_name) is str else None
    if cls is None:
        raise ProtocolError(f"unknown message type {type_name!r}")
    layout = _layout(cls)
    if layout.nested:
        return _from_list(cls, values[2:])
    try:
        return cls(*values[2:2 + layout.count])
    except TypeError as exc:
        raise ProtocolError(f"cannot build {cls.__name__}: {exc}") from exc


_unpackb = msgpack.unpackb
_BY_TYPE = MESSAGE_TYPES
_PACKERS = threading.local()  # a msgpack Packer is not thread-safe: one per thread


def _packer() -> msgpack.Packer:
    try:
        return _PACKERS.packer
    except AttributeError:
        packer = _PACKERS.packer = msgpack.Packer(use_bin_type=True)
        return packer


def _pack(frame: list) -> bytes:
    return _packer().pack(frame)


def _array_header(length: int) -> bytes:
    return _packer().pack_array_header(length)


_BATCH_PREFIX = msgpack.packb(PROTOCOL_VERSION) + msgpack.packb(BATCH)


def attempts_from_maps(maps: typing.Iterable[dict]) -> list[Attempt]:
    """``Adopt.attempts`` back into ``Attempt`` objects."""
    return [from_map(Attempt, m) for m in maps]
