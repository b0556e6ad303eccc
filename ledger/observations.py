"""The observation type registry: per type, its body schema, who may sign it,
and what it is indexed under.

Later components (governed training, unlearning) fill bodies in; the ledger
only relies on the fields named here. specs/observations.md is the CDDL twin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from . import schema as s
from .errors import SchemaError

def scalar(value: Any, where: str) -> None:
    if type(value) in (int, float):
        s.number(value, where)
    elif not (type(value) in (str, bool) or value is None):
        s._fail(where, "scalar", value)


scalar_map = s.text_map(scalar)
digest_map = s.text_map(s.digest)
norms = s.number_array(64)


def any_value(value: Any, where: str, depth: int = 0) -> None:
    """Free-form settings (optimizer hyper-parameters...): the CBOR data model, depth-bounded."""
    if depth > 8:
        raise SchemaError(f"{where}: nested too deep")
    kind = type(value)
    if kind is str or kind is bytes or kind is bool or value is None:
        return
    if kind is int or kind is float:
        return s.number(value, where)
    if kind is list:
        for i, item in enumerate(value):
            any_value(item, where, depth + 1)
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                s._fail(f"{where} key", "text", key)
            any_value(item, where, depth + 1)
        return
    s._fail(where, "CBOR value", value)


@dataclass(frozen=True)
class IndexKeys:
    """What an observation is filed under, besides its type and its signer's path."""

    authorities: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    examples: tuple[int, ...] = ()


NO_KEYS = IndexKeys()


@dataclass(frozen=True)
class ObservationType:
    name: str
    schema: s.Schema
    #: Roles whose credentials may sign this type (signer authorization).
    signers: frozenset[str]
    index: Callable[[dict[str, Any]], IndexKeys] = field(default=lambda body: NO_KEYS)


def _governed_update_keys(body: dict[str, Any]) -> IndexKeys:
    return IndexKeys(
        authorities=tuple(body["authority_writes"]),
        sources=tuple(body.get("sources", ())),
        examples=tuple(body["batch"]),
    )


TYPES: dict[str, ObservationType] = {
    t.name: t
    for t in (
        ObservationType(
            "RunStarted",
            s.record(
                "RunStarted",
                run_id=s.nonempty_text,
                description=(s.text, False),
                environment=scalar_map,
                artifacts=digest_map,
                settings=any_value,
            ),
            frozenset({"trainer"}),
        ),
        ObservationType(
            "CredentialIssued",
            # The credential carries its issuer's signature; the envelope
            # signer is whoever records it (root, authority or trainer).
            s.record("CredentialIssued", credential=s.bstr(max_size=4096)),
            frozenset({"root", "authority", "trainer"}),
        ),
        ObservationType(
            "CredentialRevoked",
            s.record("CredentialRevoked", key_id=s.digest, reason=s.nonempty_text),
            frozenset({"root", "authority"}),
        ),
        ObservationType(
            "PolicyAdopted",
            s.record("PolicyAdopted", policy=s.bstr(max_size=1 << 20), digest=s.digest),
            frozenset({"root"}),
        ),
        ObservationType(
            "DatasetCommitted",
            # manifests: digest of the artifact holding the signed manifests, in order;
            # data (optional): digest of the safetensors artifact holding the inputs, row i = example i.
            s.record(
                "DatasetCommitted", name=s.text, root=s.digest, count=s.uint, manifests=s.digest, data=(s.digest, False)
            ),
            frozenset({"trainer"}),
        ),
        ObservationType(
            "GovernedUpdate",
            s.record(
                "GovernedUpdate",
                step=s.uint,
                batch=s.uint_array(1 << 16),
                policy=s.digest,
                lr=s.number,
                loss=s.number,
                band_grad_norms=norms,
                band_update_norms=norms,
                authority_writes=s.text_map(norms, key=s.path),
                sources=(s.array(s.name, max_items=1 << 16), False),
                optimizer=(any_value, False),
                seeds=(any_value, False),
                routing=(any_value, False),
                recipe=(any_value, False),
                example_losses=(s.bstr(max_size=4 << 16), False),
            ),
            frozenset({"trainer"}),
            _governed_update_keys,
        ),
        ObservationType(
            "Checkpoint",
            s.record("Checkpoint", step=s.uint, digest=s.digest, tensors=digest_map, artifact=s.digest),
            frozenset({"trainer"}),
        ),
        ObservationType(
            "TreeHead",
            s.record("TreeHead", origin=s.nonempty_text, size=s.uint, root=s.digest),
            frozenset({"trainer"}),
        ),
        ObservationType(
            "SourceRetired",
            s.record("SourceRetired", source=s.name, key_id=s.digest, reason=s.nonempty_text),
            frozenset({"root", "authority"}),
            lambda body: IndexKeys(sources=(body["source"],)),
        ),
        ObservationType(
            "UnlearningCertificate",
            s.record(
                "UnlearningCertificate",
                source=s.name,
                mode=s.one_of("exact", "approximate"),
                rewind_checkpoint=s.digest,
                original_head=s.digest,
                new_head=s.digest,
                removed=s.digest,
                relabeled=s.digest,
            ),
            frozenset({"trainer"}),
            lambda body: IndexKeys(sources=(body["source"],)),
        ),
        ObservationType(
            "ForensicTrace",
            s.record(
                "ForensicTrace",
                format=s.uint,
                run=s.uint,
                method=s.one_of("replay", "checkpoints", "loss-trace"),
                query=(any_value, False),
                query_digest=(s.digest, False),
                parameters=any_value,
                result=any_value,
                result_digest=s.digest,
            ),
            frozenset({"root", "authority", "trainer"}),
        ),
        ObservationType(
            "MemorizationScan",
            s.record(
                "MemorizationScan",
                format=s.uint,
                run=s.uint,
                through=s.uint,
                method=s.one_of("lt-iqr", "mean-loss"),
                parameters=any_value,
                scored=s.uint,
                flagged=any_value,
                scores_digest=s.digest,
                canaries=(any_value, False),
            ),
            frozenset({"root", "authority", "trainer"}),
        ),
        ObservationType(
            "DepthProfile",
            s.record(
                "DepthProfile",
                format=s.uint,
                run=s.uint,
                step=s.uint,
                dataset=s.uint,
                method=s.one_of("ncm-entropy"),
                parameters=any_value,
                classes=any_value,
                counts=any_value,
                entropy=any_value,
                mean=any_value,
                slices=(any_value, False),
            ),
            frozenset({"trainer"}),
        ),
        ObservationType(
            # specs/privacy.md §5.1: the privacy a run had spent at one of its checkpoints.
            "PrivacySpent",
            s.record(
                "PrivacySpent",
                format=s.uint,
                run=s.uint,
                step=s.uint,
                accountant=s.one_of("rdp"),
                delta=any_value,
                epsilon=any_value,
                bands=any_value,
                rules=any_value,
                prv=any_value,
            ),
            frozenset({"trainer"}),
        ),
    )
}


def lookup(type_name: str) -> ObservationType:
    kind = TYPES.get(type_name)
    if kind is None:
        raise SchemaError(f"unknown observation type {type_name!r}")
    return kind
