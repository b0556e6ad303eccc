"""training/loss_grad.py computes the run's loss and its output gradient without the autograd engine; the
recorder compares that gradient bit for bit with the user's, so it must be autograd's, bit for bit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gradledger.training.loss_grad import direct_loss_grads
from gradledger.training.registry import example_loss_function

CE = {"reduction": "mean", "label_smoothing": 0.0}
NLL = {"reduction": "mean"}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64 if t.dtype == torch.float64 else torch.int32)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 65), classes=st.integers(2, 300),
       double=st.booleans(), scale=st.sampled_from([1e-4, 1.0, 40.0, 1e4]), nll=st.booleans(), k=st.integers(2, 8))
def test_equals_autograd_bit_for_bit(seed: int, batch: int, classes: int, double: bool, scale: float, nll: bool,
                                     k: int) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    out = torch.randn(batch, classes, generator=g, dtype=dtype) * scale
    if nll:
        out = torch.log_softmax(out, 1)
    labels = torch.randint(0, classes, (batch,), generator=g)
    name, settings_ = ("nll_loss", NLL) if nll else ("cross_entropy", CE)
    got = direct_loss_grads(name, settings_, out, labels, [1, k])
    assert got is not None
    loss, grads, per_example = got
    leaf = out.clone().requires_grad_()
    want_loss = getattr(F, name)(leaf, labels)
    assert torch.equal(_bits(loss), _bits(want_loss.detach()))
    # Each example's loss: what the registry's reduction="none" function gives, bit for bit.
    want_each = example_loss_function(name, settings_)(out, labels)
    assert per_example.dtype == want_each.dtype and torch.equal(_bits(per_example), _bits(want_each))
    for d, grad in zip([1, k], grads):
        (want,) = torch.autograd.grad(want_loss / d if d != 1 else want_loss, leaf, retain_graph=True)
        assert grad.dtype == want.dtype and torch.equal(_bits(grad), _bits(want))


def test_a_changed_gradient_is_told_apart() -> None:
    # The comparison the recorder makes: another loss's gradient (label smoothing) is not the plain one.
    out = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8) % 5
    got = direct_loss_grads("cross_entropy", CE, out, labels, [1])
    assert got is not None
    leaf = out.clone().requires_grad_()
    (smoothed,) = torch.autograd.grad(F.cross_entropy(leaf, labels, label_smoothing=0.1), leaf)
    assert not torch.equal(got[1][0], smoothed)


def test_other_cases_take_the_autograd_path() -> None:
    out, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert direct_loss_grads("cross_entropy", {"reduction": "mean", "label_smoothing": 0.1}, out, labels, [1]) is None
    assert direct_loss_grads("cross_entropy", CE, out.to(torch.bfloat16), labels, [1]) is None
    assert direct_loss_grads("cross_entropy", CE, torch.randn(4, 3, 2), labels, [1]) is None
    assert direct_loss_grads("cross_entropy", CE, out, labels.to(torch.int32), [1]) is None
    assert direct_loss_grads("mse_loss", {"reduction": "mean"}, out, labels, [1]) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert direct_loss_grads("cross_entropy", CE, out, labels, [1]) is None
