"""Models of parts (issue 11; specs/training.md §5.1, manifests.md §2.1): a model that takes several
tensors per example (a HuggingFace BERT's ``input_ids`` and ``attention_mask``, a two-input module)
is governed with the user's loop as written (``model(**x)``, ``model(*x)``), its examples' ids cover
every part, the verifier replays it bit for bit from the parts, and a hostile trainer's lie about the
parts (re-signing everything it may) fails verification."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save
from torch import nn
from torch.utils.data import DataLoader, Dataset

import gradledger
from gradledger.ledger.bundle import export_bundle
from gradledger.training.bands import Band, BandLayout
from gradledger.training.dataset import encode_inputs
from gradledger.training.errors import GovernanceError
from gradledger.training.manifests import example_id
from gradledger.verify._internal import manifests as vm
from forging import Forge
from helpers import verify_cli

TAXONOMY = Path(__file__).resolve().parents[1] / "examples" / "taxonomy.toml"
N, SEQ, VOCAB, BATCH = 64, 10, 40, 16


# -- example ids (manifests.md §2.1) ------------------------------------------------------


def _spec_vector() -> dict[str, str]:
    """The §2.1 vectors, read from the spec itself so the test and the spec cannot drift apart."""
    text = (Path(__file__).resolve().parents[1] / "specs" / "manifests.md").read_text()
    section = text[text.index("### 2.1"):text.index("## 3.")]
    hexes = re.findall(r"example_id\s+`([0-9a-f]{64})`", section)
    return {"dict": hexes[0], "tuple": hexes[1]}


def test_parts_id_matches_the_spec_vector_in_both_implementations() -> None:
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    b = np.array([1, 1, 0], dtype=np.int64)
    want = _spec_vector()
    assert example_id({"input_ids": a, "attention_mask": b}).hex() == want["dict"]
    assert example_id((a, b)).hex() == want["tuple"]
    assert vm.parts_id({"input_ids": vm.example_id(a), "attention_mask": vm.example_id(b)}).hex() == want["dict"]
    assert vm.parts_id({"0": vm.example_id(a), "1": vm.example_id(b)}).hex() == want["tuple"]
    assert example_id(a) != example_id({"x": a}) != example_id((a,))  # a structure is never its lone tensor


names = st.text(alphabet="abcdefghij_0123456789", min_size=1, max_size=8)
arrays = st.lists(st.integers(-5, 5), min_size=1, max_size=6).map(lambda v: np.array(v, dtype=np.int64))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(names, arrays, min_size=1, max_size=5), st.data())
def test_parts_id_both_implementations_agree_and_bind_every_part(parts: dict[str, np.ndarray], data: Any) -> None:
    got = example_id(parts)
    assert got == vm.parts_id({k: vm.example_id(v) for k, v in parts.items()})
    assert example_id(dict(reversed(list(parts.items())))) == got  # key order is not part of the id
    name = data.draw(st.sampled_from(sorted(parts)))
    changed = dict(parts)
    changed[name] = parts[name].copy()
    changed[name][0] += 1
    assert example_id(changed) != got
    renamed = {(k + "z" if k == name else k): v for k, v in parts.items()}
    if len(renamed) == len(parts):
        assert example_id(renamed) != got


def test_part_names_are_refused_unless_short_and_plain() -> None:
    from gradledger.training.errors import DatasetError

    for bad in ({"a.b": np.zeros(1)}, {"": np.zeros(1)}, {"é": np.zeros(1)}, {"n": {"m": np.zeros(1)}}):
        with pytest.raises(DatasetError):
            example_id(bad)


# -- the inputs artifact (manifests.md §5) -------------------------------------------------------


def _tokens() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (N, SEQ), generator=g)
    lengths = torch.randint(3, SEQ + 1, (N,), generator=g)
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).to(torch.int64)
    ids = ids * mask  # padding is token 0
    y = (ids[:, 0] % 10).to(torch.int64)
    return ids, mask, y


class _Manifest:
    def __init__(self, example: bytes) -> None:
        self.example = example


def test_the_verifier_reads_a_parts_artifact_row_by_row() -> None:
    ids, mask, _ = _tokens()
    examples = [example_id({"input_ids": ids[i], "attention_mask": mask[i]}) for i in range(N)]
    data = encode_inputs({"input_ids": ids, "attention_mask": mask}, [_Manifest(e) for e in examples])  # type: ignore[misc]
    vm.check_inputs(data, examples)
    flipped = mask.clone()
    flipped[5, -1] = 1 - flipped[5, -1]
    with pytest.raises(vm.ManifestInvalid, match="input row 5"):
        vm.check_inputs(save({"x.input_ids": ids, "x.attention_mask": flipped}), examples)
    with pytest.raises(vm.ManifestInvalid, match="neither exactly one tensor"):
        vm.check_inputs(save({"x.input_ids": ids, "x.attention_mask": mask, "y": mask.clone()}), examples)
    with pytest.raises(vm.ManifestInvalid, match="not 64 rows|rows"):
        vm.check_inputs(save({"x.input_ids": ids, "x.attention_mask": mask[:-1]}), examples)
    # A header whose offsets point past the file is refused before any slice.
    header = json.dumps({"x": {"dtype": "I64", "shape": [N, SEQ], "data_offsets": [0, 1 << 40]}}).encode()
    with pytest.raises(vm.ManifestInvalid, match="data_offsets"):
        vm.check_inputs(len(header).to_bytes(8, "little") + header + b"\0" * 64, examples)


# -- governed end to end ------------------------------------------------------------------------


class Tokens(Dataset):
    """A tokenized dataset as a user has it: item i is ``({"input_ids", "attention_mask"}, label)``."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, as_tuple: bool = False) -> None:
        self.ids, self.mask, self.y, self.as_tuple = ids, mask, y, as_tuple

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        if self.as_tuple:
            return (self.ids[i], self.mask[i]), self.y[i]
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.y[i]


class MaskedBag(nn.Module):
    """Embeds tokens and averages them over the attention mask: the mask changes every output."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.cut = nn.Identity()
        self.mid = nn.Linear(16, 16)
        self.act = nn.ReLU()
        self.head = nn.Linear(16, 10)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        e = self.cut(self.emb(input_ids))
        m = attention_mask.unsqueeze(-1).to(e.dtype)
        return self.head(self.act(self.mid((e * m).sum(1) / m.sum(1).clamp(min=1))))


BAG_LAYOUT = BandLayout([Band("head", ["head"]), Band("mid", ["mid"], "act"), Band("deep", ["emb"], "cut")])


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("parts") / "project"
    ids, mask, y = _tokens()
    with gradledger.Project.init(path, TAXONOMY) as p:
        p.label({"input_ids": ids, "attention_mask": mask}, y.tolist(), source="dr-lee", name="tokens")
        p.label(Tokens(ids, mask, y, as_tuple=True), y.tolist(), source="dr-lee", name="pairs")
    return path


def _run(project: Path, out: Path, model: nn.Module, dataset: Dataset, name: str, call: Callable[[nn.Module, Any], Any],
         *, layout: BandLayout | None = BAG_LAYOUT, **kw: Any) -> Path:
    """The user's loop over one epoch, governed; returns the exported bundle."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
    with gradledger.Project.open(project) as p:
        model, optimizer, loader = gradledger.govern(model, optimizer, loader, project=p, dataset=name, layout=layout,
                                                     run_id=out.name, checkpoint_every=2, **kw)
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            out_ = call(model, x)
            F.cross_entropy(out_.logits if hasattr(out_, "logits") else out_, y).backward()
            optimizer.step()
        model.run.close()
        bundle = out / "run.glb"
        out.mkdir(parents=True, exist_ok=True)
        export_bundle(p.ledger, bundle, with_data=True)
    return bundle


def _verify(bundle: Path, project: Path) -> tuple[int, dict[str, Any]]:
    return verify_cli(bundle, project / "roots.pub")


def _run_started(f: Forge) -> int:
    return f.seqs("RunStarted")[-1]


@pytest.fixture(scope="module")
def bag(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    ids, mask, y = _tokens()
    return _run(project, tmp_path_factory.mktemp("bag") / "bag", MaskedBag(), Tokens(ids, mask, y), "tokens",
                lambda m, x: m(**x))


def test_a_dict_input_model_called_with_kwargs_verifies(bag: Path, project: Path) -> None:
    code, report = _verify(bag, project)
    assert code == 0, report.get("first_failure")
    assert report["verdict"] == "exact" and report["figures"]["replayed_steps"] == N // BATCH
    f = Forge.from_bundle(bag, keys_dir=_keys(project, bag.parent))
    settings_ = f.body(_run_started(f))["settings"]
    assert settings_["format"] >= 5 and "parts" in settings_["program"]
    assert settings_["program"]["inputs"] == ["x_0", "x_1", "profiles"]
    assert [p["name"] for p in settings_["program"]["parts"]] == ["attention_mask", "input_ids"]


def _keys(project: Path, out: Path) -> Path:
    """The forger's keys: the trainer's only (it cannot sign as a source or the root)."""
    from gradledger.ledger.keys import SigningKey

    d = out / "keys"
    d.mkdir(parents=True, exist_ok=True)
    SigningKey.load(project / "keys" / "trainer.key").save(d / "trainer.key")
    return d


def _forged(bag: Path, project: Path, out: Path, forge: Callable[[Forge], Any]) -> tuple[int, dict[str, Any]]:
    f = Forge.from_bundle(bag, keys_dir=_keys(project, out))
    forge(f)
    return _verify(f.write(out / "forged.glb"), project)


def _swap_parts(f: Forge) -> None:
    parts = f.body(_run_started(f))["settings"]["program"]["parts"]
    f.set(_run_started(f), ("settings", "program", "parts"), [parts[1], parts[0]])


def _rename_parts(f: Forge) -> None:
    """A part the committed inputs do not hold (still sorted: the form is right, the data is not)."""
    parts = f.body(_run_started(f))["settings"]["program"]["parts"]
    f.set(_run_started(f), ("settings", "program", "parts"), [parts[0], dict(parts[1], name="tokens")])


def _widen_mask(f: Forge) -> None:
    """Every example's attention mask all ones (the padding then counts): a new inputs artifact, and the
    DatasetCommitted re-signed to name it."""
    from safetensors.torch import load

    seq = f.seqs("DatasetCommitted")[0]
    old = f.body(seq)["data"]
    tensors = load(f.arts[old])
    tensors["x.attention_mask"] = torch.ones_like(tensors["x.attention_mask"])
    f.replace_artifact(old, save(tensors))


def _one_tensor(f: Forge) -> None:
    """A one-tensor settings.program (format 4 says by its keys which it is), as if the model took one input."""
    rs = _run_started(f)
    f.set(rs, ("settings", "program"), {"format": "torch.export.save", "inputs": ["x", "profiles"],
                                        "x_dtype": "int64", "x_shape": [SEQ]})


@pytest.mark.parametrize("forge, words", [
    (_swap_parts, "canonical"),
    (_rename_parts, "committed inputs hold"),
    (_widen_mask, "input row"),
    (_one_tensor, "inputs"),
])
def test_a_lie_about_the_parts_fails(bag: Path, project: Path, tmp_path: Path, forge: Callable[[Forge], Any],
                                     words: str) -> None:
    code, report = _forged(bag, project, tmp_path, forge)
    assert code == 1, report
    failure = report["first_failure"]
    assert failure["name"] not in ("records", "tree heads"), failure  # caught by a check, not a signature
    assert words in json.dumps(failure), failure


def test_a_tuple_input_model_called_positionally_verifies(project: Path, tmp_path: Path) -> None:
    class Pair(MaskedBag):
        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(ids, mask)

    torch.manual_seed(1)
    ids, mask, y = _tokens()
    bundle = _run(project, tmp_path / "pair", Pair(), Tokens(ids, mask, y, as_tuple=True), "pairs", lambda m, x: m(*x))
    code, report = _verify(bundle, project)
    assert code == 0, report.get("first_failure")
    assert report["verdict"] == "exact"


def test_the_loop_may_pass_the_whole_dict_and_the_model_is_still_called_as_recorded(project: Path,
                                                                                  tmp_path: Path) -> None:
    torch.manual_seed(2)
    ids, mask, y = _tokens()
    bundle = _run(project, tmp_path / "whole", MaskedBag(), Tokens(ids, mask, y), "tokens", lambda m, x: m(x))
    code, report = _verify(bundle, project)
    assert code == 0, report.get("first_failure")


def test_a_call_the_inputs_cannot_be_is_refused(tmp_path: Path) -> None:
    ids, mask, y = _tokens()
    bag_model = MaskedBag()
    loader = DataLoader(Tokens(ids, mask, y), batch_size=BATCH)
    # A project of its own: this run ends with no step, which the shared project's bundles need not carry.
    with gradledger.Project.init(tmp_path / "p", TAXONOMY) as p:
        p.label({"input_ids": ids, "attention_mask": mask}, y.tolist(), source="dr-lee", name="tokens")
        model, optimizer, loader = gradledger.govern(bag_model, torch.optim.SGD(bag_model.parameters(), lr=0.1), loader,
                                                     project=p, dataset="tokens", layout=BAG_LAYOUT, run_id="refused")
        with model.run:
            model.train()
            x, _ = next(iter(loader))
            with pytest.raises(GovernanceError, match="unexpected keyword"):
                model(x, extra=1)
            with pytest.raises(GovernanceError, match="not those of the batch"):
                model({"input_ids": x["input_ids"]})


# -- a real model of parts ------------------------------------------------------------------


def test_a_huggingface_bert_with_an_attention_mask_verifies(project: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")  # in the test extra
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=10)
    ids, mask, y = _tokens()
    bundle = _run(project, tmp_path / "bert", transformers.BertForSequenceClassification(config), Tokens(ids, mask, y),
                  "tokens", lambda m, x: m(**x), layout=None)
    code, report = _verify(bundle, project)
    assert code == 0, report.get("first_failure")
    assert report["verdict"] == "exact"


def test_unlearning_a_source_of_a_parts_run_verifies(tmp_path: Path) -> None:
    """Exact unlearning replays the branch from the stored parts; its certificate verifies."""
    from gradledger.training.retirement import retire
    from gradledger.training.unlearning import unlearn

    ids, mask, y = _tokens()
    sources = ["worker-1" if i % 4 == 0 else "dr-lee" for i in range(N)]
    with gradledger.Project.init(tmp_path / "p", TAXONOMY) as p:
        p.label({"input_ids": ids, "attention_mask": mask}, y.tolist(), source=sources, name="tokens")
    torch.manual_seed(4)
    _run(tmp_path / "p", tmp_path / "run", MaskedBag(), Tokens(ids, mask, y), "tokens", lambda m, x: m(**x))
    with gradledger.Project.open(tmp_path / "p") as p:
        retire(p.ledger, "worker-1", p.root_key, "test: a retired annotator")
        result = unlearn(p.ledger, "worker-1", p.trainer_key)
        assert result.certificate_seq is not None
        export_bundle(p.ledger, tmp_path / "unlearned.glb", with_data=True)
    code, report = _verify(tmp_path / "unlearned.glb", tmp_path / "p")
    assert code == 0, report.get("first_failure")
    assert report["verdict"] == "exact"


def test_depth_profiles_of_a_model_of_parts_are_recorded_and_recomputed(tmp_path: Path) -> None:
    """Issue 16 on a model of parts called with keyword arguments (specs/dynamics.md §5.1): the held-out
    tokens go through the model as the training batches do, in both implementations."""
    ids, mask, y = _tokens()
    g = torch.Generator().manual_seed(11)
    held_ids = torch.randint(1, VOCAB, (24, SEQ), generator=g)
    held_mask = torch.ones_like(held_ids)
    held_y = (held_ids[:, 0] % 10).to(torch.int64)
    path = tmp_path / "project"
    with gradledger.Project.init(path, TAXONOMY) as p:
        p.label({"input_ids": ids, "attention_mask": mask}, y.tolist(), source="dr-lee", name="tokens")
        p.label({"input_ids": held_ids, "attention_mask": held_mask}, held_y.tolist(), source="dr-lee",
                name="tokens-heldout")
    torch.manual_seed(0)
    bundle = _run(path, tmp_path / "profiled", MaskedBag(), Tokens(ids, mask, y), "tokens", lambda m, x: m(**x),
                  profiles=gradledger.DepthProfiles("tokens-heldout"))
    code, report = _verify(bundle, path)
    assert code == 0, report.get("first_failure")
    check = next(c for c in report["checks"] if c["name"] == "profiles")
    n = report["figures"]["replayed_steps"] // 2 + 1  # a checkpoint every 2 steps, and step 0
    assert check["status"] == "pass" and f"{n} of {n} depth profile(s) recomputed" in check["detail"], check
    assert report["figures"]["profile_deviation_bits"] <= 1e-9
