"""Forging bundles as a hostile trainer would: the one library behind bench/forgery.py,
bench/robustness.py and tests/test_forgery_coverage.py.

The attacker model (issue 10, specs/verification.md):

- The attacker is the **trainer**. It holds the trainer's private key and nothing else: not the
  governance root's key, not an authority's, not a source's. It runs the ledger, so it decides
  what every record says, which artifacts the bundle carries and how the bundle is framed.
- The root, the authorities and the sources are honest **co-signers**. In a live ledger they
  append their own statements (credentials, the routing policy, retirements) to the log the
  trainer runs, so they sign an unchanged body of theirs at whatever position and chain head
  the trainer's (possibly forged) log presents. The forger models that: a record signed by
  someone else whose body and type are unchanged is signed again at its new position. A record
  of theirs whose body the forgery changes (or one the forger inserts under their name) cannot
  be signed by the trainer: it keeps its old signature, which then does not verify. That is
  the strongest attacker the keys allow, so a forgery is never caught merely because the
  forger could not rebuild the chain around an honest co-signed record.
- Everything the trainer signs is rebuilt: each changed envelope and every later one is
  re-signed, the hash chain's ``prev`` links are recomputed, and every TreeHead gets the size
  and Merkle root of the forged log (unless a forgery is about tree heads themselves).
- Artifacts are named by their SHA-256: replacing one re-derives its digest and rewrites
  every record body that names it (``replace_artifact``); the replaced bytes leave the bundle.
- The bundle is written by specs/bundle.md §1 (header, records, artifacts in digest order,
  cosignatures) with a header that agrees with the forged records.

``Forge.records()`` with no edit gives back the honest records byte for byte (the round trip
the coverage test checks), so a forgery that fails fails for its change.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from gradledger.ledger import encoding
from gradledger.ledger.bundle import FORMAT, VERSION, Bundle
from gradledger.ledger.envelope import ENVELOPE_VERSION, GENESIS_PREV, unseal
from gradledger.ledger.keys import SigningKey
from gradledger.ledger.merkle import CompactRange, leaf_hash
from gradledger.ledger.state import origin_of

#: Which private keys the default attacker holds, by the label the demo saves them under.
TRAINER_LABELS = frozenset({"trainer"})


@dataclass
class ListSource:
    """A bundle stand-in for ``Verifier._verify``: records in order and artifacts by digest."""

    recs: list[bytes]
    arts: dict[bytes, bytes]

    def records(self) -> Iterator[tuple[int, bytes]]:
        return iter(enumerate(self.recs))

    def artifact(self, digest: bytes) -> bytes | None:
        return self.arts.get(digest)

    def close(self) -> None:
        pass


@dataclass
class Rec:
    """One decoded record, editable. ``original`` is its honest envelope (None if inserted)."""

    type: str
    time: int
    body: dict[str, Any]
    signer: bytes
    signature: bytes
    original: bytes | None = None
    #: The body or type changed: a co-signer would not sign it again.
    changed: bool = False


@dataclass
class Forge:
    """An honest bundle, decoded, to be edited and rebuilt as the trainer would."""

    recs: list[Rec]
    arts: dict[bytes, bytes]
    cosignatures: list[tuple[int, bytes, bytes]]
    with_data: bool
    #: The attacker's keys (key id -> key): re-signs anything.
    attacker: dict[bytes, SigningKey]
    #: Honest co-signers (key id -> key): sign again only their own unchanged bodies.
    cosigners: dict[bytes, SigningKey] = field(default_factory=dict)
    #: Tree heads whose body is kept as is (not recomputed from the forged log).
    keep_heads: set[int] = field(default_factory=set)
    #: Header fields to override when writing (to forge the header itself).
    header_overrides: dict[str, Any] = field(default_factory=dict)

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_parts(cls, records: list[bytes], artifacts: Mapping[bytes, bytes], keys: list[SigningKey],
                   attacker_labels: frozenset[str] = TRAINER_LABELS,
                   cosignatures: list[tuple[int, bytes, bytes]] | None = None, with_data: bool = True) -> "Forge":
        recs = []
        for r in records:
            s = unseal(r)
            recs.append(Rec(s.type, s.time, s.body, s.signer, s.signature, s.envelope_bytes))
        attacker = {k.key_id: k for k in keys if k.label in attacker_labels}
        cosigners = {k.key_id: k for k in keys if k.label not in attacker_labels}
        return cls(recs, dict(artifacts), list(cosignatures or []), with_data, attacker, cosigners)

    @classmethod
    def from_bundle(cls, path: str | Path, keys_dir: str | Path | None = None,
                    attacker_labels: frozenset[str] = TRAINER_LABELS) -> "Forge":
        """Decode a bundle; ``keys_dir`` is the demo's DIR/keys (default: beside the bundle)."""
        path = Path(path)
        keys = load_keys(keys_dir if keys_dir is not None else path.parent / "keys")
        with Bundle.open(path) as b:
            records = [bytes(r) for _, r in b.records()]
            arts = {d: bytes(b.artifact(d) or b"") for d in b.artifact_digests()}
            return cls.from_parts(records, arts, keys, attacker_labels, b.cosignatures(), b.header["with_data"])

    def clone(self) -> "Forge":
        """An independent copy (bodies deep-copied, artifact bytes shared: they are immutable)."""
        new = copy.copy(self)
        new.recs = [Rec(r.type, r.time, copy.deepcopy(r.body), r.signer, r.signature, r.original, r.changed)
                    for r in self.recs]
        new.arts = dict(self.arts)
        new.cosignatures = list(self.cosignatures)
        new.keep_heads = set(self.keep_heads)
        new.header_overrides = dict(self.header_overrides)
        return new

    # -- finding ---------------------------------------------------------------------------

    def seqs(self, type_name: str, lo: int = 0, hi: int | None = None) -> list[int]:
        return [k for k, r in enumerate(self.recs) if r.type == type_name and k >= lo and (hi is None or k < hi)]

    def first(self, type_name: str) -> int:
        return self.seqs(type_name)[0]

    def policy_monitors(self) -> dict[str, Any]:
        """The adopted policy's ``monitors`` (specs/policy.md §1): what it requires every run to record."""
        from gradledger.training.policy import parse_policy

        return parse_policy(self.body(self.first("PolicyAdopted"))["policy"]).monitors

    def body(self, k: int) -> dict[str, Any]:
        return self.recs[k].body

    @property
    def trainer(self) -> SigningKey:
        return next(iter(self.attacker.values()))

    # -- editing ---------------------------------------------------------------------------

    def edit(self, k: int, change: Callable[[dict[str, Any]], Any]) -> "Forge":
        """Change record ``k``'s body in place (``change`` mutates it)."""
        change(self.recs[k].body)
        self.recs[k].changed = True
        return self

    def set(self, k: int, path: tuple[Any, ...], value: Any) -> "Forge":
        """Set the field at ``path`` (keys and list indices) of record ``k``'s body."""
        def change(body: dict[str, Any]) -> None:
            node: Any = body
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
        return self.edit(k, change)

    def delete(self, k: int, path: tuple[Any, ...]) -> "Forge":
        def change(body: dict[str, Any]) -> None:
            node: Any = body
            for part in path[:-1]:
                node = node[part]
            del node[path[-1]]
        return self.edit(k, change)

    def insert(self, k: int, rec: Rec) -> "Forge":
        """Insert ``rec`` at position ``k``; later records move up by one, and every seq a record
        names (a run's dataset, policy, branch origin, rewind, retirement) follows them."""
        self.recs.insert(k, rec)
        self._shift_seqs(k, +1, skip=k)
        return self

    def remove(self, k: int) -> Rec:
        """Remove record ``k``; later records move down by one and seq references follow."""
        rec = self.recs.pop(k)
        self._shift_seqs(k, -1)
        return rec

    #: Where a body names another record by its seq (specs/training.md §5, specs/unlearning.md).
    SEQ_FIELDS = (("settings", "dataset", "seq"), ("settings", "policy_seq"), ("settings", "branch", "of"),
                  ("settings", "branch", "rewind"), ("settings", "branch", "retired"))

    def _shift_seqs(self, at: int, delta: int, skip: int = -1) -> None:
        for i, r in enumerate(self.recs):
            if r.type != "RunStarted" or i == skip:
                continue
            for path in self.SEQ_FIELDS:
                try:
                    value = get(r.body, path)
                except (KeyError, TypeError):
                    continue
                if type(value) is int and value >= at:
                    self.set(i, path, value + delta)

    def new_record(self, type_name: str, body: dict[str, Any], time: int, signer: bytes | None = None) -> Rec:
        """A record the trainer makes (or, with ``signer``, one it claims someone else signed)."""
        signer = self.trainer.key_id if signer is None else signer
        return Rec(type_name, time, body, signer, bytes(64), None, True)

    def put(self, data: bytes) -> bytes:
        digest = hashlib.sha256(data).digest()
        self.arts[digest] = data
        return digest

    def replace_artifact(self, old: bytes, data: bytes) -> bytes:
        """Swap artifact ``old`` for ``data`` and re-point every record that names ``old``."""
        new = self.put(data)
        if new != old:
            self.arts.pop(old, None)
            self.replace_value(old, new)
        return new

    def replace_value(self, old: Any, new: Any) -> list[int]:
        """Replace every occurrence of ``old`` (a digest, say) in every body; the seqs changed."""
        touched = []
        for k, r in enumerate(self.recs):
            body, hit = _replace(r.body, old, new)
            if hit:
                r.body, r.changed = body, True
                touched.append(k)
        return touched

    # -- rebuilding ------------------------------------------------------------------------

    def sealed(self) -> list[bytes]:
        """The forged log: every record re-chained, re-signed where the keys allow, heads recomputed."""
        out: list[bytes] = []
        prev, tree = GENESIS_PREV, CompactRange()
        origin = _origin(self.recs)
        for seq, r in enumerate(self.recs):
            body = r.body
            if r.type == "TreeHead" and seq not in self.keep_heads:
                body = {**body, "size": seq, "root": tree.root(), "origin": origin}
            envelope = {"v": ENVELOPE_VERSION, "type": r.type, "seq": seq, "prev": prev, "time": r.time,
                        "body": body, "signer": r.signer}
            env = encoding.encode(envelope)
            if env == r.original:
                signature = r.signature
            elif r.signer in self.attacker:
                signature = self.attacker[r.signer].sign("envelope", env)
            elif not r.changed and r.signer in self.cosigners:
                signature = self.cosigners[r.signer].sign("envelope", env)
            else:
                signature = r.signature  # not the trainer's to sign: the old signature stays
            record = encoding.encode([env, signature])
            out.append(record)
            prev = hashlib.sha256(record).digest()
            tree.append(leaf_hash(record))
        return out

    def source(self) -> ListSource:
        return ListSource(self.sealed(), dict(self.arts))

    def header(self, records: list[bytes]) -> dict[str, Any]:
        tree = CompactRange()
        for r in records:
            tree.append(leaf_hash(r))
        header = {"format": FORMAT, "version": VERSION, "origin": _origin(self.recs), "records": len(records),
                  "artifacts": len(self.arts), "cosignatures": len(self.cosignatures), "size": len(records),
                  "root": tree.root(), "with_data": self.with_data}
        header.update(self.header_overrides)
        return header

    def bundle_bytes(self) -> bytes:
        """The forged bundle, framed per specs/bundle.md §1."""
        records = self.sealed()
        items = [encoding.encode(self.header(records)), *records,
                 *(self.arts[d] for d in sorted(self.arts)),
                 *(encoding.encode(list(c)) for c in sorted(self.cosignatures))]
        return b"".join(encoding.bstr_header(len(i)) + i for i in items)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.bundle_bytes())
        return path


# -- helpers --------------------------------------------------------------------------------------


def load_keys(keys_dir: str | Path) -> list[SigningKey]:
    return [SigningKey.load(p) for p in sorted(Path(keys_dir).glob("*.key"))]


def _origin(recs: list[Rec]) -> str:
    first = recs[0]
    env = encoding.encode({"v": ENVELOPE_VERSION, "type": first.type, "seq": 0, "prev": GENESIS_PREV,
                           "time": first.time, "body": first.body, "signer": first.signer})
    return origin_of(encoding.encode([env, first.signature]))


def _replace(value: Any, old: Any, new: Any) -> tuple[Any, bool]:
    if type(value) is type(old) and value == old:
        return new, True
    if isinstance(value, dict):
        hit = False
        out = {}
        for k, v in value.items():
            out[k], h = _replace(v, old, new)
            hit |= h
        return out, hit
    if isinstance(value, list):
        pairs = [_replace(v, old, new) for v in value]
        return [p[0] for p in pairs], any(p[1] for p in pairs)
    return value, False


# -- checkpoint artifacts (safetensors), re-derived as the trainer would ---------------------------


def rewrite_checkpoint(forge: Forge, k: int, change: Callable[[dict[str, Any]], None]) -> bytes:
    """Change Checkpoint ``k``'s tensors (``change`` edits the name -> tensor dict), then re-derive its
    artifact, tensor digests and state digest, and re-point every record naming the old ones
    (a certificate's ``new_head``, a branch's rewind...). Returns the new state digest."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from gradledger.training.checkpoints import checkpoint_digest, tensor_digest

    body = forge.body(k)
    data = forge.arts[body["artifact"]]
    (size,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8:8 + size]).get("__metadata__") or None
    tensors = {n: t.clone() for n, t in st_load(data).items()}
    change(tensors)
    new_data = st_save(tensors, metadata=metadata)
    digests = {n: tensor_digest(t) for n, t in tensors.items()}
    new_digest = checkpoint_digest(digests)
    old_digest = body["digest"]
    forge.replace_artifact(body["artifact"], new_data)
    forge.set(k, ("tensors",), digests)
    if new_digest != old_digest:
        forge.replace_value(old_digest, new_digest)
    return new_digest


# -- the honest demo bundle ---------------------------------------------------------------------


@dataclass
class Demo:
    """An honest demo bundle on disk: DIR/run.glb, DIR/roots.pub, DIR/keys/."""

    out: Path
    bundle: Path
    roots: Path
    steps: int


def build_demo(out: str | Path, *, steps: int = 6, checkpoint_every: int = 3, hidden: int = 32, seed: int = 7,
               lr: float = 0.01, ungated: bool = False, trace: bool = False) -> Demo:
    """The demo's own stages (training/demo.py), without its verifier subprocess and report: taxonomy
    and keys, labels, policy, governed training, (``trace``) the recorded trace of the 3/8 confusion (a
    ForensicTrace with its query file), retirement of worker-4, exact unlearning, export with data.

    ``ungated``: the hostile trainer of issue 10.1 switches the gate off (every example's gradient
    reaches every band, in training and in the exported program) and its self-check, while every
    record it writes (rules, limits, authority_writes) stays what the policy says."""
    if ungated:
        from unittest import mock

        from gradledger.training import gate, trainer, updates

        def no_gate(profiles: Any) -> Any:
            return profiles * 0.0 + 1.0

        with mock.patch.object(gate, "routing_ratios", no_gate), mock.patch.object(updates, "routing_ratios", no_gate), \
                mock.patch.object(trainer, "check_routing", lambda *a, **k: None):
            return build_demo(out, steps=steps, checkpoint_every=checkpoint_every, hidden=hidden, seed=seed, lr=lr)
    import time

    import torch

    from gradledger.training import demo as D

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = D.DemoConfig(out=out, steps=steps, checkpoint_every=checkpoint_every, hidden=hidden, seed=seed, lr=lr,
                       progress=False)
    cfg.check()
    saved = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    tax = D.make_taxonomy()
    D.save_keys(tax, out)
    at = time.time_ns()
    data = D.load_digits_split(seed)
    labels = D.label_training_set(tax, data, seed, at)
    policy = D.routing_policy(tax, at)
    console = D.Console(False)
    ledger = D.open_ledger(out / "ledger", tax)
    try:
        ds, inputs = D.commit_training_set(ledger, tax, labels, data, seed, at)
        held = D.commit_held_out(ledger, tax, data, ds, at)
        D.train(ledger, tax, ds, policy, inputs, cfg, console, D.DepthProfiles(held.name))
        if trace:
            D.stage_trace(ledger, D.write_query(data, out), tax, console)
        D.stage_retire(ledger, tax, f"swaps digits {D.SWAP[0]} and {D.SWAP[1]}")
        D.stage_unlearn(ledger, tax, cfg, console)
        ledger.commit()
        D.stage_export(ledger, out)
    finally:
        ledger.close()
        torch.use_deterministic_algorithms(saved[0])
        torch.set_num_threads(saved[1])
    return Demo(out, out / "run.glb", out / "roots.pub", steps)


# -- the catalogue of forgeries -----------------------------------------------------------------

#: Issue 10's list and issue 9's findings: the forgeries the issues report as verifying on the
#: main of the time they were filed. Each entry names the item. Tests mark exactly these xfail.
KNOWN_ACCEPTED = {
    "10.1": "the gate is whatever the bundle says it is (an ungated program, honest routing records)",
    "10.2": "a Checkpoint record whose artifact is not the state it describes",
    "10.3": "a bundle without inputs: replay silently skipped",
    "10.4": "the bundle's environment forces tolerance mode",
    "10.5": "an ungoverned run carries the shipped model",
    "9.flip": "a bit flipped in the inputs or the last checkpoint artifact",
    "9.header": "a header that disagrees with the records",
}


@dataclass(frozen=True)
class Harmless:
    """Where the spec declares a change harmless: the file, the section and the sentence that says so.
    A forgery is declared harmless only while that sentence is still in the spec."""

    spec: str
    section: str
    quote: str

    def holds(self, specs_dir: Path) -> bool:
        path = specs_dir / self.spec
        return path.is_file() and " ".join(self.quote.split()) in " ".join(path.read_text().split())


@dataclass(frozen=True)
class Forgery:
    name: str
    #: The record type or artifact kind it targets ("RunStarted", "artifact:program", "header" ...).
    target: str
    apply: Callable[[Forge], None]
    #: The issue item that reports this forgery as accepted (a key of KNOWN_ACCEPTED), if any.
    issue: str | None = None
    harmless: Harmless | None = None
    #: Which honest bundle it starts from: "main", or "lr" (the same demo trained at another lr).
    base: str = "main"


def other(value: Any) -> Any:
    """A different value of the same kind (what a forger writes instead)."""
    if type(value) is bool:
        return not value
    if type(value) is int:
        return value + 1
    if type(value) is float:
        return value * 1.5 + 0.01
    if type(value) is str:
        return value + "-forged"
    if type(value) is bytes:
        return bytes([value[0] ^ 0x01]) + value[1:] if value else b"\x00"
    if value is None:
        return 1
    if isinstance(value, list):
        return value[:-1] if value else [0]
    if isinstance(value, dict):
        return {**value, "forged": 1}
    raise TypeError(type(value))


def leaves(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every leaf's path and value (lists of scalars longer than 3 give their first and last only)."""
    if isinstance(value, dict) and value:
        for k in sorted(value):
            yield from leaves(value[k], (*prefix, k))
    elif isinstance(value, list) and value:
        idx = range(len(value)) if len(value) <= 3 or isinstance(value[0], (dict, list)) else (0, len(value) - 1)
        for i in idx:
            yield from leaves(value[i], (*prefix, i))
    else:
        yield prefix, value


def dotted(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def get(body: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        body = body[p]
    return body


def _perturb(scale: float, name: str | None = None) -> Callable[[dict[str, Any]], None]:
    """Add ``scale`` to every model weight (or to tensor ``name``): 'fine-tuned' weights."""
    def change(tensors: dict[str, Any]) -> None:
        for n, t in tensors.items():
            if (n == name) if name else (n.startswith("model.") and t.is_floating_point()):
                tensors[n] = t + scale
    return change


def _set_tensor(name: str, value: float) -> Callable[[dict[str, Any]], None]:
    def change(tensors: dict[str, Any]) -> None:
        import torch

        tensors[name] = tensors[name].new_full((), value) if name in tensors else torch.tensor(value, dtype=torch.float64)
    return change


@dataclass(frozen=True)
class Layout:
    """Where things are in the honest demo bundle (found by type, not by position)."""

    runs: list[int]
    orig_run: int
    branch_run: int
    updates: list[int]
    branch_updates: list[int]
    ckpts: list[int]
    branch_ckpts: list[int]
    heads: list[int]
    dataset: int
    policy: int
    retired: int
    cert: int
    creds: list[int]
    first_ts: int

    @classmethod
    def of(cls, f: Forge) -> "Layout":
        runs = f.seqs("RunStarted")
        branch_run = runs[-1]
        dataset = f.seqs("DatasetCommitted")[0]  # the training set; the held-out set the profiles read follows
        (policy,) = f.seqs("PolicyAdopted")
        (retired,) = f.seqs("SourceRetired")
        (cert,) = f.seqs("UnlearningCertificate")
        return cls(runs, runs[0], branch_run, f.seqs("GovernedUpdate", hi=branch_run),
                   f.seqs("GovernedUpdate", lo=branch_run), f.seqs("Checkpoint", hi=branch_run),
                   f.seqs("Checkpoint", lo=branch_run), f.seqs("TreeHead"), dataset, policy, retired, cert,
                   f.seqs("CredentialIssued"), min(r.time for r in f.recs if r.type == "GovernedUpdate"))


Add = Callable[..., None]


def catalogue(f: Forge) -> list[Forgery]:
    """Every forgery tried on the honest demo bundle ``f``, section by section."""
    out: list[Forgery] = []

    def add(name: str, target: str, apply: Callable[[Forge], None], **kw: Any) -> None:
        out.append(Forgery(name, target, apply, **kw))

    at = Layout.of(f)
    for section in SECTIONS:
        section(f, at, add)
    return out


def _run_started(f: Forge, at: Layout, add: Add) -> None:
    """RunStarted: every settings leaf (in both runs, as a consistent trainer would), every
    environment key, the program, the name and the description."""
    orig_run, branch_run = at.orig_run, at.branch_run
    settings = f.body(orig_run)["settings"]
    # specs/training.md §6: in format 2 each step states its own lr, momentum and betas.
    per_step = Harmless("training.md", "§6 Registry", "reported but never evidence, because replay sets each step's "
                        "own values before replaying it and no check relies on them")
    for path, value in leaves(settings):
        def change_setting(g: Forge, path: tuple[Any, ...] = ("settings", *path), value: Any = value) -> None:
            for k in g.seqs("RunStarted"):
                g.set(k, path, other(value))
        varying = len(path) >= 4 and path[:2] == ("optimizer", "groups") and path[3] in ("lr", "momentum", "betas")
        add(f"RunStarted.settings.{dotted(path)}", "RunStarted", change_setting,
            harmless=per_step if varying and settings.get("format", 1) >= 2 else None)
    for path, value in leaves(f.body(branch_run)["settings"]["branch"]):
        add(f"RunStarted(branch).settings.branch.{dotted(path)}", "RunStarted",
            lambda g, p=("settings", "branch", *path), v=value: g.set(branch_run, p, other(v)))
    # specs/training.md §7: the exact-replay keys are compared with the verifier's machine;
    # num_threads is what replay runs with; the rest describe the machine and are never evidence.
    from gradledger.verify._internal.environment import EXACT_KEYS

    described = Harmless("training.md", "§7 Environment", "The other keys are the trainer's description of its "
                         "machine, reported but never evidence: no check and no verdict relies on them")
    threads = Harmless("training.md", "§7 Environment", "`num_threads` is taken from the record: the verifier "
                       "replays with that many threads, so a false value can only make exact replay fail")
    for key, value in sorted(f.body(orig_run)["environment"].items()):
        def change_env(g: Forge, key: str = key, value: Any = value) -> None:
            for k in g.seqs("RunStarted"):
                g.set(k, ("environment", key), other(value))
        why = threads if key == "num_threads" else None if key in EXACT_KEYS else described
        add(f"RunStarted.environment.{key}", "RunStarted", change_env, issue="10.4", harmless=why)
    add("RunStarted.environment: a key removed", "RunStarted",
        lambda g: [g.delete(k, ("environment", "torch")) for k in g.seqs("RunStarted")], issue="10.4")
    add("RunStarted.run_id", "RunStarted", lambda g: g.set(orig_run, ("run_id",), "another-run"))
    add("RunStarted.description", "RunStarted", lambda g: g.set(orig_run, ("description",), "forged text"),
        harmless=Harmless("training.md", "§5 RunStarted", "| `description` | optional free text |"))
    add("RunStarted.artifacts.program: names a digest the bundle lacks", "RunStarted",
        lambda g: [g.set(k, ("artifacts", "program"), bytes(32)) for k in g.seqs("RunStarted")])
    add("RunStarted.artifacts: program entry removed", "RunStarted",
        lambda g: [g.set(k, ("artifacts",), {}) for k in g.seqs("RunStarted")])


def _drop_last(b: dict[str, Any]) -> None:
    # The record stays well formed: one routing rule and (format 4) one loss per index.
    b["batch"].pop()
    b["routing"]["rules"].pop()
    if "example_losses" in b:
        b["example_losses"] = b["example_losses"][:-4]


def _repeat_first(b: dict[str, Any]) -> None:
    b["batch"].append(b["batch"][0])
    b["routing"]["rules"].append(b["routing"]["rules"][0])
    if "example_losses" in b:
        b["example_losses"] += b["example_losses"][:4]


def _ulp(data: bytes, i: int) -> bytes:
    (v,) = struct.unpack_from("<I", data, 4 * i)
    return data[: 4 * i] + struct.pack("<I", v ^ 1) + data[4 * i + 4:]


def _governed_updates(f: Forge, at: Layout, add: Add) -> None:
    """GovernedUpdate: every field of one step of the original run and of the branch."""
    branch_run, updates, branch_updates, dataset = at.branch_run, at.updates, at.branch_updates, at.dataset
    for label, k in (("", updates[1]), ("(branch)", branch_updates[1])):
        for path, value in leaves(f.body(k)):
            if label and path[0] not in ("step", "batch", "lr", "loss", "band_update_norms", "sources"):
                continue  # the branch repeats the same fields: its own batch-level ones suffice
            add(f"GovernedUpdate{label}.{dotted(path)}", "GovernedUpdate",
                lambda g, k=k, p=path, v=value: g.set(k, p, other(v)))
    k = updates[1]
    body = f.body(k)
    add("GovernedUpdate.batch: two positions of different rules swapped", "GovernedUpdate",
        lambda g: g.edit(k, lambda b: _swap_different(b)))
    add("GovernedUpdate.batch: one example dropped", "GovernedUpdate", lambda g: g.edit(k, _drop_last))
    add("GovernedUpdate.batch: one example added", "GovernedUpdate", lambda g: g.edit(k, _repeat_first))
    if "example_losses" in body:
        add("GovernedUpdate.example_losses: one example's loss moved by one unit in the last place", "GovernedUpdate",
            lambda g: g.edit(k, lambda b: b.update(example_losses=_ulp(b["example_losses"], 1))))
    add("GovernedUpdate.batch: an out-of-range index", "GovernedUpdate",
        lambda g: g.set(k, ("batch", 0), f.body(dataset)["count"]))
    add("GovernedUpdate.sources: one removed", "GovernedUpdate", lambda g: g.edit(k, lambda b: b["sources"].pop()))
    add("GovernedUpdate.sources: reordered", "GovernedUpdate", lambda g: g.edit(k, lambda b: b["sources"].reverse()))
    add("GovernedUpdate.sources: a foreign source added", "GovernedUpdate",
        lambda g: g.edit(k, lambda b: b["sources"].append("worker-9")))
    add("GovernedUpdate.authority_writes: an authority removed", "GovernedUpdate",
        lambda g: g.edit(k, lambda b: b["authority_writes"].pop(sorted(b["authority_writes"])[0])))
    add("GovernedUpdate.authority_writes: an authority added", "GovernedUpdate",
        lambda g: g.edit(k, lambda b: b["authority_writes"].__setitem__("acme/experts/other", [1.0, 1.0, 1.0])))
    for opt in ("sources", "optimizer", "seeds", "routing"):
        if opt in body:
            add(f"GovernedUpdate.{opt}: field removed", "GovernedUpdate", lambda g, o=opt: g.delete(k, (o,)))
    add("GovernedUpdate: a step deleted", "GovernedUpdate", lambda g: g.remove(updates[1]) and None)

    def drop_and_renumber(g: Forge) -> None:
        g.remove(updates[1])
        for u in g.seqs("GovernedUpdate", lo=updates[1], hi=branch_run - 1):
            g.set(u, ("step",), g.body(u)["step"] - 1)
        for c in g.seqs("Checkpoint", lo=updates[1], hi=branch_run - 1):
            g.set(c, ("step",), g.body(c)["step"] - 1)
    add("GovernedUpdate: a step deleted, later steps and checkpoints renumbered", "GovernedUpdate", drop_and_renumber)
    add("GovernedUpdate: a step recorded twice", "GovernedUpdate",
        lambda g: g.insert(updates[1] + 1, copy.deepcopy(g.recs[updates[1]])))

    def swap_steps(g: Forge) -> None:
        a, b = updates[0], updates[1]
        body_a, body_b = copy.deepcopy(g.body(a)), copy.deepcopy(g.body(b))
        g.edit(a, lambda x: x.update({**body_b, "step": body_a["step"]}))
        g.edit(b, lambda x: x.update({**body_a, "step": body_b["step"]}))
    add("GovernedUpdate: two steps trained in the other order (records swapped, step numbers kept)",
        "GovernedUpdate", swap_steps)
    add("GovernedUpdate: every step's loss rewritten lower", "GovernedUpdate",
        lambda g: [g.set(u, ("loss",), g.body(u)["loss"] / 2) for u in g.seqs("GovernedUpdate")])
    add("GovernedUpdate: every step's lr rewritten (0.02)", "GovernedUpdate",
        lambda g: [g.edit(u, _all_lr(0.02)) for u in g.seqs("GovernedUpdate")])
    add("GovernedUpdate: the branch trains on the retired source's examples (original batch)", "GovernedUpdate",
        lambda g: g.set(branch_updates[1], ("batch",), list(f.body(updates[1])["batch"])))


def _checkpoints(f: Forge, at: Layout, add: Add) -> None:
    """Checkpoint: every field of a middle checkpoint, and every checkpoint's weights."""
    ckpts, branch_ckpts, cert = at.ckpts, at.branch_ckpts, at.cert
    mid = ckpts[1]
    cbody = f.body(mid)
    for field_name in ("step", "digest", "artifact"):
        add(f"Checkpoint.{field_name}", "Checkpoint", lambda g, n=field_name: g.set(mid, (n,), other(cbody[n])))
    add("Checkpoint.artifact: another checkpoint's artifact", "Checkpoint",
        lambda g: g.set(mid, ("artifact",), f.body(ckpts[-1])["artifact"]))
    first_tensor = sorted(cbody["tensors"])[0]
    for name in sorted(cbody["tensors"]):
        add(f"Checkpoint.tensors.{name}", "Checkpoint",
            lambda g, n=name: g.set(mid, ("tensors", n), other(cbody["tensors"][n])))
        if not name.startswith("optim.group."):
            add(f"artifact: checkpoint tensor {name} changed alone, digests re-derived", "artifact:checkpoint",
                lambda g, n=name: rewrite_checkpoint(g, mid, _perturb(1e-3, n)))
    add("Checkpoint.tensors: an entry removed", "Checkpoint", lambda g: g.delete(mid, ("tensors", first_tensor)))
    add("Checkpoint.tensors: an entry added", "Checkpoint", lambda g: g.set(mid, ("tensors", "model.extra"), bytes(32)))
    add("Checkpoint: a middle checkpoint record deleted", "Checkpoint", lambda g: g.remove(mid) and None)
    add("Checkpoint: optimizer weight_decay tensor 0.02, digests re-derived", "Checkpoint",
        lambda g: rewrite_checkpoint(g, mid, _set_tensor("optim.group.0.weight_decay", 0.02)))
    add("Checkpoint: an lr tensor added (format 2 checkpoints carry none), digests re-derived", "Checkpoint",
        lambda g: rewrite_checkpoint(g, mid, _set_tensor("optim.group.0.lr", 0.02)))
    for label, seqs_ in (("", ckpts), ("branch ", branch_ckpts)):
        for i, c in enumerate(seqs_):
            add(f"artifact: {label}checkpoint {i} (step {f.body(c)['step']}) weights changed, digests re-derived",
                "artifact:checkpoint", lambda g, c=c: rewrite_checkpoint(g, c, _perturb(1e-3)))
    for label, c in (("original", ckpts[-1]), ("branch", branch_ckpts[-1])):
        add(f"artifact: {label} final checkpoint artifact swapped for fine-tuned weights, record digests kept",
            "artifact:checkpoint", lambda g, c=c: _swap_artifact_only(g, c, _perturb(1e-3)), issue="10.2")
    add("Checkpoint: the branch's final checkpoint is the original head (not unlearned)", "Checkpoint",
        lambda g: [g.set(branch_ckpts[-1], (n,), f.body(ckpts[-1])[n]) for n in ("digest", "tensors", "artifact")]
        and g.set(cert, ("new_head",), f.body(ckpts[-1])["digest"]))


def _tree_heads(f: Forge, at: Layout, add: Add) -> None:
    """TreeHead: the attacker's own tree heads, left wrong."""
    updates, heads = at.updates, at.heads
    last_head = heads[-1]
    for field_name in ("size", "root", "origin"):
        def bad_head(g: Forge, n: str = field_name) -> None:
            g.keep_heads.add(last_head)
            g.set(last_head, (n,), other(g.body(last_head)[n]))
        add(f"TreeHead.{field_name}", "TreeHead", bad_head)
    add("TreeHead: a middle head keeps the honest root of a forged log", "TreeHead",
        lambda g: (g.keep_heads.add(heads[1]), g.set(updates[0], ("loss",), 0.5)) and None)


def _dataset(f: Forge, at: Layout, add: Add) -> None:
    """DatasetCommitted, its manifests and its inputs."""
    ckpts, dataset = at.ckpts, at.dataset
    dbody = f.body(dataset)
    for field_name in ("name", "root", "count", "manifests", "data"):
        add(f"DatasetCommitted.{field_name}", "DatasetCommitted",
            lambda g, n=field_name: g.set(dataset, (n,), other(dbody[n])), issue="10.3" if field_name == "data" else None)
    add("DatasetCommitted.data removed and the inputs left out, final weights fine-tuned", "DatasetCommitted",
        lambda g: _no_inputs(g, dataset, ckpts[-1]), issue="10.3")
    add("artifact: inputs left out (export without --with-data), final weights fine-tuned", "artifact:inputs",
        lambda g: _no_inputs(g, dataset, ckpts[-1], keep_field=True), issue="10.3")
    add("artifact: inputs, one row changed, digest re-derived", "artifact:inputs",
        lambda g: _rewrite_inputs(g, dataset, lambda x: x.__setitem__((0, 0), x[0, 0] + 0.25)))
    add("artifact: inputs, a row never trained on changed, digest re-derived", "artifact:inputs",
        lambda g: _rewrite_inputs(g, dataset, lambda x: x.__setitem__((-1, 5), x[-1, 5] + 0.25)))
    add("artifact: manifests, two swapped, root re-derived", "artifact:manifests",
        lambda g: _rewrite_manifests(g, dataset, lambda m: m.__setitem__(slice(0, 2), [m[1], m[0]])))
    add("artifact: manifests, last dropped, count and root re-derived", "artifact:manifests",
        lambda g: _rewrite_manifests(g, dataset, lambda m: m.pop()))
    add("artifact: manifests, a byte flipped in one, root re-derived", "artifact:manifests",
        lambda g: _rewrite_manifests(g, dataset, lambda m: m.__setitem__(3, m[3][:-1] + bytes([m[3][-1] ^ 1]))))

    for version in (2, 1):
        add(f"artifact: manifests, a v{version} manifest signed by worker-1 claiming two other workers' votes "
            "(a colluding source's key), root re-derived", "artifact:manifests",
            lambda g, v=version: _colluding_manifest(g, dataset, v))


def _policy(f: Forge, at: Layout, add: Add) -> None:
    """PolicyAdopted (root-signed): the trainer cannot re-sign a changed one."""
    policy = at.policy
    def new_policy(g: Forge, sign: bool = False) -> None:
        data, signature = encoding.decode(g.body(policy)["policy"])
        doc = encoding.decode(data)
        for rule in doc["rules"]:
            rule["profile"] = [1.0, 1.0, 1.0]  # everyone writes everywhere
        if sign:  # the trainer signs the policy document as its own
            doc["signer"] = g.trainer.key_id
        data = encoding.encode(doc)
        signature = g.trainer.sign("policy", data) if sign else signature
        raw = encoding.encode([data, signature])
        digest = hashlib.sha256(raw).digest()
        g.replace_value(g.body(policy)["digest"], digest)
        g.set(policy, ("policy",), raw)
    add("PolicyAdopted.policy: every rule writes every band, digest re-derived", "PolicyAdopted", new_policy)
    add("PolicyAdopted.digest", "PolicyAdopted", lambda g: g.set(policy, ("digest",), other(g.body(policy)["digest"])))
    add("PolicyAdopted: a policy the trainer signed, recorded under the trainer's signature", "PolicyAdopted",
        lambda g: _as_trainer(g, policy, lambda g: new_policy(g, sign=True)))


def _credentials(f: Forge, at: Layout, add: Add) -> None:
    """CredentialIssued and CredentialRevoked: the trainer may record credentials, never issue or
    revoke one."""
    dataset, retired, creds = at.dataset, at.retired, at.creds
    source_cred = creds[-1]
    add("CredentialIssued.credential: a byte flipped", "CredentialIssued",
        lambda g: g.set(source_cred, ("credential",), other(g.body(source_cred)["credential"])))
    add("CredentialIssued: a source credential issued by the trainer", "CredentialIssued",
        lambda g: g.insert(dataset, _trainer_issued_source(g)))
    add("CredentialIssued: an existing credential re-recorded under the trainer's signature", "CredentialIssued",
        lambda g: _as_trainer(g, source_cred, lambda _: None),
        harmless=Harmless("observations.md", "Registry", "| `CredentialIssued` | root, authority, trainer |"))
    add("CredentialRevoked: the trainer revokes the crowd authority", "CredentialRevoked",
        lambda g: g.insert(retired, g.new_record("CredentialRevoked", {"key_id": _subject_key(g, "crowd"),
                                                                        "reason": "forged"},
                                                 g.recs[retired].time)))
    add("CredentialRevoked: recorded under the crowd authority's name, not signed by it", "CredentialRevoked",
        lambda g: g.insert(retired, g.new_record("CredentialRevoked", {"key_id": _subject_key(g, "worker-1"),
                                                                        "reason": "forged"}, g.recs[retired].time,
                                                 signer=g.recs[retired].signer)))


def _retirement(f: Forge, at: Layout, add: Add) -> None:
    """SourceRetired (authority-signed): the trainer cannot change, sign or drop one."""
    retired = at.retired
    rbody = f.body(retired)
    for field_name in ("source", "key_id", "reason"):
        add(f"SourceRetired.{field_name}", "SourceRetired",
            lambda g, n=field_name: g.set(retired, (n,), other(rbody[n])))
    add("SourceRetired: signed by the trainer", "SourceRetired", lambda g: _as_trainer(g, retired, lambda _: None))
    add("SourceRetired: deleted (the branch unlearns a source never retired)", "SourceRetired",
        lambda g: g.remove(retired) and None)


def _certificate(f: Forge, at: Layout, add: Add) -> None:
    """UnlearningCertificate: every field, and the removed and relabeled artifacts."""
    branch_ckpts, cert = at.branch_ckpts, at.cert
    ubody = f.body(cert)
    for field_name in ("source", "rewind_checkpoint", "original_head", "new_head", "removed", "relabeled"):
        add(f"UnlearningCertificate.{field_name}", "UnlearningCertificate",
            lambda g, n=field_name: g.set(cert, (n,), other(ubody[n])))
    add("UnlearningCertificate.mode: exact recorded as approximate", "UnlearningCertificate",
        lambda g: g.set(cert, ("mode",), "approximate"),
        harmless=Harmless("verification.md", "Unlearning certificates",
                          "`\"approximate\"` that passes is reported with status `pass` and a detail that starts"))
    add("UnlearningCertificate.new_head: an earlier branch checkpoint", "UnlearningCertificate",
        lambda g: g.set(cert, ("new_head",), f.body(branch_ckpts[-2])["digest"]))
    add("UnlearningCertificate: recorded twice", "UnlearningCertificate",
        lambda g: g.insert(cert + 1, copy.deepcopy(g.recs[cert])))
    for key in ("removed", "relabeled"):
        def drop_one(g: Forge, key: str = key) -> None:
            items = encoding.decode(g.arts[ubody[key]])
            g.replace_artifact(ubody[key], encoding.encode(items[1:]))
        add(f"artifact: unlearning {key}, one entry dropped, digest re-derived", f"artifact:{key}", drop_one)
    def relabel(g: Forge) -> None:
        pairs = encoding.decode(g.arts[ubody["relabeled"]])
        pairs[0] = [pairs[0][0], (pairs[0][1] + 1) % 10]
        g.replace_artifact(ubody["relabeled"], encoding.encode(pairs))
    add("artifact: unlearning relabeled, a label changed, digest re-derived", "artifact:relabeled", relabel)


def _program(f: Forge, at: Layout, add: Add) -> None:
    """The model program artifact (specs/replay.md §2)."""
    orig_run = at.orig_run
    program = f.body(orig_run)["artifacts"]["program"]
    add("artifact: program, a byte flipped in a weight (CRC left), digest re-derived", "artifact:program",
        lambda g: g.replace_artifact(program, _flip_member(g.arts[program], "archive/data/weights/weight_0")))
    add("artifact: program, a weight changed and the archive rebuilt, digest re-derived", "artifact:program",
        lambda g: g.replace_artifact(program, _edit_member(g.arts[program], "archive/data/weights/weight_5",
                                                           lambda b: bytes([b[0] ^ 0x40]) + b[1:])))
    add("artifact: program, the model graph's first op replaced, digest re-derived", "artifact:program",
        lambda g: g.replace_artifact(program, _edit_member(g.arts[program], "archive/models/model.json",
                                                           lambda b: b.replace(b"aten.relu.default", b"aten.tanh.default", 1))))
    add("artifact: program missing from the bundle", "artifact:program", lambda g: g.arts.pop(program))


def _runs(f: Forge, at: Layout, add: Add) -> None:
    """Runs added: an ungoverned run that ships weights no replay reproduces (issue 10.5)."""
    orig_run, branch_ckpts = at.orig_run, at.branch_ckpts
    add("Checkpoint: an ungoverned 'packaging' run ships fine-tuned weights", "RunStarted",
        lambda g: _packaging_run(g, orig_run, branch_ckpts[-1]), issue="10.5")


def _tolerance(f: Forge, at: Layout, add: Add) -> None:
    """Environment plus fine-tuned weights: the bundle choosing tolerance mode (issue 10.4)."""
    ckpts = at.ckpts
    def tolerance(g: Forge) -> None:
        for r in g.seqs("RunStarted"):
            g.set(r, ("environment", "torch"), "2.0.0")
        rewrite_checkpoint(g, ckpts[-1], _perturb(1e-5))
    add("RunStarted.environment.torch changed and final weights fine-tuned", "RunStarted", tolerance, issue="10.4")


def _bundle(f: Forge, at: Layout, add: Add) -> None:
    """The header and the framing (a trainer writes the bundle too)."""
    add("header.size", "header", lambda g: g.header_overrides.__setitem__("size", len(g.recs) - 1), issue="9.header")
    add("header.root", "header", lambda g: g.header_overrides.__setitem__("root", bytes(32)), issue="9.header")
    add("header.origin", "header", lambda g: g.header_overrides.__setitem__("origin", "gradledger:forged"),
        issue="9.header")
    add("bundle: an artifact no record names", "artifact:unnamed", lambda g: g.put(b"an unnamed artifact") and None,
        harmless=Harmless("bundle.md", "§4 What a verifier may rely on", "An artifact that no record names is inert."))


def _time(f: Forge, at: Layout, add: Add) -> None:
    """Timestamps: a record dated before its predecessor."""
    updates, first_ts = at.updates, at.first_ts
    add("envelope.time: a step dated before the one it follows", "GovernedUpdate",
        lambda g: setattr(g.recs[updates[1]], "time", first_ts - 10**9))


def _forensic_trace(f: Forge, at: Layout, add: Add) -> None:
    """ForensicTrace (trainer-signed, specs/forensics.md §7): the result, the query, the method, the run and
    the query file, with the digests a forger recomputes; only recomputation (--check-traces) can tell."""
    from gradledger.training.forensics.record import result_digest

    traces = f.seqs("ForensicTrace")
    if not traces:
        return  # a demo built without its investigation (build_demo(trace=False))
    (k,) = traces
    body = f.body(k)

    def result(change: Callable[[dict[str, Any]], None]) -> Callable[[Forge], None]:
        def apply(g: Forge) -> None:
            r = copy.deepcopy(body["result"])
            change(r)
            g.set(k, ("result",), r)
            g.set(k, ("result_digest",), result_digest(r))
        return apply

    def query(change: Callable[[dict[str, Any]], None]) -> Callable[[Forge], None]:
        def apply(g: Forge) -> None:
            q = copy.deepcopy(body["query"])
            change(q)
            g.set(k, ("query",), q)
            g.set(k, ("query_digest",), hashlib.sha256(encoding.encode(q)).digest())
        return apply

    def lower_top(r: dict[str, Any]) -> None:
        r["sources"][0][1] *= 0.5

    def swap_top(r: dict[str, Any]) -> None:
        (a, sa), (b, sb) = r["sources"][:2]
        r["sources"][:2] = [[b, sa], [a, sb]]

    add("ForensicTrace.result: the top source's score lowered, digest recomputed", "ForensicTrace", result(lower_top))
    add("ForensicTrace.result: the top two sources swapped, digest recomputed", "ForensicTrace", result(swap_top))
    add("ForensicTrace.result: the top source dropped, digest recomputed", "ForensicTrace",
        result(lambda r: r["sources"].pop(0) and None))
    add("ForensicTrace.result: a band's share moved, digest recomputed", "ForensicTrace",
        result(lambda r: r["bands"].__setitem__(0, r["bands"][0] + r["bands"][1])))
    for field_name in ("result_digest", "query_digest", "run", "format"):
        add(f"ForensicTrace.{field_name}", "ForensicTrace", lambda g, n=field_name: g.set(k, (n,), other(body[n])))
    add("ForensicTrace.method: checkpoints", "ForensicTrace", lambda g: g.set(k, ("method",), "checkpoints"))
    add("ForensicTrace.parameters.top", "ForensicTrace", lambda g: g.set(k, ("parameters", "top"), 2))
    add("ForensicTrace.query: another target, digest recomputed", "ForensicTrace",
        query(lambda q: q.__setitem__("target", [SWAP_OTHER.get(c, c) for c in q["target"]])))
    add("ForensicTrace.query: the contrast dropped, digest recomputed", "ForensicTrace",
        query(lambda q: q.pop("against") and None))

    def other_row(g: Forge) -> None:
        from safetensors.torch import load, save

        old = body["query"]["file"]
        tensors = load(g.arts[old])
        tensors["x"][0] = tensors["x"][1]
        new = g.replace_artifact(old, save(tensors))
        q = copy.deepcopy(g.body(k)["query"])
        g.set(k, ("query_digest",), hashlib.sha256(encoding.encode(q)).digest())
        assert q["file"] == new
    add("artifact: the trace's query file, one row changed, digest re-derived", "artifact:query", other_row)
    add("artifact: the trace's query file dropped", "artifact:query", lambda g: g.arts.pop(body["query"]["file"]) and None)


#: The demo's query reads 3s as 8 and 8s as 3: another target swaps 3 and 8 for 5.
SWAP_OTHER = {3: 5, 8: 5}


def _memorization_scan(f: Forge, at: Layout, add: Add) -> None:
    """MemorizationScan (trainer-signed at each checkpoint, specs/dynamics.md §2): what it flags, its counts,
    its digest, its coverage, and its presence; the verifier recomputes every scan from the recorded losses."""
    scans = f.seqs("MemorizationScan")
    if not scans:
        return
    k = scans[-1]
    body = f.body(k)
    for field_name in ("scores_digest", "scored", "through", "run", "format"):
        add(f"MemorizationScan.{field_name}", "MemorizationScan", lambda g, n=field_name: g.set(k, (n,), other(body[n])))
    add("MemorizationScan.parameters.fraction", "MemorizationScan",
        lambda g: g.set(k, ("parameters", "fraction"), 0.5))
    add("MemorizationScan.flagged: an example flagged that the scores do not put on top", "MemorizationScan",
        lambda g: g.set(k, ("flagged",), [*body["flagged"], [0, 1.0]]))
    if body["flagged"]:
        add("MemorizationScan.flagged: the most memorized example hidden", "MemorizationScan",
            lambda g: g.set(k, ("flagged",), body["flagged"][1:]))
        add("MemorizationScan.flagged[0]: its score lowered", "MemorizationScan",
            lambda g: g.set(k, ("flagged", 0, 1), body["flagged"][0][1] * 0.5))
    add("MemorizationScan: the last checkpoint's scan removed", "MemorizationScan", lambda g: g.remove(k) and None)

    def undeclared(g: Forge) -> None:
        for s in reversed(g.seqs("MemorizationScan")):
            g.remove(s)
        for r in g.seqs("RunStarted"):
            g.set(r, ("settings", "monitors"), {})
    # The demo's policy requires the scans: without that requirement, this forgery is the trainer's right.
    add("MemorizationScan: every scan removed and settings.monitors emptied", "MemorizationScan", undeclared,
        harmless=None if f.policy_monitors() else Harmless(
            "dynamics.md", "§2.2 Scans at checkpoints", "A run whose settings declare no monitor records no scan at "
            "its checkpoints; that is the trainer's choice unless the policy in force requires it"))


def _depth_profile(f: Forge, at: Layout, add: Add) -> None:
    """DepthProfile (trainer-signed at each checkpoint, specs/dynamics.md §5): its values, which replay
    recomputes from the checkpoint's weights, its form, and its presence."""
    profiles = f.seqs("DepthProfile")
    if not profiles:
        return
    k = profiles[-1]
    body = f.body(k)
    add("DepthProfile.entropy[0][3]: one class's confusion halved", "DepthProfile",
        lambda g: g.set(k, ("entropy", 0, 3), body["entropy"][0][3] / 2))
    add("DepthProfile.mean[2]: the deepest band's mean lowered", "DepthProfile",
        lambda g: g.set(k, ("mean", 2), body["mean"][2] * 0.9))
    for field_name in ("step", "dataset", "format", "run"):
        add(f"DepthProfile.{field_name}", "DepthProfile", lambda g, n=field_name: g.set(k, (n,), other(body[n])))
    add("DepthProfile.parameters.temperature", "DepthProfile", lambda g: g.set(k, ("parameters", "temperature"), 1.0))
    add("DepthProfile.counts[0]", "DepthProfile", lambda g: g.set(k, ("counts", 0), body["counts"][0] + 1))
    add("DepthProfile: the last checkpoint's profile removed", "DepthProfile", lambda g: g.remove(k) and None)

    def undeclared(g: Forge) -> None:
        for s in reversed(g.seqs("DepthProfile")):
            g.remove(s)
        for r in g.seqs("RunStarted"):
            g.delete(r, ("settings", "monitors", "profiles"))
    add("DepthProfile: every profile removed and settings.monitors.profiles dropped", "DepthProfile", undeclared,
        harmless=Harmless("dynamics.md", "§5.1 Declaring profiles (training format 8)",
                          "A run whose settings declare no profiles records none; that is the trainer's choice"))


SECTIONS = (_run_started, _governed_updates, _checkpoints, _tree_heads, _dataset, _policy, _credentials, _retirement,
            _certificate, _program, _runs, _tolerance, _bundle, _time, _forensic_trace, _memorization_scan,
            _depth_profile)


def lr_catalogue(f: Forge) -> list[Forgery]:
    """Forgeries on the same demo trained at another learning rate (issue 10.6): every recorded lr,
    checkpoint optimizer state included, rewritten to the run's advertised 0.01."""
    def disguise(g: Forge) -> None:
        for k in g.seqs("RunStarted"):
            g.edit(k, lambda b: [grp.__setitem__("lr", 0.01) for grp in b["settings"]["optimizer"]["groups"]])
        for k in g.seqs("GovernedUpdate"):
            g.edit(k, _all_lr(0.01))
        # Format 2 checkpoints carry no lr (each step records its own): nothing there to rewrite.

    def steps_only(g: Forge) -> None:
        for k in g.seqs("GovernedUpdate"):
            g.edit(k, _all_lr(0.01))

    return [Forgery("trained at lr 0.05, every recorded lr (settings, steps, checkpoints) says 0.01", "GovernedUpdate",
                    disguise, base="lr"),
            Forgery("trained at lr 0.05, the steps' lr and optimizer say 0.01", "GovernedUpdate", steps_only, base="lr")]


def ungated_catalogue(f: Forge) -> list[Forgery]:
    """Issue 10.1: the bundle of a run trained with the gate off (``build_demo(ungated=True)``), as exported."""
    return [Forgery("an ungated program and training, every routing record honest", "artifact:program",
                    lambda g: None, issue="10.1", base="ungated")]


def _all_lr(lr: float) -> Callable[[dict[str, Any]], None]:
    def change(b: dict[str, Any]) -> None:
        b["lr"] = lr
        for grp in b.get("optimizer", {}).get("groups", []):
            grp["lr"] = lr
    return change


def _swap_different(b: dict[str, Any]) -> None:
    rules = b["routing"]["rules"]
    i, j = next((i, j) for i in range(len(rules)) for j in range(i + 1, len(rules)) if rules[i] != rules[j])
    b["batch"][i], b["batch"][j] = b["batch"][j], b["batch"][i]


def _swap_artifact_only(g: Forge, k: int, change: Callable[[dict[str, Any]], None]) -> None:
    """The Checkpoint keeps its honest digests but names an artifact with other weights (issue 10.2)."""
    body = copy.deepcopy(g.body(k))
    probe = g.clone()
    rewrite_checkpoint(probe, k, change)
    new_artifact = probe.body(k)["artifact"]
    g.arts.pop(body["artifact"], None)
    g.arts[new_artifact] = probe.arts[new_artifact]
    g.set(k, ("artifact",), new_artifact)


def _no_inputs(g: Forge, dataset: int, final: int, keep_field: bool = False) -> None:
    """A bundle exported without data: no dataset's inputs (the held-out set's either), ``dataset``'s field
    kept where ``keep_field`` asks; the final weights fine-tuned."""
    for k in g.seqs("DatasetCommitted"):
        if "data" not in g.body(k):
            continue
        g.arts.pop(g.body(k)["data"], None)
        if not (keep_field and k == dataset):
            g.delete(k, ("data",))
    g.with_data = False
    rewrite_checkpoint(g, final, _perturb(1e-3))


def _rewrite_inputs(g: Forge, dataset: int, change: Callable[[Any], None]) -> None:
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    old = g.body(dataset)["data"]
    tensors = {n: t.clone() for n, t in st_load(g.arts[old]).items()}
    change(next(iter(tensors.values())))
    g.replace_artifact(old, st_save(tensors))


def _rewrite_manifests(g: Forge, dataset: int, change: Callable[[list[bytes]], None]) -> None:
    from gradledger.ledger.merkle import root_of
    from gradledger.training.dataset import decode_manifests

    old = g.body(dataset)["manifests"]
    items = [bytes(m) for m in decode_manifests(g.arts[old])]
    change(items)
    raw = encoding.encode(items)
    g.replace_artifact(old, raw)
    g.set(dataset, ("root",), root_of([leaf_hash(m) for m in items]))
    g.set(dataset, ("count",), len(items))
    for k in g.seqs("RunStarted"):
        g.set(k, ("settings", "dataset", "root"), root_of([leaf_hash(m) for m in items]))
        g.set(k, ("settings", "dataset", "count"), len(items))


def _colluding_manifest(g: Forge, dataset: int, version: int, signer: str = "worker-1") -> None:
    """Issue 10.8: one crowd worker's key (the attacker's accomplice) signs a manifest in which two
    other workers vote with it, for an example no step trains on (so routing and replay are moot:
    only the votes' signatures can tell). With ``signer="crowd"`` (the authority over the workers,
    attesting on their behalf) the same manifest is honest: the control."""
    from gradledger.ledger import credentials as C
    from gradledger.training.dataset import decode_manifests
    from gradledger.training.manifests import parse_manifest, sign_manifest, source_entry

    creds = {c.subject: c for c in (C.parse(g.body(k)["credential"]) for k in g.seqs("CredentialIssued"))}
    trained = {i for k in g.seqs("GovernedUpdate") for i in g.body(k)["batch"]}
    items = [bytes(m) for m in decode_manifests(g.arts[g.body(dataset)["manifests"]])]
    i, m = next((i, parse_manifest(raw)) for i, raw in enumerate(items)
                if i not in trained and "worker-4" not in parse_manifest(raw).source_names
                and parse_manifest(raw).manifest["signer"] == _subject_key(g, "crowd"))
    key = next(k for k in g.cosigners.values() if k.label == signer)
    votes = [source_entry(creds[w], m.label, 0.8) for w in ("worker-1", "worker-2", "worker-3")]
    forged = sign_manifest(example=m.example, label=m.label, sources=votes, aggregation="majority", consensus=1.0,
                           confidence=1.0, ontology=m.manifest["ontology"], review="accepted", key=key, time=m.time)
    signed = forged.signed
    if version == 1:  # the v1 form: no attested_by, the signer one of the voters
        body = dict(forged.manifest, v=1, sources=[{k: v for k, v in src.items() if k != "attested_by"}
                                                   for src in forged.manifest["sources"]])
        data = encoding.encode(body)
        signed = encoding.encode([data, key.sign("manifest", data)])

    def swap(ms: list[bytes]) -> None:
        ms[i] = signed
    _rewrite_manifests(g, dataset, swap)


def _as_trainer(g: Forge, k: int, change: Callable[[Forge], None]) -> None:
    change(g)
    g.recs[k].signer = g.trainer.key_id
    g.recs[k].changed = True


def _subject_key(g: Forge, label: str) -> bytes:
    for key in [*g.cosigners.values(), *g.attacker.values()]:
        if key.label == label:
            return key.key_id
    raise KeyError(label)


def _trainer_issued_source(g: Forge) -> Rec:
    from gradledger.ledger import credentials as C

    fresh = SigningKey.from_seed(bytes(range(32)), "worker-9")
    cred = C.issue(g.trainer, subject="worker-9", path="acme/crowd/pool", role="source", public_key=fresh.public_key)
    return g.new_record("CredentialIssued", {"credential": cred.signed}, g.recs[g.first("DatasetCommitted") - 1].time)


def _members(archive: bytes) -> list[tuple[Any, bytes]]:
    z = zipfile.ZipFile(io.BytesIO(archive))
    return [(info, z.read(info)) for info in z.infolist()]


def _edit_member(archive: bytes, name: str, change: Callable[[bytes], bytes]) -> bytes:
    """The archive rewritten with member ``name`` changed (valid CRCs: what a careful forger writes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info, data in _members(archive):
            dst.writestr(info, change(data) if info.filename == name else data)
    return out.getvalue()


def _flip_member(archive: bytes, name: str) -> bytes:
    """One byte of member ``name``'s stored data flipped in place (its CRC now wrong)."""
    z = zipfile.ZipFile(io.BytesIO(archive))
    info = z.getinfo(name)
    # local header: 30 bytes + name + extra, then the stored data
    start = info.header_offset + 30 + int.from_bytes(archive[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(archive[info.header_offset + 28:info.header_offset + 30], "little")
    data = bytearray(archive)
    data[start + 4] ^= 0x01
    return bytes(data)


def _packaging_run(g: Forge, orig_run: int, final: int) -> None:
    """Append an ungoverned run (RunStarted, one Checkpoint of fine-tuned weights, a TreeHead)."""
    probe = g.clone()
    rewrite_checkpoint(probe, final, _perturb(1e-3))
    ck = copy.deepcopy(probe.body(final))
    g.arts[ck["artifact"]] = probe.arts[ck["artifact"]]
    t = g.recs[-1].time + 1
    run = copy.deepcopy(g.body(orig_run))
    run["run_id"] = "digits-demo-release"
    run["settings"].pop("branch", None)
    # Its one checkpoint says step 0: a run's scans (which the demo's policy requires) start after step 0,
    # so the forger owes none, and only the heads check is left to tell.
    ck["step"] = 0
    g.recs.append(g.new_record("RunStarted", run, t))
    g.recs.append(g.new_record("Checkpoint", ck, t + 1))
    g.recs.append(g.new_record("TreeHead", {"origin": "", "size": 0, "root": bytes(32)}, t + 2))


# -- running a forgery through the verifier ------------------------------------------------------


@dataclass
class Outcome:
    name: str
    target: str
    verdict: str  # "rejected", "accepted", "error" (the verifier raised something unexpected), "unbuilt"
    detail: str
    issue: str | None = None


def verify_forgery(forgery: Forgery, base: Forge, verifier: Any, workdir: Path) -> Outcome:
    """Apply ``forgery`` to a copy of ``base``, write the bundle, run ``verifier`` on it in-process."""
    from gradledger.ledger.errors import GradledgerError

    g = base.clone()
    try:
        forgery.apply(g)
        path = g.write(workdir / "forged.glb")
    except Exception as exc:  # the forger's bug, not the verifier's verdict
        return Outcome(forgery.name, forgery.target, "unbuilt", f"{type(exc).__name__}: {exc}", forgery.issue)
    try:
        report = verifier.verify(path)
    except GradledgerError as exc:
        return Outcome(forgery.name, forgery.target, "rejected", f"exit 2: {exc}", forgery.issue)
    except Exception as exc:
        return Outcome(forgery.name, forgery.target, "error", f"{type(exc).__name__}: {exc}", forgery.issue)
    finally:
        path.unlink(missing_ok=True)
    if report.verified:
        return Outcome(forgery.name, forgery.target, "accepted", f"VERIFIED ({getattr(report, 'replay_mode', '')})",
                       forgery.issue)
    f = report.first_failure
    where = f"{f.name} seq {f.seq} step {f.step}: {f.detail}" if f is not None else "not verified"
    return Outcome(forgery.name, forgery.target, "rejected", where[:300], forgery.issue)


#: The CI subset (tests/test_forgery_coverage.py, bench/forgery.py --quick): every record type and
#: artifact kind, and every forgery the issues list as accepted.
QUICK_NAMES = (
    "RunStarted.settings.optimizer.groups[0].weight_decay",
    "RunStarted.settings.format",
    "RunStarted.settings.loss.name",
    "RunStarted.settings.seed",
    "RunStarted(branch).settings.branch.rewind",
    "RunStarted.environment.torch",
    "RunStarted.artifacts.program: names a digest the bundle lacks",
    "GovernedUpdate.lr",
    "GovernedUpdate.batch[0]",
    "GovernedUpdate.routing.rules[0]",
    "GovernedUpdate.band_update_norms[0]",
    "GovernedUpdate.authority_writes.acme/crowd/pool[0]",
    "GovernedUpdate: a step deleted",
    "GovernedUpdate(branch).batch[0]",
    "Checkpoint.step",
    "Checkpoint.tensors: an entry removed",
    "artifact: checkpoint 1 (step 3) weights changed, digests re-derived",
    "artifact: branch checkpoint 2 (step 6) weights changed, digests re-derived",
    "artifact: original final checkpoint artifact swapped for fine-tuned weights, record digests kept",
    "TreeHead.root",
    "DatasetCommitted.root",
    "DatasetCommitted.data removed and the inputs left out, final weights fine-tuned",
    "artifact: inputs, one row changed, digest re-derived",
    "artifact: manifests, two swapped, root re-derived",
    "artifact: manifests, a v2 manifest signed by worker-1 claiming two other workers' votes "
    "(a colluding source's key), root re-derived",
    "PolicyAdopted.policy: every rule writes every band, digest re-derived",
    "CredentialIssued: a source credential issued by the trainer",
    "CredentialRevoked: the trainer revokes the crowd authority",
    "SourceRetired: signed by the trainer",
    "UnlearningCertificate.new_head",
    "ForensicTrace.result: the top source's score lowered, digest recomputed",
    "ForensicTrace.query: another target, digest recomputed",
    "MemorizationScan.scores_digest",
    "MemorizationScan.flagged: an example flagged that the scores do not put on top",
    "MemorizationScan: the last checkpoint's scan removed",
    "MemorizationScan: every scan removed and settings.monitors emptied",
    "DepthProfile.entropy[0][3]: one class's confusion halved",
    "DepthProfile: the last checkpoint's profile removed",
    "artifact: the trace's query file, one row changed, digest re-derived",
    "artifact: unlearning removed, one entry dropped, digest re-derived",
    "artifact: program, a byte flipped in a weight (CRC left), digest re-derived",
    "Checkpoint: an ungoverned 'packaging' run ships fine-tuned weights",
    "RunStarted.environment.torch changed and final weights fine-tuned",
    "header.root",
    "trained at lr 0.05, every recorded lr (settings, steps, checkpoints) says 0.01",
    "an ungated program and training, every routing record honest",
)


def quick(forgeries: list[Forgery]) -> list[Forgery]:
    by_name = {f.name: f for f in forgeries}
    missing = [n for n in QUICK_NAMES if n not in by_name]
    if missing:
        raise KeyError(f"QUICK_NAMES not in the catalogue: {missing}")
    return [by_name[n] for n in QUICK_NAMES]
