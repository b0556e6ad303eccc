"""Annotation feedback (issue 16; specs/dynamics.md §3): every trained example ranked by the evidence
that its label needs a second look, written in Label Studio's, Labelbox's and CSV form."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from gradledger.ledger.ledger import Ledger
from gradledger.training.bands import sequential_bands
from gradledger.training.cli import main as cli_main
from gradledger.training.dataset import commit_dataset
from gradledger.training.dynamics.feedback import (WEIGHTS, depth_report, disagreement, last_profile, priorities,
                                                   summarize)
from gradledger.training.dynamics.profiles import DepthProfiles
from gradledger.training.forensics.lineage import lineage
from gradledger.training.manifests import example_id, label_example, source_entry
from gradledger.training.trainer import Governance
from test_idioms import governed, make_model, steps
from test_trainer import MANIFESTS, POLICY, WORLD, X, Y, T, new_ledger

EPOCH = 240 // 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("feedback") / "ledger"
    led = governed(path, steps(4 * EPOCH, lambda x, y, m, o: F.cross_entropy(m(x), y)), every=EPOCH)
    led.close()
    return path


def test_priorities_rank_by_the_documented_weights(trained: Path) -> None:
    with Ledger.open(trained) as led:
        lin, items = priorities(led)
    assert len(items) == 240 and sorted(e.index for e in items) == list(range(240))
    assert [e.priority for e in items] == sorted((e.priority for e in items), reverse=True)
    for e in items:
        want = sum(WEIGHTS[k] * v for k, v in e.reasons.items())
        assert 0.0 <= e.priority <= 1.0
        assert e.priority == pytest.approx(want)
        assert 0.0 <= e.reasons["loss"] <= 1.0
    # the loss reason is the percentile of the mean recorded loss: the highest loss has strength 1
    worst = max(items, key=lambda e: e.mean_loss)
    assert worst.reasons["loss"] == 1.0
    # a flag is a reason only for the flagged top fraction (1% of 240 scored: 3 examples)
    assert sum("memorized" in e.reasons for e in items) == math.ceil(0.01 * 240)


def test_disagreement_is_the_confidence_not_on_the_label() -> None:
    m = {"label": 3, "sources": [{"vote": 3, "confidence": 0.9}, {"vote": 5, "confidence": 0.3}]}
    assert disagreement(m) == pytest.approx(0.25)
    assert disagreement({"label": 1, "sources": [{"vote": 1, "confidence": 0.0}, {"vote": 2, "confidence": 0.0}]}) \
        == pytest.approx(0.5)
    assert disagreement({"label": 1, "sources": [{"vote": 1, "confidence": 0.7}]}) == 0.0


def test_summary_counts_sources_and_classes_of_the_top(trained: Path) -> None:
    with Ledger.open(trained) as led:
        _, items = priorities(led)
    s = summarize(items, 12)
    assert sum(c["prioritized"] for c in s["classes"]) == 12
    assert sum(c["trained"] for c in s["classes"]) == 240
    assert all(r["share"] == r["prioritized"] / r["trained"] for r in s["sources"] + s["classes"])


@pytest.mark.parametrize("fmt", ["labelstudio", "labelbox", "csv"])
def test_each_format_is_the_platforms_import_form(trained: Path, tmp_path: Path, fmt: str, capsys: Any) -> None:
    # the examples file named by the platform's keys, as given to `gradledger labels import`
    examples = tmp_path / "examples.safetensors"
    save_file({f"https://cdn.example/digit-{i}.png": X[i].contiguous() for i in range(240)}, str(examples))
    out = tmp_path / f"feedback.{fmt}"
    code = cli_main(["feedback", str(trained), "--format", fmt, "-o", str(out), "--top", "7", "--examples",
                     str(examples), "--key-field", "image", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["written"] == 7 and report["matched_keys"] == 7
    with Ledger.open(trained) as led:
        _, items = priorities(led)
    want_keys = [f"https://cdn.example/digit-{e.index}.png" for e in items[:7]]
    text = out.read_text()
    if fmt == "labelstudio":
        tasks = json.loads(text)
        assert [t["data"]["image"] for t in tasks] == want_keys
        for t, e in zip(tasks, items):
            (pred,) = t["predictions"]
            (res,) = pred["result"]
            assert res["type"] == "choices" and res["value"]["choices"] == [str(e.label)]
            assert pred["score"] == pytest.approx(1 - e.priority, abs=1e-6)
        scores = [t["predictions"][0]["score"] for t in tasks]
        assert scores == sorted(scores)  # Label Studio sorts by prediction score, lowest first
    elif fmt == "labelbox":
        lines = [json.loads(line) for line in text.splitlines()]
        assert [r["dataRow"]["globalKey"] for r in lines] == want_keys
        assert all(set(r) == {"name", "answer", "dataRow"} and r["name"] == "label" for r in lines)
    else:
        rows = list(csv.DictReader(text.splitlines()))
        assert [r["key"] for r in rows] == want_keys
        assert [int(r["index"]) for r in rows] == [e.index for e in items[:7]]
    assert not (tmp_path / f"feedback.{fmt}.part").exists()


def test_without_examples_rows_are_named_by_example_id(trained: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "f.csv"
    assert cli_main(["feedback", str(trained), "--format", "csv", "-o", str(out)]) == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) == math.ceil(0.05 * 240)
    assert all(r["key"] == r["example"] and len(r["key"]) == 64 for r in rows)
    assert MANIFESTS[int(rows[0]["index"])].example.hex() == rows[0]["example"]
    assert "sources, by the share" in capsys.readouterr().out


@pytest.mark.parametrize("args, why", [
    (["--format", "xml"], "--format"),
    (["--format", "csv", "--fraction", "1.5"], "--fraction"),
    (["--format", "csv", "--top", "0"], "--top"),
    (["--format", "csv", "--run", "nope"], "nope"),
])
def test_unusable_options_exit_2_with_one_line(trained: Path, tmp_path: Path, capsys: Any, args: list[str],
                                              why: str) -> None:
    assert cli_main(["feedback", str(trained), "-o", str(tmp_path / "f"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err and "Traceback" not in err
    assert not (tmp_path / "f").exists()


# --- confusion at depth (specs/dynamics.md §3.1, §5): a run that records DepthProfiles ---


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run over the digits declaring DepthProfiles over 160 held-out digits: a profile at steps 0, 8, .. 32."""
    d = load_digits()
    hx = torch.tensor(d.data[240:400] / 16.0, dtype=torch.float32)
    held = [label_example(example=example_id(hx[i]),
                          sources=[source_entry(WORLD.source_cred, int(d.target[240 + i]), 0.95)],
                          aggregation="single", ontology="digits-v1", review="accepted", key=WORLD.source, time=T)
            for i in range(len(hx))]
    path = tmp_path_factory.mktemp("profiled") / "ledger"
    led, _ = new_ledger(path)
    ds = commit_dataset(led, MANIFESTS, "digits", WORLD.trainer, inputs=X)
    commit_dataset(led, held, "heldout", WORLD.trainer, inputs=hx)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run = Governance(led, WORLD.trainer, dataset=ds, policy=POLICY, layout=sequential_bands(model), run_id="p",
                     checkpoint_every=8, seed=3, root_key=WORLD.root, profiles=DepthProfiles("heldout"))
    gm, gopt, gl = run.make_governed(model, opt, DataLoader(TensorDataset(X, Y), batch_size=32))
    gm.train()
    for _ in range(4):
        for x, y in gl:
            gopt.zero_grad()
            F.cross_entropy(gm(x), y).backward()
            gopt.step()
    run.close()
    led.close()
    return path


def _profiles(led: Ledger) -> list[dict[str, Any]]:
    return [led.observation(s).body for s in led.by_type("DepthProfile")]


def test_confusion_is_the_head_entropy_of_the_label_in_the_last_profile(profiled: Path) -> None:
    with Ledger.open(profiled) as led:
        lin, items = priorities(led)
        bodies = _profiles(led)
        last = last_profile(led, lin)
    run_seq = lin.run.seq
    mine = [b for b in bodies if b["run"] == run_seq]
    assert len(mine) >= 2 and last == max(mine, key=lambda b: b["step"]) and last["step"] == mine[-1]["step"] > 0
    top = math.log2(len(last["classes"]))
    want = {c: h / top for c, h in zip(last["classes"], last["entropy"][0])}
    assert len(items) == 240
    for e in items:
        if e.label in want:
            assert e.reasons["confusion"] == want[e.label]  # the record's own bits, divided once
            assert 0.0 <= e.reasons["confusion"] <= 1.0
        else:
            assert "confusion" not in e.reasons
        # weighed 0: the priority is the other reasons' alone, to the bit
        assert e.priority == sum(WEIGHTS[k] * v for k, v in e.reasons.items() if k != "confusion")
    assert WEIGHTS["confusion"] == 0.0
    assert sum("confusion" in e.reasons for e in items) == sum(e.label in want for e in items) > 0


def test_depth_section_orders_classes_most_confused_at_the_head_first(profiled: Path) -> None:
    with Ledger.open(profiled) as led:
        lin, items = priorities(led)
        depth = depth_report(led, lin)
        last = last_profile(led, lin)
    assert depth is not None and last is not None
    assert depth["step"] == last["step"] and depth["bands"] == ["head", "mid", "embedding"]
    assert depth["max_bits"] == math.log2(len(last["classes"]))
    rows = depth["classes"]
    assert sorted(r["class"] for r in rows) == last["classes"]
    heads = [r["entropy"][0] for r in rows]
    assert heads == sorted(heads, reverse=True)
    for r in rows:
        i = last["classes"].index(r["class"])
        assert r["entropy"] == [band[i] for band in last["entropy"]]
        above = [k for k, h in enumerate(r["entropy"]) if h > depth["max_bits"] / 2]
        assert r["confused_from"] == (above[0] if above else None)
    assert summarize(items, 12, depth)["depth"] == depth


def test_a_branch_reads_its_originals_profiles_up_to_the_rewind(profiled: Path) -> None:
    # an unlearning branch records no profile (§5.1): its original's, at steps up to the rewind, are read
    with Ledger.open(profiled) as led:
        lin = lineage(led, None, inputs=False)
        settings = {**lin.run.settings, "branch": {"of": lin.run.seq}}
        branch = dataclasses.replace(lin, run=dataclasses.replace(lin.run, seq=lin.run.seq + 10_000, settings=settings),
                                     rewind_step=12)
        got = last_profile(led, branch)
    assert got is not None and got["run"] == lin.run.seq and got["step"] == 8


def test_csv_and_label_studio_carry_the_confusion(profiled: Path, tmp_path: Path, capsys: Any) -> None:
    with Ledger.open(profiled) as led:
        _, items = priorities(led)
    out = tmp_path / "f.csv"
    assert cli_main(["feedback", str(profiled), "--format", "csv", "-o", str(out), "--top", "9", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["depth"]["classes"][0]["entropy"][0] == max(r["entropy"][0] for r in report["depth"]["classes"])
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert "confusion" in rows[0]
    for r, e in zip(rows, items):
        assert float(r["confusion"]) == pytest.approx(e.reasons["confusion"], abs=1e-6)
        assert "confusion " in r["reasons"]
    ls = tmp_path / "f.json"
    assert cli_main(["feedback", str(profiled), "--format", "labelstudio", "-o", str(ls), "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert "confusion at depth (DepthProfile at step" in printed and "head / mid / embedding" in printed
    assert all("confusion " in t["data"]["gradledger_reasons"] for t in json.loads(ls.read_text()))


def test_without_profiles_no_confusion_and_no_depth(trained: Path, tmp_path: Path, capsys: Any) -> None:
    with Ledger.open(trained) as led:
        lin, items = priorities(led)
        assert last_profile(led, lin) is None and depth_report(led, lin) is None
    assert not any("confusion" in e.reasons for e in items)
    assert summarize(items, 12)["depth"] is None
    out = tmp_path / "f.csv"
    assert cli_main(["feedback", str(trained), "--format", "csv", "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["depth"] is None
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert rows and all(r["confusion"] == "" and "confusion" not in r["reasons"] for r in rows)
