"""RFC 9162 (Certificate Transparency v2) Merkle tree: hashing, proofs, verification.

The hashing is that of RFC 6962, unchanged in RFC 9162 section 2.1.1, so the
cross-implementation vectors of transparency-dev/merkle apply as they are. Each
function names the rule of RFC 9162 it follows. The verifiers also enforce the
preconditions of the Go ``proof`` package (VerifyInclusion / VerifyConsistency)
as the transparency-dev vectors pin them, so they accept exactly the cases
those vectors accept.

Proof generation never needs the whole log in memory: it reads hashes of perfect
subtrees through a ``NodeGetter`` (an LMDB store in practice), O(log n) of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from .errors import ProofError

__all__ = [
    "EMPTY_ROOT", "HASH_SIZE", "LEAF_PREFIX", "NODE_PREFIX", "CompactRange", "NodeGetter",
    "consistency_proof", "inclusion_proof", "leaf_hash", "node_hash", "root_from_store",
    "root_of", "subtree_hash", "verify_consistency", "verify_inclusion",
]

#: RFC 9162 section 2.1.1: leaf and interior hashes get different one-byte
#: prefixes, so no leaf can be passed off as an interior node (second preimage).
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
#: SHA-256 output size; RFC 9162 section 2.1.1 fixes HASH to SHA-256 here.
HASH_SIZE = 32
#: RFC 9162 section 2.1.1: MTH({}) = HASH(), the hash of the empty string.
EMPTY_ROOT = hashlib.sha256(b"").digest()

#: ``get_node(level, index)`` returns the hash of the perfect subtree over leaves
#: ``[index << level, (index + 1) << level)``; level 0 holds the leaf hashes.
NodeGetter = Callable[[int, int], bytes]


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 section 2.1.1: MTH({d(0)}) = HASH(0x00 || d(0))."""
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 section 2.1.1: HASH(0x01 || MTH(D[0:k]) || MTH(D[k:n]))."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """RFC 9162 section 2.1.1: k, the largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def _fold(peaks: Sequence[bytes]) -> bytes:
    # The MTH split always puts the largest perfect subtree on the left, so a
    # range made of decreasing perfect pieces hashes right to left.
    h = peaks[-1]
    for p in reversed(peaks[:-1]):
        h = node_hash(p, h)
    return h


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """RFC 9162 section 2.1.1 MTH over already hashed leaves, in memory; the reference."""
    def mth(begin: int, end: int) -> bytes:
        if end - begin == 1:
            return leaf_hashes[begin]
        k = _split(end - begin)
        return node_hash(mth(begin, begin + k), mth(begin + k, end))

    return mth(0, len(leaf_hashes)) if leaf_hashes else EMPTY_ROOT


def _peaks(begin: int, end: int, get_node: NodeGetter) -> list[bytes]:
    """The perfect subtrees that tile ``[begin, end)``, largest first."""
    width = end - begin
    if begin < 0 or width <= 0:
        raise ValueError(f"empty or negative leaf range [{begin}, {end})")
    if begin & ((1 << (width.bit_length() - 1)) - 1):
        # Unaligned ranges never occur in the RFC recursion, and their pieces
        # would not be nodes of the tree.
        raise ValueError(f"leaf range [{begin}, {end}) is not aligned to its largest subtree")
    peaks, pos = [], begin
    for level in reversed(range(width.bit_length())):
        if width >> level & 1:
            peaks.append(get_node(level, pos >> level))
            pos += 1 << level
    return peaks


def subtree_hash(begin: int, end: int, get_node: NodeGetter) -> bytes:
    """RFC 9162 section 2.1.1 MTH(D[begin:end]) from at most log2(end - begin) + 1 stored nodes.

    ``begin`` must be a multiple of the largest power of two not above
    ``end - begin``, which holds for every range the MTH, PATH and SUBPROOF
    recursions visit; anything else raises ``ValueError``.
    """
    return _fold(_peaks(begin, end, get_node))


def root_from_store(size: int, get_node: NodeGetter) -> bytes:
    """RFC 9162 section 2.1.1: MTH(D[size]) from the stored nodes; EMPTY_ROOT for 0."""
    return EMPTY_ROOT if size == 0 else subtree_hash(0, size, get_node)


def _perfect(begin: int, width: int, get_node: NodeGetter) -> bytes:
    level = width.bit_length() - 1
    return get_node(level, begin >> level)


def inclusion_proof(index: int, size: int, get_node: NodeGetter) -> list[bytes]:
    """RFC 9162 section 2.1.3.1: PATH(m, D[n]), the sibling nearest the leaf first.

    The recursion is walked top down and reversed. Only the first step into a
    left half reads a non-perfect sibling (O(log n) nodes); every later
    sibling is a single perfect node. Raises ``ValueError`` unless 0 <= index < size.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is outside a tree of size {size}")
    path: list[bytes] = []
    begin, end = 0, size
    while end - begin > 1:
        k = _split(end - begin)
        if index < begin + k:  # PATH(m, D[0:k]) : MTH(D[k:n])
            path.append(subtree_hash(begin + k, end, get_node))
            end = begin + k
        else:  # PATH(m - k, D[k:n]) : MTH(D[0:k])
            path.append(_perfect(begin, k, get_node))
            begin += k
    path.reverse()
    return path


def consistency_proof(size1: int, size2: int, get_node: NodeGetter) -> list[bytes]:
    """RFC 9162 section 2.1.4.1: PROOF(m, D[n]) = SUBPROOF(m, D[n], true).

    Empty when ``size1 == size2``. Raises ``ValueError`` unless 0 < size1 <= size2:
    a proof from the empty tree proves nothing and verifiers reject it.
    """
    if not 0 < size1 <= size2:
        raise ValueError(f"no consistency proof from size {size1} to size {size2}")
    proof: list[bytes] = []
    begin, end, whole = 0, size2, True  # ``whole`` is the RFC's flag b
    while size1 != end:  # the RFC's m is size1 - begin
        k = _split(end - begin)
        if size1 - begin <= k:  # SUBPROOF(m, D[0:k], b) : MTH(D[k:n])
            proof.append(subtree_hash(begin + k, end, get_node))
            end = begin + k
        else:  # SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k])
            proof.append(_perfect(begin, k, get_node))
            begin += k
            whole = False
    if not whole:  # SUBPROOF(m, D[m], false) = {MTH(D[m])}
        proof.append(subtree_hash(begin, end, get_node))
    proof.reverse()
    return proof


def _check_hashes(what: str, hashes: Sequence[bytes]) -> None:
    # Go rejects a short leaf hash outright; a short root or proof element could
    # only fail later by mismatch, so rejecting it early changes no outcome.
    for h in hashes:
        if not isinstance(h, (bytes, bytearray)) or len(h) != HASH_SIZE:
            raise ProofError(f"{what} is not a {HASH_SIZE}-byte hash")


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 section 2.1.3.2: check that ``leaf_hash`` is leaf ``index`` of the tree ``root``.

    Raises ``ProofError`` on any failure, including a proof of the wrong length.
    """
    if not 0 <= index < size:  # step 1
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    _check_hashes("leaf hash", [leaf_hash])
    _check_hashes("root", [root])
    _check_hashes("inclusion proof element", proof)
    fn, sn, r = index, size - 1, bytes(leaf_hash)  # steps 2-3
    for p in proof:  # step 4
        if sn == 0:
            raise ProofError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn and not fn & 1:  # on the right border: skip levels with no sibling
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:  # step 5
        raise ProofError("inclusion proof is too short")
    if r != root:
        raise ProofError("inclusion proof does not lead to the root")


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """RFC 9162 section 2.1.4.2: check that tree ``root2`` extends tree ``root1``.

    Preconditions as in Go's VerifyConsistency and the conformance vectors: size2 <
    size1 fails; size1 == 0 fails, even with size2 == 0 (nothing to prove); equal
    sizes need an empty proof and equal roots, compared as given. Raises ``ProofError``.
    """
    if size2 < size1:
        raise ProofError(f"tree size {size2} is smaller than tree size {size1}")
    if size1 <= 0:
        raise ProofError("a consistency proof from the empty tree proves nothing")
    if size1 == size2:
        if proof:
            raise ProofError("equal tree sizes need an empty consistency proof")
        # No length check here: Go compares the roots as bytes, and the vector
        # "sizes-are-equal-one-and-proof-is-empty" expects 12-byte roots to pass.
        if root1 != root2:
            raise ProofError("equal tree sizes but different roots")
        return
    if not proof:  # step 1
        raise ProofError("empty consistency proof")
    _check_hashes("root", [root1, root2])
    _check_hashes("consistency proof element", proof)
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # step 2: the old root is itself a node of the new tree
        path.insert(0, bytes(root1))
    fn, sn = size1 - 1, size2 - 1  # step 3
    while fn & 1:  # step 4
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]  # step 5
    for c in path[1:]:  # step 6
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:  # step 7
        raise ProofError("consistency proof is too short")
    if fr != root1:
        raise ProofError("consistency proof does not lead to the first root")
    if sr != root2:
        raise ProofError("consistency proof does not lead to the second root")


class CompactRange:
    """The right frontier of the tree: at most one perfect subtree root per set bit
    of `size`, left to right (largest first). This is what lets appends cost O(1)
    amortized hashes with no copy of the log in memory.
    """

    __slots__ = ("_size", "_peaks")

    def __init__(self, size: int = 0, peaks: Sequence[bytes] = ()) -> None:
        if size < 0 or len(peaks) != size.bit_count():
            raise ValueError(f"size {size} does not match {len(peaks)} peaks")
        if any(len(p) != HASH_SIZE for p in peaks):
            raise ValueError(f"peaks must be {HASH_SIZE}-byte hashes")
        self._size = size
        self._peaks = [bytes(p) for p in peaks]

    @classmethod
    def from_store(cls, size: int, get_node: NodeGetter) -> CompactRange:
        """Rebuild the frontier of a stored tree from its O(log n) peak nodes."""
        return cls(size, _peaks(0, size, get_node) if size else ())

    @property
    def size(self) -> int:
        return self._size

    @property
    def peaks(self) -> tuple[bytes, ...]:
        return tuple(self._peaks)

    def append(self, leaf_hash: bytes) -> list[tuple[int, int, bytes]]:
        """Add one leaf; return each (level, index, hash) node it completes, the leaf first."""
        if len(leaf_hash) != HASH_SIZE:
            raise ValueError(f"leaf hash must be {HASH_SIZE} bytes")
        h, level, index = bytes(leaf_hash), 0, self._size
        completed = [(0, index, h)]
        # An odd index at this level means a left sibling of equal height is the
        # last peak, waiting for exactly this right half.
        while index & 1:
            h = node_hash(self._peaks.pop(), h)
            level, index = level + 1, index >> 1
            completed.append((level, index, h))
        self._peaks.append(h)
        self._size += 1
        return completed

    def root(self) -> bytes:
        """RFC 9162 section 2.1.1: MTH of the whole tree; EMPTY_ROOT when empty."""
        return _fold(self._peaks) if self._peaks else EMPTY_ROOT

    def copy(self) -> CompactRange:
        return CompactRange(self._size, self._peaks)

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size}, root={self.root().hex()})"
