"""Importing a Snorkel-style label matrix: shapes, abstain-only rows, both aggregation paths."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gradledger.ledger import credentials as C
from gradledger.ledger.credentials import CredentialRegistry
from gradledger.ledger.keys import SigningKey
from gradledger.training.errors import DatasetError
from gradledger.training.manifests import example_id, verify_manifest
from gradledger.training.snorkel import import_label_matrix
from helpers import make_world

WORLD = make_world()
NAMES = ["lf-keyword", "lf-regex", "lf-length"]
KEYS = {name: SigningKey.from_seed(bytes([91, i]) * 16, name) for i, name in enumerate(NAMES)}
CREDS = {
    name: C.issue(WORLD.authority, subject=name, path=f"acme/radiology/{name}", role="source", public_key=key.public_key)
    for name, key in KEYS.items()
}
# Rows: majority, single, all abstain, tie (0 vs 2), unanimous, single.
L = np.array([[1, 1, 0], [-1, 2, -1], [-1, -1, -1], [0, 2, -1], [1, 1, 1], [-1, -1, 0]])
INPUTS = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)


def registry() -> CredentialRegistry:
    reg = CredentialRegistry()
    for cred in (WORLD.root_cred, WORLD.authority_cred, *CREDS.values()):
        reg.add(cred.signed, 0)
    return reg


def run(**overrides: Any) -> Any:
    args: dict[str, Any] = dict(lf_credentials=CREDS, ontology="findings/v2", time=1_000, inputs=INPUTS, signer=WORLD.authority)
    args.update(overrides)
    matrix, names = args.pop("L", L), args.pop("names", NAMES)
    return import_label_matrix(matrix, names, **args)


def test_majority_and_single_rows() -> None:
    result = run()
    assert result.rows == [0, 1, 3, 4, 5]
    assert [u.row for u in result.unlabeled] == [2]
    assert result.unlabeled[0].example == example_id(INPUTS[2])
    got = [(m.label, m.manifest["aggregation"], m.manifest["consensus"]) for m in result.manifests]
    assert got == [(1, "majority", 2 / 3), (2, "single", 1.0), (0, "majority", 0.5), (1, "majority", 1.0), (0, "single", 1.0)]
    assert [m.example for m in result.manifests] == [example_id(INPUTS[i]) for i in result.rows]
    reg = registry()
    for m in result.manifests:
        assert m.signer == WORLD.authority.key_id and m.manifest["ontology"] == "findings/v2"
        verify_manifest(m, reg)


def test_lf_keys_sign_only_their_own_votes() -> None:
    # specs/manifests.md §4: a function's key signs its own vote, never another function's.
    single = np.array([[-1, 2, -1], [-1, -1, -1], [0, -1, -1], [-1, -1, 1]])
    result = run(L=single, inputs=INPUTS[:4], signer=None, lf_keys=KEYS)
    assert [m.signer for m in result.manifests] == [KEYS[n].key_id for n in ("lf-regex", "lf-keyword", "lf-length")]
    reg = registry()
    for m in result.manifests:
        assert "attested_by" not in m.manifest["sources"][0]
        verify_manifest(m, reg)
    with pytest.raises(DatasetError, match="row 0 lists 3 labeling functions"):
        run(signer=None, lf_keys=KEYS)
    with pytest.raises(DatasetError, match="row 0 lists 3 labeling functions"):
        run(L=single, inputs=INPUTS[:4], signer=None, lf_keys=KEYS, include_abstains=True)


def test_the_authority_attests_every_functions_vote() -> None:
    result = run(include_abstains=True)
    for m in result.manifests:
        assert [src["attested_by"] for src in m.manifest["sources"]] == [WORLD.authority.key_id] * len(NAMES)


def test_confidence_weights_break_majorities() -> None:
    result = run(lf_confidence={"lf-keyword": 0.9, "lf-regex": 0.4, "lf-length": 0.4})
    tie_row = result.manifests[result.rows.index(3)]
    assert tie_row.label == 0 and tie_row.manifest["confidence"] == pytest.approx(0.9 / 1.3)
    first = result.manifests[0]
    assert first.label == 1 and first.manifest["confidence"] == pytest.approx(1.3 / 1.7)


def test_label_model_probs_path() -> None:
    probs = np.array([[0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.4, 0.3, 0.3], [0.45, 0.1, 0.45], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    result = run(probs=probs, review="pending")
    assert result.rows == [0, 1, 3, 4, 5]
    for m, row in zip(result.manifests, result.rows):
        assert m.manifest["aggregation"] == "label-model" and m.manifest["probs"] == probs[row].tolist()
        assert m.manifest["review"] == "pending"
    assert [m.label for m in result.manifests] == [1, 2, 0, 1, 0]  # ties go to the smaller class
    assert result.manifests[2].manifest["consensus"] == 0.5


def test_include_abstains_and_precomputed_ids() -> None:
    ids = [bytes([i]) * 32 for i in range(6)]
    result = run(inputs=None, example_ids=ids, include_abstains=True)
    assert [m.example for m in result.manifests] == [ids[i] for i in result.rows]
    assert all(len(m.manifest["sources"]) == 3 for m in result.manifests)
    assert sorted(s["vote"] for s in result.manifests[1].manifest["sources"]) == [-1, -1, 2]


def test_all_abstain_matrix_gives_no_manifests() -> None:
    result = run(L=np.full((6, 3), -1))
    assert result.manifests == [] and len(result.unlabeled) == 6


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(L=L[:, 0]), "2-D integer"),
        (dict(L=L.astype(float)), "2-D integer"),
        (dict(L=L - 1), "-1 \\(abstain\\)"),
        (dict(names=NAMES[:2]), "3 columns but 2"),
        (dict(names=["a", "a", "b"]), "unique"),
        (dict(inputs=INPUTS[:5]), "6 rows but 5 inputs"),
        (dict(inputs=None), "exactly one of inputs"),
        (dict(example_ids=[b"x" * 32] * 6), "exactly one of inputs"),
        (dict(inputs=None, example_ids=[b"x" * 31] * 6), "32-byte"),
        (dict(probs=np.full((5, 3), 0.3)), "6 x k"),
        (dict(probs=np.full((6, 2), 0.3)), "only 2 classes"),
        (dict(probs=np.full((6, 3), np.nan)), "finite"),
        (dict(lf_credentials={n: CREDS[n] for n in NAMES[:2]}), "no credential given for labeling function 'lf-length'"),
        (dict(lf_credentials={**CREDS, "lf-length": CREDS["lf-regex"]}), "credential for 'lf-length'"),
        (dict(lf_keys=KEYS), "exactly one of signer= or lf_keys="),
        (dict(signer=None, lf_keys={**KEYS, "lf-regex": KEYS["lf-length"]}), "does not match its credential"),
        (dict(lf_confidence=[1.0, 2.0, 0.5]), "\\[0, 1\\]"),
        (dict(lf_confidence=[1.0]), "1 labeling-function confidences"),
        (dict(review="approved"), "review"),
        (dict(time=-5), "unix nanoseconds"),
    ],
)
def test_bad_input_is_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        run(**overrides)
