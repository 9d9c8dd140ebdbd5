"""Admission control: token buckets on a Clock, the build limit, and their 429 over smart HTTP.

The pure parts are driven with ``twisted.internet.task.Clock`` and
Hypothesis; the HTTP mapping runs the whole app through ``StubTreq`` and the
inline runner, over real LMDB stores and a real ``DiskPackCache``.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.conch.ssh.address import SSHTransportAddress
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage

from gitstratum.cache.disk import DiskPackCache
from gitstratum.core.limits import Limits
from gitstratum.core.oid import ObjectID
from gitstratum.core.pktline import DELIM_PKT, FLUSH_PKT, pkt_line, pkt_lines
from gitstratum.frontend.admission import (
    Admission,
    AdmissionPolicy,
    Overloaded,
    RateLimit,
    RateLimiter,
    TokenBucket,
)
from gitstratum.frontend.auth import hash_token, new_token
from gitstratum.frontend.metrics import Metrics
from gitstratum.frontend.service import Frontend, build_frontend
from gitstratum.frontend.stream import GitStreamProtocol
from gitstratum.frontend.threads import inline_runner
from gitstratum.protocol.upload_pack import UploadPackError
from gitstratum.protocol.upload_service import Caller
from gitstratum.standalone.tap import Options
from gitstratum.storage.interfaces import Permission
from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
from gitstratum.storage.lmdb_objects import LMDBObjectStore
from gitstratum.testing.fixtures import git, import_git_repo, make_small_repo

ALICE = Caller(user="alice", address="10.0.0.1")


def admission(clock: Clock, **policy: Any) -> tuple[Admission, list[str]]:
    refused: list[str] = []
    a = Admission(AdmissionPolicy(**policy), clock=clock.seconds, on_refused=refused.append)
    return a, refused


# -- Overloaded ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "seconds"), [(0.0, 1), (0.2, 1), (1.0, 1), (1.01, 2), (7.5, 8)]
)
def test_retry_after_is_whole_seconds_and_at_least_one(retry_after: float, seconds: int) -> None:
    """Retry-After rounds up (never telling a client to retry early) and is never 0."""
    e = Overloaded(retry_after, "user_rate")
    assert e.retry_seconds == seconds
    assert str(e) == f"server busy: too many requests for this user, retry in {seconds} s"


def test_overloaded_is_an_upload_pack_error() -> None:
    """A path that knows nothing of admission still answers a refusal with a clean ERR."""
    assert isinstance(Overloaded(1, "builds"), UploadPackError)
    assert str(Overloaded(3, "builds")) == "server busy: too many pack builds, retry in 3 s"


# -- token buckets -------------------------------------------------------------------------


def test_a_bucket_admits_its_burst_then_one_per_interval() -> None:
    """rate 2/s, burst 3: three at once, then one every half second."""
    clock = Clock()
    a, refused = admission(clock, per_user=RateLimit(2, 3))
    for _ in range(3):
        a.admit_pack(ALICE, builds=False)
    with pytest.raises(Overloaded) as e:
        a.admit_pack(ALICE, builds=False)
    assert e.value.reason == "user_rate" and e.value.retry_after == pytest.approx(0.5)
    assert refused == ["user_rate"]
    clock.advance(0.25)
    with pytest.raises(Overloaded) as e:
        a.admit_pack(ALICE, builds=False)
    assert e.value.retry_after == pytest.approx(0.25)
    clock.advance(0.25)
    a.admit_pack(ALICE, builds=False)
    with pytest.raises(Overloaded):
        a.admit_pack(ALICE, builds=False)


def test_a_bucket_refills_only_up_to_its_burst() -> None:
    """A long idle time gives back the burst, not more."""
    clock = Clock()
    a, _ = admission(clock, per_user=RateLimit(1, 2))
    clock.advance(3600)
    a.admit_pack(ALICE, builds=False)
    a.admit_pack(ALICE, builds=False)
    with pytest.raises(Overloaded):
        a.admit_pack(ALICE, builds=False)


def test_users_have_buckets_of_their_own() -> None:
    """One user's exhausted bucket does not limit another user."""
    clock = Clock()
    a, _ = admission(clock, per_user=RateLimit(1, 1))
    a.admit_pack(ALICE, builds=False)
    with pytest.raises(Overloaded):
        a.admit_pack(ALICE, builds=False)
    a.admit_pack(Caller(user="bob", address="10.0.0.1"), builds=False)


def test_anonymous_callers_are_limited_by_address_only() -> None:
    """Without a user, the IP bucket applies; the per-user limit cannot."""
    clock = Clock()
    a, refused = admission(clock, per_user=RateLimit(1, 1), per_ip=RateLimit(1, 2))
    anon = Caller(user=None, address="192.0.2.7")
    a.admit_pack(anon, builds=False)
    a.admit_pack(anon, builds=False)
    with pytest.raises(Overloaded) as e:
        a.admit_pack(anon, builds=False)
    assert e.value.reason == "ip_rate" and refused == ["ip_rate"]
    a.admit_pack(Caller(user=None, address="192.0.2.8"), builds=False)


def test_a_user_is_charged_to_both_the_user_and_the_address() -> None:
    """An authenticated fetch takes a token from its user and from its IP."""
    clock = Clock()
    a, _ = admission(clock, per_user=RateLimit(1, 5), per_ip=RateLimit(1, 2))
    a.admit_pack(Caller("alice", "10.0.0.9"), builds=False)
    a.admit_pack(Caller("bob", "10.0.0.9"), builds=False)
    with pytest.raises(Overloaded) as e:
        a.admit_pack(Caller("carol", "10.0.0.9"), builds=False)
    assert e.value.reason == "ip_rate"


def test_a_refused_fetch_is_not_charged() -> None:
    """When one bucket refuses, the other keeps its token; and a build refusal charges nothing."""
    clock = Clock()
    a, _ = admission(clock, max_builds=1, per_user=RateLimit(1, 1), per_ip=RateLimit(1, 1))
    a.builds_in_progress = lambda: 1
    with pytest.raises(Overloaded) as e:
        a.admit_pack(ALICE, builds=True)
    assert e.value.reason == "builds"
    a.admit_pack(ALICE, builds=False)  # both buckets still full
    with pytest.raises(Overloaded):
        a.admit_pack(Caller("bob", ALICE.address), builds=False)  # the IP's is now empty
    with pytest.raises(Overloaded) as e:
        a.admit_pack(Caller("alice", "10.0.0.2"), builds=False)
    assert e.value.reason == "user_rate"


def test_zero_rate_means_unlimited() -> None:
    """The default policy admits everything."""
    a, refused = admission(Clock())
    for _ in range(1000):
        a.admit_pack(ALICE, builds=True)
    assert refused == []


def test_a_clock_stepping_back_refills_nothing() -> None:
    """Time going backwards neither refills nor drains a bucket."""
    bucket = TokenBucket(RateLimit(1, 3), tokens=1.0, stamp=100.0)
    bucket.refill(50.0)
    assert bucket.tokens == 1.0 and bucket.stamp == 100.0
    bucket.refill(101.0)
    assert bucket.tokens == 2.0


def test_the_limiter_remembers_a_bounded_number_of_keys() -> None:
    """Past max_keys the least recently used bucket is dropped."""
    limiter = RateLimiter(RateLimit(1, 1), max_keys=3)
    for key in "abcd":
        limiter.bucket(key, 0.0).take()
    assert len(limiter) == 3
    assert limiter.bucket("a", 0.0).tokens == 1.0  # forgotten: a fresh, full bucket
    assert limiter.bucket("d", 0.0).tokens == 0.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: RateLimit(-1, 1),
        lambda: RateLimit(1, 0.5),
        lambda: AdmissionPolicy(max_builds=-1),
    ],
    ids=["negative rate", "burst below one", "negative build limit"],
)
def test_impossible_policies_are_refused(make: Any) -> None:
    """A negative rate or limit, or a burst that could never admit one fetch, is a ValueError."""
    with pytest.raises(ValueError):
        make()


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.1, 50),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=200),
)
def test_admitted_fetches_never_exceed_burst_plus_rate_times_time(
    rate: float, burst: int, gaps: list[float]
) -> None:
    """Over any arrival pattern, admissions <= burst + rate * elapsed, and a wait is honoured."""
    clock = Clock()
    a, _ = admission(clock, per_user=RateLimit(rate, burst))
    admitted = 0
    for gap in gaps:
        clock.advance(gap)
        try:
            a.admit_pack(ALICE, builds=False)
        except Overloaded as e:
            assert e.retry_after > 0
            clock.advance(e.retry_after + 1e-9)
            a.admit_pack(ALICE, builds=False)  # the advised wait is enough
        admitted += 1
        assert admitted <= burst + rate * clock.seconds() + 1e-6


# -- the build limit -------------------------------------------------------------------------


def test_the_build_limit_counts_builds_in_progress() -> None:
    """max_builds 2: a build is admitted with one running, refused with two; hits always pass."""
    running = [1]
    a = Admission(AdmissionPolicy(max_builds=2), builds_in_progress=lambda: running[0])
    a.admit_pack(ALICE, builds=True)
    assert a.may_build()
    running[0] = 2
    assert not a.may_build()
    with pytest.raises(Overloaded) as e:
        a.admit_pack(ALICE, builds=True)
    assert e.value.reason == "builds" and e.value.retry_seconds == 5
    a.admit_pack(ALICE, builds=False)


# -- smart HTTP ----------------------------------------------------------------------------------


@attrs.define
class Site:
    """The HTTP app with a pack cache and admission control, over real stores."""

    stub: Any
    clock: Clock
    metadata: LMDBMetadataStore
    cache: DiskPackCache
    src: str
    tokens: dict[str, str]
    frontend: Frontend

    def rev(self, name: str) -> ObjectID:
        return ObjectID(git("rev-parse", name, cwd=self.src).strip())

    def call(
        self,
        method: str,
        path: str,
        *,
        user: str | None = "reader",
        headers: Any = None,
        data: Any = None,
    ) -> tuple[int, dict[str, str], bytes]:
        sent = dict(headers or {})
        if user is not None:
            cred = base64.b64encode(f"{user}:{self.tokens[user]}".encode()).decode()
            sent["Authorization"] = "Basic " + cred
        responses: list[Any] = []
        kwargs = {"headers": sent} if data is None else {"headers": sent, "data": data}
        self.stub.request(method, "http://git.test" + path, **kwargs).addBoth(responses.append)
        self.stub.flush()
        (response,) = responses
        bodies: list[bytes] = []
        response.content().addBoth(bodies.append)
        self.stub.flush()
        headers_out = {
            k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()
        }
        return response.code, headers_out, bodies[0]

    def fetch(
        self, want: ObjectID, *, repo: str = "o/private", user: str | None = "reader"
    ) -> tuple[int, dict[str, str], bytes]:
        body = (
            pkt_lines("command=fetch\n", "object-format=sha1\n")
            + DELIM_PKT
            + pkt_lines(
                "ofs-delta\n", "no-progress\n", "deepen 1\n", b"want " + want + b"\n", "done\n"
            )
            + FLUSH_PKT
        )
        headers = {
            "Content-Type": "application/x-git-upload-pack-request",
            "Git-Protocol": "version=2",
        }
        return self.call(
            "POST", f"/{repo}.git/git-upload-pack", user=user, headers=headers, data=body
        )

    def metric(self, name: str, **labels: str) -> float:
        _, _, text = self.call("GET", "/metrics", user=None)
        for family in text_string_to_metric_families(text.decode()):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return s.value
        return 0.0


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_small_repo(str(tmp_path_factory.mktemp("src") / "small.git"))


def make_site(tmp_path: Path, source: str, policy: AdmissionPolicy) -> Iterator[Site]:
    metadata = LMDBMetadataStore(str(tmp_path / "meta"))
    objects = LMDBObjectStore(str(tmp_path / "objects"))
    for name, public in (("o/private", False), ("o/public", True)):
        import_git_repo(source, metadata, objects, metadata.create_repository(name, public=public))
    tokens = {}
    for user, permission in (
        ("reader", Permission.READ),
        ("other", Permission.READ),
        ("stranger", None),
    ):
        metadata.create_user(user)
        tokens[user] = new_token()
        metadata.add_token(user, hash_token(tokens[user]))
        if permission is not None:
            metadata.grant(user, "o/private", permission)
    metrics = Metrics()
    cache = DiskPackCache(
        str(tmp_path / "cache"), max_bytes=1 << 30, on_event=metrics.pack_cache_event
    )
    clock = Clock()
    frontend = build_frontend(
        metadata,
        objects,
        run=inline_runner,
        limits=Limits(),
        spool_dir=None,
        metrics=metrics,
        cache=cache,
        admission=policy,
        clock=clock.seconds,
        prewarm_refs=(),
    )
    yield Site(StubTreq(frontend.http.resource()), clock, metadata, cache, source, tokens, frontend)
    cache.close()
    metadata.close()
    objects.close()


@pytest.fixture
def limited(tmp_path: Path, source: str) -> Iterator[Site]:
    yield from make_site(
        tmp_path, source, AdmissionPolicy(per_user=RateLimit(1, 2), per_ip=RateLimit(1, 3))
    )


def test_over_the_user_rate_is_429_with_retry_after(limited: Site) -> None:
    """The third fetch inside a second gets 429, Retry-After and a text body; later ones pass again."""
    main = limited.rev("main")
    assert limited.fetch(main)[0] == 200
    assert limited.fetch(main)[0] == 200
    code, headers, body = limited.fetch(main)
    assert code == 429
    assert headers["retry-after"] == "1"
    assert headers["content-type"].startswith("text/plain")
    assert body == b"server busy: too many requests for this user, retry in 1 s\n"
    # Another user is served meanwhile, from the cache.
    assert limited.fetch(main, user="other")[0] == 200
    limited.clock.advance(1)
    assert limited.fetch(main)[0] == 200
    assert limited.metric("gitstratum_admission_rejected_total", reason="user_rate") == 1
    labels = {"service": "upload-pack", "repo_class": "private", "outcome": "rate_limited"}
    assert limited.metric("gitstratum_requests_total", **labels) == 1


def test_anonymous_fetches_are_limited_per_address(limited: Site) -> None:
    """Anonymous fetches of a public repository share their IP's bucket (burst 3)."""
    main = limited.rev("main")
    for _ in range(3):
        assert limited.fetch(main, repo="o/public", user=None)[0] == 200
    code, headers, _ = limited.fetch(main, repo="o/public", user=None)
    assert code == 429 and int(headers["retry-after"]) >= 1
    assert limited.metric("gitstratum_admission_rejected_total", reason="ip_rate") == 1


def test_advertisements_and_ls_refs_are_not_charged(limited: Site) -> None:
    """info/refs and ls-refs cost no token: after many, a user still has its whole burst."""
    ls_refs = pkt_lines("command=ls-refs\n") + DELIM_PKT + pkt_line("peel\n") + FLUSH_PKT
    headers = {"Content-Type": "application/x-git-upload-pack-request", "Git-Protocol": "version=2"}
    for _ in range(10):
        assert limited.call("GET", "/o/private.git/info/refs?service=git-upload-pack")[0] == 200
        assert (
            limited.call("POST", "/o/private.git/git-upload-pack", headers=headers, data=ls_refs)[0]
            == 200
        )
    main = limited.rev("main")
    assert [limited.fetch(main)[0] for _ in range(3)] == [200, 200, 429]


def test_a_user_without_read_access_is_never_served_from_the_cache(limited: Site) -> None:
    """With the pack cached, a stranger still gets 404 and an anonymous caller 401; no hit is counted."""
    main = limited.rev("main")
    assert limited.fetch(main)[0] == 200
    assert limited.fetch(main, user="stranger")[0] == 404
    assert limited.fetch(main, user=None)[0] == 401
    assert limited.metric("gitstratum_pack_cache_hits_total") == 0
    assert limited.fetch(main, user="other")[0] == 200
    assert limited.metric("gitstratum_pack_cache_hits_total") == 1


@pytest.fixture
def one_build(tmp_path: Path, source: str) -> Iterator[Site]:
    yield from make_site(tmp_path, source, AdmissionPolicy(max_builds=1))


def test_a_fetch_needing_a_build_at_the_limit_is_429_while_hits_are_served(one_build: Site) -> None:
    """With the one build slot taken, a cold fetch gets 429; a cached one is served meanwhile."""
    main, feature = one_build.rev("main"), one_build.rev("feature")
    assert one_build.fetch(main)[0] == 200
    release = threading.Event()

    def held() -> Iterator[bytes]:
        assert release.wait(30)
        yield b"PACK\x00\x00\x00\x02\x00\x00\x00\x00" + b"\x00" * 20

    try:
        assert one_build.cache.warm("ab" * 32, held).value == "build"
        code, headers, body = one_build.fetch(feature)
        assert code == 429 and headers["retry-after"] == "5"
        assert body == b"server busy: too many pack builds, retry in 5 s\n"
        assert one_build.fetch(main)[0] == 200  # a hit skips the build limit
    finally:
        release.set()
        one_build.cache.wait_builds()
    assert one_build.fetch(feature)[0] == 200
    assert one_build.metric("gitstratum_admission_rejected_total", reason="builds") == 1
    assert one_build.metric("gitstratum_pack_cache_hits_total") == 1


def test_ssh_sessions_are_limited_by_the_address_under_the_channel(limited: Site) -> None:
    """Over SSH the client IP comes from under the channel; past its burst a session gets ERR."""
    main = limited.rev("main").decode()
    repo = limited.metadata.get_repository("o/private")
    assert repo is not None
    outputs: list[bytes] = []
    for user in (
        "reader",
        "other",
        "stranger",
        "fourth",
    ):  # four users, so only the IP's burst (3) binds
        transport = StringTransport(
            peerAddress=SSHTransportAddress(IPv4Address("TCP", "192.0.2.9", 50000))
        )
        statuses: list[int] = []
        protocol = GitStreamProtocol(
            limited.frontend.backend,
            service="upload-pack",
            repo=repo,
            user=user,
            version=2,
            on_done=statuses.append,
        )
        protocol.makeConnection(transport)
        transport.clear()
        fetch = (
            pkt_lines("command=fetch\n")
            + DELIM_PKT
            + pkt_lines("no-progress\n", f"want {main}\n", "done\n")
            + FLUSH_PKT
        )
        protocol.dataReceived(fetch + FLUSH_PKT)
        outputs.append(transport.value())
        assert statuses == [0 if len(outputs) <= 3 else 128]
    assert all(b"packfile" in out for out in outputs[:3])
    assert outputs[3] == pkt_line(
        "ERR server busy: too many requests from this address, retry in 1 s\n"
    )


# -- the tap's options -----------------------------------------------------------------------


def test_tap_options_configure_every_limit() -> None:
    """--max-builds, --rate/--burst-per-user and -per-ip, --prewarm-refs reach the policy."""
    options = Options()
    options.parseOptions(
        [
            "--max-builds=7",
            "--rate-per-user=2.5",
            "--burst-per-user=4",
            "--rate-per-ip=10",
            "--burst-per-ip=30",
            "--prewarm-refs=refs/heads/release/*, refs/tags/v*",
            "--pack-cache-bytes=1048576",
            "--pack-cache-max-age=3600",
            "--pack-cache-min-occurrences=2",
        ]
    )
    assert options.admission_policy() == AdmissionPolicy(
        max_builds=7, per_user=RateLimit(2.5, 4), per_ip=RateLimit(10, 30)
    )
    assert options.prewarm_refs() == ("refs/heads/release/*", "refs/tags/v*")
    assert options["pack-cache-bytes"] == 1 << 20
    assert options["pack-cache-max-age"] == 3600.0
    assert options["pack-cache-min-occurrences"] == 2


def test_tap_option_defaults() -> None:
    """By default: a 2 GiB cache, 4 builds, no rate limits, pre-warm of HEAD's branch only."""
    options = Options()
    options.parseOptions([])
    assert options.admission_policy() == AdmissionPolicy(
        max_builds=4, per_user=RateLimit(0, 20), per_ip=RateLimit(0, 20)
    )
    assert options.prewarm_refs() == ()
    assert options["pack-cache-bytes"] == 2 * 1024**3
    assert options["pack-cache-dir"] is None
    off = Options()
    off.parseOptions(["--prewarm-refs=none"])
    assert off.prewarm_refs() is None


@pytest.mark.parametrize(
    "args",
    [
        ["--max-builds=-1"],
        ["--rate-per-user=-1"],
        ["--burst-per-ip=0"],
        ["--pack-cache-bytes=-5"],
        ["--pack-cache-min-occurrences=0"],
        ["--pack-cache-max-age=0"],
        ["--sendfile=maybe"],
    ],
)
def test_tap_refuses_impossible_limits(args: list[str]) -> None:
    """A limit that cannot work is a usage error at start, not a surprise later."""
    with pytest.raises(usage.UsageError):
        Options().parseOptions(args)
