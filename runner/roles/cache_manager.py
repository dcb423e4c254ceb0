"""The cache manager: makes an attempt's working directory and its Python environment.

For each ``AttemptAssigned`` it opens the attempt with the scraper, then, on a worker
thread, creates one folder per artifact label, fetches the artifacts that have a source
through the :class:`~runner.cache.ArtifactCache` (one download per object however many
attempts want it) and unpacks or copies them, finds the interpreter for ``pythonver`` and
gets the virtualenv for the requirement set from the
:class:`~runner.environments.EnvironmentStore` (built once per set, however many attempts
want it; a set close to a stored one is built from it, see ``docs/environments.md``).  The
environment is held for the attempt (never evicted) until the executor's ``RunEnded``.  After
each build, off the attempt's path, a spare hard-linked copy of the new environment is laid
aside for the next set near it and the store is brought back under ``--env-cache-size``
(least recently used environments first).  Success goes to the executor as
``AttemptPrepared``; any failure ends the attempt with the outcome :mod:`runner.fates` gives
its exception.

Container mode (:mod:`runner.containers`): instead of an environment it gets the image
the request names ready for the runtime this host uses: a ``.sif`` from storage through
the artifact cache, an OCI image for the ``bwrap`` runtime through the **image cache**
(``<cache-dir>/images``, an :class:`~runner.cache.ArtifactCache` of unpacked images with the
same ``--cache-size`` bound and LRU, one pull per manifest digest however many attempts want
it), or a reference the runtime pulls itself.  The image's cache entry stays leased (never
evicted) until the executor's ``RunEnded`` for the attempt.  A host without a runtime for
the image hands the request back (:class:`~runner.containers.ContainerUnavailable`).

When every input is in place it writes ``<workdir>/.runner/downloaded.json``
(:func:`runner.metadata.write_downloaded_digests`) with the content digest of each mutable
artifact it unpacked.  The uploader uploads no mutable folder before that file exists (a folder
half-way through its download must never overwrite the object it came from) and does
not upload a folder that is still what was downloaded.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .. import attempt_files, containers, fates, metadata, protocol
from ..archive import tree_digest, unpack
from ..cache import ArtifactCache, Lease
from ..environments import Environment, EnvironmentStore, find_interpreter
from ..errors import ArchiveError, DiskBudgetExceeded, EnvironmentBuildError, RunnerError, StorageError
from ..storage import ObjectMissing, Store, artifact_url, open_for_request
from ..units import describe_size
from .base import Role

logger = logging.getLogger("runner.cache_manager")


def absent_of(mutable: list[tuple[str, Store]]) -> set[str]:
    """The URLs of ``mutable`` ((url, store) of mutable artifacts, usually not written yet)
    that one listing of their folder shows absent, so that they cost no request each;
    none when their store cannot tell (:meth:`~runner.storage.base.Store.existing`: its
    stat is local, they lie in several folders, listing is refused or failed)."""
    store = mutable[0][1]
    if not store.stat_is_remote or any(type(other) is not type(store) for _, other in mutable):
        return set()
    urls = [url for url, _ in mutable]
    try:
        found = store.existing(urls)
    except StorageError as exc:
        logger.info("cannot list the folder of %s (%s): each artifact is asked for", urls[0], exc)
        return set()
    return set() if found is None else set(urls) - found


class CacheManager(Role):
    name = "cache_manager"
    TICK = 2.0  # no periodic work; preparation threads wake the loop when they post

    def initialize(self) -> None:
        Path(self.config.working_dir).mkdir(parents=True, exist_ok=True)
        self.environments = EnvironmentStore(Path(self.config.env_dir),
                                             installer=self.config.installer,
                                             cap_bytes=self.config.env_cache_size)
        self.cache = ArtifactCache(Path(self.config.artifact_cache_dir), self.config.cache_size)
        self.images = ArtifactCache(Path(self.config.cache_dir) / "images", self.config.cache_size,
                                    name="image cache")
        self.runtimes, self.runtime_problems = containers.runtimes_for(
            self.config.container_runtime)
        self.log.info("container runtimes: %s%s",
                      ", ".join(r.name for r in self.runtimes) or "none",
                      f" ({'; '.join(self.runtime_problems)})" if self.runtime_problems else "")
        self.held_images: dict[str, contextlib.ExitStack] = {}  # attempt id -> image lease
        self.pool = ThreadPoolExecutor(max_workers=max(2, self.config.executors * 2),
                                       thread_name_prefix="prepare")
        self.preparing: dict[str, protocol.Attempt] = {}
        self.stopped: dict[str, Exception] = {}  # attempt id -> what stops it
        self.stop_all: Exception | None = None
        self.lock = threading.Lock()
        self.pool.submit(self.tidy_environments, True)
        self.listings = ThreadPoolExecutor(max_workers=2, thread_name_prefix="listing")
        # Environment lookups beside the downloads: their own pool, as each preparation
        # waits for its lookup (in the preparation pool it could wait behind itself).
        self.lookups = ThreadPoolExecutor(max_workers=max(2, self.config.executors * 2),
                                          thread_name_prefix="environment")

    def tidy_environments(self, prune: bool = False, built: str | None = None) -> None:
        """Pool thread: (at start, ``prune``) drop the holds of attempts a runner that died
        left; (after a build) lay a spare copy of the ``built`` environment aside for the
        next set near it; then evict past ``--env-cache-size`` and measure the store (for
        stats)."""
        try:
            if built is not None:
                self.environments.make_spare(built)
            if prune:
                runtime = attempt_files.folder(self.config.runtime_dir)

                def live(attempt_id: str, age: float) -> bool:
                    # Registry files live from the attempt's opening to its settling; a hold
                    # younger than a minute may be ahead of the scraper's first write.
                    return age < 60 or any(runtime.glob(f"{attempt_id}.*"))

                for key, holder in self.environments.prune_holds(live):
                    self.log.info("environment %s: dropped the hold of %s (no such attempt)",
                                  key, holder)
            self.environments.evict()
        except Exception:  # noqa: BLE001 - housekeeping; the next preparation tries again
            self.log.exception("environment store housekeeping failed")

    def handle(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.AttemptAssigned):
            attempt = message.attempt
            self.post("scraper", protocol.AttemptOpened(attempt=attempt))
            with self.lock:
                self.preparing[attempt.attempt_id] = attempt
            self.phase(attempt, protocol.PHASE_PREPARING, step=protocol.STEP_DOWNLOAD)
            self.pool.submit(self.prepare, attempt)
        elif isinstance(message, protocol.StopRuns):
            reason = fates.stop_exception(message.cause, message.reason)
            with self.lock:
                if message.attempt_ids:
                    for attempt_id in message.attempt_ids:
                        if attempt_id in self.preparing:
                            self.stopped[attempt_id] = reason
                else:
                    self.stop_all = reason
        elif isinstance(message, protocol.RunEnded):
            self.release_image(message.attempt_id)
            self.environments.release(message.attempt_id)

    def _cancelled(self, attempt_id: str) -> Exception | None:
        with self.lock:
            return self.stop_all or self.stopped.get(attempt_id)

    def prepare(self, attempt: protocol.Attempt) -> None:
        """Worker thread: working directory, artifacts, environment → executor.  The
        environment is looked up (or built) while the artifacts download."""
        log = lambda text: self.runner_log(attempt.attempt_id, text)  # noqa: E731
        environment: Future | None = None
        try:
            self.check_cancelled(attempt)
            image = containers.image_of(attempt.request)
            runtime = (containers.choose(self.runtimes, image, self.runtime_problems)
                       if image is not None else None)
            if image is None or runtime is None:
                environment = self.lookups.submit(self.environment_of, attempt, log)
            self.download_artifacts(attempt, log)
            if image is not None and runtime is not None:  # runtime: chosen for the image
                self.phase(attempt, protocol.PHASE_PREPARING, step=protocol.STEP_IMAGE)
                self.check_cancelled(attempt)
                prepared = self.hold_image(attempt, runtime, image, log)
                self.check_cancelled(attempt)
                self.post("executor", protocol.AttemptPrepared(attempt=attempt, python="", env_path="",
                                                           container=runtime.name,
                                                           image=prepared))
                return
            assert environment is not None
            self.phase(attempt, protocol.PHASE_PREPARING, step=protocol.STEP_ENVIRONMENT)
            self.check_cancelled(attempt)
            env = environment.result()
            log(f"environment {env.key} {'built' if env.built else 'reused from the store'}")
            self.check_cancelled(attempt)
            self.post("executor", protocol.AttemptPrepared(attempt=attempt, python=str(env.python),
                                                       env_path=str(env.path)))
            if env.built:
                self.pool.submit(self.tidy_environments, built=env.key)
        except Exception as exc:  # every failure ends the attempt with its fate
            if not isinstance(exc, RunnerError):
                self.log.exception("key=%s attempt=%s preparation crashed", attempt.key, attempt.attempt_id)
            outcome = fates.outcome_for_exception(exc)
            log(f"preparation ended: {outcome.error}: {outcome.message}")
            self.release_image(attempt.attempt_id)
            if environment is not None:  # a lookup still going holds it when it ends: let go then
                environment.add_done_callback(lambda _: self.environments.release(attempt.attempt_id))
            self.environments.release(attempt.attempt_id)
            facts = ({"build_log_tail": exc.log_tail}
                     if isinstance(exc, EnvironmentBuildError) and exc.log_tail else {})
            self.post("scraper", protocol.AttemptEnded(attempt=attempt, outcome=outcome, facts=facts))
            self.phase(attempt, protocol.PHASE_ENDING)
        finally:
            with self.lock:
                self.preparing.pop(attempt.attempt_id, None)
                self.stopped.pop(attempt.attempt_id, None)

    def environment_of(self, attempt: protocol.Attempt, log) -> Environment:
        """The attempt's environment from the store (built when missing), held for it.
        Raises InterpreterNotFound and EnvironmentBuildError."""
        experiment = attempt.request.get("experiment", {})
        interpreter = find_interpreter(experiment.get("pythonver"), list(self.config.python_dirs))
        log(f"interpreter {interpreter} for pythonver {experiment.get('pythonver')!r}")
        requirements = list(experiment.get("pythonenv") or [])
        requirements += list(attempt.request.get("config", {}).get("pip") or [])
        return self.environments.ensure(interpreter, requirements, log=log,
                                        holder=attempt.attempt_id)

    def hold_image(self, attempt: protocol.Attempt, runtime: containers.ContainerRuntime,
                   image: containers.ImageRef, log) -> str:
        """The image ready for ``runtime``, its cache entry leased until ``RunEnded``."""
        stack = contextlib.ExitStack()
        try:
            registry = runtime.registry() if image.reference else None
            if image.storage_url:
                artifact = attempt.request["experiment"]["artifacts"]["_singularity"]
                store = open_for_request(image.storage_url, attempt.request, artifact)
                lease = stack.enter_context(self.cache.lease(store, image.storage_url))
                log(f"image {image}: {lease.info.size} bytes from the "
                    f"{'cache' if lease.hit else 'storage'}")
            elif registry is not None:
                lease = stack.enter_context(self.images.lease(registry, image.reference))
                log(f"image {image} ({lease.info.etag}): "
                    f"{'in the image cache' if lease.hit else 'pulled and unpacked'}")
            else:
                log(f"image {image}: pulled by {runtime.name}")
                return image.reference
        except BaseException:
            stack.close()
            raise
        with self.lock:
            self.held_images[attempt.attempt_id] = stack
        return str(lease.path)

    def release_image(self, attempt_id: str) -> None:
        with self.lock:
            stack = self.held_images.pop(attempt_id, None)
        if stack is not None:
            stack.close()

    def check_cancelled(self, attempt: protocol.Attempt) -> None:
        reason = self._cancelled(attempt.attempt_id)
        if reason is not None:
            raise reason

    def download_artifacts(self, attempt: protocol.Attempt, log) -> None:
        """One folder per label; fetch and unpack what has a source (SPEC section 5.3)."""
        workdir = Path(attempt.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "workspace").mkdir(exist_ok=True)  # the run's cwd, also in container mode
        budget = int(attempt.resources.get("hdd") or 0) or None
        artifacts = attempt.request.get("experiment", {}).get("artifacts") or {}
        digests: dict[str, str] = {}
        wanted = []  # (label, artifact, url, store) of what has a source
        for label, artifact in artifacts.items():
            (workdir / label).mkdir(parents=True, exist_ok=True)
            url = artifact_url(artifact)
            if url is None or label in ("_metadata", "_singularity"):  # images: hold_image
                continue
            wanted.append((label, artifact, url, open_for_request(url, attempt.request, artifact)))
        mutable = [(url, store) for _, artifact, url, store in wanted if artifact.get("mutable")]
        telling = self.listings.submit(absent_of, mutable) if len(mutable) > 1 else None
        with contextlib.ExitStack() as held:
            fixed = [(store, url) for _, artifact, url, store in wanted if not artifact.get("mutable")]
            got = dict(zip((url for _, url in fixed), held.enter_context(self.cache.lease_all(fixed))))
            absent = telling.result() if telling is not None else set()
            rest = [(store, url) for url, store in mutable if url not in absent]
            got.update(zip((url for _, url in rest), held.enter_context(self.cache.lease_all(rest))))
            for label, artifact, url, _ in wanted:
                lease = got.get(url) or ObjectMissing(url)
                if isinstance(lease, ObjectMissing) and artifact.get("mutable"):
                    log(f"{label}: no object yet at {url} (normal for a mutable artifact)")
                    continue
                if isinstance(lease, StorageError):
                    raise lease
                budget = self.place(label, artifact, url, lease, workdir / label, budget, log)
                if artifact.get("mutable"):
                    digests[label] = tree_digest(workdir / label)
        # Written last, also when empty: its presence tells the uploader that the inputs
        # are in place, so mutable folders may be uploaded from now on.
        metadata.write_downloaded_digests(workdir, digests)

    @staticmethod
    def place(label: str, artifact: dict, url: str, lease: Lease, folder: Path,
              budget: int | None, log) -> int | None:
        """Unpack or copy the downloaded ``lease`` into ``folder``; returns what is left of
        the hdd ``budget`` (None: no limit).  Raises :class:`ArchiveError`,
        :class:`DiskBudgetExceeded` and :class:`StorageError` (cannot write)."""
        source = "cache" if lease.hit else "storage"
        try:
            if artifact.get("unpack"):
                try:
                    written = unpack(lease.path, folder, budget=budget)
                except ArchiveError as exc:  # name the artifact, not the cache file
                    raise type(exc)(f"artifact {label!r} ({url}): {exc}") from exc
                log(f"{label}: unpacked {lease.info.size} bytes from {url} "
                    f"({written} written, from the {source})")
                return None if budget is None else budget - written
            name = Path(artifact.get("key") or url).name or label
            if budget is not None and lease.info.size > budget:
                raise DiskBudgetExceeded(
                    f"{label}: {lease.info.size} bytes from {url} exceed what is "
                    f"left of the hdd budget ({describe_size(max(0, budget))})")
            shutil.copyfile(lease.path, folder / name)
            log(f"{label}: downloaded {lease.info.size} bytes from {url} (from the {source})")
            return None if budget is None else budget - lease.info.size
        except OSError as exc:
            raise StorageError(f"{label}: cannot place {url} in {folder}: {exc}") from exc

    def stats(self) -> dict:
        with self.lock:
            preparing = len(self.preparing)
        images = {f"image_{name}": value for name, value in self.images.stats().items()}
        usage = self.environments.last_usage
        store = {"env_store_cap": self.environments.cap_bytes}
        if usage is not None:  # measured at start and after each build
            store.update(env_store_bytes=usage.bytes, env_store_environments=usage.environments)
        return {"preparing": preparing, **self.cache.stats(), **images, **store}

    def shutdown(self) -> None:
        with self.lock:
            self.stop_all = fates.ShutdownRequested("the runner is stopping")
        self.pool.shutdown(wait=True, cancel_futures=False)
        self.lookups.shutdown(wait=True, cancel_futures=False)
        self.listings.shutdown(wait=False, cancel_futures=True)
        for attempt_id in list(self.held_images):
            self.release_image(attempt_id)
        self.cache.close()
        self.images.close()
