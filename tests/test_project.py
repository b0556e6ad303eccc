"""Projects (specs/project.md): `gradledger init` / `Project.init` makes keys, credentials, trust
file, ledger and policy from a taxonomy file; `Project.open` reopens them; `label` commits a dataset
that verifies and trains. Bad taxonomies and bad labels are refused with one clear error."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradledger.ledger.errors import GradledgerError, UnusableInput
from gradledger.ledger.keys import SigningKey, read_public_keys, write_public_keys
from gradledger.training.bands import sequential_bands
from gradledger.training.dataset import load_inputs
from gradledger.training.errors import ManifestError, ProjectError
from gradledger.training.manifests import example_id, verify_manifest
from gradledger.training.policy import latest_adopted, route, sign_policy
from gradledger.training.project import Project
from gradledger.training.taxonomy import load_taxonomy, parse_taxonomy, read_taxonomy_file
from gradledger.training.trainer import Governance, Trainer

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "taxonomy.toml"
N = 40
# Who labels which rows: experts, the crowd (one trusted worker), heuristics.
SOURCES = ["dr-lee"] * 10 + ["worker-1"] * 10 + ["worker-4"] * 10 + ["lf-centroid"] * 10


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.data[:N] / 16.0, dtype=torch.float32), torch.tensor(d.target[:N], dtype=torch.int64)


X, Y = _digits()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project made from the example taxonomy and labeled once, closed again."""
    path = tmp_path_factory.mktemp("p") / "proj"
    with Project.init(path, EXAMPLE) as project:
        project.label(X, Y, source=SOURCES, name="digits")
    return path


@pytest.fixture
def reopened(made: Path) -> Iterator[Project]:
    with Project.open(made) as project:
        yield project


# -- init, open, label -----------------------------------------------------------------------


def test_made_project_verifies_from_its_trust_file(reopened: Project) -> None:
    roots = read_public_keys(reopened.trust_file)
    assert roots == [reopened.root_key.public_key]
    report = reopened.ledger.verify(trusted_roots=roots)
    tax = reopened.taxonomy
    # Genesis: one credential per principal, the policy, a head; then the dataset.
    assert report.counts == {"CredentialIssued": 2 + len(tax.authorities) + len(tax.sources), "PolicyAdopted": 1,
                             "TreeHead": 1, "DatasetCommitted": 1}
    # A root that is not the project's refuses the whole ledger.
    with pytest.raises(GradledgerError):
        reopened.ledger.verify(trusted_roots=[SigningKey.generate().public_key])


def test_credentials_follow_the_taxonomy(reopened: Project) -> None:
    tax = reopened.taxonomy
    root = reopened.credential("acme-root")
    assert (root.role, root.path, root.self_signed) == ("root", "acme", True)
    trainer = reopened.credential("trainer")
    assert (trainer.role, trainer.path, trainer.issuer) == ("trainer", "acme/training", root.key_id)
    for name, spec in tax.authorities.items():
        cred = reopened.credential(name)
        assert (cred.role, cred.path, cred.issuer, cred.public_key) == (
            "authority", spec.path, root.key_id, reopened.authority_key(name).public_key)
    for name, spec in tax.sources.items():
        cred = reopened.credential(name)
        assert (cred.role, cred.subject, cred.path) == ("source", name, spec.path)
        assert cred.issuer == reopened.authority_key(spec.authority).key_id
        assert cred.public_key == reopened.source_key(name).public_key
    assert reopened.credential("worker-4").path == "acme/crowd/pool"
    assert reopened.credential("dr-lee").path == "acme/experts/dr-lee"


def test_label_signs_one_single_source_manifest_per_example(reopened: Project) -> None:
    ds = reopened.dataset("digits")
    assert ds.count == N
    registry = reopened.ledger.registry
    for i, m in enumerate(ds.manifests):
        verify_manifest(m, registry)
        src = m.manifest["sources"]
        assert [s["source"] for s in src] == [SOURCES[i]] and m.manifest["aggregation"] == "single"
        assert m.signer == reopened.source_key(SOURCES[i]).key_id  # the source's own signature
        assert m.example == example_id(X[i]) and m.label == int(Y[i]) and m.manifest["ontology"] == "digits-v1"
        assert m.manifest["confidence"] == reopened.taxonomy.confidence(SOURCES[i])
    # The inputs are in the ledger, row i = example i: a bundle replays.
    assert torch.equal(load_inputs(reopened.ledger, ds), X)


def test_policy_routes_as_the_template_says(reopened: Project) -> None:
    policy = reopened.policy
    assert policy.policy["name"] == "acme-digits-routing" and policy.bands == ("head", "mid", "deep")
    assert [r["name"] for r in policy.policy["rules"]] == [
        "excluded", "experts", "crowd-consensus", "crowd-trusted", "heuristics"]
    paths = {n: s.path for n, s in reopened.taxonomy.sources.items()}
    rule_of = {"dr-lee": "experts", "worker-1": "default", "worker-4": "crowd-trusted", "lf-centroid": "heuristics"}
    for i, m in enumerate(reopened.dataset("digits").manifests):
        assert route(policy, m.manifest, paths).name == rule_of[SOURCES[i]]
    # worker-1 (0.8, alone) falls to the default: the head only, limit 10.
    assert policy.policy["default"] == {"profile": [1.0, 0.0, 0.0], "limits": [10.0, None, None]}
    seq, adopted = latest_adopted(reopened.ledger) or (None, None)
    assert adopted is not None and adopted.digest == policy.digest and adopted.signer == reopened.root_key.key_id


def test_files_keys_private_and_no_secret_in_project_json(made: Path) -> None:
    keys = sorted((made / "keys").rglob("*.key"))
    assert len(keys) == 2 + 3 + 9
    for path in keys:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for folder in [made / "keys", made / "keys" / "authorities", made / "keys" / "sources"]:
        assert stat.S_IMODE(folder.stat().st_mode) & 0o077 == 0, folder
    text = (made / "project.json").read_text()
    record = json.loads(text)
    for path in keys:
        seed = bytes(SigningKey.load(path)._key)
        assert seed.hex() not in text
    assert record["format"] == "gradledger-project/1" and record["trust"] == "roots.pub"
    assert sorted(os.listdir(made)) == ["keys", "ledger", "project.json", "roots.pub"]


def test_reopen_gives_the_same_keys_and_policy(made: Path) -> None:
    with Project.open(made) as a:
        first = {n: a.key(n).public_key for n in a._key_files}
        digest, root = a.policy.digest, a.dataset("digits").root
    with Project.open(made, writable=False) as b:
        assert {n: b.key(n).public_key for n in b._key_files} == first
        assert b.policy.digest == digest and b.dataset("digits").root == root
        assert b.taxonomy == load_taxonomy(EXAMPLE)


def test_a_project_trains_under_its_policy_with_the_default_bands(tmp_path: Path) -> None:
    with Project.init(tmp_path / "p", EXAMPLE) as project:
        ds = project.label(TensorDataset(X, Y), Y, source=SOURCES)  # item i is (x, y): the example is x
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
        engine = Governance(project.ledger, project.trainer_key, dataset=ds, policy=project.policy,
                            layout=sequential_bands(model, names=project.policy.bands), run_id="r1",
                            checkpoint_every=2, seed=3)
        gm, gopt, gl = engine.make_governed(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                            DataLoader(TensorDataset(X, Y), batch_size=8, shuffle=True))
        Trainer(engine).fit(gm, gopt, gl, 3)
        project.ledger.verify(trusted_roots=project.trusted_roots)
        ups = [project.ledger.observation(s).body for s in project.ledger.by_type("GovernedUpdate")]
        assert len(ups) == 3 and all(u["policy"] == project.policy.digest for u in ups)


def test_policy_for_other_bands(tmp_path: Path) -> None:
    with Project.init(tmp_path / "p", EXAMPLE) as project:
        renamed = project.policy_for(["top", "middle", "bottom"])
        assert renamed.bands == ("top", "middle", "bottom")
        assert [r["profile"] for r in renamed.policy["rules"]] == [r["profile"] for r in project.policy.policy["rules"]]
        assert latest_adopted(project.ledger)[1].digest == renamed.digest
        two = project.policy_for(["head", "body"], {"default": {"profile": [1, 0]},
                                                    "rules": [{"authority": "experts", "profile": [1, 1],
                                                               "limits": {"body": 2.0}}]})
        assert two.bands == ("head", "body")
        assert two.policy["rules"][1]["match"] == {"authority": "acme/experts"}
        assert two.policy["rules"][1]["limits"] == [None, 2.0]
        with pytest.raises(ProjectError, match="give the rules too"):
            project.policy_for(["head", "deep"])
        with pytest.raises(ProjectError, match="not an authority"):
            project.policy_for(["a"], {"rules": [{"authority": "vendors", "profile": [1]}]})
        assert project.policy.bands == ("head", "mid", "deep")  # the init policy stays the project's
        project.ledger.verify(trusted_roots=project.trusted_roots)


# -- label refusals ----------------------------------------------------------------------------


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Project]:
    with Project.init(tmp_path / "p", EXAMPLE) as project:
        yield project


def _committed(project: Project) -> int:
    return len(project.ledger.by_type("DatasetCommitted"))


@pytest.mark.parametrize("labels, error, match", [
    ([10] + [0] * (N - 1), ManifestError, r"example 0: label 10 is outside ontology 'digits-v1' \(10 classes"),
    ([0] * (N - 1) + [-1], ManifestError, r"example 39: label -1 is not a class index"),
    ([2.5] + [0] * (N - 1), ManifestError, r"example 0: label 2.5 is not a class index"),
    ([True] + [0] * (N - 1), ManifestError, r"example 0: label True is not a class index"),
    ([0] * (N - 1), ProjectError, r"one label per example \(40\), got 39"),
])
def test_labels_outside_the_ontology_are_refused(fresh: Project, labels: list[Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fresh.label(X, labels, source="dr-lee")
    assert _committed(fresh) == 0


def test_a_source_not_in_the_taxonomy_is_refused(fresh: Project) -> None:
    with pytest.raises(ProjectError, match=r"'mallory' is not a source of this project's taxonomy"):
        fresh.label(X, Y, source=["dr-lee"] * (N - 1) + ["mallory"])
    # An authority or the trainer is a principal, but not a source.
    with pytest.raises(ProjectError, match="'crowd' is not a source"):
        fresh.label(X, Y, source="crowd")
    with pytest.raises(ProjectError, match="40 examples"):
        fresh.label(X, Y, source=["dr-lee"] * 3)
    assert _committed(fresh) == 0


def test_the_manifest_code_refuses_what_the_format_refuses(fresh: Project) -> None:
    with pytest.raises(ManifestError, match="example 0"):
        fresh.label(X, Y, source="dr-lee", confidence=1.5)
    assert _committed(fresh) == 0


def test_class_names_and_no_ontology(tmp_path: Path) -> None:
    doc = _doc()
    doc["ontology"] = {"name": "pets-v2", "classes": ["cat", "dog"]}
    with Project.init(tmp_path / "a", doc) as project:
        ds = project.label(X[:3], ["dog", "cat", 1], source="dr-lee", name="pets")
        assert [m.label for m in ds.manifests] == [1, 0, 1]
        with pytest.raises(ManifestError, match="'bird' is not a class of ontology 'pets-v2'"):
            project.label(X[:1], ["bird"], source="dr-lee")
        assert project.dataset("pets").root == ds.root
        with pytest.raises(ProjectError, match=r"no dataset 'other'.*pets"):
            project.dataset("other")
    del doc["ontology"]
    with Project.init(tmp_path / "b", doc) as project:
        with pytest.raises(ProjectError, match="names no ontology"):
            project.label(X[:2], [0, 1], source="dr-lee")
        assert project.label(X[:2], [0, 70000], source="dr-lee", ontology="free-v1").manifests[1].label == 70000


# -- init and open refusals ----------------------------------------------------------------------


def test_init_refuses_an_existing_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(ProjectError, match="exists and is not an empty directory"):
        Project.init(tmp_path / "d", EXAMPLE)
    assert os.listdir(tmp_path / "d") == ["notes.txt"]
    (tmp_path / "f").write_text("a file")
    with pytest.raises(ProjectError, match="not an empty directory"):
        Project.init(tmp_path / "f", EXAMPLE)
    (tmp_path / "empty").mkdir()
    Project.init(tmp_path / "empty", EXAMPLE).close()
    assert (tmp_path / "empty" / "project.json").is_file()


def test_open_refuses_what_is_not_the_project(tmp_path: Path, made: Path) -> None:
    with pytest.raises(ProjectError, match="no such project directory"):
        Project.open(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ProjectError, match="not a gradledger project"):
        Project.open(tmp_path / "plain")

    def copy_of(name: str) -> Path:
        import shutil

        dst = tmp_path / name
        shutil.copytree(made, dst)
        for lock in dst.rglob("lock*"):
            lock.unlink()
        return dst

    gone = copy_of("gone")
    (gone / "keys" / "sources" / "worker-4.key").unlink()
    with pytest.raises(ProjectError, match=r"key of worker-4 keys/sources/worker-4.key is missing"):
        Project.open(gone)

    loose = copy_of("loose")
    (loose / "keys" / "root.key").chmod(0o644)
    with pytest.raises(ProjectError, match="accessible by others; chmod 600"):
        Project.open(loose)

    swapped = copy_of("swapped")
    (swapped / "keys" / "sources" / "dr-lee.key").unlink()
    SigningKey.generate("dr-lee").save(swapped / "keys" / "sources" / "dr-lee.key")
    with Project.open(swapped) as project:  # lazily loaded: refused when the key is used
        with pytest.raises(ProjectError, match="not the key the project credentialed"):
            project.source_key("dr-lee")

    trust = copy_of("trust")
    write_public_keys(trust / "roots.pub.new", [(SigningKey.generate().public_key, "someone else")])
    os.replace(trust / "roots.pub.new", trust / "roots.pub")
    with pytest.raises(ProjectError, match="roots.pub does not hold the project's root key"):
        Project.open(trust)

    escaped = copy_of("escaped")
    record = json.loads((escaped / "project.json").read_text())
    record["keys"]["acme-root"] = "../../root.key"
    (escaped / "project.json").write_text(json.dumps(record))
    with pytest.raises(ProjectError, match="leaves the project directory"):
        Project.open(escaped)

    other = copy_of("other")
    record = json.loads((other / "project.json").read_text())
    record["public_keys"]["trainer"] = SigningKey.generate().public_key.hex()
    (other / "project.json").write_text(json.dumps(record))
    with pytest.raises(ProjectError, match="no credential for 'trainer' with the project's key"):
        Project.open(other)


# -- taxonomies ---------------------------------------------------------------------------------


def _doc() -> dict[str, Any]:
    return copy.deepcopy(dict(read_taxonomy_file(EXAMPLE)))


def _with(change: Any) -> dict[str, Any]:
    doc = _doc()
    change(doc)
    return doc


BAD = [
    ("unknown key", lambda d: d["root"].update(colour="red"), r"root: unknown key 'colour'"),
    ("no root", lambda d: d.pop("root"), r"document: missing key 'root'"),
    ("bad name", lambda d: d["root"].update(name="Acme Root"), r"root.name: a name is"),
    ("bad root path", lambda d: d["root"].update(path="/acme"), r"root.path"),
    ("duplicate name", lambda d: d["authorities"]["crowd"]["sources"].update({"dr-lee": {}}),
     r"authorities.crowd.sources.dr-lee: 'dr-lee' is already used by authorities.experts.sources.dr-lee"),
    ("same path", lambda d: d["authorities"]["crowd"].update(path="experts"), r"'acme/experts' is already the path"),
    ("confidence", lambda d: d["authorities"]["crowd"].update(confidence=1.2),
     r"crowd.confidence: expected a number in"),
    ("bool", lambda d: d["authorities"]["crowd"].update(confidence=True),
     r"crowd.confidence: expected a finite number"),
    ("no sources", lambda d: [a.update(sources=[]) for a in d["authorities"].values()], r"no authority lists a source"),
    ("rule authority", lambda d: d["policy"]["rules"][0].update(authority="vendors"),
     r"policy.rules\[0\].authority: 'vendors' is not an authority"),
    ("growing profile", lambda d: d["policy"]["rules"][0].update(profile=[0.5, 1, 1]),
     r"policy.rules\[0\].profile: band 'mid' \(1.0\) exceeds band 'head' \(0.5\)"),
    ("profile length", lambda d: d["policy"]["rules"][0].update(profile=[1, 1]), r"one multiplier per band \(3"),
    ("limit", lambda d: d["policy"]["rules"][0].update(limits={"mid": -1}), r"limits.mid: a limit must be positive"),
    ("limit band", lambda d: d["policy"]["rules"][0].update(limits={"embedding": 1.0}),
     r"limits: unknown key 'embedding'"),
    ("rule names", lambda d: d["policy"]["rules"][1].update(name="experts"), r"rule name 'experts' is used twice"),
    ("review", lambda d: d["policy"].update(exclude_review=["spam"]), r"exclude_review\[0\]: expected one of"),
    ("classes", lambda d: d["ontology"].update(classes=0), r"ontology.classes: expected 1..65536 classes"),
    ("never matches", lambda d: d["policy"]["rules"][0].update(max_confidence=0.5), r"could never match"),
]


@pytest.mark.parametrize("what, change, match", BAD, ids=[b[0] for b in BAD])
def test_bad_taxonomies_are_refused_before_anything_is_written(tmp_path: Path, what: str, change: Any,
                                                               match: str) -> None:
    with pytest.raises(ProjectError, match=match) as caught:
        Project.init(tmp_path / "p", _with(change))
    assert str(caught.value).startswith("taxonomy: ") and "\n" not in str(caught.value)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("text, match", [
    (b"[root\nname = 1", r"not valid TOML: Expected"),
    (b"\xff\xfe", r"not UTF-8 text"),
    (b"", r"document: missing key 'root'"),
])
def test_bad_taxonomy_files(tmp_path: Path, text: bytes, match: str) -> None:
    (tmp_path / "t.toml").write_bytes(text)
    with pytest.raises(ProjectError, match=match):
        Project.init(tmp_path / "p", tmp_path / "t.toml")
    with pytest.raises(ProjectError, match="no such taxonomy"):
        Project.init(tmp_path / "p", tmp_path / "missing.toml")
    assert not (tmp_path / "p").exists()


def test_the_defaults(tmp_path: Path) -> None:
    tax = parse_taxonomy({"root": {"name": "r", "path": "org"}, "authorities": {"lab": {"sources": ["ann"]}}})
    fields = tax.policy_fields()
    assert fields["name"] == "r-routing" and fields["bands"] == ["head", "mid", "deep"]
    assert fields["rules"] == [{"name": "excluded", "match": {"review": ["rejected"]}, "profile": [0.0] * 3,
                                "limits": [None] * 3}]
    assert fields["default"] == {"profile": [1.0, 0.0, 0.0], "limits": [None] * 3}
    assert (tax.trainer_name, tax.trainer_path, tax.sources["ann"].path) == ("trainer", "org/training", "org/lab/ann")
    assert tax.confidence("ann") == 1.0 and tax.ontology is None


JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _places(value: Any, at: tuple = ()) -> list[tuple]:
    out = [at]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _places(v, at + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _places(v, at + (i,))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_mutated_taxonomy_is_refused_clearly_or_fully_usable(data: st.DataObject) -> None:
    doc = load_taxonomy(EXAMPLE).to_mapping()
    place = data.draw(st.sampled_from(_places(doc)[1:]))
    parent = doc
    for step in place[:-1]:
        parent = parent[step]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace" or isinstance(parent, list):
        parent[place[-1]] = data.draw(JUNK)
    elif action == "delete":
        del parent[place[-1]]
    else:
        parent[data.draw(st.text(max_size=6))] = data.draw(JUNK)
    try:
        tax = parse_taxonomy(doc)
    except ProjectError as exc:
        assert str(exc).startswith("taxonomy: ") and "\n" not in str(exc)
        return
    # Accepted: the policy signs, and the canonical form reads back to the same taxonomy.
    sign_policy(tax.policy_fields(), SigningKey.from_seed(bytes(32)), 1)
    assert parse_taxonomy(tax.to_mapping()) == tax
    assert parse_taxonomy(json.loads(json.dumps(tax.to_mapping()))) == tax


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_file_is_read_or_refused_as_unusable_input(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.toml"
        path.write_bytes(text)
        try:
            load_taxonomy(path)
        except UnusableInput as exc:
            assert isinstance(exc, ProjectError)


# -- the command line ------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradledger.training.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_init(tmp_path: Path) -> None:
    done = _cli("init", str(tmp_path / "p"), "--taxonomy", str(EXAMPLE), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["sources"] == list(load_taxonomy(EXAMPLE).sources)
    assert summary["policy"]["rules"][0] == "excluded" and summary["ledger_size"] == 2 + 3 + 9 + 1 + 1
    with Project.open(tmp_path / "p") as project:
        assert project.policy.digest.hex() == summary["policy"]["digest"]
        assert read_public_keys(project.trust_file)[0].hex() == summary["root"]["public_key"]
        project.ledger.verify(trusted_roots=project.trusted_roots)

    human = _cli("init", str(tmp_path / "q"), "--taxonomy", str(EXAMPLE))
    assert human.returncode == 0 and "initialized project" in human.stdout and "0600" in human.stdout


@pytest.mark.parametrize("case", ["exists", "missing", "bad toml", "bad taxonomy"])
def test_cli_init_unusable_input_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    target, taxonomy = tmp_path / "p", tmp_path / "t.toml"
    taxonomy.write_text(EXAMPLE.read_text())
    if case == "exists":
        target.mkdir()
        (target / "x").write_text("x")
    elif case == "missing":
        taxonomy.unlink()
    elif case == "bad toml":
        taxonomy.write_text("[root\n")
    else:
        taxonomy.write_text(EXAMPLE.read_text().replace('name = "acme-root"', 'name = "Acme Root"'))
    done = _cli("init", str(target), "--taxonomy", str(taxonomy))
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradledger: ") and "Traceback" not in done.stderr
    expected = {"exists": "not an empty directory", "missing": "no such taxonomy", "bad toml": "not valid TOML",
                "bad taxonomy": "taxonomy: root.name"}[case]
    assert expected in lines[0]
    assert case == "exists" or not target.exists()
