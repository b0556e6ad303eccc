"""The strict model-program loader (gradledger.ledger.program, specs/replay.md §2).

Hostile programs carry payloads that create a file if anything in them runs: a ``guards_code``
entry (``torch.export``'s unlifting execs it), a symbolic size (``sympy.sympify`` evaluates it), a
pickle; deflate bombs in a config and in a weight. Each is re-signed into a bundle by the trainer
(every structural check passes) and handed to ``gradledger-verify`` and to ``unlearn``'s loader:
never run, never inflated, refused naming the program. Honest programs run bit for bit as
``torch.export.load(...).module()`` does.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradledger.ledger.program import (
    ATEN_OPS,
    ProgramError,
    ProgramModule,
    Ref,
    load_program,
    parse_program,
    run,
)
from gradledger.ledger.program.values import DTYPES
from gradledger.training.bands import sequential_bands, transformer_bands
from gradledger.training.gate import GatedModel, export_gated
from gradledger.training.unlearning import UnlearningError
from gradledger.training.replayer import ReplayError
from gradledger.training.replayer import load_program as unlearn_loader
from gradledger.verify import Verifier, VerificationPolicy
from test_gate import make_transformer
from test_verify_cli import _train, run_cli, write_bundle
from test_verify_structure import ROOTS, ListSource, items_of, reseal
from test_trainer import WORLD
from gradledger.ledger.keys import write_public_keys

MODEL_JSON = "archive/models/model.json"
WEIGHTS_CONFIG = "archive/data/weights/model_weights_config.json"
GiB = 1 << 30


# -- building archives -------------------------------------------------------------------------


def _save(ep: torch.export.ExportedProgram) -> bytes:
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()


Writer = Callable[[Any], None]


def rebuild(program: bytes, *, model: Callable[[dict[str, Any]], None] | None = None,
            replace: dict[str, bytes | Writer] | None = None, add: dict[str, bytes] | None = None) -> bytes:
    """The archive with its model JSON edited, members replaced (bytes, or a writer streaming into a
    deflated member) and members added; everything else as torch stored it."""
    replace, add = replace or {}, add or {}
    src, out = zipfile.ZipFile(io.BytesIO(program)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data: bytes | Writer = src.read(info)
            if info.filename == MODEL_JSON and model is not None:
                doc = json.loads(data)  # type: ignore[arg-type]
                model(doc)
                data = json.dumps(doc).encode()
            data = replace.get(info.filename, data)
            if callable(data):
                deflated = zipfile.ZipInfo(info.filename)
                deflated.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(deflated, "w", force_zip64=True) as f:
                    data(f)
            else:
                dst.writestr(info, data)
        for name, data in add.items():
            dst.writestr(name, data)
    return out.getvalue()


def _bomb(prefix: bytes) -> Writer:
    """A member that inflates to ``prefix`` and then 1 GiB of spaces (about 1 MB deflated)."""

    def write(f: Any) -> None:
        f.write(prefix)
        chunk = b" " * (64 << 20)
        for _ in range(GiB // len(chunk)):
            f.write(chunk)

    return write


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def _guards(marker: Path) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["guards_code"] = [f"open({str(marker)!r}, 'w').close() is None"]

    return edit


def _sympify(marker: Path) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        size = doc["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]
        size["expr_str"] = f"(open({str(marker)!r}, 'w').close() or {size['expr_str']})"

    return edit


def hostile(kind: str, program: bytes, marker: Path, bombs: dict[str, bytes]) -> bytes:
    if kind == "guards_code":
        return rebuild(program, model=_guards(marker))
    if kind == "sympify":
        return rebuild(program, model=_sympify(marker))
    if kind == "pickle_member":
        return rebuild(program, add={"archive/data/constants/opaque_obj_0": pickle.dumps(_Payload(str(marker)))})
    if kind == "pickle_weight":
        config = json.loads(zipfile.ZipFile(io.BytesIO(program)).read(WEIGHTS_CONFIG))
        first = next(iter(config["config"].values()))
        first["use_pickle"], first["path_name"] = True, "payload.pkl"
        return rebuild(program, replace={WEIGHTS_CONFIG: json.dumps(config).encode()},
                       add={"archive/data/weights/payload.pkl": pickle.dumps(_Payload(str(marker)))})
    return bombs[kind]


KINDS = ["guards_code", "sympify", "pickle_member", "pickle_weight", "bomb_config", "bomb_weight"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("loader")
    recs, arts, origin = _train(base / "a", steps=4, every=2)
    roots = write_public_keys(base / "roots.pub", [(WORLD.root.public_key, "root")])
    items = items_of(recs)
    run_seq = next(i for i, it in enumerate(items) if it.type == "RunStarted" and it.body["artifacts"])
    program = arts[items[run_seq].body["artifacts"]["program"]]
    config = zipfile.ZipFile(io.BytesIO(program)).read(WEIGHTS_CONFIG)
    bombs = {"bomb_config": rebuild(program, replace={WEIGHTS_CONFIG: _bomb(config)}),
             "bomb_weight": rebuild(program, replace={"archive/data/weights/weight_0": _bomb(b"")})}
    return {"base": base, "recs": recs, "arts": arts, "origin": origin, "roots": roots, "run_seq": run_seq,
            "program": program, "bombs": bombs}


def _bundle_naming(world: dict[str, Any], program: bytes, path: Path) -> Path:
    """The honest run re-signed by the trainer with RunStarted naming ``program``."""
    items = items_of(world["recs"])
    digest = hashlib.sha256(program).digest()
    old = items[world["run_seq"]].body["artifacts"]["program"]
    items[world["run_seq"]].body = {**items[world["run_seq"]].body, "artifacts": {"program": digest}}
    # The replaced program goes: a bundle carrying an artifact no record names fails on that first.
    arts = {k: v for k, v in world["arts"].items() if k != old}
    return write_bundle(path, reseal(items), {**arts, digest: program}, world["origin"])


# -- the payloads are live: torch.export's own loader runs them ----------------------------------


@pytest.mark.parametrize("kind", ["guards_code", "sympify"])
def test_the_payloads_run_under_torch_export_load(world: dict[str, Any], tmp_path: Path, kind: str) -> None:
    # The control: the same archive through the path the verifier used before runs the payload.
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt2"
    evil.write_bytes(hostile(kind, world["program"], marker, world["bombs"]))
    code = ("import io, sys, torch\n"
            "m = torch.export.load(io.BytesIO(open(sys.argv[1], 'rb').read())).module()\n"
            "m(torch.zeros(4, 64), torch.ones(4, 3))\n")
    subprocess.run([sys.executable, "-c", code, str(evil)], capture_output=True, timeout=300)
    assert marker.exists()


# -- hostile programs: refused by the verifier and by unlearn, nothing runs ----------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_verifier_refuses_a_hostile_program_naming_it(world: dict[str, Any], tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    bundle = _bundle_naming(world, hostile(kind, world["program"], marker, world["bombs"]), tmp_path / "evil.glb")
    code, out = run_cli(bundle, world["roots"])
    assert code in (1, 2) and not out.get("verified"), out
    failure = out["first_failure"]
    assert failure["seq"] == world["run_seq"] and "program" in failure["detail"], failure
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_unlearns_loader_refuses_a_hostile_program(world: dict[str, Any], tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ReplayError, match="program"):
        unlearn_loader(hostile(kind, world["program"], marker, world["bombs"]))
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["guards_code", "sympify", "pickle_member"])
def test_unlearn_refuses_a_run_whose_program_is_hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      kind: str) -> None:
    # A trainer whose export carries the payload; `gradledger unlearn` then reads the program back.
    import test_unlearning as U
    from gradledger.training.retirement import retire
    from gradledger.training.trainer import Governance
    from gradledger.training.unlearning import unlearn
    from helpers import CROWD_KEY

    marker = tmp_path / "pwned"
    honest_export = Governance._export
    monkeypatch.setattr(Governance, "_export",
                        lambda self, model, probe: hostile(kind, honest_export(self, model, probe), marker, {}))
    before = torch.are_deterministic_algorithms_enabled()
    from gradledger.training.errors import GovernanceError

    # The trainer reads its own program back with the strict loader before it records the run, so it
    # refuses it there, and nothing of the payload runs.
    led, ds = U.new_ledger(tmp_path / "refused", U.MANIFESTS, U.X)
    try:
        size = led.size
        with pytest.raises(GovernanceError, match="cannot be read back"):
            U.governed_run(led, ds, U.X)
        assert not marker.exists() and led.size == size  # refused before RunStarted
    finally:
        led.close()
        torch.use_deterministic_algorithms(before)
    # A trainer that skips that check records the run; `gradledger unlearn` must refuse it all the same.
    monkeypatch.setattr(Governance, "self_check", lambda self, micros, recipe: None)
    monkeypatch.setattr(Governance, "_parse_program", staticmethod(lambda data: None))
    led, ds = U.new_ledger(tmp_path / "ledger", U.MANIFESTS, U.X)
    try:
        U.governed_run(led, ds, U.X)
        retire(led, U.FAULTY, CROWD_KEY, "swaps 3 and 8")
        size = led.size
        with pytest.raises(UnlearningError, match="program"):
            unlearn(led, U.FAULTY, U.WORLD.trainer)
        assert led.size == size and not marker.exists()
    finally:
        led.close()
        torch.use_deterministic_algorithms(before)


def _peak_rss_mb(program: Path) -> tuple[float, str]:
    code = ("import resource, sys\n"
            "from gradledger.ledger.program import load_program, ProgramError\n"
            "data = open(sys.argv[1], 'rb').read()\n"
            "try:\n    load_program(data); outcome = 'loaded'\n"
            "except ProgramError as exc:\n    outcome = 'refused: ' + str(exc)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\nprint(outcome)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(program)], capture_output=True, text=True, timeout=300)
    rss, outcome = proc.stdout.strip().splitlines()
    return float(rss), outcome


@pytest.mark.parametrize("kind", ["bomb_config", "bomb_weight"])
def test_a_deflate_bomb_is_refused_with_memory_bounded(world: dict[str, Any], tmp_path: Path, kind: str) -> None:
    honest, bomb = tmp_path / "honest.pt2", tmp_path / "bomb.pt2"
    honest.write_bytes(world["program"])
    bomb.write_bytes(world["bombs"][kind])
    honest_rss, honest_outcome = _peak_rss_mb(honest)
    bomb_rss, bomb_outcome = _peak_rss_mb(bomb)
    assert honest_outcome == "loaded"
    assert bomb_outcome.startswith("refused") and "compressed" in bomb_outcome, bomb_outcome
    # Inflating the member would add 1024 MB; the loader's own peak stays that of an honest load.
    assert bomb_rss <= 1.5 * honest_rss, (bomb_rss, honest_rss)


def test_a_weight_whose_bytes_differ_from_its_crc_is_refused(world: dict[str, Any]) -> None:
    data = bytearray(world["program"])
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("archive/data/weights/weight_0")
    # Flip one byte of the weight (after the local header, whose extra field torch pads): the CRC
    # the directory declares no longer matches.
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    data[info.header_offset + 30 + name_len + extra_len + 3] ^= 0xFF
    with pytest.raises(ProgramError, match="weight_0"):
        load_program(bytes(data))


# -- the allowlist -------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["torch.ops.higher_order.cond", "torch.ops.mylib.evil.default",
                                    "torch.ops.aten.save.default", "torch.ops.aten.set_.source_Tensor",
                                    "builtins.eval", "torch.ops.aten.linear"])
def test_an_operator_off_the_allowlist_is_refused_by_name(world: dict[str, Any], target: str) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["graph_module"]["graph"]["nodes"][-1]["target"] = target

    with pytest.raises(ProgramError, match="allowlist") as err:
        load_program(rebuild(world["program"], model=edit))
    assert target[:60] in str(err.value)


def test_an_in_place_op_on_a_parameter_is_refused(world: dict[str, Any]) -> None:
    def edit(doc: dict[str, Any]) -> None:
        node = next(n for n in doc["graph_module"]["graph"]["nodes"] if n["target"] == "torch.ops.aten.add.Tensor")
        node["target"] = "torch.ops.aten.add_.Tensor"

    with pytest.raises(ProgramError, match="in-place"):
        load_program(rebuild(world["program"], model=edit))


def test_a_size_argument_beyond_the_bound_is_refused_before_the_call(world: dict[str, Any]) -> None:
    def edit(doc: dict[str, Any]) -> None:
        node = next(n for n in doc["graph_module"]["graph"]["nodes"] if n["target"] == "torch.ops.aten.reshape.default")
        node["inputs"][1]["arg"] = {"as_sym_ints": [{"as_int": 1 << 20}, {"as_int": 1 << 20}]}

    module = ProgramModule(load_program(rebuild(world["program"], model=edit)))
    with pytest.raises(ProgramError, match="more than"):
        module(torch.zeros(4, 64), torch.ones(4, 3))


def test_the_dtype_table_is_torchs() -> None:
    from torch._export.serde.schema import ScalarType

    names = {"BYTE": torch.uint8, "CHAR": torch.int8, "SHORT": torch.int16, "INT": torch.int32, "LONG": torch.int64,
             "HALF": torch.float16, "FLOAT": torch.float32, "DOUBLE": torch.float64, "BOOL": torch.bool,
             "BFLOAT16": torch.bfloat16}
    assert {ScalarType(code).name: dtype for code, dtype in DTYPES.items()} == names


# -- random mutations of an honest model JSON ----------------------------------------------------

PAYLOAD_STRINGS = ["__import__('os').system('touch {m}')", "open('{m}', 'w').close() is None",
                   "Symbol('s0') or open('{m}', 'w')", "torch.ops.aten.linear.default", "x", "s74", ""]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_paths(v, prefix + (k,)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(_paths(v, prefix + (i,)))
    return out


def _values(marker: str) -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.sampled_from([p.format(m=marker) for p in PAYLOAD_STRINGS]), st.text(max_size=12))
    return st.recursive(leaves, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c,
                                                                                             max_size=3)), max_leaves=6)


@pytest.fixture(scope="module")
def honest_doc(world: dict[str, Any]) -> dict[str, Any]:
    return json.loads(zipfile.ZipFile(io.BytesIO(world["program"])).read(MODEL_JSON))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_model_json_never_runs_code_nor_raises_anything_else(
    world: dict[str, Any], honest_doc: dict[str, Any], tmp_path: Path, data: st.DataObject
) -> None:
    marker = tmp_path / "pwned"
    doc = copy.deepcopy(honest_doc)
    paths = _paths(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        if not path:
            continue
        parent = doc
        try:
            for k in path[:-1]:
                parent = parent[k]
            if data.draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = data.draw(_values(str(marker)))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    evil = rebuild(world["program"], replace={MODEL_JSON: json.dumps(doc).encode()})
    try:
        module = ProgramModule(load_program(evil))
        module(torch.zeros(4, 64), torch.ones(4, 3))
    except ProgramError:
        pass
    assert not marker.exists()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1, max_size=4))
def test_flipped_archive_bytes_never_raise_anything_but_program_error(
    world: dict[str, Any], flips: list[tuple[int, int]]
) -> None:
    data = bytearray(world["program"])
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    try:
        module = ProgramModule(load_program(bytes(data)))
        module(torch.zeros(4, 64), torch.ones(4, 3))
    except ProgramError:
        pass


# -- bit for bit what torch.export's module() computes -------------------------------------------


class ConvBN(nn.Module):
    """BatchNorm in training mode: running statistics mutated by the program itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.head(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


def _case(kind: str) -> tuple[bytes, list[torch.Tensor], list[torch.Tensor]]:
    """(archive, example inputs, inputs of another batch size) for each kind of model."""
    torch.manual_seed(3)
    batch = torch.export.Dim("batch")
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10))
        x = torch.randn(4, 64)
        return _save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},))), [x], [torch.randn(3, 64)]
    if kind == "conv_bn":
        x = torch.randn(4, 1, 8, 8)
        ep = torch.export.export(ConvBN(), (x,), dynamic_shapes=({0: batch},))
        return _save(ep), [x], [torch.randn(5, 1, 8, 8)]
    if kind == "gated_mlp":
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 32), nn.ReLU(),
                              nn.Linear(32, 10))
        gated = GatedModel(model, sequential_bands(model))
        p = torch.tensor([[1.0, 0.6, 0.2], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
        x = torch.randn(4, 64)
        return _save(export_gated(gated, x, p)), [x, p], [x[:3], p[1:]]
    model = make_transformer(7, 3)
    gated = GatedModel(model, transformer_bands(model))
    p = torch.tensor([[1.0, 0.6, 0.2], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    x = torch.randint(0, 7, (4, 5))
    return _save(export_gated(gated, x, p)), [x, p], [x[:3], p[1:]]


def _step(module: nn.Module, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # dropout draws from the default generator, as in replay
    out = module(*inputs)
    out.double().square().mean().backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("kind", ["mlp", "conv_bn", "gated_mlp", "transformer"])
def test_the_interpreter_matches_torch_export_module_bit_for_bit(kind: str) -> None:
    data, inputs, other = _case(kind)
    ours, theirs = ProgramModule(load_program(data)), torch.export.load(io.BytesIO(data)).module()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for batch in (inputs, other, inputs):  # two batch sizes; BatchNorm's statistics move each time
        (a, ga), (b, gb) = _step(ours, batch), _step(theirs, batch)
        assert torch.equal(a, b)
        assert ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga)
        sa, sb = ours.state_dict(), theirs.state_dict()
        assert all(torch.equal(sa[n], sb[n]) for n in sa)
    if kind == "conv_bn":
        assert int(ours.state_dict()["bn.num_batches_tracked"]) == 3


@pytest.mark.parametrize("kind", ["mlp", "conv_bn", "transformer"])
def test_a_program_run_on_given_weights_matches_its_stored_ones(kind: str) -> None:
    # The trainer's self-check loads its program without the weights and runs it on the live ones
    # (load_program(weights=False)): the same bits as the stored weights, parameters sharing the
    # given storage, buffers copied (the program's forward may update them; the caller's stay).
    data, inputs, _ = _case(kind)
    stored = ProgramModule(load_program(data))
    skeleton = load_program(data, weights=False)
    assert not set(skeleton.state) & set(stored.state_dict())  # no weight was read
    given = {n: t.clone() for n, t in stored.state_dict().items()}
    before = {n: t.clone() for n, t in given.items()}
    ours = ProgramModule(skeleton, weights=given)
    (a, ga), (b, gb) = _step(ours, inputs), _step(stored, inputs)
    assert torch.equal(a, b) and ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga)
    params = dict(ours.named_parameters())
    assert all(params[n].data_ptr() == given[n].data_ptr() for n in params)
    assert all(torch.equal(given[n], before[n]) for n in given)  # a BatchNorm's update stayed in the copy
    if kind == "conv_bn":
        assert int(ours.state_dict()["bn.num_batches_tracked"]) == 1 and int(given["bn.num_batches_tracked"]) == 0
    name = sorted(skeleton.params)[0]
    with pytest.raises(ProgramError, match="was not given"):
        ProgramModule(skeleton, weights={n: t for n, t in given.items() if n != name})
    with pytest.raises(ProgramError, match="the program stores"):
        ProgramModule(skeleton, weights={**given, name: given[name].to(torch.float16)})
    with pytest.raises(ProgramError, match="the program stores"):
        ProgramModule(skeleton, weights={**given, name: given[name].flatten()[:-1]})


def test_buffer_mutation_outputs_update_the_buffers_like_torch_export() -> None:
    # ATen IR (run_decompositions) returns BatchNorm's new statistics as buffer_mutation outputs.
    torch.manual_seed(3)
    x = torch.randn(4, 1, 8, 8)
    ep = torch.export.export(ConvBN(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    data = _save(ep.run_decompositions())
    assert any(o.kind == "buffer_mutation" for o in parse_program(data).outputs)
    ours, theirs = ProgramModule(load_program(data)), torch.export.load(io.BytesIO(data)).module()
    with torch.no_grad():  # this IR's saved statistics are then overwritten: torch refuses its backward too
        for batch in (x, torch.randn(5, 1, 8, 8)):
            assert torch.equal(ours(batch), theirs(batch))
            sa, sb = ours.state_dict(), theirs.state_dict()
            assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert int(ours.state_dict()["bn.num_batches_tracked"]) == 2


def test_inputs_outside_the_programs_guards_are_refused() -> None:
    data, (x, p), _ = _case("gated_mlp")
    module = ProgramModule(load_program(data))
    with pytest.raises(ProgramError, match="disagree"):
        module(x, p[:3])  # the batch of x and of profiles must agree (the archive's guard)
    with pytest.raises(ProgramError, match="dim 1"):
        module(torch.zeros(4, 63), p)
    with pytest.raises(ProgramError, match="float64"):
        module(x.double(), p)


def test_the_after_hook_sees_every_node_with_its_module_and_can_replace_its_value() -> None:
    data, inputs, _ = _case("gated_mlp")
    program = load_program(data)
    graph = parse_program(data)
    assert graph == program.graph
    seen: list[str] = []

    def zero_the_head(node: Any, value: Any) -> Any:
        seen.append(node.name)
        if node.op == "aten.linear.default" and "model.5" in node.module_stack:
            return torch.zeros_like(value)
        return value

    module = ProgramModule(program)
    state = module.live_state()
    (plain,) = run(graph, dict(zip(graph.user_inputs, inputs)), state)
    (zeroed,) = run(graph, dict(zip(graph.user_inputs, inputs)), state, after=zero_the_head)
    assert seen == [n.name for n in graph.nodes]
    assert not torch.equal(plain, zeroed) and torch.equal(zeroed, torch.zeros_like(zeroed))
    linears = [n for n in graph.nodes if n.op == "aten.linear.default"]
    assert [n.module_stack[-1] for n in linears] == ["model.0", "model.3", "model.5"]
    assert all(isinstance(a, Ref) for a in linears[0].args)
    assert {n.op.removeprefix("aten.") for n in graph.nodes} <= ATEN_OPS


# -- nothing is cached across verifications ------------------------------------------------------


def test_a_second_verification_never_reuses_the_firsts_program(world: dict[str, Any]) -> None:
    verifier = Verifier(ROOTS, VerificationPolicy(replay="full"))  # type: ignore[arg-type]
    honest = ListSource(world["recs"], world["arts"])
    assert verifier._verify(honest, "", False).verified
    program = items_of(world["recs"])[world["run_seq"]].body["artifacts"]["program"]
    missing = ListSource(world["recs"], {d: a for d, a in world["arts"].items() if d != program})
    report = verifier._verify(missing, "", False)
    assert not report.verified and report.first_failure is not None
    assert "program" in report.first_failure.detail, report.first_failure


def test_honest_bundle_still_verifies(world: dict[str, Any], tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "ok.glb", world["recs"], world["arts"], world["origin"])
    code, out = run_cli(bundle, world["roots"])
    assert code == 0 and out["verified"], out


@pytest.mark.parametrize("field", ["dtype", "layout"])
@pytest.mark.parametrize("value", [[1], {"a": 1}, "7", 7.0, None])
def test_a_tensor_meta_with_an_unhashable_or_wrong_typed_code_is_refused(field: str, value: Any) -> None:
    # Found by the mutation test above: a list as dtype reached a dict lookup and raised TypeError.
    from gradledger.ledger.program.values import tensor_meta

    meta = {"dtype": 7, "layout": 0, "device": {"type": "cpu", "index": None}, "sizes": [], "strides": [],
            "storage_offset": {"as_int": 0}, "requires_grad": False, "memory_format": 0}
    with pytest.raises(ProgramError):
        tensor_meta({**meta, field: value}, "input 'x'")
