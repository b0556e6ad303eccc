"""Shared builders for ledger tests: a small authority taxonomy and a ledger populated from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from gradledger.ledger import credentials as C
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger


@dataclass
class World:
    root: SigningKey
    trainer: SigningKey
    authority: SigningKey
    source: SigningKey
    root_cred: C.Credential
    trainer_cred: C.Credential
    authority_cred: C.Credential
    source_cred: C.Credential


def make_world(seed: int = 0) -> World:
    def key(i: int, label: str) -> SigningKey:
        return SigningKey.from_seed(bytes([seed % 256, i]) * 16, label)

    root, trainer, authority, source = key(1, "root"), key(2, "trainer"), key(3, "radiology"), key(4, "dr-a")
    return World(
        root=root,
        trainer=trainer,
        authority=authority,
        source=source,
        root_cred=C.issue_root(root, subject="acme-root", path="acme"),
        trainer_cred=C.issue(root, subject="trainer-1", path="acme/training", role="trainer", public_key=trainer.public_key),
        authority_cred=C.issue(
            root, subject="radiology", path="acme/radiology", role="authority", public_key=authority.public_key
        ),
        source_cred=C.issue(
            authority, subject="dr-a", path="acme/radiology/attending", role="source", public_key=source.public_key
        ),
    )


def update_body(step: int, batch: list[int] | None = None) -> dict:
    return {
        "step": step,
        "batch": list(range(step % 7, step % 7 + 8)) if batch is None else batch,
        "policy": b"p" * 32,
        "lr": 0.01,
        "loss": 1.0 / (step + 1),
        "band_grad_norms": [1.0, 0.5, 0.25],
        "band_update_norms": [0.1, 0.05, 0.0],
        "authority_writes": {"acme/radiology/attending": [8.0, 8.0, 0.0]},
        "sources": ["dr-a"],
    }


def genesis(ledger: Ledger, world: World) -> None:
    """The opening records every ledger starts with: credentials, then RunStarted."""
    ledger.append("CredentialIssued", {"credential": world.root_cred.signed}, world.root)
    ledger.append("CredentialIssued", {"credential": world.trainer_cred.signed}, world.root)
    ledger.append("CredentialIssued", {"credential": world.authority_cred.signed}, world.root)
    ledger.append("CredentialIssued", {"credential": world.source_cred.signed}, world.authority)
    ledger.append(
        "RunStarted",
        {"run_id": "run-1", "environment": {"torch": "test"}, "artifacts": {}, "settings": {}},
        world.trainer,
        commit=True,
    )


def build_ledger(path: Path, updates: int = 20, seed: int = 0, tree_head_every: int = 0) -> tuple[Ledger, World]:
    """A closed-over-nothing, writable ledger with ``updates`` GovernedUpdates after the genesis records."""
    world = make_world(seed)
    ledger = Ledger.create(path)
    genesis(ledger, world)
    for step in range(updates):
        ledger.append("GovernedUpdate", update_body(step), world.trainer)
        if tree_head_every and (step + 1) % tree_head_every == 0:
            ledger.tree_head(world.trainer)
    ledger.commit()
    return ledger, world


# -- a crowd authority and a routing policy, shared by the trainer tests and bench/overhead.py --

CROWD_KEY = SigningKey.from_seed(bytes([71]) * 32, "crowd")
WORKER_KEYS = [SigningKey.from_seed(bytes([72 + i]) * 32, f"worker-{i}") for i in range(2)]


def crowd_credentials(world: World) -> tuple[C.Credential, list[C.Credential]]:
    """A crowd authority issued by the world's root, and two workers it credentials."""
    crowd = C.issue(world.root, subject="crowd", path="acme/crowd", role="authority", public_key=CROWD_KEY.public_key)
    workers = [
        C.issue(CROWD_KEY, subject=f"worker-{i}", path="acme/crowd/mturk", role="source", public_key=k.public_key)
        for i, k in enumerate(WORKER_KEYS)
    ]
    return crowd, workers


def crowd_ledger(path: Path, world: World, sources: Sequence[C.Credential] = ()) -> Ledger:
    """A new ledger at ``path`` with the world's genesis, the crowd authority and its two workers
    (``crowd_credentials``), and ``sources`` the crowd credentials too; committed."""
    crowd, workers = crowd_credentials(world)
    ledger = Ledger.create(path)
    genesis(ledger, world)
    ledger.append("CredentialIssued", {"credential": crowd.signed}, world.root)
    for cred in [*workers, *sources]:
        ledger.append("CredentialIssued", {"credential": cred.signed}, CROWD_KEY)
    ledger.commit()
    return ledger


def policy_fields(name: str, limit_scale: float = 1.0) -> dict:
    """Expert labels reach every band, confident crowd labels the upper two, the rest the head only."""
    s = limit_scale
    return {
        "name": name,
        "bands": ["head", "mid", "embedding"],
        "rules": [
            {"name": "rejected", "match": {"review": ["rejected"]}, "profile": [0, 0, 0], "limits": [None, None, None]},
            {"name": "expert", "match": {"authority": "acme/radiology", "min_confidence": 0.9},
             "profile": [1, 1, 1], "limits": [None, 5.0 * s, 2.0 * s]},
            {"name": "crowd-confident", "match": {"authority": "acme/crowd", "min_confidence": 0.75},
             "profile": [1, 0.5, 0], "limits": [10.0 * s, 2.0 * s, None]},
        ],
        # Everything else (low-confidence crowd labels) may tune the head only.
        "default": {"profile": [1, 0, 0], "limits": [10.0 * s, None, None]},
    }


def verify_cli(bundle: Path, roots: Path, *args: str) -> tuple[int, dict]:
    """``gradledger-verify BUNDLE --trust ROOTS --json ARGS``, run through the command line's own ``main`` in this
    process (no interpreter start; replay still runs in sandboxed worker processes): its exit code and report.
    tests/test_verify_cli.py runs the installed command itself."""
    import contextlib
    import io
    import json

    from gradledger.verify.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(bundle), "--trust", str(roots), "--json", *args])
    assert "Traceback" not in err.getvalue(), err.getvalue()
    text = out.getvalue().strip()
    return code, json.loads(text.splitlines()[-1]) if text else {}
