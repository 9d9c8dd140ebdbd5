"""Prometheus metrics for ``GET /metrics`` and the one-line-per-request log.

Each ``Metrics`` owns its own ``CollectorRegistry`` rather than the process
global one, so tests (and a standalone process) can build many servers
without their counters colliding.

``repo_class`` is ``"public"``, ``"private"`` or ``"none"`` (a request not
tied to a repository) -- never the repository name, which would give one
time series per repository.  ``outcome`` is a short word such as ``ok``,
``denied``, ``not_found``, ``bad_request``, ``too_large``, ``rate_limited``
or ``error``.

The pack-cache metrics have two sources.  The cache reports what it does
(``pack_cache_event``: builds, evictions, build time, bytes read out to
hits and followers), whoever asked; the upload service reports how each
fetch was served (``pack_served``, ``cpu_saved``), so a pre-warm build is a
build but never a miss.  ``cpu_saved`` adds, for every hit and follower,
what building its entry took: the work the cache spared.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import attrs
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from twisted.logger import Logger

from gitstratum.cache.interfaces import CacheOutcome
from gitstratum.frontend.admission import REASONS as ADMISSION_REASONS
from gitstratum.storage.interfaces import Repository

__all__ = ["Metrics", "REPO_CLASSES", "repo_class_of", "log_request", "record_request"]

REPO_CLASSES = ("public", "private", "none")


def repo_class_of(repo: Repository) -> str:
    """The ``repo_class`` label of a request served from *repo*."""
    return "public" if repo.public else "private"


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

# From a depth-1 pack of a small repository to a full clone of a large one.
_BUILD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

#: how a pre-warm found each pack: already stored, being built, or built now
PREWARM_OUTCOMES = ("hit", "follow", "build")


@attrs.define(eq=False)
class Metrics:
    """The server's metrics, registered in a registry of their own."""

    registry: CollectorRegistry = attrs.field(factory=lambda: CollectorRegistry(auto_describe=True))
    requests: Counter = attrs.field(init=False)
    request_duration: Histogram = attrs.field(init=False)
    response_bytes: Counter = attrs.field(init=False)
    pack_cache_hits: Counter = attrs.field(init=False)
    pack_cache_misses: Counter = attrs.field(init=False)
    pack_cache_followers: Counter = attrs.field(init=False)
    pack_cache_builds: Counter = attrs.field(init=False)
    pack_cache_build_seconds: Histogram = attrs.field(init=False)
    pack_cache_served_bytes: Counter = attrs.field(init=False)
    pack_cache_evictions: Counter = attrs.field(init=False)
    pack_cache_cpu_saved: Counter = attrs.field(init=False)
    pack_cache_prewarms: Counter = attrs.field(init=False)
    pack_builds_in_progress: Gauge = attrs.field(init=False)
    admission_rejected: Counter = attrs.field(init=False)
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
        self.pack_cache_followers = Counter(
            "gitstratum_pack_cache_followers_total",
            "Fetches that streamed a pack another request or a pre-warm was building.",
            registry=r,
        )
        self.pack_cache_builds = Counter(
            "gitstratum_pack_cache_builds_total",
            "Pack-cache entries whose build started (for a fetch or a pre-warm).",
            registry=r,
        )
        self.pack_cache_build_seconds = Histogram(
            "gitstratum_pack_cache_build_seconds",
            "Time to build a pack-cache entry, from its first object to its last byte.",
            buckets=_BUILD_BUCKETS,
            registry=r,
        )
        self.pack_cache_served_bytes = Counter(
            "gitstratum_pack_cache_served_bytes_total",
            "Raw pack bytes streamed from the cache to hits and followers.",
            registry=r,
        )
        self.pack_cache_evictions = Counter(
            "gitstratum_pack_cache_evictions_total",
            "Pack-cache entries removed to stay under the byte bound or the age limit.",
            registry=r,
        )
        self.pack_cache_cpu_saved = Counter(
            "gitstratum_pack_cache_cpu_seconds_saved_total",
            "Estimated build seconds spared: the build time of each entry served to a hit"
            " or follower.",
            registry=r,
        )
        self.pack_cache_prewarms = Counter(
            "gitstratum_pack_cache_prewarms_total",
            "Packs pre-warmed after a push, by what the cache already had.",
            ["outcome"],
            registry=r,
        )
        for outcome in PREWARM_OUTCOMES:
            self.pack_cache_prewarms.labels(outcome=outcome)
        self.pack_builds_in_progress = Gauge(
            "gitstratum_pack_builds_in_progress",
            "Pack builds running or queued in this frontend (summed over its workers).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.admission_rejected = Counter(
            "gitstratum_admission_rejected_total",
            "Fetches refused by admission control, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in ADMISSION_REASONS:
            self.admission_rejected.labels(reason=reason)
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

    def pack_served(self, outcome: CacheOutcome) -> None:
        """How one fetch got its pack (upload_service's PackCacheObserver)."""
        if outcome is CacheOutcome.HIT:
            self.pack_cache_hits.inc()
        elif outcome is CacheOutcome.FOLLOW:
            self.pack_cache_followers.inc()
        else:
            self.pack_cache_misses.inc()

    def cpu_saved(self, seconds: float) -> None:
        """A hit or follower was spared a build that took *seconds*."""
        if seconds > 0:
            self.pack_cache_cpu_saved.inc(seconds)

    def pack_cache_event(self, name: str, value: float) -> None:
        """``DiskPackCache(on_event=...)``: what the cache did (from any thread)."""
        if name == "build":
            self.pack_cache_builds.inc(value)
        elif name == "build_seconds":
            self.pack_cache_build_seconds.observe(max(value, 0.0))
        elif name == "bytes_served":
            self.pack_cache_served_bytes.inc(value)
        elif name == "evict":
            self.pack_cache_evictions.inc(value)
        # hit, follow and uncached are counted per fetch by pack_served.

    def prewarmed(self, outcome: CacheOutcome) -> None:
        """One pack a pre-warm asked for, and what the cache had of it."""
        self.pack_cache_prewarms.labels(outcome=outcome.value).inc()

    def admission_refused(self, reason: str) -> None:
        """A fetch refused by admission control (``Admission(on_refused=...)``)."""
        self.admission_rejected.labels(reason=reason).inc()

    def watch_builds(self, builds_in_progress: Callable[[], int]) -> None:
        """Export *builds_in_progress* (read at each scrape; it must be cheap)."""
        self.pack_builds_in_progress.set_function(lambda: float(builds_in_progress()))

    def objects_pushed(self, count: int) -> None:
        if count > 0:
            self.push_objects.inc(count)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its Content-Type, for ``GET /metrics``.

        Under ``--workers`` (prometheus_client's multiprocess mode, set up by
        the supervisor) every worker writes its values to shared files, and
        whichever worker answers reports the sum over all of them.
        """
        shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if shared:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=shared)
            return generate_latest(registry), CONTENT_TYPE_LATEST
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


def record_request(
    metrics: Metrics | None,
    log: Logger,
    *,
    service: str,
    repo: str,
    user: str,
    status: int,
    outcome: str,
    repo_class: str = "none",
    seconds: float = 0.0,
    nbytes: int = 0,
    logged_as: str | None = None,
) -> None:
    """Finish one request: count it in *metrics* and write its one log line.

    The adapters end their requests here, served or refused.  The defaults
    describe a request refused before it reached a repository: no class, no
    time, no bytes.  With *metrics* None the request is only logged (git://
    counts only its upload-pack and receive-pack requests); *logged_as* is
    the service as the log line names it, where that differs from the metric
    label.
    """
    if metrics is not None:
        metrics.observe_request(
            service=service, repo_class=repo_class, outcome=outcome, seconds=seconds, nbytes=nbytes
        )
    log_request(
        log,
        repo=repo,
        service=logged_as or service,
        user=user,
        nbytes=nbytes,
        seconds=seconds,
        outcome=outcome,
        status=status,
    )
