"""The verifier's structural checks on an honest governed run, and on tampered copies of it.

Every tamper names the check that must catch it and the observation it must name. Tampers
that keep the chain valid re-sign the edited record and every later one with the original
keys (tree heads recomputed), so only the semantic check can catch them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradledger.ledger import credentials as C
from gradledger.ledger import encoding
from gradledger.ledger.envelope import GENESIS_PREV, seal, unseal
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.merkle import CompactRange
from gradledger.training.dataset import commit_dataset, encode_inputs, encode_manifests
from gradledger.training.manifests import sign_manifest
from gradledger.training.policy import route, sign_policy
from gradledger.verify._internal.structure import Structure, check_structure
from gradledger.verify.report import Report
from helpers import CROWD_KEY, WORKER_KEYS, crowd_ledger
from test_trainer import MANIFESTS, PATHS, POLICY, POLICY_FIELDS, WORKER_CREDS, WORLD, X, full_run

ROOTS = [WORLD.root.public_key]
KEYS = {k.key_id: k for k in (WORLD.root, WORLD.trainer, WORLD.authority, WORLD.source, CROWD_KEY, *WORKER_KEYS)}
CHECKS = ["records", "tree heads", "artifacts", "dataset", "policy", "runs", "routing"]


@dataclass
class ListSource:
    """A bundle stand-in: records in order and artifacts by digest."""

    recs: list[bytes]
    arts: dict[bytes, bytes]

    def records(self) -> Iterator[tuple[int, bytes]]:
        return iter(enumerate(self.recs))

    def artifact(self, digest: bytes) -> bytes | None:
        return self.arts.get(digest)


@dataclass
class Item:
    type: str
    time: int
    body: dict[str, Any]
    signer: bytes


def items_of(recs: list[bytes]) -> list[Item]:
    return [Item(s.type, s.time, s.body, s.signer) for s in map(unseal, recs)]


def reseal(items: list[Item], keep_heads: frozenset[int] = frozenset()) -> list[bytes]:
    """Sign a chain of records from bodies with the original keys; tree heads get the new roots
    except at the seqs in ``keep_heads``."""
    out: list[bytes] = []
    prev, tree = GENESIS_PREV, CompactRange()
    for seq, it in enumerate(items):
        body = it.body
        if it.type == "TreeHead" and seq not in keep_heads:
            body = {**body, "size": seq, "root": tree.root()}
        sealed = seal(it.type, seq, prev, it.time, body, KEYS[it.signer])
        out.append(sealed.record)
        prev = sealed.record_hash
        tree.append(sealed.leaf_hash)
    return out


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> ListSource:
    before = torch.are_deterministic_algorithms_enabled()
    led, _ = full_run(tmp_path_factory.mktemp("honest") / "ledger")
    torch.use_deterministic_algorithms(before)
    return ListSource([r for _, r in led.records()], dict(led.artifacts()))


def verify(source: ListSource, roots: list[bytes] = ROOTS) -> tuple[Report, Structure | None]:
    report = Report()
    return report, check_structure(source, roots, report)


def first_failure(source: ListSource) -> tuple[str, int | None, str]:
    report, structure = verify(source)
    failure = report.first_failure
    assert failure is not None and structure is None, report.render()
    return failure.name, failure.seq, failure.detail


def seq_of(items: list[Item], type_name: str, nth: int = 0) -> int:
    return [i for i, it in enumerate(items) if it.type == type_name][nth]


# -- the honest run ------------------------------------------------------------------------


def test_reseal_reproduces_the_honest_records(honest: ListSource) -> None:
    # The tamper helper itself: re-signing unchanged bodies gives the same bytes.
    assert reseal(items_of(honest.recs)) == honest.recs


def test_honest_run_passes_every_check(honest: ListSource) -> None:
    progress: list[int] = []
    report = Report()
    structure = check_structure(honest, ROOTS, report, progress.append)
    assert [c.name for c in report.checks] == CHECKS
    assert all(c.status == "pass" for c in report.checks), report.render()
    assert report.verified and structure is not None
    assert progress == list(range(len(honest.recs)))
    assert len(structure.observations) == len(honest.recs)
    (run_seq,) = [s for s, r in structure.runs.items() if r.governed]
    run = structure.runs[run_seq]
    assert len(run.updates) == 8 and run.dataset_seq in structure.datasets and run.policy_seq in structure.policies
    table = structure.routing[run_seq]
    assert len(table) == len(MANIFESTS)
    # The independent routing agrees with the trainer's, example by example.
    for i, m in enumerate(MANIFESTS):
        want = route(POLICY, m.manifest, PATHS)
        assert (table[i].rule, table[i].profile, table[i].label) == (want.rule, want.profile, m.label)
        assert set(table[i].sources) == set(m.source_names)
    assert "committed without inputs" in report.checks[3].detail
    # The registry before the dataset commitment lacks nothing the manifests need, and
    # before the crowd authority's issuance lacks the crowd.
    assert CROWD_KEY.key_id not in structure.registry_at(5).by_key_id
    assert CROWD_KEY.key_id in structure.registry_at(6).by_key_id


def test_untrusted_root_fails_records_at_zero(honest: ListSource) -> None:
    report, structure = verify(honest, [SigningKey.from_seed(b"x" * 32).public_key])
    assert structure is None
    assert (report.first_failure.name, report.first_failure.seq) == ("records", 0)
    assert "trusted" in report.first_failure.detail


# -- the records check -------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_flipped_byte_fails_records_at_its_seq(honest: ListSource, data: st.DataObject) -> None:
    seq = data.draw(st.integers(0, len(honest.recs) - 1), label="seq")
    record = honest.recs[seq]
    pos = data.draw(st.integers(0, len(record) - 1), label="pos")
    bit = data.draw(st.integers(0, 7), label="bit")
    tampered = bytearray(record)
    tampered[pos] ^= 1 << bit
    recs = list(honest.recs)
    recs[seq] = bytes(tampered)
    assert first_failure(ListSource(recs, honest.arts))[:2] == ("records", seq)


def test_dropped_reordered_inserted_records_fail_records(honest: ListSource) -> None:
    k = seq_of(items_of(honest.recs), "GovernedUpdate", 2)
    dropped = honest.recs[:k] + honest.recs[k + 1 :]
    assert first_failure(ListSource(dropped, honest.arts))[:2] == ("records", k)
    swapped = list(honest.recs)
    swapped[k], swapped[k + 1] = swapped[k + 1], swapped[k]
    assert first_failure(ListSource(swapped, honest.arts))[:2] == ("records", k)
    inserted = honest.recs[: k + 1] + [honest.recs[k]] + honest.recs[k + 1 :]
    assert first_failure(ListSource(inserted, honest.arts))[:2] == ("records", k + 1)


def test_forged_credential_fails_records(honest: ListSource) -> None:
    items = items_of(honest.recs)
    k = next(i for i, it in enumerate(items) if it.type == "CredentialIssued"
             and C.parse(it.body["credential"]).subject == "crowd")
    rogue = SigningKey.from_seed(b"r" * 32, "rogue")
    cred = C.parse(it_cred := items[k].body["credential"]).to_map()
    data = encoding.encode(cred)  # claims the root as issuer, signed by a rogue key
    items[k] = Item("CredentialIssued", items[k].time, {"credential": encoding.encode([data, rogue.sign("credential", data)])},
                    items[k].signer)
    assert items[k].body["credential"] != it_cred
    name, seq, detail = first_failure(ListSource(reseal(items), honest.arts))
    assert (name, seq) == ("records", k) and "forged" in detail


def test_trainer_key_used_after_its_revocation_fails_records(honest: ListSource) -> None:
    items = items_of(honest.recs)
    k = seq_of(items, "GovernedUpdate", 3)
    revocation = Item("CredentialRevoked", items[k - 1].time, {"key_id": WORLD.trainer.key_id, "reason": "key leaked"},
                      WORLD.root.key_id)
    items.insert(k, revocation)
    name, seq, detail = first_failure(ListSource(reseal(items), honest.arts))
    assert (name, seq) == ("records", k + 1) and "revoked" in detail


def test_source_revoked_before_the_commit_fails_dataset(honest: ListSource) -> None:
    items = items_of(honest.recs)
    k = seq_of(items, "DatasetCommitted")
    items.insert(k, Item("CredentialRevoked", items[k - 1].time,
                         {"key_id": WORKER_CREDS[1].key_id, "reason": "spammer"}, CROWD_KEY.key_id))
    name, seq, detail = first_failure(ListSource(reseal(items), honest.arts))
    assert (name, seq) == ("dataset", k + 1) and "worker-1" in detail and "revoked" in detail


# -- the dataset check ----------------------------------------------------------------------------


def _relabeled_artifact() -> bytes:
    i = 3  # a single-source manifest by dr-a
    m = MANIFESTS[i].manifest
    assert [s["source"] for s in m["sources"]] == ["dr-a"]
    new = (m["label"] + 1) % 10
    src = [{**m["sources"][0], "vote": new}]
    forged = sign_manifest(example=m["example"], label=new, sources=src, aggregation="single",
                           consensus=m["consensus"], confidence=m["confidence"], ontology=m["ontology"],
                           review=m["review"], key=WORLD.source, time=m["time"])
    return encode_manifests([*MANIFESTS[:i], forged, *MANIFESTS[i + 1 :]])


def test_relabeled_manifest_fails_dataset_root(honest: ListSource) -> None:
    items = items_of(honest.recs)
    k = seq_of(items, "DatasetCommitted")
    artifact = _relabeled_artifact()
    digest = hashlib.sha256(artifact).digest()
    items[k] = Item(items[k].type, items[k].time, {**items[k].body, "manifests": digest}, items[k].signer)
    source = ListSource(reseal(items), {**honest.arts, digest: artifact})
    name, seq, detail = first_failure(source)
    assert (name, seq) == ("dataset", k) and "root" in detail


def test_substituted_manifests_artifact_fails_dataset(honest: ListSource) -> None:
    items = items_of(honest.recs)
    k = seq_of(items, "DatasetCommitted")
    arts = {**honest.arts, items[k].body["manifests"]: _relabeled_artifact()}
    name, seq, detail = first_failure(ListSource(honest.recs, arts))
    assert (name, seq) == ("artifacts", k) and "hash" in detail
    del arts[items[k].body["manifests"]]
    name, seq, detail = first_failure(ListSource(honest.recs, arts))
    assert (name, seq) == ("artifacts", k) and "not in the bundle" in detail


def test_inputs_artifact_rows_are_checked(tmp_path: Path) -> None:
    led = crowd_ledger(tmp_path / "inputs", WORLD)
    ds = commit_dataset(led, MANIFESTS, "digits", WORLD.trainer, inputs=X)
    source = ListSource([r for _, r in led.records()], dict(led.artifacts()))
    report, structure = verify(source)
    assert report.verified and "inputs checked row by row" in report.checks[3].detail, report.render()
    # Without the inputs in the bundle the artifacts check fails, naming the commitment and the digest.
    bare = ListSource(source.recs, {d: a for d, a in source.arts.items() if d != ds.data})
    name, seq, detail = first_failure(bare)
    assert (name, seq) == ("artifacts", ds.seq) and ds.data.hex() in detail and "not in the bundle" in detail
    # A changed row under a re-signed commitment fails, naming the row.
    x = X.clone()
    x[17, 5] += 1.0 / 16
    from safetensors.torch import save

    data = save({"x": x})
    digest = hashlib.sha256(data).digest()
    items = items_of(source.recs)
    items[ds.seq] = Item("DatasetCommitted", items[ds.seq].time, {**items[ds.seq].body, "data": digest},
                         WORLD.trainer.key_id)
    name, seq, detail = first_failure(ListSource(reseal(items), {**source.arts, digest: data}))
    assert (name, seq) == ("dataset", ds.seq) and "row 17" in detail
    assert encode_inputs(X, MANIFESTS) == source.arts[ds.data]


# -- the policy and runs checks -------------------------------------------------------------------


def test_policy_signed_by_an_authority_fails_policy(honest: ListSource) -> None:
    items = items_of(honest.recs)
    k = seq_of(items, "PolicyAdopted")
    bad = sign_policy(POLICY_FIELDS, WORLD.authority, 10)
    items[k] = Item("PolicyAdopted", items[k].time, {"policy": bad.signed, "digest": bad.digest}, items[k].signer)
    name, seq, detail = first_failure(ListSource(reseal(items), honest.arts))
    assert (name, seq) == ("policy", k) and "governance root" in detail


def test_step_numbering_and_run_settings(honest: ListSource) -> None:
    items = items_of(honest.recs)
    k = seq_of(items, "GovernedUpdate", 4)
    skipped = [Item(it.type, it.time, dict(it.body), it.signer) for it in items]
    skipped[k].body["step"] = 5
    name, seq, detail = first_failure(ListSource(reseal(skipped), honest.arts))
    assert (name, seq) == ("runs", k) and "step 5" in detail
    r = seq_of(items, "RunStarted", 1)
    settings_ = dict(items[r].body["settings"])
    settings_["dataset"] = {**settings_["dataset"], "seq": seq_of(items, "PolicyAdopted")}
    moved = list(items)
    moved[r] = Item("RunStarted", items[r].time, {**items[r].body, "settings": settings_}, items[r].signer)
    name, seq, detail = first_failure(ListSource(reseal(moved), honest.arts))
    assert (name, seq) == ("runs", r) and "not a DatasetCommitted" in detail


# -- the routing check -----------------------------------------------------------------------------


def _edit_update(honest: ListSource, edit: Callable[[dict[str, Any]], int | None]) -> tuple[list[bytes], int, int]:
    """Apply ``edit`` to the first GovernedUpdate body it accepts (returns not None); re-sign the chain."""
    items = items_of(honest.recs)
    for k, it in enumerate(items):
        if it.type != "GovernedUpdate":
            continue
        body = encoding.decode(encoding.encode(it.body))  # a deep copy
        if edit(body) is not None:
            items[k] = Item(it.type, it.time, body, it.signer)
            return reseal(items), k, body["step"]
    raise AssertionError("no update to edit")


def test_low_confidence_example_let_into_a_deep_band_fails_routing(honest: ListSource) -> None:
    where: list[int] = []

    def promote(body: dict[str, Any]) -> int | None:
        rules = body["routing"]["rules"]
        if -1 not in rules:
            return None
        j = rules.index(-1)  # a low-confidence crowd label: the policy lets it tune the head only
        rules[j] = 1  # ... recorded as "expert", which writes into every band,
        body["authority_writes"]["acme/crowd/mturk"][1] += 1.0  # with its writes to match
        body["authority_writes"]["acme/crowd/mturk"][2] += 1.0
        where.append(j)
        return j

    recs, k, step = _edit_update(honest, promote)
    report, _ = verify(ListSource(recs, honest.arts))
    failure = report.first_failure
    assert (failure.name, failure.seq, failure.step) == ("routing", k, step)
    assert f"batch position {where[0]}" in failure.detail and "default" in failure.detail
    assert [c.status for c in report.checks[:-1]] == ["pass"] * 6


def test_tampered_writes_limits_sources_and_batch_fail_routing(honest: ListSource) -> None:
    def writes(body: dict[str, Any]) -> int:
        body["authority_writes"]["acme/crowd/mturk"][2] = 1.0  # the policy gives crowd labels 0 there
        return 0

    def limits(body: dict[str, Any]) -> int:
        body["routing"]["limits"] = [None, None, None]
        return 0

    def sources(body: dict[str, Any]) -> int:
        body["sources"] = body["sources"][:-1]
        return 0

    def outside(body: dict[str, Any]) -> int:
        body["batch"][0] = len(MANIFESTS)
        return 0

    for edit, words in ((writes, "acme/crowd/mturk"), (limits, "limits"), (sources, "sources"), (outside, "outside")):
        recs, k, step = _edit_update(honest, edit)
        name, seq, detail = first_failure(ListSource(recs, honest.arts))
        assert (name, seq) == ("routing", k) and words in detail, (edit.__name__, detail)


# -- the tree heads check ---------------------------------------------------------------------------


def test_tree_head_from_a_different_history_fails_tree_heads(honest: ListSource) -> None:
    items = items_of(honest.recs)
    k = seq_of(items, "TreeHead", 1)
    # The root this log would have had if an update had been left out.
    other = reseal([it for i, it in enumerate(items[:k]) if i != k - 2])
    tree = CompactRange()
    for r in other:
        tree.append(unseal(r).leaf_hash)
    items[k] = Item("TreeHead", items[k].time, {**items[k].body, "root": tree.root()}, items[k].signer)
    report, structure = verify(ListSource(reseal(items, keep_heads=frozenset({k})), honest.arts))
    failure = report.first_failure
    assert structure is None and (failure.name, failure.seq) == ("tree heads", k), report.render()
    assert "different history" in failure.detail


# -- an unlearning branch -----------------------------------------------------------------------------


def test_unlearning_branch_is_routed_without_the_retired_source(tmp_path: Path) -> None:
    import test_unlearning as U
    from gradledger.training.retirement import dependents, retire
    from gradledger.training.unlearning import unlearn

    before = torch.are_deterministic_algorithms_enabled()
    led, ds = U.new_ledger(tmp_path / "unlearned", U.MANIFESTS, U.X)
    U.governed_run(led, ds, U.X)
    retire(led, U.FAULTY, CROWD_KEY, "swaps 3 and 8")
    result = unlearn(led, U.FAULTY, WORLD.trainer)
    torch.use_deterministic_algorithms(before)
    source = ListSource([r for _, r in led.records()], dict(led.artifacts()))
    report, structure = verify(source)
    assert report.verified and structure is not None, report.render()
    branch = structure.runs[result.branch_seq]
    assert (branch.retired, branch.branch_of) == (U.FAULTY, structure.runs[branch.branch_of].seq)
    deps = dependents(U.MANIFESTS, U.FAULTY)
    table = structure.routing[result.branch_seq]
    assert [i for i, r in enumerate(table) if r is None] == sorted(deps.removed)
    assert all(table[i].label == fields["label"] for i, fields in deps.relabeled.items())
    # Training a removed example on the branch is caught, naming the update.
    items = items_of(source.recs)
    k = branch.updates[0]
    body = encoding.decode(encoding.encode(items[k].body))
    body["batch"].append(deps.removed[0])
    body["example_losses"] += body["example_losses"][:4]  # one loss per index: the forger keeps the form
    items[k] = Item("GovernedUpdate", items[k].time, body, items[k].signer)
    name, seq, detail = first_failure(ListSource(reseal(items), source.arts))
    assert (name, seq) == ("routing", k) and "lost every vote" in detail
