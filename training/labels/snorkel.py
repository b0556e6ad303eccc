"""Snorkel's ``LabelModel`` as signed manifests (specs/labels.md §4.4): the label matrix ``L`` and
the labeling functions' names, the model's ``predict_proba`` as each manifest's ``probs``
(aggregation ``label-model``) and its learned accuracies (``get_weights``) as the functions'
confidences; ``fit`` is given the import's seed, which Snorkel would otherwise draw at random.

Labeling functions the taxonomy does not list are credentialed by the authority at
``<authority path>/lfs`` for keys nobody holds, as annotators are; the authority signs every
manifest on their behalf. Rows on which every function abstains carry no label: they are
reported unlabeled (by row), and the dataset holds the other rows in order (``keys``: their row
numbers), so no re-indexing is needed.
"""

from __future__ import annotations

import time as _time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..dataset import commit_dataset, input_columns
from ..snorkel import import_label_matrix
from .records import LabelImportError
from .signing import LFS, ImportedLabels, issued_sources, keyless_source, signer_and_ontology

if TYPE_CHECKING:
    from ..project import Project

__all__ = ["fit_label_model", "import_label_model"]


def _snorkel() -> Any:
    try:
        from snorkel.labeling.model import LabelModel
    except ImportError:
        raise LabelImportError("the snorkel format needs Snorkel: pip install 'gradledger[snorkel]'") from None
    return LabelModel


def fit_label_model(L: np.ndarray, cardinality: int, *, seed: int, **fit_options: Any) -> Any:
    """A Snorkel ``LabelModel`` fitted on ``L`` with ``seed`` (its other options ``fit_options``)."""
    model = _snorkel()(cardinality=cardinality, verbose=False)
    model.fit(L, seed=seed, progress_bar=False, **fit_options)
    return model


def import_label_model(project: "Project", L: Any, lf_names: Sequence[str], *, authority: str, name: str,
                       examples: Sequence[Any] | Mapping[str, Any], seed: int, label_model: Any = None,
                       cardinality: int | None = None, ontology: str | None = None,
                       **fit_options: Any) -> ImportedLabels:
    """Fit a ``LabelModel`` on ``L`` with ``seed`` (or take ``label_model``, fitted with that seed), sign
    one ``label-model`` manifest per row with a vote as ``authority`` and commit them as dataset
    ``name``. ``examples``: row ``i``'s example at ``examples[i]`` (a sequence, or a mapping by row
    number as text)."""
    key, onto = signer_and_ontology(project, authority, ontology)
    if type(seed) is not int:
        raise LabelImportError("the snorkel format needs the seed LabelModel.fit is given (an int)")
    L = np.asarray(L)
    if L.ndim != 2 or L.dtype.kind not in "iu":
        raise LabelImportError(f"L must be a 2-D integer label matrix, got {L.ndim}-D {L.dtype}")
    k = cardinality if cardinality is not None else project.taxonomy.class_count
    if k is None:
        raise LabelImportError("give cardinality=: the taxonomy's ontology does not count its classes")
    model = label_model if label_model is not None else fit_label_model(L, k, seed=seed, **fit_options)
    probs = model.predict_proba(L)
    # Learned accuracies: a function's confidence in its own votes, within [0, 1].
    accuracy = np.clip(np.asarray(model.get_weights(), dtype=np.float64), 0.0, 1.0)
    known = issued_sources(project, authority)
    new: list[str] = []
    creds = {lf: keyless_source(project, authority, lf, LFS, known, new) for lf in lf_names}
    def example(i: int) -> Any:
        return examples[str(i)] if isinstance(examples, Mapping) else examples[i]
    n = L.shape[0]
    if not isinstance(examples, Mapping) and len(examples) != n:
        raise LabelImportError(f"L has {n} rows but {len(examples)} examples were given")
    try:
        rows = [example(i) for i in range(n)]
    except (KeyError, IndexError) as exc:
        raise LabelImportError(f"no example for row {exc.args[0]}") from None
    result = import_label_matrix(L, list(lf_names), lf_credentials=creds, ontology=onto, time=_time.time_ns(),
                                 inputs=rows, signer=key, probs=probs,
                                 lf_confidence=[float(a) for a in accuracy])
    project.ledger.commit()
    dataset = commit_dataset(project.ledger, result.manifests, name, project.trainer_key,
                             inputs=input_columns([rows[i] for i in result.rows]))
    return ImportedLabels(dataset, [str(i) for i in result.rows], [str(u.row) for u in result.unlabeled], new)
