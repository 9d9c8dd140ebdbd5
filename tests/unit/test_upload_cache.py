"""The pack cache in the upload-pack path: hits, followers, framing, failures, pre-warm, advertisements.

Everything runs over real LMDB stores filled from a real repository and a
real ``DiskPackCache`` in ``tmp_path``.  The cache builds in its own threads;
a test that starts a build waits for it (``wait_builds``) or reads it to the
end, and builds a test must hold are held on a ``threading.Event``.  Packs
are checked with the real ``git index-pack``.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from gitstratum.cache.disk import DiskPackCache
from gitstratum.cache.interfaces import CacheOutcome
from gitstratum.core.limits import Limits
from gitstratum.core.oid import ObjectID
from gitstratum.core.pktline import DELIM_PKT, FLUSH_PKT, pkt_line, pkt_lines
from gitstratum.frontend.admission import Admission, AdmissionPolicy, Overloaded
from gitstratum.frontend.metrics import Metrics
from gitstratum.frontend.stream import GitBackend, GitStreamProtocol
from gitstratum.frontend.threads import inline_runner
from gitstratum.protocol import receive_pack
from gitstratum.protocol import upload_service as upload_module
from gitstratum.protocol.advertisement_cache import AdvertisementCache
from gitstratum.protocol.ingest import PushProcessor
from gitstratum.protocol.pack_key import PackRequest
from gitstratum.protocol.prewarm import prewarm
from gitstratum.protocol.upload_service import ABORT_MESSAGE, Caller, UploadPackService
from gitstratum.protocol.upload_session import UploadSession
from gitstratum.protocol.walker import RepoView
from gitstratum.storage.interfaces import RefUpdate, Repository
from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
from gitstratum.storage.lmdb_objects import LMDBObjectStore
from gitstratum.testing.fixtures import git, import_git_repo, make_small_repo
from gitstratum.testing.wire import read_response

AGENT = "agent=git/2.39.5\n"
V0_CAPS = "multi_ack_detailed no-done side-band-64k thin-pack ofs-delta agent=git/2.39.5"


# -- the rig ----------------------------------------------------------------------------


class CountingObjects:
    """The real LMDB object store, counting every call made to it (a hit must make none)."""

    def __init__(self, store: LMDBObjectStore):
        self.store = store
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return attr(*args, **kwargs)

        return counted


@attrs.define
class Rig:
    """A repository in LMDB, a disk pack cache, and the upload service over both."""

    src: str
    metadata: LMDBMetadataStore
    objects: CountingObjects
    cache: DiskPackCache
    service: UploadPackService
    repo: Repository
    metrics: Metrics
    cache_dir: str
    enumerations: list[int] = attrs.field(factory=list)

    def rev(self, name: str) -> ObjectID:
        return ObjectID(git("rev-parse", name, cwd=self.src).strip())

    def fetch(self, body: bytes, *, version: int = 2, caller: Caller | None = None) -> bytes:
        out = b"".join(self.service.serve(self.repo, body, version=version, caller=caller))
        self.cache.wait_builds()
        return out

    def counter(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def key_of(self, body: bytes) -> str:
        """The cache key a v2 fetch body plans to (without serving it)."""
        planned = self.service.plan(self.repo, body, version=2)
        assert planned.pack is not None and planned.pack.key is not None
        return planned.pack.key


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_small_repo(str(tmp_path_factory.mktemp("src") / "small.git"), commits=8)


def make_rig(tmp_path: Path, src: str, **service: Any) -> Rig:
    metadata = LMDBMetadataStore(str(tmp_path / "meta"))
    real_objects = LMDBObjectStore(str(tmp_path / "objects"))
    repo = metadata.create_repository("o/r")
    import_git_repo(src, metadata, real_objects, repo)
    metrics = Metrics()
    cache_dir = str(tmp_path / "pack-cache")
    cache = DiskPackCache(cache_dir, max_bytes=1 << 30, on_event=metrics.pack_cache_event)
    objects = CountingObjects(real_objects)
    upload = UploadPackService(
        metadata, objects, Limits(), cache=cache, observer=metrics, **service
    )  # type: ignore[arg-type]
    return Rig(src, metadata, objects, cache, upload, repo, metrics, cache_dir)


@pytest.fixture
def rig(tmp_path: Path, source: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    r = make_rig(tmp_path, source)
    real = upload_module.enumerate_objects

    def counted(*args: Any, **kwargs: Any) -> Any:
        r.enumerations.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(upload_module, "enumerate_objects", counted)
    yield r
    r.cache.close()
    r.metadata.close()
    r.objects.store.close()


# -- requests and responses ---------------------------------------------------------------


def v2_fetch(
    *wants: bytes, depth: int = 0, include_tag: bool = True, progress: bool = False
) -> bytes:
    """A v2 fetch as ``git clone`` sends it (include-tag off: as clone_storm.py sends it)."""
    args = ["thin-pack\n", "ofs-delta\n"]
    if not progress:
        args.append("no-progress\n")
    if include_tag:
        args.append("include-tag\n")
    if depth:
        args.append(f"deepen {depth}\n")
    args += [b"want " + w + b"\n" for w in wants]
    args.append("done\n")
    return (
        pkt_lines("command=fetch\n", AGENT, "object-format=sha1\n")
        + DELIM_PKT
        + pkt_lines(*args)
        + FLUSH_PKT
    )


def v0_fetch(want: bytes, *, caps: str = V0_CAPS, depth: int = 0) -> bytes:
    """A stateless v0 request: the want with capabilities, deepen, flush, done."""
    lines = [b"want " + want + b" " + caps.encode() + b"\n"]
    if depth:
        lines.append(b"deepen %d\n" % depth)
    return pkt_lines(*lines) + FLUSH_PKT + pkt_line("done\n")


read = read_response


def pack_ids(pack: bytes, where: Path) -> set[bytes]:
    """The ids in *pack* as ``git index-pack`` finds them (which also verifies the pack)."""
    git("init", "-q", "--bare", str(where))
    name = git("index-pack", "--stdin", cwd=str(where), input=pack).split()[-1].decode()
    with open(where / "objects" / "pack" / f"pack-{name}.idx", "rb") as f:
        listing = git("show-index", input=f.read())
    return {line.split()[1] for line in listing.splitlines()}


# -- hits skip the work ---------------------------------------------------------------------


def test_a_hit_skips_enumeration_and_never_touches_the_object_store(rig: Rig) -> None:
    """The second identical fetch streams the stored bytes: no enumeration, no object-store call."""
    body = v2_fetch(rig.rev("main"), depth=1)
    first = read(rig.fetch(body))
    assert len(rig.enumerations) == 1 and rig.objects.calls > 0
    calls = rig.objects.calls
    second = read(rig.fetch(body))
    assert len(rig.enumerations) == 1, "a hit must not enumerate"
    assert rig.objects.calls == calls, "a hit must not read the object store"
    assert second.pack == first.pack and second.lines == first.lines
    assert rig.counter("gitstratum_pack_cache_misses_total") == 1
    assert rig.counter("gitstratum_pack_cache_hits_total") == 1
    assert rig.counter("gitstratum_pack_cache_builds_total") == 1
    assert rig.counter("gitstratum_pack_cache_served_bytes_total") == len(first.pack)
    assert rig.counter("gitstratum_pack_cache_build_seconds_count") == 1
    assert rig.counter("gitstratum_pack_cache_cpu_seconds_saved_total") == pytest.approx(
        rig.counter("gitstratum_pack_cache_build_seconds_sum")
    )


def test_one_entry_serves_v2_v0_side_band_and_a_raw_pack_with_identical_bytes(
    rig: Rig, tmp_path: Path
) -> None:
    """v2, v0 side-band-64k, v0 side-band and v0 without side-band share one raw entry, framed per request."""
    main = rig.rev("main")
    v2 = read(rig.fetch(v2_fetch(main, include_tag=False, progress=True)))
    caps = "multi_ack_detailed no-done thin-pack ofs-delta agent=git/2.39.5"
    sb64 = rig.fetch(v0_fetch(main, caps=caps + " side-band-64k"), version=0)
    sb = rig.fetch(v0_fetch(main, caps=caps + " side-band"), version=0)
    raw = rig.fetch(v0_fetch(main, caps=caps), version=0)
    assert len(rig.enumerations) == 1
    assert rig.counter("gitstratum_pack_cache_hits_total") == 3
    packs = [v2.pack, read(sb64).pack, read(sb).pack, read(raw).pack]
    assert len(set(packs)) == 1
    assert raw.endswith(packs[0]) and raw[: -len(packs[0])] == pkt_line("NAK\n")
    # The old side-band carries at most 995 data bytes a packet; 64k up to 65515.
    assert max(int(sb[i : i + 4], 16) for i in _packet_offsets(sb)) <= 1000
    assert v2.progress.startswith(b"Enumerating objects: ")
    assert read(sb64).progress.startswith(b"Reusing cached pack: ")
    assert pack_ids(packs[0], tmp_path / "check") >= {main}


def _packet_offsets(data: bytes) -> Iterator[int]:
    pos = 0
    while pos < len(data):
        yield pos
        n = int(data[pos : pos + 4], 16)
        pos += n if n >= 4 else 4


def test_a_stateful_ssh_session_is_served_from_the_same_entry(rig: Rig) -> None:
    """UploadSession (ssh://, git://) plans to the same key as a stateless fetch and gets a hit."""
    main = rig.rev("main")
    stateless = read(rig.fetch(v0_fetch(main, depth=1), version=0))
    session = UploadSession.open(rig.service, rig.repo)
    session.advertisement()
    section = pkt_lines(f"want {main.decode()} {V0_CAPS}\n", "deepen 1\n") + FLUSH_PKT
    assert session.receive_wants(section)
    planned = session.receive_haves(pkt_line("done\n"))
    out = read(b"".join(rig.service.send(planned)))
    assert out.pack == stateless.pack
    assert rig.counter("gitstratum_pack_cache_hits_total") == 1
    assert len(rig.enumerations) == 1


def test_two_users_and_two_addresses_share_one_entry(rig: Rig) -> None:
    """Who asks never enters the key: a second caller's identical fetch is a hit."""
    body = v2_fetch(rig.rev("feature"), depth=1)
    a = rig.fetch(body, caller=Caller(user="alice", address="10.0.0.1"))
    b = rig.fetch(body, caller=Caller(user="bob", address="10.0.0.2"))
    assert a == b
    assert rig.counter("gitstratum_pack_cache_hits_total") == 1


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(lambda r: v2_fetch(r.rev("main"), depth=2), id="depth"),
        pytest.param(lambda r: v2_fetch(r.rev("feature"), depth=1), id="wants"),
        pytest.param(
            lambda r: (
                v2_fetch(r.rev("main"), depth=1)[:-4] + pkt_line("filter blob:none\n") + FLUSH_PKT
            ),
            id="filter",
        ),
    ],
)
def test_a_different_pack_is_a_different_entry(
    rig: Rig, other: Callable[[Rig], bytes], tmp_path: Path
) -> None:
    """Depth, wants or a filter that change the pack make a second build, never a wrong hit."""
    first = read(rig.fetch(v2_fetch(rig.rev("main"), depth=1)))
    second = read(rig.fetch(other(rig)))
    assert rig.counter("gitstratum_pack_cache_misses_total") == 2
    assert rig.counter("gitstratum_pack_cache_hits_total") == 0
    assert first.pack != second.pack


def test_haves_give_a_different_entry(rig: Rig) -> None:
    """A fetch with common haves is keyed apart from the clone of the same tip."""
    main = rig.rev("main")
    clone = read(rig.fetch(v2_fetch(main)))
    body = v2_fetch(main)[:-4]
    body = body[: body.rindex(pkt_line("done\n"))]
    incremental = (
        body + pkt_line(b"have " + rig.rev("main~3") + b"\n") + pkt_line("done\n") + FLUSH_PKT
    )
    fetched = read(rig.fetch(incremental))
    assert rig.counter("gitstratum_pack_cache_misses_total") == 2
    assert len(fetched.pack) < len(clone.pack)


# -- include-tag ---------------------------------------------------------------------------


def test_include_tag_is_dropped_from_the_key_when_it_cannot_add_a_tag(rig: Rig) -> None:
    """git clone --depth 1 (include-tag) and clone_storm.py (none) share the entry of an untagged tip."""
    feature = rig.rev("feature")
    assert rig.key_of(v2_fetch(feature, depth=1)) == rig.key_of(
        v2_fetch(feature, depth=1, include_tag=False)
    )
    rig.fetch(v2_fetch(feature, depth=1))
    rig.fetch(v2_fetch(feature, depth=1, include_tag=False))
    assert rig.counter("gitstratum_pack_cache_hits_total") == 1


def test_include_tag_that_adds_a_tag_keeps_its_own_entry(rig: Rig, tmp_path: Path) -> None:
    """main's tip carries the annotated v1.0: with include-tag the pack has the tag, without it not."""
    main, tag = rig.rev("main"), rig.rev("v1.0")
    with_tag = read(rig.fetch(v2_fetch(main, depth=1)))
    without = read(rig.fetch(v2_fetch(main, depth=1, include_tag=False)))
    assert rig.counter("gitstratum_pack_cache_misses_total") == 2
    assert tag in pack_ids(with_tag.pack, tmp_path / "a")
    assert tag not in pack_ids(without.pack, tmp_path / "b")


def test_a_tag_pushed_later_is_not_hidden_by_an_older_entry(rig: Rig, tmp_path: Path) -> None:
    """A new annotated tag on a cached tip gives include-tag fetches a new key, and the tag."""
    feature = rig.rev("feature")
    body = v2_fetch(feature)
    before = rig.key_of(body)
    rig.fetch(body)
    copy = str(tmp_path / "copy.git")
    git("clone", "-q", "--mirror", rig.src, copy)
    git("tag", "-a", "-m", "late tag", "late", str(feature.decode()), cwd=copy)
    import_git_repo(copy, rig.metadata, rig.objects.store, rig.repo)
    late = ObjectID(git("rev-parse", "late", cwd=copy).strip())
    assert rig.key_of(body) != before
    fetched = read(rig.fetch(body))
    assert late in pack_ids(fetched.pack, tmp_path / "check")
    assert rig.counter("gitstratum_pack_cache_hits_total") == 0


# -- failures ---------------------------------------------------------------------------------


def test_a_build_failing_before_any_byte_is_retried_uncached(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The cache's build fails at once: the request builds its pack itself; nothing is stored."""
    real = UploadPackService.pack_chunks
    failures: list[int] = []

    def flaky(self: UploadPackService, pack: PackRequest, plan: Any) -> Iterator[bytes]:
        if not failures:
            failures.append(1)
            raise OSError("disk on fire")
        return real(self, pack, plan)

    monkeypatch.setattr(UploadPackService, "pack_chunks", flaky)
    main = rig.rev("main")
    body = v2_fetch(main, depth=1)
    out = read(rig.fetch(body))
    assert out.fatal == b"" and main in pack_ids(out.pack, tmp_path / "check")
    assert failures == [1]
    assert not rig.cache.contains(rig.key_of(body))
    assert rig.service.builds_in_progress() == 0


def test_a_build_failing_after_bytes_went_out_aborts_on_band_three(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Part of the pack was sent when the build failed: git's band-3 abort, the error, no entry."""
    sent_first = threading.Event()

    def failing(self: UploadPackService, pack: PackRequest, plan: Any) -> Iterator[bytes]:
        # More than one side-band packet, so the first goes out before the failure.
        yield b"PACK\x00\x00\x00\x02\x00\x00\x00\x09" + bytes(70000)
        assert sent_first.wait(30)
        raise OSError("store went away")

    monkeypatch.setattr(UploadPackService, "pack_chunks", failing)
    body = v2_fetch(rig.rev("main"), depth=1)
    received: list[bytes] = []
    chunks = rig.service.serve(rig.repo, body, version=2)
    with pytest.raises(upload_module.BuildFailed):
        for chunk in chunks:
            received.append(chunk)
            if chunk.startswith(b"fff0\x01PACK"):
                sent_first.set()
    rig.cache.wait_builds()
    out = read(b"".join(received))
    assert out.pack.startswith(b"PACK") and out.fatal == ABORT_MESSAGE + b"\n"
    assert not rig.cache.contains(rig.key_of(body))
    assert rig.service.builds_in_progress() == 0


def test_a_cache_that_cannot_open_an_entry_still_serves_the_pack(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An OSError from the cache (a full disk) costs the fetch its sharing, never its pack."""

    def broken(self: DiskPackCache, key: str, build: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DiskPackCache, "open", broken)
    main = rig.rev("main")
    with capturedLogs() as events:
        out = read(rig.fetch(v2_fetch(main, depth=1)))
    assert main in pack_ids(out.pack, tmp_path / "check")
    assert [e for e in events if "log_failure" in e]
    assert rig.service.builds_in_progress() == 0


# -- admission while planning ----------------------------------------------------------------


@attrs.define
class Builds:
    """A settable count of builds in progress."""

    running: int = 0

    def __call__(self) -> int:
        return self.running


def test_a_build_at_the_limit_is_refused_but_a_hit_is_served(rig: Rig) -> None:
    """With every build slot taken, a fetch needing a build is Overloaded; a cached one is served."""
    body = v2_fetch(rig.rev("main"), depth=1)
    cached = rig.fetch(body)
    builds = Builds(running=2)
    rig.service.admission = Admission(AdmissionPolicy(max_builds=2), builds_in_progress=builds)
    assert rig.fetch(body) == cached
    with pytest.raises(Overloaded) as refused:
        rig.service.plan(rig.repo, v2_fetch(rig.rev("feature"), depth=1), version=2)
    assert refused.value.reason == "builds"
    # Through serve, which knows nothing of admission, it is one ERR packet.
    err = rig.fetch(v2_fetch(rig.rev("feature"), depth=1))
    assert err.startswith(b"00") and b"ERR server busy: too many pack builds, retry in 5 s" in err
    builds.running = 1
    assert read(rig.fetch(v2_fetch(rig.rev("feature"), depth=1))).pack.startswith(b"PACK")


def test_a_follower_of_a_running_build_skips_the_build_limit(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a build runs, a second identical fetch is admitted to follow it; a different one is not."""
    entered, release = threading.Event(), threading.Event()
    real = UploadPackService.pack_chunks

    def held(self: UploadPackService, pack: PackRequest, plan: Any) -> Iterator[bytes]:
        entered.set()
        assert release.wait(30)
        yield from real(self, pack, plan)

    monkeypatch.setattr(UploadPackService, "pack_chunks", held)
    body = v2_fetch(rig.rev("main"), depth=1)
    first: list[bytes] = []
    builder = threading.Thread(target=lambda: first.append(rig.fetch(body)))
    builder.start()
    try:
        assert entered.wait(30)
        rig.service.admission = Admission(
            AdmissionPolicy(max_builds=1),
            builds_in_progress=lambda: max(
                rig.cache.builds_in_progress(), rig.service.builds_in_progress()
            ),
        )
        follower = rig.service.plan(rig.repo, body, version=2)
        with pytest.raises(Overloaded):
            rig.service.plan(rig.repo, v2_fetch(rig.rev("feature"), depth=1), version=2)
    finally:
        release.set()
        builder.join(60)
    out = read(b"".join(rig.service.send(follower)))
    assert out.pack == read(first[0]).pack
    assert rig.counter("gitstratum_pack_cache_misses_total") == 1
    assert rig.counter("gitstratum_pack_cache_builds_total") == 1


# -- pre-warm -------------------------------------------------------------------------------------


def test_prewarm_covers_git_clone_and_clone_storm_fetches(rig: Rig) -> None:
    """After prewarm of main, git clone (depth 1 and full) and clone_storm.py (both) are hits."""
    outcomes = prewarm(rig.service, rig.repo, [b"refs/heads/main"])
    rig.cache.wait_builds()
    assert set(outcomes.values()) == {CacheOutcome.BUILD}
    enumerated = len(rig.enumerations)
    main = rig.rev("main")
    snapshot = rig.metadata.get_refs(rig.repo).refs
    every = sorted(
        {v for n, v in snapshot.items() if n.startswith((b"refs/heads/", b"refs/tags/"))}
    )
    for body in (
        v2_fetch(main, depth=1),  # git clone --depth 1
        v2_fetch(main, depth=1, include_tag=False),  # clone_storm.py --depth 1
        v2_fetch(*every, include_tag=False),  # git clone
        v2_fetch(main, include_tag=False),  # clone_storm.py --depth 0
    ):
        read(rig.fetch(body))
    assert len(rig.enumerations) == enumerated
    assert rig.counter("gitstratum_pack_cache_hits_total") == 4
    assert rig.counter("gitstratum_pack_cache_misses_total") == 0


def test_prewarm_finishes_depth_one_builds_before_starting_full_ones(rig: Rig) -> None:
    """Full-clone warm-ups start only once no depth-1 warm-up is still building."""
    events: list[str] = []
    cache = rig.cache
    real_warm, real_building = cache.warm, cache.building
    polls = {"left": 3}

    def warm(key: str, build: Any) -> CacheOutcome:
        events.append(f"warm {key}")
        return real_warm(key, build)

    def building(key: str) -> bool:
        # Report the depth-1 builds as still running for a few polls.
        if polls["left"] > 0:
            polls["left"] -= 1
            return True
        return real_building(key)

    def sleep(seconds: float) -> None:
        events.append("sleep")
        cache.wait_builds()

    rig.service.cache = cast(Any, attrs.evolve(_Proxy(cache), warm=warm, building=building))
    prewarm(rig.service, rig.repo, [b"refs/heads/main"], sleep=sleep)
    cache.wait_builds()
    warms = [i for i, e in enumerate(events) if e.startswith("warm")]
    sleeps = [i for i, e in enumerate(events) if e == "sleep"]
    assert len(warms) >= 3 and sleeps
    depth_one = [i for i in warms if i < sleeps[0]]
    full = [i for i in warms if i > sleeps[-1]]
    assert depth_one and full and len(depth_one) + len(full) == len(warms)


@attrs.define
class _Proxy:
    """A pack cache whose warm and building can be replaced, the rest passed through."""

    inner: Any
    warm: Any = None
    building: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_prewarm_is_for_heads_branch_and_matching_refs_only(rig: Rig) -> None:
    """A push to another branch warms nothing, unless a pattern names it."""
    assert prewarm(rig.service, rig.repo, [b"refs/heads/feature"]) == {}
    assert prewarm(rig.service, rig.repo, [b"refs/heads/gone"], ["refs/heads/*"]) == {}
    outcomes = prewarm(rig.service, rig.repo, [b"refs/heads/feature"], ["refs/heads/feat*"])
    rig.cache.wait_builds()
    assert CacheOutcome.BUILD in outcomes.values()
    read(rig.fetch(v2_fetch(rig.rev("feature"), depth=1)))
    assert rig.counter("gitstratum_pack_cache_hits_total") == 1


def test_prewarm_twice_builds_nothing_new(rig: Rig) -> None:
    """A second pre-warm of the same tip finds every pack stored."""
    prewarm(rig.service, rig.repo, [b"refs/heads/main"])
    rig.cache.wait_builds()
    again = prewarm(rig.service, rig.repo, [b"refs/heads/main"])
    assert again and set(again.values()) == {CacheOutcome.HIT}


def test_prewarm_skips_builds_when_admission_has_no_room(rig: Rig) -> None:
    """Pre-warm never waits for, or is refused, a build slot: without one it skips the build."""
    rig.service.admission = Admission(AdmissionPolicy(max_builds=1), builds_in_progress=Builds(1))
    assert prewarm(rig.service, rig.repo, [b"refs/heads/main"]) == {}
    assert rig.counter("gitstratum_pack_cache_builds_total") == 0


def test_a_push_to_main_prewarms_through_the_push_hook(rig: Rig, tmp_path: Path) -> None:
    """PushProcessor's hook hands the updated refs to prewarm; the next depth-1 clone is a hit."""
    work = tmp_path / "work"
    git("clone", "-q", rig.src, str(work))
    (work / "new.txt").write_text("new\n")
    git("add", "new.txt", cwd=str(work))
    git("commit", "-q", "-m", "new", cwd=str(work))
    old, new = rig.rev("main"), ObjectID(git("rev-parse", "HEAD", cwd=str(work)).strip())
    pack = git(
        "pack-objects", "--stdout", "--revs", "-q", cwd=str(work), input=b"%s\n^%s\n" % (new, old)
    )
    warmed: list[tuple[bytes, ...]] = []

    def hook(repo: Repository, updates: tuple[RefUpdate, ...]) -> None:
        names = tuple(u.name for u in updates)
        warmed.append(names)
        prewarm(rig.service, repo, names)

    push = PushProcessor(rig.metadata, rig.objects.store, Limits(), on_refs_updated=hook)
    body = pkt_line(b"%s %s refs/heads/main\x00report-status\n" % (old, new)) + FLUSH_PKT + pack
    request, stream = receive_pack.read_request(io.BytesIO(body), Limits())
    assert push.process(rig.repo, request, stream).ok
    rig.cache.wait_builds()
    assert warmed == [(b"refs/heads/main",)]
    read(rig.fetch(v2_fetch(new, depth=1)))
    assert rig.counter("gitstratum_pack_cache_hits_total") == 1
    assert rig.counter("gitstratum_pack_cache_misses_total") == 0


# -- restart -------------------------------------------------------------------------------------


def test_entries_survive_a_restart_of_the_cache(rig: Rig) -> None:
    """A new cache object on the same directory serves the entry the old one built."""
    body = v2_fetch(rig.rev("main"), depth=1)
    built = rig.fetch(body)
    rig.cache.close()
    rig.cache = DiskPackCache(rig.cache_dir, max_bytes=1 << 30)
    rig.service.cache = rig.cache
    assert rig.fetch(body) == built
    assert rig.counter("gitstratum_pack_cache_hits_total") == 1


# -- advertisements ------------------------------------------------------------------------------


def test_the_v0_advertisement_is_cached_per_ref_version(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second advertisement of unchanged refs is the stored bytes; a ref update makes a new one."""
    peels: list[int] = []
    real = upload_module.ref_peels

    def counted(view: RepoView) -> Any:
        peels.append(1)
        return real(view)

    monkeypatch.setattr(upload_module, "ref_peels", counted)
    first = rig.service.advertise(rig.repo, version=0, http=True)
    assert rig.service.advertise(rig.repo, version=0, http=True) == first
    assert len(peels) == 1
    # Over ssh:// (no no-done) it is another answer, cached apart.
    session = UploadSession.open(rig.service, rig.repo)
    assert b"no-done" not in session.advertisement() and b"no-done" in first
    assert len(peels) == 2
    rig.metadata.update_refs(rig.repo, [RefUpdate(b"refs/heads/extra", None, rig.rev("main"))])
    changed = rig.service.advertise(rig.repo, version=0, http=True)
    assert b"refs/heads/extra" in changed and len(peels) == 3


def test_ls_refs_answers_are_cached_by_request_shape(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ls-refs is answered once per ref version and arguments; the agent does not matter."""
    made: list[int] = []
    real = upload_module.ls_refs_response

    def counted(*args: Any) -> bytes:
        made.append(1)
        return real(*args)

    monkeypatch.setattr(upload_module, "ls_refs_response", counted)

    def ls_refs(agent: str, *args: str) -> bytes:
        return (
            pkt_lines("command=ls-refs\n", f"agent={agent}\n")
            + DELIM_PKT
            + pkt_lines(*args)
            + FLUSH_PKT
        )

    a = rig.fetch(ls_refs("git/2.39.5", "peel\n", "symrefs\n"))
    b = rig.fetch(ls_refs("git/2.45.0", "peel\n", "symrefs\n"))
    c = rig.fetch(ls_refs("git/2.39.5", "ref-prefix refs/tags/\n"))
    assert a == b and c != a
    assert len(made) == 2


def test_the_advertisement_cache_is_bounded() -> None:
    """The LRU keeps at most max_entries answers and max_bytes bytes, dropping the oldest first."""
    cache = AdvertisementCache(max_entries=3, max_bytes=100)
    for i in range(5):
        cache.get(i, lambda i=i: b"x" * 10 + bytes([i]))
    assert len(cache) == 3
    made: list[int] = []
    cache.get(0, lambda: made.append(0) or b"new")
    assert made == [0], "the oldest was dropped"
    cache.get(4, lambda: made.append(4) or b"")
    assert made == [0]
    cache.get("big", lambda: made.append(101) or b"y" * 101)
    cache.get("big", lambda: made.append(101) or b"y" * 101)
    assert made == [0, 101, 101], "an answer over the byte bound is never stored"
    cache.get("fill", lambda: b"z" * 95)
    assert cache.nbytes <= 100


# -- the stream transports ---------------------------------------------------------------------


def test_ssh_and_git_daemon_sessions_stream_from_the_cache(rig: Rig) -> None:
    """GitStreamProtocol (ssh://, git://) v2 and stateful v0 fetches are hits of an HTTP-built entry."""
    main = rig.rev("main")
    built = read(rig.fetch(v2_fetch(main, depth=1, include_tag=False)))  # as v0 asks, below
    backend = GitBackend(
        metadata=rig.metadata,
        upload=rig.service,
        push=PushProcessor(rig.metadata, rig.objects.store, Limits()),
        run=inline_runner,
        limits=Limits(),
        metrics=rig.metrics,
    )
    for version in (2, 0):
        statuses: list[int] = []
        protocol = GitStreamProtocol(
            backend,
            service="upload-pack",
            repo=rig.repo,
            user="u",
            version=version,
            on_done=statuses.append,
        )
        transport = StringTransport()
        protocol.makeConnection(transport)
        transport.clear()
        if version == 2:
            protocol.dataReceived(v2_fetch(main, depth=1, include_tag=False) + FLUSH_PKT)
        else:
            section = pkt_lines(f"want {main.decode()} {V0_CAPS}\n", "deepen 1\n") + FLUSH_PKT
            protocol.dataReceived(section + pkt_line("done\n"))
        rig.cache.wait_builds()
        out = read(transport.value())
        assert out.pack == built.pack, version
        assert statuses == [0]
    assert rig.counter("gitstratum_pack_cache_hits_total") == 2


def test_a_refused_stream_fetch_is_an_err_packet_and_exit_128(rig: Rig) -> None:
    """Over ssh:// and git:// a refused fetch ends the session with ERR server busy."""
    rig.service.admission = Admission(AdmissionPolicy(max_builds=1), builds_in_progress=Builds(1))
    metrics = Metrics()
    backend = GitBackend(
        metadata=rig.metadata,
        upload=rig.service,
        push=PushProcessor(rig.metadata, rig.objects.store, Limits()),
        run=inline_runner,
        limits=Limits(),
        metrics=metrics,
    )
    statuses: list[int] = []
    protocol = GitStreamProtocol(
        backend, service="upload-pack", repo=rig.repo, user="u", version=0, on_done=statuses.append
    )
    transport = StringTransport()
    protocol.makeConnection(transport)
    transport.clear()
    main = rig.rev("main")
    protocol.dataReceived(
        pkt_lines(f"want {main.decode()} {V0_CAPS}\n") + FLUSH_PKT + pkt_line("done\n")
    )
    assert transport.value() == pkt_line("ERR server busy: too many pack builds, retry in 5 s\n")
    assert statuses == [128]
    labels = {"service": "upload-pack", "repo_class": "private", "outcome": "rate_limited"}
    assert metrics.registry.get_sample_value("gitstratum_requests_total", labels) == 1
