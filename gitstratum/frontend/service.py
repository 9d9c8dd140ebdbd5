"""Assembling the frontend from whatever stores the tier is given.

Standalone passes its local LMDB stores; the cluster frontend will pass AMP
clients of the same interfaces.  Nothing here knows which.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.web.server import Site

from gitstratum.core.limits import Limits
from gitstratum.frontend.admin_api import AdminAPI
from gitstratum.frontend.auth import Authorizer
from gitstratum.frontend.http import GitHTTP, spooling_request_factory
from gitstratum.frontend.metrics import Metrics
from gitstratum.frontend.threads import BlockingRunner
from gitstratum.protocol.ingest import PushProcessor
from gitstratum.protocol.upload_service import UploadPackService
from gitstratum.storage.interfaces import IMetadataStore, IObjectStore

__all__ = ["build_git_http", "make_site"]


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
    """Wire the engines, auth, admin API and metrics into one HTTP application."""
    authorizer = Authorizer(metadata)

    def status() -> dict[str, Any]:
        return {"mode": "standalone", "tiers": ["frontend", "metadata", "object"], "nodes": 1}

    return GitHTTP(
        metadata=metadata,
        authorizer=authorizer,
        upload=UploadPackService(metadata, objects, limits, compression_level=compression_level),
        push=PushProcessor(metadata, objects, limits),
        admin=AdminAPI(metadata, authorizer, run, cluster_status or status),
        metrics=metrics or Metrics(),
        run=run,
        limits=limits,
        spool_dir=spool_dir,
    )


def make_site(app: GitHTTP, *, limits: Limits, spool_dir: str) -> Site:
    """A Site whose requests spool bounded bodies under *spool_dir*."""
    os.makedirs(spool_dir, exist_ok=True)
    site = Site(
        app.resource(),
        requestFactory=spooling_request_factory(limits.max_pack_bytes, spool_dir),
        timeout=limits.idle_timeout,
    )
    site.displayTracebacks = False
    return site
