"""The upload-pack service end to end, held to what git's own upload-pack answers.

Each request is fed both to our service (over real LMDB stores filled from a
repository) and to ``git upload-pack --stateless-rpc`` on that repository;
the negotiation and section lines must match and the packs must hold the
same objects (or, where we send less, a clone made from ours must fsck).  A
real git client also clones and fetches through the service over a pipe.
"""

from __future__ import annotations

import os
import sys
import textwrap

import attrs
import pytest

import gitstratum
from gitstratum.core.limits import Limits
from gitstratum.core.oid import ObjectID
from gitstratum.core.pktline import DELIM_PKT, FLUSH_PKT, pkt_line, pkt_lines
from gitstratum.protocol.packgen import MissingObject
from gitstratum.protocol.upload_pack import http_header
from gitstratum.protocol.upload_service import ABORT_MESSAGE, UploadPackService
from gitstratum.storage.interfaces import Repository
from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
from gitstratum.storage.lmdb_objects import LMDBObjectStore
from gitstratum.testing.fixtures import GitCommandError, git, import_git_repo, make_small_repo
from gitstratum.testing.wire import Response, read_response

# no thin-pack: the packs compared here are indexed on their own
CAPS_V0 = b"multi_ack_detailed no-done side-band-64k no-progress ofs-delta agent=git/2.39.5"


@attrs.frozen
class Served:
    """A bare repository, the same history in LMDB stores, and the service over them."""

    src: str
    base: str
    metadata: LMDBMetadataStore
    objects: LMDBObjectStore
    service: UploadPackService
    repo: Repository
    other: Repository

    def rev(self, name: str) -> ObjectID:
        return ObjectID(git("rev-parse", name, cwd=self.src).strip())

    def ours(self, body: bytes, version: int = 2, repo: Repository | None = None) -> bytes:
        return b"".join(self.service.serve(repo or self.repo, body, version=version))

    def gits(self, body: bytes, version: int = 2, src: str | None = None) -> bytes:
        env = {"GIT_PROTOCOL": "version=2"} if version == 2 else None
        try:
            return git("upload-pack", "--stateless-rpc", src or self.src, input=body, env=env)
        except GitCommandError as e:  # git dies after sending ERR; what it sent is the answer
            return e.stdout


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("service"))
    src = make_small_repo(os.path.join(base, "src.git"), commits=8)
    for key, value in (
        ("uploadpack.allowFilter", "true"),
        ("uploadpack.allowRefInWant", "true"),
        ("pack.useSparse", "false"),
    ):
        git("config", key, value, cwd=src)
    metadata = LMDBMetadataStore(os.path.join(base, "metadata"))
    objects = LMDBObjectStore(os.path.join(base, "objects"))
    repo = metadata.create_repository("o/r")
    import_git_repo(src, metadata, objects, repo)
    other_src = os.path.join(base, "other")
    git("clone", "-q", src, other_src)
    git("commit", "-q", "--allow-empty", "-m", "only elsewhere", cwd=other_src)
    other = metadata.create_repository("o/other")
    import_git_repo(os.path.join(other_src, ".git"), metadata, objects, other)
    service = UploadPackService(metadata, objects, Limits())
    yield Served(src, base, metadata, objects, service, repo, other)
    metadata.close()
    objects.close()


# -- reading responses -------------------------------------------------------------


read = read_response


def pack_contents(pack: bytes, where: str) -> set[ObjectID]:
    """The ids in *pack*, as ``git index-pack`` finds them (so the pack is also verified)."""
    git("init", "-q", "--bare", where)
    name = git("index-pack", "--stdin", cwd=where, input=pack).split()[-1].decode()
    idx = os.path.join(where, "objects", "pack", f"pack-{name}.idx")
    with open(idx, "rb") as f:
        listing = git("show-index", input=f.read())
    return {ObjectID(line.split()[1]) for line in listing.splitlines()}


def v2_fetch(*args: str | bytes) -> bytes:
    return (
        pkt_lines("command=fetch\n", "agent=git/2.39.5\n", "object-format=sha1\n")
        + DELIM_PKT
        + pkt_lines(*args)
        + FLUSH_PKT
    )


def v0_body(wants, *, caps=CAPS_V0, lines=(), haves=(), end=b"done") -> bytes:
    """A stateless v0 request like remote-curl's: wants (caps on the first), extra lines, flush, haves, end."""
    body = pkt_line(b"want " + wants[0] + b" " + caps + b"\n")
    body += b"".join(pkt_line(b"want " + w + b"\n") for w in wants[1:])
    body += b"".join(pkt_line(line) for line in lines) + FLUSH_PKT
    body += b"".join(pkt_line(b"have " + h + b"\n") for h in haves)
    if end == b"done":
        body += pkt_line(b"done\n")
    elif end == b"flush":
        body += FLUSH_PKT
    return body


def assert_same_as_git(served: Served, body: bytes, tmp_path, *, version: int = 2) -> Response:
    """Our answer has git's lines and, when a pack comes, the same objects."""
    ours, theirs = read(served.ours(body, version)), read(served.gits(body, version))
    assert ours.lines == theirs.lines
    assert bool(ours.pack) == bool(theirs.pack)
    if theirs.pack:
        assert pack_contents(ours.pack, str(tmp_path / "ours")) == pack_contents(
            theirs.pack, str(tmp_path / "theirs")
        )
    return ours


# -- advertisements ------------------------------------------------------------


def test_v0_advertisement_lists_what_git_lists(served):
    """The v0 ref lines (HEAD, sorted refs, peeled tags) are git's; capabilities are ours."""
    ours = read(served.service.advertise(served.repo, version=0, http=True)).lines
    theirs = read(git("upload-pack", "--advertise-refs", "--stateless-rpc", served.src)).lines
    assert ours[:2] == [b"# service=git-upload-pack", FLUSH_PKT]
    strip = [line.split(b"\0")[0] for line in ours[2:]]
    assert strip == [line.split(b"\0")[0] for line in theirs]
    caps = ours[2].split(b"\0")[1].split()
    assert b"symref=HEAD:refs/heads/main" in caps and b"no-done" in caps
    assert b"no-done" not in served.service.advertise(served.repo, version=0, http=False)


def test_v2_advertisement(served):
    """v2 advertises capabilities only, after HTTP's service header when asked."""
    body = served.service.advertise(served.repo, version=2, http=True)
    lines = read(body).lines
    assert lines[:3] == [b"# service=git-upload-pack", FLUSH_PKT, b"version 2"]
    assert http_header() + served.service.advertise(served.repo, version=2, http=False) == body


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("symrefs\n", "peel\n"),
        (
            "peel\n",
            "symrefs\n",
            "unborn\n",
            "ref-prefix HEAD\n",
            "ref-prefix refs/heads/\n",
            "ref-prefix refs/tags/\n",
        ),
        ("ref-prefix refs/tags/v\n",),
        ("ref-prefix refs/heads/feat\n", "symrefs\n"),
    ],
)
def test_ls_refs_is_byte_identical_to_git(served, args):
    """ls-refs answers exactly what git does, whatever the arguments."""
    body = (
        pkt_lines("command=ls-refs\n", "agent=git/2.39.5\n")
        + DELIM_PKT
        + pkt_lines(*args)
        + FLUSH_PKT
    )
    assert served.ours(body) == served.gits(body)


def test_empty_repository(served, tmp_path):
    """An empty repository advertises capabilities^{} (v0) and an unborn HEAD (v2 ls-refs)."""
    empty = served.metadata.create_repository("o/empty")
    blank = str(tmp_path / "blank.git")
    git("init", "-q", "--bare", "--initial-branch=main", blank)
    v0 = read(served.service.advertise(empty, version=0, http=False)).lines
    assert v0[0].startswith(b"0" * 40 + b" capabilities^{}\0") and v0[1:] == [FLUSH_PKT]
    body = (
        pkt_lines("command=ls-refs\n") + DELIM_PKT + pkt_lines("symrefs\n", "unborn\n") + FLUSH_PKT
    )
    assert served.ours(body, repo=empty) == served.gits(body, src=blank)
    assert read(served.ours(body, repo=empty)).lines == [
        b"unborn HEAD symref-target:refs/heads/main",
        FLUSH_PKT,
    ]


# -- v2 fetch, against git -------------------------------------------------------------


def test_v2_clone(served, tmp_path):
    """A clone of every branch: no sections before the pack, git's objects in the pack."""
    r = assert_same_as_git(
        served,
        v2_fetch(
            "thin-pack\n",
            "no-progress\n",
            "ofs-delta\n",
            b"want %s\n" % served.rev("main"),
            b"want %s\n" % served.rev("feature"),
            "done\n",
        ),
        tmp_path,
    )
    assert r.lines == [b"packfile", FLUSH_PKT]


def test_v2_depth_one(served, tmp_path):
    """deepen 1 gets git's shallow-info section and the tip's tree only."""
    r = assert_same_as_git(
        served,
        v2_fetch(
            "no-progress\n",
            "ofs-delta\n",
            b"want %s\n" % served.rev("main"),
            "deepen 1\n",
            "done\n",
        ),
        tmp_path,
    )
    assert r.lines[:3] == [b"shallow-info", b"shallow " + served.rev("main"), DELIM_PKT]


@pytest.mark.parametrize(
    "extra",
    [
        ["deepen 3\n"],
        ["deepen-since 1700000200\n"],
        ["deepen-not v0.1\n"],
        ["deepen-not refs/heads/feature\n", "deepen-since 1700000100\n"],
        ["include-tag\n"],
        ["filter blob:none\n"],
        ["filter blob:limit=100\n"],
        ["filter tree:0\n"],
    ],
)
def test_v2_fetch_options_match_git(served, tmp_path, extra):
    """Shallow cuts by depth, date and ref, include-tag and filters all give git's answer."""
    body = v2_fetch(
        "no-progress\n", "ofs-delta\n", b"want %s\n" % served.rev("main"), *extra, "done\n"
    )
    assert_same_as_git(served, body, tmp_path)


def test_v2_incremental_fetch_with_done(served, tmp_path):
    """With haves and done there is no acknowledgments section, and only new objects come."""
    body = v2_fetch(
        "no-progress\n",
        b"want %s\n" % served.rev("main"),
        b"have %s\n" % served.rev("main~3"),
        "done\n",
    )
    r = assert_same_as_git(served, body, tmp_path)
    assert r.lines == [b"packfile", FLUSH_PKT]


@pytest.mark.parametrize(
    "haves",
    [["main~3"], ["feature"], ["main~3", "feature"], ["0" * 39 + "1"], ["0" * 39 + "1", "main~6"]],
)
def test_v2_negotiation_round_matches_git(served, tmp_path, haves):
    """Without done: git's ACKs (or NAK), and "ready" with the pack exactly when git is ready."""
    ids = [served.rev(h) if len(h) < 40 else ObjectID(h.encode()) for h in haves]
    body = v2_fetch(
        "no-progress\n", b"want %s\n" % served.rev("main"), *(b"have %s\n" % i for i in ids)
    )
    r = assert_same_as_git(served, body, tmp_path)
    assert r.lines[0] == b"acknowledgments"


def test_v2_wait_for_done_never_ready(served, tmp_path):
    """wait-for-done: acknowledgments and a flush, even when we could have been ready."""
    body = v2_fetch(
        "wait-for-done\n", b"want %s\n" % served.rev("main"), b"have %s\n" % served.rev("main~1")
    )
    r = assert_same_as_git(served, body, tmp_path)
    assert r.lines == [b"acknowledgments", b"ACK " + served.rev("main~1"), FLUSH_PKT]


def test_v2_want_ref(served, tmp_path):
    """want-ref resolves on the server and is answered in a wanted-refs section."""
    body = v2_fetch(
        "no-progress\n", "want-ref refs/heads/feature\n", "want-ref refs/tags/v1.0\n", "done\n"
    )
    r = assert_same_as_git(served, body, tmp_path)
    assert r.lines[:3] == [
        b"wanted-refs",
        served.rev("feature") + b" refs/heads/feature",
        served.rev("refs/tags/v1.0") + b" refs/tags/v1.0",
    ]


def test_v2_shallow_client_deepens(served, tmp_path):
    """A depth-1 client asking for depth 3 is told which commit to unshallow and which are new boundaries."""
    main = served.rev("main")
    body = v2_fetch(
        "no-progress\n",
        b"want %s\n" % main,
        b"have %s\n" % main,
        b"shallow %s\n" % main,
        "deepen 3\n",
        "done\n",
    )
    ours = read(served.ours(body))
    theirs = read(served.gits(body))
    assert ours.lines == theirs.lines
    assert b"unshallow " + main in ours.lines
    # We also leave out what the client's own commits hold, so ours is a subset of git's.
    assert pack_contents(ours.pack, str(tmp_path / "o")) <= pack_contents(
        theirs.pack, str(tmp_path / "t")
    )


def test_v2_thin_pack_completes_against_the_client(served, tmp_path):
    """A thin incremental pack indexes with --fix-thin in a clone that has the haves, and fscks."""
    client = str(tmp_path / "client.git")
    git(
        "clone",
        "-q",
        "--bare",
        "--no-tags",
        "--single-branch",
        "--branch",
        "main",
        served.src,
        client,
    )
    old = served.rev("main~4")
    git("update-ref", "refs/heads/main", old.decode(), cwd=client)
    git("gc", "-q", "--prune=now", cwd=client)
    body = v2_fetch(
        "thin-pack\n",
        "ofs-delta\n",
        "no-progress\n",
        b"want %s\n" % served.rev("main"),
        b"have %s\n" % old,
        "done\n",
    )
    pack = read(served.ours(body)).pack
    git("index-pack", "--stdin", "--fix-thin", cwd=client, input=pack)
    git("update-ref", "refs/heads/main", served.rev("main").decode(), cwd=client)
    git("fsck", "--strict", cwd=client)


# -- v0 stateless, against git ------------------------------------------------------------


def test_v0_clone(served, tmp_path):
    """A v0 clone: NAK, then the pack on band 1, git's objects."""
    r = assert_same_as_git(
        served, v0_body([served.rev("main"), served.rev("feature")]), tmp_path, version=0
    )
    assert r.lines == [b"NAK", FLUSH_PKT]


def test_v0_shallow_round_then_depth_clone(served, tmp_path):
    """deepen's first stateless round is only the shallow list; the next one brings the pack."""
    main = served.rev("main")
    first = v0_body([main], lines=[b"deepen 2\n"], end=b"")
    r = assert_same_as_git(served, first, tmp_path, version=0)
    assert r.lines == [b"shallow " + served.rev("main~1"), FLUSH_PKT] and not r.pack
    assert_same_as_git(served, v0_body([main], lines=[b"deepen 2\n"]), tmp_path, version=0)


@pytest.mark.parametrize(
    "haves, end",
    [
        (["main~2"], b"flush"),
        (["main~2", "feature~1"], b"flush"),
        (["0" * 40], b"flush"),
        (["0" * 40, "main~5"], b"flush"),
        (["main~2"], b"done"),
        ([], b"done"),
    ],
)
@pytest.mark.parametrize(
    "caps", [CAPS_V0, b"multi_ack side-band-64k ofs-delta", b"side-band-64k ofs-delta"]
)
def test_v0_negotiation_matches_git(served, tmp_path, haves, end, caps):
    """Every ACK style (multi_ack_detailed with no-done, multi_ack, none) answers as git does."""
    ids = [served.rev(h) if len(h) < 40 else ObjectID(h.encode()) for h in haves]
    body = v0_body([served.rev("main")], caps=caps + b" no-progress", haves=ids, end=end)
    assert_same_as_git(served, body, tmp_path, version=0)


@pytest.mark.parametrize(
    "lines",
    [[b"deepen-since 1700000200\n"], [b"deepen-not v0.1\n"], [b"deepen 1\n"]],
)
def test_v0_deepen_matches_git(served, tmp_path, lines):
    """v0 shallow cuts (depth, date, ref) send git's shallow list and git's pack."""
    caps = CAPS_V0 + b" deepen-since deepen-not"
    assert_same_as_git(
        served, v0_body([served.rev("main")], caps=caps, lines=lines), tmp_path, version=0
    )


def test_v0_framing(served, tmp_path):
    """side-band packets stay within 1000 bytes; without side-band the raw pack follows the NAK."""
    main = served.rev("main")
    small = served.ours(v0_body([main], caps=b"side-band ofs-delta"), version=0)
    pos = len(pkt_line(b"NAK\n"))
    while pos < len(small):
        n = int(small[pos : pos + 4], 16)
        assert n <= 1000
        pos += n or 4
    raw = served.ours(v0_body([main], caps=b"ofs-delta"), version=0)
    assert raw.startswith(pkt_line(b"NAK\n") + b"PACK")
    assert pack_contents(read(small).pack, str(tmp_path / "a")) == pack_contents(
        raw[8:], str(tmp_path / "b")
    )
    assert read(small).progress.startswith(b"Enumerating objects: ")


# -- errors ------------------------------------------------------------------------


def test_not_our_ref_is_gits_err_packet(served):
    """A want held only by another repository gets git's ERR packet, v0 and v2 alike."""
    elsewhere = ObjectID(git("rev-parse", "HEAD", cwd=os.path.join(served.base, "other")).strip())
    unknown = ObjectID(b"1" * 40)
    v2 = v2_fetch(b"want %s\n" % elsewhere, "done\n")
    assert served.ours(v2) == pkt_line(b"ERR upload-pack: not our ref %s\n" % elsewhere)
    v0 = v0_body([unknown])
    assert served.ours(v0, 0) == pkt_line(b"ERR upload-pack: not our ref %s\n" % unknown)
    # git's packet has no trailing LF; clients strip it either way.
    assert read(served.ours(v2)).lines == read(served.gits(v2)).lines
    assert read(served.ours(v0, 0)).lines == read(served.gits(v0, 0)).lines


@pytest.mark.parametrize(
    "body, message",
    [
        (pkt_lines("command=push\n") + FLUSH_PKT, b"unknown command 'push'"),
        (v2_fetch("want-ref refs/heads/nope\n", "done\n"), b"unknown ref refs/heads/nope"),
        (v2_fetch("filter sparse:oid=x\n"), b"filter 'sparse:oid' not supported"),
        (b"0009want", b"protocol error: unexpected end of stream inside a packet"),
    ],
)
def test_client_mistakes_are_one_err_packet(served, body, message):
    """Whatever the mistake, the whole answer is one ERR packet and nothing is raised."""
    assert list(served.service.serve(served.repo, body, version=2)) == [
        pkt_line(b"ERR " + message + b"\n")
    ]


def test_deepen_selecting_nothing(served):
    """A date cut after every commit is git's "no commits selected for shallow requests"."""
    body = v2_fetch(b"want %s\n" % served.rev("main"), "deepen-since 1900000000\n", "done\n")
    assert served.ours(body) == pkt_line(b"ERR no commits selected for shallow requests\n")


def test_empty_requests_get_empty_answers(served):
    """v2's empty request, a fetch of nothing, and a v0 want-less body are answered with nothing."""
    assert served.ours(b"") == served.ours(FLUSH_PKT) == b""
    assert served.ours(v2_fetch("done\n")) == b""
    assert served.ours(FLUSH_PKT, version=0) == b""


def test_missing_object_aborts_on_band_three(served, tmp_path):
    """If the object store lost an object, the client is told on band 3 and the error propagates."""
    src = make_small_repo(str(tmp_path / "broken.git"), commits=2, branches=False, tags=False)
    metadata = LMDBMetadataStore(str(tmp_path / "m"))
    objects = LMDBObjectStore(str(tmp_path / "o"))
    try:
        repo = metadata.create_repository("o/broken")
        import_git_repo(src, metadata, objects, repo)
        objects.delete_many([ObjectID(git("rev-parse", "HEAD:README.md", cwd=src).strip())])
        service = UploadPackService(metadata, objects, Limits())
        body = v2_fetch(b"want %s\n" % git("rev-parse", "HEAD", cwd=src).strip(), "done\n")
        chunks = service.serve(repo, body, version=2)
        seen = []
        with pytest.raises(MissingObject):
            for chunk in chunks:
                seen.append(chunk)
        assert read(b"".join(seen)).fatal == ABORT_MESSAGE + b"\n"
    finally:
        metadata.close()
        objects.close()


# -- a real git client over a pipe --------------------------------------------------------

SERVER = textwrap.dedent(
    '''
    """Serve protocol v2 upload-pack on stdin/stdout from the stores, as git's --upload-pack."""
    import os
    import sys

    from gitstratum.core.limits import Limits
    from gitstratum.protocol.upload_service import UploadPackService
    from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
    from gitstratum.storage.lmdb_objects import LMDBObjectStore


    def read_request(inp):
        parts = []
        while True:
            head = inp.read(4)
            if len(head) < 4:
                return None
            parts.append(head)
            size = int(head, 16)
            if size == 0:
                return b"".join(parts)
            if size > 4:
                parts.append(inp.read(size - 4))


    if "version=2" not in os.environ.get("GIT_PROTOCOL", ""):
        sys.exit("this helper speaks protocol v2 only")
    metadata, objects = LMDBMetadataStore(sys.argv[1]), LMDBObjectStore(sys.argv[2])
    service = UploadPackService(metadata, objects, Limits())
    repo = metadata.get_repository(sys.argv[3])
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    out.write(service.advertise(repo, version=2, http=False))
    out.flush()
    while (request := read_request(inp)) not in (None, b"0000"):
        for chunk in service.serve(repo, request, version=2):
            out.write(chunk)
        out.flush()
    '''
)


@pytest.fixture
def client(served, tmp_path):
    """Run git against the service: ``client(*args, cwd=...)`` with --upload-pack pointing at it."""
    script = tmp_path / "serve.py"
    script.write_text(SERVER)
    pythonpath = os.path.dirname(os.path.dirname(os.path.abspath(gitstratum.__file__)))
    command = " ".join(
        [
            sys.executable,
            str(script),
            os.path.join(served.base, "metadata"),
            os.path.join(served.base, "objects"),
            "o/r",
        ]
    )
    env = {"PYTHONPATH": pythonpath}

    def run(*args: str, cwd: str | None = None) -> bytes:
        verb, rest = args[0], args[1:]
        return git(
            "-c", "protocol.version=2", verb, f"--upload-pack={command}", *rest, cwd=cwd, env=env
        )

    return run


def test_git_clone_and_fetch_through_the_service(served, client, tmp_path):
    """git clone, then a fetch after the repository moved on, give a complete, fsck-clean clone."""
    dest = str(tmp_path / "clone")
    client("clone", "-q", "file:///served/o/r.git", dest)
    assert git("rev-parse", "origin/main", cwd=dest).strip() == served.rev("main")
    assert git("rev-parse", "v1.0^{}", cwd=dest).strip() == served.rev("main")
    git("fsck", "--strict", cwd=dest)
    # The repository moves on: a new commit on main, imported into the same stores.
    work = str(tmp_path / "work")
    git("clone", "-q", served.src, work)
    with open(os.path.join(work, "NEW.txt"), "w") as f:
        f.write("new\n")
    git("add", "NEW.txt", cwd=work)
    git("commit", "-q", "-m", "new", cwd=work)
    git("push", "-q", served.src, "HEAD:refs/heads/next", cwd=work)
    try:
        import_git_repo(served.src, served.metadata, served.objects, served.repo)
        client("fetch", "-q", "origin", cwd=dest)
        assert (
            git("rev-parse", "origin/next", cwd=dest).strip()
            == git("rev-parse", "HEAD", cwd=work).strip()
        )
        git("fsck", "--strict", cwd=dest)
    finally:
        git("update-ref", "-d", "refs/heads/next", cwd=served.src)
        import_git_repo(served.src, served.metadata, served.objects, served.repo)


def test_git_shallow_clone_deepen_exclude_unshallow(served, client, tmp_path):
    """--depth, --deepen, --shallow-exclude and --unshallow leave git's shallow file right and fsck clean."""
    dest = str(tmp_path / "shallow")
    client("clone", "-q", "--depth=1", "file:///served/o/r.git", dest)
    shallow = os.path.join(dest, ".git", "shallow")

    def boundary() -> set[bytes]:
        return set(open(shallow, "rb").read().split()) if os.path.exists(shallow) else set()

    assert boundary() == {served.rev("main")}
    client("fetch", "-q", "--deepen=2", cwd=dest)
    assert boundary() == {served.rev("main~2")}
    client("fetch", "-q", "--shallow-exclude=v0.1", cwd=dest)
    assert boundary() == {served.rev("main~6")}  # main~7 is v0.1
    git("fsck", cwd=dest)
    client("fetch", "-q", "--unshallow", cwd=dest)
    assert boundary() == set()
    git("fsck", "--strict", cwd=dest)
    assert int(git("rev-list", "--count", "HEAD", cwd=dest)) == int(
        git("rev-list", "--count", "main", cwd=served.src)
    )


def test_git_partial_clone(served, client, tmp_path):
    """A blob:none partial clone gets every commit and tree but no blob."""
    dest = str(tmp_path / "partial")
    client("clone", "-q", "--filter=blob:none", "--no-checkout", "file:///served/o/r.git", dest)
    missing = [
        line
        for line in git("rev-list", "--objects", "--all", "--missing=print", cwd=dest).splitlines()
        if line.startswith(b"?")
    ]
    blobs = git(
        "rev-list",
        "--objects",
        "--all",
        "--filter=blob:none",
        "--filter-print-omitted",
        cwd=served.src,
    )
    omitted = {line[1:] for line in blobs.splitlines() if line.startswith(b"~")}
    assert {line[1:] for line in missing} == omitted and omitted
