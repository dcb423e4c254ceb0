"""``runner-submit``: send a local directory to the runner as a StudioML experiment.

It does what the StudioML client does: packs the directory as the workspace, uploads it
to ``blobstore/<sha256>.tar`` in the storage, builds a request in the StudioML format
with the usual mutable artifacts at ``experiments/<key>/<label>.tar``, and publishes it to
a queue.  The storage is a ``file://`` folder, an S3 bucket (``s3://host:port/bucket``,
``--endpoint`` and AWS credentials options or the usual ``AWS_*`` variables) or a GCS
bucket (``gs://bucket``, ``--gcp-credentials`` or Google's default chain).  Credentials
given as options travel in the request's artifacts, as the StudioML client puts them.  With ``--wait`` it follows the experiment through the metadata store until its
fate is final and prints its status and scrape document.

StudioML's layout (``experiments/<key>/``) names no project, so an experiment of the same
key in another project would share, and overwrite, the same files: a ``--key`` that the
metadata store already holds in another project is refused (:func:`key_in_other_projects`)
unless ``--force`` is given.  The request keeps the StudioML client's format.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path

from . import metadata, studio_db
from .archive import pack, refused_symlinks
from .config import OptionParser, default_data_root, env_value
from .errors import BadRequest, RunnerError
from .queues import kind_of, publishing_class
from .requests import MUTABLE_LABELS, parse_request
from . import storage as storage_module
from .storage import open_store
from .units import UnitError, parse_duration_with_unit, parse_size

def build_parser() -> argparse.ArgumentParser:
    parser = OptionParser(
        prog="runner-submit",
        description="Submit DIRECTORY as a StudioML experiment running SCRIPT with ARGS.",
        epilog="Durations need a unit (90s, 20m, 1h30m), as the runner's own options do. "
               "What the runner would refuse (a negative count, a key that is no storage "
               "path, a symlink leaving DIRECTORY) is refused here, before any upload.")
    parser.add_argument("directory", help="the workspace: the experiment's code")
    parser.add_argument("script", help="script to run, relative to DIRECTORY; '-m' runs "
                                       "module ARGS[0]")
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="arguments for the script: everything after SCRIPT is passed to "
                             "it untouched (runner-submit's own options go before DIRECTORY; "
                             "a '--' right after SCRIPT is dropped)")
    env = os.environ.get
    parser.add_argument("--queue", default=env("SUBMIT_QUEUE", "local_default"),
                        help="queue name: local_*, rmq_*, sqs_*, or a Pub/Sub topic as "
                             "projects/P/topics/T (default local_default) [env SUBMIT_QUEUE]")
    parser.add_argument("--amqp-url", default=env_value("amqp-url"),
                        help="RabbitMQ broker for rmq_* queues, amqp://user:password@host:5672/"
                             "vhost; ${VAR} is expanded from the environment [env RUNNER_AMQP_URL, AMQP_URL]")
    parser.add_argument("--durable", action="store_true",
                        help="rmq_*: declare a missing queue durable and publish persistent "
                             "messages (the StudioML client declares non-durable queues)")
    parser.add_argument("--sqs-certs", default=env_value("sqs-certs"),
                        help="sqs_*: directory with one sub-directory per AWS account; the "
                             "first account is used [env RUNNER_SQS_CERTS, SQS_CERTS]")
    parser.add_argument("--aws-region", default=env_value("aws-region"),
                        help="sqs_*: region for the default AWS credential chain "
                             "[env RUNNER_AWS_REGION, AWS_REGION]")
    parser.add_argument("--sqs-endpoint", default=env_value("sqs-endpoint"),
                        help="sqs_*: SQS endpoint URL (private clouds, tests) [env RUNNER_SQS_ENDPOINT]")
    parser.add_argument("--google-certs", default=env_value("google-certs"),
                        help="Pub/Sub (--queue projects/P/topics/T): directory of service-"
                             "account files (also $GOOGLE_APPLICATION_CREDENTIALS) "
                             "[env RUNNER_GOOGLE_CERTS, GOOGLE_CERTS]")
    parser.add_argument("--queue-root", default=env_value("queue-root",
                                                          str(default_data_root() / "queues")),
                        help="root of local_* queues [env RUNNER_QUEUE_ROOT, QUEUE_ROOT]")
    add_storage_options(parser)
    parser.add_argument("--project", default=None, help="project id (default: directory name)")
    parser.add_argument("--key", default=None, help="experiment key (default: generated)")
    parser.add_argument("--pythonenv", default=None,
                        help="requirements file (default: DIRECTORY/requirements.txt if present)")
    parser.add_argument("--pip", action="append", default=[], help="extra requirement line")
    parser.add_argument("--python-version", default=f"{sys.version_info[0]}.{sys.version_info[1]}",
                        help="pythonver of the experiment (default: this interpreter's)")
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=0)
    parser.add_argument("--ram", default="1gb", help="memory, e.g. 2gb or 2gib")
    parser.add_argument("--hdd", default="10gb", help="disk budget for downloads and unpacking")
    parser.add_argument("--gpu-mem", default="0", help="GPU memory needed on each device")
    parser.add_argument("--max-duration", default=None, help="wall-clock limit, e.g. 20m")
    parser.add_argument("--lifetime", default=None, help="experimentLifetime, e.g. 2h")
    parser.add_argument("--save-frequency", default="1m", help="saveWorkspaceFrequency")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the experiment (repeatable)")
    parser.add_argument("--wait", action="store_true", help="follow the experiment to its end; "
                        "when it does not complete, print its error and last output lines")
    parser.add_argument("--follow", action="store_true",
                        help="with --wait (implied): stream the experiment's output while it "
                             "runs (in steps of its save period)")
    parser.add_argument("--wait-timeout", default="1h", help="give up waiting after this long")
    parser.add_argument("--force", action="store_true",
                        help="submit a --key that another project already has (their artifacts "
                             "share experiments/KEY/ and the last run overwrites them)")
    return parser


def key_in_other_projects(storage_root: str, key: str, project: str,
                          credentials: dict | None, storage: dict | None) -> list[str]:
    """The projects other than ``project`` whose record of ``key`` is in the metadata store
    under ``storage_root`` (one listing of ``metadata/``).  Raises
    :class:`~runner.errors.StorageError` when it cannot be listed."""
    from .results.catalog import Catalog

    catalog = Catalog(storage_root, credentials=credentials, storage_config=storage)
    try:
        names = [catalog.name_of(info.url) for info in catalog.record_infos()]
    finally:
        catalog.close()
    return sorted({found for found, found_key in names if found_key == key and found != project})


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    """The storage options ``runner-submit`` and ``runner-results`` share: ``--storage``
    and the credentials to reach it (read back by :func:`storage_access`)."""
    env = os.environ.get
    parser.add_argument("--storage", default=env("SUBMIT_STORAGE",
                                                 (default_data_root() / "storage").as_uri()),
                        help="storage URL for artifacts (default: file:// under the data root) "
                             "[env SUBMIT_STORAGE]")
    parser.add_argument("--endpoint", default=env("SUBMIT_ENDPOINT"),
                        help="S3 endpoint written to config.storage.endpoint (wins over the "
                             "URL's host on the runner) [env SUBMIT_ENDPOINT]")
    parser.add_argument("--access-key", default=None,
                        help="AWS access key id put in the artifacts' credentials")
    parser.add_argument("--secret-key", default=None,
                        help="AWS secret access key (with --access-key)")
    parser.add_argument("--session-token", default=None, help="AWS session token")
    parser.add_argument("--region", default=None, help="AWS region for the credentials")
    parser.add_argument("--gcp-credentials", default=None, metavar="FILE",
                        help="Google service-account JSON put in the artifacts' credentials")
    parser.add_argument("--s3-ca", default=env_value("s3-ca"), help="CA bundle for the S3 host")
    parser.add_argument("--s3-cert", default=env_value("s3-cert"), help="client certificate for S3")
    parser.add_argument("--s3-key", default=env_value("s3-key"), help="key of --s3-cert")


def storage_access(args: argparse.Namespace) -> tuple[dict | None, dict]:
    """(artifact credentials or None, config.storage) from the command line."""
    root = args.storage.rstrip("/")
    scheme = root.split("://", 1)[0].lower()
    credentials: dict = {}
    if args.access_key or args.secret_key:
        if not (args.access_key and args.secret_key):
            raise RunnerError("--access-key and --secret-key go together")
        aws = {"access_key": args.access_key, "secret_access_key": args.secret_key}
        if args.session_token:
            aws["session_token"] = args.session_token
        if args.region:
            aws["region"] = args.region
        credentials["aws"] = aws
    if args.gcp_credentials:
        try:
            credentials["gcp"] = json.loads(Path(args.gcp_credentials).read_text())
        except (OSError, ValueError) as exc:
            raise RunnerError(f"--gcp-credentials {args.gcp_credentials}: {exc}") from exc
    storage = {"type": {"s3": "s3", "gs": "gcs"}.get(scheme, scheme),
               "bucket": root.rsplit("/", 1)[-1]}
    if args.endpoint:
        storage["endpoint"] = args.endpoint
    return credentials or None, storage


def build_request(args: argparse.Namespace, key: str, project: str, storage_root: str,
                  workspace_key: str) -> dict:
    """A request body in the StudioML format (SPEC section 2)."""
    root = storage_root.rstrip("/")
    bucket = root.rsplit("/", 1)[-1]
    credentials, storage = storage_access(args)

    def artifact(object_key: str, mutable: bool) -> dict:
        found = {"key": object_key, "bucket": bucket, "qualified": f"{root}/{object_key}",
                 "unpack": True, "mutable": mutable}
        if credentials:
            found["credentials"] = credentials
        return found

    artifacts = {"workspace": dict(artifact(workspace_key, False),
                                   local=str(Path(args.directory).absolute()))}
    for label in MUTABLE_LABELS:
        artifacts[label] = artifact(f"experiments/{key}/{label}.tar", True)
    requirements = []
    pythonenv = args.pythonenv or (Path(args.directory) / "requirements.txt")
    if Path(pythonenv).is_file():
        requirements = [line.strip() for line in Path(pythonenv).read_text().splitlines()
                        if line.strip() and not line.strip().startswith("#")]
    elif args.pythonenv:
        raise RunnerError(f"--pythonenv {args.pythonenv}: no such file")
    environment = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise RunnerError(f"--env {item!r}: expected NAME=VALUE")
        environment[name] = value
    resources = {"cpus": args.cpus, "gpus": args.gpus, "ram": args.ram, "hdd": args.hdd,
                 "gpuMem": args.gpu_mem}
    now = time.time()
    return {
        "experiment": {
            "key": key, "project": project, "filename": args.script,
            "args": [shlex.quote(a) for a in args.args],
            "pythonver": args.python_version, "pythonenv": requirements,
            "resources_needed": resources, "max_duration": args.max_duration or "",
            "time_added": now, "status": "waiting", "owner": os.environ.get("USER", ""),
            "artifacts": artifacts,
        },
        "config": {
            "env": environment, "pip": list(args.pip),
            "saveWorkspaceFrequency": args.save_frequency,
            "experimentLifetime": args.lifetime or "",
            "resources_needed": resources,
            "cloud": {"queue": publishing_class(args.queue).client_queue(args)},
            "storage": storage,
            "database": {"type": studio_db.NO_DATABASE, "bucket": bucket},
        },
    }


def _check(flag: str, parse, value):
    """``parse(value)``; a :class:`UnitError` names the flag."""
    try:
        return parse(value)
    except UnitError as exc:
        raise UnitError(f"{flag} {value}: {exc}") from exc


def check_request(request: dict) -> None:
    """Raise :class:`RunnerError` when the runner would refuse ``request`` as a bad request:
    the runner's own admission check (:func:`runner.requests.parse_request`), run here so
    that nothing is uploaded or published for a request that can never run."""
    try:
        parse_request(json.dumps(request).encode())
    except BadRequest as exc:
        raise RunnerError(f"the runner would refuse this experiment: {exc}") from exc


def upload_workspace(directory: Path, storage_root: str, credentials: dict | None = None,
                     storage: dict | None = None) -> str:
    """Pack and upload the workspace; returns its key ``blobstore/<sha256>.tar``."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "workspace.tar"
        pack(directory, archive, "none")
        digest = hashlib.sha256()
        with open(archive, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        key = f"blobstore/{digest.hexdigest()}.tar"
        url = f"{storage_root.rstrip('/')}/{key}"
        store = open_store(url, credentials=credentials, storage_config=storage)
        if store.stat(url) is None:
            store.put(url, archive)
    return key


def publish(args: argparse.Namespace, body: bytes) -> str:
    """Publish ``body`` to ``args.queue`` with its back end's publisher (local_*, rmq_*,
    sqs_* or a Pub/Sub topic; :func:`runner.queues.publishing_class`).

    rmq_* queues are published to the way the StudioML client does it: topic exchange
    ``StudioML.topic``, routing key ``StudioML.<queue>``, the queue declared and bound,
    publisher confirms, ``app_id studioml``, ``content_type application/json``.
    """
    with publishing_class(args.queue).publisher(args) as queue:
        return queue.publish(args.queue, body)


def _store_for(request: dict, url: str):
    """A store for ``url`` with the credentials the request's artifacts carry."""
    artifact = metadata.store_root(request)[1]
    return storage_module.open_for_request(url, request, artifact)


#: Output lines shown when an experiment does not complete.
TAIL_LINES = 20


class Follower:
    """Streams the output log of the experiment's current attempt as it is uploaded.

    The runner uploads ``output-host-<attempt>.log`` every save period
    (``saveWorkspaceFrequency``, at least ``--min-save-interval``) and at the end, so
    output appears in steps of one save period.  A new attempt starts a new log, which is
    followed from its beginning.
    """

    def __init__(self, request: dict, out=None):
        self.request = request
        self.prefix = metadata.metadata_prefix_url(request)
        self.out = out or sys.stdout
        self.attempt = ""
        self.offset = 0

    def poll(self, attempt: str, tmp: Path) -> None:
        """Print what was added to ``attempt``'s output log since the last poll."""
        if not attempt or not self.prefix:
            return
        if attempt != self.attempt:
            self.attempt, self.offset = attempt, 0
        url = f"{self.prefix}/{metadata.output_name(attempt)}"
        store = _store_for(self.request, url)
        info = store.stat(url)
        if info is None or info.size <= self.offset:
            return
        store.get(url, tmp / "output.log")
        data = (tmp / "output.log").read_bytes()
        self.out.write(data[self.offset:].decode("utf-8", "replace"))
        self.out.flush()
        self.offset = len(data)


def wait_for(request: dict, timeout: float, follow: bool = False) -> int:
    """Follow the experiment's metadata record until its fate is final; print the result.

    With ``follow`` the output of each attempt is streamed to stdout while it runs
    (:class:`Follower`).  Returns 0 when it completed, 1 when it ended otherwise, 3 when
    ``timeout`` seconds passed first.
    """
    url = metadata.record_url(request)
    if url is None:
        raise RunnerError("the request names no storage for its metadata record: nothing to wait on")
    store = _store_for(request, url)
    deadline = time.monotonic() + timeout
    shown = None
    follower = Follower(request) if follow else None
    interval = 1.0 if follow else 0.2
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "record.json"
        while time.monotonic() < deadline:
            record = None
            if store.stat(url) is not None:
                store.get(url, target)
                record = json.loads(target.read_text())
            state = ((record["status"], record["attempt"], record.get("reason", ""))
                     if record else ("queued", "", ""))
            if follower is not None and record:  # the output first, then what it led to
                follower.poll(record.get("attempt") or "", Path(tmp))
            if state != shown and not (record and record.get("final")):
                shown = state
                print(f"status: {state[0]}" + (f" (attempt {state[1]})" if state[1] else "")
                      + (f": {state[2]}" if state[2] else ""), file=sys.stderr, flush=True)
            if record and record.get("final"):
                return show_result(request, record, Path(tmp), follower)
            time.sleep(interval)
    print(f"runner-submit: gave up waiting after {timeout:.0f}s", file=sys.stderr)
    return 3


def show_result(request: dict, record: dict, tmp: Path, follower: Follower | None = None) -> int:
    """Print the final status and scrape document; for an experiment that did not complete,
    one plain line ``<status>: <error>: <message>`` and the last :data:`TAIL_LINES` output
    lines (unless ``follower`` already printed the output)."""
    prefix = metadata.metadata_prefix_url(request)
    status = record["status"]
    if follower is not None:  # what was written after the last poll comes before the end
        follower.poll(record.get("attempt") or "", tmp)
    document, url = {}, ""
    if record.get("attempt") and prefix:
        url = f"{prefix}/{metadata.scrape_name(record['attempt'])}"
        store = _store_for(request, url)
        if store.stat(url) is not None:
            store.get(url, tmp / "scrape.json")
            document = json.loads((tmp / "scrape.json").read_text())
    runner = document.get("runner")
    if not isinstance(runner, dict):
        runner = {}
    # How many attempts ran (runner-results list's "attempts"): the newest one's number.
    number = runner.get("attempt_number") or record.get("attempts") or 0
    print(f"status: {status} (attempt {number}: {record.get('attempt') or '-'})")
    if document:
        print(f"scrape document ({url}):")
        print(json.dumps(document, indent=2))
    if prefix:
        print(f"metadata files under {prefix}/")
    print(f"outputs under {prefix.rsplit('/', 1)[0] if prefix else '?'}/")
    if status == "completed":
        return 0
    error = runner.get("error") or "no error recorded"
    message = " ".join(str(runner.get("message") or record.get("reason") or "").split())
    print(f"{status}: {error}: {message}" if message else f"{status}: {error}")
    if follower is None and record.get("attempt") and prefix:
        url = f"{prefix}/{metadata.output_name(record['attempt'])}"
        store = _store_for(request, url)
        if store.stat(url) is not None:
            store.get(url, tmp / "output.log")
            lines = (tmp / "output.log").read_text(errors="replace").splitlines()[-TAIL_LINES:]
            print(f"last {len(lines)} output lines:")
            print("\n".join(lines))
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.args = list(args.args)
    try:
        for flag, size in (("--ram", args.ram), ("--hdd", args.hdd), ("--gpu-mem", args.gpu_mem)):
            _check(flag, parse_size, size)
        for flag, duration in (("--max-duration", args.max_duration),
                               ("--lifetime", args.lifetime)):
            if duration:
                _check(flag, parse_duration_with_unit, duration)
        if _check("--save-frequency", parse_duration_with_unit, args.save_frequency) <= 0:
            raise RunnerError(f"--save-frequency {args.save_frequency}: must be more than 0 "
                              "(the runner saves at most every --min-save-interval anyway)")
        wait_timeout = _check("--wait-timeout", parse_duration_with_unit, args.wait_timeout)
        directory = Path(args.directory)
        if not directory.is_dir():
            raise RunnerError(f"{directory}: not a directory")
        if args.script != "-m" and not (directory / args.script).is_file():
            raise RunnerError(f"{directory / args.script}: no such script")
        refused = refused_symlinks(directory)
        if refused:
            raise RunnerError(
                f"{directory}: the runner refuses a workspace with these symlinks (it unpacks "
                "only links that stay inside the workspace): " + "; ".join(refused)
                + ". Make each link relative and inside the folder, or copy the data in, "
                "or send the data as an artifact of its own")
        publishing_class(args.queue)  # an unknown kind of queue fails before any upload
        if kind_of(args.queue) == "rmq" and not args.amqp_url:
            raise RunnerError(f"queue {args.queue!r}: rmq_* queues need --amqp-url (or AMQP_URL)")
        project = args.project or directory.absolute().name
        key = args.key or f"{int(time.time())}_{uuid.uuid4().hex[:12]}"
        if args.s3_key and not args.s3_cert:
            raise RunnerError("--s3-key needs --s3-cert")
        storage_module.configure(s3_ca=args.s3_ca, s3_cert=args.s3_cert, s3_key=args.s3_key)
        credentials, storage = storage_access(args)
        check_request(build_request(args, key, project, args.storage, "blobstore/unsent.tar"))
        if args.key and not args.force:
            others = key_in_other_projects(args.storage, key, project, credentials, storage)
            if others:
                raise RunnerError(
                    f"--key {key!r} is already used by project(s) {', '.join(others)}; "
                    f"experiments/{key}/ in the storage would be shared and overwritten. "
                    "Use another key (keys are best unique across projects, e.g. prefixed "
                    "with the project), or --force to share it anyway")
        workspace_key = upload_workspace(directory, args.storage, credentials, storage)
        request = build_request(args, key, project, args.storage, workspace_key)
        name = publish(args, json.dumps(request).encode())
    except (RunnerError, UnitError, OSError) as exc:
        print(f"runner-submit: {exc}", file=sys.stderr)
        return 2
    print(f"submitted experiment {key} (project {project}) to {args.queue} as {name}",
          file=sys.stderr)
    print(key)
    if args.wait or args.follow:
        return wait_for(request, wait_timeout, follow=args.follow)
    return 0


if __name__ == "__main__":
    sys.exit(main())
