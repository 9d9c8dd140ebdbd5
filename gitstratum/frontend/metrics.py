"""Prometheus metrics for ``GET /metrics`` and the one-line-per-request log.

Each ``Metrics`` owns its own ``CollectorRegistry`` rather than the process
global one, so tests (and a standalone process) can build many servers
without their counters colliding.

``repo_class`` is ``"public"``, ``"private"`` or ``"none"`` (a request not
tied to a repository) -- never the repository name, which would give one
time series per repository.  ``outcome`` is a short word such as ``ok``,
``denied``, ``not_found``, ``bad_request``, ``too_large``, ``rate_limited``
or ``error``.
"""

from __future__ import annotations

import attrs
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from twisted.logger import Logger

__all__ = ["Metrics", "REPO_CLASSES", "log_request"]

REPO_CLASSES = ("public", "private", "none")

# From a ref advertisement (milliseconds) to a large cold clone (minutes).
_DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)


@attrs.define(eq=False)
class Metrics:
    """The server's metrics, registered in a registry of their own."""

    registry: CollectorRegistry = attrs.field(factory=lambda: CollectorRegistry(auto_describe=True))
    requests: Counter = attrs.field(init=False)
    request_duration: Histogram = attrs.field(init=False)
    response_bytes: Counter = attrs.field(init=False)
    pack_cache_hits: Counter = attrs.field(init=False)
    pack_cache_misses: Counter = attrs.field(init=False)
    push_objects: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "gitstratum_requests_total",
            "Requests served, by service, repository class and outcome.",
            ["service", "repo_class", "outcome"],
            registry=r,
        )
        self.request_duration = Histogram(
            "gitstratum_request_duration_seconds",
            "Time from a request's start to its last byte, by service and repository class.",
            ["service", "repo_class"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.response_bytes = Counter(
            "gitstratum_response_bytes_total",
            "Bytes sent in response bodies, by service.",
            ["service"],
            registry=r,
        )
        self.pack_cache_hits = Counter(
            "gitstratum_pack_cache_hits_total",
            "Fetches answered from the pack cache.",
            registry=r,
        )
        self.pack_cache_misses = Counter(
            "gitstratum_pack_cache_misses_total",
            "Fetches that had to build their pack.",
            registry=r,
        )
        self.push_objects = Counter(
            "gitstratum_push_objects_total",
            "Objects received in accepted pushes.",
            registry=r,
        )

    def observe_request(
        self, *, service: str, repo_class: str, outcome: str, seconds: float, nbytes: int
    ) -> None:
        """Count one finished request, its latency and the bytes it sent."""
        if repo_class not in REPO_CLASSES:
            raise ValueError(
                f"repo_class must be one of {', '.join(REPO_CLASSES)}, not {repo_class!r}"
            )
        self.requests.labels(service=service, repo_class=repo_class, outcome=outcome).inc()
        self.request_duration.labels(service=service, repo_class=repo_class).observe(
            max(seconds, 0.0)
        )
        if nbytes > 0:
            self.response_bytes.labels(service=service).inc(nbytes)

    def pack_cache_hit(self) -> None:
        self.pack_cache_hits.inc()

    def pack_cache_miss(self) -> None:
        self.pack_cache_misses.inc()

    def objects_pushed(self, count: int) -> None:
        if count > 0:
            self.push_objects.inc(count)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its Content-Type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def log_request(
    log: Logger,
    *,
    repo: str,
    service: str,
    user: str,
    nbytes: int,
    seconds: float,
    outcome: str,
    status: int,
) -> None:
    """Emit one structured event for a finished request.

    The fields are event keys (``repo``, ``service``, ``user``, ``nbytes``,
    ``seconds``, ``outcome``, ``status``) so JSON log observers keep them
    typed; the format only renders them for text logs.  *user* is ``"-"``
    for an anonymous caller, as in common log format.
    """
    log.info(
        "{service} {repo} user={user} status={status} outcome={outcome} bytes={nbytes} seconds={seconds:.3f}",
        repo=repo,
        service=service,
        user=user or "-",
        nbytes=nbytes,
        seconds=seconds,
        outcome=outcome,
        status=status,
    )
