"""Dataset commitment: the ordered manifests of a training set, fixed in the ledger before training.

The ledger records a DatasetCommitted observation whose ``root`` is the RFC 9162 Merkle root
over the signed manifests in order, and stores the manifests themselves as one artifact.
Batches are then recorded as indices into this order, so the data order a run used is
authenticated and omission or substitution is detectable (specs/manifests.md §5).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from gradledger.ledger import schema as s
from gradledger.ledger.credentials import Credential, CredentialRegistry
from gradledger.ledger.errors import SchemaError
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.ledger import Ledger
from gradledger.ledger.merkle import leaf_hash, root_of

from .errors import DatasetError, ManifestError
from .manifests import SignedManifest, columns_ids, parse_manifest, part_names_problem, verify_manifest

#: Any recorded revocation: every one was recorded before a commit appended now.
_ANY_TIME = 1 << 64


class CommittedDataset:
    """The manifests of a committed dataset, in committed order, and where they are recorded."""

    def __init__(
        self,
        name: str,
        root: bytes,
        manifests: Sequence[SignedManifest],
        artifact: bytes,
        seq: int | None,
        data: bytes | None = None,
    ) -> None:
        self.name = name
        self.root = root
        self.manifests: tuple[SignedManifest, ...] = tuple(manifests)
        self.artifact = artifact  # SHA-256 of the stored manifests artifact
        self.seq = seq  # the DatasetCommitted observation
        self.data = data  # SHA-256 of the stored inputs artifact, when the inputs are in the ledger
        self._by_example: dict[bytes, int] = {}
        for i, m in enumerate(self.manifests):
            # The same input may occur twice (real datasets have duplicates): the first wins.
            self._by_example.setdefault(m.example, i)
        self._by_digest = {m.digest: i for i, m in enumerate(self.manifests)}

    @property
    def count(self) -> int:
        return len(self.manifests)

    def __len__(self) -> int:
        return len(self.manifests)

    def __repr__(self) -> str:
        return f"CommittedDataset(name={self.name!r}, count={self.count}, root={self.root.hex()[:16]}...)"

    def index_of(self, example: bytes) -> int:
        """Index of the first manifest for ``example`` (an example id)."""
        i = self._by_example.get(example)
        if i is None:
            raise ManifestError(f"example {example.hex()[:16]} has no manifest in committed dataset {self.name!r}")
        return i

    def position(self, manifest: SignedManifest) -> int:
        """Index of exactly this signed manifest."""
        i = self._by_digest.get(manifest.digest)
        if i is None:
            raise ManifestError(
                f"manifest {manifest.digest.hex()[:16]} (example {manifest.example.hex()[:16]}) is not in "
                f"committed dataset {self.name!r}"
            )
        return i

    def manifest(self, index: int) -> SignedManifest:
        check_batch(self, [index])
        return self.manifests[index]


def check_batch(dataset: CommittedDataset, indices: Iterable[Any]) -> list[int]:
    """The batch as a list of ints; ``ManifestError`` for an index with no committed manifest."""
    raw = indices.tolist() if hasattr(indices, "tolist") else indices  # numpy arrays, tensors
    if not isinstance(raw, Iterable):
        raise ManifestError(f"a batch is a sequence of indices, got {type(indices).__name__}")
    batch = []
    for i in raw:
        if type(i) is not int:
            raise ManifestError(f"batch index {i!r} is not an integer")
        if not 0 <= i < dataset.count:
            raise ManifestError(
                f"batch index {i} is outside committed dataset {dataset.name!r} of {dataset.count} manifests"
            )
        batch.append(i)
    return batch


# -- artifact layout: canonical CBOR [* bstr], built and split without a generic CBOR pass -----


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes((major << 5 | n,))
    for code, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes((major << 5 | code,)) + n.to_bytes(size, "big")
    raise DatasetError("dataset too large")


def encode_manifests(manifests: Sequence[SignedManifest]) -> bytes:
    """The artifact: canonical CBOR array of the signed manifests' byte strings, in order."""
    return b"".join([_head(4, len(manifests))] + [_head(2, len(m.signed)) + m.signed for m in manifests])


def _read_head(data: bytes, pos: int, major: int) -> tuple[int, int]:
    if pos >= len(data) or data[pos] >> 5 != major:
        raise DatasetError(f"dataset artifact: expected CBOR major type {major} at byte {pos}")
    info = data[pos] & 0x1F
    if info < 24:
        return info, pos + 1
    if info > 27:
        raise DatasetError(f"dataset artifact: indefinite or reserved length at byte {pos}")
    size = 1 << (info - 24)
    n = int.from_bytes(data[pos + 1 : pos + 1 + size], "big")
    if pos + 1 + size > len(data) or _head(major, n) != data[pos : pos + 1 + size]:
        raise DatasetError(f"dataset artifact: non-canonical length at byte {pos}")
    return n, pos + 1 + size


def decode_manifests(data: bytes) -> list[bytes]:
    """Split an artifact into signed manifests, accepting only what ``encode_manifests`` writes."""
    count, pos = _read_head(data, 0, 4)
    items = []
    for _ in range(count):
        n, pos = _read_head(data, pos, 2)
        if pos + n > len(data):
            raise DatasetError("dataset artifact is truncated")
        items.append(data[pos : pos + n])
        pos += n
    if pos != len(data):
        raise DatasetError("dataset artifact has trailing bytes")
    return items


def dataset_root(manifests: Sequence[SignedManifest]) -> bytes:
    """RFC 9162 Merkle root over leaf_hash(signed manifest bytes), in dataset order."""
    return root_of([leaf_hash(m.signed) for m in manifests])


# -- commit and load ------------------------------------------------------


def _revoked_link(registry: CredentialRegistry, kid: bytes, at: int) -> Credential | None:
    """The first credential on ``kid``'s chain revoked at or before ``at``."""
    link = registry.get(kid)
    for _ in range(32):
        revoked = registry.revoked_at.get(link.key_id)
        if revoked is not None and revoked <= at:
            return link
        if link.self_signed:
            return None
        link = registry.get(link.issuer)
    return None


def _check(registry: CredentialRegistry, i: int, m: SignedManifest, committed_at: int) -> None:
    where = f"manifest {i} (example {m.example.hex()[:16]})"
    try:
        verify_manifest(m, registry)
    except ManifestError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    # A manifest's time is its signer's own claim, so a key revoked before the commit could
    # backdate new manifests; nothing revoked by the commit enters the dataset.
    keys = [("signer", m.signer)] + [(f"source {src['source']!r}", src["key_id"]) for src in m.manifest["sources"]]
    for what, kid in keys:
        link = _revoked_link(registry, kid, committed_at)
        if link is not None:
            raise ManifestError(
                f"{where}: {what} is under credential {link.subject!r}, revoked at time "
                f"{registry.revoked_at[link.key_id]}, before the dataset was committed"
            )


DATA_TENSOR = "x"
#: A structured example's part ``name`` is stored as tensor ``x.<name>`` (specs/manifests.md §5).
PART_PREFIX = "x."


def input_columns(inputs: Any) -> Any:
    """The committed inputs as stored: one tensor (row ``i`` = example ``i``), or, for examples made of
    parts, a dict part name -> tensor of rows. Accepts a tensor or array, a dict of such columns
    (a tokenizer's output, say), or a list of examples (tensors, or dicts or tuples of tensors)."""
    import torch

    if isinstance(inputs, Mapping):
        cols = {str(k): torch.as_tensor(v) for k, v in inputs.items()}
    elif isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], (Mapping, list, tuple)):
        first = inputs[0]
        names = [str(k) for k in first] if isinstance(first, Mapping) else [str(i) for i in range(len(first))]
        try:
            cols = {n: torch.stack([torch.as_tensor(_part(x, n)) for x in inputs]) for n in names}
        except (RuntimeError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise DatasetError(f"the examples' parts cannot be stored as one tensor each (row i = example i): "
                               f"{exc}") from None
    elif isinstance(inputs, (list, tuple)):
        try:
            return torch.stack([torch.as_tensor(x) for x in inputs]).detach().cpu().contiguous()
        except (RuntimeError, TypeError, ValueError) as exc:
            raise DatasetError(f"the examples cannot be stored as one tensor (row i = example i): {exc}") from None
    else:
        return torch.as_tensor(inputs).detach().cpu().contiguous()
    problem = part_names_problem(list(cols))
    if problem is not None:
        raise DatasetError(f"input parts: {problem}")
    return {n: c.detach().cpu().contiguous() for n, c in cols.items()}


def _part(x: Any, name: str) -> Any:
    return x[name] if isinstance(x, Mapping) else x[int(name)]


def example_rows(columns: Any, n: int) -> list[Any]:
    """Example ``i`` of stored ``columns`` (a tensor, or a dict of part columns), for ``example_id``."""
    if isinstance(columns, Mapping):
        return [{k: c[i] for k, c in columns.items()} for i in range(n)]
    return [columns[i] for i in range(n)]


def rows_of(columns: Any) -> int | None:
    """The number of rows of stored ``columns`` (a tensor, or a dict of part columns); None when they are
    not all batch-first with one number of rows."""
    cols = list(columns.values()) if isinstance(columns, Mapping) else [columns]
    rows = {c.shape[0] if c.dim() >= 1 else -1 for c in cols}
    return rows.pop() if len(rows) == 1 and -1 not in rows else None


def encode_inputs(inputs: Any, manifests: Sequence[SignedManifest]) -> bytes:
    """The inputs artifact: safetensors with one tensor ``x`` whose row ``i`` is example ``i`` or, for
    examples made of parts, one tensor ``x.<name>`` per part (specs/manifests.md §5).

    Every row must be the example its manifest names, so the artifact is bound to the
    commitment through the manifests' example ids.
    """
    from safetensors.torch import save

    cols = input_columns(inputs)
    if rows_of(cols) != len(manifests):
        shapes = {k: list(c.shape) for k, c in cols.items()} if isinstance(cols, Mapping) else list(cols.shape)
        raise DatasetError(f"inputs must have one row per manifest ({len(manifests)}), got shape {shapes}")
    for i, (got, m) in enumerate(zip(columns_ids(cols), manifests)):
        if got != m.example:
            raise ManifestError(f"input row {i} is not the example manifest {i} names ({m.example.hex()[:16]})")
    if isinstance(cols, Mapping):
        return save({PART_PREFIX + k: c for k, c in cols.items()})
    return save({DATA_TENSOR: cols})


def commit_dataset(
    ledger: Ledger, manifests: Sequence[SignedManifest], name: str, key: SigningKey, *, inputs: Any = None
) -> CommittedDataset:
    """Verify every manifest, store them as one artifact and record a DatasetCommitted (trainer key).

    With ``inputs`` (a tensor or array, row ``i`` = example ``i``; or a dict of part columns, see
    ``input_columns``), the inputs are stored too, so
    that unlearning and an export ``--with-data`` can replay from the ledger alone.
    """
    try:
        s.name(name, "dataset name")
    except SchemaError as exc:
        raise DatasetError(str(exc)) from None
    if not manifests:
        raise DatasetError(f"dataset {name!r} has no manifests")
    # Re-parse the bytes that will be stored, so no hand-built SignedManifest can differ from them.
    parsed = [parse_manifest(m.signed) for m in manifests]
    # Pending records (a revocation just appended) must count: the commit lands after them.
    ledger.commit()
    registry = ledger.registry
    for i, m in enumerate(parsed):
        _check(registry, i, m, _ANY_TIME)
    data = None if inputs is None else ledger.put_artifact(encode_inputs(inputs, parsed))
    artifact = ledger.put_artifact(encode_manifests(parsed))
    root = dataset_root(parsed)
    body: dict[str, Any] = {"name": name, "root": root, "count": len(parsed), "manifests": artifact}
    if data is not None:
        body["data"] = data
    sealed = ledger.append("DatasetCommitted", body, key, commit=True)
    return CommittedDataset(name, root, parsed, artifact, sealed.seq, data)


def load_inputs(ledger: Ledger, dataset: CommittedDataset) -> Any:
    """The stored inputs of ``dataset`` (a tensor, or a dict part name -> tensor), each row checked against its
    manifest's example id."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if dataset.data is None:
        raise DatasetError(f"dataset {dataset.name!r} was committed without its inputs")
    raw = ledger.artifact(dataset.data)
    if raw is None:
        raise DatasetError(f"inputs artifact {dataset.data.hex()[:16]} is not stored in the ledger")
    try:
        tensors = load(raw)
    except SafetensorError as exc:
        raise DatasetError(f"inputs artifact is not safetensors: {exc}") from None
    if set(tensors) == {DATA_TENSOR}:
        cols: Any = tensors[DATA_TENSOR]
    elif all(k.startswith(PART_PREFIX) for k in tensors) and part_names_problem(
            [k[len(PART_PREFIX):] for k in tensors]) is None:
        cols = {k[len(PART_PREFIX):]: t for k, t in tensors.items()}
    else:
        raise DatasetError(f"inputs artifact of dataset {dataset.name!r} holds {sorted(tensors)[:4]}: neither one "
                           "tensor 'x' nor tensors 'x.<part>'")
    if rows_of(cols) != dataset.count:
        raise DatasetError(f"inputs artifact of dataset {dataset.name!r} does not hold {dataset.count} rows")
    for i, (got, m) in enumerate(zip(columns_ids(cols), dataset.manifests)):
        if got != m.example:
            raise DatasetError(f"stored input row {i} is not the example manifest {i} names")
    return cols


def latest_dataset(ledger: Ledger, name: str) -> int | None:
    """The seq of the latest DatasetCommitted under ``name``, or None."""
    for seq in reversed(ledger.by_type("DatasetCommitted")):
        if ledger.observation(seq).body["name"] == name:
            return seq
    return None


def load_dataset(ledger: Ledger, seq: int, *, verify: bool = True) -> CommittedDataset:
    """Reload the dataset committed at ``seq``, re-checking count, root and (with ``verify``) every manifest."""
    sealed = ledger.observation_of_type(seq, "DatasetCommitted", DatasetError)
    name, root, count = sealed.body["name"], sealed.body["root"], sealed.body["count"]
    artifact = sealed.body["manifests"]
    data = ledger.artifact(artifact)
    if data is None:
        raise DatasetError(f"manifests artifact {artifact.hex()[:16]} is not stored in the ledger")
    items = decode_manifests(data)
    if len(items) != count:
        raise DatasetError(f"dataset {name!r}: artifact holds {len(items)} manifests, commitment says {count}")
    manifests = [parse_manifest(item) for item in items]
    if dataset_root(manifests) != root:
        raise DatasetError(f"dataset {name!r}: artifact manifests do not give the committed root")
    if verify:
        registry = ledger.registry
        for i, m in enumerate(manifests):
            _check(registry, i, m, sealed.time)
    return CommittedDataset(name, root, manifests, artifact, seq, sealed.body.get("data"))
