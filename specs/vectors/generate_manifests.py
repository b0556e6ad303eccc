#!/usr/bin/env python3
"""Regenerate specs/vectors/manifests-v2.json, the vote-attestation vectors of specs/manifests.md.

    python specs/vectors/generate_manifests.py            # rewrite the JSON file beside this script
    python specs/vectors/generate_manifests.py --check    # exit 1 if the file on disk differs

Deterministic: keys from fixed seeds, explicit times, deterministic Ed25519. Each case is one
signed manifest (hex), its identity, and the verdict of specs/manifests.md §1-§4 under the
credentials listed at the top (all recorded at time 0): ``valid`` true, or false with
``names``, the quoted subject that the error must name, and ``stage`` (``parse`` or ``verify``).
Both implementations (training/manifests.py, verify/_internal/manifests.py) walk every case in
tests/test_manifest_votes.py, so a third implementation can prove itself on the same file.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from gradledger.ledger import credentials as C
from gradledger.ledger import encoding
from gradledger.ledger.keys import SigningKey
from gradledger.training import manifests as TM

OUT = Path(__file__).resolve().parent / "manifests-v2.json"
EXAMPLE = hashlib.sha256(b"gradledger manifest vector example").digest()
TIME = 1_700_000_000_000_000_000


def _key(i: int, label: str) -> SigningKey:
    return SigningKey.from_seed(bytes([0x6D, i]) * 16, label)


KEYS = {name: _key(i, name) for i, name in enumerate(("root", "trainer", "crowd", "other", "w0", "w1", "w2"), 1)}
CREDS = {
    "root": C.issue_root(KEYS["root"], subject="acme-root", path="acme"),
    "trainer": C.issue(KEYS["root"], subject="trainer-1", path="acme/training", role="trainer",
                       public_key=KEYS["trainer"].public_key),
    "crowd": C.issue(KEYS["root"], subject="crowd", path="acme/crowd", role="authority",
                     public_key=KEYS["crowd"].public_key),
    "other": C.issue(KEYS["root"], subject="other", path="acme/other", role="authority",
                     public_key=KEYS["other"].public_key),
    **{w: C.issue(KEYS["crowd"], subject=f"worker-{w[1]}", path="acme/crowd/mturk", role="source",
                  public_key=KEYS[w].public_key) for w in ("w0", "w1", "w2")},
}


def _body(workers: list[str], signer: str, version: int) -> dict[str, Any]:
    sources = [TM.source_entry(CREDS[w], 3, 0.75) for w in workers]
    m = TM.label_example(example=EXAMPLE, sources=sources, aggregation="single" if len(workers) == 1 else "majority",
                         ontology="digits-v1", review="accepted", key=KEYS[signer], time=TIME)
    body = encoding.decode(m.body)
    if version == 1:
        body["v"] = 1
        for src in body["sources"]:
            src.pop("attested_by", None)
    return body


def _signed(body: dict[str, Any], signer: str) -> bytes:
    data = encoding.encode(body)
    return encoding.encode([data, KEYS[signer].sign("manifest", data)])


def _first_other(body: dict[str, Any], signer: str) -> str:
    """The first entry (sources are in key-id order) whose vote the signer signs for another source."""
    return repr(next(src["source"] for src in body["sources"] if src["key_id"] != KEYS[signer].key_id))


def cases() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def case(desc: str, body: dict[str, Any], signer: str, valid: bool, names: str | None = None,
             stage: str | None = None) -> None:
        signed = _signed(body, signer)
        out.append({"desc": desc, "signed": signed.hex(), "digest": hashlib.sha256(signed).hexdigest(),
                    "valid": valid, "names": names, "stage": stage})

    case("v2: the crowd authority attests three workers' votes", _body(["w0", "w1", "w2"], "crowd", 2), "crowd", True)
    case("v2: the root attests a worker's vote", _body(["w1"], "root", 2), "root", True)
    case("v2: a worker signs its own vote, no attested_by", _body(["w2"], "w2", 2), "w2", True)
    refused = (("v2: worker-0 signs worker-1's and worker-2's votes (issue 10.8)", ["w0", "w1", "w2"], "w0"),
               ("v2: an authority over none of the sources", ["w0", "w1"], "other"),
               ("v2: a trainer signs", ["w0"], "trainer"))
    for desc, workers, signer in refused:
        body = _body(workers, signer, 2)
        case(desc, body, signer, False, _first_other(body, signer), "verify")
    dropped = _body(["w0", "w1"], "crowd", 2)
    del dropped["sources"][1]["attested_by"]
    case("v2: an attested vote without attested_by", dropped, "crowd", False, repr(dropped["sources"][1]["source"]),
         "parse")
    own = _body(["w1"], "w1", 2)
    own["sources"][0]["attested_by"] = KEYS["w1"].key_id
    case("v2: attested_by on the signer's own entry", own, "w1", False, "'worker-1'", "parse")
    case("v1: a single worker signs its own vote (still valid)", _body(["w0"], "w0", 1), "w0", True)
    case("v1: the crowd authority signs three workers' votes (still valid)", _body(["w0", "w1", "w2"], "crowd", 1),
         "crowd", True)
    forged_v1 = _body(["w0", "w1", "w2"], "w0", 1)
    case("v1: worker-0 signs worker-1's and worker-2's votes (refused)", forged_v1, "w0", False,
         _first_other(forged_v1, "w0"), "verify")
    v1_attested = _body(["w0", "w1"], "crowd", 2)
    v1_attested["v"] = 1
    case("v1: attested_by is not a version-1 field", v1_attested, "crowd", False, "attested_by", "parse")
    return out


def vectors() -> dict[str, Any]:
    return {
        "format": "gradledger-manifest-vectors/2",
        "credentials": [{"name": n, "signed": c.signed.hex()} for n, c in CREDS.items()],
        "cases": cases(),
    }


def render() -> str:
    return json.dumps(vectors(), indent=1) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.name} is stale; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
