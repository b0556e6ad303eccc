"""Every example's loss in each GovernedUpdate (training format 4, specs/training.md §3.1; issue 12):
recorded from the step's own forward, bit for bit what the run's loss gives with reduction "none",
checked value by value by the verifier's replay, and a forged value, length or absence is caught."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradledger.training.updates import example_loss_bytes
from gradledger.verify._internal.example_losses import (ExampleLossesInvalid, check_example_losses,
                                                        decode_example_losses)
from test_idioms import assert_caught, assert_verified, governed, updates, verify

STEPS = 4


def _recording_loop(seen: list[torch.Tensor], k: int = 1, autocast: bool = False, smoothing: float = 0.0) -> Any:
    """The user's loop; it keeps what F.cross_entropy(..., reduction="none") gives on each forward's output."""
    def loop(model: nn.Module, opt: torch.optim.Optimizer, loader: Any, run: Any) -> None:
        it = iter(loader)
        while run.step < STEPS:
            opt.zero_grad()
            each = []
            for _ in range(k):
                x, y = next(it)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    out = model(x)
                    loss = F.cross_entropy(out, y, label_smoothing=smoothing)
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    each.append(F.cross_entropy(out, y, label_smoothing=smoothing, reduction="none").float())
                (loss / k if k > 1 else loss).backward()
            opt.step()
            seen.append(torch.cat(each))
    return loop


@pytest.mark.parametrize("k, autocast, smoothing", [(1, False, 0.0), (2, False, 0.1), (1, True, 0.0)],
                         ids=["plain", "accumulation-smoothing", "bf16-autocast"])
def test_each_examples_loss_is_recorded_and_verifies(tmp_path: Path, k: int, autocast: bool, smoothing: float) -> None:
    seen: list[torch.Tensor] = []
    kw = {"loss_settings": {"label_smoothing": smoothing}} if smoothing else {}
    led = governed(tmp_path / "ledger", _recording_loop(seen, k, autocast, smoothing), **kw)
    ups = updates(led)
    assert len(ups) == STEPS == len(seen)
    for body, want in zip(ups, seen):
        got = decode_example_losses(body["example_losses"])
        assert len(got) == len(body["batch"]) and len(body["example_losses"]) == 4 * len(body["batch"])
        assert got == want.tolist()  # bit for bit: binary32 values as exact floats
    assert_verified(*verify(led, tmp_path))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One plain format-4 run's ledger (its run closed), shared by the forgeries below."""
    return governed(tmp_path_factory.mktemp("plain") / "ledger", _recording_loop([]))


def _nudge(data: bytes, i: int) -> bytes:
    """The binary32 at ``i`` moved by one unit in the last place: the smallest lie there is."""
    (v,) = struct.unpack_from("<I", data, 4 * i)
    return data[: 4 * i] + struct.pack("<I", v + 1) + data[4 * i + 4:]


def test_a_forged_example_loss_fails_naming_step_and_example(plain_run: Any, tmp_path: Path) -> None:
    led = plain_run
    ups = updates(led)

    def forge(f: Any) -> None:
        seq = f.seqs("GovernedUpdate")[2]
        f.set(seq, ("example_losses",), _nudge(f.body(seq)["example_losses"], 5))

    code, report = verify(led, tmp_path, forge)
    assert_caught(code, report, "step 2", f"example {ups[2]['batch'][5]}")


@pytest.mark.parametrize("change, words", [
    (lambda b: b[:-4], "4 for each"),
    (lambda b: b + b[:4], "4 for each"),
    (lambda b: b[:4] + struct.pack("<f", float("nan")) + b[8:], "not finite"),
], ids=["short", "long", "nan"])
def test_a_malformed_example_losses_fails(plain_run: Any, tmp_path: Path, change: Any, words: str) -> None:
    led = plain_run

    def forge(f: Any) -> None:
        seq = f.seqs("GovernedUpdate")[1]
        f.set(seq, ("example_losses",), change(f.body(seq)["example_losses"]))

    assert_caught(*verify(led, tmp_path, forge), "example_losses", words)


def test_dropping_the_field_from_a_format_4_run_fails(plain_run: Any, tmp_path: Path) -> None:
    led = plain_run
    assert_caught(*verify(led, tmp_path, lambda f: f.delete(f.seqs("GovernedUpdate")[0], ("example_losses",))),
                  "example_losses is missing")


def test_claiming_an_older_format_to_skip_the_check_fails(plain_run: Any, tmp_path: Path) -> None:
    # A run relabeled format 2 keeps records with example_losses, which format 2 has not.
    led = plain_run

    def forge(f: Any) -> None:
        rs = f.seqs("RunStarted")[-1]
        f.set(rs, ("settings", "format"), 2)

    assert_caught(*verify(led, tmp_path, forge))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=40),
                min_size=1, max_size=4))
def test_the_encoding_round_trips_through_the_verifiers_decoder(micro: list[list[float]]) -> None:
    """The trainer's encoder and the verifier's decoder (two implementations) agree on every binary32,
    micro-batches concatenated in order; the checker accepts exactly 4 bytes per index."""
    tensors = [torch.tensor(m, dtype=torch.float32) for m in micro]
    data = example_loss_bytes(tensors)
    flat = [v for m in micro for v in m]
    assert decode_example_losses(data) == flat and len(data) == 4 * len(flat)
    step = {"batch": list(range(len(flat))), "example_losses": data}
    check_example_losses(step, 4)
    with pytest.raises(ExampleLossesInvalid):
        check_example_losses({**step, "batch": step["batch"] + [0]}, 4)
    with pytest.raises(ExampleLossesInvalid):
        check_example_losses(step, 3)
