"""`gradledger-verify --release DIR`: the chain from the shipped model files to the verified
lineage (specs/release.md §6): model files -> model-signing signature -> provenance -> cosigned
checkpoint -> this bundle's tree -> the run's final checkpoint, whose weights replay confirms.

Each link is one named check; the first that fails stops the chain (a later link would rest on
one that did not hold).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradledger.ledger import attest, merkle
from gradledger.ledger.errors import GradledgerError, UnusableInput, VerificationError
from gradledger.ledger.files import read_regular
from gradledger.ledger.note import MAX_NOTE_SIZE, Checkpoint, SignedNote, TlogProof, log_key
from gradledger.ledger.publish import check_cosigned, witness_keys
from gradledger.ledger.tensorfile import differing_names, model_files, model_tensors, recorded_model_tensors

from ..report import Report
from .structure import Structure


@dataclass(frozen=True)
class ReleaseInputs:
    directory: Path
    model: Path
    public_key: Path  # the releaser's PEM public key (model-signing's and the provenance's signer)


@dataclass
class ReleaseFacts:
    """What the chain established, for the report and the verification summary."""

    files: dict[str, str]
    provenance_sha256: str
    checkpoint: Checkpoint
    witnesses: list[str]
    run_id: str
    checkpoint_seq: int


class _Broken(Exception):
    def __init__(self, detail: str, seq: int | None = None) -> None:
        super().__init__(detail)
        self.detail, self.seq = detail, seq


def check_release(inputs: ReleaseInputs, structure: Structure, report: Report) -> ReleaseFacts | None:
    """Run the chain's checks into ``report``; the facts, or None when a link failed."""
    attest.require("gradledger-verify --release")
    rdir = inputs.directory
    for name in ("model.sig", "provenance.json", "checkpoint.txt"):
        if not (rdir / name).is_file():
            raise UnusableInput(f"{rdir}: not a release directory ({name} is missing)")
    state: dict[str, Any] = {}

    def signature() -> str:
        files = model_files(inputs.model)
        with ThreadPoolExecutor(2) as pool:  # the files are hashed once for each, side by side
            tensors = pool.submit(model_tensors, files)
            state["files"] = attest.verify_model(inputs.model, rdir / "model.sig", inputs.public_key)
            state["tensors"] = tensors.result()
        # The signature's own serialization may ignore paths; every file of the model must be signed.
        names = {p.name if inputs.model.is_file() else p.relative_to(inputs.model).as_posix() for p in files}
        if names != set(state["files"]):
            raise _Broken(f"the model files and the signed files differ: {sorted(names ^ set(state['files']))[:3]}")
        return f"model-signing v1.0 signature of {len(state['files'])} files verifies under the release key"

    def provenance() -> str:
        st = attest.open_statement(rdir / "provenance.json", inputs.public_key, attest.PROVENANCE_TYPE)
        state["provenance_sha256"] = hashlib.sha256((rdir / "provenance.json").read_bytes()).hexdigest()
        subjects = attest.subjects_of(st)
        if subjects != state["files"]:
            raise _Broken(f"the provenance's subjects differ from the signed model files: "
                          f"{differing_names(subjects, state['files'])[:3]}")
        if st["predicate"].get("buildDefinition", {}).get("buildType") != attest.BUILD_TYPE:
            raise _Broken(f"the provenance's build type is not {attest.BUILD_TYPE}")
        state["predicate"] = st["predicate"]
        return "SLSA provenance v1 in DSSE verifies under the release key; its subjects are the signed files"

    def checkpoint() -> str:
        note = SignedNote.parse(read_regular(rdir / "checkpoint.txt", MAX_NOTE_SIZE, "checkpoint"))
        cp = Checkpoint.parse(note.text)
        obs = structure.observations
        head = obs[cp.size] if cp.size < len(obs) else None
        if head is None or head.type != "TreeHead":
            raise _Broken(f"the checkpoint's size {cp.size} is not a tree head of this bundle")
        if cp.origin != head.body["origin"] or cp.root != head.body["root"]:
            raise _Broken(f"the checkpoint (root {cp.root.hex()[:16]}) is not this bundle's tree of size {cp.size} "
                          f"(root {head.body['root'].hex()[:16]})", seq=head.seq)
        # The log key is the credential of the trainer who signed that TreeHead, as the verifier's
        # registry (built from its trusted roots) knows it; witnesses must be credentialed there too.
        trainer = structure.registry.check(head.signer, head.time, ("trainer",), what="sign tree heads")
        try:
            state["witnesses"] = check_cosigned(note, log_key(cp.origin, trainer.public_key),
                                                witness_keys(structure.registry, head.time))
        except VerificationError as exc:
            raise _Broken(str(exc), seq=head.seq) from None
        proofs = sorted((rdir / "proofs").glob("*.tlog-proof")) if (rdir / "proofs").is_dir() else []
        for path in proofs:
            proof = TlogProof.parse(read_regular(path, MAX_NOTE_SIZE, "tlog-proof"))
            if proof.note.text != note.text or not 0 <= proof.index < cp.size:
                raise _Broken(f"{path.name} is not a proof against the release's checkpoint")
            try:
                proof.verify(merkle.leaf_hash(obs[proof.index].record))
            except VerificationError as exc:
                raise _Broken(f"{path.name}: {exc}", seq=proof.index) from None
        state["checkpoint"], state["note"] = cp, note
        return (f"C2SP checkpoint of size {cp.size} is this bundle's tree, signed by its trainer and cosigned by "
                f"{', '.join(state['witnesses'])}; {len(proofs)} tlog-proofs check")

    def lineage() -> str:
        return _check_lineage(state, structure)

    for name, step in (("release signature", signature), ("release provenance", provenance),
                       ("release checkpoint", checkpoint), ("release lineage", lineage)):
        try:
            detail = step()
        except _Broken as broken:
            report.add(name, "fail", broken.detail, seq=broken.seq)
            return None
        except VerificationError as exc:
            report.add(name, "fail", str(exc.args[0]), seq=exc.seq)
            return None
        except GradledgerError:
            raise  # unusable input: exit 2
        report.add(name, "pass", detail)
    return ReleaseFacts(state["files"], state["provenance_sha256"], state["checkpoint"], state["witnesses"],
                        state["run_id"], state["checkpoint_seq"])


def _field(predicate: dict[str, Any], *path: str) -> Any:
    value: Any = predicate
    for key in path:
        if not isinstance(value, dict) or key not in value:
            raise _Broken(f"the provenance has no {'.'.join(path)}")
        value = value[key]
    return value


def _check_lineage(state: dict[str, Any], structure: Structure) -> str:
    """The provenance names this ledger's cosigned tree, a run in it, that run's last checkpoint
    below the tree's size, its policy, dataset and certificates; the model files hold exactly
    that checkpoint's model tensors."""
    pred, cp = state["predicate"], state["checkpoint"]
    dep = next((d for d in _field(pred, "buildDefinition", "resolvedDependencies") if d.get("name") == "ledger"), None)
    if dep is None:
        raise _Broken("the provenance names no ledger among its resolved dependencies")
    named = (dep.get("annotations", {}).get("origin"), dep.get("annotations", {}).get("size"),
             dep.get("digest", {}).get("sha256"))
    if named != (cp.origin, cp.size, cp.root.hex()):
        raise _Broken(f"the provenance points at ledger {named[0]!r} size {named[1]} root {str(named[2])[:16]}, but the "
                      f"cosigned checkpoint is {cp.origin!r} size {cp.size} root {cp.root.hex()[:16]}")
    run_seq = _field(pred, "buildDefinition", "externalParameters", "run", "seq")
    run = structure.runs.get(run_seq) if isinstance(run_seq, int) else None
    if run is None or run.run_id != _field(pred, "buildDefinition", "externalParameters", "run", "id"):
        raise _Broken(f"the provenance's run {run_seq!r} is not a run of this bundle")
    mine = [c for c in run.checkpoints if c < cp.size]
    cseq = _field(pred, "buildDefinition", "internalParameters", "checkpoint", "seq")
    if not mine or cseq != mine[-1]:
        raise _Broken(f"the provenance names checkpoint {cseq!r}, but run {run.run_id!r}'s last checkpoint in the "
                      f"cosigned tree is at seq {mine[-1] if mine else None}", seq=run.seq)
    body = structure.observations[cseq].body
    recorded, tensors = recorded_model_tensors(body["tensors"]), state["tensors"]
    if recorded != tensors:
        raise _Broken(f"the model files' tensors differ from checkpoint {cseq} (step {body['step']}): "
                      f"{differing_names(recorded, tensors)[:3]}", seq=cseq)
    if _field(pred, "buildDefinition", "internalParameters", "checkpoint", "digest", "sha256") != body["digest"].hex():
        raise _Broken("the provenance's checkpoint digest is not the recorded one", seq=cseq)
    settings = run.settings
    policy = _field(pred, "buildDefinition", "externalParameters", "policy")
    if "policy" in settings and policy != {"digest": {"sha256": bytes(settings["policy"]).hex()}}:
        raise _Broken("the provenance's policy digest is not the run's", seq=run.seq)
    dataset = settings.get("dataset") or {}
    root = _field(pred, "buildDefinition", "externalParameters", "dataset", "root")
    if "root" in dataset and root != {"sha256": bytes(dataset["root"]).hex()}:
        raise _Broken("the provenance's dataset root is not the run's", seq=run.seq)
    certs = [o.seq for o in structure.observations[run.seq : cp.size] if o.type == "UnlearningCertificate"]
    listed = [c.get("seq") for c in _field(pred, "buildDefinition", "internalParameters", "unlearningCertificates")]
    if listed != certs:
        raise _Broken(f"the provenance lists unlearning certificates {listed}, the ledger holds {certs} for this run")
    state["run_id"], state["checkpoint_seq"] = run.run_id, cseq
    return (f"the model files hold exactly the model tensors of run {run.run_id!r}'s final checkpoint (seq {cseq}, "
            f"step {body['step']}); policy, dataset and {len(certs)} certificates as recorded")

