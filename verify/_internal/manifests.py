"""Label manifests and dataset commitments, re-implemented from specs/manifests.md.

The verifier never imports the training package: this module is a second implementation
of the manifest format (§1, versions 1 and 2, §7), example ids (§2), aggregation and
consistency (§3), the vote attestation rule (§4), the dataset commitment (§5) and
re-aggregation without a source (§6). The tests check that it agrees with the trainer's and
with specs/vectors/manifests-v2.json; agreement of two implementations is the evidence.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping, Sequence

import numpy as np

from gradledger.ledger import encoding, merkle
from gradledger.ledger import schema as s
from gradledger.ledger.credentials import Credential, CredentialRegistry
from gradledger.ledger.errors import CredentialError, EncodingError, SchemaError, SignatureError, VerificationError
from gradledger.ledger.keys import verify_signature

ABSTAIN = -1
MAX_CLASS = (1 << 32) - 1
MAX_SIGNED = 1 << 20
AGGREGATIONS = ("single", "majority", "label-model")
REVIEWS = ("accepted", "fixed", "rejected", "pending")
EXAMPLE_DOMAIN = "gradledger/example/v1"
#: §2.1 an example of named parts; each part's name also names its stored tensor ``x.<name>``.
PARTS_DOMAIN = "gradledger/example-parts/v1"
PART_NAME = re.compile(r"[A-Za-z0-9_]{1,64}\Z")
MAX_PARTS = 64
PART_PREFIX = "x."
#: The manifest fields a re-signer supplies (everything but v, signer and time).
CONTENT_FIELDS = (
    "example", "label", "sources", "aggregation", "consensus", "confidence",
    "ontology", "review", "prelabel", "probs", "canary",
)


class ManifestInvalid(VerificationError):
    """A manifest, a dataset artifact or an inputs artifact breaks specs/manifests.md."""


# -- §1 format -----------------------------------------------------------------------


def _unit(value: Any, where: str) -> None:
    if type(value) is not float or not 0.0 <= value <= 1.0 or math.copysign(1.0, value) < 0:
        raise SchemaError(f"{where}: expected a float in [0.0, 1.0], not -0.0, got {value!r}")


def _int_in(lo: int, hi: int) -> s.Check:
    def check(value: Any, where: str) -> None:
        if type(value) is not int or not lo <= value <= hi:
            raise SchemaError(f"{where}: expected an integer in {lo}..{hi}, got {value!r}")
    return check


def _text(limit: int) -> s.Check:
    def check(value: Any, where: str) -> None:
        if type(value) is not str or not 1 <= len(value) <= limit:
            raise SchemaError(f"{where}: expected 1..{limit} characters, got {value!r}")
    return check


_VOTE = dict(source=s.name, key_id=s.digest, vote=_int_in(ABSTAIN, MAX_CLASS), confidence=_unit)
#: Version 1 entries have no attestation field; version 2 entries name the attesting signer.
_SOURCE = {1: s.record("source", **_VOTE), 2: s.record("source", **_VOTE, attested_by=(s.digest, False))}
_PRELABEL = s.record("prelabel", run=_text(255), checkpoint=s.digest)
#: §1: a canary's manifest says so, and which role it plays (version 2 only; dynamics.md §4).
_CANARY = s.record("canary", set=s.name, role=s.one_of("inserted", "reference"))
_MANIFEST = {
    v: s.record(
        "manifest",
        v=s.one_of(v),
        example=s.digest,
        label=_int_in(0, MAX_CLASS),
        sources=s.array(_SOURCE[v], max_items=4096, min_items=1),
        aggregation=s.one_of(*AGGREGATIONS),
        consensus=_unit,
        confidence=_unit,
        ontology=_text(128),
        review=s.one_of(*REVIEWS),
        prelabel=(_PRELABEL, False),
        probs=(s.array(_unit, max_items=65536, min_items=1), False),
        signer=s.digest,
        time=s.uint,
        **({"canary": (_CANARY, False)} if v == 2 else {}),
    )
    for v in (1, 2)
}


@dataclass(frozen=True)
class Manifest:
    """A parsed, consistent signed manifest; its signature is checked by ``verify_manifest``."""

    fields: dict[str, Any]
    signed: bytes
    body: bytes
    signature: bytes

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.signed).digest()

    @property
    def example(self) -> bytes:
        return self.fields["example"]

    @property
    def label(self) -> int:
        return self.fields["label"]

    @property
    def sources(self) -> list[dict[str, Any]]:
        return self.fields["sources"]


def _pair(signed: bytes, what: str, max_size: int) -> tuple[bytes, bytes]:
    outer = encoding.decode(signed, max_size=max_size)
    if type(outer) is not list or len(outer) != 2 or not all(type(x) is bytes for x in outer):
        raise SchemaError(f"a signed {what} is [{what} bytes, signature]")
    return outer[0], outer[1]


def parse_manifest(signed: bytes) -> Manifest:
    """Strict decode (both layers), schema of its version, consistency (§3) and, from version 2
    on, the attestation fields (§1); not the signature."""
    try:
        body, signature = _pair(signed, "manifest", MAX_SIGNED)
        fields = encoding.decode(body, max_size=MAX_SIGNED)
        schema = _MANIFEST.get(fields.get("v")) if type(fields) is dict and type(fields.get("v")) is int else None
        if schema is None:
            raise SchemaError("manifest.v is not a version this verifier implements (1 or 2)")
        schema.validate(fields)
    except (EncodingError, SchemaError) as exc:
        raise ManifestInvalid(f"malformed manifest: {exc}") from None
    check_consistent(fields)
    if fields["v"] == 2:
        for src in fields["sources"]:
            # §1: the one signature is the signer's; every other source's vote is one it attests.
            want = None if src["key_id"] == fields["signer"] else fields["signer"]
            if src.get("attested_by") != want:
                raise ManifestInvalid(
                    f"source {src['source']!r}: attested_by must be "
                    f"{'absent (it is the signer)' if want is None else 'the signer'}")
    return Manifest(fields, bytes(signed), body, signature)


# -- §2 example ids -------------------------------------------------------------------

_DTYPES = frozenset({
    "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "float32", "float64", "complex64", "complex128",
})


def example_id(array: np.ndarray, dtype_name: str | None = None) -> bytes:
    """SHA-256 of ``["gradledger/example/v1", dtype, shape, data]`` for a numpy array.

    ``dtype_name`` overrides the numpy name: bfloat16 rows arrive as 2-byte views.
    """
    name = dtype_name or array.dtype.name
    if name not in _DTYPES and name != "bfloat16":
        raise ManifestInvalid(f"dtype {name} has no example-id form")
    data = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False)).tobytes()
    return hashlib.sha256(encoding.encode([EXAMPLE_DOMAIN, name, list(array.shape), data])).digest()


def bytes_example_id(data: bytes) -> bytes:
    return hashlib.sha256(encoding.encode([EXAMPLE_DOMAIN, "bytes", [len(data)], data])).digest()


def parts_id(ids: Mapping[str, bytes]) -> bytes:
    """§2.1: SHA-256 of ``["gradledger/example-parts/v1", [[name, part_id], ...]]``, pairs sorted by name."""
    return hashlib.sha256(encoding.encode([PARTS_DOMAIN, [[n, ids[n]] for n in sorted(ids)]])).digest()


# -- §3 aggregation and consistency ------------------------------------------------------


def _votes(sources: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
    # The schema already bounds votes and confidences of a parsed manifest; §3's function checks
    # its own inputs too, so it refuses what the trainer's twin refuses (specs/vectors aggregate).
    votes = []
    for i, src in enumerate(sources):
        vote, conf = src["vote"], src["confidence"]
        if type(vote) is not int or not ABSTAIN <= vote <= MAX_CLASS:
            raise ManifestInvalid(f"source {i}: vote {vote!r} is neither a class index nor -1")
        if not isinstance(conf, float) or not 0.0 <= conf <= 1.0:
            raise ManifestInvalid(f"source {i}: confidence {conf!r} is not in [0, 1]")
        if vote != ABSTAIN:
            votes.append((vote, conf))
    return votes


def _smallest_best(scores: Mapping[int, Any]) -> int:
    best = max(scores.values())
    return min(c for c, v in scores.items() if v == best)


def _consensus(votes: Sequence[tuple[int, float]], label: int) -> float:
    # int / int in Python is the correctly rounded quotient.
    return sum(1 for v, _ in votes if v == label) / len(votes)


def aggregate(
    sources: Sequence[Mapping[str, Any]], rule: str, probs: Sequence[float] | None = None
) -> tuple[int, float, float]:
    """``(label, consensus, confidence)`` per §3; ``ManifestInvalid`` when the rule cannot apply."""
    votes = _votes(sources)
    if not votes:
        raise ManifestInvalid("no source votes: every source abstains")
    if probs is not None and rule != "label-model":
        raise ManifestInvalid(f"label-model probabilities given to the {rule!r} rule")
    if rule == "single":
        if len(votes) != 1:
            raise ManifestInvalid(f"'single' needs exactly one vote, got {len(votes)}")
        label, confidence = votes[0]
    elif rule == "majority":
        # Fractions hold the exact sums; the specification's integer in units of 2^-1074
        # is another way to the same numbers.
        weight: dict[int, Fraction] = {}
        for vote, conf in votes:
            weight[vote] = weight.get(vote, Fraction(0)) + Fraction(conf)
        total = sum(weight.values(), Fraction(0))
        if total == 0:
            counts: dict[int, int] = {}
            for vote, _ in votes:
                counts[vote] = counts.get(vote, 0) + 1
            label, confidence = _smallest_best(counts), 0.0
        else:
            label = _smallest_best(weight)
            ratio = weight[label] / total
            confidence = ratio.numerator / ratio.denominator  # rounded once, ties to even
    elif rule == "label-model":
        if not probs or not all(isinstance(p, float) and 0.0 <= p <= 1.0 for p in probs):
            raise ManifestInvalid("'label-model' needs probs, each in [0, 1]")
        label = _smallest_best(dict(enumerate(probs)))
        confidence = probs[label]
    else:
        raise ManifestInvalid(f"unknown aggregation {rule!r}")
    return label, _consensus(votes, label), confidence


def _bits(x: float) -> bytes:
    return np.float64(x).tobytes()


def check_consistent(fields: Mapping[str, Any]) -> None:
    """§3: sorted sources, probs iff label-model, and label/consensus/confidence as aggregated."""
    keys = [src["key_id"] for src in fields["sources"]]
    if any(a >= b for a, b in zip(keys, keys[1:])):
        raise ManifestInvalid("sources are not sorted by key id, strictly increasing")
    rule = fields["aggregation"]
    if (rule == "label-model") != ("probs" in fields):
        raise ManifestInvalid("probs must be present exactly when aggregation is 'label-model'")
    if "probs" in fields and fields["label"] >= len(fields["probs"]):
        raise ManifestInvalid(f"label {fields['label']} is outside the {len(fields['probs'])} label-model classes")
    label, consensus, confidence = aggregate(fields["sources"], rule, fields.get("probs"))
    if fields["review"] == "fixed":
        label, confidence = fields["label"], fields["confidence"]
        consensus = _consensus(_votes(fields["sources"]), label)
    got = (fields["label"], _bits(fields["consensus"]), _bits(fields["confidence"]))
    if got != (label, _bits(consensus), _bits(confidence)):
        raise ManifestInvalid(
            f"label/consensus/confidence {(fields['label'], fields['consensus'], fields['confidence'])} are not "
            f"what its sources give under {rule!r}: {(label, consensus, confidence)}"
        )


# -- §4 every vote signed by its source or on its behalf; credential validity ------------------


def _issuers_above(registry: CredentialRegistry, cred: Credential) -> set[bytes]:
    above, link = set(), cred
    for _ in range(32):
        if link.self_signed:
            break
        above.add(link.issuer)
        link = registry.get(link.issuer)
    return above


def verify_manifest(m: Manifest, registry: CredentialRegistry) -> None:
    """§4: signature by ``signer``; every source credentialed, named and valid at ``time``; every
    source's vote signed by that source or by an issuer above it (on its behalf); the signer's
    chain valid at ``time``. Versions 1 and 2 are held to the same rule."""
    f, at = m.fields, m.fields["time"]
    try:
        signer = registry.get(f["signer"])
    except CredentialError:
        raise ManifestInvalid(f"signer key {f['signer'].hex()[:16]} has no recorded credential") from None
    try:
        verify_signature(signer.public_key, "manifest", m.body, m.signature)
    except SignatureError:
        raise ManifestInvalid(f"signature does not verify under signer {signer.subject!r}") from None
    for src in f["sources"]:
        try:
            cred = registry.check(src["key_id"], at, ("source",), what="be a label source")
        except CredentialError as exc:
            raise ManifestInvalid(f"source {src['source']!r} is not valid at time {at}: {exc}") from None
        if cred.subject != src["source"]:
            raise ManifestInvalid(f"source {src['source']!r} uses the key credentialed to {cred.subject!r}")
        if signer.key_id != cred.key_id and signer.key_id not in _issuers_above(registry, cred):
            raise ManifestInvalid(
                f"source {src['source']!r}: its vote is signed by {signer.subject!r}, neither that source nor an "
                "issuer above it")
    try:
        registry.check(signer.key_id, at, (signer.role,), what="sign manifests")
    except CredentialError as exc:
        raise ManifestInvalid(f"signer {signer.subject!r} cannot sign at time {at}: {exc}") from None


def revoked_by(registry: CredentialRegistry, kid: bytes, at: int) -> Credential | None:
    """The first credential on ``kid``'s chain with a revocation recorded at a time <= ``at`` (§5)."""
    link = registry.get(kid)
    for _ in range(32):
        revoked = registry.revoked_at.get(link.key_id)
        if revoked is not None and revoked <= at:
            return link
        if link.self_signed:
            return None
        link = registry.get(link.issuer)
    return None


# -- §5 the dataset commitment ------------------------------------------------------------


def split_dataset(artifact: bytes) -> list[bytes]:
    """The canonical ``[* bstr]`` dataset artifact, item by item; nothing else is accepted."""
    try:
        items = encoding.decode(artifact, max_size=max(len(artifact), 1))
    except EncodingError as exc:
        raise ManifestInvalid(f"manifests artifact is not canonical CBOR: {exc}") from None
    if type(items) is not list or not all(type(x) is bytes for x in items):
        raise ManifestInvalid("manifests artifact is not an array of byte strings")
    return items


def dataset_root(items: Sequence[bytes]) -> bytes:
    return merkle.root_of([merkle.leaf_hash(item) for item in items])


#: safetensors dtype codes this reader accepts -> (dtype name, numpy little-endian dtype).
_ST = {"F64": ("float64", "<f8"), "F32": ("float32", "<f4"), "F16": ("float16", "<f2"), "BF16": ("bfloat16", "<u2"),
       "I64": ("int64", "<i8"), "I32": ("int32", "<i4"), "I16": ("int16", "<i2"), "I8": ("int8", "i1"),
       "U8": ("uint8", "u1"), "BOOL": ("bool", "?")}


def read_safetensors(data: bytes) -> dict[str, tuple[np.ndarray, str]]:
    """Every tensor of a safetensors file as ``(array, dtype name)``, read by this module's own parser:
    bounds checked against the file before any slice (bfloat16 arrives as its raw 2-byte elements, which
    numpy cannot name). Tensors must tile the data area exactly, as the format requires."""
    try:
        if len(data) < 8:
            raise ValueError("shorter than its header length")
        n = int.from_bytes(data[:8], "little")
        if n > len(data) - 8:
            raise ValueError(f"header of {n} bytes in a file of {len(data)}")
        header = json.loads(data[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        header.pop("__metadata__", None)
        body = len(data) - 8 - n
        out, spans = {}, []
        for name, info in header.items():
            if not isinstance(info, dict) or info.get("dtype") not in _ST:
                raise ValueError(f"tensor {name!r}: dtype {info.get('dtype') if isinstance(info, dict) else None!r}")
            dname, np_dtype = _ST[info["dtype"]]
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 16:
                raise ValueError(f"tensor {name!r}: shape {shape!r}")
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
                raise ValueError(f"tensor {name!r}: data_offsets {offsets!r}")
            begin, end = offsets
            size = math.prod(shape) * np.dtype(np_dtype).itemsize
            if not 0 <= begin <= end <= body or end - begin != size:
                raise ValueError(f"tensor {name!r}: data_offsets {offsets} do not hold shape {shape}")
            spans.append((begin, end))
            raw = np.frombuffer(data, dtype=np_dtype, count=math.prod(shape), offset=8 + n + begin)
            out[name] = (raw.reshape(shape), dname)
        pos = 0
        for begin, end in sorted(spans):
            if begin != pos:
                raise ValueError("tensors overlap or leave gaps in the data area")
            pos = end
        if pos != body:
            raise ValueError("the data area holds bytes no tensor names")
        return out
    except (ValueError, TypeError, OverflowError) as exc:
        raise ManifestInvalid(f"inputs artifact is not a readable safetensors file: {exc}") from None


def input_parts(names: Sequence[str]) -> list[str] | None:
    """The part names of an inputs artifact's tensors in canonical order, or None when it is one tensor
    ``x`` (§5): tensors ``x.<part>``, 1 to ``MAX_PARTS`` of them, each part named by §2.1."""
    if list(names) == ["x"]:
        return None
    parts = sorted(n[len(PART_PREFIX):] for n in names if n.startswith(PART_PREFIX))
    if not 1 <= len(parts) == len(names) <= MAX_PARTS or not all(PART_NAME.match(p) for p in parts):
        raise ManifestInvalid(f"inputs artifact holds {sorted(names)[:4]}: neither exactly one tensor 'x' nor "
                              f"1 to {MAX_PARTS} tensors 'x.<part>'")
    return parts


def check_inputs(data: bytes, examples: Sequence[bytes]) -> None:
    """§5 Inputs: one tensor ``x``, or tensors ``x.<part>``, each of ``len(examples)`` rows; example i's
    id (§2, or §2.1 from its parts' rows) is ``examples[i]``."""
    tensors = read_safetensors(data)
    parts = input_parts(list(tensors))
    columns = [("x", None)] if parts is None else [(PART_PREFIX + p, p) for p in parts]
    for name, _ in columns:
        x = tensors[name][0]
        if x.ndim < 1 or x.shape[0] != len(examples):
            raise ManifestInvalid(f"inputs tensor {name} has shape {list(x.shape)}, not {len(examples)} rows")
    for i, want in enumerate(examples):
        if parts is None:
            x, dtype = tensors["x"]
            got = example_id(x[i], dtype)
        else:
            got = parts_id({p: example_id(tensors[name][0][i], tensors[name][1]) for name, p in columns})
        if got != want:
            raise ManifestInvalid(f"input row {i} is not the example its manifest names ({want.hex()[:16]})")


# -- §6 re-aggregation without a source ------------------------------------------------------


def relabel_without(
    fields: Mapping[str, Any], source_name: str, probs: Sequence[float] | None = None
) -> dict[str, Any] | None:
    """The content fields of a manifest without the entries named ``source_name``; None if no vote is left."""
    out = {k: fields[k] for k in CONTENT_FIELDS if k in fields}
    kept = [dict(src) for src in fields["sources"] if src["source"] != source_name]
    if len(kept) == len(fields["sources"]):
        return out
    votes = _votes(kept)
    if not votes:
        return None
    rule = fields["aggregation"]
    if rule == "label-model":
        rule = "label-model" if probs is not None else "majority"
    elif not (rule == "single" and len(votes) == 1):
        rule = "majority"
    label, consensus, confidence = aggregate(kept, rule, list(probs) if rule == "label-model" and probs else None)
    if fields["review"] == "fixed":
        label, confidence = fields["label"], fields["confidence"]
        consensus = _consensus(votes, label)
    out.update(sources=kept, aggregation=rule, label=label, consensus=consensus, confidence=confidence)
    out.pop("probs", None)
    if rule == "label-model":
        out["probs"] = [float(p) for p in probs or ()]
    return out
