"""A loaded program as an ``nn.Module``: parameters, buffers and ``state_dict`` under the program's
own state names (``model.0.weight`` for the gated program), ``forward`` the interpreter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from torch import Tensor, nn

from .archive import MAX_MODEL_JSON, open_archive
from .errors import ProgramError
from .exprs import Guard, holds
from .graph import Graph
from .interpret import After, run
from .parse import Parsed, TensorMeta, parse_model
from .weights import load_state


def _model_name(members: Any) -> str:
    models = [n for n in members if n.startswith("models/") and n.endswith(".json")]
    if len(models) != 1:
        raise ProgramError(f"model program holds {len(models)} models, one expected")
    name = models[0].removeprefix("models/").removesuffix(".json")
    if not name.isidentifier():
        raise ProgramError(f"model program's model name {name[:40]!r} is not a plain name")
    return name


def _parsed(data: bytes) -> tuple[Any, str, Parsed]:
    archive = open_archive(data)
    for marker, want in (("byteorder", b"little"), ("archive_format", b"pt2")):
        if archive.has(marker) and archive.read(marker, 64) != want:
            raise ProgramError(f"model program's {marker} is not {want.decode()}")
    name = _model_name(archive.members)
    return archive, name, parse_model(archive.read(f"models/{name}.json", MAX_MODEL_JSON))


def parse_program(data: bytes) -> Graph:
    """The program's graph, checked (specs/replay.md §2.1-2.3), without reading its weights."""
    return _parsed(data)[2].graph


@dataclass(frozen=True)
class Program:
    """A parsed program and its stored state (tensors as stored; ``ProgramModule`` owns live copies).

    ``state`` lacks the weights (parameters and persistent buffers) of a program loaded with
    ``weights=False``; ``stored`` holds every state tensor's metadata either way.
    """

    graph: Graph
    inputs: Mapping[str, TensorMeta]
    ranges: Mapping[str, tuple[int, int | None]]
    persistent: frozenset[str]
    guards: tuple[Guard, ...]
    state: Mapping[str, Tensor]
    params: frozenset[str]
    requires_grad: frozenset[str]  # parameters stored with requires_grad
    stored: Mapping[str, TensorMeta]


def load_program(data: bytes, *, weights: bool = True) -> Program:
    """Parse the archive and read the state it stores (specs/replay.md §2).

    ``weights=False``: everything is parsed and checked, but the weight files (parameters and
    persistent buffers) are not read; a ``ProgramModule`` of it is given them (``weights=``). The
    trainer's self-check runs its own program on the live weights this way, without holding a
    second copy of the model in memory.
    """
    archive, name, parsed = _parsed(data)
    wanted = {}
    for spec in parsed.graph.inputs:
        if spec.kind == "user_input":
            continue
        stored_with_weights = spec.kind == "parameter" or (spec.kind == "buffer" and spec.target in parsed.persistent)
        wanted[spec.target] = "weights" if stored_with_weights else "constants"
    loaded = load_state(archive, name, wanted, read_weights=weights)  # type: ignore[arg-type]
    params = frozenset(s.target for s in parsed.graph.inputs if s.kind == "parameter")
    for target, (_, _, is_param) in loaded.items():
        if is_param != (target in params):
            raise ProgramError(f"model program stores {target!r} as {'a' if is_param else 'no'} parameter, "
                               "its signature says otherwise")
    return Program(parsed.graph, parsed.inputs, parsed.ranges, parsed.persistent, parsed.guards,
                   {n: t for n, (t, _, _) in loaded.items() if t is not None}, params,
                   frozenset(n for n, (_, m, _) in loaded.items() if m.requires_grad),
                   {n: m for n, (_, m, _) in loaded.items()})


def check_inputs(program: Program, inputs: Mapping[str, Tensor]) -> None:
    """The checks ``torch.export``'s module would make, by our own code: dtype, rank, every static
    size, a symbol the same size wherever it appears and within its range, and the parsed guards."""
    seen: dict[str, int] = {}
    for name, meta in program.inputs.items():
        t = inputs.get(name)
        if not isinstance(t, Tensor):
            raise ProgramError(f"model program input {name!r} is not a tensor")
        if t.dtype != meta.dtype or t.dim() != len(meta.sizes) or t.device.type != "cpu":
            raise ProgramError(f"model program input {name!r} is {t.dtype} {list(t.shape)}, the program takes "
                               f"{meta.dtype} of rank {len(meta.sizes)}")
        for dim, (got, want) in enumerate(zip(t.shape, meta.sizes)):
            if isinstance(want, int):
                if got != want:
                    raise ProgramError(f"model program input {name!r} dim {dim} is {got}, the program takes {want}")
            elif seen.setdefault(want, got) != got:
                raise ProgramError(f"model program inputs disagree on size {want!r}: {seen[want]} and {got}")
    for sym, size in seen.items():
        lo, hi = program.ranges.get(sym, (0, None))
        if size < lo or (hi is not None and size > hi):
            raise ProgramError(f"model program size {sym!r} = {size} is outside [{lo}, {hi}]")
    shapes = {n: tuple(inputs[n].shape) for n in program.inputs}
    for guard in program.guards:
        if not holds(guard, shapes):
            raise ProgramError(f"model program inputs fail the guard {guard}")


def _owner(root: nn.Module, target: str) -> tuple[nn.Module, str]:
    *path, leaf = target.split(".")
    mod = root
    for part in path:
        child = mod._modules.get(part)
        if child is None:
            child = nn.Module()
            mod.add_module(part, child)
        mod = child
    return mod, leaf


def _given(program: Program, weights: Mapping[str, Tensor] | None, name: str, *, copy: bool) -> Tensor:
    meta = program.stored[name]
    t = None if weights is None else weights.get(name)
    if t is None:
        raise ProgramError(f"model program was loaded without its weights and {name!r} was not given")
    if t.dtype != meta.dtype or list(t.shape) != list(meta.sizes):
        raise ProgramError(f"model program weight {name!r} is {t.dtype} {list(t.shape)}, the program stores "
                           f"{meta.dtype} {list(meta.sizes)}")
    t = t.detach()
    return t.clone() if copy else t


class ProgramModule(nn.Module):
    """``forward(*user_inputs)`` runs the program; its state is registered like the unlifted module's.

    Parameters are ``nn.Parameter`` leaves (``requires_grad`` as stored), persistent buffers are in
    ``state_dict``, non-persistent buffers and constants are not. ``after`` (an attribute) is the
    interpreter hook of ``run``.

    ``weights`` (state name -> tensor) gives the values of a program loaded with ``weights=False``,
    each of the stored dtype and shape: a parameter is a new leaf on the given tensor's storage
    (the program never writes its parameters; its gradients are its own), a buffer is a copy (a
    forward may update it).
    """

    def __init__(self, program: Program, weights: Mapping[str, Tensor] | None = None) -> None:
        super().__init__()
        self.program = program
        self.after: After | None = None
        self._constants: dict[str, Tensor] = {}
        self._state: dict[str, Tensor] | None = None
        for spec in program.graph.inputs:
            if spec.kind == "user_input":
                continue
            assert spec.target is not None
            t = program.state.get(spec.target)
            if t is None:
                t = _given(program, weights, spec.target, copy=spec.kind != "parameter")
            owner, leaf = _owner(self, spec.target)
            if spec.kind == "parameter":
                owner.register_parameter(leaf, nn.Parameter(t, requires_grad=spec.target in program.requires_grad))
            elif spec.kind == "buffer":
                owner.register_buffer(leaf, t, persistent=spec.target in program.persistent)
            else:
                self._constants[spec.target] = t
        self._names = tuple(program.graph.user_inputs)

    def live_state(self) -> dict[str, Tensor]:
        # Built once (a walk of every submodule at every forward cost replay about 2 %): the module
        # owns its state objects, and ``load_state_dict`` copies into them. ``_apply`` (``.to()``),
        # which may replace buffers, drops it.
        if self._state is None:
            out: dict[str, Tensor] = dict(self._constants)
            out.update(self.named_parameters(remove_duplicate=False))
            out.update(self.named_buffers(remove_duplicate=False))
            self._state = out
        return dict(self._state)

    def _apply(self, fn: Any, recurse: bool = True) -> "ProgramModule":
        self._state = None
        return super()._apply(fn, recurse)

    def _inputs(self, args: tuple[Tensor, ...], kwargs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if len(args) > len(self._names):
            raise ProgramError(f"model program takes {len(self._names)} inputs, {len(args)} given")
        inputs = dict(zip(self._names, args))
        for k, v in kwargs.items():
            if k not in self._names or k in inputs:
                raise ProgramError(f"model program has no input {k!r} (or it was given twice)")
            inputs[k] = v
        return inputs

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Any:
        inputs = self._inputs(args, kwargs)
        check_inputs(self.program, inputs)
        out = run(self.program.graph, inputs, self.live_state(), after=self.after)
        return out[0] if len(out) == 1 else out

    def check(self, *args: Tensor, **kwargs: Tensor) -> None:
        """Check ``args`` against the program's input specs and guards, as ``forward`` does, without running it."""
        check_inputs(self.program, self._inputs(args, kwargs))

    def call_with(self, state: Mapping[str, Tensor], *args: Tensor) -> Any:
        """The program on ``args`` with ``state`` (name -> tensor) in place of those entries of its own state.

        For ``torch.func`` transforms (per-example gradients by ``vmap(grad(...))``, where each call sees one
        example): a program that mutates a buffer is refused (its update would land in the module's own
        buffer). The inputs are not checked here: check the whole batch with ``check`` first.
        """
        if any(spec.kind == "buffer_mutation" for spec in self.program.graph.outputs):
            raise ProgramError("the model program updates a buffer; it cannot run on substituted state")
        merged = self.live_state()
        merged.update(state)
        out = run(self.program.graph, self._inputs(args, {}), merged)
        return out[0] if len(out) == 1 else out
