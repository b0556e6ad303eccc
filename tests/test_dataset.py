"""Dataset commitment in a real ledger: root, observation, reload, batches and refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradledger.ledger import credentials as C
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger
from gradledger.ledger.merkle import leaf_hash, root_of
from gradledger.training.dataset import (
    CommittedDataset,
    check_batch,
    commit_dataset,
    decode_manifests,
    encode_manifests,
    load_dataset,
)
from gradledger.training.errors import DatasetError, ManifestError
from gradledger.training.manifests import SignedManifest, example_id, label_example, source_entry
from gradledger.training.snorkel import import_label_matrix
from helpers import genesis, make_world

WORLD = make_world()
NAMES = ["lf-a", "lf-b"]
KEYS = {n: SigningKey.from_seed(bytes([55, i]) * 16, n) for i, n in enumerate(NAMES)}
CREDS = {
    n: C.issue(WORLD.authority, subject=n, path=f"acme/radiology/{n}", role="source", public_key=k.public_key)
    for n, k in KEYS.items()
}
INPUTS = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
L = np.array([[0, 0], [1, -1], [-1, 2], [1, 1], [0, 1], [2, 2], [-1, 0]])


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger.create(tmp_path / "ledger")
    genesis(led, WORLD)
    for cred in CREDS.values():
        led.append("CredentialIssued", {"credential": cred.signed}, WORLD.authority)
    led.commit()
    yield led
    led.close()


def manifests(time: int = 10) -> list[SignedManifest]:
    return import_label_matrix(L, NAMES, lf_credentials=CREDS, ontology="v1", time=time, inputs=INPUTS, signer=WORLD.authority).manifests


def test_commit_records_root_and_verifies(ledger: Ledger) -> None:
    ms = manifests()
    ds = commit_dataset(ledger, ms, "train", WORLD.trainer)
    assert ds.count == len(ms) == 7
    assert ds.root == root_of([leaf_hash(m.signed) for m in ms])
    assert ledger.by_type("DatasetCommitted") == [ds.seq]
    obs = ledger.observation(ds.seq)
    assert obs.body == {"name": "train", "root": ds.root, "count": 7, "manifests": ds.artifact}
    assert obs.signer == WORLD.trainer.key_id
    assert decode_manifests(ledger.artifact(ds.artifact)) == [m.signed for m in ms]
    ledger.verify(trusted_roots=[WORLD.root.public_key])


def test_load_round_trip(ledger: Ledger, tmp_path: Path) -> None:
    ds = commit_dataset(ledger, manifests(), "train", WORLD.trainer)
    ledger.put_artifact(b"\x87unrelated artifact with a lookalike header")
    ledger.close()
    reader = Ledger.open(tmp_path / "ledger")
    try:
        loaded = load_dataset(reader, ds.seq)
        assert (loaded.name, loaded.root, loaded.count, loaded.artifact) == ("train", ds.root, 7, ds.artifact)
        assert [m.signed for m in loaded.manifests] == [m.signed for m in ds.manifests]
        assert reader.observation(ds.seq).body["manifests"] == ds.artifact
    finally:
        reader.close()


def test_index_lookups_and_batches(ledger: Ledger) -> None:
    ds = commit_dataset(ledger, manifests(), "train", WORLD.trainer)
    assert ds.index_of(example_id(INPUTS[4])) == 4
    assert ds.manifest(4).example == example_id(INPUTS[4])
    assert ds.position(ds.manifests[2]) == 2
    assert check_batch(ds, np.array([6, 0, 0, 3])) == [6, 0, 0, 3]
    for bad, message in (([0, 7], "index 7 is outside"), ([-1], "index -1 is outside"), ([1.0], "not an integer"),
                         ([True], "not an integer"), (5, "sequence of indices")):
        with pytest.raises(ManifestError, match=message):
            check_batch(ds, bad)
    with pytest.raises(ManifestError, match="has no manifest in committed dataset 'train'"):
        ds.index_of(example_id(np.zeros(3, dtype=np.float32)))
    with pytest.raises(ManifestError, match="is outside"):
        ds.manifest(99)
    stranger = manifests(time=11)[0]  # same example, different manifest
    with pytest.raises(ManifestError, match="is not in committed dataset 'train'"):
        ds.position(stranger)


def test_revoked_source_kept_out_even_when_backdated(ledger: Ledger) -> None:
    ms = manifests(time=10)
    ledger.append("CredentialRevoked", {"key_id": CREDS["lf-b"].key_id, "reason": "bad heuristic"}, WORLD.authority)
    with pytest.raises(ManifestError, match="manifest 0 .*source 'lf-b'.*revoked at time .*before the dataset was committed"):
        commit_dataset(ledger, ms, "train", WORLD.trainer)
    # Manifests that do not involve the revoked source still commit.
    clean = [m for m in ms if "lf-b" not in m.source_names]
    ds = commit_dataset(ledger, clean, "clean", WORLD.trainer)
    assert load_dataset(ledger, ds.seq).count == len(clean) == 1


def test_later_revocation_does_not_void_a_past_commitment(ledger: Ledger) -> None:
    ds = commit_dataset(ledger, manifests(), "train", WORLD.trainer)
    ledger.append("CredentialRevoked", {"key_id": CREDS["lf-a"].key_id, "reason": "retired"}, WORLD.authority, commit=True)
    assert load_dataset(ledger, ds.seq).root == ds.root


def test_refusals(ledger: Ledger) -> None:
    stranger = SigningKey.from_seed(b"\x42" * 32, "stranger")
    forged = label_example(example=b"\x00" * 32, sources=[source_entry(CREDS["lf-a"], 1, 1.0)], aggregation="single",
                           ontology="v1", review="accepted", key=stranger, time=10)
    with pytest.raises(ManifestError, match="manifest 1 .*no recorded credential"):
        commit_dataset(ledger, [manifests()[0], forged], "train", WORLD.trainer)
    with pytest.raises(DatasetError, match="no manifests"):
        commit_dataset(ledger, [], "train", WORLD.trainer)
    with pytest.raises(DatasetError, match="dataset name"):
        commit_dataset(ledger, manifests(), "", WORLD.trainer)
    with pytest.raises(DatasetError, match="is a RunStarted"):
        load_dataset(ledger, 4)
    with pytest.raises(DatasetError, match="no observation"):
        load_dataset(ledger, 10_000)
    ds = commit_dataset(ledger, manifests(), "train", WORLD.trainer)
    body = dict(ledger.observation(ds.seq).body)
    missing = ledger.append("DatasetCommitted", {**body, "manifests": b"\x00" * 32}, WORLD.trainer, commit=True)
    with pytest.raises(DatasetError, match="not stored"):
        load_dataset(ledger, missing.seq)
    other = ledger.put_artifact(encode_manifests(manifests()[:3]))
    short = ledger.append("DatasetCommitted", {**body, "manifests": other}, WORLD.trainer, commit=True)
    with pytest.raises(DatasetError, match="holds 3 manifests, commitment says 7"):
        load_dataset(ledger, short.seq)


def test_artifact_codec_is_strict() -> None:
    ms = manifests()
    data = encode_manifests(ms)
    assert decode_manifests(data) == [m.signed for m in ms]
    for bad, message in ((data + b"\x00", "trailing"), (data[:-1], "truncated"), (b"\x98\x01" + data[1:], "non-canonical"),
                         (b"\x9f", "indefinite"), (b"\xa1", "major type 4")):
        with pytest.raises(DatasetError, match=message):
            decode_manifests(bad)
    assert isinstance(CommittedDataset("x", b"\x00" * 32, ms, b"\x00" * 32, None).count, int)


COLUMN_DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bfloat16"]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(COLUMN_DTYPES), st.lists(st.integers(0, 4), min_size=0, max_size=3), st.integers(0, 6),
       st.integers(0, 2**31 - 1), st.booleans())
def test_column_ids_are_the_row_by_row_example_ids(dtype: str, row_shape: list[int], n: int, seed: int,
                                                   transposed: bool) -> None:
    # The batched hashing every stored input is checked with (load_inputs, encode_inputs) gives exactly
    # example_id of each row, for every dtype, row shape (0-d rows and empty rows too) and a
    # non-contiguous column.
    import torch

    from gradledger.training.manifests import column_ids, columns_ids

    g = torch.Generator().manual_seed(seed)
    raw = torch.randn((n, *row_shape), generator=g) * 100
    col = raw.to(getattr(torch, dtype)) if dtype != "bool" else raw > 0
    if transposed and col.dim() >= 3:
        col = col.transpose(1, 2)
    assert column_ids(col) == [example_id(col[i]) for i in range(n)]
    if dtype != "bfloat16":
        assert column_ids(col.numpy()) == [example_id(col.numpy()[i]) for i in range(n)]
    parts = {"input_ids": col, "mask": torch.ones(n, 3)}
    assert columns_ids(parts) == [example_id({k: v[i] for k, v in parts.items()}) for i in range(n)]
