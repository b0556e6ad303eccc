"""`gradledger-verify --attest FILE`: the verifier's result as a signed SLSA verification summary
(https://slsa.dev/verification_summary/v1) in an in-toto Statement v1, in DSSE (specs/release.md §5).

An intake pipeline then consumes "replay-verified" as an attestation: ``verificationResult`` is
PASSED only when the report verified, and ``verifiedLevels`` names what the verdict covers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from gradledger.ledger import attest

from ..report import Report

VERIFIER_ID = "https://gradledger.dev/gradledger-verify"
POLICY_URI = "https://gradledger.dev/specs/verification.md"
#: VSA: custom levels MUST NOT start with "SLSA_"; these say what the verdict covers.
LEVELS = {"exact": "GRADLEDGER_REPLAY_EXACT", "tolerance": "GRADLEDGER_REPLAY_TOLERANCE",
          "structure only": "GRADLEDGER_STRUCTURE_ONLY"}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def summary_statement(report: Report, bundle: str, policy: dict[str, Any], version: str) -> dict[str, Any]:
    """The VSA statement. Subjects: the bundle file (or, for a ledger directory, its root), and the
    model files when a release was checked."""
    release = report.figures.get("release")
    if os.path.isfile(bundle):
        subjects = {Path(bundle).name: _sha256_file(Path(bundle))}
    else:
        heads = json.dumps(report.heads, sort_keys=True).encode()
        subjects = {f"ledger:{Path(bundle).name}": hashlib.sha256(heads).hexdigest()}
    if release:
        subjects.update(release["files"])
    policy_bytes = json.dumps(policy, sort_keys=True).encode()
    predicate: dict[str, Any] = {
        "verifier": {"id": VERIFIER_ID, "version": {"gradledger": version}},
        "timeVerified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resourceUri": f"file:{Path(bundle).name}",
        "policy": {"uri": POLICY_URI, "digest": {"sha256": hashlib.sha256(policy_bytes).hexdigest()}},
        "verificationResult": "PASSED" if report.verified else "FAILED",
        "verifiedLevels": [LEVELS[report.verdict]] if report.verified else ["FAILED"],
        "gradledger": {"verdict": report.verdict, "weightsVerified": report.weights_verified,
                       "replayScope": report.replay_scope, "policy": policy,
                       "firstFailure": None if report.first_failure is None else report.first_failure.to_json()},
    }
    if release:
        ledger = release["ledger"]
        predicate["resourceUri"] = f"gradledger:{ledger['origin'].removeprefix('gradledger:')}?size={ledger['size']}"
        predicate["inputAttestations"] = [{"uri": "provenance.json", "digest": {"sha256": release["provenance_sha256"]}}]
    return attest.statement(subjects, attest.VSA_TYPE, predicate)


def write_summary(path: Path, key: Path, report: Report, bundle: str, policy: dict[str, Any], version: str) -> None:
    attest.require("gradledger-verify --attest")
    envelope = attest.sign_statement(summary_statement(report, bundle, policy, version), key)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(envelope, indent=1))
    os.replace(tmp, path)
