"""The verifier's structural and policy checks (specs/verification.md, "Structural checks").

Each check appends one named ``Check`` to the report and stops at its own first failure:

- ``records``: every record re-admitted from the trusted roots (``check_records``);
- ``tree heads``: every TreeHead is the log's root at its size, and successive heads are
  consistent by an RFC 9162 consistency proof;
- ``artifacts``: every artifact a record names is present, hashes to its name and, for a
  Checkpoint, is the state the record describes; a bundle carries nothing unnamed, its header
  agrees with the records and its cosignatures are over this log's tree heads (``artifacts.py``);
- ``dataset``: every DatasetCommitted's manifests artifact, count, root and manifests, and its
  inputs when the bundle carries them;
- ``policy``: every adopted policy is root-signed, and each run names the one in force;
- ``runs``: each run names a preceding dataset and policy, and numbers its steps 0, 1, 2, ...;
  its other settings (seed and step seeds, data order, checkpoint positions, band names, program
  inputs) are re-derived from its records, policy and dataset (``settings.py``; what needs the
  program itself is checked where replay loads it);
- ``routing``: every GovernedUpdate's routing recomputed from manifests and policy.

Nothing here imports the training package: the rules come from specs/.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

from gradledger.ledger import credentials, encoding, envelope, merkle
from gradledger.ledger.checker import check_records
from gradledger.ledger.credentials import CredentialRegistry
from gradledger.ledger.envelope import Sealed
from gradledger.ledger.errors import EncodingError, ProofError, SchemaError, VerificationError

from ..report import Report
from .artifacts import ArtifactError, check_artifacts
from .hyperparams import HyperParameterMismatch, check_description, check_step
from .example_losses import ExampleLossesInvalid, check_example_losses
from .recipe import RecipeInvalid, check_recipe
from .settings import RunView, SettingsMismatch, check_run, distributed_world, same_cbor, training_format
from .manifests import (
    Manifest, ManifestInvalid, check_inputs, dataset_root, parse_manifest, relabel_without, revoked_by, split_dataset,
    verify_manifest,
)
from .routing import (
    ExampleRouting, Policy, PolicyInvalid, Unroutable, authority_writes, batch_limits, parse_policy, route_example,
    verify_policy,
)
from .flags import FlagsMissing, flag_schedule, frozen_at, suspension_schedule


class Source(Protocol):
    def records(self) -> Iterator[tuple[int, bytes]]: ...
    def artifact(self, digest: bytes) -> bytes | None: ...


@dataclass
class Dataset:
    seq: int
    name: str
    root: bytes
    manifests: list[Manifest]
    #: SHA-256 of the inputs artifact when the commitment names one.
    data: bytes | None
    #: Whether the bundle carried the inputs and every row was checked.
    inputs_checked: bool

    @property
    def count(self) -> int:
        return len(self.manifests)


@dataclass
class Run:
    seq: int
    run_id: str
    settings: Any
    dataset_seq: int | None = None
    policy_seq: int | None = None
    updates: list[int] = field(default_factory=list)  # GovernedUpdate seqs, step order
    checkpoints: list[int] = field(default_factory=list)
    #: For an unlearning branch: the branched-from run's RunStarted seq and the retired source.
    branch_of: int | None = None
    retired: str | None = None
    rewind_step: int = 0

    @property
    def governed(self) -> bool:
        return self.dataset_seq is not None


@dataclass
class Structure:
    """What replay and certificate checks need from a structurally valid bundle."""

    observations: list[Sealed]  # every admitted observation, in order
    registry: CredentialRegistry  # after the last record
    #: Per governed run (RunStarted seq): the routing of every example of its dataset under its
    #: policy. In an unlearning branch, examples are re-aggregated without the retired source
    #: (specs/manifests.md §6), and an example left with no vote is None.
    routing: dict[int, list[ExampleRouting | None]]
    datasets: dict[int, Dataset]  # by DatasetCommitted seq
    policies: dict[int, Policy]  # by PolicyAdopted seq
    runs: dict[int, Run]  # by RunStarted seq
    tree_heads: list[int]
    root: bytes

    def run_before(self, seq: int, named: Any) -> Run | None:
        """The governed run whose RunStarted seq is ``named``, if it was recorded before ``seq`` (what a
        ForensicTrace or a MemorizationScan at ``seq`` may name)."""
        run = self.runs.get(named) if type(named) is int else None
        return run if run is not None and run.governed and run.seq < seq else None

    def registry_at(self, seq: int) -> CredentialRegistry:
        """The registry as it stood before observation ``seq`` was admitted."""
        return _registry_at(self.observations, self.registry, seq)


def _registry_at(observations: Sequence[Sealed], final: CredentialRegistry, seq: int) -> CredentialRegistry:
    issued: set[bytes] = set()
    revoked: set[bytes] = set()
    for sealed in observations[:seq]:
        if sealed.type == "CredentialIssued":
            issued.add(credentials.parse(sealed.body["credential"]).key_id)
        elif sealed.type == "CredentialRevoked":
            revoked.add(sealed.body["key_id"])
    return CredentialRegistry(
        final.trusted_roots,
        {k: c for k, c in final.by_key_id.items() if k in issued},
        {k: t for k, t in final.revoked_at.items() if k in revoked},
    )


def _short(digest: bytes) -> str:
    return digest.hex()[:16]


class _Failed(Exception):
    def __init__(self, detail: str, seq: int | None = None, step: int | None = None) -> None:
        super().__init__(detail)
        self.detail, self.seq, self.step = detail, seq, step


def check_structure(
    source: Source,
    trusted_roots: Sequence[bytes],
    report: Report,
    progress: Callable[[int], None] | None = None,
) -> Structure | None:
    """Run the structural checks into ``report``; the structure, or None if any check failed."""
    admitted = _check_records(source, trusted_roots, report, progress)
    if admitted is None:
        return None
    observations, registry, nodes, root = admitted
    tree_heads = [o.seq for o in observations if o.type == "TreeHead"]
    if not _run(report, "tree heads", lambda: _check_tree_heads(observations, nodes)):
        return None
    del nodes
    datasets: dict[int, Dataset] = {}
    policies: dict[int, Policy] = {}
    runs: dict[int, Run] = {}
    routing: dict[int, list[ExampleRouting | None]] = {}
    ok = _run(report, "artifacts", lambda: _check_artifacts(source, observations, registry, root))
    ok &= _run(report, "dataset", lambda: _check_datasets(source, observations, registry, datasets))
    ok &= _run(report, "policy", lambda: _check_policies(observations, registry, policies))
    ok &= _run(report, "runs", lambda: _check_runs(observations, runs, policies, source))
    ok &= _run(report, "routing", lambda: _check_routing(observations, registry, datasets, policies, runs, routing))
    if not ok:
        return None
    return Structure(observations, registry, routing, datasets, policies, runs, tree_heads, root)


def _run(report: Report, name: str, check: Callable[[], tuple[str, str]]) -> bool:
    """Run one check; ``check`` returns (status, detail) or raises ``_Failed``."""
    try:
        status, detail = check()
    except _Failed as failed:
        report.add(name, "fail", failed.detail, seq=failed.seq, step=failed.step)
        return False
    report.add(name, status, detail)  # type: ignore[arg-type]
    return True


# -- records -----------------------------------------------------------------------------


def _check_records(
    source: Source, trusted_roots: Sequence[bytes], report: Report, progress: Callable[[int], None] | None
) -> tuple[list[Sealed], CredentialRegistry, list[list[bytes]], bytes] | None:
    observations: list[Sealed] = []
    # levels[l][i]: the Merkle node over leaves [i << l, (i + 1) << l); admission completes
    # each level's nodes in index order, so lists hold them without keys.
    levels: list[list[bytes]] = []
    last: list[bytes] = []

    def tapped() -> Iterator[tuple[int, bytes]]:
        for seq, record in source.records():
            last[:] = [record]
            yield seq, record

    def on_admit(a: Any) -> None:
        observations.append(a.sealed)
        for level, index, h in a.nodes:
            if level == len(levels):
                levels.append([])
            assert index == len(levels[level])
            levels[level].append(h)

    try:
        state, summary = check_records(tapped(), list(trusted_roots), progress, on_admit)
    except VerificationError as exc:
        seq = exc.seq if exc.seq is not None else len(observations)
        if isinstance(exc, ProofError) and seq == len(observations) and _is_tree_head(last):
            # Admission got through signature and credentials; only the head's root, size
            # or origin is wrong, which is the tree-head check's finding.
            report.add("records", "skip", f"admitted observations 0..{seq - 1}; stopped at the tree head {seq}")
            report.add("tree heads", "fail", f"TreeHead {seq} is not this log at its size "
                       f"(a tree head from a different history): {_bare(exc)}", seq=seq)
        else:
            report.add("records", "fail", f"observation {seq}: {_bare(exc)}", seq=seq)
        return None
    if summary.size == 0:
        report.add("records", "fail", "the bundle holds no observations")
        return None
    report.add("records", "pass", f"{summary.size} observations admitted from the trusted roots (signatures, hash "
               f"chain, credentials, validity windows, revocations, signer roles); root {_short(summary.root)}")
    return observations, state.registry, levels, summary.root


def _is_tree_head(last: list[bytes]) -> bool:
    try:
        return bool(last) and envelope.unseal(last[0]).type == "TreeHead"
    except (EncodingError, SchemaError):
        return False


def _bare(exc: VerificationError) -> str:
    return str(exc.args[0]) if exc.args else type(exc).__name__


# -- tree heads ----------------------------------------------------------------------------


def _check_tree_heads(observations: list[Sealed], levels: list[list[bytes]]) -> tuple[str, str]:
    def get(level: int, index: int) -> bytes:
        return levels[level][index]

    previous: tuple[int, bytes] | None = None
    heads = 0
    for sealed in observations:
        if sealed.type != "TreeHead":
            continue
        size, root = sealed.body["size"], sealed.body["root"]
        if size != sealed.seq or merkle.root_from_store(size, get) != root:
            raise _Failed(f"TreeHead {sealed.seq} (size {size}) is not the Merkle root of observations "
                          f"0..{sealed.seq - 1}", seq=sealed.seq)
        if previous is not None:
            try:
                proof = merkle.consistency_proof(previous[0], size, get)
                merkle.verify_consistency(previous[0], size, proof, previous[1], root)
            except ProofError as exc:
                raise _Failed(f"TreeHead {sealed.seq} is not consistent with the tree head at size "
                              f"{previous[0]}: {exc}", seq=sealed.seq) from None
        previous, heads = (size, root), heads + 1
    if not heads:
        return "pass", "no TreeHead recorded"
    return "pass", f"{heads} tree heads, each the log's root at its size; {heads - 1} consistency proofs verify"


# -- artifacts -----------------------------------------------------------------------------


def _check_artifacts(source: Source, observations: list[Sealed], registry: CredentialRegistry,
                     root: bytes) -> tuple[str, str]:
    try:
        return check_artifacts(source, observations, registry, root)
    except ArtifactError as exc:
        raise _Failed(_bare(exc), seq=exc.seq) from None


# -- datasets ------------------------------------------------------------------------------


def _check_datasets(
    source: Source, observations: list[Sealed], registry: CredentialRegistry, out: dict[int, Dataset]
) -> tuple[str, str]:
    notes = []
    for sealed in observations:
        if sealed.type != "DatasetCommitted":
            continue
        ds = _check_dataset(source, observations, registry, sealed)
        out[sealed.seq] = ds
        inputs = ("inputs checked row by row" if ds.inputs_checked else
                  "inputs not in the bundle" if ds.data is not None else "committed without inputs")
        notes.append(f"{ds.name!r} at {sealed.seq}: {ds.count} manifests, {inputs}")
    if not notes:
        return "pass", "no DatasetCommitted recorded"
    return "pass", "; ".join(notes)


def _artifact(source: Source, digest: bytes) -> bytes | None:
    data = source.artifact(digest)
    if data is not None and hashlib.sha256(data).digest() != digest:
        raise ManifestInvalid(f"artifact {_short(digest)} in the bundle does not hash to its name")
    return data


def _check_dataset(source: Source, observations: list[Sealed], registry: CredentialRegistry, sealed: Sealed) -> Dataset:
    body, seq = sealed.body, sealed.seq
    where = f"DatasetCommitted {seq} ({body['name']!r})"
    try:
        raw = _artifact(source, body["manifests"])
        if raw is None:
            raise ManifestInvalid(f"manifests artifact {_short(body['manifests'])} is not in the bundle")
        items = split_dataset(raw)
        if len(items) != body["count"] or not items:
            raise ManifestInvalid(f"artifact holds {len(items)} manifests, the commitment says {body['count']}")
        if dataset_root(items) != body["root"]:
            raise ManifestInvalid("the artifact's manifests do not give the committed dataset root")
    except ManifestInvalid as exc:
        raise _Failed(f"{where}: {_bare(exc)}", seq=seq) from None
    # Credentials as they stood at the commit: a manifest may not lean on one recorded later.
    at_commit = _registry_at(observations, registry, seq)
    manifests = []
    for i, item in enumerate(items):
        try:
            m = parse_manifest(item)
            verify_manifest(m, at_commit)
            keys = [("signer", m.fields["signer"])] + [(f"source {e['source']!r}", e["key_id"]) for e in m.sources]
            for what, kid in keys:
                # A manifest's time is its signer's claim; the commit's time is the ledger's.
                link = revoked_by(registry, kid, sealed.time)
                if link is not None:
                    raise ManifestInvalid(f"{what} is under credential {link.subject!r}, revoked at time "
                                          f"{registry.revoked_at[link.key_id]}, not after the commit")
        except ManifestInvalid as exc:
            raise _Failed(f"{where}: manifest {i}: {_bare(exc)}", seq=seq) from None
        manifests.append(m)
    _check_prelabels(observations, seq, manifests, where)
    checked = False
    if "data" in body:
        try:
            data = _artifact(source, body["data"])
            if data is not None:
                check_inputs(data, [m.example for m in manifests])
                checked = True
        except ManifestInvalid as exc:
            raise _Failed(f"{where}: {_bare(exc)}", seq=seq) from None
    return Dataset(seq, body["name"], body["root"], manifests, body.get("data"), checked)


def run_checkpoints(observations: list[Sealed], before: int) -> dict[str, set[bytes]]:
    """Each run id's Checkpoint digests recorded before seq ``before`` (a Checkpoint belongs to the
    RunStarted before it)."""
    out: dict[str, set[bytes]] = {}
    current: set[bytes] | None = None
    for sealed in observations:
        if sealed.seq >= before:
            break
        if sealed.type == "RunStarted":
            current = out.setdefault(sealed.body["run_id"], set())
        elif sealed.type == "Checkpoint" and current is not None:
            current.add(sealed.body["digest"])
    return out


def _check_prelabels(observations: list[Sealed], seq: int, manifests: list[Manifest], where: str) -> None:
    """specs/labels.md §5: a pre-label naming a run of this ledger names one of its checkpoints
    recorded before the commit; a run the ledger does not hold is a model from elsewhere."""
    runs: dict[str, set[bytes]] | None = None
    for i, m in enumerate(manifests):
        pre = m.fields.get("prelabel")
        if pre is None:
            continue
        if runs is None:
            runs = run_checkpoints(observations, seq)
        if pre["run"] in runs and pre["checkpoint"] not in runs[pre["run"]]:
            raise _Failed(f"{where}: manifest {i}: its pre-label names checkpoint {_short(pre['checkpoint'])} of run "
                          f"{pre['run']!r}, which that run did not record before the commit", seq=seq)


# -- policies -------------------------------------------------------------------------------


def _check_policies(observations: list[Sealed], registry: CredentialRegistry, out: dict[int, Policy]) -> tuple[str, str]:
    for sealed in observations:
        if sealed.type != "PolicyAdopted":
            continue
        try:
            policy = parse_policy(sealed.body["policy"])
            if policy.digest != sealed.body["digest"]:
                raise PolicyInvalid("the policy does not hash to the adopted digest")
            verify_policy(policy, _registry_at(observations, registry, sealed.seq))
        except PolicyInvalid as exc:
            raise _Failed(f"PolicyAdopted {sealed.seq}: {_bare(exc)}", seq=sealed.seq) from None
        out[sealed.seq] = policy
    latest: int | None = None
    named = 0
    for sealed in observations:
        if sealed.type == "PolicyAdopted":
            latest = sealed.seq
        elif sealed.type == "RunStarted" and isinstance(sealed.body["settings"], dict) and (
            "policy" in sealed.body["settings"] or "policy_seq" in sealed.body["settings"]
        ):
            settings, seq = sealed.body["settings"], sealed.seq
            if "branch" in settings:
                continue  # an unlearning branch keeps its original run's policy (checked under runs)
            if settings.get("policy_seq") != latest or latest is None:
                raise _Failed(f"RunStarted {seq}: its policy_seq {settings.get('policy_seq')!r} is not the latest "
                              f"PolicyAdopted before it ({latest})", seq=seq)
            if settings.get("policy") != out[latest].digest:
                raise _Failed(f"RunStarted {seq}: its policy digest is not the one adopted at {latest}", seq=seq)
            named += 1
    return "pass", f"{len(out)} adopted policies signed by a trusted root; {named} runs name the policy in force"


# -- runs -----------------------------------------------------------------------------------


def _check_runs(
    observations: list[Sealed], out: dict[int, Run], policies: dict[int, Policy] | None = None,
    source: Source | None = None,
) -> tuple[str, str]:
    run: Run | None = None
    for sealed in observations:
        seq, body = sealed.seq, sealed.body
        if sealed.type == "RunStarted":
            run = out[seq] = Run(seq, body["run_id"], body["settings"])
            _bind_run(sealed, run, observations)
        elif sealed.type == "GovernedUpdate":
            if run is None:
                raise _Failed(f"GovernedUpdate {seq} precedes every RunStarted", seq=seq, step=body["step"])
            if not run.governed:
                raise _Failed(f"GovernedUpdate {seq} belongs to run {run.run_id!r} (RunStarted {run.seq}), whose "
                              "settings name no committed dataset and adopted policy", seq=seq, step=body["step"])
            if run.branch_of is None and body["step"] != len(run.updates):
                raise _Failed(f"GovernedUpdate {seq} has step {body['step']}, but it is update {len(run.updates)} "
                              f"of run {run.run_id!r} (RunStarted {run.seq})", seq=seq, step=body["step"])
            if run.branch_of is not None and not body["step"] > _last_step(observations, run):
                # A branch replays from its rewind checkpoint and skips steps whose batch lost
                # every example, so its steps only increase.
                raise _Failed(f"GovernedUpdate {seq} has step {body['step']}, not after the previous step of "
                              f"unlearning branch {run.run_id!r} (RunStarted {run.seq})", seq=seq, step=body["step"])
            fmt = training_format(run.settings)
            try:  # specs/replay.md §3.1: every step states the run's hyper-parameters, in every mode
                if len(run.updates) == 0:
                    check_description(run.settings.get("optimizer"), "RunStarted settings.optimizer")
                check_step(run.settings["optimizer"], body, fmt)
                # specs/training.md §3.2: what replay will apply, well formed (and its shards: distributed.md)
                check_recipe(body, fmt, distributed_world(run.settings))
                check_example_losses(body, fmt)  # §3.1: format 4 records every example's loss
            except (HyperParameterMismatch, RecipeInvalid, ExampleLossesInvalid) as exc:
                raise _Failed(f"GovernedUpdate {seq} (step {body['step']}): {exc}", seq=seq, step=body["step"]) from None
            run.updates.append(seq)
        elif sealed.type == "Checkpoint" and run is not None:
            run.checkpoints.append(seq)
    governed = [r for r in out.values() if r.governed]
    _check_settings(observations, governed, policies or {}, source)
    branches = sum(r.branch_of is not None for r in governed)
    steps = sum(len(r.updates) for r in governed)
    return "pass", (f"{len(out)} runs ({len(governed)} governed, {branches} of them unlearning branches); {steps} "
                    "steps, numbered from 0 in each run (increasing from the rewind checkpoint in a branch); every "
                    "governed run names a DatasetCommitted and a PolicyAdopted before it; its settings (seed, data "
                    "order, checkpoints, bands, program inputs) re-derived from its records, policy and dataset; "
                    f"{_orders(governed)}")


def _orders(governed: list[Run]) -> str:
    """Whether each run's data order was committed before training (specs/training.md §2)."""
    committed = sum(r.settings.get("order") != "loader" for r in governed if r.branch_of is None)
    loader = [r.run_id for r in governed if r.branch_of is None and r.settings.get("order") == "loader"]
    text = f"data order committed before training in {committed} runs"
    if loader:
        text += (f"; chosen by the trainer's loader as it went, recorded batch by batch but NOT committed before "
                 f"training, in {len(loader)} ({', '.join(map(repr, loader[:3]))})")
    return text


def _check_settings(observations: list[Sealed], governed: list[Run], policies: dict[int, Policy],
                    source: Source | None) -> None:
    """specs/verification.md §6, settings: each governed run's RunStarted settings re-derived (settings.py)."""
    artifact = source.artifact if source is not None else (lambda d: None)
    for run in governed:
        ds = observations[run.dataset_seq or 0].body
        policy = policies.get(run.policy_seq or -1)
        view = RunView(run.seq, run.settings, run.updates, run.checkpoints, run.branch_of is not None, ds["count"],
                       policy.bands if policy is not None else None, ds.get("data"),
                       policy.monitors if policy is not None else None)
        try:
            check_run(view, observations, artifact)
        except SettingsMismatch as exc:
            raise _Failed(str(exc.args[0]), seq=exc.seq, step=exc.step) from None


def _bind_run(sealed: Sealed, run: Run, observations: list[Sealed]) -> None:
    settings, seq = sealed.body["settings"], sealed.seq
    if not isinstance(settings, dict) or not ({"dataset", "policy", "policy_seq"} & settings.keys()):
        return  # an ungoverned run; any GovernedUpdate in it fails above
    ds, pseq = settings.get("dataset"), settings.get("policy_seq")
    if not isinstance(ds, dict) or type(ds.get("seq")) is not int or not 0 <= ds["seq"] < seq:
        raise _Failed(f"RunStarted {seq}: settings.dataset does not name an earlier observation", seq=seq)
    target = observations[ds["seq"]]
    if target.type != "DatasetCommitted":
        raise _Failed(f"RunStarted {seq}: settings.dataset.seq {ds['seq']} is a {target.type}, not a "
                      "DatasetCommitted", seq=seq)
    for key in ("name", "root", "count"):
        if not same_cbor(ds.get(key), target.body[key]):
            raise _Failed(f"RunStarted {seq}: settings.dataset.{key} differs from DatasetCommitted {ds['seq']}", seq=seq)
    if type(pseq) is not int or not 0 <= pseq < seq or observations[pseq].type != "PolicyAdopted":
        raise _Failed(f"RunStarted {seq}: settings.policy_seq {pseq!r} is not an earlier PolicyAdopted", seq=seq)
    run.dataset_seq, run.policy_seq = ds["seq"], pseq
    if "branch" in settings:
        _bind_branch(seq, settings, run, observations)


def _bind_branch(seq: int, settings: dict[str, Any], run: Run, observations: list[Sealed]) -> None:
    branch = settings["branch"]
    of, retired, rewind = (branch.get(k) if isinstance(branch, dict) else None for k in ("of", "retired", "rewind"))
    for key, value, kind in (("of", of, "RunStarted"), ("retired", retired, "SourceRetired"), ("rewind", rewind, "Checkpoint")):
        if type(value) is not int or not 0 <= value < seq or observations[value].type != kind:
            raise _Failed(f"RunStarted {seq}: settings.branch.{key} {value!r} is not an earlier {kind}", seq=seq)
    original = observations[of].body["settings"]
    if not isinstance(original, dict) or "branch" in original or not all(
        same_cbor(original.get(k), settings.get(k)) for k in ("dataset", "policy", "policy_seq")
    ):
        raise _Failed(f"RunStarted {seq}: an unlearning branch must keep the dataset and policy of the governed "
                      f"run it branches from (RunStarted {of})", seq=seq)
    run.branch_of, run.retired = of, observations[retired].body["source"]
    run.rewind_step = observations[rewind].body["step"]


def _last_step(observations: list[Sealed], run: Run) -> int:
    return observations[run.updates[-1]].body["step"] if run.updates else run.rewind_step - 1


# -- routing ---------------------------------------------------------------------------------


def _check_routing(
    observations: list[Sealed], registry: CredentialRegistry, datasets: dict[int, Dataset],
    policies: dict[int, Policy], runs: dict[int, Run], out: dict[int, list[ExampleRouting]],
) -> tuple[str, str]:
    def path_of(kid: bytes) -> str:
        return registry.get(kid).path

    checked = skipped = examples = flagged_runs = 0
    for run in runs.values():
        if not run.governed:
            continue
        ds, policy = datasets.get(run.dataset_seq or -1), policies.get(run.policy_seq or -1)
        if ds is None or policy is None:
            skipped += 1  # its dataset or policy failed its own check
            continue
        try:
            table, at_step = _route_run(run, policy, ds, path_of, observations, runs)
        except Unroutable as exc:
            raise _Failed(f"run {run.run_id!r} (RunStarted {run.seq}): a manifest of dataset {ds.name!r} cannot be "
                          f"routed: {_bare(exc)}", seq=run.seq) from None
        except FlagsMissing as exc:
            raise _Failed(f"run {run.run_id!r} (RunStarted {run.seq}): {exc}", seq=exc.seq) from None
        out[run.seq] = table
        flagged_runs += policy.matches_flags
        for seq in run.updates:
            examples += _check_update(observations[seq], policy, ds, at_step(observations[seq].body["step"]))
        checked += 1
    if skipped and not checked:
        return "skip", f"{skipped} runs not routed: their dataset or policy failed its check"
    tail = f"; {skipped} runs not routed (their dataset or policy failed)" if skipped else ""
    if flagged_runs:
        tail += (f"; {flagged_runs} of them under a policy that routes by memorization flags, each step with the flags "
                 "of the run's scans in force (specs/dynamics.md §2.4; the scans check recomputes them)")
    return "pass", (f"{checked} runs: {examples} batch examples routed from manifest and policy; rules, limits, "
                    f"authority_writes and sources match every GovernedUpdate{tail}")


Table = Sequence["ExampleRouting | None"]


def _route_run(
    run: Run, policy: Policy, ds: Dataset, path_of: Callable[[bytes], str], observations: list[Sealed],
    runs: dict[int, Run],
) -> tuple[Table, Callable[[int], Table]]:
    """The run's routing table per dataset index (labels for replay; a branch's for its certificate) and,
    per step, the table its batch is routed by: the same one, unless the policy matches memorization
    flags (specs/dynamics.md §2.4), where a flagged example takes its flagged routing."""
    # The counterfactual dataset of an unlearning branch: every manifest re-aggregated
    # without the retired source; an example with no vote left is gone.
    fields = [m.fields if run.retired is None else relabel_without(m.fields, run.retired) for m in ds.manifests]
    tables: dict[tuple[bool, frozenset[int]], Table] = {}

    def table(flag: bool, suspended: frozenset[int] = frozenset()) -> Table:
        # one table per (flagged, suspended rules) a step reads, built the first time one does
        if (flag, suspended) not in tables:
            tables[(flag, suspended)] = [None if f is None else route_example(policy, f, path_of, flag, suspended)
                                         for f in fields]
        return tables[(flag, suspended)]

    plain = table(False)
    if not policy.matches_flags and not policy.budgets:
        return plain, lambda step: plain
    original = run if run.branch_of is None else runs[run.branch_of]
    suspension = None
    if policy.budgets:
        if run.branch_of is not None:
            raise FlagsMissing(f"RunStarted {run.seq}: an unlearning branch of a run whose policy gives rules an "
                               "entropy budget is not in this format (specs/dynamics.md §5.5)", run.seq)
        suspension = suspension_schedule(observations, run.seq, run.updates, run.checkpoints, policy)
    if not policy.matches_flags:
        assert suspension is not None
        return plain, lambda step: table(False, suspension.at(step))
    schedule = flag_schedule(observations, original.seq, original.updates, original.checkpoints, ds.count)
    if run.branch_of is not None:
        frozen = _Flagged(plain, table(True), frozen_at(schedule, run.rewind_step).at(0))
        fixed = [frozen[i] for i in range(len(plain))]
        return fixed, lambda step: fixed

    def at(step: int) -> Table:
        off = suspension.at(step) if suspension is not None else frozenset()
        return _Flagged(table(False, off), table(True, off), schedule.at(step))
    return plain, at


class _Flagged(Sequence["ExampleRouting | None"]):
    """A run's table at one step: the flagged routing at the flagged indices, the plain one elsewhere."""

    def __init__(self, plain: Table, flagged: Table, flags: frozenset[int]) -> None:
        self.plain, self.flagged, self.flags = plain, flagged, flags

    def __len__(self) -> int:
        return len(self.plain)

    def __getitem__(self, i: Any) -> Any:
        return (self.flagged if i in self.flags else self.plain)[i]


def _check_update(sealed: Sealed, policy: Policy, ds: Dataset, table: list[ExampleRouting | None]) -> int:
    body, seq, step = sealed.body, sealed.seq, sealed.body["step"]
    where = f"GovernedUpdate {seq} (step {step})"

    def fail(detail: str) -> _Failed:
        return _Failed(f"{where}: {detail}", seq=seq, step=step)

    if body["policy"] != policy.digest:
        raise fail(f"names policy {_short(body['policy'])}, but the run uses {_short(policy.digest)}")
    batch = body["batch"]
    for j, i in enumerate(batch):
        if not 0 <= i < ds.count:
            raise fail(f"batch position {j}: index {i} is outside dataset {ds.name!r} of {ds.count} examples")
        if table[i] is None:
            raise fail(f"batch position {j}: index {i} lost every vote with the retired source, yet is trained on")
    recorded = body.get("routing")
    if not isinstance(recorded, dict) or set(recorded) != {"rules", "limits"} or not all(
        isinstance(recorded[k], list) for k in ("rules", "limits")
    ):
        raise fail("has no routing {rules, limits} to check")
    routings = [r for r in (table[i] for i in batch) if r is not None]
    rules = [r.rule for r in routings]
    if len(recorded["rules"]) != len(rules):
        raise fail(f"records {len(recorded['rules'])} routing rules for a batch of {len(rules)}")
    for j, (i, want, got) in enumerate(zip(batch, rules, recorded["rules"])):
        if not same_cbor(got, want):
            name = policy.rule_name(want)
            raise fail(f"example at batch position {j} (dataset index {i}): recorded rule {got!r}, but its manifest "
                       f"under policy {policy.name!r} routes by rule {want} ({name}), profile {list(table[i].profile)}")
    limits = list(batch_limits(policy, rules))
    if not same_cbor(recorded["limits"], limits):
        raise fail(f"recorded band limits {recorded['limits']}, but the batch's routings give {limits}")
    writes = authority_writes(routings, len(policy.bands))
    got_writes = body["authority_writes"]
    for path in sorted(set(writes) | set(got_writes)):
        if not same_cbor(got_writes.get(path), writes.get(path)):
            raise fail(f"authority_writes[{path!r}] is {got_writes.get(path)}, but the batch's routings give "
                       f"{writes.get(path)}")
    sources = sorted({name for r in routings for name in r.sources})
    if not same_cbor(body.get("sources"), sources):
        raise fail(f"sources {body.get('sources')} are not the batch's listed sources {sources}")
    return len(batch)
