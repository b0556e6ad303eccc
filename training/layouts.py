"""Default band layouts for common architectures, found from the module tree.

Writing a ``BandLayout`` by hand means knowing where a model's depth stages
begin and end and which module's output carries each one. For the shapes most
models take, that is readable from the module tree: ``default_layout`` does it
for

- an ``nn.Sequential`` (delegated to ``sequential_bands``);
- a torchvision-style ResNet: ``conv1``, ``layer1`` .. ``layer4``, ``fc``;
- a transformer stack: a list of blocks at ``encoder.layer`` (BERT-style
  HuggingFace encoders), ``transformer.layer`` (DistilBERT), ``h`` (GPT-2
  family), ``layers`` (Llama-style decoders) or ``blocks`` (timm ViTs), at
  any depth, so task heads and thin wrappers around the base model are fine.

Detection is structural (attribute names and module order), never by class
name, so a re-implementation with the same module names gets the same layout.
It assumes what those architectures do: modules run in the order they are
registered, task heads read the base model's output, and anything registered
before a stage feeds it. ``check_routing`` is the arbiter of whether a layout
really separates its bands (specs/routing.md §1); run it once per model.

The split rule is the one ``sequential_bands`` uses: the model is cut into
*units* (a ResNet stem and its four stages; a transformer's embeddings and each
block), the post-trunk modules (final norm, pooler, classifier, LM head) form
the head band, and the units are split into the remaining bands in contiguous
groups, the deeper groups taking any extra units. Each band's boundary is the
output of its shallowest unit, which carries everything the band and the bands
below it compute. With three bands a transformer's layout puts the same
parameters in each band as ``transformer_bands``' default does.

When the structure is not recognised, or the detected layout would leave a
trainable parameter in no band (a stray parameter whose role the structure
does not tell), ``default_layout`` raises ``BandError`` naming the parameters:
guessing a band for them could route gradient around a boundary. The remedy is
an explicit ``BandLayout`` (or ``sequential_bands`` / ``transformer_bands``
with overrides); ``layout_or_default`` lets callers take either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from gradledger.training.bands import Band, BandLayout, prefix_matches, resolve_bands, sequential_bands
from gradledger.training.errors import BandError

__all__ = [
    "DEFAULT_NAMES",
    "default_band_names",
    "default_layout",
    "describe_layout",
    "detect_architecture",
    "layout_or_default",
]

# The three-band policy template's names: head, mid, deep.
DEFAULT_NAMES: tuple[str, ...] = ("head", "mid", "deep")

# Where transformer stacks keep their blocks, relative to the base model.
_BLOCK_PATHS: tuple[tuple[str, ...], ...] = (
    ("encoder", "layer"),  # BERT, RoBERTa, ELECTRA, ... (HuggingFace encoders)
    ("transformer", "layer"),  # DistilBERT
    ("h",),  # GPT-2, GPT-J, GPT-Neo, Bloom
    ("layers",),  # Llama, Mistral, Qwen, Gemma, OPT's decoder
    ("blocks",),  # timm ViT and many hand-written transformers
)

_SHOW = 8  # parameter names quoted in an error before "... and N more"

_REMEDY = (
    "pass an explicit layout=BandLayout([Band(name, prefixes, boundary), ...]) (head first; every band but the "
    "head names the module whose output carries it), or build one with sequential_bands(...) / "
    "transformer_bands(model, blocks_attr, embedding_prefixes=..., head_prefixes=...)"
)


def default_band_names(n_bands: int) -> tuple[str, ...]:
    """``head``, ``mid``, ``deep`` for three bands; ``head, deep`` for two; ``head, mid1 .. mid{n-2}, deep`` beyond."""
    if n_bands < 1:
        raise BandError(f"n_bands must be >= 1, got {n_bands}")
    if n_bands == 1:
        return ("head",)
    if n_bands == 2:
        return ("head", "deep")
    if n_bands == 3:
        return DEFAULT_NAMES
    return ("head", *(f"mid{i}" for i in range(1, n_bands - 1)), "deep")


def _quote(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    more = f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return f"{len(names)} trainable parameter(s) [{shown}{more}]"


@dataclass(frozen=True)
class _Unit:
    """A contiguous stretch of depth: its prefixes and the module whose output carries it (and all below)."""

    prefixes: tuple[str, ...]
    boundary: str | None  # None: no module's output is known to carry it; it cannot end a band


@dataclass(frozen=True)
class _Plan:
    """What a detector found: units deepest first, the head's prefixes, and parameters it could not place."""

    kind: str
    units: tuple[_Unit, ...]
    head: tuple[str, ...]
    uncovered: tuple[str, ...]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _cut(name: str, anchor: str) -> str:
    """The shallowest path to ``name`` that leaves ``anchor``'s ancestors: a module (or bare parameter) prefix.

    ``_cut("bert.embeddings.word_embeddings.weight", "bert.encoder.layer")`` is
    ``"bert.embeddings"``: declaring whole modules keeps layouts short and
    stable when a module gains a parameter.
    """
    a, n = anchor.split(".") if anchor else [], name.split(".")
    common = 0
    while common < min(len(a), len(n)) and a[common] == n[common]:
        common += 1
    return ".".join(n[: common + 1])


def _add(prefixes: list[str], prefix: str) -> None:
    if prefix not in prefixes:
        prefixes.append(prefix)


def _trainable(model: nn.Module) -> list[tuple[str, int]]:
    # remove_duplicate=False: a tied tensor shows under every name, so each name is classified
    # and ties across bands are caught here with a remedy (resolve_bands would refuse them too).
    return [(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]


def _is_passthrough(module: nn.Module) -> bool:
    # Modules that only transform the residual stream they are handed: a credible boundary
    # even when the embedding parameters live in several siblings (GPT-2's wte + wpe -> drop).
    return isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd))


def _owns_all(module_path: str, names: Sequence[str]) -> bool:
    return all(prefix_matches(module_path, n) for n in names)


# ---------------------------------------------------------------- detectors


def _resnet_plan(model: nn.Module) -> _Plan | None:
    """torchvision (and timm) ResNet names: a stem, ``layer1`` .. ``layer4``, then pooling and ``fc``."""
    children = dict(model.named_children())
    stages = [f"layer{i}" for i in range(1, 5)]
    if "conv1" not in children or "fc" not in children:
        return None
    if not all(isinstance(children.get(s), nn.Sequential) for s in stages):
        return None
    order = list(children)
    first = order.index("layer1")
    if [order.index(s) for s in stages] != list(range(first, first + 4)):
        return None  # stages registered out of order: do not guess their depth order
    stem_children = order[:first]
    after = set(order[first + 4 :])

    stem: list[str] = []
    stage_prefixes: dict[str, list[str]] = {s: [] for s in stages}
    head: list[str] = []
    uncovered: list[str] = []
    for name, _ in _trainable(model):
        top = name.split(".")[0]
        if "." not in name:
            uncovered.append(name)  # a bare parameter on the root: the module tree does not say where it is used
        elif top in stage_prefixes:
            _add(stage_prefixes[top], top)
        elif top in stem_children:
            _add(stem, top)
        elif top in after:
            _add(head, top)
        else:
            uncovered.append(name)
    units: list[_Unit] = []
    if stem:
        # The stem's last module (maxpool in torchvision) runs after conv1/bn1/relu: its output carries the stem.
        units.append(_Unit(tuple(stem), stem_children[-1]))
    units.extend(_Unit((s,), s) for s in stages if stage_prefixes[s])
    return _Plan("resnet", tuple(units), tuple(head), tuple(uncovered))


def _find_stacks(model: nn.Module) -> list[tuple[str, str]]:
    """(base path, blocks path) for every block list matching ``_BLOCK_PATHS``, outermost only."""
    found: list[tuple[str, str]] = []
    for base, module in model.named_modules():
        for rel in _BLOCK_PATHS:
            obj: object = module
            for part in rel:
                obj = getattr(obj, part, None) if isinstance(obj, nn.Module) else None
            if isinstance(obj, (nn.ModuleList, nn.Sequential)) and len(obj) > 0:
                found.append((base, _join(base, *rel)))
    # A block that itself holds a list called "layers" is part of the outer stack, not a second one.
    return [(b, p) for b, p in found if not any(prefix_matches(q, b) and q != p for _, q in found)]


def _transformer_plan(model: nn.Module) -> _Plan | None:
    stacks = _find_stacks(model)
    if not stacks:
        return None
    if len(stacks) > 1:
        where = ", ".join(repr(p) for _, p in stacks)
        raise BandError(
            f"default_layout: {type(model).__name__} has {len(stacks)} block stacks ({where}), as an "
            f"encoder-decoder does; which runs first and where the cross-attention enters cannot be read "
            f"from the module tree: {_REMEDY}"
        )
    base, blocks_path = stacks[0]
    blocks = model.get_submodule(blocks_path)
    n = len(blocks)
    container = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    base_top = blocks_path[len(base) + 1 :].split(".")[0] if base else blocks_path.split(".")[0]

    params = _trainable(model)
    first_base = next((i for i, (nm, _) in enumerate(params) if not base or prefix_matches(base, nm)), len(params))
    index = {name: i for i, (name, _) in enumerate(blocks.named_children())}  # Sequential children may be named
    wrappers = _ancestors(base)

    emb: list[str] = []
    emb_names: list[str] = []
    block_prefixes: list[list[str]] = [[] for _ in range(n)]
    head: list[str] = []
    uncovered: list[str] = []
    seen_blocks = False
    for i, (name, _) in enumerate(params):
        in_base = not base or prefix_matches(base, name)
        if prefix_matches(blocks_path, name):
            seen_blocks = True
            child = name[len(blocks_path) + 1 :].split(".")[0]
            if child in index:
                _add(block_prefixes[index[child]], _join(blocks_path, child))
            else:
                uncovered.append(name)  # a bare parameter on the block list itself: used by which block?
        elif container != base and prefix_matches(container, name):
            # Beside the block list inside its container (DeBERTa's shared relative embeddings):
            # such a module typically feeds every block, so no single boundary separates it.
            uncovered.append(name)
        elif in_base:
            if seen_blocks:
                _add(head, _cut(name, blocks_path))
            else:
                _add(emb, _cut(name, blocks_path))
                emb_names.append(name)
        elif i < first_base or _owner(name) in wrappers:
            # Before the base model, or a bare parameter of a wrapper around it: its role is unknown.
            uncovered.append(name)
        else:
            _add(head, _cut(name, base))  # a task head (classifier, lm_head, score) reads the base's output

    units: list[_Unit] = []
    if emb:
        units.append(_Unit(tuple(emb), _embedding_boundary(model, base, base_top, emb_names)))
    units.extend(_Unit(tuple(p), _join(blocks_path, c)) for c, p in zip(index, block_prefixes) if p)
    return _Plan(f"transformer stack at {blocks_path!r}", tuple(units), tuple(head), tuple(uncovered))


def _owner(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def _ancestors(path: str) -> set[str]:
    parts = path.split(".") if path else []
    return {".".join(parts[:k]) for k in range(len(parts))}


def _embedding_boundary(model: nn.Module, base: str, base_top: str, emb_names: Sequence[str]) -> str | None:
    """The module whose output carries every embedding parameter into the first block, or None.

    The candidate is the last child of the base registered before the blocks.
    It is accepted when it is a pass-through (dropout, identity: GPT-2's
    ``drop`` after ``wte + wpe``, timm's ``norm_pre``) or when it holds every
    embedding parameter (BERT's ``embeddings``, Llama's ``embed_tokens``).
    Parameter-free modules of other kinds (a rotary table registered early)
    are skipped: their output is not the stream. Otherwise (two embedding
    modules summed in ``forward``, a bare position table) no module's output
    is known to carry them all, and the embeddings travel with the first block.
    """
    base_mod = model.get_submodule(base) if base else model
    before: list[tuple[str, nn.Module]] = []
    for name, child in base_mod.named_children():
        if name == base_top:
            break
        before.append((_join(base, name), child))
    for path, child in reversed(before):
        if _is_passthrough(child):
            return path
        if not any(True for _ in child.parameters()):
            continue
        return path if _owns_all(path, emb_names) else None
    return None


# ---------------------------------------------------------------- layout


def _split(plan: _Plan, n_bands: int, names: Sequence[str]) -> BandLayout:
    units = list(plan.units)
    head = list(plan.head)
    if n_bands == 1:
        return BandLayout([Band(names[0], [p for u in units for p in u.prefixes] + head)])
    if not head:
        # Nothing after the trunk (a bare encoder without pooler): its last unit is the head.
        if not units:
            raise BandError(f"default_layout: the {plan.kind} has no trainable parameters")
        head = list(units.pop().prefixes)
    m = len(units)
    # The deepest unit can end a band only if some module's output is known to carry it.
    limit = m if units and units[0].boundary is None else m + 1
    if n_bands > limit:
        raise BandError(
            f"default_layout: the {plan.kind} splits into at most {limit} bands "
            f"({m} unit(s) below the head), asked for {n_bands}: {_REMEDY}"
        )
    base, extra = divmod(m, n_bands - 1)
    groups: list[list[_Unit]] = []  # deepest first
    pos = 0
    for g in range(n_bands - 1):
        size = base + (1 if g < extra else 0)
        groups.append(units[pos : pos + size])
        pos += size
    bands = [Band(names[0], head)]
    for k, group in enumerate(reversed(groups), start=1):
        boundary = group[-1].boundary
        assert boundary is not None  # only units[0] lacks one, and it never ends a group (limit above)
        bands.append(Band(names[k], [p for u in group for p in u.prefixes], boundary))
    return BandLayout(bands)


def _plan(model: nn.Module) -> _Plan | None:
    return _resnet_plan(model) or _transformer_plan(model)


def detect_architecture(model: nn.Module) -> str | None:
    """What ``default_layout`` recognises ``model`` as ("sequential", "resnet", "transformer stack at ..."), or None."""
    if isinstance(model, nn.Sequential):
        return "sequential"
    try:
        plan = _plan(model)
    except BandError:
        return None  # several stacks (encoder-decoder): default_layout explains
    return plan.kind if plan else None


def default_layout(model: nn.Module, n_bands: int = 3, names: Sequence[str] | None = None) -> BandLayout:
    """A head-first ``BandLayout`` with ``n_bands`` bands for a recognised architecture.

    ``names`` defaults to ``default_band_names(n_bands)`` (``head, mid, deep``
    for three). The layout is resolved against ``model`` before it is
    returned, so it partitions the trainable parameters; whether its
    boundaries separate the bands is for ``check_routing`` to confirm.

    Raises BandError when the structure is not recognised, when a trainable
    parameter would be in no band, when a tied tensor would span two bands, or
    when ``n_bands`` exceeds what the structure can split into; the message
    names the parameters and the remedy.
    """
    names = tuple(names) if names is not None else default_band_names(n_bands)
    if n_bands < 1:
        raise BandError(f"n_bands must be >= 1, got {n_bands}")
    if len(names) != n_bands:
        raise BandError(f"{len(names)} band names for {n_bands} bands")

    sequential = isinstance(model, nn.Sequential)
    plan = None if sequential else _plan(model)
    inner = _only_child(model) if plan is None and not sequential else None
    if inner is not None:
        # A wrapper whose parameters all live in one child (a LightningModule holding its network):
        # the child's layout, its paths prefixed.
        child_name, child = inner
        layout = _prefixed(default_layout(child, n_bands, names), child_name)
        kind = f"{detect_architecture(child) or type(child).__name__} at {child_name}"
    elif sequential:
        kind = "sequential"
        layout = sequential_bands(model, n_bands, names)
    else:
        if plan is None:
            everything = [n for n, _ in _trainable(model)]
            raise BandError(
                f"default_layout: no default layout for {type(model).__name__} (not an nn.Sequential, a torchvision-"
                f"style ResNet, or a transformer stack with blocks at {', '.join('.'.join(r) for r in _BLOCK_PATHS)}); "
                f"{_quote(everything)} would be in no band: {_REMEDY}"
            )
        if plan.uncovered:
            raise BandError(
                f"default_layout: the {plan.kind} leaves {_quote(list(plan.uncovered))} in no band; their place in "
                f"the depth order is not readable from the module tree: {_REMEDY}"
            )
        kind = plan.kind
        layout = _split(plan, n_bands, names)

    _check_cover(model, layout, kind)
    try:
        resolve_bands(model, layout)
    except BandError as exc:
        raise BandError(f"default_layout: the {kind} layout does not resolve: {exc}; {_REMEDY}") from exc
    return layout


def _only_child(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, child)`` when every trainable parameter of ``model`` is in that one direct child."""
    if any(p.requires_grad for p in model.parameters(recurse=False)):
        return None
    holders = [(n, c) for n, c in model.named_children() if any(p.requires_grad for p in c.parameters())]
    return holders[0] if len(holders) == 1 else None


def _prefixed(layout: BandLayout, prefix: str) -> BandLayout:
    return BandLayout([Band(b.name, [f"{prefix}.{p}" for p in b.prefixes],
                            None if b.boundary is None else f"{prefix}.{b.boundary}") for b in layout.bands])


def _check_cover(model: nn.Module, layout: BandLayout, kind: str) -> None:
    """Refuse, with the remedy, parameters in no band and tied tensors that the layout puts in two bands."""
    params = _trainable(model)
    band_of: dict[str, int] = {}
    uncovered: list[str] = []
    for name, _ in params:
        hits = [k for k, b in enumerate(layout.bands) if any(prefix_matches(p, name) for p in b.prefixes)]
        if hits:
            band_of[name] = hits[0]
        else:
            uncovered.append(name)
    if uncovered:
        raise BandError(f"default_layout: the {kind} layout leaves {_quote(uncovered)} in no band: {_REMEDY}")
    first: dict[int, str] = {}
    for name, tid in params:
        other = first.setdefault(tid, name)
        if band_of[other] != band_of[name]:
            raise BandError(
                f"default_layout: {name} is the same tensor as {other} (an output layer tied to the input "
                f"embedding), and they fall in bands {layout.bands[band_of[name]].name!r} and "
                f"{layout.bands[band_of[other]].name!r}; one tensor cannot be scaled two ways. Untie them "
                f"(HuggingFace: config tie_word_embeddings=False), use n_bands=1, or {_REMEDY}"
            )


def layout_or_default(
    model: nn.Module, layout: BandLayout | None = None, *, n_bands: int = 3, names: Sequence[str] | None = None
) -> BandLayout:
    """``layout`` if given (checked against ``model``), else ``default_layout(model, n_bands, names)``.

    The override point: callers take a layout from the user when there is one
    and fall back to the structural default otherwise.
    """
    if layout is None:
        return default_layout(model, n_bands, names)
    resolve_bands(model, layout)
    return layout


def describe_layout(model: nn.Module, layout: BandLayout | None = None) -> str:
    """A readable table of ``layout`` (default: ``default_layout(model)``) on ``model``: bands, sizes, boundaries."""
    layout = layout if layout is not None else default_layout(model)
    bands = resolve_bands(model, layout)
    kind = detect_architecture(model) or type(model).__name__
    lines = [f"{kind}: {len(layout)} band(s), head first"]
    for band, params in zip(layout.bands, bands.params):
        count = sum(p.numel() for p in params)
        where = f"boundary {band.boundary}" if band.boundary else "model output"
        lines.append(f"  {band.name:<10} {count:>12,d} params  {where:<32} {', '.join(band.prefixes)}")
    return "\n".join(lines)
