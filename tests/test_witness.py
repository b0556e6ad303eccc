"""Witness cosignatures of tree heads: stored only when valid, by a credentialed witness."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import build_ledger

from gradledger.ledger import credentials
from gradledger.ledger.errors import CredentialError, ProofError, SignatureError
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.witness import cosign


def test_witness_cosigns_tree_heads(tmp_path: Path) -> None:
    ledger, world = build_ledger(tmp_path / "l", updates=10, tree_head_every=5)
    witness = SigningKey.generate("witness")
    ledger.append(
        "CredentialIssued",
        {"credential": credentials.issue(world.root, subject="notary", path="acme/witnesses", role="witness",
                                         public_key=witness.public_key).signed},
        world.root,
    )
    head = ledger.tree_head(world.trainer)
    ledger.add_cosignature(head.seq, witness.key_id, cosign(head, witness))
    assert [(seq, kid) for seq, kid, _ in ledger.cosignatures()] == [(head.seq, witness.key_id)]

    # A forged cosignature, a non-witness signer, and a non-head observation are refused.
    with pytest.raises(SignatureError):
        ledger.add_cosignature(head.seq, witness.key_id, bytes(64))
    with pytest.raises(CredentialError):
        ledger.add_cosignature(head.seq, world.trainer.key_id, cosign(head, world.trainer))
    with pytest.raises(ProofError):
        ledger.add_cosignature(head.seq - 1, witness.key_id, cosign(head, witness))
    assert len(list(ledger.cosignatures())) == 1
    ledger.close()
