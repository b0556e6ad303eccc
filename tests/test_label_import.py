"""Labels imported from labeling platforms' own exports (specs/labels.md): Label Studio JSON,
Labelbox export v2 NDJSON and Scale task JSON become manifests signed by the platform's authority
on behalf of annotators who hold no keys; a model pre-label naming a ledger checkpoint is checked
by the verifier; malformed exports exit 2 naming the record and field; a run trained on imported
labels verifies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradledger
from gradledger.ledger.bundle import export_bundle
from gradledger.training.cli import main as gradledger_main
from gradledger.training.labels import LabelImportError, import_labels, parse_export
from gradledger.training.manifests import label_example
from gradledger.training.dataset import commit_dataset
from gradledger.training.errors import DatasetError, ManifestError
from helpers import verify_cli

DATA = Path(__file__).resolve().parent / "data" / "labels"
TAXONOMY = {
    "root": {"name": "pets-root", "path": "pets"},
    "ontology": {"name": "pets-v1", "classes": ["cat", "dog", "bird"]},
    "authorities": {
        "vendor": {"confidence": 0.9, "sources": ["vendor-qa"]},
        "scale": {"confidence": 0.8, "sources": ["scale-qa"]},
    },
    "policy": {"default": {"profile": [1, 1, 1]}},
}
KEYS = ["a", "b", "c", "d"]


def _examples(keys: list[str]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(8, generator=g) for k in keys}


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    gradledger.Project.init(path, TAXONOMY).close()
    return path


def _train(p: gradledger.Project, name: str, run_id: str, steps: int = 2) -> None:
    """A small governed run on dataset ``name`` (a checkpoint every step)."""
    ds = p.dataset(name)
    x = torch.stack([row for row in _rows(p, name)])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x, torch.zeros(ds.count, dtype=torch.int64)), batch_size=2)
    model, optimizer, loader = gradledger.govern(model, optimizer, loader, project=p, dataset=name, run_id=run_id,
                                                 checkpoint_every=1)
    for i, (inputs, labels) in enumerate(loader):
        if i == steps:
            break
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    model.run.close()


def _rows(p: gradledger.Project, name: str) -> list[torch.Tensor]:
    order = p.dataset(name).manifests
    by_id = {gradledger.training.manifests.example_id(x): x for x in _examples(KEYS + ["101", "102", "103", "104"]).values()}
    return [by_id[m.example] for m in order]


def _ls_export(tmp_path: Path, checkpoint: bytes) -> Path:
    text = (DATA / "labelstudio.json").read_text().replace("CHECKPOINT", checkpoint.hex())
    path = tmp_path / "labelstudio.json"
    path.write_text(text)
    return path


def test_label_studio_export_signed_by_the_authority_for_keyless_annotators(project: Path, tmp_path: Path) -> None:
    with gradledger.Project.open(project) as p:
        # A pre-label model trained in this ledger: its run and a checkpoint digest.
        base = import_labels(p, "scale", DATA / "scale.json", authority="scale", name="seed", key="name",
                             examples=_examples(KEYS))
        assert base.keys == ["a", "b", "c"] and base.unlabeled == ["d"]
        _train(p, "seed", "pets-v1")
        checkpoint = p.ledger.observation(p.ledger.by_type("Checkpoint")[-1]).body["digest"]
        done = import_labels(p, "labelstudio", _ls_export(tmp_path, checkpoint), authority="vendor", name="pets",
                             examples=_examples(["101", "102", "103", "104"]))
        authority = p.credential("vendor")
        assert done.keys == ["101", "102", "103"] and done.unlabeled == ["104"]
        assert sorted(done.credentialed) == ["ana@vendor.example", "user-7", "zero-shot-clip-2024"]
        m = {k: x.manifest for k, x in zip(done.keys, done.dataset.manifests)}
        # An annotator corrected the model's pre-label: fixed, the ledger checkpoint named.
        assert m["101"]["review"] == "fixed" and m["101"]["label"] == 0
        assert m["101"]["prelabel"] == {"run": "pets-v1", "checkpoint": checkpoint}
        # Two annotators agreeing, the cancelled third left out; the authority's default confidence.
        assert m["102"]["label"] == 1 and m["102"]["consensus"] == 1.0 and m["102"]["aggregation"] == "majority"
        assert [s["confidence"] for s in m["102"]["sources"]] == [0.9, 0.9]
        # Only a model answered: its score is the confidence, review pending, no ledger pre-label.
        assert m["103"]["review"] == "pending" and m["103"]["confidence"] == 0.91 and "prelabel" not in m["103"]
        for f in m.values():
            assert f["signer"] == authority.key_id
            assert all(s["attested_by"] == authority.key_id for s in f["sources"])  # the manifest says so
        for name in done.credentialed:  # credentialed under the authority, for a key nobody holds
            cred = next(c for c in p.ledger.registry.by_key_id.values() if c.subject == name)
            assert cred.issuer == authority.key_id and cred.role == "source"
            assert cred.path in (f"{authority.path}/annotators", f"{authority.path}/models")
        # A second import reuses the annotators' credentials.
        again = import_labels(p, "labelstudio", _ls_export(tmp_path, checkpoint), authority="vendor",
                              name="pets-again", examples=_examples(["101", "102", "103", "104"]))
        assert again.credentialed == []
        p.ledger.verify()


def test_a_run_on_imported_labels_verifies_and_the_prelabel_check_holds(project: Path, tmp_path: Path) -> None:
    with gradledger.Project.open(project) as p:
        import_labels(p, "scale", DATA / "scale.json", authority="scale", name="seed", key="name",
                      examples=_examples(KEYS))
        _train(p, "seed", "pets-v1")
        checkpoint = p.ledger.observation(p.ledger.by_type("Checkpoint")[-1]).body["digest"]
        import_labels(p, "labelstudio", _ls_export(tmp_path, checkpoint), authority="vendor", name="pets",
                      examples=_examples(["101", "102", "103", "104"]))
        _train(p, "pets", "on-imported")
        bundle = tmp_path / "run.glb"
        export_bundle(p.ledger, bundle, with_data=True)
    code, report = verify_cli(bundle, project / "roots.pub")
    assert code == 0, report.get("first_failure")
    assert report["figures"]["replayed_steps"] == 4


def test_a_prelabel_naming_a_checkpoint_its_run_never_recorded_is_refused_at_import(project: Path,
                                                                                 tmp_path: Path) -> None:
    with gradledger.Project.open(project) as p:
        import_labels(p, "scale", DATA / "scale.json", authority="scale", name="seed", key="name",
                      examples=_examples(KEYS))
        _train(p, "seed", "pets-v1", steps=1)
        size = p.ledger.size
        with pytest.raises(LabelImportError, match="task 101: pre-label .* never recorded"):
            import_labels(p, "labelstudio", _ls_export(tmp_path, bytes(32)), authority="vendor", name="pets",
                          examples=_examples(["101", "102", "103", "104"]))
        assert p.ledger.size == size


def test_a_hostile_prelabel_is_caught_by_the_verifier(project: Path, tmp_path: Path) -> None:
    # Holding the vendor authority's key (not the root's), a hostile importer signs a manifest whose
    # pre-label names a checkpoint the pets-v1 run never recorded, and commits it with the trainer
    # key around the importer's own check. The verifier's dataset check refuses it.
    with gradledger.Project.open(project) as p:
        import_labels(p, "scale", DATA / "scale.json", authority="scale", name="seed", key="name",
                      examples=_examples(KEYS))
        _train(p, "seed", "pets-v1", steps=1)
        key = p.authority_key("vendor")
        done = import_labels(p, "labelbox", DATA / "labelbox.ndjson", authority="vendor", name="honest",
                             examples=_examples(KEYS))
        honest = done.dataset.manifests[0]
        forged = label_example(example=honest.example, sources=honest.manifest["sources"], aggregation="single",
                               ontology="pets-v1", review="accepted", key=key, time=honest.time,
                               prelabel={"run": "pets-v1", "checkpoint": bytes(32)})
        commit_dataset(p.ledger, [forged], "forged", p.trainer_key, inputs=_examples(["a"])["a"][None])
        bundle = tmp_path / "run.glb"
        export_bundle(p.ledger, bundle, with_data=True)
    code, report = verify_cli(bundle, project / "roots.pub")
    assert code == 1
    assert report["first_failure"]["name"] == "dataset"
    assert "pre-label names checkpoint" in report["first_failure"]["detail"]


def test_a_hostile_trainer_cannot_attest_an_annotators_vote(project: Path) -> None:
    # The trainer key may neither credential an annotator nor sign a vote on one's behalf.
    with gradledger.Project.open(project) as p:
        done = import_labels(p, "labelbox", DATA / "labelbox.ndjson", authority="vendor", name="honest",
                             examples=_examples(KEYS))
        honest = done.dataset.manifests[0]
        forged = label_example(example=honest.example, sources=honest.manifest["sources"], aggregation="single",
                               ontology="pets-v1", review="accepted", key=p.trainer_key, time=honest.time)
        with pytest.raises((DatasetError, ManifestError), match="trainer|sign"):
            commit_dataset(p.ledger, [forged], "forged", p.trainer_key)
        # Nor credential a keyless annotator of its own under the platform's path.
        from gradledger.ledger import credentials as C
        from gradledger.ledger.errors import GradledgerError
        from gradledger.ledger.keys import SigningKey

        vendor = p.credential("vendor")
        sham = C.issue(p.trainer_key, subject="mallory@vendor.example", path=f"{vendor.path}/annotators",
                       role="source", public_key=SigningKey.generate().public_key)
        size = p.ledger.size
        with pytest.raises(GradledgerError, match="may not issue|not below|trainer"):
            p.ledger.append("CredentialIssued", {"credential": sham.signed}, p.trainer_key, commit=True)
        assert p.ledger.size == size


def test_labelbox_votes_consensus_and_reviews(project: Path) -> None:
    with gradledger.Project.open(project) as p:
        done = import_labels(p, "labelbox", DATA / "labelbox.ndjson", authority="vendor", name="lb",
                             examples=_examples(KEYS))
    assert done.keys == ["a", "b", "c"] and done.unlabeled == ["d"]
    a, b, c = (m.manifest for m in done.dataset.manifests)
    assert (a["label"], a["review"], a["confidence"]) == (0, "accepted", 1.0)
    # Two annotators disagree with consensus scores 0.5 each: a tie goes to the smaller class (dog).
    assert (b["label"], b["review"], b["consensus"]) == (1, "pending", 0.5)
    assert {s["source"] for s in b["sources"]} == {"ana@vendor.example", "ben@vendor.example"}
    assert (c["label"], c["review"]) == (0, "rejected")


def test_scale_categories_annotations_and_review_status() -> None:
    records = parse_export("scale", DATA / "scale.json", key="name")
    assert [(r.key, r.review, [v.label for v in r.votes]) for r in records] == [
        ("a", "accepted", ["cat"]), ("b", "fixed", ["dog"]), ("c", "rejected", ["bird"]), ("d", "accepted", [])]
    assert {v.source for r in records for v in r.votes} == {"scale-workforce"}


def _cli(args: list[str], capsys: Any) -> tuple[int, str]:
    code = gradledger_main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _edit(src: Path, dst: Path, fn: Any) -> Path:
    if src.suffix == ".ndjson":
        lines = [json.loads(line) for line in src.read_text().splitlines()]
        fn(lines)
        dst.write_text("\n".join(json.dumps(x) for x in lines))
    else:  # a pre-label of a run this ledger does not hold: a model from elsewhere
        doc = json.loads(src.read_text().replace("CHECKPOINT", "ab" * 32))
        fn(doc)
        dst.write_text(json.dumps(doc))
    return dst


def test_the_command_line_imports_and_reports(project: Path, tmp_path: Path, capsys: Any) -> None:
    examples = tmp_path / "examples.safetensors"
    save_file({k: v.contiguous() for k, v in _examples(KEYS).items()}, examples)
    code, out = _cli(["labels", "import", "--format", "labelbox", str(DATA / "labelbox.ndjson"), "--project",
                      str(project), "--authority", "vendor", "--name", "lb", "--examples", str(examples), "--json"],
                     capsys)
    assert code == 0, out
    summary = json.loads(out)
    assert summary["count"] == 3 and summary["keys"] == ["a", "b", "c"] and summary["unlabeled"] == ["d"]
    with gradledger.Project.open(project) as p:
        assert p.dataset("lb").root.hex() == summary["root"]


MALFORMED = [
    ("labelstudio.json", lambda d: d[1]["annotations"][0].pop("result"), "task 102 annotation 9002: field 'result'"),
    ("labelstudio.json", lambda d: d[0]["annotations"][0].update(parent_prediction=999),
     "task 101 annotation 9001: field 'parent_prediction' names prediction 999"),
    ("labelstudio.json", lambda d: d[2]["predictions"][0].update(score=3), "task 103 prediction 502: field 'score'"),
    ("labelstudio.json", lambda d: d[1]["annotations"][0]["result"][0]["value"].update(choices=["horse"]),
     "task 102: vote 0: label 'horse' is not a class"),
    ("labelbox.ndjson", lambda d: d[1]["projects"]["clproj01"]["labels"][0]["label_details"].pop("created_by"),
     "line 2 project clproj01 label cllab02 label_details: field 'created_by' is missing"),
    ("labelbox.ndjson", lambda d: d[2]["projects"]["clproj01"]["labels"][0]["label_details"]["reviews"][0].update(
        review_action="Maybe"), "line 3 project clproj01 label cllab04: review_action 'Maybe'"),
    ("scale.json", lambda d: d["docs"][0].update(customer_review_status="great"),
     "task 5f0c1a2b3c4d5e6f7a8b9c01: customer_review_status 'great'"),
    ("scale.json", lambda d: d["docs"][1]["response"]["annotations"].update(extra="x"),
     "task 5f0c1a2b3c4d5e6f7a8b9c02: field 'response.annotations' answers 2 questions"),
]


@pytest.mark.parametrize("fixture, edit, message", MALFORMED, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(MALFORMED)])
def test_malformed_exports_exit_2_naming_the_record_and_field(project: Path, tmp_path: Path, capsys: Any,
                                                               fixture: str, edit: Any, message: str) -> None:
    export = _edit(DATA / fixture, tmp_path / fixture, edit)
    fmt = {"labelstudio.json": "labelstudio", "labelbox.ndjson": "labelbox", "scale.json": "scale"}[fixture]
    examples = tmp_path / "examples.safetensors"
    keys = ["101", "102", "103", "104"] if fmt == "labelstudio" else KEYS
    save_file({k: v.contiguous() for k, v in _examples(keys).items()}, examples)
    args = ["labels", "import", "--format", fmt, str(export), "--project", str(project), "--authority", "vendor",
            "--name", "x", "--examples", str(examples)] + (["--key", "name"] if fmt == "scale" else [])
    with gradledger.Project.open(project) as p:
        size = p.ledger.size
    code, out = _cli(args, capsys)
    assert code == 2 and message in out, out
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in out
    with gradledger.Project.open(project) as p:
        assert p.ledger.size == size  # nothing recorded


def test_unusable_inputs_exit_2(project: Path, tmp_path: Path, capsys: Any) -> None:
    examples = tmp_path / "examples.safetensors"
    save_file({k: v.contiguous() for k, v in _examples(["a", "b"]).items()}, examples)
    base = ["labels", "import", "--format", "labelbox", str(DATA / "labelbox.ndjson"), "--project", str(project),
            "--name", "x", "--examples", str(examples)]
    code, out = _cli(base + ["--authority", "vendor"], capsys)
    assert code == 2 and "line 3 (data row 'c'): no input for example 'c'" in out
    code, out = _cli(base + ["--authority", "nobody"], capsys)
    assert code == 2 and "'nobody' is not an authority" in out
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    code, out = _cli(base[:-1] + [str(tmp_path / "junk.safetensors"), "--authority", "vendor"], capsys)
    assert code == 2 and "not a safetensors file" in out
    (tmp_path / "bad.ndjson").write_text('{"data_row": {"global_key": "a"}, "projects": {}}\n{oops\n')
    code, out = _cli(["labels", "import", "--format", "labelbox", str(tmp_path / "bad.ndjson"), "--project",
                      str(project), "--authority", "vendor", "--name", "x", "--examples", str(examples)], capsys)
    assert code == 2 and "line 2: not JSON" in out


def _snorkel_matrix(n: int = 60) -> tuple[Any, list[str]]:
    import numpy as np

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    L = np.full((n, 3), -1, dtype=np.int64)
    for j, acc in enumerate([0.9, 0.75, 0.6]):
        fire = rng.random(n) < 0.6
        right = rng.random(n) < acc
        L[fire, j] = np.where(right[fire], y[fire], rng.integers(0, 3, int(fire.sum())))
    L[5] = -1  # a row every function abstains on
    return L, ["lf-keyword", "lf-regex", "lf-pretrained"]


def test_snorkel_label_model_with_its_seed_probs_and_learned_accuracies(project: Path, tmp_path: Path,
                                                                       capsys: Any) -> None:
    pytest.importorskip("snorkel")  # in the test extra
    import numpy as np

    from gradledger.training.labels.snorkel import fit_label_model, import_label_model

    L, names = _snorkel_matrix()
    xs = [torch.full((8,), float(i)) for i in range(len(L))]
    with gradledger.Project.open(project) as p:
        done = import_label_model(p, L, names, authority="vendor", name="snorkel", examples=xs, seed=7)
        again = import_label_model(p, L, names, authority="vendor", name="snorkel-2", examples=xs, seed=7)
    silent = [str(i) for i in range(len(L)) if (L[i] == -1).all()]
    assert "5" in silent and done.unlabeled == silent  # reported by row: no re-indexing
    assert done.keys == [str(i) for i in range(len(L)) if str(i) not in silent]
    assert sorted(done.credentialed) == sorted(names) and again.credentialed == []
    model = fit_label_model(L, 3, seed=7)
    probs, weights = model.predict_proba(L), model.get_weights()
    for key, m in zip(done.keys, done.dataset.manifests):
        f = m.manifest
        assert f["aggregation"] == "label-model" and f["probs"] == list(probs[int(key)] + 0.0)
        assert f["label"] == int(np.argmax(probs[int(key)]))
        by_name = {s["source"]: s["confidence"] for s in f["sources"]}
        assert all(by_name[n] == float(np.clip(weights[j], 0, 1)) for j, n in enumerate(names) if n in by_name)
    # The seed decides the fit: the same seed gives the same probabilities in every manifest.
    assert [m.manifest["probs"] for m in done.dataset.manifests] == [m.manifest["probs"] for m in again.dataset.manifests]
    # The command line: an .npz of L and lf_names, the seed required.
    npz = tmp_path / "L.npz"
    np.savez(npz, L=L, lf_names=np.array(names))
    examples = tmp_path / "examples.safetensors"
    save_file({str(i): x for i, x in enumerate(xs)}, examples)
    args = ["labels", "import", "--format", "snorkel", str(npz), "--project", str(project), "--authority", "vendor",
            "--name", "snorkel-cli", "--examples", str(examples), "--json"]
    code, out = _cli(args, capsys)
    assert code == 2 and "needs --seed" in out
    code, out = _cli(args + ["--seed", "7"], capsys)
    assert code == 0, out
    assert json.loads(out)["unlabeled"] == silent
