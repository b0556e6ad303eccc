"""Attestations in the forms supply-chain tools read (specs/release.md §4-§5): OpenSSF model
signing (the ``model-signing`` package), in-toto Statements v1 (``in-toto-attestation``) in DSSE
envelopes signed and checked with ``securesystemslib``.

These are an optional extra (``pip install 'gradledger[release]'``): ``require`` turns a missing
package into unusable input (exit 2) with the install hint, never a skipped check. None of these
loaders evaluates what it reads: the signature bundle and envelopes are JSON (protobuf's
``json_format``), model files are only hashed.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from .errors import SignatureError, UnusableInput, VerificationError
from .files import read_regular

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
PROVENANCE_TYPE = "https://slsa.dev/provenance/v1"
VSA_TYPE = "https://slsa.dev/verification_summary/v1"
MODEL_SIGNATURE_TYPE = "https://model_signing/signature/v1.0"
#: The provenance's buildType (specs/release.md §4.2).
BUILD_TYPE = "https://gradledger.dev/governed-training/v1"
#: A signature bundle or envelope is a few kB per model file; 64 MiB bounds any reader.
MAX_ATTESTATION_SIZE = 64 << 20
INSTALL_HINT = "pip install 'gradledger[release]'"


def require(what: str) -> None:
    """Raise ``UnusableInput`` naming the install command unless the release extra is importable."""
    try:
        import in_toto_attestation.v1.statement  # noqa: F401
        import model_signing  # noqa: F401
        import securesystemslib.dsse  # noqa: F401
    except ImportError as exc:
        raise UnusableInput(f"{what} needs the release extra ({exc.name} is missing): {INSTALL_HINT}") from None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(read_regular(path, MAX_ATTESTATION_SIZE, what))
    except (ValueError, UnicodeDecodeError):
        raise UnusableInput(f"{path}: {what} is not JSON") from None


# -- keys ------------------------------------------------------------------------------------


def new_key(path: Path) -> Path:
    """Write a new ECDSA P-256 private key (PEM, 0600; model-signing's key type) and its public
    key beside it (``<path>.pub``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
    finally:
        os.close(fd)
    pub = Path(f"{path}.pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return pub


def private_key(path: Path) -> Any:
    """The unencrypted PEM private key at ``path`` (unusable input otherwise)."""
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(read_regular(path, 1 << 16, "private key"), None)
    except (ValueError, TypeError) as exc:
        raise UnusableInput(f"{path}: not an unencrypted PEM private key ({exc})") from None


def _public_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_public_key(read_regular(path, 1 << 16, "public key"))
    except (ValueError, TypeError) as exc:
        raise UnusableInput(f"{path}: not a PEM public key ({exc})") from None


# -- OpenSSF model signing --------------------------------------------------------------------


def sign_model(model: Path, key: Path, signature: Path) -> dict[str, str]:
    """Sign ``model`` (file or directory) with model-signing's elliptic-key signer; return its
    resources: file name -> sha256 hex, as the signature's payload lists them."""
    import model_signing

    private_key(key)  # a clear exit 2 before model-signing's own error for a bad key
    model_signing.signing.Config().use_elliptic_key_signer(private_key=key).sign(model, signature)
    return model_resources(signature)


def model_resources(signature: Path) -> dict[str, str]:
    """The per-file sha256 digests inside a model-signing v1.0 signature (not checked here)."""
    bundle = _read_json(signature, "model signature")
    try:
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True))
        if statement["predicateType"] != MODEL_SIGNATURE_TYPE:
            raise ValueError(statement["predicateType"])
        resources = statement["predicate"]["resources"]
        out = {r["name"]: r["digest"] for r in resources if r["algorithm"] == "sha256"}
        if len(out) != len(resources):
            raise ValueError("a resource digest is not sha256")
        return out
    except (KeyError, TypeError, ValueError) as exc:
        raise UnusableInput(f"{signature}: not a model-signing v1.0 signature ({exc})") from None


def verify_model(model: Path, signature: Path, public_key: Path) -> dict[str, str]:
    """model-signing's own verification of ``model`` against ``signature`` under ``public_key``;
    raises ``VerificationError`` naming what differs."""
    import model_signing

    _public_key(public_key)
    model_resources(signature)  # bounded and well-formed before model-signing reads it whole
    try:
        model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key).verify(model, signature)
    except ValueError as exc:
        raise VerificationError(f"the model files do not match their model-signing signature: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the signature library raises its own kinds for a bad signature
        raise SignatureError(f"the model-signing signature does not verify: {type(exc).__name__}: {exc}") from None
    return model_resources(signature)


# -- in-toto statements in DSSE ---------------------------------------------------------------


def statement(subjects: dict[str, str], predicate_type: str, predicate: dict[str, Any]) -> dict[str, Any]:
    """An in-toto Statement v1, checked by in-toto-attestation's own validator. The predicate is
    kept as given (protobuf's Struct would turn every integer into a float)."""
    from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
    from in_toto_attestation.v1.statement import Statement

    subject = [{"name": name, "digest": {"sha256": digest}} for name, digest in sorted(subjects.items())]
    Statement([ResourceDescriptor(name=s["name"], digest=s["digest"]).pb for s in subject], predicate_type,
              predicate).validate()
    return {"_type": STATEMENT_TYPE, "subject": subject, "predicateType": predicate_type, "predicate": predicate}


def sign_statement(st: dict[str, Any], key: Path) -> dict[str, Any]:
    """A DSSE envelope (payload type in-toto JSON) of ``st`` signed with the PEM key at ``key``."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import CryptoSigner

    envelope = Envelope(json.dumps(st, sort_keys=True).encode(), PAYLOAD_TYPE, {})
    envelope.sign(CryptoSigner(private_key(key)))
    return envelope.to_dict()


def open_statement(path: Path, public_key: Path, predicate_type: str) -> dict[str, Any]:
    """The statement inside the DSSE envelope at ``path`` once its signature verifies under
    ``public_key`` (securesystemslib) and its types are the expected ones."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError as DsseError
    from securesystemslib.signer import SSlibKey

    raw = _read_json(path, "DSSE envelope")
    try:
        envelope = Envelope.from_dict(raw)
    except Exception as exc:  # noqa: BLE001 - the library raises KeyError/TypeError/its own on bad input
        raise UnusableInput(f"{path}: not a DSSE envelope ({exc})") from None
    key = SSlibKey.from_crypto(_public_key(public_key))
    try:
        envelope.verify([key], 1)
    except DsseError as exc:
        raise SignatureError(f"{path.name}: the DSSE signature does not verify under the given key ({exc})") from None
    if envelope.payload_type != PAYLOAD_TYPE:
        raise VerificationError(f"{path.name}: payload type {envelope.payload_type!r}, not {PAYLOAD_TYPE!r}")
    try:
        st = json.loads(envelope.payload)
    except ValueError:
        raise VerificationError(f"{path.name}: the signed payload is not JSON") from None
    if not isinstance(st, dict) or st.get("_type") != STATEMENT_TYPE or st.get("predicateType") != predicate_type:
        raise VerificationError(f"{path.name}: not an in-toto Statement v1 with predicate {predicate_type}")
    return st


def subjects_of(st: dict[str, Any]) -> dict[str, str]:
    try:
        return {s["name"]: s["digest"]["sha256"] for s in st["subject"]}
    except (KeyError, TypeError):
        raise VerificationError("the statement's subjects are not names with sha256 digests") from None
