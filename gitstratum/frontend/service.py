"""Assembling the frontend from whatever stores the tier is given.

Standalone passes its local LMDB stores; the cluster frontend will pass AMP
clients of the same interfaces.  Nothing here knows which.  HTTP, SSH and
git:// share one ``GitBackend`` (engines, metrics, runner, limits), so a
request costs the same and is counted the same whatever transport it uses.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
from twisted.conch.ssh.keys import Key
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Site

from gitstratum.core.limits import Limits
from gitstratum.frontend.admin_api import AdminAPI
from gitstratum.frontend.auth import Authorizer
from gitstratum.frontend.git_daemon import GitDaemonFactory, make_git_daemon_factory
from gitstratum.frontend.http import GitHTTP, spooling_request_factory
from gitstratum.frontend.metrics import Metrics
from gitstratum.frontend.ssh import GitSSHFactory, make_ssh_factory
from gitstratum.frontend.stream import GitBackend
from gitstratum.frontend.threads import BlockingRunner
from gitstratum.protocol.ingest import PushProcessor
from gitstratum.protocol.upload_service import UploadPackService
from gitstratum.storage.interfaces import IMetadataStore, IObjectStore

__all__ = ["Frontend", "build_frontend", "build_git_http", "make_site"]


@attrs.frozen
class Frontend:
    """One frontend's shared parts, and factories for each transport."""

    backend: GitBackend
    authorizer: Authorizer
    http: GitHTTP

    def site(self, *, spool_dir: str) -> Site:
        return make_site(self.http, limits=self.backend.limits, spool_dir=spool_dir)

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
) -> Frontend:
    """Wire the engines, auth, admin API and metrics once for every transport."""
    authorizer = Authorizer(metadata)

    def status() -> dict[str, Any]:
        return {"mode": "standalone", "tiers": ["frontend", "metadata", "object"], "nodes": 1}

    backend = GitBackend(
        metadata=metadata,
        upload=UploadPackService(metadata, objects, limits, compression_level=compression_level),
        push=PushProcessor(metadata, objects, limits),
        run=run,
        limits=limits,
        metrics=metrics or Metrics(),
        spool_dir=spool_dir,
    )
    http = GitHTTP(
        metadata=metadata,
        authorizer=authorizer,
        upload=backend.upload,
        push=backend.push,
        admin=AdminAPI(metadata, authorizer, run, cluster_status or status),
        metrics=backend.metrics,
        run=run,
        limits=limits,
        spool_dir=spool_dir,
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
) -> GitHTTP:
    """The HTTP application alone (see ``build_frontend``)."""
    return build_frontend(
        metadata,
        objects,
        run=run,
        limits=limits,
        spool_dir=spool_dir,
        compression_level=compression_level,
        metrics=metrics,
        cluster_status=cluster_status,
    ).http


def make_site(app: GitHTTP, *, limits: Limits, spool_dir: str) -> Site:
    """A Site whose requests spool bounded bodies under *spool_dir*."""
    os.makedirs(spool_dir, exist_ok=True)
    site = Site(
        app.resource(),
        requestFactory=spooling_request_factory(
            limits.max_pack_bytes, spool_dir, max_request_body=limits.max_request_bytes
        ),
        timeout=limits.idle_timeout,
    )
    site.displayTracebacks = False
    return site
