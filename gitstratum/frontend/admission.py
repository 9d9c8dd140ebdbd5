"""Admission control for upload-pack: a bound on concurrent pack builds, and token buckets.

Every decision is taken while a fetch is planned (``UploadPackService.plan``
and ``UploadSession.receive_haves``), before the first byte of its answer,
so a refusal can still be an HTTP 429 with ``Retry-After`` or, on ssh:// and
git://, one ``ERR`` packet.  ``Overloaded`` is an ``UploadPackError``, so a
path that knows nothing of admission still turns it into a clean ``ERR``.

What is limited:

- *Pack builds*, per frontend process: a fetch that would start a build
  (nothing cached, nobody building it) is refused while ``max_builds``
  builds are in progress.  Cache hits and followers of a running build cost
  no CPU worth bounding and skip this limit.
- *Fetches*, per user and per client IP, by token buckets of ``rate``
  tokens a second up to ``burst``: each fetch that sends a pack takes one
  token from its user's bucket and one from its IP's, hits included.  An
  anonymous caller has only an IP bucket.  Advertisements (``info/refs``,
  the ssh:// greeting), ``ls-refs`` and negotiation rounds that send no
  pack are not charged: they are cheap (advertisements come from an
  in-memory cache), and charging them would make one clone cost one to
  three tokens depending on the protocol version and transport, where now
  a clone or fetch costs exactly one whatever it travels over.

A rate of 0 (or ``max_builds`` 0) means unlimited.  Time is injected.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import attrs

from gitstratum.protocol.upload_pack import UploadPackError
from gitstratum.protocol.upload_service import Caller

__all__ = [
    "Overloaded",
    "RateLimit",
    "AdmissionPolicy",
    "TokenBucket",
    "RateLimiter",
    "Admission",
    "BUILDS",
    "USER_RATE",
    "IP_RATE",
    "REASONS",
]

#: the ``reason`` of a refusal (and the label of the metric counting them)
BUILDS = "builds"
USER_RATE = "user_rate"
IP_RATE = "ip_rate"
REASONS = (BUILDS, USER_RATE, IP_RATE)

_WHY = {
    BUILDS: "too many pack builds",
    USER_RATE: "too many requests for this user",
    IP_RATE: "too many requests from this address",
}

#: buckets remembered per limiter; the least recently used go first (see RateLimiter)
MAX_TRACKED_KEYS = 100_000


class Overloaded(UploadPackError):
    """A fetch refused by admission control; ``str()`` is the ``ERR`` text.

    ``retry_after`` is the wait in seconds after which the request would be
    admitted (for a build, an estimate); ``reason`` is one of ``REASONS``.
    """

    def __init__(self, retry_after: float, reason: str):
        self.retry_after = max(retry_after, 0.0)
        self.reason = reason
        super().__init__(f"server busy: {_WHY[reason]}, retry in {self.retry_seconds} s")

    @property
    def retry_seconds(self) -> int:
        """Whole seconds for ``Retry-After``: rounded up, and never 0 (which would mean "now")."""
        return max(1, math.ceil(self.retry_after))


@attrs.frozen
class RateLimit:
    """A token bucket's shape: *rate* tokens a second, holding at most *burst* (0 rate: unlimited)."""

    rate: float = 0.0
    burst: float = 1.0

    def __attrs_post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError("a rate limit cannot be negative")
        if self.rate and self.burst < 1:
            raise ValueError("a rate limit's burst must be at least 1, or no request is admitted")

    @property
    def unlimited(self) -> bool:
        return self.rate == 0


@attrs.frozen
class AdmissionPolicy:
    """Every limit, as configured (``gitstratum-standalone --max-builds ...``)."""

    max_builds: int = 0
    per_user: RateLimit = RateLimit()
    per_ip: RateLimit = RateLimit()
    #: what a refused build is told to wait, for want of knowing when a build ends
    build_retry_after: float = 5.0

    def __attrs_post_init__(self) -> None:
        if self.max_builds < 0:
            raise ValueError("max_builds cannot be negative")


@attrs.define
class TokenBucket:
    """One bucket: ``tokens`` as of ``stamp``, refilled at ``limit.rate`` up to ``limit.burst``."""

    limit: RateLimit
    tokens: float
    stamp: float

    def refill(self, now: float) -> None:
        # A clock that steps back refills nothing rather than draining the bucket.
        if now > self.stamp:
            self.tokens = min(self.limit.burst, self.tokens + (now - self.stamp) * self.limit.rate)
            self.stamp = now

    def wait(self) -> float:
        """Seconds until a token is there (0 when one is there now); call ``refill`` first."""
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.limit.rate

    def take(self) -> None:
        self.tokens -= 1


@attrs.define(eq=False)
class RateLimiter:
    """Token buckets by key (a user name, an IP address), all of one shape.

    At most ``max_keys`` buckets are kept; the least recently used is
    dropped first.  A dropped bucket that was not full hands its key a fresh
    burst: bounded memory matters more than exactness for a key idle that long.
    """

    limit: RateLimit
    max_keys: int = MAX_TRACKED_KEYS
    _buckets: OrderedDict[str, TokenBucket] = attrs.field(factory=OrderedDict, init=False)

    def bucket(self, key: str, now: float) -> TokenBucket:
        """The key's bucket, refilled to *now* (a new one is full)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.limit, self.limit.burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.refill(now)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)


def _no_builds() -> int:
    return 0


@attrs.define(eq=False)
class Admission:
    """One frontend's admission control; implements upload_service's ``PackAdmission``.

    Thread-safe: fetches are planned in many worker threads at once.
    ``builds_in_progress`` counts the pack builds running now (the service
    wiring reads the cache's and the upload service's own counts);
    ``on_refused`` is told the reason of each refusal (for the metrics).
    """

    policy: AdmissionPolicy = AdmissionPolicy()
    builds_in_progress: Callable[[], int] = _no_builds
    clock: Callable[[], float] = time.monotonic
    on_refused: Callable[[str], None] | None = None
    _users: RateLimiter = attrs.field(init=False)
    _ips: RateLimiter = attrs.field(init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def __attrs_post_init__(self) -> None:
        self._users = RateLimiter(self.policy.per_user)
        self._ips = RateLimiter(self.policy.per_ip)

    def may_build(self) -> bool:
        """Whether a build may start now (background work such as pre-warm asks this; it is never refused)."""
        limit = self.policy.max_builds
        return not limit or self.builds_in_progress() < limit

    def admit_pack(self, caller: Caller, *, builds: bool) -> None:
        """Admit one fetch that sends a pack (and builds it, when *builds*), or raise Overloaded.

        Nothing is charged for a refused fetch: every limit is checked
        before any bucket gives up a token.
        """
        if builds and not self.may_build():
            self._refuse(self.policy.build_retry_after, BUILDS)
        now = self.clock()
        with self._lock:
            buckets: list[tuple[TokenBucket, str]] = []
            if caller.user is not None and not self.policy.per_user.unlimited:
                buckets.append((self._users.bucket(caller.user, now), USER_RATE))
            if caller.address is not None and not self.policy.per_ip.unlimited:
                buckets.append((self._ips.bucket(caller.address, now), IP_RATE))
            waits = [(bucket.wait(), reason) for bucket, reason in buckets]
            longest = max(waits, default=(0.0, ""))
            if longest[0] <= 0:
                for bucket, _ in buckets:
                    bucket.take()
                return
        self._refuse(*longest)

    def _refuse(self, retry_after: float, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)
        raise Overloaded(retry_after, reason)
