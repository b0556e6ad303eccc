"""A gradledger project: one directory holding the keys, trust file, ledger and policy of a
governed training setup, made from a taxonomy file in one call and reopened in one call.

Before this module a governed run began with some twenty lines assembled from test helpers: a
root key, a credential per trainer, authority and source, each issued by the right key on the
right path, a ledger with those credentials as its genesis records, a policy signed by the root
and adopted, and one signed manifest per example. ``Project.init`` does all of it from a small
TOML taxonomy (specs/project.md, ``training.taxonomy``); ``Project.open`` reopens it, checking
that every file it names is there and still matches what the ledger recorded; ``Project.label``
turns inputs and labels into a committed dataset whose inputs are stored so that a bundle
replays. The layout (specs/project.md §3)::

    DIR/project.json        names the files below; public keys and the canonical taxonomy, no secrets
    DIR/roots.pub           the governance root's public key: the verifier's --trust file
    DIR/keys/               0700; every private key, each file 0600
    DIR/ledger/             the LMDB ledger: credentials, PolicyAdopted, a TreeHead, then what you add
"""

from __future__ import annotations

import json
import numbers
import os
import shutil
import time as _time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from gradledger.ledger import credentials as C
from gradledger.ledger.errors import GradledgerError, KeyFileError, UnusableInput
from gradledger.ledger.files import read_regular
from gradledger.ledger.keys import SigningKey, read_public_keys, write_public_keys
from gradledger.ledger.ledger import Ledger

from .dataset import (CommittedDataset, commit_dataset, example_rows, input_columns, latest_dataset, load_dataset,
                      rows_of)
from .errors import DatasetError, ManifestError, ProjectError
from .manifests import MAX_CLASS, SignedManifest, example_id, label_example, source_entry
from .policy import SignedPolicy, adopt_policy, load_adopted, sign_policy
from .taxonomy import Taxonomy, check_policy_fields, load_taxonomy, parse_policy_template, parse_taxonomy

if TYPE_CHECKING:
    import torch

PROJECT_FILE = "project.json"
PROJECT_FORMAT = "gradledger-project/1"
KEYS_DIR = "keys"
LEDGER_DIR = "ledger"
TRUST_FILE = "roots.pub"
MAX_PROJECT_FILE = 16 << 20


def _input_of(item: Any) -> Any:
    # The trainer's rule (training/trainer.py): an (x, y) item's example is x; labels come from manifests.
    return item[0] if isinstance(item, (tuple, list)) else item


def _key_paths(tax: Taxonomy) -> dict[str, str]:
    """Every principal's key file, relative to the project directory, by name (names are distinct)."""
    paths = {tax.root_name: f"{KEYS_DIR}/root.key", tax.trainer_name: f"{KEYS_DIR}/trainer.key"}
    paths.update({a: f"{KEYS_DIR}/authorities/{a}.key" for a in tax.authorities})
    paths.update({s: f"{KEYS_DIR}/sources/{s}.key" for s in tax.sources})
    return paths


class Project:
    """An open project: its taxonomy, keys (loaded when first asked for) and its ledger.

    Open it writable (the default) to label, adopt policies or train; the ledger's writer lock
    is then held until ``close()`` (or the end of a ``with`` block)."""

    def __init__(self, path: Path, record: Mapping[str, Any], taxonomy: Taxonomy, ledger: Ledger,
                 keys: dict[str, SigningKey] | None = None) -> None:
        self.path = path
        self.taxonomy = taxonomy
        self._record = record
        self._ledger: Ledger | None = ledger
        self._keys: dict[str, SigningKey] = dict(keys or {})
        self._key_files: dict[str, str] = dict(record["keys"])
        self._policy: SignedPolicy | None = None

    # -- making and opening --------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike[str], taxonomy: str | os.PathLike[str] | Mapping[str, Any]) -> "Project":
        """Make a project in ``path`` (new, or an empty directory) from a taxonomy file or mapping.

        Writes the keys (0600, in 0700 folders), ``roots.pub``, the ledger with its genesis records
        (every credential, the root-signed policy's PolicyAdopted, a trainer-signed TreeHead) and,
        last, ``project.json``: a directory without it is not a project. Nothing is written when
        the taxonomy is refused; a failure while writing removes what this call wrote."""
        tax = load_taxonomy(taxonomy)
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ProjectError(f"{path}: exists and is not an empty directory; a project is made in a new one")
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            project = cls._write(path, tax)
        except BaseException:
            # Leave nothing half made: a later init in the same place must not find a non-empty directory.
            if created:
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_dir():
                for child in path.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
            raise
        return project

    @classmethod
    def _write(cls, path: Path, tax: Taxonomy) -> "Project":
        root = SigningKey.generate(tax.root_name)
        trainer = SigningKey.generate(tax.trainer_name)
        authorities = {name: SigningKey.generate(name) for name in tax.authorities}
        sources = {name: SigningKey.generate(name) for name in tax.sources}
        # Issuing order is admission order: every issuer is recorded before what it issues.
        issued: list[tuple[C.Credential, SigningKey]] = [
            (C.issue_root(root, subject=tax.root_name, path=tax.root_path), root),
            (C.issue(root, subject=tax.trainer_name, path=tax.trainer_path, role="trainer",
                     public_key=trainer.public_key), root),
        ]
        for name, spec in tax.authorities.items():
            issued.append((C.issue(root, subject=name, path=spec.path, role="authority",
                                   public_key=authorities[name].public_key), root))
        for name, spec in tax.sources.items():
            issuer = authorities[spec.authority]
            issued.append((C.issue(issuer, subject=name, path=spec.path, role="source",
                                   public_key=sources[name].public_key), issuer))

        keys = {tax.root_name: root, tax.trainer_name: trainer, **authorities, **sources}
        key_files = _key_paths(tax)
        for folder in (KEYS_DIR, f"{KEYS_DIR}/authorities", f"{KEYS_DIR}/sources"):
            (path / folder).mkdir(mode=0o700)
        for name, rel in key_files.items():
            keys[name].save(path / rel)
        write_public_keys(path / TRUST_FILE, [(root.public_key, f"{tax.root_name} governance root ({tax.root_path})")])

        ledger = Ledger.create(path / LEDGER_DIR)
        try:
            for cred, issuer in issued:
                ledger.append("CredentialIssued", {"credential": cred.signed}, issuer)
            ledger.commit()  # the policy is checked against committed credentials
            policy = sign_policy(tax.policy_fields(), root, _time.time_ns())
            policy_seq = adopt_policy(ledger, policy, root)
            # A signed head from the start: whoever holds the trust file can check the genesis now.
            ledger.tree_head(trainer)
            ledger.commit()
            record = {
                "format": PROJECT_FORMAT,
                "ledger": LEDGER_DIR,
                "trust": TRUST_FILE,
                "keys": key_files,
                "public_keys": {name: keys[name].public_key.hex() for name in key_files},
                "policy": {"seq": policy_seq, "digest": policy.digest.hex()},
                "taxonomy": tax.to_mapping(),
            }
            tmp = path / (PROJECT_FILE + ".tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path / PROJECT_FILE)
        except BaseException:
            ledger.close()
            raise
        project = cls(path, record, tax, ledger, keys)
        project._policy = policy
        return project

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool | None = None) -> "Project":
        """Reopen the project in ``path``: its files must be there, and its keys must be the ones
        its ledger credentialed and its policy the one the ledger adopted. ``writable`` None: writable,
        except on a torch.distributed rank other than 0, which reads the ledger and never writes it
        (specs/distributed.md §1), so one ``Project.open`` serves every rank of a torchrun launch."""
        if writable is None:
            from .distributed import RankGroup

            ranks = RankGroup.current()
            writable = ranks is None or ranks.writer
        path = Path(path)
        if not path.is_dir():
            raise ProjectError(f"{path}: no such project directory")
        record = _read_record(path)
        try:
            tax = parse_taxonomy(record["taxonomy"])
        except ProjectError as exc:
            raise ProjectError(f"{path / PROJECT_FILE}: {exc}") from None
        if record["keys"] != _key_paths(tax) or set(record["public_keys"]) != set(record["keys"]):
            raise ProjectError(f"{path / PROJECT_FILE}: its key files do not match its taxonomy")
        for what, rel in [("trust file", record["trust"]), *((f"key of {n}", r) for n, r in record["keys"].items())]:
            if not (path / rel).is_file():
                raise ProjectError(f"{path}: the project's {what} {rel} is missing")
        ledger_path = path / record["ledger"]
        try:
            ledger = Ledger.open(ledger_path, writable=writable)
        except UnusableInput as exc:
            raise ProjectError(f"{path}: the project's ledger cannot be opened: {exc}") from None
        project = cls(path, record, tax, ledger)
        try:
            project._check()
        except BaseException:
            ledger.close()
            raise
        return project

    def _check(self) -> None:
        registry = self.ledger.registry
        for name, hexkey in self._record["public_keys"].items():
            cred = registry.by_key_id.get(C.key_id(bytes.fromhex(hexkey)))
            if cred is None or cred.subject != name:
                raise ProjectError(f"{self.path}: the ledger has no credential for {name!r} with the project's key")
        # The trust file must name the root the ledger credentialed; the root key on disk (loaded
        # now, so a readable-by-others file is refused at open) must be that root's.
        try:
            trusted = read_public_keys(self.trust_file)
        except KeyFileError as exc:
            raise ProjectError(f"{self.path}: the trust file: {exc}") from None
        if trusted != self.trusted_roots:
            raise ProjectError(f"{self.path}: {self._record['trust']} does not hold the project's root key alone")
        _ = self.root_key
        _ = self.policy  # loads and verifies the adopted policy

    # -- the parts -----------------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            raise ProjectError(f"project {self.path} is closed")
        return self._ledger

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def __enter__(self) -> "Project":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if self._ledger is not None:
            self._ledger.__exit__(exc_type, *rest)  # discards uncommitted appends on an error, as Ledger does
            self._ledger = None

    def __repr__(self) -> str:
        return f"Project({str(self.path)!r}, root={self.taxonomy.root_path!r}, sources={len(self.taxonomy.sources)})"

    @property
    def trust_file(self) -> Path:
        """``roots.pub``: the root's public key, what ``gradledger-verify --trust`` reads."""
        return self.path / self._record["trust"]

    @property
    def trusted_roots(self) -> list[bytes]:
        """The root's public key, for ``ledger.verify(trusted_roots=...)``."""
        return [bytes.fromhex(self._record["public_keys"][self.taxonomy.root_name])]

    def key(self, name: str) -> SigningKey:
        """The private key of the root, trainer, an authority or a source, by its taxonomy name."""
        if name not in self._key_files:
            raise ProjectError(f"{name!r} is not in this project's taxonomy (it knows {', '.join(self._key_files)})")
        key = self._keys.get(name)
        if key is None:
            try:
                key = SigningKey.load(self.path / self._key_files[name])
            except KeyFileError as exc:
                raise ProjectError(f"{self.path}: the key of {name!r}: {exc}") from None
            if key.public_key.hex() != self._record["public_keys"][name]:
                raise ProjectError(f"{self.path}: {self._key_files[name]} is not the key the project credentialed")
            self._keys[name] = key
        return key

    @property
    def root_key(self) -> SigningKey:
        return self.key(self.taxonomy.root_name)

    @property
    def trainer_key(self) -> SigningKey:
        return self.key(self.taxonomy.trainer_name)

    def authority_key(self, name: str) -> SigningKey:
        if name not in self.taxonomy.authorities:
            raise ProjectError(f"{name!r} is not an authority of this project ({', '.join(self.taxonomy.authorities)})")
        return self.key(name)

    def source_key(self, name: str) -> SigningKey:
        self._require_source(name)
        return self.key(name)

    def credential(self, name: str) -> C.Credential:
        """The credential the ledger recorded for ``name`` (any principal of the taxonomy)."""
        if name not in self._key_files:
            raise ProjectError(f"{name!r} is not in this project's taxonomy (it knows {', '.join(self._key_files)})")
        kid = C.key_id(bytes.fromhex(self._record["public_keys"][name]))
        return self.ledger.registry.get(kid)

    def admit_witness(self, name: str, public_key: bytes) -> C.Credential:
        """Have the root credential a third-party witness (specs/release.md §2): role ``witness`` at
        ``<root path>/witnesses``, subject ``name``, which is also its cosignature key name."""
        from gradledger.ledger.note import check_key_name

        check_key_name(name)
        cred = C.issue(self.root_key, subject=name, path=f"{self.taxonomy.root_path}/witnesses", role="witness",
                       public_key=public_key)
        self.ledger.append("CredentialIssued", {"credential": cred.signed}, self.root_key, commit=True)
        return cred

    def _require_source(self, name: Any) -> str:
        if type(name) is not str or name not in self.taxonomy.sources:
            raise ProjectError(
                f"{name!r} is not a source of this project's taxonomy "
                f"(its sources: {', '.join(self.taxonomy.sources)})")
        return name

    # -- policy --------------------------------------------------------------------------------

    @property
    def policy(self) -> SignedPolicy:
        """The policy the root signed at init, as the ledger adopted it (verified when loaded)."""
        if self._policy is None:
            seq, digest = self._record["policy"]["seq"], self._record["policy"]["digest"]
            try:
                sp = load_adopted(self.ledger, seq)
            except GradledgerError as exc:
                raise ProjectError(f"{self.path}: the project's policy at seq {seq}: {exc}") from None
            if sp.digest.hex() != digest:
                raise ProjectError(f"{self.path}: the policy adopted at seq {seq} is not the project's")
            self._policy = sp
        return self._policy

    def policy_for(self, bands: Sequence[str], rules: Mapping[str, Any] | None = None) -> SignedPolicy:
        """Sign (with the project's root) and adopt a policy for other band names.

        Without ``rules`` the taxonomy's template is reused by position, so ``bands`` must have as
        many names as its bands; ``rules`` is a mapping in the ``[policy]`` table's format
        (specs/project.md §2.5), its ``bands`` replaced by ``bands``. The adopted policy becomes
        the ledger's latest; ``policy`` stays the one made at init."""
        tax = self.taxonomy
        if rules is None:
            fields = tax.policy_fields(list(bands))
        else:
            if isinstance(rules, Mapping):
                rules = {k: v for k, v in rules.items() if k != "bands"}  # the bands are the argument's
            template = parse_policy_template(rules, tax.authorities, tax.root_name, bands=list(bands), where="rules")
            fields = template.fields(tax.authorities)
        check_policy_fields(fields)
        sp = sign_policy(fields, self.root_key, _time.time_ns())
        adopt_policy(self.ledger, sp, self.root_key)
        return sp

    # -- labels --------------------------------------------------------------------------------

    def label(
        self,
        inputs: Any,
        labels: Any,
        *,
        source: str | Sequence[str],
        name: str = "dataset",
        ontology: str | None = None,
        confidence: float | Sequence[float] | None = None,
        review: str = "accepted",
    ) -> CommittedDataset:
        """Sign one single-source manifest per example (with that source's own key) and commit them
        as dataset ``name``, with the inputs stored so that a bundle of the run replays.

        ``inputs``: a tensor or array whose row ``i`` is example ``i``; a dict of such columns, one per
        input part (a tokenizer's ``input_ids``, ``attention_mask``...); or a map-style torch Dataset
        whose item ``i`` is ``x`` or ``(x, y)`` (the example is ``x``, as the trainer reads it; a dict or
        tuple of tensors is an example of parts). ``labels``: one class index per example (or class
        name, when the taxonomy's ontology names its classes). ``source``: one source name, or one per example. ``confidence``
        defaults to the source's (specs/project.md §2.3). ``ontology`` defaults to the taxonomy's.
        """
        xs = _examples(inputs)
        n = len(xs)
        if n == 0:
            raise ProjectError("no examples to label")
        names = [source] * n if isinstance(source, str) else list(source)
        if len(names) != n:
            raise ProjectError(f"{len(names)} source names for {n} examples; give one name, or one per example")
        for src in names:
            self._require_source(src)
        ys = self._class_indices(labels, n)
        onto = ontology if ontology is not None else self.taxonomy.ontology
        if onto is None:
            raise ProjectError("the taxonomy names no ontology ([ontology] name); pass ontology=")
        if confidence is None:
            confs = [self.taxonomy.confidence(src) for src in names]
        elif isinstance(confidence, (int, float)):
            confs = [float(confidence)] * n
        else:
            confs = [float(c) for c in confidence]
            if len(confs) != n:
                raise ProjectError(f"{len(confs)} confidences for {n} examples")
        try:
            stacked = input_columns(xs)
        except DatasetError as exc:
            raise ProjectError(str(exc)) from None
        creds = {src: self.credential(src) for src in dict.fromkeys(names)}
        at = _time.time_ns()
        manifests: list[SignedManifest] = []
        for i in range(n):
            src = names[i]
            try:
                manifests.append(label_example(
                    example=example_id(xs[i]), sources=[source_entry(creds[src], ys[i], confs[i])],
                    aggregation="single", ontology=onto, review=review, key=self.source_key(src), time=at))
            except ManifestError as exc:
                raise ManifestError(f"example {i}: {exc}") from None
        return commit_dataset(self.ledger, manifests, name, self.trainer_key, inputs=stacked)

    def class_indices(self, labels: Sequence[Any]) -> list[int]:
        """Each label as a class index of the taxonomy's ontology: an index, or a class name when the
        ontology names its classes; one outside the ontology is refused (``ManifestError``)."""
        return self._class_indices(labels, len(labels))

    def _class_indices(self, labels: Any, n: int) -> list[int]:
        try:
            raw = labels.tolist() if hasattr(labels, "tolist") else list(labels)
        except TypeError:
            raw = None
        if not isinstance(raw, list) or len(raw) != n:
            got = f"{len(raw)}" if isinstance(raw, list) else f"a {type(labels).__name__}"
            raise ProjectError(f"expected one label per example ({n}), got {got}")
        classes = self.taxonomy.classes
        count = self.taxonomy.class_count
        out = []
        for i, y in enumerate(raw):
            if type(y) is str and isinstance(classes, tuple):
                if y not in classes:
                    raise ManifestError(
                        f"example {i}: label {y!r} is not a class of ontology {self.taxonomy.ontology!r}")
                y = classes.index(y)
            if isinstance(y, numbers.Integral) and not isinstance(y, bool):
                y = int(y)  # numpy and torch integer scalars; never a float, which would be truncated
            # The manifest format's rule (a class index 0..2^32-1), narrowed to the ontology's classes.
            if type(y) is not int or not 0 <= y <= MAX_CLASS:
                raise ManifestError(f"example {i}: label {y!r} is not a class index 0..{MAX_CLASS}")
            if count is not None and y >= count:
                raise ManifestError(
                    f"example {i}: label {y} is outside ontology {self.taxonomy.ontology!r} "
                    f"({count} classes: 0..{count - 1})")
            out.append(y)
        return out

    def dataset(self, name: str = "dataset") -> CommittedDataset:
        """The latest dataset committed under ``name``, reloaded and re-checked from the ledger."""
        seq = latest_dataset(self.ledger, name)
        if seq is not None:
            return load_dataset(self.ledger, seq)
        found = [self.ledger.observation(q).body["name"] for q in reversed(self.ledger.by_type("DatasetCommitted"))]
        have = ", ".join(dict.fromkeys(found)) or "none"
        raise ProjectError(f"no dataset {name!r} in the project's ledger (it has: {have})")


def _examples(inputs: Any) -> list[Any]:
    """The examples of ``inputs``, each as the trainer will hash it."""
    if isinstance(inputs, Mapping):  # columns of named parts (a tokenizer's output): example i is row i of each
        cols = input_columns(inputs)
        rows = rows_of(cols)
        if rows is None:
            raise ProjectError(f"input parts {sorted(cols)} do not all have the same number of rows")
        return example_rows(cols, rows)
    if hasattr(inputs, "shape") and hasattr(inputs, "__getitem__"):  # a tensor or an array: its rows
        if len(inputs.shape) < 1:
            raise ProjectError("inputs must have one row per example, got a 0-d value")
        return [inputs[i] for i in range(inputs.shape[0])]
    if hasattr(inputs, "__getitem__") and hasattr(inputs, "__len__"):  # a map-style dataset
        return [_input_of(inputs[i]) for i in range(len(inputs))]
    raise ProjectError(
        f"inputs must be a tensor, an array or a map-style Dataset (with len), got {type(inputs).__name__}")


def _read_record(path: Path) -> dict[str, Any]:
    file = path / PROJECT_FILE
    try:
        data = read_regular(file, MAX_PROJECT_FILE, "project", ProjectError)
    except UnusableInput as exc:
        raise ProjectError(f"{path}: not a gradledger project ({exc})") from None
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProjectError(f"{file}: not a project file: {exc}") from None
    ok = (isinstance(record, dict) and record.get("format") == PROJECT_FORMAT
          and all(type(record.get(k)) is str for k in ("ledger", "trust"))
          and isinstance(record.get("keys"), dict) and isinstance(record.get("public_keys"), dict)
          and all(type(v) is str and len(v) == 64 for v in record["public_keys"].values())
          and isinstance(record.get("policy"), dict) and type(record["policy"].get("seq")) is int
          and type(record["policy"].get("digest")) is str and isinstance(record.get("taxonomy"), dict))
    if not ok:
        raise ProjectError(f"{file}: not a {PROJECT_FORMAT} file")
    for rel in [record["ledger"], record["trust"], *record["keys"].values()]:
        # The names stay inside the project: a tampered file cannot point at keys elsewhere.
        if type(rel) is not str or rel.startswith("/") or ".." in Path(rel).parts:
            raise ProjectError(f"{file}: path {rel!r} leaves the project directory")
    try:
        for v in record["public_keys"].values():
            bytes.fromhex(v)
    except ValueError:
        raise ProjectError(f"{file}: a public key is not hex") from None
    return record


__all__ = ["PROJECT_FILE", "PROJECT_FORMAT", "Project"]
