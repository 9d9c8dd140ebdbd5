"""Smart HTTP (GitHTTP) through StubTreq over real LMDB stores and a real imported repository.

Everything runs with ``inline_runner``, so each request completes inside
``StubTreq.flush()``.  Packs the server sends are checked by the real
``git index-pack``; the pack pushed is made by the real ``git pack-objects``.
``_SpoolingRequest`` (which StubTreq bypasses) is driven directly and
through a ``Site`` over a ``StringTransport``.
"""

from __future__ import annotations

import base64
import gzip
import io
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import treq
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.web.test.requesthelper import DummyChannel

from gitstratum.core.limits import Limits
from gitstratum.core.oid import ObjectID, oid
from gitstratum.core.pktline import (
    DELIM_PKT,
    FLUSH_PKT,
    Packet,
    PktLineDecoder,
    Special,
    pkt_line,
)
from gitstratum.frontend.auth import hash_token, new_token
from gitstratum.frontend.http import GitHTTP, spooling_request_factory
from gitstratum.frontend.service import build_git_http, make_site
from gitstratum.frontend.threads import inline_runner
from gitstratum.protocol.upload_service import ABORT_MESSAGE
from gitstratum.storage.interfaces import Permission, Repository
from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
from gitstratum.storage.lmdb_objects import LMDBObjectStore
from gitstratum.testing.fixtures import git, import_git_repo, make_small_repo

PRIVATE = "alice/proj"
PUBLIC = "alice/open"
MAX_REQUEST = 64 * 1024
UPLOAD_REQUEST = "application/x-git-upload-pack-request"
RECEIVE_REQUEST = "application/x-git-receive-pack-request"
NO_CACHE = {
    "cache-control": "no-cache, max-age=0, must-revalidate",
    "pragma": "no-cache",
    "expires": "Fri, 01 Jan 1980 00:00:00 GMT",
}


@attrs.frozen
class Reply:
    code: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def basic(h: Harness, user: str, secret: str | None = None) -> str:
    """An Authorization value: Basic with *user* and its token (or *secret*) as the password."""
    credentials = f"{user}:{secret if secret is not None else h.tokens[user]}".encode()
    return "Basic " + base64.b64encode(credentials).decode()


@attrs.define
class Harness:
    """The HTTP app over real stores, with users of each access level and two repositories."""

    metadata: LMDBMetadataStore
    objects: LMDBObjectStore
    app: GitHTTP
    stub: Any  # StubTreq, whose HTTP methods are set dynamically
    source: str  # the bare git repository the two repositories were imported from
    tokens: dict[str, str] = attrs.field(factory=dict)

    def repo(self, name: str = PRIVATE) -> Repository:
        repo = self.metadata.get_repository(name)
        assert repo is not None
        return repo

    def refs(self, name: str = PRIVATE) -> dict[bytes, ObjectID]:
        return dict(self.metadata.get_refs(self.repo(name)).refs)

    def call(
        self,
        method: str,
        path: str,
        *,
        user: str | None = None,
        password: str | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> Reply:
        """One request; *user* sends that user's token as the Basic password."""
        sent = dict(headers or {})
        if user is not None or password is not None:
            secret = password if password is not None else self.tokens[user or ""]
            sent["Authorization"] = basic(self, user or "x-token", secret)
        kwargs: dict[str, Any] = {"headers": sent}
        if data is not None:
            kwargs["data"] = data
        responses: list[Any] = []
        self.stub.request(method, "http://git.test" + path, **kwargs).addBoth(responses.append)
        self.stub.flush()
        (response,) = responses
        if not hasattr(response, "code"):
            response.raiseException()
        contents: list[Any] = []
        response.content().addBoth(contents.append)
        self.stub.flush()
        (body,) = contents
        assert isinstance(body, bytes), body
        headers_out = {
            k.decode().lower(): [v.decode() for v in vs]
            for k, vs in response.headers.getAllRawHeaders()
        }
        return Reply(response.code, headers_out, body)

    def upload_pack(
        self,
        body: bytes,
        *,
        repo: str = PRIVATE,
        user: str | None = "reader",
        v2: bool = True,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        sent = {"Content-Type": UPLOAD_REQUEST}
        if v2:
            sent["Git-Protocol"] = "version=2"
        sent.update(headers or {})
        return self.call("POST", f"/{repo}.git/git-upload-pack", user=user, headers=sent, data=body)

    def receive_pack(self, body: bytes, *, user: str | None = "writer") -> Reply:
        return self.call(
            "POST",
            f"/{PRIVATE}.git/git-receive-pack",
            user=user,
            headers={"Content-Type": RECEIVE_REQUEST},
            data=body,
        )

    def metric(self, name: str, **labels: str) -> float:
        """The current value of one sample of GET /metrics (0 when it is not exported yet)."""
        reply = self.call("GET", "/metrics")
        for family in text_string_to_metric_families(reply.text):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return s.value
        return 0.0


@pytest.fixture(scope="module")
def source_repo(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_small_repo(str(tmp_path_factory.mktemp("src") / "small.git"))


@pytest.fixture
def h(tmp_path: Path, source_repo: str) -> Iterator[Harness]:
    metadata = LMDBMetadataStore(str(tmp_path / "meta"))
    objects = LMDBObjectStore(str(tmp_path / "objects"))
    for name, public in ((PRIVATE, False), (PUBLIC, True)):
        import_git_repo(
            source_repo, metadata, objects, metadata.create_repository(name, public=public)
        )
    spool = tmp_path / "spool"
    spool.mkdir()
    app = build_git_http(
        metadata,
        objects,
        run=inline_runner,
        limits=Limits(max_request_bytes=MAX_REQUEST),
        spool_dir=str(spool),
    )
    harness = Harness(metadata, objects, app, StubTreq(app.resource()), source_repo)
    for user, permission in (
        ("writer", Permission.WRITE),
        ("reader", Permission.READ),
        ("stranger", None),
    ):
        metadata.create_user(user)
        token = new_token()
        metadata.add_token(user, hash_token(token))
        harness.tokens[user] = token
        if permission is not None:
            metadata.grant(user, PRIVATE, permission)
    yield harness
    metadata.close()
    objects.close()


def packets(body: bytes) -> list[Packet | Special]:
    """Every pkt-line event of a whole response body, which must end on a packet boundary."""
    decoder = PktLineDecoder()
    decoder.receive_data(body)
    events = list(decoder.events())
    decoder.check_complete()
    return events


def lines(body: bytes) -> list[bytes | Special]:
    return [e.data if isinstance(e, Packet) else e for e in packets(body)]


def pack_from_v2_fetch(body: bytes) -> bytes:
    """The pack carried on band 1 of a v2 fetch response's packfile section."""
    events = packets(body)
    start = events.index(Packet(b"packfile\n"))
    pack = bytearray()
    for event in events[start + 1 :]:
        if isinstance(event, Special):
            break
        band, data = event.data[0], event.data[1:]
        assert band in (1, 2), event
        if band == 1:
            pack += data
    return bytes(pack)


def pack_from_sideband(events: list[Packet | Special]) -> bytes:
    pack = bytearray()
    for event in events:
        if isinstance(event, Packet) and event.data[:1] == b"\x01":
            pack += event.data[1:]
    return bytes(pack)


def index_pack(tmp_path: Path, pack: bytes, *tips: str) -> None:
    """Index *pack* with the real git into a new repository and check each tip is complete there."""
    target = tmp_path / "indexed.git"
    git("init", "--quiet", "--bare", str(target))
    git("index-pack", "--stdin", "--strict", cwd=str(target), input=pack)
    for tip in tips:
        # Every object reachable from the tip must have arrived.
        git("rev-list", "--objects", tip, cwd=str(target))


def v2_ls_refs() -> bytes:
    return (
        pkt_line("command=ls-refs\n")
        + pkt_line("object-format=sha1\n")
        + DELIM_PKT
        + pkt_line("symrefs\n")
        + pkt_line("ref-prefix refs/heads/\n")
        + FLUSH_PKT
    )


def v2_fetch(*wants: str) -> bytes:
    return (
        pkt_line("command=fetch\n")
        + pkt_line("object-format=sha1\n")
        + DELIM_PKT
        + pkt_line("ofs-delta\n")
        + b"".join(pkt_line(f"want {w}\n") for w in wants)
        + pkt_line("done\n")
        + FLUSH_PKT
    )


def upload_outcome(outcome: str) -> dict[str, str]:
    return {"service": "upload-pack", "repo_class": "private", "outcome": outcome}


def bare_head(h: Harness, ref: str = "refs/heads/main") -> str:
    return git("rev-parse", ref, cwd=h.source).decode().strip()


# -- operations endpoints ------------------------------------------------------------------


def test_healthz_answers_ok(h: Harness) -> None:
    """GET /healthz is a plain-text 200 "ok" needing no credentials."""
    reply = h.call("GET", "/healthz")
    assert reply.code == 200
    assert reply.body == b"ok\n"
    assert reply.header("content-type") == "text/plain; charset=utf-8"


def test_metrics_is_prometheus_text_and_counts_requests(h: Harness) -> None:
    """/metrics uses Prometheus' content type, and the request counters move after requests."""
    reply = h.call("GET", "/metrics")
    assert reply.code == 200
    assert reply.header("content-type") == CONTENT_TYPE_LATEST
    assert b"gitstratum_pack_cache_hits_total" in reply.body
    ok = {"service": "git-upload-pack-advertisement", "repo_class": "private", "outcome": "ok"}
    denied = {**ok, "outcome": "denied"}
    assert h.metric("gitstratum_requests_total", **ok) == 0
    for _ in range(2):
        assert (
            h.call("GET", f"/{PRIVATE}.git/info/refs?service=git-upload-pack", user="reader").code
            == 200
        )
    assert h.call("GET", f"/{PRIVATE}.git/info/refs?service=git-upload-pack").code == 401
    assert h.metric("gitstratum_requests_total", **ok) == 2
    # A refused caller never learns the class of the repository, nor does the metric.
    assert h.metric("gitstratum_requests_total", **{**denied, "repo_class": "none"}) == 1
    assert (
        h.metric(
            "gitstratum_request_duration_seconds_count",
            service="git-upload-pack-advertisement",
            repo_class="private",
        )
        == 2
    )
    assert h.metric("gitstratum_response_bytes_total", service="git-upload-pack-advertisement") > 0
    assert h.upload_pack(v2_ls_refs()).code == 200
    assert (
        h.metric(
            "gitstratum_requests_total", service="upload-pack", repo_class="private", outcome="ok"
        )
        == 1
    )


# -- info/refs --------------------------------------------------------------------------------


def test_upload_pack_v0_advertisement(h: Harness) -> None:
    """v0 info/refs: the service header, a flush, then refs with capabilities; never cached."""
    reply = h.call("GET", f"/{PRIVATE}.git/info/refs?service=git-upload-pack", user="reader")
    assert reply.code == 200
    assert reply.header("content-type") == "application/x-git-upload-pack-advertisement"
    for name, value in NO_CACHE.items():
        assert reply.header(name) == value
    got = lines(reply.body)
    assert got[:2] == [b"# service=git-upload-pack\n", Special.FLUSH]
    first = got[2]
    assert isinstance(first, bytes)
    head, _, caps = first.partition(b"\x00")
    assert head == f"{bare_head(h)} HEAD".encode()
    assert b"side-band-64k" in caps.split() and b"symref=HEAD:refs/heads/main" in caps.split()
    advertised = {x.split(b" ")[1].strip() for x in got[3:-1] if isinstance(x, bytes)}
    assert {b"refs/heads/main", b"refs/heads/feature", b"refs/tags/v1.0"} <= advertised
    assert got[-1] == Special.FLUSH


def test_upload_pack_v2_advertisement(h: Harness) -> None:
    """With Git-Protocol: version=2, info/refs advertises v2 capabilities, not refs."""
    reply = h.call(
        "GET",
        f"/{PRIVATE}.git/info/refs?service=git-upload-pack",
        user="reader",
        headers={"Git-Protocol": "version=2"},
    )
    assert reply.code == 200
    assert reply.header("content-type") == "application/x-git-upload-pack-advertisement"
    for name, value in NO_CACHE.items():
        assert reply.header(name) == value
    got = lines(reply.body)
    assert got[:3] == [b"# service=git-upload-pack\n", Special.FLUSH, b"version 2\n"]
    commands = {x.split(b"=")[0].strip() for x in got[3:] if isinstance(x, bytes)}
    assert {b"ls-refs", b"fetch"} <= commands
    assert b"refs/heads/main" not in reply.body


def test_receive_pack_advertisement_needs_write(h: Harness) -> None:
    """info/refs for receive-pack: 200 for a writer, 403 for a reader, 401 for anonymous."""
    path = f"/{PRIVATE}.git/info/refs?service=git-receive-pack"
    reply = h.call("GET", path, user="writer")
    assert reply.code == 200
    assert reply.header("content-type") == "application/x-git-receive-pack-advertisement"
    for name, value in NO_CACHE.items():
        assert reply.header(name) == value
    got = lines(reply.body)
    assert got[:2] == [b"# service=git-receive-pack\n", Special.FLUSH]
    assert b"report-status" in reply.body and b"refs/heads/main" in reply.body
    denied = h.call("GET", path, user="reader")
    assert denied.code == 403
    assert "denied to reader" in denied.text
    anonymous = h.call("GET", path)
    assert anonymous.code == 401
    assert anonymous.header("www-authenticate") == 'Basic realm="GitStratum"'


# -- authentication and authorization ------------------------------------------------------


@pytest.mark.parametrize("password", [None, "gst_not-a-real-token", ""])
def test_anonymous_or_wrong_token_gets_a_basic_challenge(h: Harness, password: str | None) -> None:
    """No credentials, an unknown token or an empty one: 401 with a Basic challenge, no refs."""
    reply = h.call(
        "GET",
        f"/{PRIVATE}.git/info/refs?service=git-upload-pack",
        user="reader" if password is not None else None,
        password=password,
    )
    assert reply.code == 401
    assert reply.header("www-authenticate") == 'Basic realm="GitStratum"'
    assert b"refs/heads" not in reply.body


def test_the_user_name_in_basic_credentials_is_ignored(h: Harness) -> None:
    """Only the token identifies the caller: any user name with the reader's token reads."""
    reply = h.call(
        "GET",
        f"/{PRIVATE}.git/info/refs?service=git-upload-pack",
        user="someone-else",
        password=h.tokens["reader"],
    )
    assert reply.code == 200


def test_user_without_access_gets_404_like_a_missing_repository(h: Harness) -> None:
    """A known user who cannot see a private repository gets the same 404 as for none at all."""
    hidden = h.call("GET", f"/{PRIVATE}.git/info/refs?service=git-upload-pack", user="stranger")
    missing = h.call("GET", "/alice/nothing.git/info/refs?service=git-upload-pack", user="stranger")
    assert hidden.code == missing.code == 404
    assert hidden.body == missing.body
    assert h.upload_pack(v2_ls_refs(), user="stranger").code == 404


def test_reader_pushing_gets_403_and_nothing_changes(h: Harness) -> None:
    """A reader's receive-pack POST is 403 before its body is looked at."""
    before = h.refs()
    reply = h.receive_pack(b"garbage", user="reader")
    assert reply.code == 403
    assert h.refs() == before


def test_public_repository_is_readable_anonymously_but_not_writable(h: Harness) -> None:
    """Anyone may read a public repository; pushing to it anonymously is a 401 challenge."""
    adv = h.call("GET", f"/{PUBLIC}.git/info/refs?service=git-upload-pack")
    assert adv.code == 200
    assert b"refs/heads/main" in adv.body
    listing = h.upload_pack(v2_ls_refs(), repo=PUBLIC, user=None)
    assert listing.code == 200
    assert b"refs/heads/main" in listing.body
    push = h.call("GET", f"/{PUBLIC}.git/info/refs?service=git-receive-pack")
    assert push.code == 401
    assert push.header("www-authenticate") == 'Basic realm="GitStratum"'


def test_repository_path_without_dot_git_works(h: Harness) -> None:
    """OWNER/NAME without the .git suffix names the same repository."""
    reply = h.call("GET", f"/{PRIVATE}/info/refs?service=git-upload-pack", user="reader")
    assert reply.code == 200


# -- requests git never sends correctly formed ---------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        f"/{PRIVATE}.git/HEAD",
        f"/{PRIVATE}.git/objects/info/packs",
        f"/{PRIVATE}.git/objects/86/150d4fbf5631a23eb1bf26ae259cd211e8ac87",
        f"/{PRIVATE}.git/info/refs",
    ],
)
def test_dumb_http_is_a_404_that_says_so(h: Harness, path: str) -> None:
    """Dumb-HTTP paths, and info/refs without ?service=, are 404 mentioning dumb HTTP."""
    reply = h.call("GET", path, user="reader")
    assert reply.code == 404
    assert "dumb" in reply.text


def test_unsupported_service_is_403(h: Harness) -> None:
    """info/refs for a service other than upload-pack or receive-pack is 403."""
    reply = h.call("GET", f"/{PRIVATE}.git/info/refs?service=git-upload-archive", user="writer")
    assert reply.code == 403
    assert "Unsupported service" in reply.text


@pytest.mark.parametrize(
    "path",
    [
        "/alice/../etc/info/refs?service=git-upload-pack",
        "/alice/%2e%2e/proj.git/info/refs?service=git-upload-pack",
        "/alice%2Fproj.git/x/info/refs?service=git-upload-pack",
        "/alice//proj.git/info/refs?service=git-upload-pack",
        "/alice/proj%00.git/info/refs?service=git-upload-pack",
    ],
)
def test_path_traversal_is_400(h: Harness, path: str) -> None:
    """Dot segments, encoded separators, empty segments and NULs are refused with 400, and counted."""
    reply = h.call("GET", path, user="writer")
    assert reply.code == 400
    assert "invalid repository path" in reply.text
    registry = h.app.metrics.registry
    labels = {"service": "http", "repo_class": "none", "outcome": "bad_request"}
    assert registry.get_sample_value("gitstratum_requests_total", labels) == 1


def test_unknown_paths_are_404(h: Harness) -> None:
    """Paths that name no Git endpoint are a plain 404."""
    for path in ("/", "/alice", f"/{PRIVATE}.git/nonsense"):
        assert h.call("GET", path, user="writer").code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", f"/{PRIVATE}.git/info/refs?service=git-upload-pack"),
        ("PUT", f"/{PRIVATE}.git/info/refs?service=git-upload-pack"),
        ("GET", f"/{PRIVATE}.git/git-upload-pack"),
        ("GET", f"/{PRIVATE}.git/git-receive-pack"),
        ("DELETE", f"/{PRIVATE}.git/git-receive-pack"),
    ],
)
def test_wrong_method_is_405(h: Harness, method: str, path: str) -> None:
    """info/refs takes GET (or HEAD) only, the service endpoints POST only."""
    assert h.call(method, path, user="writer").code == 405


@pytest.mark.parametrize("kind", ["upload", "receive"])
def test_wrong_content_type_is_415(h: Harness, kind: str) -> None:
    """A service POST whose Content-Type is not the service's request type is 415."""
    before = h.refs()
    reply = h.call(
        "POST",
        f"/{PRIVATE}.git/git-{kind}-pack",
        user="writer",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        data=v2_ls_refs(),
    )
    assert reply.code == 415
    assert f"application/x-git-{kind}-pack-request" in reply.text
    assert h.refs() == before
    labels = {"service": f"{kind}-pack", "repo_class": "private", "outcome": "bad_request"}
    assert h.metric("gitstratum_requests_total", **labels) == 1


# -- upload-pack ------------------------------------------------------------------------------


def test_v2_ls_refs_lists_the_refs(h: Harness) -> None:
    """A v2 ls-refs POST lists each branch with its id, and only the refs ref-prefix asks for."""
    reply = h.upload_pack(v2_ls_refs())
    assert reply.code == 200
    assert reply.header("content-type") == "application/x-git-upload-pack-result"
    for name, value in NO_CACHE.items():
        assert reply.header(name) == value
    got = lines(reply.body)
    assert got[-1] == Special.FLUSH
    main = bare_head(h)
    feature = bare_head(h, "refs/heads/feature")
    assert f"{main} refs/heads/main\n".encode() in got
    assert f"{feature} refs/heads/feature\n".encode() in got
    assert not any(isinstance(x, bytes) and b"refs/tags/" in x for x in got)


def test_v2_fetch_returns_a_pack_git_can_index(h: Harness, tmp_path: Path) -> None:
    """A v2 fetch of main's tip streams a pack that git index-pack accepts, with all of history."""
    main = bare_head(h)
    reply = h.upload_pack(v2_fetch(main))
    assert reply.code == 200
    assert reply.header("content-type") == "application/x-git-upload-pack-result"
    pack = pack_from_v2_fetch(reply.body)
    assert pack[:4] == b"PACK"
    index_pack(tmp_path, pack, main)


def test_v0_fetch_returns_nak_and_a_sideband_pack(h: Harness, tmp_path: Path) -> None:
    """A stateless v0 request (wants, flush, done) gets NAK then the pack on side-band-64k."""
    feature = bare_head(h, "refs/heads/feature")
    body = (
        pkt_line(f"want {feature} multi_ack_detailed side-band-64k ofs-delta agent=git/2.39\n")
        + FLUSH_PKT
        + pkt_line("done\n")
    )
    reply = h.upload_pack(body, v2=False)
    assert reply.code == 200
    events = packets(reply.body)
    assert events[0] == Packet(b"NAK\n")
    pack = pack_from_sideband(events[1:])
    index_pack(tmp_path, pack, feature)


def test_gzip_encoded_request_is_inflated(h: Harness) -> None:
    """git gzips large upload-pack requests: Content-Encoding: gzip answers like a plain body."""
    plain = h.upload_pack(v2_ls_refs())
    zipped = h.upload_pack(gzip.compress(v2_ls_refs()), headers={"Content-Encoding": "gzip"})
    assert zipped.code == 200
    assert zipped.body == plain.body


def test_gzip_fetch_of_many_haves_returns_a_pack(h: Harness, tmp_path: Path) -> None:
    """A gzipped fetch large enough that git would compress it (many haves) still gets its pack."""
    main = bare_head(h)
    rng = random.Random(7)
    haves = b"".join(pkt_line(f"have {rng.randbytes(20).hex()}\n") for _ in range(500))
    request = v2_fetch(main).replace(pkt_line("done\n"), haves + pkt_line("done\n"))
    assert len(request) > 20_000
    reply = h.upload_pack(gzip.compress(request), headers={"Content-Encoding": "gzip"})
    assert reply.code == 200
    index_pack(tmp_path, pack_from_v2_fetch(reply.body), main)


def test_gzip_bomb_over_the_request_limit_is_413(h: Harness) -> None:
    """A small gzip body that inflates past max_request_bytes is refused with 413."""
    bomb = gzip.compress(b"0" * (MAX_REQUEST * 16))
    assert len(bomb) < MAX_REQUEST // 8
    reply = h.upload_pack(bomb, headers={"Content-Encoding": "gzip"})
    assert reply.code == 413
    assert str(MAX_REQUEST) in reply.text
    # The outcome uses the vocabulary gitstratum.frontend.metrics documents.
    assert h.metric("gitstratum_requests_total", **upload_outcome("too_large")) == 1


def test_incompressible_gzip_body_over_the_limit_is_413_not_truncated(h: Harness) -> None:
    """A gzip body larger than the limit even compressed is 413, not silently cut at the limit."""
    noise = random.Random(3).randbytes(MAX_REQUEST + 2000)
    reply = h.upload_pack(gzip.compress(noise), headers={"Content-Encoding": "gzip"})
    assert reply.code == 413


def test_plain_body_over_the_request_limit_is_413(h: Harness) -> None:
    """An uncompressed upload-pack body over max_request_bytes is 413."""
    reply = h.upload_pack(b"0" * (MAX_REQUEST + 1))
    assert reply.code == 413


@pytest.mark.parametrize(
    "body",
    [
        b"this is not gzip at all",
        gzip.compress(b"0014command=ls-refs\n0000")[:-12],
        b"",
    ],
    ids=["not-gzip", "truncated", "empty"],
)
def test_corrupt_gzip_body_is_400(h: Harness, body: bytes) -> None:
    """A body claiming gzip that is not, or stops short, is 400 "bad gzip request body"."""
    reply = h.upload_pack(body, headers={"Content-Encoding": "gzip"})
    assert reply.code == 400
    assert "bad gzip request body" in reply.text
    assert h.metric("gitstratum_requests_total", **upload_outcome("bad_request")) == 1


def test_malformed_upload_pack_request_is_an_err_packet(h: Harness) -> None:
    """A v2 request that is not pkt-lines answers 200 with a single ERR packet."""
    reply = h.upload_pack(b"zzzz-not-a-pkt-line")
    assert reply.code == 200
    (event,) = packets(reply.body)
    assert isinstance(event, Packet) and event.data.startswith(b"ERR ")


# -- receive-pack ----------------------------------------------------------------------------


def new_commit_pack(h: Harness, tmp_path: Path) -> tuple[str, str, bytes]:
    """A commit on top of main made by the real git, and the pack git pack-objects makes for it."""
    work = tmp_path / "work"
    git("clone", "--quiet", h.source, str(work))
    (work / "pushed.txt").write_text("pushed over smart HTTP\n")
    git("add", "pushed.txt", cwd=str(work))
    git("commit", "--quiet", "-m", "a pushed commit", cwd=str(work))
    old = bare_head(h)
    new = git("rev-parse", "HEAD", cwd=str(work)).decode().strip()
    pack = git(
        "pack-objects",
        "--stdout",
        "--revs",
        "--quiet",
        cwd=str(work),
        input=f"{new}\n^{old}\n".encode(),
    )
    assert pack[:4] == b"PACK"
    return old, new, pack


def test_receive_pack_push_updates_the_ref(h: Harness, tmp_path: Path) -> None:
    """A push of a real pack reports ok and moves the ref; a fetch then serves the new commit."""
    old, new, pack = new_commit_pack(h, tmp_path)
    body = (
        pkt_line(f"{old} {new} refs/heads/main\x00report-status agent=git/2.39\n")
        + FLUSH_PKT
        + pack
    )
    reply = h.receive_pack(body)
    assert reply.code == 200
    assert reply.header("content-type") == "application/x-git-receive-pack-result"
    for name, value in NO_CACHE.items():
        assert reply.header(name) == value
    assert lines(reply.body) == [b"unpack ok\n", b"ok refs/heads/main\n", Special.FLUSH]
    assert h.refs()[b"refs/heads/main"] == oid(new)
    fetched = h.upload_pack(v2_fetch(new))
    index_pack(tmp_path, pack_from_v2_fetch(fetched.body), new)
    assert (
        h.metric(
            "gitstratum_requests_total", service="receive-pack", repo_class="private", outcome="ok"
        )
        == 1
    )


def test_receive_pack_with_a_stale_old_value_is_rejected_in_report_status(
    h: Harness, tmp_path: Path
) -> None:
    """A push whose old value is not the ref's is reported ng; the ref stays; outcome rejected."""
    old, new, pack = new_commit_pack(h, tmp_path)
    feature = bare_head(h, "refs/heads/feature")
    assert feature != old
    before = h.refs()
    body = pkt_line(f"{feature} {new} refs/heads/main\x00report-status\n") + FLUSH_PKT + pack
    reply = h.receive_pack(body)
    assert reply.code == 200
    got = lines(reply.body)
    assert got[0] == b"unpack ok\n"
    assert isinstance(got[1], bytes) and got[1].startswith(b"ng refs/heads/main ")
    assert h.refs() == before
    assert (
        h.metric(
            "gitstratum_requests_total",
            service="receive-pack",
            repo_class="private",
            outcome="rejected",
        )
        == 1
    )


@pytest.mark.parametrize(
    "body",
    [
        b"zzzz this is not a pkt-line stream",
        pkt_line("not-a-command refs/heads/main\x00report-status\n") + FLUSH_PKT,
        pkt_line(f"{'0' * 40} {'1' * 40} refs/heads/x\x00report-status\n"),
    ],
    ids=["not-pkt-lines", "bad-command", "no-flush"],
)
def test_malformed_receive_pack_body_is_an_err_packet_and_changes_nothing(
    h: Harness, body: bytes
) -> None:
    """A receive-pack body that does not parse gets 200 with an ERR packet (git shows its
    text; a 4xx shows only "RPC failed"); no ref moves."""
    before = h.metadata.get_refs(h.repo())
    reply = h.receive_pack(body)
    assert reply.code == 200
    assert reply.header("content-type") == "application/x-git-receive-pack-result"
    (event,) = packets(reply.body)
    assert isinstance(event, Packet) and event.data.startswith(b"ERR ")
    after = h.metadata.get_refs(h.repo())
    assert after.refs == before.refs
    assert after.version == before.version
    labels = {"service": "receive-pack", "repo_class": "private", "outcome": "bad_request"}
    assert h.metric("gitstratum_requests_total", **labels) == 1


def test_a_refused_push_that_asked_for_side_band_gets_its_error_on_band_three(
    h: Harness,
) -> None:
    """git reads a side-band-64k push's answer through the bands: the error goes on band 3."""
    zero = "0" * 40
    body = (
        pkt_line(f"{zero} {zero} refs/heads/a\x00report-status side-band-64k\n")
        + pkt_line("not a command\n")
        + FLUSH_PKT
    )
    before = h.refs()
    reply = h.receive_pack(body)
    assert reply.code == 200
    first, flush = packets(reply.body)
    assert isinstance(first, Packet) and first.data.startswith(b"\x03error: protocol error")
    assert flush is Special.FLUSH
    assert h.refs() == before


def test_gzip_receive_pack_body_is_inflated(h: Harness, tmp_path: Path) -> None:
    """A gzip-encoded push body is inflated to a spool file and applied like a plain one."""
    old, new, pack = new_commit_pack(h, tmp_path)
    body = pkt_line(f"{old} {new} refs/heads/main\x00report-status\n") + FLUSH_PKT + pack
    reply = h.call(
        "POST",
        f"/{PRIVATE}.git/git-receive-pack",
        user="writer",
        headers={"Content-Type": RECEIVE_REQUEST, "Content-Encoding": "gzip"},
        data=gzip.compress(body),
    )
    assert reply.code == 200
    assert b"ok refs/heads/main" in reply.body
    assert h.refs()[b"refs/heads/main"] == oid(new)


def test_truncated_gzip_receive_pack_body_is_an_err_packet(h: Harness, tmp_path: Path) -> None:
    """A gzip push body cut short gets an ERR packet, never applied from what did arrive."""
    old, new, pack = new_commit_pack(h, tmp_path)
    body = pkt_line(f"{old} {new} refs/heads/main\x00report-status\n") + FLUSH_PKT + pack
    before = h.refs()
    reply = h.call(
        "POST",
        f"/{PRIVATE}.git/git-receive-pack",
        user="writer",
        headers={"Content-Type": RECEIVE_REQUEST, "Content-Encoding": "gzip"},
        data=gzip.compress(body)[:-8],  # the whole deflate stream, but no gzip trailer
    )
    assert reply.code == 200
    (event,) = packets(reply.body)
    assert isinstance(event, Packet) and b"truncated" in event.data
    assert h.refs() == before


# -- the spooling request ----------------------------------------------------------------------


def spooling_request(
    max_body: int,
    spool_dir: Path,
    path: bytes = b"/o/r.git/git-receive-pack",
    authorization: bool = True,
    **bounds: int,
) -> Any:
    """A spooling request as the channel makes it: request line and headers seen, body not yet."""
    cls = spooling_request_factory(max_body, str(spool_dir), **bounds)
    channel = DummyChannel()
    channel._path = path
    request = cls(channel)
    if authorization:
        request.requestHeaders.addRawHeader(b"Authorization", b"Basic eDp5")
    return request


@pytest.mark.parametrize(
    "path,authorization,bound",
    [
        (b"/o/r.git/git-receive-pack", True, 1000),
        (b"/o/r.git/git-receive-pack", False, 0),
        (b"/o/r.git/git-upload-pack", False, 100),
        (b"/api/v1/repos", True, 10),
        (b"/o/r.git/info/refs?service=git-upload-pack", True, 0),
        (b"/anything/else", True, 0),
    ],
)
def test_spooling_bound_depends_on_the_endpoint(
    tmp_path: Path, path: bytes, authorization: bool, bound: int
) -> None:
    """Pushes with credentials may bring max_body, upload-pack its own bound, the API its own, else nothing."""
    request = spooling_request(
        1000, tmp_path, path, authorization, max_request_body=100, max_api_body=10
    )
    request.gotLength(None)
    request.handleContentChunk(b"x" * bound)
    assert not request.body_too_large
    request.handleContentChunk(b"x")
    assert request.body_too_large
    request.content.seek(0)
    assert len(request.content.read()) == bound


def file_directory(f: Any) -> str:
    """The directory an (unlinked) temporary file was created in, from /proc."""
    return os.path.dirname(os.readlink(f"/proc/self/fd/{f.fileno()}"))


def test_spooling_request_keeps_a_body_within_the_bound(tmp_path: Path) -> None:
    """A body of a declared length up to max_body is stored whole and not flagged."""
    request = spooling_request(10, tmp_path)
    request.gotLength(10)
    request.handleContentChunk(b"01234")
    request.handleContentChunk(b"56789")
    assert not request.body_too_large
    request.content.seek(0)
    assert request.content.read() == b"0123456789"


def test_spooling_request_refuses_a_declared_length_over_the_bound_without_storing(
    tmp_path: Path,
) -> None:
    """A Content-Length over max_body flags the request at once; none of the body is kept."""
    request = spooling_request(10, tmp_path)
    request.gotLength(11)
    assert request.body_too_large
    request.handleContentChunk(b"0123")
    request.content.seek(0)
    assert request.content.read() == b""


def test_spooling_request_stops_storing_a_chunked_body_past_the_bound(tmp_path: Path) -> None:
    """A body of unknown length is stored until it passes max_body, then flagged and dropped."""
    request = spooling_request(10, tmp_path)
    request.gotLength(None)
    request.handleContentChunk(b"012345")
    assert not request.body_too_large
    request.handleContentChunk(b"6789ab")
    assert request.body_too_large
    request.handleContentChunk(b"more")
    request.content.seek(0)
    assert request.content.read() == b"012345"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to see the file")
def test_spooling_request_spools_large_and_unknown_bodies_in_the_spool_dir(
    tmp_path: Path,
) -> None:
    """Chunked and large bodies go to a temporary file under spool_dir; small ones stay in memory."""
    chunked = spooling_request(1 << 30, tmp_path)
    chunked.gotLength(None)
    assert file_directory(chunked.content) == str(tmp_path)
    large = spooling_request(1 << 30, tmp_path)
    large.gotLength(200_000)
    assert file_directory(large.content) == str(tmp_path)
    small = spooling_request(1 << 30, tmp_path)
    small.gotLength(10)
    assert isinstance(small.content, io.BytesIO)


def raw_http(h: Harness, limits: Limits, spool: Path, request: bytes) -> bytes:
    """Send *request* to a real Site (with the spooling request factory) over a StringTransport."""
    site = make_site(h.app, limits=limits, spool_dir=str(spool))
    site.reactor = Clock()  # the channel's idle timeout must not touch the global reactor
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(request)
    channel.connectionLost(None)
    return transport.value()


def post_head(h: Harness, path: str, content_type: str, extra: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: git.test\r\nAuthorization: {basic(h, 'writer')}\r\n"
        f"Content-Type: {content_type}\r\n{extra}\r\n"
    ).encode()


def test_site_refuses_a_push_body_over_max_pack_bytes_with_413(h: Harness, tmp_path: Path) -> None:
    """Through a real Site, a push over max_pack_bytes is 413 and the ref does not move."""
    before = h.refs()
    body = b"x" * 500
    request = (
        post_head(
            h,
            f"/{PRIVATE}.git/git-receive-pack",
            RECEIVE_REQUEST,
            f"Content-Length: {len(body)}\r\n",
        )
        + body
    )
    out = raw_http(h, Limits(max_pack_bytes=100), tmp_path / "spool", request)
    assert out.startswith(b"HTTP/1.1 413 ")
    assert b"Request body too large" in out
    assert h.refs() == before
    # The site's bound (not the app's, which is larger here) refused it, from the header.
    labels = {"service": "http", "repo_class": "none", "outcome": "too_large"}
    assert h.metric("gitstratum_requests_total", **labels) == 1


def test_site_refuses_a_chunked_push_body_over_max_pack_bytes_with_413(
    h: Harness, tmp_path: Path
) -> None:
    """A chunked push that grows past max_pack_bytes is 413 too, though no length was declared."""
    before = h.refs()
    chunks = b"".join(b"%x\r\n%s\r\n" % (60, b"y" * 60) for _ in range(5)) + b"0\r\n\r\n"
    request = (
        post_head(
            h, f"/{PRIVATE}.git/git-receive-pack", RECEIVE_REQUEST, "Transfer-Encoding: chunked\r\n"
        )
        + chunks
    )
    out = raw_http(h, Limits(max_pack_bytes=100), tmp_path / "spool", request)
    assert out.startswith(b"HTTP/1.1 413 ")
    assert h.refs() == before


def test_site_serves_a_fetch_within_the_bounds(h: Harness, tmp_path: Path) -> None:
    """Through a real Site, an upload-pack request under the bound is answered with refs."""
    body = v2_ls_refs()
    request = (
        post_head(
            h,
            f"/{PRIVATE}.git/git-upload-pack",
            UPLOAD_REQUEST,
            f"Git-Protocol: version=2\r\nContent-Length: {len(body)}\r\n",
        )
        + body
    )
    out = raw_http(h, Limits(max_pack_bytes=1 << 20), tmp_path / "spool", request)
    assert out.startswith(b"HTTP/1.1 200 ")
    assert b"refs/heads/main" in out


def test_store_failure_mid_pack_aborts_the_stream_and_counts_an_error(h: Harness) -> None:
    """A blob lost from the object store ends the fetch with git's band-3 abort, logged as an error."""
    main = bare_head(h)
    blob = git("rev-parse", f"{main}:README.md", cwd=h.source).decode().strip()
    assert h.objects.delete_many([oid(blob)]) == 1
    received: list[bytes] = []
    ended: list[Any] = []
    with capturedLogs() as events:
        responses: list[Any] = []
        h.stub.request(
            "POST",
            f"http://git.test/{PRIVATE}.git/git-upload-pack",
            headers={
                "Authorization": basic(h, "reader"),
                "Content-Type": UPLOAD_REQUEST,
                "Git-Protocol": "version=2",
            },
            data=v2_fetch(main),
        ).addBoth(responses.append)
        h.stub.flush()
        (response,) = responses
        assert response.code == 200  # the status went out before the pack failed
        treq.collect(response, received.append).addBoth(ended.append)
        h.stub.flush()
    body = b"".join(received)
    assert b"\x03" + ABORT_MESSAGE in body
    assert ended, "the response must end rather than hang"
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    labels = {"service": "upload-pack", "repo_class": "private", "outcome": "error"}
    assert h.metric("gitstratum_requests_total", **labels) == 1


def test_pack_responses_raise_the_transport_send_limit() -> None:
    """A streaming response lets its TCP transport send 4 MiB per call; other transports are left alone."""
    from twisted.internet.abstract import FileDescriptor

    from gitstratum.frontend.http import STREAM_SEND_LIMIT, _raise_send_limit

    class Transport:
        SEND_LIMIT = FileDescriptor.SEND_LIMIT

    class Channel:
        transport = Transport()

    class Request:
        channel = Channel()

    request = Request()
    _raise_send_limit(request)  # type: ignore[arg-type]
    assert request.channel.transport.SEND_LIMIT == STREAM_SEND_LIMIT > FileDescriptor.SEND_LIMIT
    assert Transport.SEND_LIMIT == FileDescriptor.SEND_LIMIT  # per transport, not global
    bare = StringTransport()
    channel = type("C", (), {"transport": bare})()
    _raise_send_limit(type("R", (), {"channel": channel})())  # type: ignore[arg-type]
    assert not hasattr(bare, "SEND_LIMIT")


# -- refused from the head, before the body (GitHTTP.admit through GuardedSite) ----------------


def head_only(h: Harness, limits: Limits, spool: Path, head: bytes) -> tuple[bytes, Any]:
    """Send only a request head to a real Site; the output so far and the channel."""
    site = make_site(h.app, limits=limits, spool_dir=str(spool))
    site.reactor = Clock()
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(head)
    return transport.value(), channel


@pytest.mark.parametrize(
    ("who", "endpoint", "status", "message"),
    [
        (None, "git-receive-pack", 401, b"Authentication required."),
        ("bad", "git-receive-pack", 401, b"Invalid username or token."),
        ("stranger", "git-receive-pack", 404, b"Repository not found."),
        ("reader", "git-receive-pack", 403, b"Permission to alice/proj.git denied to reader."),
        (None, "git-upload-pack", 401, b"Authentication required."),
        ("stranger", "git-upload-pack", 404, b"Repository not found."),
    ],
)
def test_a_body_the_caller_may_not_send_is_refused_from_the_head(
    h: Harness, tmp_path: Path, who: str | None, endpoint: str, status: int, message: bytes
) -> None:
    """401/403/404, as the handler would answer, go out before any body byte is read or spooled."""
    auth = ""
    if who is not None:
        auth = f"Authorization: {basic(h, who, 'gst_wrong' if who == 'bad' else None)}\r\n"
    head = (
        f"POST /{PRIVATE}.git/{endpoint} HTTP/1.1\r\nHost: git.test\r\n{auth}"
        f"Content-Type: application/x-{endpoint}-request\r\nContent-Length: {1 << 30}\r\n\r\n"
    ).encode()
    before = h.refs()
    out, channel = head_only(h, Limits(), tmp_path / "spool", head)
    assert out.startswith(b"HTTP/1.1 %d " % status)
    assert out.endswith(message + b"\n")
    assert b"Connection: close" in out
    if status == 401:
        assert b'WWW-Authenticate: Basic realm="GitStratum"' in out
    assert channel.requests == []  # answered and done; no body is awaited
    assert not any((tmp_path / "spool").iterdir())
    assert h.refs() == before
    service = "receive-pack" if endpoint == "git-receive-pack" else "upload-pack"
    labels = {"service": service, "repo_class": "none", "outcome": "denied"}
    assert h.metric("gitstratum_requests_total", **labels) == 1


@pytest.mark.parametrize(
    ("endpoint", "headers", "status"),
    [
        ("git-receive-pack", f"Content-Type: {RECEIVE_REQUEST}\r\nContent-Length: 101", 413),
        ("git-upload-pack", f"Content-Type: {UPLOAD_REQUEST}\r\nContent-Length: 65537", 413),
        ("git-receive-pack", "Content-Type: text/plain\r\nContent-Length: 10", 415),
        ("git-receive-pack", f"Content-Type: {RECEIVE_REQUEST}\r\nContent-Length: 100", None),
    ],
)
def test_an_allowed_caller_is_still_held_to_the_endpoint_limits_from_the_head(
    h: Harness, tmp_path: Path, endpoint: str, headers: str, status: int | None
) -> None:
    """The writer's Content-Length over max_pack_bytes/max_request_bytes is 413, a wrong type 415, at once."""
    limits = Limits(max_pack_bytes=100, max_request_bytes=MAX_REQUEST)
    h.app.limits = limits
    head = post_head(h, f"/{PRIVATE}.git/{endpoint}", "", "")
    head = head.replace(b"Content-Type: \r\n", headers.encode() + b"\r\n")
    out, channel = head_only(h, limits, tmp_path / "spool", head)
    if status is None:
        assert out == b""  # admitted: the body is awaited
        assert channel.requests[-1].content is not None
    else:
        assert out.startswith(b"HTTP/1.1 %d " % status)


def test_a_refused_anonymous_push_lands_nothing_in_the_spool_however_much_it_sends(
    h: Harness, tmp_path: Path
) -> None:
    """After the 401, megabytes more from the client go nowhere: no spool file, no request."""
    head = (
        f"POST /{PRIVATE}.git/git-receive-pack HTTP/1.1\r\nHost: git.test\r\n"
        f"Authorization: {basic(h, 'x', 'gst_wrong')}\r\n"
        f"Content-Type: {RECEIVE_REQUEST}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    out, channel = head_only(h, Limits(), tmp_path / "spool", head)
    assert out.startswith(b"HTTP/1.1 401 ")
    for _ in range(64):
        channel.dataReceived(b"10000\r\n" + b"z" * 0x10000 + b"\r\n")
    assert not any((tmp_path / "spool").iterdir())
    assert channel.requests == []


def test_a_bad_path_with_a_body_is_refused_from_the_head(h: Harness, tmp_path: Path) -> None:
    """A path the git router refuses (400) is refused before its body as well."""
    head = post_head(
        h, "/alice/../etc.git/git-receive-pack", RECEIVE_REQUEST, "Content-Length: 5\r\n"
    )
    out, _ = head_only(h, Limits(), tmp_path / "spool", head)
    assert out.startswith(b"HTTP/1.1 400 ")
