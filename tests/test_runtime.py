"""training/runtime.py: a governed run turns torch's NaN fill of fresh allocations off while it trains (a
cost of every step under deterministic algorithms) and restores the caller's setting when it ends; a run
trained so still verifies bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.utils.deterministic as tud
from torch import nn

from gradledger.training.runtime import no_uninitialized_fill
from gradledger.training.trainer import Governance
from test_idioms import assert_verified, governed, verify


@pytest.mark.parametrize("before", [True, False])
def test_the_fill_is_off_inside_and_restored_after(before: bool) -> None:
    tud.fill_uninitialized_memory = before
    try:
        with no_uninitialized_fill():
            assert tud.fill_uninitialized_memory is False
        assert tud.fill_uninitialized_memory is before
        with pytest.raises(RuntimeError, match="boom"), no_uninitialized_fill():
            raise RuntimeError("boom")
        assert tud.fill_uninitialized_memory is before
    finally:
        tud.fill_uninitialized_memory = True  # torch's default


def test_a_run_trains_without_the_fill_verifies_and_restores_it(tmp_path: Path) -> None:
    seen: list[bool] = []

    def loop(model: nn.Module, opt: torch.optim.Optimizer, loader: Any, run: Governance) -> None:
        while run.step < 4:
            for x, y in loader:
                opt.zero_grad()
                seen.append(tud.fill_uninitialized_memory)
                F.cross_entropy(model(x), y).backward()
                opt.step()
                if run.step >= 4:
                    break

    assert tud.fill_uninitialized_memory is True
    led = governed(tmp_path / "l", loop)
    assert seen == [False] * 4
    assert tud.fill_uninitialized_memory is True
    assert_verified(*verify(led, tmp_path))
