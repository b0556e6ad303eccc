"""The ``artifacts`` structural check (specs/verification.md §3): every byte of a bundle is checked
with ``--replay none`` too (issue 9, "Damaged bundles that still verify"; issue 10.2).

One small honest demo bundle per module; each damage or forgery is verified structure-only and
must never verify, failing the named check, or be refused as unusable input (exit 2). Forgeries
are made by tests/forging.py as the trainer would (trainer key only, everything re-signed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import forging as F
from gradledger.ledger.bundle import Bundle
from gradledger.ledger.errors import UnusableInput, VerificationError
from gradledger.ledger.keys import read_public_keys
from gradledger.verify import VerificationPolicy, Verifier


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("artifacts")
    d = F.build_demo(base / "demo", steps=6, checkpoint_every=3)
    forge = F.Forge.from_bundle(d.bundle)
    verifier = Verifier(read_public_keys(d.roots), VerificationPolicy(replay="none"))
    data = d.bundle.read_bytes()
    with Bundle.open(d.bundle) as b:
        records = len(b)
        # Where each artifact's payload lies in the file, by digest.
        spans = {}
        for i, digest in enumerate(sorted(b.artifact_digests())):
            spans[digest] = b._payload(1 + records + i)
        header_end = b._payload(0)[1]
    return {"demo": d, "forge": forge, "verifier": verifier, "work": base, "data": data, "spans": spans,
            "header_end": header_end}


def _verdict(demo: dict[str, Any], data: bytes, name: str = "damaged.glb") -> tuple[str, Any]:
    """("unusable", message) or (first failing check name, the failure); never VERIFIED."""
    path: Path = demo["work"] / name
    path.write_bytes(data)
    try:
        report = demo["verifier"].verify(path)
    except (UnusableInput, VerificationError) as exc:
        return "unusable", str(exc)
    finally:
        path.unlink(missing_ok=True)
    assert not report.verified, report.render()
    failure = report.first_failure
    assert failure is not None, report.render()
    return failure.name, failure


def _flip(data: bytes, at: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[at] ^= 1 << bit
    return bytes(out)


def _kinds(forge: F.Forge) -> dict[bytes, tuple[str, int]]:
    """Each artifact's kind (the naming field) and the first record naming it."""
    from gradledger.ledger.envelope import unseal
    from gradledger.verify._internal.artifacts import named_artifacts

    kinds: dict[bytes, tuple[str, int]] = {}
    for seq, record in enumerate(forge.sealed()):
        sealed = unseal(record)
        for name, digest in named_artifacts(sealed):
            kinds.setdefault(digest, (f"{sealed.type}.{name}", seq))
    return kinds


def test_the_honest_bundle_verifies_structure_only(demo: dict[str, Any]) -> None:
    report = demo["verifier"].verify(demo["demo"].bundle)
    assert report.verified, report.render()
    check = next(c for c in report.checks if c.name == "artifacts")
    assert check.status == "pass" and "checkpoint artifacts parsed" in check.detail
    names = [c.name for c in report.checks]
    assert names.index("tree heads") < names.index("artifacts") < names.index("dataset")


def test_one_bit_flipped_in_each_artifact_fails_artifacts(demo: dict[str, Any]) -> None:
    kinds = _kinds(demo["forge"])
    assert set(kinds) == set(demo["spans"])  # every artifact is named: the honest bundle has no extra
    seen = set()
    for digest, (start, end) in demo["spans"].items():
        kind, seq = kinds[digest]
        seen.add(kind)
        name, failure = _verdict(demo, _flip(demo["data"], (start + end) // 2, 3))
        # The flipped artifact is a new, unnamed digest, and the named one is missing: either the
        # reader refuses the broken digest order (exit 2) or the check fails at the first namer.
        if name != "unusable":
            assert name == "artifacts", failure.detail
            assert failure.seq == seq and digest.hex() in failure.detail, (kind, failure.detail)
    assert {"RunStarted.artifacts.program", "DatasetCommitted.manifests", "DatasetCommitted.data",
            "Checkpoint.artifact", "RunStarted.settings.branch.removed", "RunStarted.settings.branch.relabeled"} <= seen


@pytest.mark.parametrize("field", ["root", "origin", "size", "with_data"])
def test_a_bit_flipped_in_the_header_never_verifies(demo: dict[str, Any], field: str) -> None:
    from gradledger.ledger import encoding

    data, end = demo["data"], demo["header_end"]
    key = encoding.encode(field)
    at = data.index(key, 0, end) + len(key)
    with Bundle.open(demo["demo"].bundle) as bundle:
        value = len(encoding.encode(bundle.header[field]))
    # The lowest bit of the value's last byte: a change of value (size 45 -> 44, true -> false, ...),
    # not of framing, so only the comparison with the records can catch it.
    name, failure = _verdict(demo, _flip(data, at + value - 1, 0))
    assert name == "artifacts" and f"header says {field}" in failure.detail, failure


def test_forged_header_fields_fail_artifacts(demo: dict[str, Any]) -> None:
    for key, value in (("root", bytes(32)), ("size", len(demo["forge"].recs) - 1), ("origin", "gradledger:forged"),
                       ("with_data", False)):
        g = demo["forge"].clone()
        g.header_overrides[key] = value
        name, failure = _verdict(demo, g.bundle_bytes())
        assert name == "artifacts" and f"header says {key}" in failure.detail, (key, failure)


def test_an_extra_artifact_fails(demo: dict[str, Any]) -> None:
    g = demo["forge"].clone()
    extra = g.put(b"an artifact no record names")
    name, failure = _verdict(demo, g.bundle_bytes())
    assert name == "artifacts" and extra.hex() in failure.detail and "no record names" in failure.detail


def test_missing_inputs_fail_naming_the_commitment(demo: dict[str, Any]) -> None:
    g = demo["forge"].clone()
    ds = g.first("DatasetCommitted")
    data = g.body(ds)["data"]
    g.arts.pop(data)
    g.with_data = False
    name, failure = _verdict(demo, g.bundle_bytes())
    assert name == "artifacts" and failure.seq == ds and data.hex() in failure.detail


@pytest.mark.parametrize("which", ["original", "branch"])
def test_a_final_checkpoint_swapped_with_digests_kept_fails(demo: dict[str, Any], which: str) -> None:
    """Issue 10.2: fine-tuned weights behind the honest digests, re-signed by the trainer."""
    forgery = next(f for f in F.catalogue(demo["forge"]) if f.name ==
                   f"artifact: {which} final checkpoint artifact swapped for fine-tuned weights, record digests kept")
    g = demo["forge"].clone()
    forgery.apply(g)
    name, failure = _verdict(demo, g.bundle_bytes())
    final = g.seqs("Checkpoint")[-1] if which == "branch" else _original_final(g)
    assert name == "artifacts" and failure.seq == final and "Checkpoint" in failure.detail, failure


def _original_final(g: F.Forge) -> int:
    branch = g.seqs("RunStarted")[1]
    return g.seqs("Checkpoint", hi=branch)[-1]


def test_a_branch_final_checkpoint_naming_the_original_model_fails(demo: dict[str, Any]) -> None:
    """Issue 10.2: the unlearning branch's final Checkpoint keeps its digests but names the original model."""
    g = demo["forge"].clone()
    final, original = g.seqs("Checkpoint")[-1], _original_final(g)
    own = g.body(final)["artifact"]
    g.set(final, ("artifact",), g.body(original)["artifact"])
    g.arts.pop(own)
    name, failure = _verdict(demo, g.bundle_bytes())
    assert name == "artifacts" and failure.seq == final and "does not match" in failure.detail, failure


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_no_single_bit_flip_anywhere_verifies(demo: dict[str, Any], position: int, bit: int) -> None:
    """Issue 9: a bundle whose bytes differ from what was exported never verifies, and nothing but the
    project's typed errors escapes (``_verdict`` lets any other exception fail the test)."""
    data = demo["data"]
    _verdict(demo, _flip(data, position % len(data), bit), "flipped.glb")


def test_cosignatures_not_by_a_witness_or_not_on_a_tree_head_fail(demo: dict[str, Any]) -> None:
    """specs/verification.md §3 item 5: a bundle's cosignatures are checked as import checks them."""
    from gradledger.ledger.envelope import unseal
    from gradledger.ledger.witness import cosign

    base = demo["forge"]
    head = base.seqs("TreeHead")[-1]
    sealed = unseal(base.sealed()[head])
    trainer = base.trainer
    not_a_head = base.first("GovernedUpdate")
    for seq, signature in ((head, cosign(sealed, trainer)), (not_a_head, bytes(64)), (len(base.recs), bytes(64))):
        g = base.clone()
        g.cosignatures.append((seq, trainer.key_id, signature))
        name, failure = _verdict(demo, g.bundle_bytes())
        assert name == "artifacts" and "cosignature 0" in failure.detail, (seq, failure)
