"""The replay worker's eager stand-in for torch._dynamo (verify/_internal/eager.py) changes no bit:
the same optimizer steps give the same parameters with it and with the real dynamo, each in a
fresh interpreter; and anything else asked of dynamo loads the real module."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import hashlib, json, sys
import torch
if sys.argv[1] == "standin":
    from gradledger.verify._internal import eager
    eager.install()
torch.manual_seed(0)
out = {}
for name, make in [("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)),
                   ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01)),
                   ("adam", lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True))]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = make(model.parameters())
    for step in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(4, 8)), torch.tensor([0, 1, 2, 1])).backward()
        opt.step()
    h = hashlib.sha256()
    for t in list(model.state_dict().values()) + [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]:
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.dim() else t.reshape(1).view(torch.uint8).numpy().tobytes())
    out[name] = h.hexdigest()
out["module"] = type(sys.modules["torch._dynamo"]).__name__
if sys.argv[1] == "standin":
    torch._dynamo.reset()  # anything else: the real module is loaded and serves it
    out["after"] = type(sys.modules["torch._dynamo"]).__name__
print(json.dumps(out))
"""


def _run(mode: str) -> dict[str, str]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_standin_changes_no_bit_of_an_optimizer_step() -> None:
    real, standin = _run("real"), _run("standin")
    assert real["module"] == "module" and standin["module"] == "_EagerDynamo"
    for name in ("sgd", "adamw", "adam"):
        assert standin[name] == real[name], name
    assert standin["after"] == "module"
