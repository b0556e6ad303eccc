"""Band layouts: an ordered partition of a model's trainable parameters by depth.

A band is a group of parameters declared by module-name prefixes. Bands are
ordered head first (nearest the loss), deepest last. Every non-head band also
names its *boundary*: the module whose output is the activation that carries
everything the band computes up to the next shallower band. The gate
(``gate.py``) mixes that activation per example so that the gradient which
reaches the band is scaled by the example's profile. The normative text is
``specs/routing.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from torch import nn

from gradledger.training.errors import BandError

__all__ = [
    "Band",
    "BandLayout",
    "ResolvedBands",
    "prefix_matches",
    "resolve_bands",
    "sequential_bands",
    "transformer_bands",
]


def prefix_matches(prefix: str, name: str) -> bool:
    """True when ``prefix`` names ``name`` or one of its ancestors in the module tree.

    Matching is at '.' boundaries so that ``"1"`` never captures ``"10.weight"``.
    """
    return name == prefix or name.startswith(prefix + ".")


@dataclass(frozen=True)
class Band:
    """One band: a name, the module/parameter prefixes it owns, and its boundary.

    ``boundary`` is the dotted path of the module whose output flows into the
    next shallower band. The head band (index 0) has no boundary: its output is
    the model's output. The boundary may be a parameter-free module (an
    activation after the band's last layer) and so need not match a prefix.
    """

    name: str
    prefixes: tuple[str, ...]
    boundary: str | None = None

    def __init__(self, name: str, prefixes: Iterable[str], boundary: str | None = None) -> None:
        # A bare string would silently iterate characters: "blocks" -> "b", "l", ...
        if isinstance(prefixes, str):
            prefixes = (prefixes,)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "prefixes", tuple(prefixes))
        object.__setattr__(self, "boundary", boundary)


@dataclass(frozen=True)
class BandLayout:
    """Ordered bands, head first. Structural checks happen here; model checks in ``resolve``."""

    bands: tuple[Band, ...]

    def __init__(self, bands: Iterable[Band]) -> None:
        bands = tuple(bands)
        object.__setattr__(self, "bands", bands)
        self._check_structure()

    def _check_structure(self) -> None:
        if not self.bands:
            raise BandError("a band layout needs at least one band")
        names = [b.name for b in self.bands]
        for band in self.bands:
            if not isinstance(band.name, str) or not band.name:
                raise BandError(f"band names must be non-empty strings, got {band.name!r}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise BandError(f"duplicate band names: {dupes}")
        for band in self.bands:
            if not band.prefixes:
                raise BandError(f"band {band.name!r} declares no prefixes")
            for p in band.prefixes:
                # An empty prefix would match everything and hide mistakes.
                if not isinstance(p, str) or not p or p.startswith(".") or p.endswith("."):
                    raise BandError(f"band {band.name!r}: invalid prefix {p!r}")
        if self.bands[0].boundary is not None:
            raise BandError(
                f"the head band {self.bands[0].name!r} has no boundary (its output is the model output); "
                f"got {self.bands[0].boundary!r}"
            )
        seen: dict[str, str] = {}
        for band in self.bands[1:]:
            if not band.boundary:
                raise BandError(f"band {band.name!r} needs a boundary module (every band but the head)")
            if band.boundary in seen:
                raise BandError(
                    f"bands {seen[band.boundary]!r} and {band.name!r} share the boundary {band.boundary!r}"
                )
            seen[band.boundary] = band.name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    def __len__(self) -> int:
        return len(self.bands)

    def resolve(self, model: nn.Module) -> "ResolvedBands":
        return resolve_bands(model, self)

    def to_obj(self) -> dict[str, Any]:
        """A plain, deterministic description (for RunStarted records and bundles)."""
        return {
            "bands": [
                {"name": b.name, "prefixes": list(b.prefixes), "boundary": b.boundary} for b in self.bands
            ]
        }

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any]) -> "BandLayout":
        try:
            return cls(Band(b["name"], list(b["prefixes"]), b.get("boundary")) for b in obj["bands"])
        except (KeyError, TypeError) as exc:
            raise BandError(f"malformed band layout description: {exc}") from exc


@dataclass(frozen=True)
class ResolvedBands:
    """A layout bound to one model: the trainable parameter names of each band and the boundary modules."""

    layout: BandLayout
    param_names: tuple[tuple[str, ...], ...]
    params: tuple[tuple[nn.Parameter, ...], ...]
    boundary_modules: tuple[nn.Module | None, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return self.layout.names

    def __len__(self) -> int:
        return len(self.layout.bands)

    def band_of(self) -> dict[str, int]:
        """Parameter name -> band index."""
        return {n: k for k, names in enumerate(self.param_names) for n in names}


def _owning_tensor_names(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # remove_duplicate=False exposes tied weights under every name, so a tensor
    # shared between two bands is caught: routing cannot scale one tensor two ways.
    return list(model.named_parameters(remove_duplicate=False))


def resolve_bands(model: nn.Module, layout: BandLayout) -> ResolvedBands:
    """Check that ``layout`` partitions ``model``'s trainable parameters and bind it.

    Raises BandError naming the offending parameters when a trainable parameter
    is in no band, in two bands (by name, or the same tensor under two names),
    when a prefix matches no parameter, or when a boundary module is missing.
    """
    all_params = _owning_tensor_names(model)
    for band in layout.bands:
        for p in band.prefixes:
            if not any(prefix_matches(p, n) for n, _ in all_params):
                raise BandError(f"band {band.name!r}: prefix {p!r} matches no parameter of the model")

    members: dict[str, list[int]] = {}
    for name, param in all_params:
        if not param.requires_grad:
            continue
        hits = [k for k, band in enumerate(layout.bands) if any(prefix_matches(p, name) for p in band.prefixes)]
        members[name] = hits

    uncovered = sorted(n for n, hits in members.items() if not hits)
    if uncovered:
        raise BandError(f"trainable parameters in no band: {uncovered}")
    overlapping = sorted(n for n, hits in members.items() if len(hits) > 1)
    if overlapping:
        detail = ", ".join(f"{n} in {[layout.bands[k].name for k in members[n]]}" for n in overlapping)
        raise BandError(f"trainable parameters in more than one band: {detail}")

    tensor_band: dict[int, tuple[int, str]] = {}
    shared: list[str] = []
    for name, param in all_params:
        if not param.requires_grad:
            continue
        k = members[name][0]
        prev = tensor_band.setdefault(id(param), (k, name))
        if prev[0] != k:
            shared.append(
                f"{prev[1]} ({layout.bands[prev[0]].name}) is the same tensor as {name} ({layout.bands[k].name})"
            )
    if shared:
        raise BandError(f"tied parameters span bands: {'; '.join(shared)}")

    names: list[list[str]] = [[] for _ in layout.bands]
    params: list[list[nn.Parameter]] = [[] for _ in layout.bands]
    seen: set[int] = set()
    for name, param in all_params:
        if not param.requires_grad or id(param) in seen:
            continue  # a tied tensor counts once, under its first name
        seen.add(id(param))
        k = members[name][0]
        names[k].append(name)
        params[k].append(param)

    empty = [layout.bands[k].name for k in range(len(layout.bands)) if not params[k]]
    if empty:
        raise BandError(f"bands with no trainable parameters: {empty}")

    boundaries: list[nn.Module | None] = [None]
    for band in layout.bands[1:]:
        assert band.boundary is not None
        try:
            mod = model.get_submodule(band.boundary)
        except AttributeError as exc:
            raise BandError(f"band {band.name!r}: boundary module {band.boundary!r} not found in the model") from exc
        if mod is model:
            raise BandError(f"band {band.name!r}: the boundary cannot be the whole model")
        boundaries.append(mod)
    ids = [id(m) for m in boundaries[1:]]
    if len(set(ids)) != len(ids):
        raise BandError("two band boundaries name the same module object")

    return ResolvedBands(
        layout=layout,
        param_names=tuple(tuple(n) for n in names),
        params=tuple(tuple(p) for p in params),
        boundary_modules=tuple(boundaries),
    )


def _default_names(n_bands: int) -> tuple[str, ...]:
    if n_bands == 1:
        return ("head",)
    if n_bands == 2:
        return ("head", "embedding")
    if n_bands == 3:
        return ("head", "mid", "embedding")
    return ("head", *(f"mid{i}" for i in range(1, n_bands - 1)), "embedding")


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def sequential_bands(
    model: nn.Sequential, n_bands: int = 3, names: Sequence[str] | None = None
) -> BandLayout:
    """Split an ``nn.Sequential``'s parameterized children into ``n_bands`` contiguous groups.

    The last parameterized child(ren) form the head. When the children do not
    divide evenly, the deeper bands take the extra children, so the head stays
    as small as possible (the head is what low-trust labels may still tune).
    Parameter-free children (activations, dropout) travel with the
    parameterized child before them, so a band's boundary is the last child
    before the next band's first parameterized child: the activation *after*
    the band's last layer is what flows upward.
    """
    if not isinstance(model, nn.Sequential):
        raise BandError(f"sequential_bands needs an nn.Sequential, got {type(model).__name__}")
    if n_bands < 1:
        raise BandError(f"n_bands must be >= 1, got {n_bands}")
    names = tuple(names) if names is not None else _default_names(n_bands)
    if len(names) != n_bands:
        raise BandError(f"{len(names)} band names for {n_bands} bands")
    children = list(model.named_children())
    param_idx = [i for i, (_, m) in enumerate(children) if _has_trainable(m)]
    m = len(param_idx)
    if m < n_bands:
        raise BandError(f"cannot split {m} parameterized children into {n_bands} bands")

    # Group sizes deepest first: the first (m % n) groups take one extra child.
    base, extra = divmod(m, n_bands)
    sizes_deep_first = [base + (1 if g < extra else 0) for g in range(n_bands)]
    groups_deep_first: list[list[int]] = []
    pos = 0
    for s in sizes_deep_first:
        groups_deep_first.append(param_idx[pos : pos + s])
        pos += s
    groups = list(reversed(groups_deep_first))  # head first

    bands: list[Band] = []
    for k, group in enumerate(groups):
        prefixes = [children[i][0] for i in group]
        boundary = None
        if k > 0:
            # Up to (not including) the first parameterized child of the band above.
            next_first = groups[k - 1][0]
            boundary = children[next_first - 1][0]
        bands.append(Band(names[k], prefixes, boundary))
    return BandLayout(bands)


def _get_attr_path(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        if not hasattr(obj, part):
            raise BandError(f"model has no attribute {path!r} (missing {part!r})")
        obj = getattr(obj, part)
    return obj


def _module_prefix(param_name: str) -> str:
    # Declare at module granularity where possible: a parameter's owning module.
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def transformer_bands(
    model: nn.Module,
    blocks_attr: str = "blocks",
    *,
    lower_blocks: int | None = None,
    embedding_prefixes: Sequence[str] | None = None,
    head_prefixes: Sequence[str] | None = None,
    names: Sequence[str] = ("head", "mid", "embedding"),
) -> BandLayout:
    """Three bands for a transformer: head, mid, embedding.

    - head: everything after the blocks (final norm and output layer);
    - mid: the upper blocks, ``blocks[lower_blocks:]``;
    - embedding: everything before the blocks (token/position embeddings,
      root-level parameters such as a learned position table) plus the lower
      blocks ``blocks[:lower_blocks]``.

    ``lower_blocks`` defaults to ``len(blocks) // 2``, so with an odd count
    the mid band has one more block. Boundaries are residual-stream outputs:
    the embedding band's is ``blocks[lower_blocks-1]``, the mid band's is
    ``blocks[-1]``. ``blocks_attr`` may be dotted (``"transformer.h"``).

    Which parameters are "before" or "after" the blocks is read from
    ``named_parameters()`` order (module registration order), with
    root-level parameters counted as embeddings. Override with
    ``embedding_prefixes`` / ``head_prefixes`` when that guess is wrong.
    """
    blocks = _get_attr_path(model, blocks_attr)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise BandError(f"{blocks_attr!r} must be an nn.ModuleList or nn.Sequential, got {type(blocks).__name__}")
    n = len(blocks)
    if n < 2:
        raise BandError(f"transformer_bands needs at least 2 blocks, {blocks_attr!r} has {n}")
    lower = n // 2 if lower_blocks is None else lower_blocks
    if not 1 <= lower <= n - 1:
        raise BandError(f"lower_blocks must be in [1, {n - 1}], got {lower}")
    if len(tuple(names)) != 3:
        raise BandError("transformer_bands makes exactly three bands: give three names")

    block_prefix = [f"{blocks_attr}.{i}" for i in range(n)]
    if embedding_prefixes is None or head_prefixes is None:
        before: list[str] = []
        after: list[str] = []
        seen_blocks = False
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if prefix_matches(blocks_attr, pname):
                seen_blocks = True
                continue
            if "." not in pname:
                target = before  # root-level tables (pos_emb, cls_token) feed the stream
            else:
                target = after if seen_blocks else before
            pre = _module_prefix(pname)
            if pre not in target:
                target.append(pre)
        if embedding_prefixes is None:
            embedding_prefixes = before
        if head_prefixes is None:
            head_prefixes = after
    if not head_prefixes:
        raise BandError("no head parameters found after the blocks; pass head_prefixes")
    if not embedding_prefixes:
        raise BandError("no embedding parameters found before the blocks; pass embedding_prefixes")

    head_name, mid_name, emb_name = names
    return BandLayout(
        [
            Band(head_name, list(head_prefixes)),
            Band(mid_name, block_prefix[lower:], block_prefix[-1]),
            Band(emb_name, [*embedding_prefixes, *block_prefix[:lower]], block_prefix[lower - 1]),
        ]
    )
