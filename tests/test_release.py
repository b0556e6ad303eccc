"""A release that standard supply-chain tools verify (specs/release.md): a governed run, a witness
cosigns its checkpoint, `gradledger release` signs the model files and writes the provenance;
third-party verifiers accept each artifact; `gradledger-verify --release` checks the chain and
`--attest` writes a signed verification summary. Every broken link fails with exit 1 naming it."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from gradledger.ledger import attest, credentials
from gradledger.ledger.bundle import export_bundle
from gradledger.ledger.keys import SigningKey, write_public_keys
from gradledger.ledger.ledger import Ledger
from gradledger.ledger.note import Checkpoint, SignedNote, cosign
from gradledger.training.checkpoints import read_checkpoint
from gradledger.training.cli import main as gradledger
from gradledger.training.dataset import commit_dataset
from gradledger.training.trainer import Trainer
from interop.notecheck import build_notecheck, run_notecheck
from test_trainer import MANIFESTS, WORLD, X, engine_for, new_ledger, parts

WITNESS = SigningKey.from_seed(bytes([201]) * 32, "witness")
WITNESS_NAME = "notary.example"


def _cli(*argv: str) -> int:
    return gradledger([str(a) for a in argv])


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("release")
    before = torch.are_deterministic_algorithms_enabled()
    led, _ = new_ledger(base / "ledger")
    led.append("CredentialIssued", {"credential": credentials.issue(
        WORLD.root, subject=WITNESS_NAME, path="acme/witnesses", role="witness",
        public_key=WITNESS.public_key).signed}, WORLD.root)
    ds = commit_dataset(led, MANIFESTS, "digits-with-inputs", WORLD.trainer, inputs=X)
    model, opt, loader = parts()
    engine = engine_for(led, ds, model, checkpoint_every=3)
    gm, gopt, gloader = engine.make_governed(model, opt, loader)
    Trainer(engine).fit(gm, gopt, gloader, 6)
    gm.run.close()
    torch.use_deterministic_algorithms(before)
    led.tree_head(WORLD.trainer)
    last = led.observation(led.by_type("Checkpoint")[-1])
    tensors, _ = read_checkpoint(led.artifact(last.body["artifact"]), last.body)
    (base / "model").mkdir()
    save_file({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
              base / "model" / "model.safetensors")
    (base / "model" / "config.json").write_text('{"layers": 3}')
    led.close()
    keys = base / "keys"
    keys.mkdir()
    WORLD.trainer.save(keys / "trainer.key")
    WITNESS.save(keys / "witness.key")

    assert _cli("checkpoint", base / "ledger", "--key", keys / "trainer.key", "--vkey", "-o", base / "log.vkey") == 0
    assert _cli("checkpoint", base / "ledger", "--key", keys / "trainer.key", "--old", "0", "-o", base / "req") == 0
    assert _cli("witness", "cosign", base / "req", "--key", keys / "witness.key", "--name", WITNESS_NAME, "--state",
                base / "witness-state.json", "--log-key", (base / "log.vkey").read_text().strip(),
                "-o", base / "cosigned.txt") == 0
    assert _cli("release-key", keys / "release.pem") == 0
    assert _cli("release", base / "ledger", "--model", base / "model", "--key", keys / "release.pem",
                "--checkpoint", base / "cosigned.txt", "-o", base / "release") == 0
    with Ledger.open(base / "ledger") as led:
        export_bundle(led, base / "run.glb", with_data=True)
    roots = write_public_keys(base / "roots.pub", [(WORLD.root.public_key, "root")])
    return {"base": base, "keys": keys, "roots": roots, "last": last}


def verify(r: dict[str, Any], release: Path | None = None, model: Path | None = None, *extra: str) -> tuple[int, dict]:
    base = r["base"]
    proc = subprocess.run(
        [sys.executable, "-m", "gradledger.verify.cli", str(base / "run.glb"), "--trust", str(r["roots"]), "--json",
         "--release", str(release or base / "release"), "--model", str(model or base / "model"),
         "--release-key", str(r["keys"] / "release.pem.pub"), *extra],
        capture_output=True, text=True, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {"stderr": proc.stderr}


def test_the_release_verifies_end_to_end_and_attests(released: dict[str, Any]) -> None:
    base, keys = released["base"], released["keys"]
    assert sorted(p.name for p in (base / "release").iterdir()) == ["checkpoint.txt", "model.sig", "proofs",
                                                                   "provenance.json"]
    attest.new_key(keys / "verifier.pem")
    code, out = verify(released, None, None, "--attest", str(base / "vsa.json"), "--attest-key", str(keys / "verifier.pem"))
    assert code == 0, out
    names = [c["name"] for c in out["checks"]]
    assert {"release signature", "release provenance", "release checkpoint", "release lineage"} <= set(names)
    assert out["verdict"] == "exact" and out["figures"]["release"]["witnesses"] == [WITNESS_NAME]
    # The verification summary: a DSSE envelope the verifier's key signs, PASSED, naming the model files.
    vsa = attest.open_statement(base / "vsa.json", keys / "verifier.pem.pub", attest.VSA_TYPE)
    assert vsa["predicate"]["verificationResult"] == "PASSED"
    assert vsa["predicate"]["verifiedLevels"] == ["GRADLEDGER_REPLAY_EXACT"]
    assert set(attest.subjects_of(vsa)) == {"run.glb", "model.safetensors", "config.json"}


def test_third_party_verifiers_accept_each_artifact(released: dict[str, Any], tmp_path: Path) -> None:
    base, keys = released["base"], released["keys"]
    # OpenSSF model signing: the unmodified command line of the model-signing package.
    ms = shutil.which("model_signing") or str(Path(sys.executable).parent / "model_signing")
    proc = subprocess.run([ms, "verify", "key", str(base / "model"), "--signature", str(base / "release" / "model.sig"),
                           "--public_key", str(keys / "release.pem.pub")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # in-toto / DSSE: securesystemslib verifies the envelope; in-toto-attestation parses the statement.
    from in_toto_attestation.v1.statement import Statement  # noqa: F401 - statement() validated with it
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    env = Envelope.from_dict(json.loads((base / "release" / "provenance.json").read_text()))
    key = SSlibKey.from_crypto(load_pem_public_key((keys / "release.pem.pub").read_bytes()))
    env.verify([key], 1)
    st = json.loads(env.payload)
    assert st["_type"] == "https://in-toto.io/Statement/v1" and st["predicateType"] == "https://slsa.dev/provenance/v1"
    files = attest.model_resources(base / "release" / "model.sig")
    assert {s["name"]: s["digest"]["sha256"] for s in st["subject"]} == files
    dep = st["predicate"]["buildDefinition"]["resolvedDependencies"][0]
    note_text = (base / "release" / "checkpoint.txt").read_text()
    cp = Checkpoint.parse(SignedNote.parse(note_text).text)
    assert dep["digest"]["sha256"] == cp.root.hex() and dep["annotations"]["size"] == cp.size
    # Signed notes: sigstore-python's checkpoint parser reads ours...
    from sigstore._internal.rekor.checkpoint import SignedCheckpoint

    parsed = SignedCheckpoint.from_text(note_text)
    assert (parsed.checkpoint.origin, parsed.checkpoint.log_size) == (cp.origin, cp.size)
    assert parsed.checkpoint.log_hash == cp.root.hex()
    # ...and Go's golang.org/x/mod/sumdb/note verifies the log signature and the cosignature.
    binary = build_notecheck(tmp_path)
    if binary is None:
        pytest.skip("no Go toolchain with golang.org/x/mod here: the Go cross-check needs `go` and x/mod's source")
    wkey = f"{WITNESS_NAME}+" + _witness_vkey_tail()
    code, out = run_notecheck(binary, note_text, (base / "log.vkey").read_text().strip(), [wkey])
    assert code == 0, out
    assert out["verified"] == [cp.origin, WITNESS_NAME] and out["root_hex"] == cp.root.hex()


def _witness_vkey_tail() -> str:
    from gradledger.ledger.note import witness_key

    return witness_key(WITNESS_NAME, WITNESS.public_key).vkey().split("+", 1)[1]


def _copy_release(released: dict[str, Any], tmp_path: Path) -> tuple[Path, Path]:
    release, model = tmp_path / "release", tmp_path / "model"
    shutil.copytree(released["base"] / "release", release)
    shutil.copytree(released["base"] / "model", model)
    return release, model


def _resign_provenance(released: dict[str, Any], release: Path, edit: Any) -> None:
    """What a releaser holding the release key can do: change the statement and sign it again."""
    env = json.loads((release / "provenance.json").read_text())
    st = json.loads(base64.b64decode(env["payload"]))
    edit(st)
    (release / "provenance.json").write_text(json.dumps(attest.sign_statement(st, released["keys"] / "release.pem")))


def _failed(out: dict[str, Any]) -> dict[str, Any]:
    assert out.get("verified") is False, out
    return out["first_failure"]


def test_a_model_file_changed_after_release_fails(released: dict[str, Any], tmp_path: Path) -> None:
    release, model = _copy_release(released, tmp_path)
    (model / "config.json").write_text('{"layers": 4}')
    code, out = verify(released, release, model, "--replay", "none")
    failure = _failed(out)
    assert code == 1 and failure["name"] == "release signature" and "config.json" in failure["detail"]


def test_a_provenance_pointing_at_another_ledger_root_fails(released: dict[str, Any], tmp_path: Path) -> None:
    # The releaser (holding the release key) re-signs a provenance naming another root.
    release, model = _copy_release(released, tmp_path)
    _resign_provenance(released, release, lambda st: st["predicate"]["buildDefinition"]["resolvedDependencies"][0]
                       ["digest"].update(sha256="ab" * 32))
    code, out = verify(released, release, model, "--replay", "none")
    failure = _failed(out)
    assert code == 1 and failure["name"] == "release lineage" and "points at ledger" in failure["detail"]


def test_a_checkpoint_cosigned_by_an_unknown_witness_fails(released: dict[str, Any], tmp_path: Path) -> None:
    release, model = _copy_release(released, tmp_path)
    note = SignedNote.parse((release / "checkpoint.txt").read_text())
    stranger = SigningKey.generate("stranger")
    (release / "checkpoint.txt").write_text(note.with_signature(cosign(note.text, stranger, "stranger.example", 1)).render())
    code, out = verify(released, release, model, "--replay", "none")
    failure = _failed(out)
    assert code == 1 and failure["name"] == "release checkpoint" and "stranger.example" in failure["detail"]


def test_hostile_weights_resigned_by_the_vendor_fail_the_lineage(released: dict[str, Any], tmp_path: Path) -> None:
    # A hostile vendor holds the release key and the trainer key, not the root key: it ships other
    # weights and re-signs everything it can (model signature, provenance). The model files no
    # longer hold the recorded final checkpoint's tensors.
    release, model = _copy_release(released, tmp_path)
    from safetensors.torch import load_file

    weights = load_file(model / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, model / "model.safetensors")
    shutil.rmtree(release)
    note = released["base"] / "cosigned.txt"
    code = _cli("release", released["base"] / "ledger", "--model", model, "--key", released["keys"] / "release.pem",
                "--checkpoint", note, "-o", release)
    assert code == 1  # the trainer's own tool refuses to release weights the ledger never recorded
    # Forge the release by hand as the hostile vendor would: sign, then write the honest provenance.
    honest = json.loads(base64.b64decode(json.loads((released["base"] / "release" / "provenance.json").read_text())["payload"]))
    release.mkdir()
    files = attest.sign_model(model, released["keys"] / "release.pem", release / "model.sig")
    honest["subject"] = [{"name": n, "digest": {"sha256": d}} for n, d in sorted(files.items())]
    (release / "provenance.json").write_text(json.dumps(attest.sign_statement(honest, released["keys"] / "release.pem")))
    shutil.copy(note, release / "checkpoint.txt")
    assert attest.BUILD_TYPE in json.dumps(honest)
    code, out = verify(released, release, model, "--replay", "none")
    failure = _failed(out)
    assert code == 1 and failure["name"] == "release lineage" and name in failure["detail"]
    assert failure["seq"] == released["last"].seq


def test_release_without_the_extra_or_a_cosignature_is_refused(released: dict[str, Any], tmp_path: Path) -> None:
    base = released["base"]
    # A checkpoint with only the trainer's signature is not a cosigned checkpoint.
    assert _cli("checkpoint", base / "ledger", "--key", released["keys"] / "trainer.key", "-o", tmp_path / "cp") == 0
    assert _cli("release", base / "ledger", "--model", base / "model", "--key", released["keys"] / "release.pem",
                "--checkpoint", tmp_path / "cp", "-o", tmp_path / "r") == 1


def test_a_forged_checkpoint_or_proof_fails_the_chain(released: dict[str, Any], tmp_path: Path) -> None:
    # A hostile trainer signs a checkpoint of another tree of the same size with its own key (it
    # cannot get a credentialed witness to cosign it, nor does the bundle hold that tree).
    release, model = _copy_release(released, tmp_path)
    note = SignedNote.parse((release / "checkpoint.txt").read_text())
    cp = Checkpoint.parse(note.text)
    forged_text = Checkpoint(cp.origin, cp.size, bytes(32)).text()
    from gradledger.ledger.note import sign

    forged = SignedNote(forged_text, (sign(forged_text, WORLD.trainer, cp.origin),)).with_signature(
        next(s for s in note.signatures if s.name == WITNESS_NAME))
    (release / "checkpoint.txt").write_text(forged.render())
    code, out = verify(released, release, model, "--replay", "none")
    failure = _failed(out)
    assert code == 1 and failure["name"] == "release checkpoint" and "not this bundle's tree" in failure["detail"]

    # A proof file whose path was swapped for another leaf's fails, naming the file.
    release, model = _copy_release(released, tmp_path / "second")
    proofs = sorted((release / "proofs").iterdir())
    text = proofs[0].read_text().replace(f"index {proofs[0].stem}", f"index {proofs[1].stem}", 1)
    proofs[0].write_text(text)
    code, out = verify(released, release, model, "--replay", "none")
    failure = _failed(out)
    assert code == 1 and failure["name"] == "release checkpoint" and proofs[0].name in failure["detail"]


def test_a_failed_verification_is_attested_as_failed(released: dict[str, Any], tmp_path: Path) -> None:
    release, model = _copy_release(released, tmp_path)
    (model / "config.json").write_text("{}")
    keys = released["keys"]
    if not (keys / "verifier2.pem").exists():
        attest.new_key(keys / "verifier2.pem")
    code, _ = verify(released, release, model, "--replay", "none", "--attest", str(tmp_path / "vsa.json"),
                     "--attest-key", str(keys / "verifier2.pem"))
    assert code == 1
    vsa = attest.open_statement(tmp_path / "vsa.json", keys / "verifier2.pem.pub", attest.VSA_TYPE)
    assert vsa["predicate"]["verificationResult"] == "FAILED" and vsa["predicate"]["verifiedLevels"] == ["FAILED"]
    assert vsa["predicate"]["gradledger"]["firstFailure"]["name"] == "release signature"
    # A summary signed by another key is refused by the DSSE check.
    with pytest.raises(Exception, match="does not verify"):
        attest.open_statement(tmp_path / "vsa.json", keys / "release.pem.pub", attest.VSA_TYPE)


def test_witness_verify_command(released: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    base = released["base"]
    log = (base / "log.vkey").read_text().strip()
    wkey = f"{WITNESS_NAME}+" + _witness_vkey_tail()
    assert _cli("witness", "verify", base / "cosigned.txt", "--log-key", log, "--witness-key", wkey) == 0
    assert WITNESS_NAME in capsys.readouterr().out
    other = SigningKey.generate()
    from gradledger.ledger.note import witness_key

    assert _cli("witness", "verify", base / "cosigned.txt", "--log-key", log, "--witness-key",
                witness_key(WITNESS_NAME, other.public_key).vkey()) == 1


def test_a_missing_release_extra_is_unusable_with_the_install_hint(released: dict[str, Any], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "model_signing", None)  # import model_signing now raises ImportError
    base = released["base"]
    assert _cli("release", base / "ledger", "--model", base / "model", "--key", released["keys"] / "release.pem",
                "--checkpoint", base / "cosigned.txt", "-o", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "pip install 'gradledger[release]'" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
    from gradledger.verify.cli import main as verify_main

    code = verify_main([str(base / "run.glb"), "--trust", str(released["roots"]), "--replay", "none", "--release",
                        str(base / "release"), "--model", str(base / "model"), "--release-key",
                        str(released["keys"] / "release.pem.pub")])
    assert code == 2 and "gradledger[release]" in capsys.readouterr().err


def test_a_project_admits_a_witness(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradledger.training.project import Project

    taxonomy = Path(__file__).resolve().parents[1] / "examples" / "taxonomy.toml"
    Project.init(tmp_path / "p", taxonomy).close()
    assert _cli("witness", "keygen", tmp_path / "w.key", "--name", "notary.example") == 0
    public = capsys.readouterr().out.split()[0]
    assert _cli("witness", "admit", tmp_path / "p", "--name", "notary.example", "--public-key", public) == 0
    with Project.open(tmp_path / "p") as project:
        cred = project.ledger.registry.get(SigningKey.load(tmp_path / "w.key").key_id)
        assert (cred.role, cred.subject, cred.path) == ("witness", "notary.example", "acme/witnesses")
    # The project's ledger: its trainer key is found without --key.
    assert _cli("checkpoint", tmp_path / "p" / "ledger", "-o", tmp_path / "cp.txt") == 0
    note = SignedNote.parse((tmp_path / "cp.txt").read_text())
    with Project.open(tmp_path / "p") as project:
        from gradledger.ledger.publish import log_key_of

        assert note.verify(log_key_of(project.ledger)) is None
    assert _cli("checkpoint", tmp_path / "p" / "ledger", "--old", "0", "-o", tmp_path / "req") == 0
    assert _cli("witness", "admit", tmp_path / "p", "--name", "two words", "--public-key", public) == 2
    assert _cli("witness", "admit", tmp_path / "p", "--name", "x", "--public-key", "ed25519:00") == 2


def test_a_signature_that_ignores_a_model_file_fails(released: dict[str, Any], tmp_path: Path) -> None:
    # model-signing's serialization may list ignored paths, and its verifier honours them: a
    # releaser who signs with config.json ignored could ship any config.json. Every file must be signed.
    import model_signing

    release, model = _copy_release(released, tmp_path)
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=["config.json"])
    (release / "model.sig").unlink()
    model_signing.signing.Config().use_elliptic_key_signer(private_key=released["keys"] / "release.pem") \
        .set_hashing_config(hashing).sign(model, release / "model.sig")
    _resign_provenance(released, release, lambda st: st.update(
        subject=[s for s in st["subject"] if s["name"] != "config.json"]))
    (model / "config.json").write_text('{"layers": 99}')
    code, out = verify(released, release, model, "--replay", "none")
    failure = _failed(out)
    assert code == 1 and failure["name"] == "release signature" and "signed files differ" in failure["detail"]
    assert "config.json" in failure["detail"]


def test_an_unreadable_attest_key_is_refused_before_verifying(released: dict[str, Any], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from gradledger.verify.cli import main as verify_main

    (tmp_path / "bad.pem").write_text("not a key")
    code = verify_main([str(released["base"] / "run.glb"), "--trust", str(released["roots"]), "--attest",
                        str(tmp_path / "vsa.json"), "--attest-key", str(tmp_path / "bad.pem")])
    err = capsys.readouterr().err
    assert code == 2 and "not an unencrypted PEM private key" in err and err.count("\n") == 1
    assert not (tmp_path / "vsa.json").exists()
