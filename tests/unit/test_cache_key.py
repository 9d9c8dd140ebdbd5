"""The pack-cache key: equal exactly when two requests would get the same pack bytes.

Requests are parsed from real wire bodies and planned against a real
history (a small repository imported into LMDB stores), the way the
upload-pack service does it, so depth, deepen-since and haves reach the key
through the same shallow plan and negotiation a real fetch goes through.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gitstratum.core.limits import Limits
from gitstratum.core.oid import ObjectID
from gitstratum.core.pktline import DELIM_PKT, FLUSH_PKT, pkt_line, pkt_lines
from gitstratum.protocol.pack_key import ENCODED_FIELDS, PackRequest, cache_key
from gitstratum.protocol.upload_pack import (
    FetchRequest,
    FilterKind,
    ObjectFilter,
    negotiate_v0,
    parse_v0_request,
    parse_v2_request,
    process_haves,
)
from gitstratum.protocol.walker import Negotiator, RepoView, ShallowPlan, compute_shallow
from gitstratum.storage.interfaces import Repository
from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
from gitstratum.storage.lmdb_objects import LMDBObjectStore
from gitstratum.testing.fixtures import git, import_git_repo, make_small_repo


@attrs.frozen
class History:
    src: str
    metadata: LMDBMetadataStore
    repo: Repository

    def rev(self, name: str) -> ObjectID:
        return ObjectID(git("rev-parse", name, cwd=self.src).strip())


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
    base = str(tmp_path_factory.mktemp("key"))
    src = make_small_repo(os.path.join(base, "src.git"), commits=8)
    metadata = LMDBMetadataStore(os.path.join(base, "metadata"), map_size=1 << 28)
    objects = LMDBObjectStore(os.path.join(base, "objects"), map_size=1 << 28)
    repo = metadata.create_repository("o/r")
    import_git_repo(src, metadata, objects, repo)
    yield History(src, metadata, repo)
    metadata.close()
    objects.close()


def v2_body(*args: str | bytes, agent: str = "git/2.39.5") -> bytes:
    return (
        pkt_lines("command=fetch\n", f"agent={agent}\n", "object-format=sha1\n")
        + DELIM_PKT
        + pkt_lines(*args)
        + FLUSH_PKT
    )


def v0_body(wants: list[bytes], caps: bytes, haves: tuple[bytes, ...] = ()) -> bytes:
    body = pkt_line(b"want " + wants[0] + b" " + caps + b"\n")
    body += b"".join(pkt_line(b"want " + w + b"\n") for w in wants[1:]) + FLUSH_PKT
    body += b"".join(pkt_line(b"have " + h + b"\n") for h in haves)
    return body + pkt_line(b"done\n")


def planned(history: History, body: bytes, *, version: int = 2) -> PackRequest:
    """The PackRequest upload-pack plans for *body* (negotiated, shallow plan computed)."""
    limits = Limits()
    if version == 2:
        request = parse_v2_request(body, limits)
        assert isinstance(request, FetchRequest)
    else:
        request = parse_v0_request(body, limits)
    view = RepoView.open(history.metadata, history.repo)
    wants = list(request.wants)
    shallow = compute_shallow(view, request, wants)
    negotiator = Negotiator(view, [*wants, *shallow.extra_wants])
    negotiator.prefetch(request.haves)
    if version == 2:
        process_haves(request.haves, negotiator)
    else:
        negotiate_v0(request, negotiator)
    return PackRequest.of(request, wants, negotiator.have_objs, shallow)


def key_of(history: History, *args: str | bytes) -> str:
    return cache_key(history.repo, planned(history, v2_body(*args, "done\n")))


def want(history: History, name: str = "main") -> str:
    return f"want {history.rev(name).decode()}\n"


# -- what the key is made of ------------------------------------------------------


def test_the_key_encodes_every_field_that_decides_a_pack() -> None:
    """Every PackRequest and ShallowPlan field is encoded: a new one must be added to the key."""
    assert set(attrs.fields_dict(PackRequest)) == ENCODED_FIELDS
    assert set(attrs.fields_dict(ShallowPlan)) == {
        "shallow",
        "unshallow",
        "client",
        "extra_wants",
        "cut",
    }


def test_identical_requests_share_a_key(history: History) -> None:
    """The same clone asked twice gets the same key, a hex SHA-256."""
    args = (want(history), "ofs-delta\n", "thin-pack\n", "deepen 1\n")
    one, two = key_of(history, *args), key_of(history, *args)
    assert one == two
    assert re.fullmatch(r"[0-9a-f]{64}", one)


def test_who_asks_and_how_it_is_framed_stay_out(history: History) -> None:
    """Agent, progress, side-band and protocol version (all that differs between two users'
    clients) leave the key alone, as does looking the repository up again."""
    tip = history.rev("main")
    v2 = planned(history, v2_body(want(history), "ofs-delta\n", "include-tag\n", "done\n"))
    v2_other = planned(
        history,
        v2_body(
            want(history), "ofs-delta\n", "include-tag\n", "no-progress\n", "done\n", agent="jgit/6"
        ),
    )
    v0 = planned(
        history,
        v0_body([tip], b"multi_ack_detailed side-band-64k ofs-delta include-tag agent=git/2.39.5"),
        version=0,
    )
    v0_raw = planned(history, v0_body([tip], b"ofs-delta include-tag no-progress"), version=0)
    again = history.metadata.get_repository("o/r")
    assert again is not None
    keys = {cache_key(history.repo, p) for p in (v2, v2_other, v0, v0_raw)}
    keys.add(cache_key(again, v2))
    assert len(keys) == 1


def test_wants_are_a_set(history: History) -> None:
    """Wants in another order, or repeated, are the same request."""
    a, b = want(history, "main"), want(history, "feature")
    assert key_of(history, a, b) == key_of(history, b, a, b)


@pytest.mark.parametrize(
    "extra",
    [
        ["deepen 1\n"],
        ["deepen 2\n"],
        ["deepen-since 1700000300\n"],
        ["deepen-since 1700000200\n"],
        ["deepen-not refs/heads/feature\n"],
        ["filter blob:none\n"],
        ["filter blob:limit=1k\n"],
        ["filter tree:0\n"],
        ["ofs-delta\n"],
        ["include-tag\n"],
    ],
)
def test_what_changes_the_pack_changes_the_key(history: History, extra: list[str]) -> None:
    """Depth, deepen-since, deepen-not, each filter, ofs-delta and include-tag each make their own key."""
    plain = key_of(history, want(history))
    assert key_of(history, want(history), *extra) != plain


def test_each_variant_is_distinct(history: History) -> None:
    """No two of the depth/filter/capability variants collide with each other."""
    variants = [
        ["deepen 1\n"],
        ["deepen 2\n"],
        ["deepen-since 1700000240\n"],
        ["deepen-not refs/heads/feature\n"],
        ["filter blob:none\n"],
        ["filter blob:limit=1k\n"],
        ["filter tree:0\n"],
        ["ofs-delta\n"],
        ["include-tag\n"],
        ["ofs-delta\n", "include-tag\n"],
    ]
    keys = {key_of(history, want(history), *v) for v in variants}
    assert len(keys) == len(variants)


def test_deepen_arguments_are_keyed_by_the_cut_they_make(history: History) -> None:
    """deepen-since and deepen-not that cut history at the same commit ask for the same pack.

    (Commits 5 to 7 of main are newer than 1700000300 and not reachable from
    feature, which forks at commit 4.)
    """
    since = key_of(history, want(history), "deepen-since 1700000300\n")
    assert since == key_of(history, want(history), "deepen-not refs/heads/feature\n")
    assert since == key_of(history, want(history), "deepen 3\n")


def test_filters_are_keyed_by_their_canonical_spec(history: History) -> None:
    """blob:limit=1k and blob:limit=1024 are one filter, so one key."""
    assert key_of(history, want(history), "filter blob:limit=1k\n") == key_of(
        history, want(history), "filter blob:limit=1024\n"
    )


def test_differing_wants_or_haves_differ(history: History) -> None:
    """Another want, or a different set of common haves, is another pack."""
    base = key_of(history, want(history))
    assert key_of(history, want(history, "feature")) != base
    first = history.rev("main~5").decode()
    second = history.rev("main~3").decode()
    with_first = key_of(history, want(history), f"have {first}\n")
    with_second = key_of(history, want(history), f"have {second}\n")
    assert len({base, with_first, with_second}) == 3


def test_unknown_haves_do_not_split_the_key(history: History) -> None:
    """Haves we do not hold are not common, so they do not enter the key."""
    unknown = "1" * 40
    assert key_of(history, want(history), f"have {unknown}\n") == key_of(history, want(history))


def test_repository_and_acl_class_are_in_the_key(history: History) -> None:
    """The same request of another repository, or of the same one made public, is another key."""
    pack = planned(history, v2_body(want(history), "done\n"))
    base = cache_key(history.repo, pack)
    assert cache_key(attrs.evolve(history.repo, id=history.repo.id + 1), pack) != base
    assert cache_key(attrs.evolve(history.repo, public=True), pack) != base
    # The name and HEAD are not: ids are never reused, and HEAD is not in a pack.
    assert (
        cache_key(attrs.evolve(history.repo, name="o/renamed", head=b"refs/heads/x"), pack) == base
    )


# -- thin-pack normalisation --------------------------------------------------------


def test_thin_pack_is_irrelevant_to_a_full_clone(history: History) -> None:
    """With no haves and no shallow commits a thin pack is a whole one: one key for both."""
    assert key_of(history, want(history), "thin-pack\n") == key_of(history, want(history))
    assert key_of(history, want(history), "thin-pack\n", "deepen 1\n") == key_of(
        history, want(history), "deepen 1\n"
    )


def test_thin_pack_matters_with_haves(history: History) -> None:
    """A fetch with common haves may get deltas against them, so thin-pack splits the key."""
    have = f"have {history.rev('main~3').decode()}\n"
    assert key_of(history, want(history), have, "thin-pack\n") != key_of(
        history, want(history), have
    )


def test_thin_pack_matters_for_a_shallow_client(history: History) -> None:
    """A shallow client's deepening fetch may get deltas against what it has."""
    shallow = f"shallow {history.rev('main~2').decode()}\n"
    thin = key_of(history, want(history), shallow, "deepen 4\n", "thin-pack\n")
    assert thin != key_of(history, want(history), shallow, "deepen 4\n")


# -- a pure function of the normalised material --------------------------------------

oids = st.binary(min_size=20, max_size=20).map(lambda b: ObjectID(b.hex().encode()))
id_lists = st.lists(oids, max_size=4)
filters = st.none() | st.builds(
    ObjectFilter,
    st.sampled_from(list(FilterKind)),
    st.integers(0, 1 << 40),
).map(lambda f: f if f is None or f.kind is FilterKind.BLOB_LIMIT else ObjectFilter(f.kind))


@st.composite
def requests(draw: st.DrawFn) -> tuple[Repository, PackRequest]:
    repo = Repository(draw(st.integers(1, 3)), "o/r", public=draw(st.booleans()))
    shallow = ShallowPlan(
        shallow=tuple(draw(id_lists)),
        unshallow=tuple(draw(id_lists)),
        client=tuple(draw(id_lists)),
        extra_wants=tuple(draw(id_lists)),
        cut=frozenset(draw(id_lists)),
    )
    pack = PackRequest(
        wants=tuple(draw(id_lists)),
        haves=tuple(draw(id_lists)),
        shallow=shallow,
        filter=draw(filters),
        include_tag=draw(st.booleans()),
        ofs_delta=draw(st.booleans()),
        thin_pack=draw(st.booleans()),
    )
    return repo, pack


def normalised(repo: Repository, pack: PackRequest) -> tuple[object, ...]:
    """What the key is meant to be a function of, written out independently of its encoding."""
    s = pack.shallow
    return (
        repo.id,
        repo.public,
        frozenset(pack.wants),
        frozenset(pack.haves),
        frozenset(s.shallow),
        frozenset(s.unshallow),
        frozenset(s.client),
        frozenset(s.extra_wants),
        s.cut,
        None if pack.filter is None else pack.filter.spec,
        pack.include_tag,
        pack.ofs_delta,
        pack.thin_pack and bool(pack.haves or s.client),
    )


@given(requests(), st.randoms(use_true_random=False))
def test_key_ignores_order_and_repeats(
    request: tuple[Repository, PackRequest], rng: random.Random
) -> None:
    """Shuffling or repeating any id list leaves the key as it was."""
    repo, pack = request

    def scramble(ids: tuple[ObjectID, ...]) -> tuple[ObjectID, ...]:
        out = list(ids) + [i for i in ids if rng.random() < 0.5]
        rng.shuffle(out)
        return tuple(out)

    s = pack.shallow
    twin = attrs.evolve(
        pack,
        wants=scramble(pack.wants),
        haves=scramble(pack.haves),
        shallow=attrs.evolve(
            s,
            shallow=scramble(s.shallow),
            unshallow=scramble(s.unshallow),
            client=scramble(s.client),
            extra_wants=scramble(s.extra_wants),
        ),
    )
    assert cache_key(repo, twin) == cache_key(repo, pack)


@given(requests())
def test_thin_pack_only_counts_with_something_to_thin_against(
    request: tuple[Repository, PackRequest],
) -> None:
    """thin-pack changes the key exactly when there are haves or client shallows."""
    repo, pack = request
    thin = cache_key(repo, attrs.evolve(pack, thin_pack=True))
    whole = cache_key(repo, attrs.evolve(pack, thin_pack=False))
    assert (thin == whole) == (not pack.haves and not pack.shallow.client)


@given(requests(), requests())
def test_key_equal_exactly_when_material_equal(
    one: tuple[Repository, PackRequest], two: tuple[Repository, PackRequest]
) -> None:
    """Two requests share a key if and only if their normalised material is the same."""
    assert (cache_key(*one) == cache_key(*two)) == (normalised(*one) == normalised(*two))


@given(requests(), st.data())
def test_changing_any_one_part_changes_the_key(
    request: tuple[Repository, PackRequest], data: st.DataObject
) -> None:
    """Altering one part of the material (when that alters the material) alters the key."""
    repo, pack = request
    other_repo, other_pack = data.draw(requests())
    part = data.draw(st.sampled_from(["repo", "wants", "haves", "shallow", "filter", "flags"]))
    if part == "repo":
        repo2, pack2 = other_repo, pack
    elif part in ("wants", "haves", "shallow", "filter"):
        repo2, pack2 = repo, attrs.evolve(pack, **{part: getattr(other_pack, part)})
    else:
        repo2 = repo
        pack2 = attrs.evolve(
            pack,
            include_tag=other_pack.include_tag,
            ofs_delta=other_pack.ofs_delta,
            thin_pack=other_pack.thin_pack,
        )
    same = normalised(repo, pack) == normalised(repo2, pack2)
    assert (cache_key(repo, pack) == cache_key(repo2, pack2)) == same
