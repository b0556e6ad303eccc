"""RunStarted settings re-derived by the verifier (issue 10; specs/verification.md §6, settings).

A hostile trainer changes one setting (in both runs, as a consistent forger would), re-signs every
record with the trainer key and rebuilds the bundle (tests/forging.py). The verifier must fail
the ``runs`` check naming the RunStarted (or the step) and the field, in every replay mode, so
these run with ``--replay none``; the honest bundle verifies. The pure rules (order, step seeds)
are compared with the training package's own implementation.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import forging as F
from gradledger.ledger.keys import read_public_keys
from gradledger.verify import VerificationPolicy, Verifier
from gradledger.verify._internal import settings as S
from gradledger.verify._internal.certificates import check_certificates
from gradledger.verify._internal.structure import check_structure
from gradledger.verify.report import Report


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("settings")
    d = F.build_demo(base / "demo", steps=6, checkpoint_every=3)
    forge = F.Forge.from_bundle(d.bundle)
    roots = read_public_keys(d.roots)
    return {"forge": forge, "roots": roots, "work": base, "layout": F.Layout.of(forge),
            "none": Verifier(roots, VerificationPolicy(replay="none")),
            "full": Verifier(roots, VerificationPolicy(replay="full")),
            "catalogue": {f.name: f for f in F.catalogue(forge)}}


def _verify(demo: dict[str, Any], change: Callable[[F.Forge], Any], mode: str = "none") -> Any:
    g = demo["forge"].clone()
    change(g)
    path = g.write(demo["work"] / "forged.glb")
    try:
        return demo[mode].verify(path)
    finally:
        path.unlink(missing_ok=True)


def _every_run(path: tuple[Any, ...], value: Any) -> Callable[[F.Forge], None]:
    def change(g: F.Forge) -> None:
        for k in g.seqs("RunStarted"):
            g.set(k, ("settings", *path), value)
    return change


def _fails(report: Any, seq: int, *words: str, step: int | None = None, check: str = "runs") -> None:
    f = report.first_failure
    assert f is not None and not report.verified, report.render()
    assert (f.name, f.seq) == (check, seq), report.render()
    if step is not None:
        assert f.step == step, report.render()
    for w in words:
        assert w in f.detail, (w, f.detail)


def test_the_honest_bundle_verifies(demo: dict[str, Any]) -> None:
    report = _verify(demo, lambda g: None)
    assert report.verified, report.render()
    runs = next(c for c in report.checks if c.name == "runs")
    assert "settings (seed, data order, checkpoints, bands, program inputs) re-derived" in runs.detail
    assert _verify(demo, lambda g: None, "full").verified


#: The catalogue's forgeries the verifier accepted before issue 10's settings check, and the field
#: each failure must name: structural (``runs``, every replay mode) ...
CATALOGUE = {
    "RunStarted.settings.bands.bands[0].name": "settings.bands.bands[0].name",
    "RunStarted.settings.bands.bands[1].name": "settings.bands.bands[1].name",
    "RunStarted.settings.bands.bands[2].name": "settings.bands.bands[2].name",
    "RunStarted.settings.batch_size": "batch_size",
    "RunStarted.settings.drop_last": "drop_last",
    "RunStarted.settings.steps_per_epoch": "settings.steps_per_epoch",
    "RunStarted.settings.order": "settings.order",
    "RunStarted.settings.seed_rule": "settings.seed_rule",
    "RunStarted.settings.program.format": "settings.program.format",
    "RunStarted.settings.program.inputs[0]": "settings.program.inputs",
    "RunStarted.settings.program.inputs[1]": "settings.program.inputs",
    "RunStarted.settings.program.x_dtype": "settings.program.x_dtype",
    "RunStarted.settings.program.x_shape[0]": "settings.program.x_shape",
}
#: ... and what only the program confirms, checked where replay reads it (``replay``).
CATALOGUE_REPLAY = {
    "RunStarted.settings.bands.bands[0].prefixes[0]": "settings.bands.bands[0].prefixes",
    "RunStarted.settings.bands.bands[1].prefixes[0]": "settings.bands.bands[1].prefixes",
    "RunStarted.settings.bands.bands[2].prefixes[0]": "settings.bands.bands[2].prefixes",
    "artifact: program, a weight changed and the archive rebuilt, digest re-derived": "artifacts.program",
}


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_a_forged_setting_fails_runs_naming_the_field(demo: dict[str, Any], name: str) -> None:
    report = _verify(demo, demo["catalogue"][name].apply)
    _fails(report, demo["layout"].orig_run, CATALOGUE[name], f"RunStarted {demo['layout'].orig_run}")


@pytest.mark.parametrize("name", sorted(CATALOGUE_REPLAY))
def test_a_forged_setting_only_the_program_confirms_fails_replay_naming_the_field(demo: dict[str, Any],
                                                                                   name: str) -> None:
    report = _verify(demo, demo["catalogue"][name].apply, "full")
    _fails(report, demo["layout"].orig_run, CATALOGUE_REPLAY[name], f"RunStarted {demo['layout'].orig_run}",
           check="replay")


def test_checkpoint_every_changed_fails_at_the_step_that_lacks_its_checkpoint(demo: dict[str, Any]) -> None:
    at = demo["layout"]
    for every, step in ((4, 4), (2, 2), (1, 1)):
        report = _verify(demo, _every_run(("checkpoint_every",), every))
        _fails(report, at.updates[step], f"settings.checkpoint_every {every}", f"RunStarted {at.orig_run}",
               step=step)


def test_a_run_whose_last_updates_are_not_checkpointed_fails(demo: dict[str, Any]) -> None:
    at = demo["layout"]

    def drop_final(g: F.Forge) -> None:
        # The original run's final checkpoint removed (its TreeHead stays): the certificate's
        # original_head is rewritten to the checkpoint before, as a forger would.
        final = at.ckpts[-1]
        g.replace_value(g.body(final)["digest"], g.body(at.ckpts[-2])["digest"])
        g.arts.pop(g.body(final)["artifact"])
        g.remove(final)

    report = _verify(demo, drop_final)
    _fails(report, at.updates[-1], "followed by no Checkpoint", f"RunStarted {at.orig_run}")


def test_a_consistent_batch_size_and_steps_per_epoch_fail_the_order(demo: dict[str, Any]) -> None:
    """batch_size 65 with its steps_per_epoch agree with each other, not with the recorded batches."""
    at = demo["layout"]

    def change(g: F.Forge) -> None:
        count = g.body(g.seqs("DatasetCommitted")[0])["count"]  # the training set (the held-out one follows)
        _every_run(("batch_size",), 65)(g)
        _every_run(("steps_per_epoch",), -(-count // 65))(g)

    report = _verify(demo, change)
    _fails(report, at.updates[0], "settings.order", "batch_size 65", step=0)


def test_a_batch_not_in_the_seeded_order_fails(demo: dict[str, Any]) -> None:
    """Two steps' batches swapped, routing and every derived field carried along: only the order tells."""
    at = demo["layout"]

    def change(g: F.Forge) -> None:
        a, b = at.updates[0], at.updates[1]
        keep = ("step", "seeds")
        body_a, body_b = copy.deepcopy(g.body(a)), copy.deepcopy(g.body(b))
        g.edit(a, lambda x: x.update({k: v for k, v in body_b.items() if k not in keep}))
        g.edit(b, lambda x: x.update({k: v for k, v in body_a.items() if k not in keep}))

    report = _verify(demo, change)
    _fails(report, at.updates[0], "settings.order", step=0)


def test_explicit_order_requires_the_batches_to_repeat(demo: dict[str, Any]) -> None:
    at = demo["layout"]

    def change(g: F.Forge) -> None:
        _every_run(("order",), "explicit")(g)
        _every_run(("steps_per_epoch",), 2)(g)

    report = _verify(demo, change)
    _fails(report, at.updates[2], "'explicit'", "steps_per_epoch 2", step=2)


def test_the_seed_changed_fails_at_the_first_step(demo: dict[str, Any]) -> None:
    at = demo["layout"]
    report = _verify(demo, _every_run(("seed",), 8))
    _fails(report, at.updates[0], "seeds", "settings.seed 8", step=0)


@pytest.mark.parametrize("where", ["original", "branch"])
def test_a_step_without_seeds_fails_runs_naming_the_field(demo: dict[str, Any], where: str) -> None:
    """The optional ``seeds`` removed from one step: a failed check, never a KeyError (issue 10)."""
    at = demo["layout"]
    k = at.updates[1] if where == "original" else at.branch_updates[1]
    report = _verify(demo, lambda g: g.delete(k, ("seeds",)))
    _fails(report, k, "has no seeds", step=demo["forge"].body(k)["step"])


def test_the_certificate_check_reports_a_step_without_seeds(demo: dict[str, Any]) -> None:
    """Called on its own (past the structural check that now refuses it first), the certificate check
    reports the missing ``seeds`` of an original step as a failed check instead of raising KeyError."""
    at = demo["layout"]
    source = demo["forge"].clone().source()
    report = Report()
    structure = check_structure(source, demo["roots"], report)
    assert structure is not None
    original = structure.observations[at.updates[-1]]
    del original.body["seeds"]
    check_certificates(source, structure, report)
    f = report.first_failure
    assert f is not None and f.name == "certificates" and "seeds" in f.detail, report.render()


def test_bands_swapped_between_names_fail(demo: dict[str, Any]) -> None:
    """Prefixes of bands 0 and 1 swapped: names still the policy's, but the prefixes resolve to the other
    band's parameters."""
    at = demo["layout"]

    def change(g: F.Forge) -> None:
        for k in g.seqs("RunStarted"):
            bands = g.body(k)["settings"]["bands"]["bands"]
            bands[0]["prefixes"], bands[1]["prefixes"] = bands[1]["prefixes"], bands[0]["prefixes"]
            g.edit(k, lambda b: None)

    report = _verify(demo, change, "full")
    _fails(report, at.orig_run, "settings.bands.bands[0].prefixes", "band_params[0]", check="replay")


def test_a_parameter_in_two_bands_fails(demo: dict[str, Any]) -> None:
    at = demo["layout"]

    def change(g: F.Forge) -> None:
        for k in g.seqs("RunStarted"):
            g.body(k)["settings"]["bands"]["bands"][2]["prefixes"].append("2")  # band_params kept
            g.edit(k, lambda b: None)

    report = _verify(demo, change, "full")
    _fails(report, at.orig_run, "settings.bands.bands[2].prefixes", "also in band 1", check="replay")


def test_x_dtype_of_another_valid_dtype_fails(demo: dict[str, Any]) -> None:
    at = demo["layout"]
    report = _verify(demo, _every_run(("program", "x_dtype"), "float64"))
    _fails(report, at.orig_run, "settings.program.x_dtype", "'float64'", "float32")


def _program(demo: dict[str, Any]) -> Any:
    from gradledger.ledger.program import load_program

    g = demo["forge"]
    return load_program(g.arts[g.body(demo["layout"].orig_run)["artifacts"]["program"]])


@pytest.mark.parametrize("path, value, words", [
    (("program", "x_dtype"), "float64",
     "settings.program.x_dtype 'float64', but the model program's input x is float32"),
    (("program", "x_shape"), [8, 8], "settings.program.x_shape [8, 8]"),
    (("program", "inputs"), ["profiles", "x"], "settings.program.inputs"),
    (("bands", "bands", 0, "prefixes"), ["4.weight"], "settings.bands.bands[0].prefixes ['4.weight'] resolve to"),
    (("band_params", 0), ["4.bias", "4.weight"], "band_params[0] is ['4.bias', '4.weight']"),
])
def test_what_only_the_program_confirms(demo: dict[str, Any], path: tuple[Any, ...], value: Any, words: str) -> None:
    """``check_program`` (called where replay reads the program) against the program itself: the
    committed inputs agree with ``float32 [64]``, the program is what tells ``x`` apart."""
    at = demo["layout"]
    settings = copy.deepcopy(demo["forge"].body(at.orig_run)["settings"])
    program = _program(demo)
    weights = S.check_program(program, settings, at.orig_run)  # honest: the stored weights' digests
    assert set(weights) == {n for n in demo["forge"].body(at.ckpts[0])["tensors"] if n.startswith("model.")}
    S.check_step0(weights, demo["forge"].body(at.ckpts[0]), at.ckpts[0], at.orig_run)
    with pytest.raises(S.SettingsMismatch) as caught:
        S.check_step0(weights, demo["forge"].body(at.ckpts[1]), at.ckpts[1], at.orig_run)  # step 3's weights
    assert "artifacts.program" in str(caught.value.args[0]) and caught.value.seq == at.orig_run
    F.get(settings, path[:-1])[path[-1]] = value
    with pytest.raises(S.SettingsMismatch) as caught:
        S.check_program(program, settings, at.orig_run)
    assert words in caught.value.args[0] and f"RunStarted {at.orig_run}" in caught.value.args[0]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 200), drop_last=st.booleans(), spe=st.integers(1, 1400))
def test_any_loader_triple_verifies_only_if_it_gives_the_recorded_batches(
    demo: dict[str, Any], size: int, drop_last: bool, spe: int
) -> None:
    """batch_size, drop_last and steps_per_epoch: a forged triple verifies only when it is consistent and
    gives exactly the recorded batches (here: batch size 64; within 6 steps either drop_last does)."""
    n = demo["forge"].body(demo["layout"].dataset)["count"]
    consistent = spe == (n // size if drop_last else -(-n // size))

    def change(g: F.Forge) -> None:
        _every_run(("batch_size",), size)(g)
        _every_run(("drop_last",), drop_last)(g)
        _every_run(("steps_per_epoch",), spe)(g)

    report = _verify(demo, change)
    assert report.verified == (consistent and size == 64), report.render()


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), epoch=st.integers(0, 2**20), count=st.integers(0, 300),
       step=st.integers(0, 2**40))
def test_the_rules_agree_with_the_trainers(seed: int, epoch: int, count: int, step: int) -> None:
    from gradledger.training import trainer

    assert S.epoch_order(seed, epoch, count) == trainer.epoch_order(seed, epoch, count)
    assert S.step_seed(seed, step) == trainer.step_seed(seed, step)
