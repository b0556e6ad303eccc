"""How a model takes its inputs: one tensor, or named parts (specs/training.md §5.1).

A model takes one tensor (``model(x)``) or several: a dict of named tensors (a HuggingFace model's
``input_ids``, ``attention_mask``...) or a tuple. The gate, the program and the ledger all see
the same thing: the parts in canonical order (sorted by name; a tuple's parts are named ``"0"``,
``"1"``, ...). ``InputStructure`` holds what turns those parts back into the call the user's
model expects, so the exported program calls the model exactly as the user's loop does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from .errors import GovernanceError
from .manifests import part_names_problem

__all__ = ["CALLS", "InputStructure", "program_settings"]

#: How the model is called with a structured input: ``model(*x)`` / ``model(**x)``, or ``model(x)``.
CALLS = ("spread", "whole")


@dataclass(frozen=True)
class InputStructure:
    """The shape of a model's input: ``kind`` ``"tensor"``, ``"tuple"`` or ``"dict"``; the part names in
    the structure's own order; and whether the model is called with the parts spread (``model(*x)``,
    ``model(**x)``: the default, as HuggingFace models and multi-input modules take them) or whole."""

    kind: str
    names: tuple[str, ...] = ()
    call: str = "spread"

    @classmethod
    def of(cls, x: Any, call: str = "spread") -> "InputStructure":
        """The structure of a batch (or one example) ``x``; refuses what no part list can hold."""
        if call not in CALLS:
            raise GovernanceError(f"inputs call must be one of {CALLS}, got {call!r}")
        if isinstance(x, Tensor):
            return cls("tensor")
        if isinstance(x, Mapping):
            names = tuple(x)
            kind = "dict"
        elif isinstance(x, (tuple, list)):
            names = tuple(str(i) for i in range(len(x)))
            kind = "tuple"
        else:
            raise GovernanceError(
                f"model inputs of type {type(x).__name__}: give a tensor, or a dict or tuple of tensors")
        problem = part_names_problem(names)
        if problem is not None:
            raise GovernanceError(f"model inputs: {problem}")
        parts = x.values() if isinstance(x, Mapping) else x
        if not all(isinstance(p, Tensor) for p in parts):
            raise GovernanceError("every part of a structured input must be a tensor")
        return cls(kind, names, call)

    @property
    def structured(self) -> bool:
        return self.kind != "tensor"

    @property
    def parts(self) -> tuple[str, ...]:
        """The part names in canonical order (sorted by code point), the order every record uses."""
        return tuple(sorted(self.names))

    def flatten(self, x: Any) -> list[Tensor]:
        """The parts of ``x`` in canonical order; ``[x]`` for a tensor."""
        if not self.structured:
            return [x]
        got = InputStructure.of(x, self.call)
        if got.kind != self.kind or set(got.names) != set(self.names):
            raise GovernanceError(f"inputs with parts {list(got.names)}, but the run's inputs have parts "
                                  f"{list(self.names)}")
        if self.kind == "dict":
            return [x[n] for n in self.parts]
        return [x[int(n)] for n in self.parts]

    def rebuild(self, parts: Sequence[Tensor]) -> Any:
        """Canonical-order ``parts`` back into the structure (dict in its own key order, or tuple)."""
        if not self.structured:
            (x,) = parts
            return x
        by_name = dict(zip(self.parts, parts))
        if self.kind == "dict":
            return {n: by_name[n] for n in self.names}
        return tuple(by_name[n] for n in self.names)

    def call_model(self, model: nn.Module, x: Any) -> Any:
        """``model`` called with ``x`` the way the user's loop calls it."""
        if not self.structured or self.call == "whole":
            return model(x)
        if self.kind == "dict":
            return model(**x)
        return model(*x)

    def split_call(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
        """``(x, profiles)`` of a call of the governed model: ``model(x)``, ``model(x, profiles)``, and for
        parts also the model's own call (``model(**x)``, ``model(*x)``, with ``profiles=`` optional).
        Whatever the form, the model itself is then called as ``call_model`` says, the way it is exported."""
        rest = dict(kwargs)
        profiles = rest.pop("profiles", None)
        if self.structured and self.call == "spread":
            n = len(self.names)
            if self.kind == "dict" and not args and rest:
                return rest, profiles
            if self.kind == "tuple" and len(args) in (n, n + 1) and all(isinstance(a, Tensor) for a in args):
                if len(args) == n + 1:
                    if profiles is not None:
                        raise GovernanceError("profiles given twice")
                    profiles = args[n]
                return tuple(args[:n]), profiles
        if rest:
            raise GovernanceError(f"unexpected keyword arguments {sorted(rest)} for inputs called as {self.describe()}")
        if not 1 <= len(args) <= 2 or (len(args) == 2 and profiles is not None):
            raise GovernanceError(f"call the governed model as model(x) or model(x, profiles) ({self.describe()} for "
                                  f"these inputs), got {len(args)} positional arguments")
        return args[0], args[1] if len(args) == 2 else profiles

    def describe(self) -> str:
        if not self.structured or self.call == "whole":
            return "model(x)"
        return "model(**x)" if self.kind == "dict" else "model(*x)"


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def program_settings(structure: InputStructure, x: Any) -> dict[str, Any]:
    """RunStarted ``settings.program`` for a batch ``x`` (specs/training.md §5): one input ``x`` with its
    dtype and row shape, or (a model of parts, §5.1) inputs ``x_0 .. x_{n-1}`` and each part's name, dtype and row shape,
    in canonical order."""
    if not structure.structured:
        return {"format": "torch.export.save", "inputs": ["x", "profiles"], "x_dtype": _dtype(x),
                "x_shape": list(x.shape[1:])}
    parts = structure.flatten(x)
    return {
        "format": "torch.export.save",
        "inputs": [f"x_{i}" for i in range(len(parts))] + ["profiles"],
        "parts": [{"name": n, "dtype": _dtype(t), "shape": list(t.shape[1:])} for n, t in zip(structure.parts, parts)],
    }
