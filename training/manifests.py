"""Label manifests: one signed, credentialed provenance record per training example.

A manifest says which example (by the digest of its input bytes) carries which label, which
credentialed sources voted for it and how their votes were aggregated. It is signed with the
``manifest`` purpose. Every vote in it is signed by its own source, or by an authority (or the
root) above that source acting on its behalf, which a version-2 manifest records in the entry's
``attested_by`` (specs/manifests.md §4). specs/manifests.md is the normative twin of this
module; the verifier reimplements it from there.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from gradledger.ledger import encoding
from gradledger.ledger import schema as s
from gradledger.ledger.credentials import Credential, CredentialRegistry
from gradledger.ledger.errors import CredentialError, EncodingError, SchemaError, SignatureError
from gradledger.ledger.keys import SigningKey, verify_signature

from .errors import DatasetError, ManifestError

#: Version 2 records, per source entry, the authority that signs its vote on its behalf.
#: Version 1 (no such field) is still read, and held to the same rule (specs/manifests.md §4).
MANIFEST_VERSION = 2
MANIFEST_VERSIONS = (1, 2)
ABSTAIN = -1
AGGREGATIONS = ("single", "majority", "label-model")
REVIEW_STATES = ("accepted", "fixed", "rejected", "pending")
#: Class indices stay within 32 bits so every consumer (numpy, torch, other languages) holds them.
MAX_CLASS = (1 << 32) - 1
MAX_SOURCES = 4096
MAX_CLASSES = 1 << 16
MAX_ONTOLOGY = 128
#: 4096 sources or 65536 probabilities fit; anything larger is hostile input.
MAX_SIGNED_SIZE = 1 << 20
EXAMPLE_DOMAIN = "gradledger/example/v1"
#: An example of named parts (a dict or tuple of tensors, specs/manifests.md §2.1).
PARTS_DOMAIN = "gradledger/example-parts/v1"
#: A part's name: it also names a stored tensor and a program input.
PART_NAME = re.compile(r"[A-Za-z0-9_]{1,64}\Z")
MAX_PARTS = 64


def part_names_problem(names: Sequence[Any]) -> str | None:
    """What is wrong with ``names`` as an example's part names (§2.1), or None: 1 to ``MAX_PARTS`` of
    them, each 1 to 64 of A-Z a-z 0-9 _. The one check every reader of parts uses."""
    if not names or len(names) > MAX_PARTS:
        return f"an example of parts needs 1 to {MAX_PARTS} parts, got {len(names)}"
    bad = next((n for n in names if not isinstance(n, str) or not PART_NAME.match(n)), None)
    if bad is not None:
        return f"part name {bad!r} is not 1 to 64 of A-Z a-z 0-9 _ (it names a stored tensor and a program input)"
    return None

#: The fields a caller supplies; ``v``, ``signer`` and ``time`` come from signing.
CONTENT_FIELDS = (
    "example", "label", "sources", "aggregation", "consensus", "confidence",
    "ontology", "review", "prelabel", "probs", "canary",
)

#: specs/manifests.md §1: what a canary's manifest says it is (specs/dynamics.md §4).
CANARY_ROLES = ("inserted", "reference")


# -- schema ---------------------------------------------------------------


def _unit(value: Any, where: str) -> None:
    # Floats only: 1 and 1.0 encode differently, and one manifest must have one encoding.
    # NaN fails the comparison; -0.0 is refused for the same one-encoding reason.
    if type(value) is not float or not 0.0 <= value <= 1.0 or math.copysign(1.0, value) < 0:
        raise SchemaError(f"{where}: expected a float in [0, 1], got {value!r}")


def _class_index(value: Any, where: str) -> None:
    if type(value) is not int or not 0 <= value <= MAX_CLASS:
        raise SchemaError(f"{where}: expected a class index 0..{MAX_CLASS}, got {value!r}")


def _vote(value: Any, where: str) -> None:
    if type(value) is not int or not ABSTAIN <= value <= MAX_CLASS:
        raise SchemaError(f"{where}: expected a class index or -1 (abstain), got {value!r}")


def _short_text(limit: int) -> s.Check:
    def check(value: Any, where: str) -> None:
        if type(value) is not str or not 1 <= len(value) <= limit:
            raise SchemaError(f"{where}: expected 1..{limit} characters of text, got {value!r}")

    return check


_SOURCE_FIELDS: dict[str, Any] = dict(source=s.name, key_id=s.digest, vote=_vote, confidence=_unit)
SOURCE_SCHEMA_V1 = s.record("source", **_SOURCE_FIELDS)
SOURCE_SCHEMA = s.record("source", **_SOURCE_FIELDS, attested_by=(s.digest, False))
PRELABEL_SCHEMA = s.record("prelabel", run=_short_text(255), checkpoint=s.digest)
CANARY_SCHEMA = s.record("canary", set=s.name, role=s.one_of(*CANARY_ROLES))


def _manifest_schema(version: int, source: s.Schema) -> s.Schema:
    # ``canary`` is a version-2 field: a version-1 manifest never marks one.
    extra: dict[str, Any] = {"canary": (CANARY_SCHEMA, False)} if version >= 2 else {}
    return s.record(
        "manifest",
        v=s.one_of(version),
        example=s.digest,
        label=_class_index,
        sources=s.array(source, max_items=MAX_SOURCES, min_items=1),
        aggregation=s.one_of(*AGGREGATIONS),
        consensus=_unit,
        confidence=_unit,
        ontology=_short_text(MAX_ONTOLOGY),
        review=s.one_of(*REVIEW_STATES),
        prelabel=(PRELABEL_SCHEMA, False),
        probs=(s.array(_unit, max_items=MAX_CLASSES, min_items=1), False),
        signer=s.digest,
        time=s.uint,
        **extra,
    )


MANIFEST_SCHEMAS = {1: _manifest_schema(1, SOURCE_SCHEMA_V1), 2: _manifest_schema(2, SOURCE_SCHEMA)}
MANIFEST_SCHEMA = MANIFEST_SCHEMAS[MANIFEST_VERSION]


# -- example ids ----------------------------------------------------------

_DTYPES = frozenset({
    "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
})


def example_id(value: Any) -> bytes:
    """SHA-256 of the canonical bytes of one example's input (specs/manifests.md §2).

    The canonical bytes are the canonical CBOR array of four items::

        ["gradledger/example/v1", dtype, shape, data]

    - ``dtype``: text, one of bool, uint8, int8, uint16, int16, uint32, int32, uint64, int64,
      float16, bfloat16, float32, float64, complex64, complex128; or ``"bytes"`` for a raw
      byte string (an encoded file, say).
    - ``shape``: array of uints, the dimensions in order (``[]`` for a 0-d array, ``[len]``
      for raw bytes).
    - ``data``: byte string, the elements in C (row-major) order, each little-endian, with
      no padding; bool is one byte 0x00/0x01, complex is real then imaginary part. Floats are
      hashed as stored: -0.0 and 0.0, or two NaN payloads, give different ids.

    Accepts numpy arrays (and numpy scalars), torch tensors (any device; detached) and
    ``bytes``/``bytearray``/``memoryview``. The CBOR is hashed as a stream, never built.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = value if isinstance(value, bytes) else memoryview(value).tobytes()
        return _hash_parts("bytes", [len(data)], data)
    if type(value).__module__.split(".")[0] == "torch":
        return _hash_tensor(value)
    if isinstance(value, (np.ndarray, np.generic)):
        return _hash_array(np.asarray(value))
    if isinstance(value, (Mapping, tuple, list)):
        return parts_id(_named_parts(value))
    raise DatasetError(f"cannot derive an example id from a {type(value).__name__}; give an array, tensor, bytes, "
                       "or a dict or tuple of them")


def _named_parts(value: Mapping[str, Any] | Sequence[Any]) -> dict[str, bytes]:
    items = list(value.items()) if isinstance(value, Mapping) else [(str(i), v) for i, v in enumerate(value)]
    problem = part_names_problem([name for name, _ in items])
    if problem is not None:
        raise DatasetError(problem)
    out: dict[str, bytes] = {}
    for name, part in items:
        if isinstance(part, (Mapping, tuple, list)):
            raise DatasetError(f"example part {name!r} is itself a structure: parts are arrays, tensors or bytes")
        try:
            out[name] = example_id(part)
        except DatasetError as exc:
            raise DatasetError(f"a {type(value).__name__} example, part {name!r}: {exc}") from None
    return out


def parts_id(ids: Mapping[str, bytes]) -> bytes:
    """specs/manifests.md §2.1: the id of an example made of named parts, from each part's own id.

    SHA-256 of the canonical CBOR ``["gradledger/example-parts/v1", [[name, part_id], ...]]``,
    the pairs sorted by name, so a dict's key order never changes the id.
    """
    pairs = [[name, ids[name]] for name in sorted(ids)]
    return hashlib.sha256(encoding.encode([PARTS_DOMAIN, pairs])).digest()


def _hash_array(array: np.ndarray, dtype_name: str | None = None) -> bytes:
    name = dtype_name or array.dtype.name
    if name not in _DTYPES:
        raise DatasetError(f"example dtype {array.dtype} has no canonical byte form")
    # '<' is a no-op for one-byte types; astype copies only when order or layout differ.
    little = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)
    return _hash_parts(name, list(array.shape), little)


def _hash_tensor(tensor: Any) -> bytes:
    import torch  # only reached for tensors, so importing this module stays light

    t = tensor.detach().cpu()
    name = str(t.dtype).removeprefix("torch.")
    if name == "bfloat16":
        # numpy has no bfloat16; its 16 bits are carried by an int16 view unchanged.
        return _hash_array(t.contiguous().view(torch.int16).numpy(), "bfloat16")
    if name not in _DTYPES:
        raise DatasetError(f"example dtype {t.dtype} has no canonical byte form")
    return _hash_array(t.contiguous().numpy())


def _id_header(dtype_name: str, shape: list[int], nbytes: int) -> bytes:
    """The canonical CBOR of an example id's input up to its data bytes (``example_id``'s docstring)."""
    # 0x84: a CBOR array of 4 items; the items' canonical encodings follow back to back.
    return (b"\x84" + encoding.encode(EXAMPLE_DOMAIN) + encoding.encode(dtype_name) + encoding.encode(shape)
            + encoding.bstr_header(nbytes))


def _hash_parts(dtype_name: str, shape: list[int], data: Any) -> bytes:
    h = hashlib.sha256(_id_header(dtype_name, shape, memoryview(data).nbytes))
    h.update(data)
    return h.digest()


def column_ids(column: Any) -> list[bytes]:
    """``example_id`` of each row of a stacked column (a tensor or array, row ``i`` = example ``i``), the
    same digests as row by row: the conversion to canonical little-endian bytes and the CBOR header
    (one shape for every row) are done once, then each row's bytes hashed after it."""
    if type(column).__module__.split(".")[0] == "torch":
        import torch

        t = column.detach().cpu().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        array = t.view(torch.int16).numpy() if name == "bfloat16" else t.numpy()
    else:
        array = np.asarray(column)
        name = array.dtype.name
    if name not in _DTYPES:
        raise DatasetError(f"example dtype {array.dtype} has no canonical byte form")
    if array.ndim == 0:
        raise DatasetError("a column of examples needs a row dimension")
    little = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
    row_bytes = little.itemsize * int(np.prod(little.shape[1:], dtype=np.int64))
    prefix = _id_header(name, list(little.shape[1:]), row_bytes)
    raw = memoryview(little.reshape(-1).view(np.uint8))
    return [hashlib.sha256(prefix + raw[i * row_bytes:(i + 1) * row_bytes]).digest() for i in range(len(little))]


def columns_ids(columns: Any) -> list[bytes]:
    """``column_ids`` of a stored input (one column, or a dict of part columns: each row's parts id)."""
    if not isinstance(columns, Mapping):
        return column_ids(columns)
    per_part = {name: column_ids(col) for name, col in columns.items()}
    problem = part_names_problem(list(per_part))
    if problem is not None:
        raise DatasetError(problem)
    rows = {len(ids) for ids in per_part.values()}
    if len(rows) != 1:
        raise DatasetError("the part columns do not have one number of rows")
    return [parts_id({name: ids[i] for name, ids in per_part.items()}) for i in range(rows.pop())]


# -- aggregation ----------------------------------------------------------

#: Every finite double in [0, 1] is an integer multiple of 2**-1074, so weights sum exactly
#: as integers in that unit: the sum cannot depend on the order of the sources.
_UNIT_EXP = 1074


def _exact(x: float) -> int:
    num, den = x.as_integer_ratio()
    return num << (_UNIT_EXP - (den.bit_length() - 1))


def _votes(sources: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
    votes = []
    for i, src in enumerate(sources):
        try:
            vote, conf = src["vote"], float(src["confidence"])
        except (KeyError, TypeError, ValueError):
            raise ManifestError(f"source {i}: needs a vote and a numeric confidence") from None
        if not isinstance(vote, (int, np.integer)) or type(vote) is bool or not ABSTAIN <= vote <= MAX_CLASS:
            raise ManifestError(f"source {i}: vote {vote!r} is neither a class index nor -1")
        if not 0.0 <= conf <= 1.0:
            raise ManifestError(f"source {i}: confidence {conf!r} is not in [0, 1]")
        if vote != ABSTAIN:
            votes.append((int(vote), conf))
    return votes


def _consensus(votes: list[tuple[int, float]], label: int) -> float:
    return sum(1 for vote, _ in votes if vote == label) / len(votes)


def _argmax_first(scores: Mapping[int, Any]) -> int:
    # Ties go to the smallest class index, so the result never depends on input order.
    return min(scores, key=lambda c: (-scores[c], c))


def aggregate(
    sources: Sequence[Mapping[str, Any]], rule: str, probs: Sequence[float] | None = None
) -> tuple[int, float, float]:
    """``(label, consensus, confidence)`` of ``sources`` under ``rule``; pure and order-independent.

    Only non-abstaining sources (vote != -1) count; at least one is required.

    - ``single``: exactly one non-abstaining source; its vote and confidence.
    - ``majority``: each class scores the exact sum of its voters' confidences; the
      highest score wins, ties to the smallest class index; confidence is the winning
      score over the total, correctly rounded. If every voter has confidence 0, each vote
      counts 1 for choosing the label and the confidence is 0.0.
    - ``label-model``: ``probs`` (one probability per class) decide: label is the first
      index of the maximum, confidence is ``probs[label]``.

    consensus = (non-abstaining sources voting ``label``) / (non-abstaining sources).
    """
    votes = _votes(sources)
    if not votes:
        raise ManifestError("no source voted: every source abstains")
    if probs is not None and rule != "label-model":
        raise ManifestError(f"label-model probabilities given to the {rule!r} rule")
    if rule == "single":
        if len(votes) != 1:
            raise ManifestError(f"'single' needs exactly one non-abstaining source, got {len(votes)}")
        label, confidence = votes[0]
    elif rule == "majority":
        weight: dict[int, int] = {}
        for vote, conf in votes:
            weight[vote] = weight.get(vote, 0) + _exact(conf)
        total = sum(weight.values())
        if total == 0:
            counts: dict[int, int] = {}
            for vote, _ in votes:
                counts[vote] = counts.get(vote, 0) + 1
            label, confidence = _argmax_first(counts), 0.0
        else:
            label = _argmax_first(weight)
            confidence = weight[label] / total  # int / int is correctly rounded in Python
    elif rule == "label-model":
        if probs is None:
            raise ManifestError("'label-model' needs the label model's class probabilities")
        p = [float(x) for x in probs]
        if not p or len(p) > MAX_CLASSES or not all(0.0 <= x <= 1.0 for x in p):
            raise ManifestError(f"label-model probabilities must be 1..{MAX_CLASSES} values in [0, 1]")
        label = p.index(max(p))
        confidence = p[label]
    else:
        raise ManifestError(f"unknown aggregation rule {rule!r}; expected one of {', '.join(AGGREGATIONS)}")
    return label, _consensus(votes, label), confidence


def check_consistent(m: Mapping[str, Any]) -> None:
    """Label, consensus and confidence must be what the sources and rule give (specs/manifests.md §3).

    A reviewer who *fixed* a label overrides label and confidence; consensus is still
    measured against the label the manifest carries, so disagreement stays visible.
    """
    keys = [src["key_id"] for src in m["sources"]]
    if any(a >= b for a, b in zip(keys, keys[1:])):
        raise ManifestError("manifest sources must be sorted by key id, each key once")
    rule = m["aggregation"]
    if (rule == "label-model") != ("probs" in m):
        raise ManifestError("'probs' is required with the label-model rule and forbidden otherwise")
    if "probs" in m and m["label"] >= len(m["probs"]):
        raise ManifestError(f"label {m['label']} is outside the {len(m['probs'])} label-model classes")
    label, consensus, confidence = aggregate(m["sources"], rule, m.get("probs"))
    if m["review"] == "fixed":
        label, confidence = m["label"], m["confidence"]
        consensus = _consensus(_votes(m["sources"]), label)
    got = (m["label"], m["consensus"], m["confidence"])
    if got != (label, consensus, confidence):
        raise ManifestError(
            f"manifest says label/consensus/confidence {got}, but its sources under {rule!r} give "
            f"{(label, consensus, confidence)}"
        )


# -- signing and parsing --------------------------------------------------


@dataclass(frozen=True)
class SignedManifest:
    """A parsed signed manifest. ``signed`` is authoritative; ``manifest`` is its decoded map."""

    manifest: dict[str, Any]
    signed: bytes  # canonical CBOR [manifest_bytes, signature]
    digest: bytes  # SHA-256(signed)
    body: bytes = field(repr=False)  # manifest_bytes, what the signature covers
    signature: bytes = field(repr=False)

    @property
    def example(self) -> bytes:
        return self.manifest["example"]

    @property
    def label(self) -> int:
        return self.manifest["label"]

    @property
    def signer(self) -> bytes:
        return self.manifest["signer"]

    @property
    def time(self) -> int:
        return self.manifest["time"]

    @property
    def source_names(self) -> list[str]:
        return [src["source"] for src in self.manifest["sources"]]


def source_entry(credential: Credential, vote: int, confidence: float = 1.0) -> dict[str, Any]:
    """One ``sources`` item for a credentialed source; the name is the credential's subject."""
    return {"source": credential.subject, "key_id": credential.key_id, "vote": int(vote), "confidence": float(confidence)}


def _normalized_sources(sources: Sequence[Mapping[str, Any]], signer: bytes) -> list[dict[str, Any]]:
    out = []
    for src in sources:
        vote = src["vote"]
        entry = {
            "source": src["source"],
            "key_id": bytes(src["key_id"]),
            "vote": int(vote) if type(vote) is not bool else vote,  # numpy ints in, CBOR ints out
            "confidence": float(src["confidence"]),
        }
        # The signature is the signer's: every vote that is not the signer's own is one it signs
        # on that source's behalf, and says so. A re-signer (retirement) becomes the attester.
        if entry["key_id"] != signer:
            entry["attested_by"] = signer
        out.append(entry)
    # One content, one encoding: sources are kept in key-id order.
    return sorted(out, key=lambda src: src["key_id"])


def sign_manifest(
    *,
    example: bytes,
    label: int,
    sources: Sequence[Mapping[str, Any]],
    aggregation: str,
    consensus: float,
    confidence: float,
    ontology: str,
    review: str,
    key: SigningKey,
    time: int,
    prelabel: Mapping[str, Any] | None = None,
    probs: Sequence[float] | None = None,
    canary: Mapping[str, Any] | None = None,
) -> SignedManifest:
    """Build, check and sign a version-2 manifest. Refuses fields that ``parse_manifest`` would refuse.

    Each source entry other than the signer's own gets ``attested_by`` = the signer's key id:
    the signer signs that vote on the source's behalf, and ``verify_manifest`` accepts that only
    from an authority or root above the source.
    """
    body: dict[str, Any] = {
        "v": MANIFEST_VERSION,
        "example": bytes(example),
        "label": int(label),
        "sources": _normalized_sources(sources, key.key_id),
        "aggregation": aggregation,
        "consensus": float(consensus),
        "confidence": float(confidence),
        "ontology": ontology,
        "review": review,
        "signer": key.key_id,
        "time": int(time),
    }
    if prelabel is not None:
        body["prelabel"] = dict(prelabel)
    if probs is not None:
        body["probs"] = [float(p) for p in probs]
    if canary is not None:
        body["canary"] = dict(canary)
    _validate(body)
    data = encoding.encode(body)
    signature = key.sign("manifest", data)
    signed = encoding.encode([data, signature])
    return SignedManifest(body, signed, hashlib.sha256(signed).digest(), data, signature)


def label_example(
    *,
    example: bytes,
    sources: Sequence[Mapping[str, Any]],
    aggregation: str,
    ontology: str,
    review: str,
    key: SigningKey,
    time: int,
    probs: Sequence[float] | None = None,
    prelabel: Mapping[str, Any] | None = None,
    canary: Mapping[str, Any] | None = None,
) -> SignedManifest:
    """Aggregate ``sources`` with ``aggregate`` and sign the result."""
    label, consensus, confidence = aggregate(sources, aggregation, probs)
    return sign_manifest(
        example=example, label=label, sources=sources, aggregation=aggregation, consensus=consensus,
        confidence=confidence, ontology=ontology, review=review, key=key, time=time,
        prelabel=prelabel, probs=probs, canary=canary,
    )


def _validate(body: Any) -> None:
    try:
        version = body.get("v") if type(body) is dict else None
        if type(version) is not int or version not in MANIFEST_SCHEMAS:
            raise SchemaError(f"manifest.v: expected one of {list(MANIFEST_VERSIONS)}, got {version!r}")
        MANIFEST_SCHEMAS[version].validate(body)
    except SchemaError as exc:
        raise ManifestError(f"malformed manifest: {exc}") from None
    check_consistent(body)
    if body["v"] >= 2:
        check_attestations(body)


def check_attestations(m: Mapping[str, Any]) -> None:
    """Version 2 (specs/manifests.md §1): an entry carries ``attested_by`` iff its key is not the
    signer's, and then it names the signer, the only key whose signature the manifest carries."""
    for src in m["sources"]:
        own = src["key_id"] == m["signer"]
        if own and "attested_by" in src:
            raise ManifestError(f"source {src['source']!r} is the signer: its entry must not carry attested_by")
        if not own and src.get("attested_by") != m["signer"]:
            raise ManifestError(
                f"source {src['source']!r} is not the signer, so its entry must name the signer in attested_by")


def parse_manifest(signed: bytes) -> SignedManifest:
    """Strictly decode a signed manifest and check its schema and aggregation; not its signature."""
    try:
        # check_model=False: the pair's types and then the schema are checked right after.
        outer = encoding.decode(signed, max_size=MAX_SIGNED_SIZE, check_model=False)
        if type(outer) is not list or len(outer) != 2 or not all(type(x) is bytes for x in outer):
            raise SchemaError("a signed manifest is [manifest bytes, signature]")
        body = encoding.decode(outer[0], max_size=MAX_SIGNED_SIZE, check_model=False)
    except (EncodingError, SchemaError) as exc:
        raise ManifestError(f"malformed manifest: {exc}") from None
    _validate(body)
    return SignedManifest(body, bytes(signed), hashlib.sha256(signed).digest(), outer[0], outer[1])


# -- verification ---------------------------------------------------------


def _short(digest: bytes) -> str:
    return digest.hex()[:16]


def _chain_above(registry: CredentialRegistry, cred: Credential) -> list[bytes]:
    """Key ids of the issuers above ``cred``, nearest first, up to its root."""
    above, link = [], cred
    for _ in range(32):
        if link.self_signed:
            break
        above.append(link.issuer)
        link = registry.get(link.issuer)
    return above


def verify_manifest(m: SignedManifest, registry: CredentialRegistry) -> None:
    """Raise ``ManifestError`` unless ``m`` is validly signed and every vote in it is attested.

    specs/manifests.md §4: each source's vote is signed by that source itself (it is the
    signer) or by an authority or root on the issuer chain of that source's credential, acting
    on its behalf (recorded in ``attested_by`` from version 2 on). At the manifest's ``time``
    the signer's credential and every source's credential (with their issuer chains) must be in
    window and unrevoked, and each source's name must be its credential's subject.
    """
    body, at = m.manifest, m.manifest["time"]
    where = f"manifest for example {_short(body['example'])}"
    try:
        signer = registry.get(body["signer"])
    except CredentialError:
        raise ManifestError(f"{where}: signer key {_short(body['signer'])} has no recorded credential") from None
    try:
        verify_signature(signer.public_key, "manifest", m.body, m.signature)
    except SignatureError:
        raise ManifestError(f"{where}: signature does not verify for signer {signer.subject!r}") from None

    for src in body["sources"]:
        name = src["source"]
        try:
            cred = registry.check(src["key_id"], at, ("source",), what="be a label source")
        except CredentialError as exc:
            raise ManifestError(f"{where}: source {name!r} is not valid at time {at}: {exc}") from None
        if cred.subject != name:
            raise ManifestError(f"{where}: source {name!r} uses the key credentialed to {cred.subject!r}")
        if signer.key_id != cred.key_id and signer.key_id not in _chain_above(registry, cred):
            raise ManifestError(
                f"{where}: the vote of source {name!r} is signed by {signer.subject!r} ({signer.role} at "
                f"{signer.path}), which is neither that source nor an authority or root above it"
            )
    try:
        registry.check(signer.key_id, at, (signer.role,), what="sign manifests")
    except CredentialError as exc:
        raise ManifestError(f"{where}: signer {signer.subject!r} ({signer.role}) cannot sign at time {at}: {exc}") from None


# -- re-aggregation for retirement ----------------------------------------


def relabel_without(
    manifest: SignedManifest | Mapping[str, Any], source_name: str, probs: Sequence[float] | None = None
) -> dict[str, Any] | None:
    """The content fields of ``manifest`` re-aggregated without every source named ``source_name``.

    Returns keyword arguments for ``sign_manifest`` (add ``key`` and ``time``), the same
    fields unchanged if the source is not listed, or ``None`` if no non-abstaining source
    remains (the example is removed). A label-model manifest's probabilities were computed
    with the retired source, so unless ``probs`` from a label model refit without it are
    given, it falls back to ``majority`` over the remaining sources. A reviewer's fixed label
    and confidence stand; only consensus is recomputed.
    """
    m = manifest.manifest if isinstance(manifest, SignedManifest) else manifest
    fields = {k: m[k] for k in CONTENT_FIELDS if k in m}
    kept = [dict(src) for src in m["sources"] if src["source"] != source_name]
    if len(kept) == len(m["sources"]):
        return fields
    votes = _votes(kept)
    if not votes:
        return None
    rule = m["aggregation"]
    if rule == "label-model" and probs is None:
        rule = "majority"
    elif rule != "label-model":
        rule = "single" if len(votes) == 1 and rule == "single" else "majority"
    label, consensus, confidence = aggregate(kept, rule, probs if rule == "label-model" else None)
    if m["review"] == "fixed":
        label, confidence = m["label"], m["confidence"]
        consensus = _consensus(votes, label)
    fields.update(sources=kept, aggregation=rule, label=label, consensus=consensus, confidence=confidence)
    fields.pop("probs", None)
    if rule == "label-model":
        fields["probs"] = [float(p) for p in probs or ()]
    return fields
