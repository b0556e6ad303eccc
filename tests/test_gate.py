"""Bands and the depth-selective gate, checked against separate per-example backward passes.

The reference for every property is the definition in specs/routing.md: band k's
gradient is sum_i profiles[i, k] * d(loss_i / B)/d(theta_k), computed here one
example at a time. The gate must produce it from one batched forward and backward.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradledger.training.bands import (
    Band,
    BandLayout,
    prefix_matches,
    resolve_bands,
    sequential_bands,
    transformer_bands,
)
from gradledger.training.errors import BandError, GovernanceError
from gradledger.training.gate import (
    GatedModel,
    band_grad_norms,
    check_routing,
    clip_bands,
    export_gated,
    routing_ratios,
    validate_profiles,
)

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
# float64 models: the only difference between the gate and the reference is
# summation order and the telescoped ratios, both a few ulps.
TOL = dict(rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- models


def make_mlp(seed: int, widths: list[int], acts: list[str]) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2 and acts[i] != "none":
            layers.append(nn.Tanh() if acts[i] == "tanh" else nn.ReLU())
    return nn.Sequential(*layers).double()


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        hd = d // self.heads
        q, k, v = (z.reshape(b, t, self.heads, hd).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(torch.tanh(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Embeddings, a ModuleList of residual blocks, final LayerNorm + head: the shape transformer_bands expects."""

    def __init__(self, vocab: int, d: int, n_blocks: int, max_t: int, heads: int = 2) -> None:
        super().__init__()
        self.pos_emb = nn.Parameter(torch.randn(max_t, d) * 0.1)
        self.tok_emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(n_blocks))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def make_transformer(seed: int, n_blocks: int, vocab: int = 7, d: int = 4, max_t: int = 5) -> TinyTransformer:
    torch.manual_seed(seed)
    model = TinyTransformer(vocab, d, n_blocks, max_t).double()
    # LayerNorm affine params start at 1/0; perturb so their gradients are generic.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


# ---------------------------------------------------------------- losses


def mlp_losses(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def lm_losses(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    b, t, v = out.shape
    return F.cross_entropy(out.reshape(b * t, v), y.reshape(b * t), reduction="none").reshape(b, t).mean(1)


# ---------------------------------------------------------------- strategies

# Exact 0, 1 and dyadic values make the telescoped ratios exact; the free floats do not.
MULT = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.25]), st.floats(0.0, 1.0, allow_nan=False))


@st.composite
def profile_rows(draw: st.DrawFn, batch: int, n_bands: int) -> torch.Tensor:
    rows = [sorted((draw(MULT) for _ in range(n_bands)), reverse=True) for _ in range(batch)]
    return torch.tensor(rows, dtype=torch.float64)


@st.composite
def mlp_case(draw: st.DrawFn) -> tuple[nn.Sequential, BandLayout, torch.Tensor, torch.Tensor, torch.Tensor]:
    n_bands = draw(st.integers(2, 4))
    n_linear = draw(st.integers(n_bands, n_bands + 2))
    widths = [draw(st.integers(1, 6)) for _ in range(n_linear)] + [draw(st.integers(2, 5))]
    acts = [draw(st.sampled_from(["tanh", "relu", "none"])) for _ in range(n_linear - 1)]
    model = make_mlp(draw(st.integers(0, 2**16)), widths, acts)
    batch = draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(batch, widths[0], generator=gen, dtype=torch.float64)
    y = torch.randint(0, widths[-1], (batch,), generator=gen)
    profiles = draw(profile_rows(batch, n_bands))
    return model, sequential_bands(model, n_bands), x, y, profiles


@st.composite
def transformer_case(draw: st.DrawFn) -> tuple[TinyTransformer, BandLayout, torch.Tensor, torch.Tensor, torch.Tensor]:
    n_blocks = draw(st.integers(2, 4))
    model = make_transformer(draw(st.integers(0, 2**16)), n_blocks)
    layout = transformer_bands(model, lower_blocks=draw(st.integers(1, n_blocks - 1)))
    batch = draw(st.integers(1, 6))
    t = draw(st.integers(1, 5))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randint(0, 7, (batch, t), generator=gen)
    y = torch.randint(0, 7, (batch, t), generator=gen)
    return model, layout, x, y, draw(profile_rows(batch, 3))


# ---------------------------------------------------------------- helpers


def band_grads(model: nn.Module, bands) -> list[list[torch.Tensor]]:
    return [[torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in ps] for ps in bands.params]


def gated_grads(model, layout, x, y, profiles, losses, weights=None):
    model.zero_grad(set_to_none=True)
    gated = GatedModel(model, layout)
    per_ex = losses(gated(x, profiles), y)
    loss = per_ex.mean() if weights is None else (per_ex * weights).sum()
    loss.backward()
    out = band_grads(model, gated.bands)
    gated.remove_hooks()
    return out


def reference_grads(model, layout, x, y, profiles, losses) -> list[list[torch.Tensor]]:
    """Separate per-example backward passes through the ungated model."""
    bands = resolve_bands(model, layout)
    flat = [p for ps in bands.params for p in ps]
    acc = [torch.zeros_like(p) for p in flat]
    owner = [k for k, ps in enumerate(bands.params) for _ in ps]
    batch = x.shape[0]
    for i in range(batch):
        loss_i = losses(model(x[i : i + 1]), y[i : i + 1]).sum() / batch
        gs = torch.autograd.grad(loss_i, flat, allow_unused=True)
        for j, g in enumerate(gs):
            if g is not None:
                acc[j] += profiles[i, owner[j]] * g
    out, j = [], 0
    for ps in bands.params:
        out.append(acc[j : j + len(ps)])
        j += len(ps)
    return out


def assert_grads_close(got, want, **tol) -> None:
    for gb, wb in zip(got, want):
        for g, w in zip(gb, wb):
            torch.testing.assert_close(g, w, **(tol or TOL))


def check_against_reference(model, layout, x, y, profiles, losses) -> None:
    ref = reference_grads(model, layout, x, y, profiles, losses)
    got = gated_grads(model, layout, x, y, profiles, losses)
    assert_grads_close(got, ref)


def check_forward_identity(model, layout, x, profiles) -> None:
    with torch.no_grad():
        plain = model(x)
    gated = GatedModel(model, layout)
    out = gated(x, profiles)
    gated.remove_hooks()
    assert torch.equal(out, plain)


def check_zero_stops(model, layout, x, y, profiles, losses, alt_x, alt_y) -> None:
    """An example whose multiplier for band k is 0 contributes exactly nothing to bands >= k."""
    n = profiles.shape[1]
    for i in range(x.shape[0]):
        zeros = (profiles[i] == 0).nonzero().flatten().tolist()
        if not zeros:
            continue
        k = zeros[0]
        # (a) example i alone carries loss weight: deeper bands get exact zeros.
        w = torch.zeros(x.shape[0], dtype=torch.float64)
        w[i] = 1.0
        got = gated_grads(model, layout, x, y, profiles, losses, weights=w)
        for band in range(k, n):
            for g in got[band]:
                assert torch.count_nonzero(g) == 0
        # (b) swapping example i for a different one leaves deeper bands bit-identical.
        base = gated_grads(model, layout, x, y, profiles, losses)
        x2, y2 = x.clone(), y.clone()
        x2[i], y2[i] = alt_x, alt_y
        swapped = gated_grads(model, layout, x2, y2, profiles, losses)
        for band in range(k, n):
            for g1, g2 in zip(base[band], swapped[band]):
                assert torch.equal(g1, g2)


# ---------------------------------------------------------------- properties


@SETTINGS
@given(mlp_case())
def test_mlp_gate_matches_per_example_reference(case) -> None:
    model, layout, x, y, profiles = case
    check_against_reference(model, layout, x, y, profiles, mlp_losses)
    check_forward_identity(model, layout, x, profiles)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transformer_case())
def test_transformer_gate_matches_per_example_reference(case) -> None:
    model, layout, x, y, profiles = case
    check_against_reference(model, layout, x, y, profiles, lm_losses)
    check_forward_identity(model, layout, x, profiles)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mlp_case(), st.data())
def test_mlp_zero_multiplier_stops_deeper_bands(case, data) -> None:
    model, layout, x, y, profiles = case
    alt_x = torch.tensor(data.draw(st.lists(st.floats(-3, 3), min_size=x.shape[1], max_size=x.shape[1])))
    alt_y = torch.tensor(data.draw(st.integers(0, model[-1].out_features - 1)))
    check_zero_stops(model, layout, x, y, profiles, mlp_losses, alt_x.double(), alt_y)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transformer_case(), st.data())
def test_transformer_zero_multiplier_stops_deeper_bands(case, data) -> None:
    model, layout, x, y, profiles = case
    t = x.shape[1]
    alt_x = torch.tensor(data.draw(st.lists(st.integers(0, 6), min_size=t, max_size=t)))
    alt_y = torch.tensor(data.draw(st.lists(st.integers(0, 6), min_size=t, max_size=t)))
    check_zero_stops(model, layout, x, y, profiles, lm_losses, alt_x, alt_y)


@settings(max_examples=20, deadline=None)
@given(mlp_case(), st.lists(st.one_of(st.none(), st.floats(0.0, 2.0)), min_size=4, max_size=4))
def test_clip_bands_clips_routed_gradient_per_band(case, raw_limits) -> None:
    model, layout, x, y, profiles = case
    n = len(layout)
    limits = raw_limits[:n]
    ref = reference_grads(model, layout, x, y, profiles, mlp_losses)
    gated_grads(model, layout, x, y, profiles, mlp_losses)
    bands = resolve_bands(model, layout)
    before = band_grads(model, bands)
    norms = band_grad_norms(model, layout)
    assert clip_bands(model, layout, limits) == norms
    after = band_grads(model, bands)
    for k in range(n):
        ref_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref[k]])).item()
        assert norms[k] == pytest.approx(ref_norm, rel=1e-9, abs=1e-12)
        if limits[k] is None or limits[k] / (norms[k] + 1e-6) >= 1.0:
            for a, b in zip(after[k], before[k]):
                assert torch.equal(a, b)
        else:
            coef = limits[k] / (norms[k] + 1e-6)
            for a, b in zip(after[k], before[k]):
                torch.testing.assert_close(a, b * coef, **TOL)
            assert band_grad_norms(model, layout)[k] <= limits[k] + 1e-9


def test_clip_bands_matches_clip_grad_norm_per_band() -> None:
    model = make_mlp(3, [4, 5, 5, 3], ["tanh", "relu"])
    layout = sequential_bands(model, 3)
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    profiles = torch.tensor([[1.0, 0.5, 0.2]] * 5, dtype=torch.float64)
    other = copy.deepcopy(model)
    gated_grads(model, layout, x, y, profiles, mlp_losses)
    gated_grads(other, layout, x, y, profiles, mlp_losses)
    limits = [0.05, None, 0.01]
    norms = clip_bands(model, layout, limits)
    bands_o = resolve_bands(other, layout)
    for k, limit in enumerate(limits):
        if limit is not None:
            total = torch.nn.utils.clip_grad_norm_(list(bands_o.params[k]), limit)
            assert norms[k] == pytest.approx(total.item(), rel=1e-12)
    assert_grads_close(band_grads(model, resolve_bands(model, layout)), band_grads(other, bands_o))


def test_same_run_twice_is_bit_identical() -> None:
    runs = []
    for _ in range(2):
        model = make_transformer(11, 3)
        layout = transformer_bands(model)
        gen = torch.Generator().manual_seed(5)
        x = torch.randint(0, 7, (4, 5), generator=gen)
        y = torch.randint(0, 7, (4, 5), generator=gen)
        profiles = torch.tensor(
            [[1.0, 0.7, 0.3], [0.9, 0.0, 0.0], [1.0, 1.0, 1.0], [0.33, 0.2, 0.1]], dtype=torch.float64
        )
        grads = gated_grads(model, layout, x, y, profiles, lm_losses)
        runs.append((grads, clip_bands(model, layout, [0.5, 0.1, 0.01])))
    (g1, n1), (g2, n2) = runs
    assert n1 == n2
    for b1, b2 in zip(g1, g2):
        for a, b in zip(b1, b2):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- export


def _exported_grads(module: nn.Module, x, y, profiles, losses) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    losses(module(x, profiles), y).mean().backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_export_round_trip(kind: str) -> None:
    if kind == "mlp":
        model = make_mlp(7, [3, 6, 5, 4, 3], ["tanh", "relu", "tanh"])
        layout = sequential_bands(model, 3)
        x = torch.randn(4, 3, dtype=torch.float64)
        y = torch.randint(0, 3, (4,))
        losses = mlp_losses
    else:
        model = make_transformer(7, 3)
        layout = transformer_bands(model)
        x = torch.randint(0, 7, (4, 5))
        y = torch.randint(0, 7, (4, 5))
        losses = lm_losses
    profiles = torch.tensor(
        [[1.0, 0.6, 0.2], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64
    )
    eager_model = copy.deepcopy(model)
    eager = GatedModel(eager_model, layout)
    ep = export_gated(GatedModel(model, layout), x, profiles)
    exported = ep.module()

    assert torch.equal(exported(x, profiles), eager(x, profiles))
    want = _exported_grads(eager, x, y, profiles, losses)
    got = _exported_grads(exported, x, y, profiles, losses)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)

    # The batch is symbolic: another batch size runs through the same program.
    x3, y3, p3 = x[:3], y[:3], profiles[1:4]
    assert torch.equal(exported(x3, p3), eager(x3, p3))
    for name, g in _exported_grads(exported, x3, y3, p3, losses).items():
        torch.testing.assert_close(g, _exported_grads(eager, x3, y3, p3, losses)[name], rtol=0, atol=0)


def test_export_needs_a_batch_of_two_for_a_symbolic_batch() -> None:
    model = make_mlp(2, [3, 4, 2], ["relu"])
    gated = GatedModel(model, sequential_bands(model, 2))
    with pytest.raises(GovernanceError, match="at least 2"):
        export_gated(gated, torch.randn(1, 3, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))


def test_export_of_plain_gated_model_with_torch_export() -> None:
    model = make_mlp(2, [3, 4, 4, 2], ["relu", "tanh"])
    gated = GatedModel(model, sequential_bands(model, 2))
    x = torch.randn(3, 3, dtype=torch.float64)
    p = torch.tensor([[1.0, 0.0], [0.5, 0.25], [1.0, 1.0]], dtype=torch.float64)
    ep = torch.export.export(gated, (x, p))
    assert torch.equal(ep.module()(x, p), gated(x, p))


# ---------------------------------------------------------------- layouts


def test_prefix_matches_at_dot_boundaries() -> None:
    assert prefix_matches("0", "0.weight")
    assert prefix_matches("blocks.1", "blocks.1.ln.weight")
    assert prefix_matches("pos_emb", "pos_emb")
    assert not prefix_matches("1", "10.weight")
    assert not prefix_matches("blocks.1", "blocks.10.weight")


def test_prefix_does_not_capture_longer_sibling() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)]).double()
    layout = BandLayout(
        [Band("head", ["10"]), Band("body", [str(i) for i in range(1, 10)], "9"), Band("deep", ["0"], "0")]
    )
    bands = resolve_bands(model, layout)
    assert bands.param_names[0] == ("10.weight", "10.bias")
    assert bands.param_names[2] == ("0.weight", "0.bias")


def test_uncovered_parameter_is_named() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3), nn.Linear(3, 2))
    layout = BandLayout([Band("head", ["3"]), Band("deep", ["0"], "1")])
    with pytest.raises(BandError, match=r"no band.*2\.weight.*"):
        resolve_bands(model, layout)


def test_overlapping_bands_are_named() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    layout = BandLayout([Band("head", ["1", "0.bias"]), Band("deep", ["0"], "0")])
    with pytest.raises(BandError, match=r"more than one band.*0\.bias"):
        resolve_bands(model, layout)


def test_unmatched_prefix_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    layout = BandLayout([Band("head", ["1"]), Band("deep", ["0", "encoder"], "0")])
    with pytest.raises(BandError, match="'encoder' matches no parameter"):
        resolve_bands(model, layout)


def test_tied_weights_across_bands_are_an_error() -> None:
    model = make_transformer(0, 2)
    model.head.weight = model.tok_emb.weight  # weight tying: one tensor, two depths
    with pytest.raises(BandError, match="tied"):
        GatedModel(model, transformer_bands(model))


def test_frozen_parameters_need_no_band() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3), nn.Linear(3, 2))
    model[2].requires_grad_(False)
    bands = resolve_bands(model, BandLayout([Band("head", ["3"]), Band("deep", ["0"], "1")]))
    assert bands.param_names == (("3.weight", "3.bias"), ("0.weight", "0.bias"))


@pytest.mark.parametrize(
    "bands, msg",
    [
        ([], "at least one band"),
        ([Band("head", ["1"], "1")], "head band"),
        ([Band("head", ["1"]), Band("deep", ["0"])], "needs a boundary"),
        ([Band("head", ["1"]), Band("head", ["0"], "0")], "duplicate"),
        ([Band("head", [""]), Band("deep", ["0"], "0")], "invalid prefix"),
        ([Band("head", ["1"]), Band("deep", ["0"], "nope")], "not found"),
    ],
)
def test_malformed_layouts(bands, msg) -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    with pytest.raises(BandError, match=msg):
        resolve_bands(model, BandLayout(bands))


def test_sequential_defaults() -> None:
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 2)
    )
    layout = sequential_bands(model, 3)
    assert layout.names == ("head", "mid", "embedding")
    # 4 parameterized children in 3 bands: the deepest takes the extra one.
    assert [b.prefixes for b in layout.bands] == [("6",), ("5",), ("1", "3")]
    # Boundaries are the activation after each band's last layer.
    assert [b.boundary for b in layout.bands] == [None, "5", "4"]
    assert BandLayout.from_obj(layout.to_obj()) == layout
    with pytest.raises(BandError):
        sequential_bands(model, 5)


def test_transformer_defaults() -> None:
    model = make_transformer(0, 4)
    layout = transformer_bands(model)
    assert layout.bands[0] == Band("head", ["ln_f", "head"])
    assert layout.bands[1] == Band("mid", ["blocks.2", "blocks.3"], "blocks.3")
    assert layout.bands[2] == Band("embedding", ["pos_emb", "tok_emb", "blocks.0", "blocks.1"], "blocks.1")
    custom = transformer_bands(model, lower_blocks=1, embedding_prefixes=["pos_emb", "tok_emb"])
    assert custom.bands[2] == Band("embedding", ["pos_emb", "tok_emb", "blocks.0"], "blocks.0")
    with pytest.raises(BandError):
        transformer_bands(make_transformer(0, 1))


def test_check_routing_accepts_defaults_and_rejects_bypass() -> None:
    model = make_transformer(1, 3)
    check_routing(GatedModel(model, transformer_bands(model)), torch.randint(0, 7, (2, 4)))
    mlp = make_mlp(1, [3, 4, 4, 2], ["tanh", "relu"])
    check_routing(GatedModel(mlp, sequential_bands(mlp, 3)), torch.randn(2, 3, dtype=torch.float64))

    # Boundary placed inside the shallower band: "mid" params sit below it.
    with pytest.raises(BandError, match="share the boundary"):
        BandLayout([Band("head", ["4"]), Band("mid", ["2"], "3"), Band("embedding", ["0"], "3")])
    # mid's boundary placed below mid's own layer: mid's parameters bypass it.
    wrong = BandLayout([Band("head", ["4"]), Band("mid", ["2"], "1"), Band("embedding", ["0"], "0")])
    with pytest.raises(BandError, match="lies below that boundary|bypasses"):
        check_routing(GatedModel(mlp, wrong), torch.randn(2, 3, dtype=torch.float64))

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h) + h  # the deep band reaches the output around the head

    skip = Skip().double()
    # Every path from "a" crosses a's output, so this layout is sound despite the skip.
    check_routing(GatedModel(skip, BandLayout([Band("head", ["b"]), Band("deep", ["a"], "a")])), torch.randn(2, 2, dtype=torch.float64))


def test_check_routing_flags_a_real_bypass() -> None:
    class Bypass(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Linear(2, 2)
            self.body = nn.Linear(2, 2)
            self.head = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            e = self.emb(x)
            return self.head(self.body(e)) + e  # emb reaches the output without crossing body

    model = Bypass().double()
    layout = BandLayout([Band("head", ["head"]), Band("body", ["body"], "body"), Band("emb", ["emb"], "emb")])
    with pytest.raises(BandError, match="bypasses"):
        check_routing(GatedModel(model, layout), torch.randn(3, 2, dtype=torch.float64))


def test_boundary_must_run_once() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(self.a(x)))

    gated = GatedModel(Twice(), BandLayout([Band("head", ["b"]), Band("deep", ["a"], "a")]))
    with pytest.raises(BandError, match="ran 2 times"):
        gated(torch.randn(2, 2), torch.ones(2, 2))


# ---------------------------------------------------------------- profiles


def test_ratios_and_zero_case() -> None:
    p = torch.tensor([[1.0, 0.5, 0.25], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.8, 0.8, 0.8]], dtype=torch.float64)
    r = routing_ratios(p)
    want = torch.tensor([[1.0, 0.5, 0.5], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.8, 1.0, 1.0]], dtype=torch.float64)
    assert torch.equal(r, want)


@pytest.mark.parametrize(
    "rows",
    [[[0.5, 0.6]], [[1.5, 1.0]], [[-0.1, -0.2]], [[float("nan"), 0.0]], [[1.0, 0.5, 0.2]]],
)
def test_bad_profiles_are_refused(rows) -> None:
    with pytest.raises(GovernanceError):
        validate_profiles(torch.tensor(rows), 2)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    gated = GatedModel(model, sequential_bands(model, 2))
    with pytest.raises(GovernanceError):
        gated(torch.randn(len(rows), 2), torch.tensor(rows))


def test_hooks_are_inert_outside_the_gate() -> None:
    model = make_mlp(4, [3, 4, 2], ["tanh"])
    gated = GatedModel(model, sequential_bands(model, 2))
    x = torch.randn(2, 3, dtype=torch.float64)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    gated(x, torch.ones(2, 2, dtype=torch.float64)).sum().backward()
    for p, g in zip(model.parameters(), plain):
        assert torch.equal(p.grad, g)


def test_deepcopy_of_the_gate_routes_on_its_own_copy() -> None:
    model = make_transformer(9, 2)
    gated = GatedModel(model, transformer_bands(model))
    twin = copy.deepcopy(gated)
    x = torch.randint(0, 7, (3, 4))
    y = torch.randint(0, 7, (3, 4))
    p = torch.tensor([[1.0, 0.5, 0.0], [0.7, 0.7, 0.2], [0.0, 0.0, 0.0]], dtype=torch.float64)
    for g in (gated, twin):
        lm_losses(g(x, p), y).mean().backward()
    for a, b in zip(gated.model.parameters(), twin.model.parameters()):
        assert a is not b
        assert torch.equal(a.grad, b.grad)
