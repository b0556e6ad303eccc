"""RFC 6962 / RFC 9162 conformance: the transparency-dev/merkle vectors and the CT reference tree.

The vectors are test data in the repository, tests/data/rfc6962 (origin and licence in
tests/data/NOTICE), or wherever GRADLEDGER_CONFORMANCE_DIR points. A missing directory must
fail the run, never silently collect nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from gradledger.ledger import merkle
from gradledger.ledger.errors import ProofError

VECTOR_DIR = Path(
    os.environ.get("GRADLEDGER_CONFORMANCE_DIR")
    or Path(__file__).resolve().parent / "data" / "rfc6962"
)
EXPECTED_CASES = 196


def _collect() -> list[Path]:
    if not VECTOR_DIR.is_dir():
        return []
    return sorted(
        p for sub in ("inclusion", "consistency") for p in (VECTOR_DIR / sub).rglob("*.json")
    )


CASES = _collect()


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value or "", validate=True)


def _proof(case: dict[str, Any]) -> list[bytes]:
    return [_b64(h) for h in case.get("proof") or []]


def _verify(path: Path, case: dict[str, Any]) -> None:
    kind = path.relative_to(VECTOR_DIR).parts[0]
    if kind == "inclusion":
        merkle.verify_inclusion(
            _b64(case["leafHash"]), case["leafIdx"], case["treeSize"], _proof(case), _b64(case["root"])
        )
    else:
        merkle.verify_consistency(
            case["size1"], case["size2"], _proof(case), _b64(case["root1"]), _b64(case["root2"])
        )


def test_all_vectors_found() -> None:
    assert VECTOR_DIR.is_dir(), f"conformance vectors missing: {VECTOR_DIR}"
    assert len(CASES) == EXPECTED_CASES


@pytest.mark.parametrize(
    "path", CASES, ids=[p.relative_to(VECTOR_DIR).as_posix() for p in CASES]
)
def test_vector(path: Path) -> None:
    case = json.loads(path.read_text())
    try:
        _verify(path, case)
    except ProofError:
        rejected = True
    else:
        rejected = False
    assert rejected == case["wantErr"], case.get("desc")


# The RFC 6962 test tree used by CT, Trillian and transparency-dev/merkle.
LEAVES = [
    bytes.fromhex(h)
    for h in (
        "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
ROOTS = [  # MTH of the first 1..8 leaves (transparency-dev/merkle testonly)
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def _naive_mth(data: list[bytes]) -> bytes:
    """RFC 6962 section 2.1 written out literally, independent of the module."""
    if not data:
        return hashlib.sha256(b"").digest()
    if len(data) == 1:
        return hashlib.sha256(b"\x00" + data[0]).digest()
    k = 1
    while k * 2 < len(data):
        k *= 2
    return hashlib.sha256(b"\x01" + _naive_mth(data[:k]) + _naive_mth(data[k:])).digest()


def _store(leaves: list[bytes]) -> tuple[merkle.CompactRange, dict[tuple[int, int], bytes]]:
    cr, nodes = merkle.CompactRange(), {}
    for data in leaves:
        for level, index, h in cr.append(merkle.leaf_hash(data)):
            nodes[level, index] = h
    return cr, nodes


def _bounded(nodes: dict[tuple[int, int], bytes], size: int) -> merkle.NodeGetter:
    """A getter that, like the store, only serves perfect subtrees inside ``size``."""

    def get(level: int, index: int) -> bytes:
        assert (index + 1) << level <= size, f"read of node ({level}, {index}) beyond size {size}"
        return nodes[level, index]

    return get


def test_constants() -> None:
    assert merkle.LEAF_PREFIX == b"\x00" and merkle.NODE_PREFIX == b"\x01"
    assert merkle.HASH_SIZE == 32
    assert merkle.EMPTY_ROOT.hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert merkle.root_of([]) == merkle.EMPTY_ROOT == merkle.CompactRange().root()
    assert merkle.root_from_store(0, lambda level, index: pytest.fail("read")) == merkle.EMPTY_ROOT


@pytest.mark.parametrize("size", range(1, 9))
def test_reference_tree_roots(size: int) -> None:
    cr, nodes = _store(LEAVES[:size])
    assert _naive_mth(LEAVES[:size]).hex() == ROOTS[size - 1]
    assert cr.root().hex() == ROOTS[size - 1]
    assert merkle.root_of([merkle.leaf_hash(d) for d in LEAVES[:size]]).hex() == ROOTS[size - 1]
    assert merkle.root_from_store(size, _bounded(nodes, size)).hex() == ROOTS[size - 1]


HAPPY = [p for p in CASES if p.name == "happy-path.json"]


def test_happy_paths_found() -> None:
    assert len(HAPPY) == 10


@pytest.mark.parametrize("path", HAPPY, ids=[p.relative_to(VECTOR_DIR).as_posix() for p in HAPPY])
def test_generated_proofs_match_vectors(path: Path) -> None:
    case = json.loads(path.read_text())
    _, nodes = _store(LEAVES)
    if path.relative_to(VECTOR_DIR).parts[0] == "inclusion":
        size, index = case["treeSize"], case["leafIdx"]
        get = _bounded(nodes, size)
        assert _b64(case["leafHash"]) == merkle.leaf_hash(LEAVES[index])
        assert _b64(case["root"]).hex() == ROOTS[size - 1]
        assert merkle.inclusion_proof(index, size, get) == _proof(case)
    else:
        size1, size2 = case["size1"], case["size2"]
        get = _bounded(nodes, size2)
        assert _b64(case["root1"]).hex() == ROOTS[size1 - 1]
        assert _b64(case["root2"]).hex() == ROOTS[size2 - 1]
        assert merkle.consistency_proof(size1, size2, get) == _proof(case)
