"""The streaming pack writer: entry encoding, verbatim copies, counting and the trailer."""

from __future__ import annotations

import hashlib
import io
import subprocess
import zlib

import pytest
from dulwich.object_format import SHA1
from dulwich.objects import Blob, Tree
from dulwich.pack import OFS_DELTA, REF_DELTA, Pack, PackData, PackStreamReader, create_delta
from hypothesis import given, settings
from hypothesis import strategies as st

from gitstratum.core.objects import ObjectType, PackReadyObject
from gitstratum.core.oid import ObjectID
from gitstratum.core.pack import PackWriter, PackWriterError


def blob(data: bytes) -> tuple[ObjectID, bytes]:
    return ObjectID(Blob.from_string(data).id), data


def whole_record(data: bytes, level: int = 6) -> PackReadyObject:
    oid, raw = blob(data)
    return PackReadyObject(oid, ObjectType.BLOB, len(raw), len(raw), zlib.compress(raw, level))


def delta_record(base: bytes, target: bytes, depth: int = 1) -> PackReadyObject:
    delta = b"".join(create_delta(base, target))
    oid, raw = blob(target)
    return PackReadyObject(
        oid,
        ObjectType.BLOB,
        len(raw),
        len(delta),
        zlib.compress(delta, 9),
        delta_base=blob(base)[0],
        depth=depth,
    )


def write(writer: PackWriter, *entries: list[bytes]) -> bytes:
    return b"".join(b for chunks in entries for b in chunks)


BASE = b"".join(b"line %d of the base text\n" % i for i in range(200))
TARGET = BASE.replace(b"line 17 ", b"LINE seventeen ") + b"an appended line\n"
OTHER = TARGET.replace(b"line 150", b"line one-fifty")


def delta_pack(ofs: bool) -> tuple[bytes, list[PackReadyObject]]:
    base = whole_record(BASE)
    mid = delta_record(BASE, TARGET)
    top = delta_record(TARGET, OTHER, depth=2)
    w = PackWriter(3)
    parts = [w.header()]
    parts += w.add_stored(base)
    for rec in (mid, top):
        if ofs:
            base_offset = w.offset_of(rec.delta_base)  # type: ignore[arg-type]
            parts += w.add_stored(rec, ofs_base_offset=base_offset)
        else:
            parts += w.add_stored(rec, ref_base=True)
    parts.append(w.trailer())
    return b"".join(parts), [base, mid, top]


def git_index(tmp_path, pack: bytes, *extra: str) -> subprocess.CompletedProcess[bytes]:
    repo = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    return subprocess.run(
        ["git", "-C", str(repo), "index-pack", "--stdin", "--strict", *extra],
        input=pack,
        capture_output=True,
    )


def test_header_and_trailer_frame_the_pack():
    """The header announces version 2 and the count; the trailer is the SHA-1 of all before it."""
    w = PackWriter(1)
    head = w.header()
    assert head == b"PACK\x00\x00\x00\x02\x00\x00\x00\x01"
    entry = w.add_whole(blob(b"hello\n")[0], ObjectType.BLOB, b"hello\n", 6)
    body = head + b"".join(entry)
    assert w.offset == len(body)
    trailer = w.trailer()
    assert trailer == hashlib.sha1(body).digest()
    assert w.offset == len(body) + 20


@pytest.mark.parametrize("ofs", [True, False])
def test_delta_entries_decode_with_dulwich(tmp_path, ofs):
    """OFS_DELTA and REF_DELTA entries written from records resolve to the right objects."""
    pack, records = delta_pack(ofs)
    path = tmp_path / "x.pack"
    path.write_bytes(pack)
    with PackData(str(path), SHA1) as data:
        data.check()
        kinds = [u.pack_type_num for u in data.iter_unpacked()]
        data.create_index(str(tmp_path / "x.idx"))
    assert kinds == [ObjectType.BLOB] + [OFS_DELTA if ofs else REF_DELTA] * 2
    with Pack(str(tmp_path / "x"), object_format=SHA1) as p:
        got = {o.id: o.as_raw_string() for o in p.iterobjects()}
    assert got == {blob(BASE)[0]: BASE, blob(TARGET)[0]: TARGET, blob(OTHER)[0]: OTHER}


@pytest.mark.parametrize("ofs", [True, False])
def test_git_index_pack_accepts_written_pack(tmp_path, ofs):
    """Real git indexes the writer's output strictly and reads every object back."""
    pack, records = delta_pack(ofs)
    result = git_index(tmp_path, pack)
    assert result.returncode == 0, result.stderr
    for rec, body in zip(records, (BASE, TARGET, OTHER), strict=True):
        shown = subprocess.run(
            ["git", "-C", str(tmp_path / "repo.git"), "cat-file", "blob", rec.oid.decode()],
            capture_output=True,
            check=True,
        ).stdout
        assert shown == body


def test_stored_bytes_are_copied_verbatim():
    """add_stored emits the record's compressed bytes unchanged, even at an unusual level."""
    rec = whole_record(BASE, level=1)
    w = PackWriter(1)
    w.header()
    head, compressed = w.add_stored(rec)
    assert compressed == rec.compressed == zlib.compress(BASE, 1)
    assert compressed != zlib.compress(BASE, 6)
    assert (head[0] >> 4) & 7 == ObjectType.BLOB


def test_offsets_are_recorded_per_object():
    """offset_of gives each entry's start, and None for objects not yet written."""
    a, b = whole_record(b"a\n"), whole_record(b"b\n")
    w = PackWriter(2)
    w.header()
    assert w.offset_of(a.oid) is None
    first = w.offset
    w.add_stored(a)
    second = w.offset
    w.add_stored(b)
    assert (w.offset_of(a.oid), w.offset_of(b.oid)) == (first, second) == (12, second)
    assert second > first


def test_ofs_delta_offset_is_relative_to_entry_start():
    """An OFS_DELTA header encodes the distance back to its base's entry."""
    pack, _ = delta_pack(True)
    reader = PackStreamReader(hashlib.sha1, io.BytesIO(pack).read)
    unpacked = list(reader.read_objects())
    assert unpacked[1].delta_base == unpacked[1].offset - unpacked[0].offset
    assert unpacked[2].delta_base == unpacked[2].offset - unpacked[1].offset


def test_ref_delta_names_base_in_binary():
    """A REF_DELTA header carries the 20-byte binary id of the base."""
    pack, records = delta_pack(False)
    unpacked = list(PackStreamReader(hashlib.sha1, io.BytesIO(pack).read).read_objects())
    assert unpacked[1].delta_base == bytes.fromhex(records[0].oid.decode())


def test_too_few_objects_before_trailer_is_refused():
    """The trailer refuses to close a pack with fewer entries than announced."""
    w = PackWriter(2)
    w.header()
    w.add_stored(whole_record(b"x"))
    with pytest.raises(PackWriterError, match="announced 2 objects but 1"):
        w.trailer()


def test_too_many_objects_is_refused():
    """An entry beyond the announced count is refused."""
    w = PackWriter(1)
    w.header()
    w.add_stored(whole_record(b"x"))
    with pytest.raises(PackWriterError, match="one more"):
        w.add_stored(whole_record(b"y"))


def test_calls_out_of_order_are_refused():
    """Entries need a header first; header and trailer come once; nothing follows the trailer."""
    w = PackWriter(0)
    with pytest.raises(PackWriterError, match="no header"):
        w.add_stored(whole_record(b"x"))
    with pytest.raises(PackWriterError, match="no header"):
        w.trailer()
    w.header()
    with pytest.raises(PackWriterError, match="twice"):
        w.header()
    w.trailer()
    with pytest.raises(PackWriterError, match="twice"):
        w.trailer()
    with pytest.raises(PackWriterError, match="after the trailer"):
        w.add_whole(blob(b"x")[0], ObjectType.BLOB, b"x", 6)


def test_delta_needs_exactly_one_base_form():
    """A delta record needs OFS or REF, not neither nor both; a whole record takes neither."""
    w = PackWriter(3)
    w.header()
    base = whole_record(BASE)
    w.add_stored(base)
    delta = delta_record(BASE, TARGET)
    with pytest.raises(PackWriterError, match="give ofs_base_offset or ref_base"):
        w.add_stored(delta)
    with pytest.raises(PackWriterError, match="not both"):
        w.add_stored(delta, ofs_base_offset=12, ref_base=True)
    with pytest.raises(PackWriterError, match="not a delta"):
        w.add_stored(whole_record(b"z"), ref_base=True)
    with pytest.raises(PackWriterError, match="not an earlier entry"):
        w.add_stored(delta, ofs_base_offset=w.offset)
    with pytest.raises(PackWriterError, match="not an earlier entry"):
        w.add_stored(delta, ofs_base_offset=3)
    assert w.written == 1


def test_empty_pack_is_valid(tmp_path):
    """A pack of no objects is a header and a trailer that git accepts."""
    w = PackWriter(0)
    pack = w.header() + w.trailer()
    assert len(pack) == 32
    result = git_index(tmp_path, pack)
    assert result.returncode == 0, result.stderr


def test_whole_objects_of_every_type(tmp_path):
    """add_whole writes trees as well as blobs, and git reads them back."""
    oid, raw = blob(b"content\n")
    tree = Tree()
    tree.add(b"file.txt", 0o100644, oid)
    w = PackWriter(2)
    pack = (
        w.header()
        + write(
            w,
            w.add_whole(oid, ObjectType.BLOB, raw, 6),
            w.add_whole(ObjectID(tree.id), ObjectType.TREE, tree.as_raw_string(), 9),
        )
        + w.trailer()
    )
    result = git_index(tmp_path, pack)
    assert result.returncode == 0, result.stderr
    listed = subprocess.run(
        ["git", "-C", str(tmp_path / "repo.git"), "ls-tree", tree.id.decode()],
        capture_output=True,
        check=True,
    ).stdout
    assert listed == b"100644 blob " + oid + b"\tfile.txt\n"


@settings(max_examples=50, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=3000), max_size=12),
    level=st.integers(min_value=0, max_value=9),
)
def test_roundtrip_through_dulwich(bodies, level):
    """Any objects written whole at any level come back from dulwich's stream reader intact."""
    w = PackWriter(len(bodies))
    out = [w.header()]
    for body in bodies:
        out += w.add_whole(blob(body)[0], ObjectType.BLOB, body, level)
    out.append(w.trailer())
    pack = b"".join(out)
    reader = PackStreamReader(hashlib.sha1, io.BytesIO(pack).read)
    got = [b"".join(u.decomp_chunks) for u in reader.read_objects()]
    assert got == bodies
    assert pack[-20:] == hashlib.sha1(pack[:-20]).digest()


def test_refuses_impossible_counts():
    """The count must fit the header's 32 bits."""
    with pytest.raises(ValueError):
        PackWriter(-1)
    with pytest.raises(ValueError):
        PackWriter(1 << 32)
