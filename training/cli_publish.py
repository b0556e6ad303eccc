"""The publishing subcommands of `gradledger` (specs/release.md): `checkpoint`, `witness`, `proof`,
`release-key` and `release`. Exit codes as every subcommand: 0 done, 1 a check failed, 2 unusable input."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gradledger.ledger.errors import UnusableInput
from gradledger.ledger.files import read_regular
from gradledger.ledger.ledger import Ledger
from gradledger.ledger.note import MAX_NOTE_SIZE, AddCheckpoint, NoteKey, SignedNote

if TYPE_CHECKING:
    from gradledger.ledger.keys import SigningKey

EXIT_OK = 0


def _write(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def _read_note(path: str) -> SignedNote:
    return SignedNote.parse(read_regular(path, MAX_NOTE_SIZE, "checkpoint"))


def merge_notes(paths: list[str]) -> SignedNote:
    """One note carrying every signature of the given notes, which must have the same text."""
    notes = [_read_note(p) for p in paths]
    merged = notes[0]
    for other in notes[1:]:
        if other.text != merged.text:
            raise UnusableInput("the checkpoints given differ in their text: merge cosignatures of one checkpoint only")
        for sig in other.signatures:
            merged = merged.with_signature(sig)
    return merged


def trainer_key(ledger: str, key: str | None) -> "SigningKey":
    """``--key``, or the trainer key of the project whose ledger ``ledger`` is."""
    from gradledger.ledger.keys import SigningKey
    from gradledger.training.project import LEDGER_DIR, PROJECT_FILE, Project

    if key is not None:
        return SigningKey.load(key)
    path = Path(ledger).resolve()
    if path.name != LEDGER_DIR or not (path.parent / PROJECT_FILE).is_file():
        raise UnusableInput(f"{ledger} is not a project's ledger: give the trainer's key with --key")
    with Project.open(path.parent, writable=False) as project:
        return project.trainer_key


def _checkpoint(args: argparse.Namespace) -> int:
    from gradledger.ledger.publish import add_checkpoint_request, log_key_of, signed_checkpoint

    key = trainer_key(args.ledger, args.key)
    with Ledger.open(args.ledger) as ledger:
        if args.vkey:
            _write(log_key_of(ledger, args.size).vkey() + "\n", args.output)
            return EXIT_OK
        note = signed_checkpoint(ledger, key, args.size)
        if args.old is not None:
            _write(add_checkpoint_request(ledger, note, args.old).render(), args.output)
        else:
            _write(note.render(), args.output)
    return EXIT_OK


def _witness_cosign(args: argparse.Namespace) -> int:
    from gradledger.ledger.keys import SigningKey
    from gradledger.ledger.publish import Witness

    request = AddCheckpoint.parse(read_regular(args.request, MAX_NOTE_SIZE, "add-checkpoint request"))
    witness = Witness(SigningKey.load(args.key), args.name, Path(args.state))
    sig = witness.cosign(request, NoteKey.parse(args.log_key), int(time.time()))
    _write(request.note.with_signature(sig).render(), args.output)
    return EXIT_OK


def _witness_key(args: argparse.Namespace) -> int:
    from gradledger.ledger.keys import SigningKey
    from gradledger.ledger.note import witness_key

    print(witness_key(args.name, SigningKey.load(args.key).public_key).vkey())
    return EXIT_OK


def _witness_keygen(args: argparse.Namespace) -> int:
    from gradledger.ledger.keys import SigningKey, format_public_key
    from gradledger.ledger.note import check_key_name, witness_key

    check_key_name(args.name)
    key = SigningKey.generate(args.name)
    key.save(args.output)
    print(f"{format_public_key(key.public_key, args.name)}\n{witness_key(args.name, key.public_key).vkey()}")
    return EXIT_OK


def _witness_admit(args: argparse.Namespace) -> int:
    from gradledger.ledger.keys import PUBLIC_LINE_PREFIX
    from gradledger.training.project import Project

    token = args.public_key.removeprefix(PUBLIC_LINE_PREFIX)
    try:
        public_key = bytes.fromhex(token)
        if len(public_key) != 32:
            raise ValueError
    except ValueError:
        raise UnusableInput("--public-key must be 'ed25519:<64 hex digits>' (gradledger witness keygen prints it)") from None
    with Project.open(args.project) as project:
        cred = project.admit_witness(args.name, public_key)
    print(f"credentialed witness {cred.subject!r} at {cred.path} (key {cred.key_id.hex()[:16]})")
    return EXIT_OK


def _witness_verify(args: argparse.Namespace) -> int:
    note = _read_note(args.checkpoint)
    keys = [NoteKey.parse(args.log_key), *(NoteKey.parse(k) for k in args.witness_key or [])]
    result = {k.name: note.verify(k) for k in keys}  # raises SignatureError: exit 1
    if args.json:
        print(json.dumps({"verified": True, "signatures": result}, sort_keys=True))
    else:
        print("verified: " + ", ".join(f"{n}" + (f" (cosigned at {t})" if t is not None else "") for n, t in result.items()))
    return EXIT_OK


def _proof(args: argparse.Namespace) -> int:
    from gradledger.ledger.publish import tlog_proof

    with Ledger.open(args.ledger) as ledger:
        _write(tlog_proof(ledger, args.seq, merge_notes(args.checkpoint)).render(), args.output)
    return EXIT_OK


def _release_key(args: argparse.Namespace) -> int:
    from gradledger.ledger.attest import new_key

    pub = new_key(Path(args.output))
    print(f"wrote {args.output} (ECDSA P-256, 0600) and {pub}")
    return EXIT_OK


def _release(args: argparse.Namespace) -> int:
    from gradledger.training.release import make_release

    note = merge_notes(args.checkpoint)
    with Ledger.open(args.ledger) as ledger:
        done = make_release(ledger, Path(args.model), Path(args.key), note, Path(args.output))
    summary = {"out": str(done.out), "run_id": done.run_id, "checkpoint_seq": done.checkpoint_seq,
               "step": done.step, "files": done.files, "witnesses": done.witnesses}
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"released {len(done.files)} model files as run {done.run_id!r}'s final checkpoint (seq "
              f"{done.checkpoint_seq}, step {done.step}), cosigned by {', '.join(done.witnesses)}: {done.out}/")
    return EXIT_OK


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    cp = sub.add_parser("checkpoint", help="a signed tree head as a C2SP checkpoint note (or a witness request)")
    cp.add_argument("ledger", help="ledger directory")
    cp.add_argument("--key", help="the trainer's private key file (the one that signed the tree head; default: "
                    "the trainer key of the project the ledger belongs to)")
    cp.add_argument("--size", type=int, help="the tree head's size (default: the latest tree head)")
    cp.add_argument("--old", type=int, metavar="SIZE", help="print a tlog-witness add-checkpoint request with a "
                    "consistency proof from SIZE (0: the witness has not seen this log)")
    cp.add_argument("--vkey", action="store_true", help="print the log's note verifier key instead")
    cp.add_argument("-o", "--output", help="file to write (default: stdout)")
    cp.set_defaults(run=_checkpoint)

    witness = sub.add_parser("witness", help="act as a C2SP witness: cosign consistent checkpoints, check cosignatures")
    wsub = witness.add_subparsers(dest="witness_command", required=True, metavar="ACTION")
    cosign = wsub.add_parser("cosign", help="cosign the checkpoint of an add-checkpoint request if it is "
                             "consistent with the last one this witness cosigned for its log")
    cosign.add_argument("request", help="add-checkpoint request file (gradledger checkpoint --old N)")
    cosign.add_argument("--key", required=True, help="the witness's private key file")
    cosign.add_argument("--name", required=True, help="the witness's name (its credential subject)")
    cosign.add_argument("--state", required=True, help="the witness's state file (created on first use)")
    cosign.add_argument("--log-key", required=True, help="the log's verifier key (gradledger checkpoint --vkey)")
    cosign.add_argument("-o", "--output", help="file for the cosigned checkpoint (default: stdout)")
    cosign.set_defaults(run=_witness_cosign)
    keygen = wsub.add_parser("keygen", help="make a witness key (0600); print its public key and verifier key")
    keygen.add_argument("output", help="private key file to create")
    keygen.add_argument("--name", required=True, help="the witness's name (no spaces or '+')")
    keygen.set_defaults(run=_witness_keygen)
    admit = wsub.add_parser("admit", help="have a project's root credential a witness (role witness)")
    admit.add_argument("project", help="project directory (gradledger init)")
    admit.add_argument("--name", required=True, help="the witness's name: its credential subject and key name")
    admit.add_argument("--public-key", required=True, help="the witness's public key, 'ed25519:<hex>'")
    admit.set_defaults(run=_witness_admit)
    key = wsub.add_parser("key", help="print this witness's cosignature verifier key")
    key.add_argument("--key", required=True, help="the witness's private key file")
    key.add_argument("--name", required=True, help="the witness's name")
    key.set_defaults(run=_witness_key)
    verify = wsub.add_parser("verify", help="check a checkpoint's log signature and the given witnesses' cosignatures")
    verify.add_argument("checkpoint", help="checkpoint note file")
    verify.add_argument("--log-key", required=True, help="the log's verifier key")
    verify.add_argument("--witness-key", action="append", help="a witness verifier key (repeatable)")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(run=_witness_verify)

    proof = sub.add_parser("proof", help="a C2SP tlog-proof of one observation against a (co)signed checkpoint")
    proof.add_argument("ledger", help="ledger directory")
    proof.add_argument("--seq", type=int, required=True, help="the observation's sequence number")
    proof.add_argument("--checkpoint", action="append", required=True, help="checkpoint note file (repeatable: "
                       "the signatures of several copies of one checkpoint are merged)")
    proof.add_argument("-o", "--output", help="file to write (default: stdout)")
    proof.set_defaults(run=_proof)

    rkey = sub.add_parser("release-key", help="make a release signing key (ECDSA P-256 PEM, as model-signing takes)")
    rkey.add_argument("output", help="private key file to create (0600); the public key goes to OUTPUT.pub")
    rkey.set_defaults(run=_release_key)
    release = sub.add_parser("release", help="sign model files (OpenSSF model signing) and write their SLSA "
                             "provenance, linked to a cosigned checkpoint of the ledger")
    release.add_argument("ledger", help="ledger directory")
    release.add_argument("--model", required=True, help="model file or directory (its .safetensors files must hold "
                         "a run's final checkpoint's model tensors)")
    release.add_argument("--key", required=True, help="the releaser's private key (PEM; gradledger release-key)")
    release.add_argument("--checkpoint", action="append", required=True, help="the cosigned checkpoint note "
                         "(repeatable: the cosignatures of several witnesses are merged)")
    release.add_argument("-o", "--output", required=True, help="release directory to write")
    release.add_argument("--json", action="store_true", help="machine-readable output")
    release.set_defaults(run=_release)
