"""Property tests of gradledger.ledger.merkle on random logs.

The store is a dict filled only from CompactRange.append, read through a getter
that, like the LMDB store, refuses nodes that reach past the tree size asked for.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradledger.ledger import merkle
from gradledger.ledger.errors import ProofError

SETTINGS = settings(max_examples=60, deadline=None)


def naive_mth(leaf_hashes: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.1 written out literally, independent of the module."""
    if not leaf_hashes:
        return hashlib.sha256(b"").digest()
    if len(leaf_hashes) == 1:
        return leaf_hashes[0]
    k = 1
    while k * 2 < len(leaf_hashes):
        k *= 2
    return hashlib.sha256(
        b"\x01" + naive_mth(leaf_hashes[:k]) + naive_mth(leaf_hashes[k:])
    ).digest()


@dataclass
class Log:
    leaves: list[bytes]
    nodes: dict[tuple[int, int], bytes] = field(default_factory=dict)
    roots: list[bytes] = field(default_factory=list)  # roots[s] = root at size s
    appended: list[list[tuple[int, int, bytes]]] = field(default_factory=list)
    reads: int = 0

    def __post_init__(self) -> None:
        cr = merkle.CompactRange()
        self.roots.append(cr.root())
        for h in self.leaves:
            done = cr.append(h)
            assert done[0] == (0, cr.size - 1, h)
            for level, index, node in done:
                assert (level, index) not in self.nodes
                self.nodes[level, index] = node
            self.appended.append(done)
            self.roots.append(cr.root())
        self.final = cr

    def getter(self, size: int) -> merkle.NodeGetter:
        def get(level: int, index: int) -> bytes:
            assert (index + 1) << level <= size, f"node ({level}, {index}) is beyond size {size}"
            self.reads += 1
            return self.nodes[level, index]

        return get


# Free-form lists find duplicate and empty leaves; the sized form spreads tree
# sizes evenly up to 300, where free-form lists stay mostly short.
leaf_lists = st.one_of(
    st.lists(st.binary(max_size=8), min_size=1, max_size=300),
    st.builds(
        lambda n, salt: [salt + i.to_bytes(2, "big") for i in range(n)],
        st.integers(1, 300),
        st.binary(max_size=4),
    ),
).map(lambda ds: [merkle.leaf_hash(d) for d in ds])


def flips(value: bytes):
    for i in range(len(value) * 8):
        b = bytearray(value)
        b[i // 8] ^= 1 << (i % 8)
        yield bytes(b)


def rejects(fn, *args) -> bool:
    try:
        fn(*args)
    except ProofError:
        return True
    return False


def go_proof_size(index: int, size: int) -> int:
    """transparency-dev/merkle decompInclProof: inner + border."""
    inner = (index ^ (size - 1)).bit_length()
    return inner + bin(index >> inner).count("1")


@SETTINGS
@given(leaf_lists, st.data())
def test_roots_agree(leaves: list[bytes], data: st.DataObject) -> None:
    log = Log(leaves)
    n = len(leaves)
    assert log.final.root() == merkle.root_of(leaves) == naive_mth(leaves)
    for size in range(n + 1):
        log.reads = 0
        assert merkle.root_from_store(size, log.getter(size)) == log.roots[size]
        assert log.reads == size.bit_count()
    for size in data.draw(st.lists(st.integers(0, n), max_size=5)):
        assert log.roots[size] == naive_mth(leaves[:size]) == merkle.root_of(leaves[:size])


@SETTINGS
@given(leaf_lists, st.data())
def test_inclusion(leaves: list[bytes], data: st.DataObject) -> None:
    log = Log(leaves)
    for _ in range(3):
        size = data.draw(st.integers(1, len(leaves)), label="size")
        index = data.draw(st.integers(0, size - 1), label="index")
        root, leaf = log.roots[size], leaves[index]
        log.reads = 0
        proof = merkle.inclusion_proof(index, size, log.getter(size))
        assert log.reads <= 2 * size.bit_length()
        assert len(proof) == go_proof_size(index, size)
        merkle.verify_inclusion(leaf, index, size, proof, root)

        for i, element in enumerate(proof):
            for bad in flips(element):
                assert rejects(merkle.verify_inclusion, leaf, index, size,
                               proof[:i] + [bad] + proof[i + 1:], root)
        assert all(rejects(merkle.verify_inclusion, leaf, index, size, proof, bad)
                   for bad in flips(root))
        assert all(rejects(merkle.verify_inclusion, bad, index, size, proof, root)
                   for bad in flips(leaf))
        extra = data.draw(st.binary(min_size=32, max_size=32), label="extra")
        for i in range(len(proof) + 1):
            assert rejects(merkle.verify_inclusion, leaf, index, size,
                           proof[:i] + [extra] + proof[i:], root)
        for i in range(len(proof)):
            assert rejects(merkle.verify_inclusion, leaf, index, size,
                           proof[:i] + proof[i + 1:], root)
        assert rejects(merkle.verify_inclusion, leaf, size, size, proof, root)
        assert rejects(merkle.verify_inclusion, leaf[:31], index, size, proof, root)


@SETTINGS
@given(leaf_lists, st.data())
def test_consistency(leaves: list[bytes], data: st.DataObject) -> None:
    log = Log(leaves)
    for _ in range(3):
        size2 = data.draw(st.integers(1, len(leaves)), label="size2")
        size1 = data.draw(st.integers(1, size2), label="size1")
        root1, root2 = log.roots[size1], log.roots[size2]
        log.reads = 0
        proof = merkle.consistency_proof(size1, size2, log.getter(size2))
        assert log.reads <= 3 * size2.bit_length()
        merkle.verify_consistency(size1, size2, proof, root1, root2)
        if size1 == size2:
            assert proof == []

        for i, element in enumerate(proof):
            for bad in flips(element):
                assert rejects(merkle.verify_consistency, size1, size2,
                               proof[:i] + [bad] + proof[i + 1:], root1, root2)
        assert all(rejects(merkle.verify_consistency, size1, size2, proof, bad, root2)
                   for bad in flips(root1))
        assert all(rejects(merkle.verify_consistency, size1, size2, proof, root1, bad)
                   for bad in flips(root2))
        extra = data.draw(st.binary(min_size=32, max_size=32), label="extra")
        for i in range(len(proof) + 1):
            assert rejects(merkle.verify_consistency, size1, size2,
                           proof[:i] + [extra] + proof[i:], root1, root2)
        for i in range(len(proof)):
            assert rejects(merkle.verify_consistency, size1, size2,
                           proof[:i] + proof[i + 1:], root1, root2)
        assert rejects(merkle.verify_consistency, size2 + 1, size2, proof, root1, root2)
        assert rejects(merkle.verify_consistency, 0, size2, proof, merkle.EMPTY_ROOT, root2)


@SETTINGS
@given(leaf_lists, st.data())
def test_compact_range_from_store(leaves: list[bytes], data: st.DataObject) -> None:
    log = Log(leaves)
    n = len(leaves)
    size = data.draw(st.integers(0, n), label="size")
    log.reads = 0
    cr = merkle.CompactRange.from_store(size, log.getter(size))
    assert log.reads == size.bit_count()
    assert cr.size == size and cr.root() == log.roots[size]
    twin = merkle.CompactRange(cr.size, cr.peaks)
    copy = cr.copy()
    for i in range(size, n):
        assert cr.append(leaves[i]) == log.appended[i]
        assert cr.root() == log.roots[i + 1]
    assert twin.root() == copy.root() == log.roots[size]  # the copies did not move
    assert copy.size == size and cr.size == n


def test_small_cases_and_argument_errors() -> None:
    leaf = merkle.leaf_hash(b"x")
    assert merkle.inclusion_proof(0, 1, lambda level, i: pytest.fail("read")) == []
    merkle.verify_inclusion(leaf, 0, 1, [], leaf)
    with pytest.raises(ProofError):  # as in Go: a leaf hash of the wrong size, even if it "matches"
        merkle.verify_inclusion(b"abc", 0, 1, [], b"abc")
    assert merkle.consistency_proof(3, 3, lambda level, i: pytest.fail("read")) == []
    with pytest.raises(ValueError):
        merkle.inclusion_proof(1, 1, lambda level, i: leaf)
    with pytest.raises(ValueError):
        merkle.consistency_proof(0, 1, lambda level, i: leaf)
    with pytest.raises(ValueError):
        merkle.subtree_hash(2, 6, lambda level, i: leaf)  # 4 leaves starting at 2: no node
    with pytest.raises(ValueError):
        merkle.CompactRange(3, [leaf])
    with pytest.raises(ValueError):
        merkle.CompactRange().append(b"short")
    for args in [(-1, 1), (2, 1), (0, 0)]:
        with pytest.raises(ProofError):
            merkle.verify_consistency(*args, [], leaf, leaf)
    with pytest.raises(ProofError):
        merkle.verify_inclusion(leaf, -1, 1, [], leaf)
