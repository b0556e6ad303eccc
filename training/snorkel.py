"""Import a Snorkel-style label matrix as signed manifests; Snorkel itself is not needed.

``L[i, j]`` is labeling function j's vote on example i, ``-1`` meaning abstain (Snorkel's
convention). Each row with at least one vote becomes one manifest whose sources are the
credentialed labeling functions. Rows on which every function abstains carry no label to
sign, so they are returned separately as ``unlabeled`` and the caller decides (send them to
annotators, drop them); no manifest is made for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from gradledger.ledger import schema as s
from gradledger.ledger.credentials import Credential
from gradledger.ledger.errors import SchemaError
from gradledger.ledger.keys import SigningKey

from .errors import DatasetError
from .manifests import ABSTAIN, MAX_CLASS, MAX_CLASSES, REVIEW_STATES, SignedManifest, example_id, label_example


@dataclass(frozen=True)
class Unlabeled:
    """A row on which every labeling function abstained."""

    row: int
    example: bytes


@dataclass
class ImportResult:
    manifests: list[SignedManifest] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # rows[i]: the matrix row of manifests[i]
    unlabeled: list[Unlabeled] = field(default_factory=list)


def import_label_matrix(
    L: np.ndarray,
    lf_names: Sequence[str],
    *,
    lf_credentials: Mapping[str, Credential],
    ontology: str,
    time: int,
    inputs: Sequence[Any] | None = None,
    example_ids: Sequence[bytes] | None = None,
    signer: SigningKey | None = None,
    lf_keys: Mapping[str, SigningKey] | None = None,
    probs: np.ndarray | None = None,
    lf_confidence: Mapping[str, float] | Sequence[float] | None = None,
    review: str = "accepted",
    include_abstains: bool = False,
) -> ImportResult:
    """Sign one manifest per row of ``L`` that has a vote (see the module docstring).

    - Examples: ``inputs`` (n arrays, tensors or byte strings, hashed with ``example_id``)
      or ``example_ids`` (n precomputed 32-byte ids), exactly one.
    - Signing: ``signer`` signs every manifest (the authority that issued the labeling
      functions' credentials, or one above it), attesting each function's vote on its behalf
      (``attested_by``, specs/manifests.md §4); or ``lf_keys`` gives each function's key and a
      row is signed by its one listed function. Exactly one. A vote must be signed by its own
      source or by an authority over it, so with ``lf_keys`` a row that lists several functions
      (several votes, or abstentions with ``include_abstains``) is refused.
    - Aggregation: with ``probs`` (n x k label-model probabilities) every manifest uses
      ``label-model`` and carries its row of ``probs``; otherwise ``single`` for a row with
      one vote and ``majority`` for more, each vote weighted by ``lf_confidence`` (per
      function, e.g. learned accuracies; default 1.0).
    - Sources: the voting functions of the row; all m functions (abstentions as -1) with
      ``include_abstains``.
    """
    L = _label_matrix(L)
    n, m = L.shape
    names = _lf_names(lf_names, m)
    creds = _lf_credentials(names, lf_credentials)
    conf = _lf_confidence(names, lf_confidence)
    ids = _example_ids(n, inputs, example_ids)
    P = _probs(probs, n, L)
    keys = _keys(names, creds, signer, lf_keys)
    if review not in REVIEW_STATES:
        raise DatasetError(f"review {review!r} is not one of {', '.join(REVIEW_STATES)}")
    if type(time) is not int or time < 0:
        raise DatasetError(f"time must be unix nanoseconds (an unsigned integer), got {time!r}")

    result = ImportResult()
    for i, row in enumerate(L.tolist()):
        voters = [j for j, vote in enumerate(row) if vote != ABSTAIN]
        if not voters:
            result.unlabeled.append(Unlabeled(i, ids[i]))
            continue
        columns = range(m) if include_abstains else voters
        if lf_keys is not None and len(columns) != 1:
            # One function's key may sign only its own vote (specs/manifests.md §4).
            raise DatasetError(
                f"row {i} lists {len(columns)} labeling functions; each vote must be signed by its own function "
                "or by an authority over them: give signer= (the functions' authority) instead of lf_keys=")
        sources = [
            {"source": names[j], "key_id": creds[j].key_id, "vote": row[j], "confidence": conf[j]} for j in columns
        ]
        rule = "label-model" if P is not None else ("single" if len(voters) == 1 else "majority")
        result.manifests.append(
            label_example(
                example=ids[i], sources=sources, aggregation=rule, ontology=ontology, review=review,
                key=keys[columns[0]], time=time, probs=P[i] if P is not None else None,
            )
        )
        result.rows.append(i)
    return result


def _label_matrix(L: Any) -> np.ndarray:
    L = np.asarray(L)
    if L.ndim != 2 or L.dtype.kind not in "iu":
        raise DatasetError(f"label matrix must be a 2-D integer array (examples x LFs), got {L.ndim}-D {L.dtype}")
    if L.shape[1] == 0:
        raise DatasetError("label matrix has no labeling-function columns")
    if L.size and (L.min() < ABSTAIN or L.max() > MAX_CLASS):
        raise DatasetError(f"label matrix values must be -1 (abstain) or class indices 0..{MAX_CLASS}")
    return L


def _lf_names(lf_names: Sequence[str], m: int) -> list[str]:
    names = list(lf_names)
    if len(names) != m:
        raise DatasetError(f"label matrix has {m} columns but {len(names)} labeling-function names")
    if len(set(names)) != m:
        raise DatasetError("labeling-function names must be unique")
    for name in names:
        try:
            s.name(name, "labeling-function name")
        except SchemaError as exc:
            raise DatasetError(str(exc)) from None
    return names


def _lf_credentials(names: list[str], lf_credentials: Mapping[str, Credential]) -> list[Credential]:
    creds = []
    for name in names:
        cred = lf_credentials.get(name)
        if cred is None:
            raise DatasetError(f"no credential given for labeling function {name!r}")
        # The manifest names a source by its credential subject; a mismatch would be a forged name.
        if cred.subject != name or cred.role != "source":
            raise DatasetError(f"credential for {name!r} is a {cred.role} credential for {cred.subject!r}")
        creds.append(cred)
    return creds


def _lf_confidence(names: list[str], given: Mapping[str, float] | Sequence[float] | None) -> list[float]:
    if given is None:
        return [1.0] * len(names)
    if isinstance(given, Mapping):
        missing = [name for name in names if name not in given]
        if missing:
            raise DatasetError(f"no confidence given for labeling function {missing[0]!r}")
        values = [given[name] for name in names]
    else:
        values = list(given)
        if len(values) != len(names):
            raise DatasetError(f"{len(values)} labeling-function confidences for {len(names)} functions")
    out = [float(v) for v in values]
    if not all(0.0 <= v <= 1.0 for v in out):
        raise DatasetError("labeling-function confidences must lie in [0, 1]")
    return [v + 0.0 for v in out]  # -0.0 becomes 0.0: manifests have one encoding of zero


def _example_ids(n: int, inputs: Sequence[Any] | None, ids: Sequence[bytes] | None) -> list[bytes]:
    if (inputs is None) == (ids is None):
        raise DatasetError("give exactly one of inputs= (example arrays) or example_ids=")
    if ids is not None:
        out = [bytes(x) if isinstance(x, (bytes, bytearray)) else x for x in ids]
        if len(out) != n or not all(type(x) is bytes and len(x) == 32 for x in out):
            raise DatasetError(f"example_ids must be {n} 32-byte digests, one per label-matrix row")
        return out
    if len(inputs) != n:  # type: ignore[arg-type]
        raise DatasetError(f"label matrix has {n} rows but {len(inputs)} inputs were given")  # type: ignore[arg-type]
    return [example_id(x) for x in inputs]  # type: ignore[union-attr]


def _probs(probs: Any, n: int, L: np.ndarray) -> list[list[float]] | None:
    if probs is None:
        return None
    P = np.asarray(probs, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] != n or not 1 <= P.shape[1] <= MAX_CLASSES:
        raise DatasetError(f"label-model probabilities must be {n} x k (1 <= k <= {MAX_CLASSES}), got {P.shape}")
    if not np.all((P >= 0.0) & (P <= 1.0)):
        raise DatasetError("label-model probabilities must be finite and lie in [0, 1]")
    if L.size and L.max() >= P.shape[1]:
        raise DatasetError(f"label matrix votes class {int(L.max())} but probabilities cover only {P.shape[1]} classes")
    # +0.0 folds -0.0 into 0.0; tolist() yields plain floats for CBOR.
    return (P + 0.0).tolist()


def _keys(
    names: list[str], creds: list[Credential], signer: SigningKey | None, lf_keys: Mapping[str, SigningKey] | None
) -> list[SigningKey]:
    if (signer is None) == (lf_keys is None):
        raise DatasetError("give exactly one of signer= or lf_keys=")
    if signer is not None:
        return [signer] * len(names)
    keys = []
    for name, cred in zip(names, creds):
        key = lf_keys.get(name)  # type: ignore[union-attr]
        if key is None:
            raise DatasetError(f"no signing key given for labeling function {name!r}")
        if key.key_id != cred.key_id:
            raise DatasetError(f"signing key for {name!r} does not match its credential")
        keys.append(key)
    return keys

