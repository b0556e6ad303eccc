"""Release cost (issue 15): producing and verifying a release of a 100M-parameter model's files,
over the time to hash those files once.

A governed run of a 100.7M-parameter MLP (six 4096x4096 layers and a head; synthetic data) is
recorded in a project; a witness cosigns its checkpoint; the final weights are written as four
safetensors shards. Then, interleaved per round and with the files in the page cache for all three:
- ``hash``: SHA-256 of every model file once (hashlib.file_digest), the baseline;
- ``produce``: ``gradledger release`` (model-signing signature, tensor digests, provenance, proofs);
- ``verify``: the release chain inside a verification with ``--replay none`` (``Verifier`` with a
  release policy; the report's ``release_seconds``: model-signing verification, tensor digests,
  DSSE, checkpoint, lineage).
Both run in this process, after a first round that also pays the imports; the one-time import of
the release extra in a fresh process is reported apart (``release_import_seconds``).

Last line: JSON with ``release_vs_hash`` (the larger of produce and verify over hash; target
<= 1.5), ``produce_vs_hash``, ``verify_vs_hash`` and the medians in seconds.

    python bench/release.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import gradledger
from gradledger.ledger import credentials
from gradledger.ledger.keys import SigningKey
from gradledger.training.cli import main as gradledger_cli

HERE = Path(__file__).resolve().parent
WIDTH, DEPTH, SHARDS = 4096, 6, 4


def build(base: Path) -> tuple[Path, Path]:
    """A project with one governed step of the 100M model, a witness, and the model's shards."""
    torch.manual_seed(0)
    x = torch.randn(16, WIDTH)
    y = torch.randint(0, 10, (16,))
    with gradledger.Project.init(base / "project", HERE.parent / "examples" / "taxonomy.toml") as project:
        project.label(x, y.tolist(), source="dr-lee", name="synthetic")
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    project = gradledger.Project.open(base / "project")
    gm, gopt, gloader = gradledger.govern(model, optimizer, loader, project=project, dataset="synthetic",
                                          checkpoint_every=1)
    for inputs, labels in gloader:
        gopt.zero_grad()
        nn.functional.cross_entropy(gm(inputs), labels).backward()
        gopt.step()
        break
    gm.run.close()
    witness = SigningKey.generate("witness")
    project.ledger.append("CredentialIssued", {"credential": credentials.issue(
        project.root_key, subject="notary.example", path="acme/witnesses", role="witness",
        public_key=witness.public_key).signed}, project.root_key)
    project.ledger.tree_head(project.trainer_key)
    keys = base / "keys"
    keys.mkdir()
    project.trainer_key.save(keys / "trainer.key")
    witness.save(keys / "witness.key")
    project.close()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = sorted(state)
    model_dir = base / "model"
    model_dir.mkdir()
    per = -(-len(names) // SHARDS)
    for i in range(SHARDS):
        save_file({n: state[n] for n in names[i * per : (i + 1) * per]}, model_dir / f"model-{i:05d}.safetensors")
    ledger = base / "project" / "ledger"
    cli = lambda *a: gradledger_cli([str(x) for x in a])  # noqa: E731
    assert cli("checkpoint", ledger, "--key", keys / "trainer.key", "--vkey", "-o", base / "log.vkey") == 0
    assert cli("checkpoint", ledger, "--key", keys / "trainer.key", "--old", "0", "-o", base / "req") == 0
    assert cli("witness", "cosign", base / "req", "--key", keys / "witness.key", "--name", "notary.example",
               "--state", base / "wstate.json", "--log-key", (base / "log.vkey").read_text().strip(),
               "-o", base / "cosigned.txt") == 0
    assert cli("release-key", keys / "release.pem") == 0
    params = sum(v.numel() for v in state.values())
    print(f"model: {params / 1e6:.1f}M parameters in {SHARDS} shards, "
          f"{sum(p.stat().st_size for p in model_dir.iterdir()) / 1e6:.0f} MB", file=sys.stderr)
    return ledger, model_dir


def hash_once(model_dir: Path) -> float:
    started = time.perf_counter()
    for path in sorted(model_dir.iterdir()):
        with open(path, "rb") as f:
            hashlib.file_digest(f, "sha256")
    return time.perf_counter() - started


def produce(base: Path, ledger: Path, model_dir: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    code = gradledger_cli(["release", str(ledger), "--model", str(model_dir), "--key", str(base / "keys" / "release.pem"),
                           "--checkpoint", str(base / "cosigned.txt"), "-o", str(out)])
    elapsed = time.perf_counter() - started
    assert code == 0
    return elapsed


def verify(base: Path, ledger: Path, model_dir: Path, out: Path) -> tuple[float, float]:
    """The release chain's seconds inside a verification (--replay none), and the whole call's."""
    from gradledger.ledger.keys import read_public_keys
    from gradledger.verify import VerificationPolicy, Verifier
    from gradledger.verify._internal.release import ReleaseInputs

    policy = VerificationPolicy(replay="none", release=ReleaseInputs(out, model_dir, base / "keys" / "release.pem.pub"))
    started = time.perf_counter()
    report = Verifier(read_public_keys(base / "project" / "roots.pub"), policy).verify(ledger)
    wall = time.perf_counter() - started
    assert report.verified, report.render()
    return report.figures["release_seconds"], wall


def import_seconds() -> float:
    """What a fresh process pays once to import the release extra (model-signing, sigstore,
    securesystemslib, in-toto-attestation), outside the per-byte cost measured above."""
    code = ("import time; t = time.perf_counter(); from gradledger.ledger import attest; attest.require('bench'); "
            "print(time.perf_counter() - t)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="gradledger-release-bench-"))
    try:
        ledger, model_dir = build(base)
        hash_once(model_dir)  # warm the page cache: every measurement then reads from memory
        hashes, produced, verified, walls = [], [], [], []
        for r in range(args.rounds):
            hashes.append(hash_once(model_dir))
            produced.append(produce(base, ledger, model_dir, base / "release"))
            chain, wall = verify(base, ledger, model_dir, base / "release")
            verified.append(chain)
            walls.append(wall)
            print(f"round {r}: hash {hashes[-1]:.3f} s, produce {produced[-1]:.3f} s, verify chain {chain:.3f} s "
                  f"(whole verification, --replay none: {wall:.1f} s)", file=sys.stderr)
        h, p, v = statistics.median(hashes), statistics.median(produced), statistics.median(verified)
        print(json.dumps({
            "model_parameters": WIDTH * WIDTH * DEPTH + WIDTH * DEPTH + WIDTH * 10 + 10,
            "model_bytes": sum(p_.stat().st_size for p_ in model_dir.iterdir()),
            "hash_seconds": round(h, 3), "produce_seconds": round(p, 3), "verify_chain_seconds": round(v, 3),
            "verify_wall_seconds": round(statistics.median(walls), 2),
            "release_import_seconds": round(import_seconds(), 3),
            "produce_vs_hash": round(p / h, 3), "verify_vs_hash": round(v / h, 3),
            "release_vs_hash": round(max(p, v) / h, 3), "rounds": args.rounds, "cpus": os.cpu_count(),
        }))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
