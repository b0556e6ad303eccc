"""The verifier's checks of unlearning certificates (specs/unlearning.md §5, specs/verification.md).

One honest ledger (tests/test_unlearning.py's digits run, ``worker-2`` retired and unlearned) and
forgeries of it, re-signed with the original keys so that every structural check still passes and
only the certificate checks (or replay) can catch them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

import test_unlearning as U
from gradledger.ledger import encoding
from gradledger.ledger.envelope import unseal
from gradledger.training.checkpoints import make_checkpoint, read_checkpoint, restore
from gradledger.training.retirement import dependents, retire
from gradledger.training.unlearning import UnlearningResult, unlearn
from gradledger.verify import Verifier, VerificationPolicy
from gradledger.verify._internal.certificates import check_certificates, dependency
from gradledger.verify._internal.structure import check_structure
from gradledger.verify.report import Report
from helpers import CROWD_KEY
from test_verify_structure import Item, ListSource, items_of, reseal

ROOTS = [U.WORLD.root.public_key]


@pytest.fixture(scope="module")
def unlearned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, UnlearningResult, ListSource]]:
    before = torch.are_deterministic_algorithms_enabled()
    path = tmp_path_factory.mktemp("cert") / "ledger"
    led, ds = U.new_ledger(path, U.MANIFESTS, U.X)
    U.governed_run(led, ds, U.X)
    retire(led, U.FAULTY, CROWD_KEY, "swaps 3 and 8")
    result = unlearn(led, U.FAULTY, U.WORLD.trainer)
    source = ListSource([r for _, r in led.records()], dict(led.artifacts()))
    led.close()
    torch.use_deterministic_algorithms(before)
    yield path, result, source


def verify(source: ListSource, replay: str = "none", fraction: float = 0.25) -> Report:
    policy = VerificationPolicy(replay=replay, sample_fraction=fraction)  # type: ignore[arg-type]
    return Verifier(ROOTS, policy)._verify(source, "", False)  # type: ignore[arg-type]


def failure(report: Report) -> tuple[str, int | None, int | None, str]:
    f = report.first_failure
    assert f is not None, report.render()
    return f.name, f.seq, f.step, f.detail


def copy_body(item: Item) -> dict[str, Any]:
    return encoding.decode(encoding.encode(item.body))


def edit(items: list[Item], k: int, change: Callable[[dict[str, Any]], None]) -> None:
    body = copy_body(items[k])
    change(body)
    items[k] = Item(items[k].type, items[k].time, body, items[k].signer)


def forged(source: ListSource, change: Callable[[list[Item], dict[bytes, bytes]], None]) -> ListSource:
    items, arts = items_of(source.recs), dict(source.arts)
    change(items, arts)
    return ListSource(reseal(items), arts)


def put(arts: dict[bytes, bytes], data: bytes) -> bytes:
    digest = hashlib.sha256(data).digest()
    arts[digest] = data
    return digest


def seqs(items: list[Item], type_name: str, lo: int = 0, hi: int | None = None) -> list[int]:
    return [k for k, it in enumerate(items) if it.type == type_name and k >= lo and (hi is None or k < hi)]


def set_artifact(items: list[Item], key: str, digest: bytes) -> None:
    """Point both the certificate and its branch's settings at artifact ``digest``."""
    (cert,) = seqs(items, "UnlearningCertificate")
    branch = max(seqs(items, "RunStarted", hi=cert))
    edit(items, cert, lambda b: b.__setitem__(key, digest))
    edit(items, branch, lambda b: b["settings"]["branch"].__setitem__(key, digest))


# -- the honest ledger ------------------------------------------------------------------------


def test_honest_certificate_verifies_end_to_end(unlearned: Any) -> None:
    path, result, _ = unlearned
    report = Verifier(ROOTS, VerificationPolicy(replay="full")).verify(path)
    assert report.verified, report.render()
    (check,) = [c for c in report.checks if c.name == "certificates"]
    assert check.status == "pass" and "1 unlearning certificate(s), 1 exact" in check.detail
    assert [c.name for c in report.checks][-4:] == ["certificates", "heads", "environment", "replay"]
    (cert,) = report.to_json()["certificates"]
    assert {k: cert[k] for k in ("seq", "source", "mode", "branch_run", "status", "replay")} == {
        "seq": result.certificate_seq, "source": U.FAULTY, "mode": "exact", "branch_run": result.branch_seq,
        "status": "pass", "replay": "pass"}
    assert cert["detail"].startswith("exact:") and "15 removed, 20 relabeled" in cert["detail"]
    assert "rewinds to step 3" in cert["detail"]


def test_sample_replay_always_covers_the_certified_branch(unlearned: Any) -> None:
    _, result, source = unlearned
    report = verify(source, "sample", fraction=0.01)
    assert report.verified, report.render()
    # 4 original + 3 branch segments; the challenge draws one, the branch's three are forced in.
    assert report.figures["sample_segments"] in ("3 of 7", "4 of 7")
    assert report.figures["certified_branch_segments"] + 1 == int(report.figures["sample_segments"][0])
    assert report.certificates[0]["replay"] == "pass"
    assert verify(source, "none").certificates[0]["replay"] == "skip"


def test_replay_certificates_replays_exactly_the_branch(unlearned: Any) -> None:
    _, _, source = unlearned
    report = verify(source, "certificates")
    assert report.verified and report.certificates[0]["replay"] == "pass", report.render()
    assert report.figures["certified_branch_segments"] == "3 of 7"
    items = items_of([r for _, r in source.records()])
    branch = report.certificates[0]["branch_run"]
    branch_steps = sum(1 for i, it in enumerate(items) if it.type == "GovernedUpdate" and i > branch)
    assert report.figures["replayed_steps"] == branch_steps < verify(source, "full").figures["replayed_steps"]


@pytest.mark.parametrize("name", [U.FAULTY, U.BATCH_OWNER, "worker-0", "worker-1", "nobody"])
def test_dependency_rule_agrees_with_the_trainer(name: str) -> None:
    deps = dependents(U.MANIFESTS, name)
    mine = dependency([m.manifest for m in U.MANIFESTS], name)
    assert mine.removed == deps.removed
    assert mine.relabeled == [[i, y] for i, y in deps.labels().items()]


def test_no_certificate_no_check(tmp_path: Path) -> None:
    led, ds = U.new_ledger(tmp_path / "ledger", U.MANIFESTS[:24], U.X[:24])
    source = ListSource([r for _, r in led.records()], dict(led.artifacts()))
    led.close()
    report = verify(source)
    assert report.verified and "certificates" not in [c.name for c in report.checks] and report.certificates == []


# -- forgeries ----------------------------------------------------------------------------------


def test_rewind_after_an_update_of_the_source_fails(unlearned: Any) -> None:
    """The certificate claims a rewind to step 6 (its checkpoint), but step 4 already used worker-2."""
    _, result, source = unlearned
    items = items_of(source.recs)
    b = result.branch_seq
    original_ckpts = {items[k].body["step"]: k for k in seqs(items, "Checkpoint", hi=b)}
    first_update = [k for k in seqs(items, "GovernedUpdate", hi=b) if items[k].body["step"] == U.FIRST_STEP][0]

    def change(items: list[Item], arts: dict[bytes, bytes]) -> None:
        branch_ckpts = seqs(items, "Checkpoint", lo=b)
        at6 = [k for k in branch_ckpts if items[k].body["step"] == 6][0]
        o6 = items[original_ckpts[6]]
        items[at6] = Item("Checkpoint", items[at6].time, copy_body(o6), items[at6].signer)
        del items[b + 1:at6]  # the branch now starts at step 6
        edit(items, b, lambda body: body["settings"]["branch"].__setitem__("rewind", original_ckpts[6]))
        (cert,) = seqs(items, "UnlearningCertificate")
        edit(items, cert, lambda body: body.__setitem__("rewind_checkpoint", o6.body["digest"]))

    report = verify(forged(source, change))
    name, seq, step, detail = failure(report)
    assert (name, seq, step) == ("certificates", first_update, U.FIRST_STEP)
    assert "rewinds to step 6" in detail and "lists 'worker-2'" in detail
    assert report.certificates[0]["status"] == "fail" and report.certificates[0]["replay"] is None


@pytest.mark.parametrize("key", ["removed", "relabeled"])
def test_artifact_that_omits_an_example_fails(unlearned: Any, key: str) -> None:
    _, result, source = unlearned
    deps = dependents(U.MANIFESTS, U.FAULTY)
    full = deps.removed if key == "removed" else [[i, y] for i, y in deps.labels().items()]
    omitted = full[4] if key == "removed" else full[4][0]

    def change(items: list[Item], arts: dict[bytes, bytes]) -> None:
        set_artifact(items, key, put(arts, encoding.encode(full[:4] + full[5:])))

    name, seq, _, detail = failure(verify(forged(source, change)))
    assert name == "certificates" and seq is not None
    assert f"UnlearningCertificate {seq}" in detail and f"{key} artifact omits index {omitted}" in detail


def test_relabeled_artifact_with_a_wrong_label_fails(unlearned: Any) -> None:
    _, _, source = unlearned
    pairs = [[i, y] for i, y in dependents(U.MANIFESTS, U.FAULTY).labels().items()]
    pairs[0] = [pairs[0][0], (pairs[0][1] + 1) % 10]

    def change(items: list[Item], arts: dict[bytes, bytes]) -> None:
        set_artifact(items, "relabeled", put(arts, encoding.encode(pairs)))

    name, _, _, detail = failure(verify(forged(source, change)))
    assert name == "certificates" and f"gives index {pairs[0][0]} label {pairs[0][1]}" in detail


def test_branch_that_keeps_a_removed_example_fails(unlearned: Any) -> None:
    _, result, source = unlearned
    removed = dependents(U.MANIFESTS, U.FAULTY).removed
    items = items_of(source.recs)
    k = seqs(items, "GovernedUpdate", lo=result.branch_seq)[1]  # step 4, the first that lost examples
    step = items[k].body["step"]
    (orig,) = [u.body for u in items[:result.branch_seq] if u.type == "GovernedUpdate" and u.body["step"] == step]
    pos, keep = next((j, i) for j, i in enumerate(orig["batch"]) if i in removed)

    def keep_removed(body: dict[str, Any]) -> None:
        body["batch"].insert(pos, keep)
        # One loss per index, as format 4 requires: the forger keeps the record well formed.
        body["example_losses"] = body["example_losses"][:4 * pos] + body["example_losses"][4 * pos:4 * pos + 4] + \
            body["example_losses"][4 * pos:]

    def change(items: list[Item], arts: dict[bytes, bytes]) -> None:
        edit(items, k, keep_removed)

    bad = forged(source, change)
    # The structural routing check already refuses it ...
    name, seq, got_step, detail = failure(verify(bad))
    assert (name, seq, got_step) == ("routing", k, step) and "lost every vote" in detail
    # ... and the certificate check refuses it on its own too (defence in depth).
    honest = Report()
    structure = check_structure(source, ROOTS, honest)
    assert structure is not None
    structure.observations[k] = unseal(bad.recs[k])
    report = Report()
    check_certificates(bad, structure, report)
    ((check,), (cert,)) = report.checks, report.certificates
    assert (check.name, check.status, check.seq, check.step) == ("certificates", "fail", k, step)
    assert f"UnlearningCertificate {result.certificate_seq}" in check.detail and f"position {pos} is {keep}" in check.detail
    assert cert["status"] == "fail" and cert["branch_run"] == result.branch_seq


def test_branch_batch_reordered_fails(unlearned: Any) -> None:
    _, result, source = unlearned
    items = items_of(source.recs)
    k = seqs(items, "GovernedUpdate", lo=result.branch_seq)[2]
    body = items[k].body
    rules = body["routing"]["rules"]
    a, c = next((a, c) for a in range(len(rules)) for c in range(a + 1, len(rules))
                if rules[a] == rules[c] and body["batch"][a] != body["batch"][c])

    def change(items: list[Item], arts: dict[bytes, bytes]) -> None:
        def swap(b: dict[str, Any]) -> None:
            b["batch"][a], b["batch"][c] = b["batch"][c], b["batch"][a]
        edit(items, k, swap)

    name, seq, step, detail = failure(verify(forged(source, change)))
    assert (name, seq, step) == ("certificates", k, body["step"])
    assert f"position {a} is {body['batch'][c]}" in detail and "in its order" in detail


@pytest.mark.parametrize("which", ["earlier_branch_checkpoint", "original_head"])
def test_new_head_that_is_not_the_branch_final_checkpoint_fails(unlearned: Any, which: str) -> None:
    _, result, source = unlearned
    items = items_of(source.recs)
    branch_ckpts = seqs(items, "Checkpoint", lo=result.branch_seq)
    head = items[branch_ckpts[-2]].body["digest"] if which == "earlier_branch_checkpoint" else result.original_head

    def change(items: list[Item], arts: dict[bytes, bytes]) -> None:
        edit(items, result.certificate_seq, lambda b: b.__setitem__("new_head", head))

    name, seq, _, detail = failure(verify(forged(source, change)))
    assert (name, seq) == ("certificates", result.certificate_seq)
    assert f"is not the digest of the branch's last Checkpoint {branch_ckpts[-1]}" in detail


def _ascended(source: ListSource, result: UnlearningResult) -> tuple[dict[str, Any], bytes]:
    """A 'fine-tuned unlearning': gradient ascent on worker-2's examples from the original head."""
    items = items_of(source.recs)
    head = items[[k for k in seqs(items, "Checkpoint", hi=result.branch_seq)][-1]].body
    model = U.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    tensors, scalars = read_checkpoint(source.arts[head["artifact"]], head)
    restore(model, opt, tensors, scalars)
    deps = dependents(U.MANIFESTS, U.FAULTY)
    index = torch.tensor(sorted(deps.affected))
    wrong = torch.tensor([U.MANIFESTS[i].label for i in index.tolist()])
    for _ in range(3):
        opt.zero_grad()
        (-torch.nn.functional.cross_entropy(model(U.X[index]), wrong)).backward()
        opt.step()
    made = make_checkpoint(head["step"], model, opt)
    data = bytes(made.data)  # the trainer writes a bytearray; a source serves bytes
    return made.body(hashlib.sha256(data).digest()), data


def test_fine_tuned_certificate_fails_replay(unlearned: Any) -> None:
    """The branch's final checkpoint is the original head after gradient ascent, not the replay's result."""
    _, result, source = unlearned
    body, data = _ascended(source, result)
    final = seqs(items_of(source.recs), "Checkpoint", lo=result.branch_seq)[-1]

    def change(items: list[Item], arts: dict[bytes, bytes]) -> None:
        put(arts, data)
        items[final] = Item("Checkpoint", items[final].time, body, items[final].signer)
        edit(items, result.certificate_seq, lambda b: b.__setitem__("new_head", body["digest"]))

    bad = forged(source, change)
    # Sampling one segment in a hundred still replays the branch: the certificate rests on it.
    report = verify(bad, "sample", fraction=0.01)
    name, seq, step, detail = failure(report)
    assert (name, seq, step) == ("replay", final, U.STEPS) and "differs from the replayed state" in detail
    (cert,) = report.certificates
    assert (cert["status"], cert["replay"]) == ("pass", "fail")  # bookkeeping right, weights not the replay's
    assert not report.verified


def test_fine_tuned_updates_instead_of_the_recorded_batches_fail(unlearned: Any) -> None:
    """A branch that records steps on the source's examples (its fine-tuning) is not the original minus them."""
    _, result, source = unlearned
    affected = sorted(dependents(U.MANIFESTS, U.FAULTY).relabeled)
    items = items_of(source.recs)
    k = seqs(items, "GovernedUpdate", lo=result.branch_seq)[-1]
    step = items[k].body["step"]

    def change(items: list[Item], arts: dict[bytes, bytes]) -> None:
        def ascend(b: dict[str, Any]) -> None:
            b["batch"] = affected[: len(b["routing"]["rules"])]
            b["example_losses"] = (b["example_losses"] * 2)[: 4 * len(b["batch"])]  # kept well formed
        edit(items, k, ascend)

    report = verify(forged(source, change))
    name, seq, got, _ = failure(report)
    # Relabeled examples route differently from the batch they replace: routing or the certificate catches it.
    assert (seq, got) == (k, step) and name in ("routing", "certificates")


def test_approximate_certificate_is_reported_as_approximate(unlearned: Any) -> None:
    _, result, source = unlearned

    def change(items: list[Item], arts: dict[bytes, bytes]) -> None:
        edit(items, result.certificate_seq, lambda b: b.__setitem__("mode", "approximate"))

    report = verify(forged(source, change), "sample", fraction=0.01)
    assert report.verified, report.render()
    (cert,) = report.certificates
    assert (cert["mode"], cert["status"], cert["replay"]) == ("approximate", "pass", "pass")
    assert cert["detail"].startswith("APPROXIMATE (not an exact unlearning")
    (check,) = [c for c in report.checks if c.name == "certificates"]
    assert "0 exact; 1 approximate" in check.detail and "NOT an exact unlearning" in check.detail


def test_second_certificate_for_the_same_branch_fails(unlearned: Any) -> None:
    _, result, source = unlearned
    q = result.certificate_seq

    def change(items: list[Item], arts: dict[bytes, bytes]) -> None:
        items.insert(q + 1, items[q])

    report = verify(forged(source, change))
    name, seq, _, detail = failure(report)
    assert (name, seq) == ("certificates", q + 1) and f"already closed by UnlearningCertificate {q}" in detail
    assert [c["status"] for c in report.certificates] == ["pass", "fail"]


# -- other honest branches ------------------------------------------------------------------------


def test_skipped_step_and_a_second_certificate_verify(unlearned: Any, tmp_path: Path) -> None:
    """worker-3 alone labels all of step 8: its branch skips that step and still verifies."""
    import shutil

    from gradledger.ledger.ledger import Ledger

    path = tmp_path / "ledger"
    shutil.copytree(unlearned[0], path)
    before = torch.are_deterministic_algorithms_enabled()
    with Ledger.open(path, writable=True) as led:
        retire(led, U.BATCH_OWNER, CROWD_KEY, "owns one whole batch")
        second = unlearn(led, U.BATCH_OWNER, U.WORLD.trainer, run_id="digits-run")
    torch.use_deterministic_algorithms(before)
    assert second.skipped_steps == [U.OWNED_STEP]
    report = Verifier(ROOTS, VerificationPolicy(replay="sample", sample_fraction=0.01)).verify(path)
    assert report.verified, report.render()
    assert [(c["source"], c["status"], c["replay"]) for c in report.certificates] == [
        (U.FAULTY, "pass", "pass"), (U.BATCH_OWNER, "pass", "pass")]
    assert f"steps [{U.OWNED_STEP}] skipped" in report.certificates[1]["detail"]
    # 3 + 2 branch segments are replayed, whether or not the one-segment draw landed on one of them.
    forced, (k, total) = report.figures["certified_branch_segments"], report.figures["sample_segments"].split(" of ")
    assert forced in (4, 5) and int(k) == forced + 1 and int(total) == 4 + 3 + 2


def test_rewind_earlier_than_needed_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewind to step 0 recomputes more than needed; still exact (specs/unlearning.md §5 item 5)."""
    from gradledger.training import unlearning as UL

    real = UL.first_affected_update

    def earliest(ledger: Any, run: Any, source: str, affected: Any) -> Any:
        return run.updates[0] if real(ledger, run, source, affected) is not None else None

    before = torch.are_deterministic_algorithms_enabled()
    led, ds = U.new_ledger(tmp_path / "ledger", U.MANIFESTS, U.X)
    U.governed_run(led, ds, U.X)
    retire(led, U.FAULTY, CROWD_KEY, "swaps 3 and 8")
    monkeypatch.setattr(UL, "first_affected_update", earliest)
    result = unlearn(led, U.FAULTY, U.WORLD.trainer)
    torch.use_deterministic_algorithms(before)
    assert result.rewind_step == 0
    source = ListSource([r for _, r in led.records()], dict(led.artifacts()))
    led.close()
    report = verify(source, "none")
    assert report.verified, report.render()
    (cert,) = report.certificates
    assert cert["status"] == "pass" and "earlier than needed (checkpoint at step 3)" in cert["detail"]
