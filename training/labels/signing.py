"""Records to signed, credentialed manifests and a committed dataset (specs/labels.md §3).

The platform's authority signs every manifest. Annotators hold no keys: the first time one
appears, the authority credentials it as a source at ``<authority path>/annotators`` for a fresh
Ed25519 key whose private half is discarded at once, so nobody can sign as that annotator; every
vote is then signed by the authority on the annotator's behalf, which each source entry of the
manifest states (``attested_by``, specs/manifests.md §1). A model that pre-labelled is credentialed
the same way under ``<authority path>/models``.
"""

from __future__ import annotations

import sys
import time as _time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from tqdm import tqdm

from gradledger.ledger import credentials as C
from gradledger.ledger.errors import SchemaError
from gradledger.ledger.keys import SigningKey
from gradledger.ledger import schema as s

from ..dataset import CommittedDataset, commit_dataset, input_columns
from ..errors import ManifestError, ProjectError
from ..manifests import SignedManifest, example_id, label_example
from ..replayer import run_extent, runs_in
from .records import MAX_VOTES, LabelImportError, LabelRecord

if TYPE_CHECKING:
    from ..project import Project

ANNOTATORS = "annotators"
MODELS = "models"
LFS = "lfs"


@dataclass
class ImportedLabels:
    """What an import committed: the dataset (its examples in ``keys`` order), the records that had
    no vote to sign (``unlabeled``, by key), and the sources the authority credentialed."""

    dataset: CommittedDataset
    keys: list[str]
    unlabeled: list[str] = field(default_factory=list)
    credentialed: list[str] = field(default_factory=list)


def issued_sources(project: "Project", authority: str) -> dict[tuple[str, str], C.Credential]:
    """The source credentials ``authority`` issued, by (sub-path, subject), revoked ones left out."""
    issuer = project.credential(authority)
    registry = project.ledger.registry
    return {(cred.path.rpartition("/")[2], cred.subject): cred for kid, cred in registry.by_key_id.items()
            if cred.issuer == issuer.key_id and cred.role == "source" and kid not in registry.revoked_at}


def keyless_source(project: "Project", authority: str, name: str, where: str,
                   known: dict[tuple[str, str], C.Credential], new: list[str]) -> C.Credential:
    """The credential of source ``name`` at ``<authority path>/<where>``: the one the authority issued
    before (in ``known``), else a new one for a key nobody holds, appended (not yet committed)."""
    cred = known.get((where, name))
    if cred is None:
        try:
            s.name(name, "source name")
        except SchemaError as exc:
            raise LabelImportError(str(exc)) from None
        spec = project.taxonomy.authorities[authority]
        keyless = SigningKey.generate().public_key  # its private half is never kept: only the authority signs
        cred = C.issue(project.authority_key(authority), subject=name, path=f"{spec.path}/{where}", role="source",
                       public_key=keyless)
        project.ledger.append("CredentialIssued", {"credential": cred.signed}, project.authority_key(authority))
        known[(where, name)] = cred
        new.append(name)
    return cred


def _ledger_runs(project: "Project") -> dict[str, set[bytes]]:
    """Each run id's Checkpoint digests in the project's ledger (a run's records lie between its RunStarted
    and the next): what a pre-label naming one of its runs must match (specs/labels.md §5)."""
    ledger = project.ledger
    runs, checkpoints = runs_in(ledger), ledger.by_type("Checkpoint")
    out: dict[str, set[bytes]] = {}
    for seq, body in runs:
        lo, hi = run_extent(ledger, runs, seq)
        out.setdefault(body["run_id"], set()).update(
            ledger.observation(c).body["digest"] for c in checkpoints if lo < c < hi)
    return out


def signer_and_ontology(project: "Project", authority: str, ontology: str | None) -> tuple[SigningKey, str]:
    """The authority's key (an authority the taxonomy does not name is refused) and the ontology the
    manifests name: the one given, else the taxonomy's."""
    key = project.authority_key(authority)
    onto = ontology if ontology is not None else project.taxonomy.ontology
    if onto is None:
        raise ProjectError("the taxonomy names no ontology ([ontology] name); pass ontology=")
    return key, onto


def sign_records(project: "Project", records: Sequence[LabelRecord], *, authority: str, name: str,
                 examples: Mapping[str, Any], ontology: str | None = None) -> ImportedLabels:
    """Sign one manifest per record that has a vote, by ``authority`` on its annotators' behalf, and
    commit them as dataset ``name`` with each record's input ``examples[record.key]``."""
    key, onto = signer_and_ontology(project, authority, ontology)
    spec = project.taxonomy.authorities[authority]
    default = 1.0 if spec.confidence is None else spec.confidence
    labeled = [r for r in records if r.votes]
    unlabeled = [r.key for r in records if not r.votes]
    seen: dict[str, str] = {}
    for r in labeled:
        if r.key in seen:
            raise LabelImportError(f"{r.where}: example {r.key!r} is also {seen[r.key]}")
        seen[r.key] = r.where
        if r.key not in examples:
            raise LabelImportError(f"{r.where}: no input for example {r.key!r} among the examples given")
        if len(r.votes) > MAX_VOTES:
            raise LabelImportError(f"{r.where}: more than {MAX_VOTES} votes")
    if not labeled:
        raise LabelImportError("the export has no labeled record")
    runs = _ledger_runs(project)
    for r in labeled:
        pre = r.prelabel
        if pre is not None and pre.run in runs and pre.checkpoint not in runs[pre.run]:
            raise LabelImportError(f"{r.where}: pre-label {pre.model!r} names a checkpoint run {pre.run!r} never "
                                   "recorded in this ledger")
    known = issued_sources(project, authority)
    new: list[str] = []
    at = _time.time_ns()
    manifests: list[SignedManifest] = []
    inputs = []
    # A platform export can hold a million tasks: a bar on a terminal (none when stderr is not one).
    for r in tqdm(labeled, desc="signing manifests", unit="manifest", disable=None, file=sys.stderr, leave=False):
        try:
            classes = project.class_indices([v.label for v in r.votes])
        except ManifestError as exc:
            raise LabelImportError(f"{r.where}: {exc}".replace("example ", "vote ", 1)) from None
        sources, voters = [], set()
        for v, cls in zip(r.votes, classes):
            if (v.model, v.source) in voters:
                raise LabelImportError(f"{r.where}: {v.source!r} voted twice on one example")
            voters.add((v.model, v.source))
            cred = keyless_source(project, authority, v.source, MODELS if v.model else ANNOTATORS, known, new)
            sources.append({"source": cred.subject, "key_id": cred.key_id, "vote": cls,
                            "confidence": default if v.confidence is None else v.confidence})
        prelabel = None
        if r.prelabel is not None and r.prelabel.run is not None:
            prelabel = {"run": r.prelabel.run, "checkpoint": r.prelabel.checkpoint}
        x = examples[r.key]
        try:
            manifests.append(label_example(
                example=example_id(x), sources=sources, aggregation="single" if len(sources) == 1 else "majority",
                ontology=onto, review=r.review, key=key, time=at, prelabel=prelabel))
        except ManifestError as exc:
            raise LabelImportError(f"{r.where}: {exc}") from None
        inputs.append(x)
    project.ledger.commit()  # the credentials land before the dataset that names them
    dataset = commit_dataset(project.ledger, manifests, name, project.trainer_key, inputs=input_columns(inputs))
    return ImportedLabels(dataset, [r.key for r in labeled], unlabeled, new)
