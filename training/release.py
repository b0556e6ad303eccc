"""`gradledger release`: a model release that standard supply-chain tools verify (specs/release.md §4).

    summary = make_release(ledger, Path("model/"), Path("release.pem"), SignedNote.parse(cosigned), Path("release/"))

writes into ``release/``:
- ``model.sig``: an OpenSSF model-signing signature of the model files (the ``model-signing``
  package, payload v1.0), which ``model_signing verify key`` accepts unmodified;
- ``provenance.json``: a DSSE envelope of an in-toto Statement v1 with a SLSA provenance v1
  predicate: subject the model files, build definition the ledger (origin, size and root of the
  cosigned checkpoint), the run, its policy and dataset, the final checkpoint the model files
  match tensor by tensor, and the unlearning certificates in force;
- ``checkpoint.txt``: the cosigned C2SP checkpoint, and ``proofs/<seq>.tlog-proof`` for every
  observation the provenance names.

The model files are hashed once for the signature while their tensor digests are computed in a
second thread (hashlib releases the GIL), so a release costs about one pass over the files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradledger.ledger import attest
from gradledger.ledger.errors import ProofError, UnusableInput, VerificationError
from gradledger.ledger.ledger import Ledger
from gradledger.ledger.note import Checkpoint, SignedNote
from gradledger.ledger.publish import check_cosigned, log_key_of, tlog_proof, tree_head, witness_keys
from gradledger.ledger.tensorfile import differing_names, model_files, model_tensors, recorded_model_tensors


@dataclass(frozen=True)
class Release:
    out: Path
    run_id: str
    checkpoint_seq: int
    step: int
    files: dict[str, str]  # model file name -> sha256 hex
    witnesses: list[str]


def final_checkpoints(ledger: Ledger, size: int) -> list[dict[str, Any]]:
    """Per run that began before ``size``, newest first: the run and its last Checkpoint below ``size``."""
    runs = [s for s in ledger.by_type("RunStarted") if s < size]
    checkpoints = [s for s in ledger.by_type("Checkpoint") if s < size]
    out = []
    for i, run_seq in enumerate(runs):
        end = runs[i + 1] if i + 1 < len(runs) else size
        mine = [c for c in checkpoints if run_seq < c < end]
        if mine:
            out.append({"run_seq": run_seq, "checkpoint_seq": mine[-1]})
    return out[::-1]


def link_model(ledger: Ledger, size: int, tensors: dict[str, bytes]) -> tuple[Any, Any]:
    """The RunStarted and the final Checkpoint whose model tensors the files hold, exactly."""
    closest = None
    for cand in final_checkpoints(ledger, size):
        cp = ledger.observation(cand["checkpoint_seq"])
        recorded = recorded_model_tensors(cp.body["tensors"])
        if recorded == tensors:
            return ledger.observation(cand["run_seq"]), cp
        closest = closest or (cand["checkpoint_seq"], differing_names(recorded, tensors))
    if closest is None:
        raise VerificationError(f"no run has a checkpoint in the cosigned tree of size {size}")
    raise VerificationError(f"the model files match no run's final checkpoint (the latest, at seq {closest[0]}, "
                            f"differs in {closest[1][:3]})", seq=closest[0])


def check_checkpoint_note(ledger: Ledger, note: SignedNote) -> tuple[Checkpoint, list[str]]:
    """The note is a checkpoint of this ledger, signed by the trainer who signed that TreeHead and
    cosigned by at least one witness credentialed in the ledger; no other signature."""
    cp = Checkpoint.parse(note.text)
    if cp.origin != ledger.origin or ledger.root_at(cp.size) != cp.root:
        raise ProofError(f"the checkpoint (origin {cp.origin!r}, size {cp.size}) is not one of this ledger's trees")
    head = tree_head(ledger, cp.size)
    return cp, check_cosigned(note, log_key_of(ledger, cp.size), witness_keys(ledger.registry, head.time))


def make_release(ledger: Ledger, model: Path, key: Path, note: SignedNote, out: Path) -> Release:
    attest.require("gradledger release")
    files = model_files(model)
    cp, witnesses = check_checkpoint_note(ledger, note)
    if out.exists() and any(out.iterdir()):
        raise UnusableInput(f"{out}: the release directory must be new or empty")
    # Written under a temporary name and renamed at the end: a refused or crashed release leaves
    # no directory that looks like a release.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        run, checkpoint, resources = _write_release(ledger, model, key, note, cp, files, staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Release(out, run.body["run_id"], checkpoint.seq, checkpoint.body["step"], resources, witnesses)


def _write_release(ledger: Ledger, model: Path, key: Path, note: SignedNote, cp: Checkpoint, files: list[Path],
                   out: Path) -> tuple[Any, Any, dict[str, str]]:
    sig_path = out / "model.sig"
    with ThreadPoolExecutor(2) as pool:  # one pass over the files: signature and tensor digests side by side
        signed = pool.submit(attest.sign_model, model, key, sig_path)
        tensors = pool.submit(model_tensors, files)
        resources = signed.result()
        run, checkpoint = link_model(ledger, cp.size, tensors.result())
    certificates = [s for s in ledger.by_type("UnlearningCertificate") if run.seq < s < cp.size]
    named = [run.seq, checkpoint.seq, *certificates]
    predicate = provenance_predicate(ledger, cp, note, run, checkpoint, certificates)
    statement = attest.statement(resources, attest.PROVENANCE_TYPE, predicate)
    (out / "provenance.json").write_text(json.dumps(attest.sign_statement(statement, key), indent=1))
    (out / "checkpoint.txt").write_text(note.render())
    (out / "proofs").mkdir(exist_ok=True)
    for seq in named:
        (out / "proofs" / f"{seq}.tlog-proof").write_text(tlog_proof(ledger, seq, note).render())
    return run, checkpoint, resources


def provenance_predicate(ledger: Ledger, cp: Checkpoint, note: SignedNote, run: Any, checkpoint: Any,
                         certificates: list[int]) -> dict[str, Any]:
    """SLSA provenance v1 (slsa.dev/provenance/v1): what the release links to, field by field in
    specs/release.md §4.2."""
    settings = run.body["settings"]
    dataset = settings.get("dataset") or {}
    return {
        "buildDefinition": {
            "buildType": attest.BUILD_TYPE,
            "externalParameters": {
                "run": {"id": run.body["run_id"], "seq": run.seq},
                "policy": {"digest": {"sha256": bytes(settings["policy"]).hex()}} if "policy" in settings else {},
                "dataset": {"name": dataset.get("name"), "seq": dataset.get("seq"),
                            "root": {"sha256": bytes(dataset["root"]).hex()} if "root" in dataset else None},
            },
            "internalParameters": {
                "checkpoint": {"seq": checkpoint.seq, "step": checkpoint.body["step"],
                               "digest": {"sha256": checkpoint.body["digest"].hex()},
                               "artifact": {"sha256": checkpoint.body["artifact"].hex()}},
                "unlearningCertificates": [
                    {"seq": s, "source": ledger.observation(s).body["source"],
                     "newHead": {"sha256": ledger.observation(s).body["new_head"].hex()}} for s in certificates],
            },
            "resolvedDependencies": [{
                "uri": f"gradledger:{cp.origin.removeprefix('gradledger:')}?size={cp.size}",
                "digest": {"sha256": cp.root.hex()},
                "name": "ledger",
                "annotations": {"origin": cp.origin, "size": cp.size, "checkpoint": note.render()},
            }],
        },
        "runDetails": {
            "builder": {"id": f"https://gradledger.dev/trainer/{run.signer.hex()}"},
            "metadata": {"invocationId": run.body["run_id"]},
        },
    }
