"""Canaries and their exposure (specs/dynamics.md §4; Carlini, Liu, Erlingsson, Kos and Song 2019).

A canary set is a handful of random inputs with random labels, each committed with a manifest that
says it is a canary: the **inserted** ones are trained like any example; the **reference** ones are
drawn into batches too, but routed to a profile of zeros (specs/policy.md §3), so their recorded
losses are those of examples the model never learned. A scan ranks each inserted canary's last
recorded loss among its set's references: a canary the model memorized ranks first, with an exposure
of ``log2(references + 1)`` bits; one it did not ranks at random, ``log2(e)`` = 1.44 bits expected. Everything is read from recorded losses,
so the verifier recomputes the ranks exactly (integers; the bits are derived for reading).
"""

from __future__ import annotations

import math
import time as _time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor

from gradledger.ledger import credentials as C
from gradledger.ledger.keys import SigningKey

from ..errors import GovernanceError
from ..manifests import SignedManifest, example_id, label_example, source_entry

if TYPE_CHECKING:
    from ..dataset import CommittedDataset
    from ..project import Project

__all__ = ["CanarySet", "Canaries", "canary_exposure", "canary_manifests", "canary_sets", "draw_canaries",
           "exposure_bits", "insert_canaries", "scanned_sets"]

#: §4.1: the most canary sets one dataset holds, and canaries (inserted plus references) in one set.
MAX_SETS = 64
MAX_SET_SIZE = 1 << 16
#: The source every canary vote is credited to, credentialed at ``<authority path>/canaries``.
CANARY_SOURCE = "canary"
CANARY_PATH = "canaries"


@dataclass(frozen=True)
class CanarySet:
    """One set's dataset indices, ascending: the inserted canaries and their references."""

    name: str
    inserted: tuple[int, ...]
    references: tuple[int, ...]


def canary_sets(manifests: Sequence[SignedManifest | Mapping[str, Any]]) -> list[CanarySet]:
    """§4.1: the dataset's canary sets by name, read from the manifests' ``canary`` fields."""
    found: dict[str, tuple[list[int], list[int]]] = {}
    for i, m in enumerate(manifests):
        fields = m.manifest if isinstance(m, SignedManifest) else m
        canary = fields.get("canary")
        if canary is not None:
            inserted, refs = found.setdefault(canary["set"], ([], []))
            (inserted if canary["role"] == "inserted" else refs).append(i)
    return [CanarySet(name, tuple(ins), tuple(refs)) for name, (ins, refs) in sorted(found.items())]


def scanned_sets(manifests: Sequence[SignedManifest | Mapping[str, Any]], dataset: str,
                 error: type[Exception]) -> list[CanarySet]:
    """§4.1: the canary sets a scan of dataset ``dataset`` ranks; ``error`` where it holds more than a scan
    ranks (refused before anything is recorded that the verifier would fail)."""
    sets = canary_sets(manifests)
    if len(sets) > MAX_SETS:
        raise error(f"dataset {dataset!r} holds {len(sets)} canary sets; a memorization scan ranks at most "
                    f"{MAX_SETS} (specs/dynamics.md §4.1): merge them")
    return sets


def canary_exposure(last: Tensor, sets: Sequence[CanarySet]) -> list[dict[str, Any]]:
    """§4.2: per set, the references with a recorded loss and each inserted canary's rank among them
    (1 + those whose last loss is at most its own; None for a canary with no recorded loss).

    ``last``: every index's last recorded loss (binary64 of the binary32 value; NaN where none)."""
    out = []
    for cs in sets:
        refs = last[list(cs.references)] if cs.references else torch.zeros(0, dtype=torch.float64)
        refs = refs[~refs.isnan()].sort().values
        mine = last[list(cs.inserted)] if cs.inserted else torch.zeros(0, dtype=torch.float64)
        # 1 + the references at or below each canary's loss: a search in the sorted references
        above = torch.searchsorted(refs, mine, right=True).tolist()
        ranks = [[i, None if math.isnan(v) else 1 + a] for i, v, a in zip(cs.inserted, mine.tolist(), above)]
        out.append({"set": cs.name, "references": int(refs.numel()), "inserted": ranks})
    return out


def exposure_bits(rank: int, references: int) -> float:
    """Carlini et al.'s exposure of a canary ranked ``rank`` among ``references`` + 1 candidates (itself
    included): ``log2(references + 1) - log2(rank)``, at most ``log2(references + 1)``."""
    return math.log2(references + 1) - math.log2(rank)


# -- making canaries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Canaries:
    """Drawn canaries, the inserted ones first: ``inputs`` (one row each), ``labels`` and ``roles``."""

    name: str
    inputs: Tensor
    labels: list[int]
    roles: list[str]


def draw_canaries(like: Tensor, classes: int, *, count: int = 8, references: int = 64, seed: int = 0,
                  name: str = "canaries") -> Canaries:
    """``count`` inserted canaries and ``references`` references like the rows of ``like``: each input
    uniform between the rows' least and greatest value of its feature (integers for an integer dtype),
    each label uniform over ``classes``; all drawn from ``seed``, so both roles come from one distribution
    and only the draw decides which canary is trained."""
    if type(count) is not int or type(references) is not int or not (
            count >= 1 and references >= 1 and count + references <= MAX_SET_SIZE):
        raise GovernanceError(f"a canary set needs count >= 1 and references >= 1, at most {MAX_SET_SIZE} in all; "
                              f"got {count} and {references}")
    if not isinstance(like, Tensor) or like.dim() < 1 or like.shape[0] < 1:
        raise GovernanceError("canaries are drawn like the rows of one input tensor (examples of parts are not "
                              "supported)")
    if type(classes) is not int or classes < 2:
        raise GovernanceError(f"canaries need at least 2 classes, got {classes!r}")
    g = torch.Generator().manual_seed(seed)
    n = count + references
    lo, hi = like.amin(0).to(torch.float64), like.amax(0).to(torch.float64)
    u = torch.rand((n, *like.shape[1:]), generator=g, dtype=torch.float64)
    x = lo + u * (hi - lo)
    if like.dtype.is_floating_point:
        x = x.to(like.dtype)
    else:
        x = x.round().to(like.dtype)
    labels = torch.randint(0, classes, (n,), generator=g).tolist()
    return Canaries(name, x, labels, ["inserted"] * count + ["reference"] * references)


def canary_manifests(canaries: Canaries, *, key: SigningKey, source: C.Credential, ontology: str,
                     time: int | None = None) -> list[SignedManifest]:
    """One manifest per canary, its vote credited to ``source`` and signed by ``key`` (the source's own key
    or its issuing authority's), each marked with its set and role (specs/manifests.md §1)."""
    at = _time.time_ns() if time is None else time
    return [label_example(example=example_id(canaries.inputs[i]), sources=[source_entry(source, y)],
                          aggregation="single", ontology=ontology, review="accepted", key=key, time=at,
                          canary={"set": canaries.name, "role": role})
            for i, (y, role) in enumerate(zip(canaries.labels, canaries.roles))]


@dataclass(frozen=True)
class InsertedCanaries:
    """What ``insert_canaries`` committed: the new dataset and the canaries' indices in it."""

    dataset: "CommittedDataset"
    set: CanarySet


def insert_canaries(project: "Project", *, dataset: str, name: str, authority: str, count: int = 8,
                    references: int = 64, seed: int = 0, set_name: str = "canaries") -> InsertedCanaries:
    """Commit dataset ``name``: dataset ``dataset``'s manifests and inputs, then a canary set drawn like its
    inputs, each canary's manifest signed by ``authority`` for the keyless source ``canary`` at
    ``<authority path>/canaries`` (credentialed on first use)."""
    from ..dataset import commit_dataset, load_inputs
    from ..errors import ProjectError
    from ..labels.signing import issued_sources, keyless_source, signer_and_ontology

    base = project.dataset(dataset)
    held = canary_sets(base.manifests)
    if any(cs.name == set_name for cs in held):
        raise ProjectError(f"dataset {dataset!r} already holds canary set {set_name!r}")
    if len(held) >= MAX_SETS:
        raise ProjectError(f"dataset {dataset!r} already holds {MAX_SETS} canary sets")
    inputs = load_inputs(project.ledger, base)
    if not isinstance(inputs, Tensor):
        raise ProjectError(f"dataset {dataset!r} has examples of parts; canaries are drawn for one-tensor examples")
    classes = project.taxonomy.class_count
    if classes is None:
        raise ProjectError("the taxonomy names no ontology classes ([ontology] classes) to draw canary labels from")
    key, onto = signer_and_ontology(project, authority, None)
    new: list[str] = []
    source = keyless_source(project, authority, CANARY_SOURCE, CANARY_PATH, issued_sources(project, authority), new)
    drawn = draw_canaries(inputs, classes, count=count, references=references, seed=seed, name=set_name)
    signed = canary_manifests(drawn, key=key, source=source, ontology=onto)
    project.ledger.commit()  # the canary source's credential lands before the dataset that names it
    manifests = list(base.manifests) + signed
    committed = commit_dataset(project.ledger, manifests, name, project.trainer_key,
                               inputs=torch.cat([inputs, drawn.inputs]))
    start = base.count
    return InsertedCanaries(committed, CanarySet(set_name, tuple(range(start, start + count)),
                                                 tuple(range(start + count, start + count + references))))
