"""The verifier's own routing around a model program (specs/routing.md §6, issue 10.1).

A hostile trainer may export a program without the gate, with a forged gate, or with a path
that bypasses a band boundary, or one that lets examples interact. The verifier finds the
boundary values itself, proves the cut and batch independence over the parsed graph, and
applies its own mix. Checked here:

- honest layouts pass the cut; a skip connection around a boundary, a parameter on the wrong
  side of its boundary and a boundary module that runs twice are refused, naming them;
- gradients of the program run with the verifier's mix equal the per-example reference
  ``sum_i p[i, k] * grad_k(l_i)`` and the trainer's eager ``GatedModel`` bit for bit, for the
  gated program (its own gate held at ones) and for an ungated one alike;
- programs that mix examples are refused naming the node; honest ones (MLP, transformer with
  attention over the sequence, dropout, the gated wrapper) pass.

Programs are real ``torch.export`` archives read by the strict parser (``ledger.program``).
"""

from __future__ import annotations

import copy
import io
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradledger.ledger.errors import VerificationError
from gradledger.ledger.program import ATEN_OPS, Program, ProgramModule, load_program
from gradledger.training.bands import Band, BandLayout, resolve_bands, sequential_bands, transformer_bands
from gradledger.training.gate import GatedModel, export_gated, routing_ratios
from gradledger.verify._internal import batch_rows
from gradledger.verify._internal.batch_rows import RULES, BatchInteraction, check_batch_independent
from gradledger.verify._internal.graph_routing import (
    CutError,
    RoutingNotProven,
    boundary_nodes,
    check_cut,
    mix,
    plan_routing,
    program_inputs,
    ratios,
    routed_forward,
    state_prefix,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_gate import make_transformer  # noqa: E402

FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- programs


def export(module: nn.Module, *args: torch.Tensor) -> Program:
    """A real archive, saved and read back by the strict loader (what the verifier sees)."""
    with torch.random.fork_rng(devices=[]):
        ep = torch.export.export(module, args, strict=False)
    return save_load(ep)


def save_load(ep: torch.export.ExportedProgram) -> Program:
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return load_program(buf.getvalue())


def gated_program(model: nn.Module, layout: BandLayout, x: torch.Tensor) -> Program:
    """What the trainer ships: the gate exported with a symbolic batch and float32 profiles."""
    gate = GatedModel(model, layout)
    try:
        with torch.random.fork_rng(devices=[]):
            return save_load(export_gated(gate, x, torch.ones(x.shape[0], len(layout))))
    finally:
        gate.remove_hooks()


def recorded(model: nn.Module, layout: BandLayout) -> tuple[dict[str, Any], list[list[str]]]:
    """RunStarted settings.bands and settings.band_params, as the trainer records them."""
    return layout.to_obj(), [list(ns) for ns in resolve_bands(model, layout).param_names]


def prove(program: Program, model: nn.Module, layout: BandLayout, x: torch.Tensor) -> list[list[str]]:
    bands, band_params = recorded(model, layout)
    b = plan_routing(program.graph, {"bands": bands, "band_params": band_params})
    assert b == boundary_nodes(program.graph, bands, band_params)
    state = ProgramModule(program).live_state()
    check_batch_independent(program.graph, program_inputs(program.graph, x, len(layout)), state, b)
    return b


# ---------------------------------------------------------------- models


class Chain(nn.Module):
    """Linear layers and activations in a ModuleList; ``skips`` (s, t) add layer s's output to layer t's input."""

    def __init__(self, widths: int, kinds: list[str], skips: list[tuple[int, int]], seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(
            nn.Linear(widths, widths) if k == "linear" else nn.Tanh() if k == "tanh" else nn.ReLU() for k in kinds
        )
        self.skips = skips
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        h = x
        for i, layer in enumerate(self.layers):
            for s, t in self.skips:
                if t == i:
                    h = h + outs[s]
            h = layer(h)
            outs.append(h)
        return h


def chain_layout(model: Chain, n_bands: int) -> BandLayout:
    """Contiguous groups of linear layers, head last; boundary: the last layer before the next band."""
    kinds = ["linear" if isinstance(m, nn.Linear) else "act" for m in model.layers]
    linear = [i for i, k in enumerate(kinds) if k == "linear"]
    size = len(linear) // n_bands
    groups = [linear[g * size:(g + 1) * size] for g in range(n_bands - 1)] + [linear[(n_bands - 1) * size:]]
    groups = groups[::-1]  # head first
    bands = []
    for k, group in enumerate(groups):
        boundary = None if k == 0 else f"layers.{groups[k - 1][0] - 1}"
        bands.append(Band(f"b{k}", [f"layers.{i}" for i in group], boundary))
    return BandLayout(bands)


@st.composite
def chains(draw: st.DrawFn, *, skips: bool) -> tuple[Chain, BandLayout]:
    n_bands = draw(st.integers(2, 3))
    n_linear = draw(st.integers(n_bands, n_bands + 2))
    kinds: list[str] = []
    for i in range(n_linear):
        kinds.append("linear")
        if i < n_linear - 1:
            kinds.append(draw(st.sampled_from(["tanh", "relu"])))
    edges: list[tuple[int, int]] = []
    if skips:
        s = draw(st.integers(0, len(kinds) - 3))
        t = draw(st.integers(s + 2, len(kinds) - 1))
        edges.append((s, t))
    model = Chain(3, kinds, edges, draw(st.integers(0, 1000)))
    return model, chain_layout(model, n_bands)


def crosses(model: Chain, layout: BandLayout) -> bool:
    """A skip (s, t) bypasses boundary b when s < b < t (s == b carries the boundary's own value)."""
    bs = [int(b.boundary.split(".")[1]) for b in layout.bands[1:]]
    return any(s < b < t for s, t in model.skips for b in bs)


# ---------------------------------------------------------------- the cut


@FAST
@given(chains(skips=False), st.booleans())
def test_honest_layouts_pass_the_cut(case: tuple[Chain, BandLayout], gated: bool) -> None:
    model, layout = case
    x = torch.randn(3, 3, dtype=torch.float64)
    program = gated_program(model, layout, x) if gated else export(model, x)
    b = prove(program, model, layout, x)
    assert [len(v) for v in b] == [0] + [1] * (len(layout) - 1)


@FAST
@given(chains(skips=True))
def test_a_skip_around_a_boundary_is_refused(case: tuple[Chain, BandLayout]) -> None:
    model, layout = case
    x = torch.randn(3, 3, dtype=torch.float64)
    bands, band_params = recorded(model, layout)
    for program in (export(model, x), gated_program(model, layout, x)):
        b = boundary_nodes(program.graph, bands, band_params)
        if crosses(model, layout):
            with pytest.raises(CutError, match=r"parameter '.*' of band 'b\d' reaches the model output without "
                                               r"crossing boundary 'layers\.\d+'"):
                check_cut(program.graph, bands, band_params, b)
        else:
            check_cut(program.graph, bands, band_params, b)


@FAST
@given(chains(skips=False), st.data())
def test_a_parameter_on_the_wrong_side_of_a_boundary_is_refused(case: tuple[Chain, BandLayout], data) -> None:
    model, layout = case
    x = torch.randn(3, 3, dtype=torch.float64)
    bands, band_params = recorded(model, layout)
    movable = [k for k, ps in enumerate(band_params) if len(ps) > 2]
    if not movable:
        movable = [max(range(len(band_params)), key=lambda k: len(band_params[k]))]
    src = data.draw(st.sampled_from(movable))
    dst = data.draw(st.sampled_from([k for k in range(len(band_params)) if k != src]))
    name = data.draw(st.sampled_from(band_params[src]))
    forged = [list(ps) for ps in band_params]
    forged[src].remove(name)
    forged[dst].append(name)
    program = export(model, x)
    b = boundary_nodes(program.graph, bands, forged)
    with pytest.raises(CutError, match=rf"parameter '{name}' of band 'b{dst}'"):
        check_cut(program.graph, bands, forged, b)


class Twice(nn.Module):
    """The boundary module runs twice: a path through it crosses the boundary two times."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.act = nn.Tanh()
        self.b = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.b(self.act(self.a(x)))))


def test_a_boundary_that_runs_twice_is_refused() -> None:
    model = Twice()
    layout = BandLayout([Band("head", ["head"]), Band("deep", ["a", "b"], "act")])
    x = torch.randn(3, 3, dtype=torch.float64)
    bands, band_params = recorded(model, layout)
    program = export(model, x)
    b = boundary_nodes(program.graph, bands, band_params)
    assert len(b[1]) == 2
    with pytest.raises(CutError, match="boundary 'act' of band 'deep'.*crosses the boundary twice"):
        check_cut(program.graph, bands, band_params, b)


def test_a_boundary_with_no_value_and_unknown_parameters_are_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Identity(), nn.Linear(3, 2)).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    program = export(model, x)
    layout = BandLayout([Band("head", ["2"]), Band("deep", ["0"], "1")])
    bands, band_params = recorded(model, layout)
    with pytest.raises(CutError, match="boundary '1' of band 'deep' yields no value"):
        boundary_nodes(program.graph, bands, band_params)
    with pytest.raises(CutError, match="'9.weight' is not a parameter of the program"):
        state_prefix(program.graph, [["2.weight"], ["9.weight"]])


def test_the_prefix_is_read_from_the_recorded_parameter_names() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    layout = sequential_bands(model, 2)
    x = torch.randn(3, 3, dtype=torch.float64)
    _, band_params = recorded(model, layout)
    assert state_prefix(gated_program(model, layout, x).graph, band_params) == "model."
    assert state_prefix(export(model, x).graph, band_params) == ""

    class Holder(nn.Module):  # a plain model whose names fit with and without "model."
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Linear(3, 3)
            self.model.model = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model.model(self.model(x))

    graph = export(Holder(), torch.randn(2, 3)).graph
    with pytest.raises(CutError, match="both with and without"):
        state_prefix(graph, [["model.weight", "model.bias"]])


# ---------------------------------------------------------------- the mix


PROFILE = st.sampled_from([0.0, 0.25, 0.5, 1.0]) | st.floats(0.0, 1.0, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(PROFILE, min_size=3, max_size=3), min_size=1, max_size=6))
def test_ratios_follow_the_spec_and_agree_with_the_trainer(rows: list[list[float]]) -> None:
    p = torch.tensor([sorted(r, reverse=True) for r in rows], dtype=torch.float32)
    got = ratios(p)
    assert torch.equal(got, routing_ratios(p))  # two implementations, bit for bit
    for i in range(p.shape[0]):
        assert got[i, 0] == p[i, 0]
        for k in range(1, 3):
            want = (p[i, k] / p[i, k - 1]) if p[i, k - 1] > 0 else torch.tensor(0.0)
            assert got[i, k] == want


def test_mix_is_the_identity_forward_and_scales_the_gradient() -> None:
    a = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    r = torch.tensor([0.0, 0.5, 1.0, 0.3], dtype=torch.float32)
    out = mix(a, r)
    assert torch.equal(out, a)
    g = torch.randn_like(a)
    out.backward(g)
    assert torch.equal(a.grad, r.double().reshape(4, 1, 1) * g)
    with pytest.raises(RoutingNotProven, match="batch"):
        mix(torch.zeros(3, 2), r)


def routed_grads(program: Program, boundaries: list[list[str]], x, y, profiles, losses) -> dict[str, torch.Tensor]:
    """The verifier's replay of one step: the program with its own inputs, our mix at the boundaries and outputs."""
    module = ProgramModule(program)
    torch.manual_seed(7)
    (out,) = routed_forward(program.graph, x, module.live_state(), profiles, boundaries)
    losses(out, y).mean().backward()
    return {n.removeprefix("model."): p.grad for n, p in module.named_parameters() if p.grad is not None}


def eager_grads(model: nn.Module, layout: BandLayout, x, y, profiles, losses) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)
    gate = GatedModel(model, layout)
    torch.manual_seed(7)
    losses(gate(x, profiles), y).mean().backward()
    gate.remove_hooks()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def reference_grads(model: nn.Module, layout: BandLayout, x, y, profiles, losses) -> dict[str, torch.Tensor]:
    """Definition (specs/routing.md §3.4): sum_i p[i, k] * grad_k(l_i / B), one backward per example."""
    model = copy.deepcopy(model).eval()
    band_of = resolve_bands(model, layout).band_of()
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        (losses(model(x[i:i + 1]), y[i:i + 1]).sum() / x.shape[0]).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                acc[n] += profiles[i, band_of[n]].to(p.dtype) * p.grad
    return acc


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def lm(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    b, t, v = out.shape
    return F.cross_entropy(out.reshape(b * t, v), y.reshape(b * t), reduction="none").reshape(b, t).mean(1)


@st.composite
def profile_batch(draw: st.DrawFn, batch: int, n: int) -> torch.Tensor:
    rows = [sorted((draw(PROFILE) for _ in range(n)), reverse=True) for _ in range(batch)]
    return torch.tensor(rows, dtype=torch.float32)


def check_grads(model, layout, x, y, profiles, losses, *, reference: bool = True) -> None:
    want = eager_grads(model, layout, x, y, profiles, losses)
    ref = reference_grads(model, layout, x, y, profiles, losses) if reference else None
    for program in (gated_program(model, layout, x), export(model, x)):
        b = prove(program, model, layout, x)
        got = routed_grads(program, b, x, y, profiles, losses)
        assert set(got) == set(want)
        for n in want:
            assert torch.equal(got[n], want[n]), n  # the trainer's eager gate, bit for bit
            if ref is not None:
                torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7)


@FAST
@given(chains(skips=False), st.integers(2, 5), st.data())
def test_routed_gradients_equal_the_reference_and_the_eager_gate(case, batch: int, data) -> None:
    model, layout = case
    x = torch.randn(batch, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,))
    check_grads(model, layout, x, y, data.draw(profile_batch(batch, len(layout))), ce)


def test_routed_gradients_of_a_transformer() -> None:
    model = make_transformer(3, 3)
    layout = transformer_bands(model)
    x, y = torch.randint(0, 7, (4, 5)), torch.randint(0, 7, (4, 5))
    profiles = torch.tensor([[1.0, 0.6, 0.2], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    check_grads(model, layout, x, y, profiles, lm)


def test_routed_gradients_with_dropout_match_the_eager_gate() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 5), nn.Tanh(),
                          nn.Linear(5, 3)).double()
    layout = sequential_bands(model, 3)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    profiles = torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0], [0.25, 0.25, 0.25], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    check_grads(model, layout, x, y, profiles, ce, reference=False)  # dropout masks differ per example pass


def test_an_ungated_program_is_routed_by_the_verifier() -> None:
    """Issue 10.1: the hostile trainer ships the model without its gate. The verifier's own routing
    gives a crowd example (profile [1, 0, 0]) exactly zero gradient in the deep bands, so the
    trainer's ungated band norms cannot be reproduced; an honest run's can."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    layout = sequential_bands(model, 3)
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    crowd = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    program = export(model, x)  # no gate in it
    b = prove(program, model, layout, x)
    got = routed_grads(program, b, x, y, crowd, ce)
    _, band_params = recorded(model, layout)
    for k in (1, 2):
        for n in band_params[k]:
            assert torch.count_nonzero(got[n]) == 0
    hostile = copy.deepcopy(model)
    ce(hostile(x), y).mean().backward()  # what the hostile trainer trained with
    assert any(torch.count_nonzero(p.grad) for n, p in hostile.named_parameters() if n in band_params[2])


class ForgedGate(nn.Module):
    """A program whose 'gate' ignores the profiles' ratios (passes every gradient): it sees only ones."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, profiles: torch.Tensor) -> torch.Tensor:
        return self.model(x) * (profiles[:, :1] * 0 + 1)


def test_a_forged_gate_in_the_program_changes_nothing() -> None:
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    layout = sequential_bands(model, 2)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    profiles = torch.tensor([[1.0, 0.0], [0.5, 0.25], [1.0, 1.0]])
    program = export(ForgedGate(model), x, torch.ones(3, 2, dtype=torch.float64))
    b = prove(program, model, layout, x)
    got = routed_grads(program, b, x, y, profiles, ce)
    want = eager_grads(model, layout, x, y, profiles, ce)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14)


class DetachBypass(nn.Module):
    """A hostile program: the head reads the boundary's output plus ``h - h.detach()`` of an activation
    below it. The forward value is unchanged (the difference is zero), but gradient reaches the deep
    band without crossing the boundary's mix: restricted examples would write into it unscaled."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.deep = nn.Linear(4, 4)
        self.act = nn.Tanh()
        self.head = nn.Linear(4, 3)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.deep(x)
        return self.head(self.act(h) + (h - h.detach()))


def test_a_detach_bypass_that_keeps_every_forward_value_is_refused() -> None:
    model = DetachBypass()
    layout = BandLayout([Band("head", ["head"]), Band("deep", ["deep"], "act")])
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    program = export(model, x)
    bands, band_params = recorded(model, layout)
    b = boundary_nodes(program.graph, bands, band_params)
    with pytest.raises(CutError, match=r"parameter 'deep\.(weight|bias)' of band 'deep' reaches the model output "
                                       r"without crossing boundary 'act'"):
        check_cut(program.graph, bands, band_params, b)
    # Why it matters: mixing at the boundary alone would leave a crowd example's deep gradient nonzero.
    crowd = torch.tensor([[1.0, 0.0]] * 3)
    got = routed_grads(program, b, x, y, crowd, ce)
    assert torch.count_nonzero(got["deep.weight"]) > 0


def test_the_encoder_layers_route_like_the_eager_gate() -> None:
    model = Encoder()
    layout = transformer_bands(model)
    x, y = torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (4,))
    profiles = torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.25]])
    check_grads(model, layout, x, y, profiles, ce, reference=False)  # dropout: masks differ per example pass


# ---------------------------------------------------------------- batch independence


class Tail(nn.Module):
    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], *, bn: bool = False) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4) if bn else nn.Identity()
        self.f = f
        self.register_buffer("perm", torch.tensor([1, 0, 3, 2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(self.norm(self.l(x)))


HOSTILE: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "x + x.mean(0)": (lambda: Tail(lambda h: h + h.mean(0)), r"node 'mean' \(aten\.mean\.dim\)"),
    "x[[1, 0, 3, 2]]": (lambda: _perm(), r"node 'index_select' \(aten\.index_select\.default\)"),
    "x.sum(0) broadcast": (lambda: Tail(lambda h: h.sum(0).expand(4, 4)), r"node 'sum_1' \(aten\.sum\.dim_IntList\)"),
    "train-mode BatchNorm": (lambda: Tail(lambda h: h, bn=True),
                             r"module norm: batch normalization in training mode.*GroupNorm or LayerNorm"),
    "batch into features": (lambda: Tail(lambda h: (h.reshape(2, 8) @ torch.ones(8, 8)).reshape(4, 4)),
                            r"node 'reshape' \(aten\.reshape\.default\)"),
    "rows transposed": (lambda: Tail(lambda h: h.t().contiguous().reshape(4, 4)), r"rows do not follow the examples"),
    "attention across the batch": (lambda: Tail(lambda h: F.scaled_dot_product_attention(h[None], h[None], h[None])[0]),
                                   r"aten\.scaled_dot_product_attention\.default"),
    "a Gram matrix over the batch": (lambda: Tail(lambda h: h @ (h.t() @ h)), r"node 'matmul' \(aten\.matmul\.default\)"),
    "gather across the batch": (lambda: _gathered(0), r"node 'gather' \(aten\.gather\.default\)"),
    "advanced index across the batch": (lambda: _indexed(lambda h, p: h[p]), r"value 'index', whose rows do not follow"),
    "index of rows by another row's values": (
        lambda: _indexed(lambda h, p: h[torch.arange(4)[:, None], (h[0] > 0).long()[None, :] * p[None, :]]),
        r"aten\.index\.Tensor"),
}


def _indexed(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> nn.Module:
    m = Tail(lambda h: h)
    m.f = lambda h: f(h, m.perm)  # type: ignore[assignment]
    return m


@pytest.mark.parametrize("f", [
    lambda h, p: h[:, p],  # within each row
    lambda h, p: h[torch.arange(h.shape[0])[:, None, None], torch.arange(4)[None, None, :]],  # HF's mask lookup
    lambda h, p: h[torch.arange(h.shape[0]), p[: h.shape[0]]],  # one element per row, chosen by a constant
])
def test_advanced_indexing_that_keeps_each_row_is_proved(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                                                        ) -> None:
    x = torch.randn(4, 4)
    program = export(_indexed(f), x)
    state = ProgramModule(program).live_state()
    check_batch_independent(program.graph, {program.graph.user_inputs[0]: x}, state)


def _gathered(dim: int) -> nn.Module:
    # gather along the batch dim picks other examples' rows; along features it stays in the row.
    m = Tail(lambda h: h)
    m.f = lambda h: torch.gather(h, dim, m.perm.reshape(4, 1).expand(4, 4) if dim == 0  # type: ignore[assignment]
                                 else m.perm.reshape(1, 4).expand(h.shape[0], 4))
    return m


def _perm() -> nn.Module:
    m = Tail(lambda h: h)
    m.f = lambda h: torch.index_select(h, 0, m.perm)  # type: ignore[assignment]
    return m


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_programs_that_mix_examples_are_refused(name: str) -> None:
    make, message = HOSTILE[name]
    x = torch.randn(4, 4)
    program = export(make(), x)
    state = ProgramModule(program).live_state()
    before = {n: t.clone() for n, t in state.items()}
    with pytest.raises(BatchInteraction, match=message) as info:
        check_batch_independent(program.graph, {program.graph.user_inputs[0]: x}, state)
    assert isinstance(info.value, VerificationError)
    assert all(torch.equal(before[n], state[n]) for n in before)  # the caller's buffers are untouched


class Encoder(nn.Module):
    """bench/overhead.py's TinyLM in small: torch's TransformerEncoderLayer (attention, dropout)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.tok = nn.Embedding(11, 8)
        self.pos = nn.Embedding(6, 8)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True,
                                                               norm_first=True) for _ in range(2))
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 11)
        self.register_buffer("positions", torch.arange(6), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(self.positions)
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h[:, -1]))


HONEST: dict[str, Callable[[], tuple[nn.Module, BandLayout, torch.Tensor]]] = {
    "mlp with dropout": lambda: _seq(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.2), nn.Linear(6, 3))),
    "eval BatchNorm, GroupNorm, LayerNorm": lambda: _seq(nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6).eval(), nn.GroupNorm(2, 6), nn.Linear(6, 6), nn.LayerNorm(6), nn.GELU(),
        nn.Linear(6, 3))),
    "transformer": lambda: (make_transformer(1, 2).float(), transformer_bands(make_transformer(1, 2)),
                            torch.randint(0, 7, (4, 5))),
    "encoder layers": lambda: (Encoder(), transformer_bands(Encoder()), torch.randint(0, 11, (4, 6))),
    "gather within each example": lambda: (_gather_net(), sequential_bands(_gather_net(), 2), torch.randn(4, 4)),
}


def _gather_net() -> nn.Sequential:
    torch.manual_seed(4)

    class Shuffle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("perm", torch.tensor([[1, 0, 3, 2, 5, 4]]))

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return torch.gather(h, 1, self.perm.expand(h.shape[0], 6))

    return nn.Sequential(nn.Linear(4, 6), Shuffle(), nn.ReLU(), nn.Linear(6, 3))


def _seq(model: nn.Sequential) -> tuple[nn.Module, BandLayout, torch.Tensor]:
    return model, sequential_bands(model, 2), torch.randn(4, 4)


@pytest.mark.parametrize("name", sorted(HONEST))
def test_honest_programs_are_batch_independent(name: str) -> None:
    model, layout, x = HONEST[name]()
    bands, band_params = recorded(model, layout)
    program = gated_program(model, layout, x)
    b = boundary_nodes(program.graph, bands, band_params)
    check_cut(program.graph, bands, band_params, b)
    state = ProgramModule(program).live_state()
    check_batch_independent(program.graph, program_inputs(program.graph, x, len(layout)), state, b)
    # Another batch size: the proof is per batch shape.
    x2 = x[:3]
    check_batch_independent(program.graph, program_inputs(program.graph, x2, len(layout)), state, b)


def test_a_boundary_value_must_be_batch_first() -> None:
    class Sideways(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.turn = nn.Identity()
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.a(x).t().tanh().t())

    model = Sideways()
    graph = export(model, torch.randn(4, 4)).graph
    # The boundary value chosen is the transposed activation [4, B]: not batch first.
    (t_node,) = [n for n in graph.nodes if n.op == "aten.tanh.default"]
    state = ProgramModule(export(model, torch.randn(4, 4))).live_state()
    with pytest.raises(BatchInteraction, match="value of boundary 1"):
        check_batch_independent(graph, {graph.user_inputs[0]: torch.randn(4, 4)}, state, [[], [t_node.outputs[0]]])


def test_an_op_without_a_batch_rule_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    program = export(model, torch.randn(4, 4))
    monkeypatch.delitem(batch_rows.RULES, "aten.tanh.default")
    with pytest.raises(BatchInteraction, match=r"aten\.tanh\.default, for which no batch rule"):
        check_batch_independent(program.graph, {program.graph.user_inputs[0]: torch.randn(4, 4)},
                                ProgramModule(program).live_state())


def test_every_allowlisted_op_has_a_batch_rule() -> None:
    assert {f"aten.{op}" for op in ATEN_OPS} <= set(RULES)


# ---------------------------------------------------------------- end to end (issue 10.1)


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import forging as F

    base = tmp_path_factory.mktemp("routed")
    return {"honest": F.build_demo(base / "honest", steps=3, checkpoint_every=3),
            "ungated": F.build_demo(base / "ungated", steps=3, checkpoint_every=3, ungated=True)}


def verify_routed(demo: Any) -> Any:
    """The verifier as shipped: replay runs each run's program as a ``RoutedModule``."""
    from gradledger.ledger.keys import read_public_keys
    from gradledger.verify import VerificationPolicy, Verifier

    return Verifier(read_public_keys(demo.roots), VerificationPolicy(replay="full")).verify(demo.bundle)


def test_an_honest_demo_run_verifies_with_the_verifiers_routing(demos) -> None:
    report = verify_routed(demos["honest"])
    assert report.verified, report.first_failure


def test_an_ungated_demo_run_fails_with_the_verifiers_routing(demos) -> None:
    """Issue 10.1: trained and exported with the gate off, every routing record honest, re-signed by
    the trainer. Replayed with the verifier's routing, the first step's band norms differ."""
    report = verify_routed(demos["ungated"])
    assert not report.verified
    failure = report.first_failure
    assert failure.name == "replay" and failure.step == 0, failure  # the first step (steps count from 0)
    assert "gradient norm" in failure.detail, failure.detail


def test_a_rule_that_cannot_be_applied_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail closed: an error inside a batch rule is a refusal naming the node, never a crash or a pass."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    program = export(model, torch.randn(4, 4))

    def broken(call: Any) -> Any:
        raise RuntimeError("shape rule failed")

    monkeypatch.setitem(batch_rows.RULES, "aten.tanh.default", broken)
    with pytest.raises(BatchInteraction, match=r"node 'tanh' \(aten\.tanh\.default\): its batch rule could not"):
        check_batch_independent(program.graph, {program.graph.user_inputs[0]: torch.randn(4, 4)},
                                ProgramModule(program).live_state())


def test_routed_module_proves_each_batch_shape_before_running_it() -> None:
    from gradledger.verify._internal.routed import RoutedModule

    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    layout = sequential_bands(model, 2)
    settings = dict(zip(("bands", "band_params"), recorded(model, layout)))
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    profiles = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 1.0], [0.0, 0.0]])
    module = RoutedModule(gated_program(model, layout, x), settings)
    ce(module(x, profiles), y).mean().backward()
    want = eager_grads(model, layout, x, y, profiles, ce)
    for n, p in module.named_parameters():
        assert torch.equal(p.grad, want[n.removeprefix("model.")])
    module(x[:3], profiles[:3])
    assert module._proved == {((4, 4), torch.float64), ((3, 4), torch.float64)}
    with pytest.raises(RoutingNotProven, match="profiles of shape"):
        module(x, profiles[:, :1])

    class Leaky(nn.Module):  # mixes the batch after the boundary: refused at the first forward
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inner(x)
            return h + h.mean(0)

    leaky = Leaky()
    leaky_layout = BandLayout([Band("head", ["inner.2"]), Band("deep", ["inner.0"], "inner.1")])
    leaky_settings = dict(zip(("bands", "band_params"), recorded(leaky, leaky_layout)))
    routed = RoutedModule(export(leaky, x), leaky_settings)
    with pytest.raises(BatchInteraction, match="node 'mean'"):
        routed(x, profiles)
