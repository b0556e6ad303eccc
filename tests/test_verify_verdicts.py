"""Verdicts (specs/verification.md "Verdicts", issues 9 and 10.3, 10.4, 10.5, 10.7): no check is
optional, tolerance is the verifier's choice never the bundle's, the sample is unpredictable, and
a report names what it verified (exact, tolerance, structure only) or fails."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradledger.ledger.keys import write_public_keys
from test_trainer import WORLD


def _cli_with_broken(module: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the verifier's command line in a process where ``module`` cannot be imported."""
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None  # any import of it now raises ImportError\n"
        "from gradledger.verify.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", ["gradledger.verify._internal.certificates", "gradledger.verify._internal.replay"])
def test_a_check_module_that_cannot_be_imported_is_exit_2_never_a_skip(tmp_path: Path, module: str) -> None:
    """Issue 9: certificates were imported under try/except ImportError and silently skipped."""
    roots = write_public_keys(tmp_path / "roots.pub", [(WORLD.root.public_key, "root")])
    bundle = tmp_path / "missing.glb"  # never read: the verifier refuses before it opens anything
    proc = _cli_with_broken(module, [str(bundle), "--trust", str(roots), "--json"])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "cannot run every check" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


def test_the_verifier_imports_its_certificate_checks_unconditionally() -> None:
    import gradledger.verify.verifier as V
    from gradledger.verify._internal.certificates import check_certificates

    assert V.check_certificates is check_certificates
    source = Path(V.__file__).read_text(encoding="utf-8")
    assert "except ImportError" not in source and "importlib" not in source


# -- a trained run and the forgeries built on it (re-signed with the trainer's key) ---------------

from gradledger.ledger.keys import read_public_keys  # noqa: E402
from gradledger.verify import VerificationPolicy, Verifier  # noqa: E402
from gradledger.verify._internal import challenge  # noqa: E402
from test_verify_cli import _train, run_cli, write_bundle  # noqa: E402
from test_verify_structure import items_of, reseal  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The honest run (steps 0..7, checkpoints at 0, 3, 6, 8) and the same run trained one step
    further (checkpoints at 0, 3, 6, 9): its last checkpoint is one extra optimizer step, at the
    run's recorded learning rate, beyond the honest final weights."""
    base = tmp_path_factory.mktemp("verdicts")
    recs, arts, origin = _train(base / "honest", steps=8, every=3)
    further_recs, further_arts, _ = _train(base / "further", steps=9, every=3)
    roots = write_public_keys(base / "roots.pub", [(WORLD.root.public_key, "root")])
    further = [it for it in items_of(further_recs) if it.type == "Checkpoint"][-1]
    assert further.body["step"] == 9
    return {"base": base, "recs": recs, "arts": arts, "origin": origin, "roots": roots, "further": further,
            "further_art": further_arts[further.body["artifact"]]}


def _forge(runs: dict[str, Any], *, torch_version: str | None = None, one_step_further: bool = False) -> Path:
    """Re-sign the honest run as its trainer with the recorded environment and/or the final weights changed."""
    items = items_of(runs["recs"])
    arts = dict(runs["arts"])
    for i, it in enumerate(items):
        if it.type == "RunStarted" and torch_version is not None:
            body = {**it.body, "environment": {**it.body["environment"], "torch": torch_version}}
            items[i] = dataclasses.replace(it, body=body)
    if one_step_further:
        k = max(i for i, it in enumerate(items) if it.type == "Checkpoint")
        old = items[k].body
        assert old["step"] == 8
        new = {**old, **{f: runs["further"].body[f] for f in ("digest", "tensors", "artifact")}}
        items[k] = dataclasses.replace(items[k], body=new)
        del arts[old["artifact"]]
        arts[new["artifact"]] = runs["further_art"]
    name = f"forged-{torch_version}-{one_step_further}.glb"
    return write_bundle(runs["base"] / name, reseal(items), arts, runs["origin"])


def _verify(runs: dict[str, Any], bundle: Path, **policy: Any) -> Any:
    return Verifier(read_public_keys(runs["roots"]), VerificationPolicy(**policy)).verify(bundle)


def test_a_recorded_environment_that_differs_fails_without_tolerance(runs: dict[str, Any]) -> None:
    """Issue 10.4: the bundle no longer chooses tolerance mode; the difference is named."""
    for further in (False, True):
        report = _verify(runs, _forge(runs, torch_version="2.0.0", one_step_further=further))
        f = report.first_failure
        assert not report.verified and report.verdict == "failed" and not report.weights_verified
        assert f is not None and f.name == "environment", report.render()
        assert "torch: recorded '2.0.0'" in f.detail and "--tolerance" in f.detail
    code, out = run_cli(_forge(runs, torch_version="2.0.0"), runs["roots"])
    assert code == 1 and out["verdict"] == "failed" and out["first_failure"]["name"] == "environment"


def test_tolerance_is_the_verifiers_choice_and_its_verdict_is_distinct(runs: dict[str, Any]) -> None:
    """The control: with --tolerance the honest weights under a foreign environment verify, as tolerance."""
    bundle = _forge(runs, torch_version="2.0.0")
    report = _verify(runs, bundle, tolerance=True)
    assert report.verified and report.verdict == "tolerance" and report.replay_mode == "tolerance", report.render()
    assert report.render().splitlines()[-1].startswith("VERIFIED WITHIN TOLERANCE")
    assert report.to_json()["verdict"] == "tolerance" and report.weights_verified
    code, out = run_cli(bundle, runs["roots"], "--tolerance")
    assert code == 0 and out["verdict"] == "tolerance"
    # An environment that matches still replays bit for bit, --tolerance or not.
    honest = write_bundle(runs["base"] / "honest.glb", runs["recs"], runs["arts"], runs["origin"])
    exact = _verify(runs, honest, tolerance=True)
    assert exact.verdict == "exact" and exact.render().splitlines()[-1] == "VERIFIED"


def test_one_extra_optimizer_step_fails_in_tolerance_mode(runs: dict[str, Any]) -> None:
    """specs/replay.md §4: the bounds are tight enough that one step further at the run's lr fails."""
    report = _verify(runs, _forge(runs, torch_version="2.0.0", one_step_further=True), tolerance=True)
    f = report.first_failure
    assert not report.verified and f is not None and f.name == "replay", report.render()
    assert "outside the declared tolerance" in f.detail and f.step == 8
    # Without the environment forgery (exact mode) the same weights fail bit for bit.
    exact = _verify(runs, _forge(runs, one_step_further=True))
    assert exact.first_failure is not None and exact.first_failure.name == "replay"


# -- the sample challenge (issue 10.7) ------------------------------------------------------------


def test_the_default_nonce_is_fresh_stated_and_reproducible(runs: dict[str, Any]) -> None:
    honest = write_bundle(runs["base"] / "honest-sample.glb", runs["recs"], runs["arts"], runs["origin"])
    a = _verify(runs, honest, replay="sample", sample_fraction=0.34)
    b = _verify(runs, honest, replay="sample", sample_fraction=0.34)
    for r in (a, b):
        assert r.verified and len(bytes.fromhex(r.figures["challenge_nonce"])) == challenge.NONCE_BYTES
        assert r.figures["challenge_nonce"][:16] in r.render()
    assert a.figures["challenge_nonce"] != b.figures["challenge_nonce"]
    again = _verify(runs, honest, replay="sample", sample_fraction=0.34,
                    nonce=bytes.fromhex(a.figures["challenge_nonce"]))
    assert again.figures["challenge_nonce"] == a.figures["challenge_nonce"]
    assert again.figures["sample_chosen"] == a.figures["sample_chosen"]
    code, out = run_cli(honest, runs["roots"], "--replay", "sample", "--sample-fraction", "0.34",
                        "--nonce", a.figures["challenge_nonce"])
    assert code == 0 and out["figures"]["sample_chosen"] == a.figures["sample_chosen"]


def test_the_chosen_segments_depend_on_the_nonce_not_only_the_root() -> None:
    root = bytes(range(32))
    draws = {tuple(challenge.choose(root, 40, 10, bytes([n]) * 32)) for n in range(8)}
    assert len(draws) > 1  # a trainer regrinding the root cannot fix the draw without the nonce
    assert challenge.choose(root, 40, 10, b"n") == challenge.choose(root, 40, 10, b"n")


# -- verdicts on the demo bundle (issues 10.3, 10.5; "a report never says VERIFIED while a check it
# was asked to run was skipped") ---------------------------------------------------------------

import copy  # noqa: E402

import forging as F  # noqa: E402


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("verdict-demo")
    d = F.build_demo(base / "demo", steps=6, checkpoint_every=3)
    forge = F.Forge.from_bundle(d.bundle)
    return {"demo": d, "forge": forge, "work": base, "catalogue": {f.name: f for f in F.catalogue(forge)},
            "roots": read_public_keys(d.roots)}


def _demo_verify(demo: dict[str, Any], g: F.Forge | None = None, **policy: Any) -> Any:
    path = g.write(demo["work"] / "v.glb") if g is not None else demo["demo"].bundle
    return Verifier(demo["roots"], VerificationPolicy(**policy)).verify(path)


def _forged(demo: dict[str, Any], name: str) -> F.Forge:
    g = demo["forge"].clone()
    demo["catalogue"][name].apply(g)
    return g


NO_INPUTS = "DatasetCommitted.data removed and the inputs left out, final weights fine-tuned"
PACKAGING = "Checkpoint: an ungoverned 'packaging' run ships fine-tuned weights"


@pytest.mark.parametrize("mode", ["full", "sample", "certificates"])
def test_asked_to_replay_a_bundle_without_inputs_fails_naming_why(demo: dict[str, Any], mode: str) -> None:
    """Issue 10.3: replay was silently skipped for lack of inputs and the fine-tuned weights verified."""
    report = _demo_verify(demo, _forged(demo, NO_INPUTS), replay=mode)
    f = report.first_failure
    assert not report.verified and report.verdict == "failed" and not report.weights_verified
    assert f is not None and f.name == "replay" and "carries no inputs" in f.detail, report.render()
    assert report.render().splitlines()[-1].startswith("FAILED at replay")
    # Declining replay is the user's choice: the structure verifies and says the weights were not checked.
    none = _demo_verify(demo, _forged(demo, NO_INPUTS), replay="none")
    assert none.verified and none.verdict == "structure only" and not none.weights_verified, none.render()


def test_an_ungoverned_packaging_run_fails_as_an_unverifiable_release_claim(demo: dict[str, Any]) -> None:
    """Issue 10.5: a second run whose only Checkpoint carries fine-tuned weights, in every mode."""
    for mode in ("full", "none"):
        report = _demo_verify(demo, _forged(demo, PACKAGING), replay=mode)
        f = report.first_failure
        assert f is not None and f.name == "heads" and "not reached by any governed update" in f.detail, report.render()
        assert "digits-demo-release" in f.detail and not report.verified


def test_a_run_whose_checkpoints_no_update_leads_to_fails(demo: dict[str, Any]) -> None:
    """A governed run with two checkpoints and no update between them: replay would "reproduce" the
    second from the first, but no governed update leads to either; it is not verified weights."""
    g = _forged(demo, PACKAGING)
    ckpt = g.recs[-2]
    assert ckpt.type == "Checkpoint"
    g.recs.insert(len(g.recs) - 1, g.new_record("Checkpoint", copy.deepcopy(ckpt.body), ckpt.time + 1))
    g.recs[-1].time = ckpt.time + 2
    report = _demo_verify(demo, g, replay="full")
    f = report.first_failure
    assert f is not None and f.name == "heads" and not report.verified, report.render()


def test_structure_only_says_the_weights_were_not_checked(demo: dict[str, Any]) -> None:
    report = _demo_verify(demo, replay="none")
    out = report.to_json()
    assert report.verified and out["verdict"] == "structure only" and out["weights_verified"] is False
    assert "weights were NOT checked" in report.render().splitlines()[-1]
    assert all(h["replayed"] == "not replayed (--replay none)" for h in out["heads"])


def test_certificates_mode_says_the_original_weights_were_not_checked(demo: dict[str, Any]) -> None:
    report = _demo_verify(demo, replay="certificates")
    out = report.to_json()
    assert report.verified and out["verdict"] == "exact" and out["weights_verified"] is False, report.render()
    assert "original run's weights were NOT checked" in report.render().splitlines()[-1]
    by_branch = {h["branch"]: h["replayed"] for h in out["heads"]}
    assert by_branch[False].startswith("not replayed") and by_branch[True].startswith("every segment")


def test_a_full_verification_names_the_verified_head_of_each_run_and_branch(demo: dict[str, Any]) -> None:
    report = _demo_verify(demo, replay="full")
    out = report.to_json()
    assert report.verified and out["verdict"] == "exact" and out["weights_verified"] is True, report.render()
    g = demo["forge"]
    runs = g.seqs("RunStarted")
    ends = [*runs[1:], len(g.recs)]
    last = {r: max(g.seqs("Checkpoint", r, end)) for r, end in zip(runs, ends)}
    assert [(h["run"], h["checkpoint"]) for h in out["heads"]] == sorted(last.items())
    assert all(h["replayed"].startswith("every segment") for h in out["heads"])
    assert [h["branch"] for h in out["heads"]] == [False, True]
    assert out["heads"][0]["digest"] == bytes(g.body(last[runs[0]])["digest"]).hex()
    assert report.render().splitlines()[-1] == "VERIFIED"


def test_export_includes_the_data_by_default(demo: dict[str, Any], tmp_path: Path) -> None:
    from gradledger.ledger.bundle import Bundle
    from gradledger.training.cli import main as gradledger

    ledger = demo["demo"].out / "ledger"
    for flags, expected in (((), True), (("--with-data",), True), (("--without-data",), False)):
        out = tmp_path / f"{len(flags)}{expected}.glb"
        assert gradledger(["export", str(ledger), "-o", str(out), "--json", *flags]) == 0
        with Bundle.open(out) as b:
            assert b.header["with_data"] is expected
    with pytest.raises(SystemExit):
        gradledger(["export", str(ledger), "-o", str(tmp_path / "x.glb"), "--with-data", "--without-data"])
