"""Checkpoint artifacts written by gradledger's own serializer (training/checkpoints.py ``serialize``):
specs/training.md §4 says the bytes are ``safetensors.torch.save(tensors, metadata)``'s, so they are
compared with safetensors' own output, byte for byte, for every dtype the table lays out; the tensor
digests taken from the buffer equal those taken from the tensors; a dtype outside the table falls back
to safetensors itself, with the same checkpoint."""

from __future__ import annotations

import json

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from torch import nn

from gradledger.training.checkpoints import (
    SCALARS_KEY, _SAFETENSORS_DTYPES, CheckpointData, make_checkpoint, raw_digest, read_checkpoint, serialize,
    start_checkpoint, tensor_digest,
)

DTYPES = [d for d, _ in _SAFETENSORS_DTYPES]
#: Names as state dicts and optimizers make them, and the characters JSON must escape or keep as UTF-8.
NAME = st.text(st.sampled_from(list("abz09._") + ["é", "\"", "\\", "\x01", "\n", "/", "€"]), min_size=1, max_size=8)


def _tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    """Random bits of ``dtype`` (NaNs and all: bytes are compared, not values)."""
    count = 1
    for s in shape:
        count *= s
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    size = torch.empty((), dtype=dtype).element_size()
    data = torch.randint(0, 256, (count * size,), generator=g, dtype=torch.uint8)
    return (data % 2 == 1 if dtype == torch.bool else data.view(dtype)).reshape(shape)


STATES = st.dictionaries(
    NAME,
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3), st.integers(0, 2**31)),
    min_size=1, max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(STATES, st.dictionaries(NAME, st.sampled_from(["bool", "int", "float"]), max_size=3))
def test_the_bytes_are_safetensors_own_and_the_digests_the_tensors(spec: dict, scalars: dict) -> None:
    tensors = {name: _tensor(dtype, shape, seed) for name, (dtype, shape, seed) in spec.items()}
    metadata = {SCALARS_KEY: json.dumps(scalars, sort_keys=True)}
    built = serialize(tensors, metadata)
    assert built is not None
    data, entries = built
    assert bytes(data) == st_save(tensors, metadata=metadata)
    assert sorted(e.name for e in entries) == sorted(tensors)
    for e in entries:
        assert raw_digest(e.dtype, e.shape, memoryview(data)[e.start : e.end]) == tensor_digest(tensors[e.name])


def test_a_dtype_outside_the_table_falls_back_to_safetensors() -> None:
    fnuz = torch.float8_e4m3fnuz  # safetensors writes it; where it sorts is not in the table
    assert serialize({"a": torch.ones(3), "q": torch.zeros(2, dtype=fnuz)}, {}) is None
    model = nn.Linear(2, 2)
    model.register_buffer("q", torch.ones(2).to(fnuz))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    made = start_checkpoint(3, model, opt).finish()
    assert isinstance(made, CheckpointData) and made.step == 3
    tensors, scalars = read_checkpoint(bytes(made.data), made.body(b"\0" * 32))
    assert tensors["model.q"].dtype == fnuz and torch.equal(tensors["model.weight"], model.weight.detach())


def test_a_checkpoint_of_a_model_reads_back_as_it_was_recorded() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    made = make_checkpoint(1, model, opt)
    tensors, scalars = read_checkpoint(bytes(made.data), made.body(b"\0" * 32))
    assert tensors.keys() == made.digests.keys() and "optim.state.0.exp_avg" in tensors
    assert torch.equal(tensors["model.0.weight"], model[0].weight.detach())
    assert scalars.get("optim.group.0.amsgrad") == "bool"
    # The copy is the state as it was: training on does not move it.
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert not torch.equal(made.tensors["model.0.weight"], model[0].weight.detach())
