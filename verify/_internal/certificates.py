"""The verifier's checks of unlearning certificates (specs/unlearning.md §5, specs/verification.md).

A certificate claims that a branch run is its original run with a retired source's examples
removed or relabeled, replayed from a checkpoint no update of the source precedes. Everything here
is recomputed from the structure (records, committed manifests, the dependency rule of
``relabel_without``); nothing is taken from the trainer. Replay of the branch (check 7) is the
verifier's ordinary replay; ``verifier.py`` records its outcome on each certificate.

Nothing here imports the training package.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

from gradledger.ledger import encoding
from gradledger.ledger.credentials import is_below
from gradledger.ledger.envelope import Sealed
from gradledger.ledger.errors import EncodingError

from ..report import Report
from .manifests import relabel_without
from .settings import same_cbor
from .structure import Structure, _short


class Source(Protocol):
    def records(self) -> Iterator[tuple[int, bytes]]: ...
    def artifact(self, digest: bytes) -> bytes | None: ...


class _Failed(Exception):
    def __init__(self, detail: str, seq: int | None = None, step: int | None = None) -> None:
        super().__init__(detail)
        self.detail, self.seq, self.step = detail, seq, step


@dataclass(frozen=True)
class Dependency:
    """The dependency rule (specs/unlearning.md §2) applied to one committed dataset."""

    removed: list[int]  # ascending
    relabeled: list[list[int]]  # [index, new label], ascending by index

    @property
    def affected(self) -> set[int]:
        return set(self.removed) | {i for i, _ in self.relabeled}


def dependency(manifests: list[dict[str, Any]], source: str) -> Dependency:
    """Removed: listed ``source`` and kept no vote; relabeled: listed it and re-aggregated without it."""
    removed, relabeled = [], []
    for i, fields in enumerate(manifests):
        if not any(entry["source"] == source for entry in fields["sources"]):
            continue
        new = relabel_without(fields, source)
        if new is None:
            removed.append(i)
        else:
            relabeled.append([i, new["label"]])
    return Dependency(removed, relabeled)


def check_certificates(source: Source, structure: Structure, report: Report) -> None:
    """Check every UnlearningCertificate; one ``certificates`` Check, one ``report.certificates`` entry each.

    Adds nothing when the log holds no certificate. Every certificate is checked (each entry
    says how it fared); the Check fails naming the first failure, which is the certificate's seq
    or, where one record of the branch or the original run is at fault, that record's seq and step.
    """
    certs = [o for o in structure.observations if o.type == "UnlearningCertificate"]
    if not certs:
        return
    closed: dict[int, int] = {}  # branch RunStarted seq -> the certificate that closes it
    first: _Failed | None = None
    modes = {"exact": 0, "approximate": 0}
    for cert in certs:
        entry: dict[str, Any] = {"seq": cert.seq, "source": cert.body["source"], "mode": cert.body["mode"],
                                 "branch_run": None, "status": "fail", "detail": "", "replay": None}
        try:
            entry["detail"] = _check_one(source, structure, cert, entry, closed)
            entry["status"] = "pass"
            modes[cert.body["mode"]] += 1
        except _Failed as failed:
            entry["detail"] = failed.detail
            if first is None:
                first = failed
        report.certificates.append(entry)
    if first is not None:
        report.add("certificates", "fail", first.detail, seq=first.seq, step=first.step)
        return
    approx = (f"; {modes['approximate']} approximate (bookkeeping checked, the model is NOT an exact unlearning)"
              if modes["approximate"] else "")
    report.add("certificates", "pass", (
        f"{len(certs)} unlearning certificate(s), {modes['exact']} exact{approx}: each names a right retirement, "
        "rewinds before the source's first update, commits to the removed and relabeled examples the dependency "
        "rule gives, and its branch replays exactly the original batches without them (its weights are checked "
        "by replay)"))


def _check_one(source: Source, st: Structure, cert: Sealed, entry: dict[str, Any], closed: dict[int, int]) -> str:
    q, c = cert.seq, cert.body
    s = c["source"]
    where = f"UnlearningCertificate {q}"

    def fail(detail: str, seq: int | None = None, step: int | None = None) -> _Failed:
        return _Failed(f"{where}: {detail}", q if seq is None else seq, step)

    # -- the branch it closes: the latest RunStarted before it --------------------------------
    before = [r for r in st.runs if r < q]
    if not before:
        raise fail("no RunStarted precedes it, so it closes no branch")
    b_seq = max(before)
    entry["branch_run"] = b_seq
    branch = st.runs[b_seq]
    if branch.branch_of is None:
        raise fail(f"the run it closes, {branch.run_id!r} (RunStarted {b_seq}), is not an unlearning branch "
                   "(its settings have no branch)")
    if b_seq in closed:
        raise fail(f"branch {branch.run_id!r} (RunStarted {b_seq}) is already closed by UnlearningCertificate "
                   f"{closed[b_seq]}")
    closed[b_seq] = q
    obs = st.observations
    b_body = obs[b_seq].body
    b = b_body["settings"]["branch"]
    o_seq = b["of"]
    original = st.runs[o_seq]
    o_body = obs[o_seq].body

    # -- 1. the branch is its original run, renamed, with the same settings and program -------
    want_id = f"{original.run_id}/without-{s}"
    if branch.run_id != want_id:
        raise fail(f"its branch is run {branch.run_id!r} (RunStarted {b_seq}), not {want_id!r}", b_seq)
    rest = {k: v for k, v in b_body["settings"].items() if k != "branch"}
    if not same_cbor(rest, o_body["settings"]):
        raise fail(f"the settings of branch RunStarted {b_seq}, without branch, differ from those of its original "
                   f"run (RunStarted {o_seq})", b_seq)
    if not same_cbor(b_body["artifacts"].get("program"), o_body["artifacts"].get("program")):
        raise fail(f"branch RunStarted {b_seq} names another model program than its original run (RunStarted "
                   f"{o_seq})", b_seq)

    # -- 2. the retirement ---------------------------------------------------------------------
    retired = obs[b["retired"]]
    if retired.body["source"] != s:
        raise fail(f"its branch names SourceRetired {retired.seq}, which retires {retired.body['source']!r}, not "
                   f"{s!r}", b_seq)
    cred = st.registry.by_key_id.get(retired.body["key_id"])
    signer = st.registry.by_key_id.get(retired.signer)
    if cred is None or cred.role != "source" or cred.subject != s:
        raise fail(f"SourceRetired {retired.seq} does not name the key of source credential {s!r}", retired.seq)
    if signer is None or not (cred.issuer == signer.key_id or (signer.role == "root" and is_below(cred.path, signer.path))):
        raise fail(f"SourceRetired {retired.seq} is signed by neither the issuer of {s!r} nor a root above it",
                   retired.seq)

    # -- 3. the original run is closed; rewind and original head are its checkpoints ------------
    o_updates = [obs[u].body for u in original.updates]
    o_ckpts = [(k, obs[k].body) for k in original.checkpoints]
    steps = len(o_updates)
    if (not o_ckpts or o_ckpts[0][1]["step"] != 0 or o_ckpts[-1][1]["step"] != steps
            or (original.updates and o_ckpts[-1][0] < original.updates[-1])):
        raise fail(f"its original run {original.run_id!r} (RunStarted {o_seq}) is not closed: it needs checkpoints "
                   f"at step 0 and at step {steps} after its last update", o_seq)
    rewind = obs[b["rewind"]]
    if b["rewind"] not in original.checkpoints:
        raise fail(f"its rewind, Checkpoint {b['rewind']}, is not a checkpoint of the original run (RunStarted "
                   f"{o_seq})", b_seq)
    r_step = rewind.body["step"]
    if rewind.body["digest"] != c["rewind_checkpoint"]:
        raise fail(f"rewind_checkpoint {_short(c['rewind_checkpoint'])} is not the digest of the branch's rewind "
                   f"Checkpoint {rewind.seq} (step {r_step})")
    if c["original_head"] != o_ckpts[-1][1]["digest"]:
        raise fail(f"original_head {_short(c['original_head'])} is not the digest of the original run's last "
                   f"Checkpoint {o_ckpts[-1][0]} (step {steps})")

    # -- 4. the removed and relabeled commitments are the dependency rule ------------------------
    dataset = st.datasets[original.dataset_seq or 0]
    deps = dependency([m.fields for m in dataset.manifests], s)
    for key, want in (("removed", deps.removed), ("relabeled", deps.relabeled)):
        if c[key] != b[key]:
            raise fail(f"{key} {_short(c[key])} differs from the {key} {_short(b[key])} of its branch "
                       f"(RunStarted {b_seq})")
        _check_artifact(source, key, c[key], want, s, fail)

    # -- 5. nothing before the rewind involved the source ----------------------------------------
    affected = deps.affected
    involved = [(seq, u) for seq, u in zip(original.updates, o_updates)
                if s in u["sources"] or affected.intersection(u["batch"])]
    for seq, u in involved:
        if u["step"] >= r_step:
            break
        how = (f"lists {s!r} in its sources" if s in u["sources"] else
               f"trains affected example {min(affected.intersection(u['batch']))}")
        raise fail(f"rewinds to step {r_step}, but GovernedUpdate {seq} (step {u['step']}) of the original run "
                   f"before it {how}: the model at the rewind already carries the source", seq, u["step"])
    note = ""
    if involved:
        first_step = involved[0][1]["step"]
        latest = max(k["step"] for _, k in o_ckpts if k["step"] <= first_step)
        if r_step < latest:
            # Still exact (specs/unlearning.md §5 item 5): it only recomputes more than needed.
            note = f"; rewinds to step {r_step}, earlier than needed (checkpoint at step {latest})"
    else:
        note = "; the source contributed to no update of the original run"

    # -- 6. the branch is the original batches minus the removed examples ------------------------
    removed = set(deps.removed)
    expected: list[tuple[str, int, dict[str, Any] | None, list[int] | None]] = [("Checkpoint", r_step, None, None)]
    pending = [k["step"] for _, k in o_ckpts if k["step"] > r_step]
    skipped = []
    for u in o_updates:
        if u["step"] < r_step:
            continue
        while pending and pending[0] <= u["step"]:
            expected.append(("Checkpoint", pending.pop(0), None, None))
        kept = [i for i in u["batch"] if i not in removed]
        if kept:
            expected.append(("GovernedUpdate", u["step"], u, kept))
        else:
            skipped.append(u["step"])
    expected.extend(("Checkpoint", p, None, None) for p in pending)
    end = min([r for r in st.runs if r > b_seq], default=len(obs))
    records = [o for o in obs[b_seq + 1:end] if o.type in ("GovernedUpdate", "Checkpoint")]
    if b_seq + 1 >= q or obs[b_seq + 1].type != "Checkpoint":
        raise fail(f"the first record of branch RunStarted {b_seq} is not its rewind Checkpoint", b_seq)
    # A second certificate for this branch is that certificate's failure ("already closed").
    late = [o for o in obs[q + 1:end] if o.type in ("GovernedUpdate", "Checkpoint")]
    if late:
        raise fail(f"{late[0].type} {late[0].seq} of the branch follows the certificate that closes it", late[0].seq)
    routing = st.routing.get(b_seq)
    head: Sealed | None = None
    for n, (kind, step, u, kept) in enumerate(expected):
        if n >= len(records) or records[n].seq > q:
            raise fail(f"the branch ends before its {kind} at step {step} (the original run's steps from the rewind, "
                       "minus the removed examples, call for one)")
        got = records[n]
        g = got.body
        if got.type != kind or g["step"] != step:
            raise fail(f"the branch records {got.type} {got.seq} at step {g['step']} where the original run without "
                       f"the removed examples calls for a {kind} at step {step}", got.seq, g["step"])
        if kind == "Checkpoint":
            if n == 0 and g["digest"] != c["rewind_checkpoint"]:
                raise fail(f"the branch's first Checkpoint {got.seq} (step {step}) is not the rewind checkpoint",
                           got.seq, step)
            head = got
            continue
        assert u is not None and kept is not None
        if g["batch"] != kept:
            raise fail(f"branch GovernedUpdate {got.seq} (step {step}) trains batch {_diff(g['batch'], kept)}; the "
                       "original batch minus the removed examples, in its order, is required", got.seq, step)
        for field in ("seeds", "optimizer"):
            # Optional in the schema: a missing field is a difference, never a KeyError (the runs
            # check has already required each step's seeds, so this only guards a direct call).
            if field not in g or field not in u or not same_cbor(g[field], u[field]):
                what = (f"records no {field}" if field not in g else f"records other {field} than the original step"
                        if field in u else f"records {field} where the original step records none")
                raise fail(f"branch GovernedUpdate {got.seq} (step {step}) {what}", got.seq, step)
        if s in g["sources"]:
            raise fail(f"branch GovernedUpdate {got.seq} (step {step}) lists the retired source {s!r}", got.seq, step)
        if routing is not None:
            rules = [routing[i].rule if routing[i] is not None else None for i in kept]
            if not same_cbor(g["routing"]["rules"], rules):
                raise fail(f"branch GovernedUpdate {got.seq} (step {step}) is not routed by the re-aggregated "
                           "manifests", got.seq, step)
    extra = [o for o in records[len(expected):] if o.seq < q]
    if extra:
        raise fail(f"the branch records {extra[0].type} {extra[0].seq} (step {extra[0].body['step']}) that the "
                   "original run without the removed examples does not call for", extra[0].seq, extra[0].body["step"])
    assert head is not None
    if c["new_head"] != head.body["digest"]:
        raise fail(f"new_head {_short(c['new_head'])} is not the digest of the branch's last Checkpoint {head.seq} "
                   f"(step {head.body['step']}), {_short(head.body['digest'])}")
    n_updates = sum(1 for e in expected if e[0] == "GovernedUpdate")
    kind = ("APPROXIMATE (not an exact unlearning: its bookkeeping checks out, the model is only claimed to "
            "approximate one)" if c["mode"] == "approximate" else "exact")
    return (f"{kind}: retires {s!r} (SourceRetired {retired.seq}); branch {branch.run_id!r} (RunStarted {b_seq}) "
            f"rewinds to step {r_step}{note}; {len(deps.removed)} removed, {len(deps.relabeled)} relabeled; "
            f"{n_updates} updates replay the original batches without them"
            f"{f', steps {skipped} skipped (emptied)' if skipped else ''}; new head {_short(c['new_head'])}")


def _check_artifact(source: Source, key: str, digest: bytes, want: list[Any], s: str, fail: Any) -> None:
    data = source.artifact(digest)
    if data is None:
        raise fail(f"the {key} artifact {_short(digest)} is not in the bundle")
    if hashlib.sha256(data).digest() != digest:
        raise fail(f"the {key} artifact {_short(digest)} does not hash to its name")
    try:
        got = encoding.decode(data)
    except EncodingError as exc:
        raise fail(f"the {key} artifact is not canonical CBOR: {exc}") from None
    if got == want and data == encoding.encode(want):
        return
    if key == "removed":
        have = set(got) if isinstance(got, list) and all(type(i) is int for i in got) else set()
        missing, wrong = sorted(set(want) - have), sorted(have - set(want))
        why = (f"omits index {missing[0]}, which keeps no vote without {s!r}" if missing else
               f"lists index {wrong[0]}, which the dependency rule does not remove" if wrong else
               "is not the ascending array of removed indices")
    else:
        want_map = dict((i, y) for i, y in want)
        pairs = got if isinstance(got, list) and all(isinstance(p, list) and len(p) == 2 for p in got) else []
        have = {p[0]: p[1] for p in pairs if type(p[0]) is int}
        missing = sorted(set(want_map) - set(have))
        wrong = sorted(i for i in have if i not in want_map or have[i] != want_map[i])
        why = (f"omits index {missing[0]}, which lists {s!r} and keeps another vote" if missing else
               f"gives index {wrong[0]} label {have[wrong[0]]!r}, but the dependency rule gives "
               f"{want_map.get(wrong[0], 'no relabeling')}" if wrong else
               "is not the ascending array of [index, label] pairs")
    raise fail(f"the {key} artifact {why} (recomputed from the committed manifests)")


def _diff(got: list[int], want: list[int]) -> str:
    for j, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"{got[:j + 2]}..., position {j} is {a} where the original order gives {b}"
    if len(got) > len(want):
        return f"with {len(got) - len(want)} extra example(s) from position {len(want)} ({got[len(want)]} first)"
    return f"missing {len(want) - len(got)} example(s) from position {len(got)} ({want[len(got)]} first)"


__all__ = ["Dependency", "check_certificates", "dependency"]
