"""Assembling the frontend from whatever stores the tier is given.

Standalone passes its local LMDB stores; the cluster frontend will pass AMP
clients of the same interfaces.  Nothing here knows which.  HTTP, SSH and
git:// share one ``GitBackend`` (engines, metrics, runner, limits), so a
request costs the same and is counted the same whatever transport it uses.
The pack cache (any ``IPackCache``), admission control and pre-warm on push
are wired here too, once for every transport.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.conch.ssh.keys import Key
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from gitstratum.cache.interfaces import CacheOutcome, IPackCache
from gitstratum.core.limits import Limits
from gitstratum.frontend.admin_api import AdminAPI
from gitstratum.frontend.admission import Admission, AdmissionPolicy
from gitstratum.frontend.auth import Authorizer
from gitstratum.frontend.git_daemon import GitDaemonFactory, make_git_daemon_factory
from gitstratum.frontend.http import GitHTTP, spooling_request_factory
from gitstratum.frontend.http_guard import GuardedSite, HTTPLimits
from gitstratum.frontend.metrics import Metrics
from gitstratum.frontend.ssh import GitSSHFactory, make_ssh_factory
from gitstratum.frontend.stream import GitBackend
from gitstratum.frontend.threads import BlockingRunner
from gitstratum.protocol.ingest import PushProcessor
from gitstratum.protocol.prewarm import prewarm
from gitstratum.protocol.upload_service import UploadPackService
from gitstratum.storage.interfaces import IMetadataStore, IObjectStore, RefUpdate, Repository

__all__ = ["Frontend", "Prewarmer", "build_frontend", "build_git_http", "make_site"]


def _call_inline(f: Callable[..., object], /, *args: Any) -> None:
    f(*args)


@attrs.define(eq=False)
class Prewarmer:
    """Pre-warms the pack cache after a push, off the push's own path.

    ``refs_updated`` is PushProcessor's hook: it runs in the push's worker
    thread, so it only hands the work to the reactor (``call_from_thread``,
    the reactor's ``callFromThread``), which runs ``prewarm`` (protocol.prewarm)
    in the pool.  The push's answer never waits for it.  *patterns* are
    fnmatch globs of ref names warmed besides HEAD's branch.
    """

    upload: UploadPackService
    run: BlockingRunner
    patterns: tuple[str, ...] = ()
    call_from_thread: Callable[..., object] = _call_inline
    metrics: Metrics | None = None

    log = Logger()

    def refs_updated(self, repo: Repository, updates: tuple[RefUpdate, ...]) -> None:
        names = tuple(u.name for u in updates if u.new is not None)
        if names:
            self.call_from_thread(self._start, repo, names)

    def _start(self, repo: Repository, names: tuple[bytes, ...]) -> None:
        d = self.run(prewarm, self.upload, repo, names, self.patterns)
        d.addCallbacks(self._warmed, self._failed, errbackArgs=(repo,))

    def _warmed(self, outcomes: dict[str, CacheOutcome]) -> None:
        if self.metrics is not None:
            for outcome in outcomes.values():
                self.metrics.prewarmed(outcome)

    def _failed(self, failure: Failure, repo: Repository) -> None:
        self.log.failure("pre-warming the pack cache for {repo} failed", failure, repo=repo.name)


@attrs.frozen
class Frontend:
    """One frontend's shared parts, and factories for each transport."""

    backend: GitBackend
    authorizer: Authorizer
    http: GitHTTP

    def site(self, *, spool_dir: str, http_limits: HTTPLimits | None = None) -> Site:
        return make_site(
            self.http,
            limits=self.backend.limits,
            spool_dir=spool_dir,
            http_limits=http_limits,
        )

    def ssh_factory(
        self,
        host_keys: dict[bytes, Key],
        *,
        login_timeout: float,
        max_auth_attempts: int,
        clock: IReactorTime | None = None,
    ) -> GitSSHFactory:
        return make_ssh_factory(
            self.backend,
            self.authorizer,
            host_keys,
            login_timeout=login_timeout,
            max_auth_attempts=max_auth_attempts,
            clock=clock,
        )

    def git_daemon_factory(
        self, *, request_timeout: float, clock: IReactorTime | None = None
    ) -> GitDaemonFactory:
        return make_git_daemon_factory(
            self.backend, self.backend.metadata, request_timeout=request_timeout, clock=clock
        )


def build_frontend(
    metadata: IMetadataStore,
    objects: IObjectStore,
    *,
    run: BlockingRunner,
    limits: Limits,
    spool_dir: str | None,
    compression_level: int = 6,
    metrics: Metrics | None = None,
    cluster_status: Callable[[], dict[str, Any]] | None = None,
    cache: IPackCache | None = None,
    admission: AdmissionPolicy | None = None,
    clock: Callable[[], float] | None = None,
    prewarm_refs: Sequence[str] | None = None,
    call_from_thread: Callable[..., object] = _call_inline,
    sendfile: bool = True,
    http_limits: HTTPLimits | None = None,
) -> Frontend:
    """Wire the engines, auth, admin API and metrics once for every transport.

    *cache* (its events should go to ``metrics.pack_cache_event``) puts the
    pack cache in the fetch path; *admission* the limits of admission
    control, with *clock* (default: monotonic) for its token buckets;
    *prewarm_refs* turns pre-warm on push on (HEAD's branch, plus refs
    matching these globs; None leaves it off), with *call_from_thread* to
    reach the reactor from a push's worker thread (the default calls
    inline, for tests with an inline runner).  *sendfile* lets HTTP send
    complete cache entries straight from their files.  *http_limits* bound
    the admin API's JSON bodies (the rest of them apply in ``make_site``).
    """
    http_limits = http_limits or HTTPLimits()
    authorizer = Authorizer(metadata)
    metrics = metrics or Metrics()

    def status() -> dict[str, Any]:
        return {"mode": "standalone", "tiers": ["frontend", "metadata", "object"], "nodes": 1}

    upload = UploadPackService(
        metadata,
        objects,
        limits,
        compression_level=compression_level,
        cache=cache,
        observer=metrics if cache is not None else None,
    )

    def builds_in_progress() -> int:
        # The cache counts its queued builds; the service the ones requests run themselves.
        queued = cache.builds_in_progress() if cache is not None else 0
        return max(queued, upload.builds_in_progress())

    metrics.watch_builds(builds_in_progress)
    if admission is not None:
        upload.admission = Admission(
            admission,
            builds_in_progress=builds_in_progress,
            clock=clock or time.monotonic,
            on_refused=metrics.admission_refused,
        )
    push = PushProcessor(metadata, objects, limits)
    if prewarm_refs is not None and cache is not None:
        prewarmer = Prewarmer(
            upload,
            run,
            tuple(prewarm_refs),
            call_from_thread=call_from_thread,
            metrics=metrics,
        )
        push.on_refs_updated = prewarmer.refs_updated
    backend = GitBackend(
        metadata=metadata,
        upload=upload,
        push=push,
        run=run,
        limits=limits,
        metrics=metrics,
        spool_dir=spool_dir,
    )
    http = GitHTTP(
        metadata=metadata,
        authorizer=authorizer,
        upload=backend.upload,
        push=backend.push,
        admin=AdminAPI(
            metadata,
            authorizer,
            run,
            cluster_status or status,
            max_body=http_limits.api_max_body_bytes,
            max_json_depth=http_limits.api_max_json_depth,
        ),
        metrics=backend.metrics,
        run=run,
        limits=limits,
        spool_dir=spool_dir,
        sendfile=sendfile,
    )
    return Frontend(backend=backend, authorizer=authorizer, http=http)


def build_git_http(
    metadata: IMetadataStore,
    objects: IObjectStore,
    *,
    run: BlockingRunner,
    limits: Limits,
    spool_dir: str | None,
    compression_level: int = 6,
    metrics: Metrics | None = None,
    cluster_status: Callable[[], dict[str, Any]] | None = None,
    **pack_cache: Any,
) -> GitHTTP:
    """The HTTP application alone (see ``build_frontend``, which takes the pack-cache options too)."""
    return build_frontend(
        metadata,
        objects,
        run=run,
        limits=limits,
        spool_dir=spool_dir,
        compression_level=compression_level,
        metrics=metrics,
        cluster_status=cluster_status,
        **pack_cache,
    ).http


def make_site(
    app: GitHTTP, *, limits: Limits, spool_dir: str, http_limits: HTTPLimits | None = None
) -> Site:
    """A Site that refuses from the headers what it can, and spools bounded bodies under *spool_dir*."""
    os.makedirs(spool_dir, exist_ok=True)
    site = GuardedSite(
        app.resource(),
        limits=http_limits or HTTPLimits(),
        admit=app.admit,
        on_refused=app.refused_early,
        requestFactory=spooling_request_factory(
            limits.max_pack_bytes,
            spool_dir,
            max_request_body=limits.max_request_bytes,
            # One byte over, so that the API itself sees the body is too large.
            max_api_body=app.admin.max_body + 1,
        ),
        timeout=limits.idle_timeout,
    )
    site.displayTracebacks = False
    return site
