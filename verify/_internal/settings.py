"""A governed run's RunStarted settings, re-derived from what the verifier checks itself.

specs/verification.md §6 ("Settings") and specs/training.md §2, §5. Nothing here is taken from
the bundle on trust: every field of ``RunStarted.settings`` that the structural checks do not
already compare (dataset, policy, optimizer) is re-derived and compared, so a trainer that
re-signs a forged setting is refused: in every replay mode, except what only the program can
confirm, which replay checks where it reads the program.

- ``seed`` is a uint64 and ``seed_rule`` the one rule training.md §2 defines; every step's
  ``seeds`` are ``{"run": seed, "step": step_seed(seed, step)}`` (a step without them fails).
- ``order``, ``batch_size``, ``drop_last`` and ``steps_per_epoch``: ``steps_per_epoch`` follows from
  the dataset's count, ``batch_size`` and ``drop_last``, and every step's batch is the one the order
  rule gives (re-derived from the seed); under ``"explicit"`` the batches repeat every
  ``steps_per_epoch`` steps.
- ``checkpoint_every``: the run starts with a Checkpoint, has one right after every
  ``checkpoint_every``-th update, and leaves no update uncheckpointed.
- ``bands``: well formed, and the band names are the policy's, head first.
- ``program``: ``format`` and ``inputs`` are the ones training.md §5 fixes, ``x_dtype`` and
  ``x_shape`` the committed inputs' rows.

Replay's part (``check_program``, ``check_step0``, called where replay loads the program, in the
replay worker behind its sandbox; the structural checks never read the program): the program's
user inputs and input ``x`` are ``settings.program``'s, the band prefixes resolve against its
parameters (specs/routing.md §1) to exactly ``band_params``, and its stored parameters and
persistent buffers are every step-0 Checkpoint replay restores (training.md §5: "weights as at
step 0").

An unlearning branch keeps its original run's settings (the certificate check compares them) and
its own batches and checkpoints are checked against the original run there; here only its
steps' seeds are checked.

Nothing here imports the training package.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from gradledger.ledger import encoding
from gradledger.ledger.envelope import Sealed
from gradledger.ledger.errors import EncodingError, VerificationError
from gradledger.ledger.program import Program

from .checkpoint import checkpoint_digest, tensor_digest
from .graph_routing import GATED_PREFIX
from .manifests import MAX_PARTS, PART_NAME
from .recipe import micro_sizes

SEED_RULE = "gradledger/step-seed/v1"  # specs/training.md §2
MICRO_SEED_RULE = "gradledger/micro-seed/v1"  # specs/training.md §2, format 2 accumulation
ORDER_RULE = "gradledger/order/v1"
ORDERS = (ORDER_RULE, "explicit")
#: Format 2 adds the user loader's own order, recorded step by step and committed before nothing.
LOADER_ORDER = "loader"
#: The training formats this verifier knows (specs/training.md §5): format 1 has no ``format`` key.
FORMATS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
#: Format 5: ``settings.frozen`` commits the parameters that do not train (specs/training.md §5).
FROZEN_FORMAT = 5
#: Format 6: ``settings.monitors`` declares what the run records at its checkpoints (specs/dynamics.md §2.2).
MONITORS_FORMAT = 6
#: Format 7: ``settings.distributed``, a run over torch.distributed ranks (specs/distributed.md).
DISTRIBUTED_FORMAT = 7
#: Format 8: ``settings.monitors`` may declare depth profiles (specs/dynamics.md §5.1).
PROFILES_FORMAT = 8
#: Format 10: ``settings.monitors.memorization`` may name the method ``"mean-loss"`` (specs/dynamics.md §1.1).
SCAN_METHOD_FORMAT = 10
#: specs/dynamics.md §1.1: scan parameters without ``method`` are LT-IQR; ``"mean-loss"`` is the other method.
LT_IQR, MEAN_LOSS = "lt-iqr", "mean-loss"
#: The largest world size a run may declare (a bound on what a recipe may claim, not on torch).
MAX_WORLD = 1 << 16
#: Format 3: the model takes its inputs as named parts (specs/training.md §5.1).
PARTS_FORMAT = 3


def training_format(settings: Mapping[str, Any]) -> int:
    """RunStarted ``settings.format`` (absent: 1). An unknown value reads as 0, which no check accepts."""
    fmt = settings.get("format", 1) if isinstance(settings, Mapping) else 0
    return fmt if type(fmt) is int and fmt in FORMATS and ("format" in settings) == (fmt >= 2) else 0
PROGRAM_FORMAT = "torch.export.save"  # specs/training.md §5
PROGRAM_INPUTS = ["x", "profiles"]

#: safetensors dtype codes -> torch dtype names (what ``x_dtype`` records).
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class SettingsMismatch(VerificationError):
    """A RunStarted setting disagrees with what the verifier re-derives (or is malformed)."""

    def __init__(self, message: str, *, seq: int | None = None, step: int | None = None) -> None:
        super().__init__(message, seq=seq)
        self.step = step


def step_seed(seed: int, step: int) -> int:
    """specs/training.md §2: uint64, big-endian, of the first 8 bytes of SHA-256(CBOR [rule, seed, step])."""
    return int.from_bytes(hashlib.sha256(encoding.encode([SEED_RULE, seed, step])).digest()[:8], "big")


def micro_seed(seed: int, step: int, micro: int) -> int:
    """specs/training.md §2: micro-batch 0 takes ``step_seed``; micro-batch j >= 1 the first 8 bytes
    (big-endian) of SHA-256(CBOR [micro rule, seed, step, j])."""
    if micro == 0:
        return step_seed(seed, step)
    return int.from_bytes(hashlib.sha256(encoding.encode([MICRO_SEED_RULE, seed, step, micro])).digest()[:8], "big")


def epoch_order(seed: int, epoch: int, count: int, items: Sequence[bytes] | None = None) -> list[int]:
    """specs/training.md §2: indices 0..count-1 sorted by SHA-256(CBOR [ORDER_RULE, seed, epoch, i]).

    ``items``: the CBOR of 0..count-1, when the caller orders several epochs of one dataset.
    """
    # The 4-item array's encoding is its header and items in turn; the last item, 0, is one byte.
    prefix = encoding.encode([ORDER_RULE, seed, epoch, 0])[:-1]
    items = items if items is not None else [encoding.encode(i) for i in range(count)]
    sha256 = hashlib.sha256
    keys = [sha256(prefix + item).digest() for item in items]
    return sorted(range(count), key=keys.__getitem__)


def same_cbor(a: Any, b: Any) -> bool:
    """Equal as canonical CBOR: exact float bits, and 0 is not 0.0."""
    try:
        return encoding.encode(a) == encoding.encode(b)
    except EncodingError:
        return False


def _uint(v: Any) -> bool:
    return type(v) is int and v >= 0


@dataclass
class RunView:
    """What the settings check needs of one run (structure.Run, without importing it)."""

    seq: int
    settings: Mapping[str, Any]
    updates: Sequence[int]
    checkpoints: Sequence[int]
    branch: bool
    count: int  # the committed dataset's count
    policy_bands: Sequence[str] | None  # the adopted policy's band names, when it parsed
    inputs: bytes | None  # the DatasetCommitted's data digest
    #: The adopted policy's ``monitors`` (specs/policy.md §1): what every run under it must declare.
    policy_monitors: Mapping[str, Any] | None = None


def check_run(run: RunView, observations: Sequence[Sealed], artifact: Callable[[bytes], bytes | None]) -> str:
    """Check one governed run's settings; a short note, or ``SettingsMismatch`` naming the field."""
    s, seq = run.settings, run.seq

    def fail(what: str, at: int | None = None, step: int | None = None) -> SettingsMismatch:
        """``what`` names the field (``settings.x ...``); ``at``: another record the failure is at."""
        return SettingsMismatch(what if at is not None else f"RunStarted {seq}: {what}",
                                seq=seq if at is None else at, step=step)

    fmt = training_format(s)
    if fmt == 0:
        raise fail(f"settings.format {s.get('format')!r} is not a training format this verifier knows "
                   f"({', '.join(map(str, FORMATS))}; format 1 is written without the key)")
    seed = s.get("seed")
    if not _uint(seed) or seed >= 1 << 64:
        raise fail(f"settings.seed {seed!r} is not a uint64")
    if s.get("seed_rule") != SEED_RULE:
        raise fail(f"settings.seed_rule {s.get('seed_rule')!r} is not {SEED_RULE!r}, the only rule "
                   "(specs/training.md §2)")
    for u in run.updates:
        body = observations[u].body
        want = {"run": seed, "step": step_seed(seed, body["step"])}
        if not same_cbor(body.get("seeds"), want):
            what = "has no seeds" if "seeds" not in body else f"seeds {body['seeds']!r} are not {want}"
            raise fail(f"GovernedUpdate {u} (step {body['step']}) {what}: the run's seed rule "
                       f"{SEED_RULE!r} with settings.seed {seed} (RunStarted {seq}) gives {want}", u, body["step"])
    distributed_world(s, fail)
    declared = monitors(s, fail)
    required = (run.policy_monitors or {}).get("memorization")
    if required is not None and not run.branch and not same_cbor(declared.get("memorization"), required):
        raise fail(f"settings.monitors declares {declared.get('memorization')!r}; the policy in force requires "
                   f"memorization scans with {required!r} (specs/dynamics.md §2.2)")
    if run.branch:
        return "branch: seeds"
    _check_order(run, observations, fail)
    _check_checkpoints(run, observations, fail)
    _check_frozen(run, observations, fail)
    _check_bands_named(run, fail)
    _check_program(run, artifact, fail)
    return "settings re-derived"


def _check_order(run: RunView, observations: Sequence[Sealed], fail: Callable[..., SettingsMismatch]) -> None:
    s = run.settings
    order, size, drop_last, spe = s.get("order"), s.get("batch_size"), s.get("drop_last"), s.get("steps_per_epoch")
    orders = ORDERS + ((LOADER_ORDER,) if training_format(s) >= 2 else ())
    if order not in orders:
        raise fail(f"settings.order {order!r} is not one of {', '.join(map(repr, orders))} (specs/training.md §2)")
    if type(drop_last) is not bool:
        raise fail(f"settings.drop_last {drop_last!r} is not a bool")
    if not _uint(size):
        raise fail(f"settings.batch_size {size!r} is not a uint")
    if not _uint(spe) or spe < 1:
        raise fail(f"settings.steps_per_epoch {spe!r} is not a positive int")
    steps = [(u, observations[u].body) for u in run.updates]
    if order == LOADER_ORDER:
        return  # chosen by the trainer's loader as it went: each batch is recorded, none was committed before
    # Every batch drawn, in order: a step's micro-batches (format 2 accumulation), else its batch.
    draws: list[tuple[int, int, list[int]]] = []
    for u, body in steps:
        pos = 0
        for size_ in micro_sizes(body):
            draws.append((u, body["step"], body["batch"][pos:pos + size_]))
            pos += size_
    if order == "explicit":
        # The batches were given: batch c drawn trains given batch c mod steps_per_epoch (training.md §2).
        for n, (u, step, batch) in enumerate(draws):
            if n >= spe and batch != draws[n - spe][2]:
                raise fail(f"GovernedUpdate {u} (step {step}) trains another batch than step "
                           f"{draws[n - spe][1]}, though settings.order of RunStarted {run.seq} is 'explicit' "
                           f"with steps_per_epoch {spe} (specs/training.md §2)", u, step)
        return
    if size < 1:
        raise fail(f"settings.batch_size {size} is not positive under order {ORDER_RULE!r}")
    want = run.count // size if drop_last else -(-run.count // size)
    if spe != want:
        raise fail(f"settings.steps_per_epoch {spe}, batch_size {size} and drop_last {drop_last} disagree: "
                   f"{run.count} examples in batches of {size} with drop_last {drop_last} give {want} steps per epoch "
                   "(specs/training.md §2)")
    order_of: dict[int, list[int]] = {}
    items: list[bytes] | None = None
    for drawn, (u, step, recorded) in enumerate(draws):
        if not all(_uint(i) and i < run.count for i in recorded):
            continue  # an index outside the dataset: the routing check fails the step, naming its position
        epoch, pos = divmod(drawn, spe)
        if epoch not in order_of:
            order_of.clear()  # steps increase: one epoch's order at a time
            if items is None:
                items = [encoding.encode(i) for i in range(run.count)]
            order_of[epoch] = epoch_order(s["seed"], epoch, run.count, items)
        batch = order_of[epoch][pos * size:(pos + 1) * size]
        if recorded != batch:
            raise fail(f"GovernedUpdate {u} (step {step}) trains batch {_brief(recorded)}, but settings.order "
                       f"{ORDER_RULE!r} with seed {s['seed']}, batch_size {size}, drop_last {drop_last} and "
                       f"steps_per_epoch {spe} of RunStarted {run.seq} gives {_brief(batch)} (specs/training.md §2)",
                       u, step)


def _brief(batch: Sequence[int]) -> str:
    return f"[{', '.join(map(str, batch[:4]))}{', ...' if len(batch) > 4 else ''}] ({len(batch)} indices)"


def _check_checkpoints(run: RunView, observations: Sequence[Sealed], fail: Callable[..., SettingsMismatch]) -> None:
    k = run.settings.get("checkpoint_every")
    if not _uint(k) or k < 1:
        raise fail(f"settings.checkpoint_every {k!r} is not a positive int")
    records = sorted([*((u, "U") for u in run.updates), *((c, "C") for c in run.checkpoints)])
    done = 0  # updates so far
    last_ckpt = -1
    for at, kind in records:
        body = observations[at].body
        if kind == "U":
            if done and done % k == 0 and last_ckpt != done:
                raise fail(f"GovernedUpdate {at} (step {body['step']}) follows update {done - 1} with no Checkpoint "
                           f"at step {done}, which settings.checkpoint_every {k} of RunStarted {run.seq} calls for "
                           "(specs/training.md §1)",
                           at, body["step"])
            if last_ckpt < 0:
                raise fail(f"GovernedUpdate {at} (step {body['step']}) precedes the step-0 Checkpoint of RunStarted "
                           f"{run.seq}", at,
                           body["step"])
            done += 1
            continue
        # Its step and state are the heads check's and replay's to compare; here only where it stands.
        last_ckpt = done
    if last_ckpt < 0:
        raise fail(f"RunStarted {run.seq}: no step-0 Checkpoint follows it (specs/training.md §1)", run.seq)
    if last_ckpt != done:
        raise fail(f"RunStarted {run.seq}: the run's last {done - last_ckpt} updates are followed by no Checkpoint "
                   "(a step is on record only once its state is checkpointed, specs/training.md §1)",
                   run.updates[-1] if run.updates else None)


def _bands(s: Mapping[str, Any], fail: Callable[..., SettingsMismatch]) -> list[Mapping[str, Any]]:
    layout = s.get("bands")
    bands = layout.get("bands") if isinstance(layout, dict) else None
    if not isinstance(layout, dict) or set(layout) != {"bands"} or not isinstance(bands, list) or not bands:
        raise fail("settings.bands is not {\"bands\": [band, ...]} (specs/routing.md §1)")
    for i, band in enumerate(bands):
        if not isinstance(band, dict) or set(band) != {"name", "prefixes", "boundary"}:
            raise fail(f"settings.bands.bands[{i}] is not {{name, prefixes, boundary}}")
        prefixes = band["prefixes"]
        if not isinstance(prefixes, list) or not prefixes or not all(
            isinstance(q, str) and q and not q.startswith(".") and not q.endswith(".") for q in prefixes
        ):
            raise fail(f"settings.bands.bands[{i}].prefixes {prefixes!r} is not a non-empty list of dotted paths")
    return bands


def _check_bands_named(run: RunView, fail: Callable[..., SettingsMismatch]) -> None:
    bands = _bands(run.settings, fail)
    names = [b["name"] for b in bands]
    if run.policy_bands is not None:
        for i, (got, want) in enumerate(zip(names, run.policy_bands)):
            if got != want:
                raise fail(f"settings.bands.bands[{i}].name {got!r} is not the policy's band {i}, {want!r} (the "
                           "policy names the bands, head first: specs/policy.md §1)")
        if len(names) != len(run.policy_bands):
            raise fail(f"settings.bands has {len(names)} bands, the policy {len(run.policy_bands)}")
    band_params = run.settings.get("band_params")
    if not isinstance(band_params, list) or len(band_params) != len(names):
        raise fail(f"settings.band_params does not list the parameters of each of the {len(names)} bands")


@dataclass(frozen=True)
class Column:
    """One input of a run's program: its program input name, the inputs artifact's tensor that feeds it,
    and the dtype and row shape ``settings.program`` states for it."""

    input: str
    tensor: str
    dtype: str
    shape: list[int]


def program_columns(settings: Mapping[str, Any]) -> list[Column]:
    """``settings.program``'s inputs (specs/training.md §5, §5.1), checked for form: format <= 2, one input
    ``x``; format 3 (and format 4 with ``parts``), inputs ``x_0 .. x_{n-1}`` fed by the parts, named and sorted as manifests.md §2.1 says.
    Raises ``ValueError`` naming what is wrong (callers turn it into their own failure)."""
    p = settings.get("program")
    fmt = training_format(settings)
    # Format 3 is a model of parts; from format 4 the program says which (specs/training.md §5.1).
    parts = fmt == PARTS_FORMAT or (fmt > PARTS_FORMAT and isinstance(p, dict) and "parts" in p)
    keys = {"format", "inputs", "parts"} if parts else {"format", "inputs", "x_dtype", "x_shape"}
    if not isinstance(p, dict) or set(p) != keys:
        raise ValueError(f"settings.program is not {{{', '.join(sorted(keys))}}} (specs/training.md §5)")
    if p["format"] != PROGRAM_FORMAT:
        raise ValueError(f"settings.program.format {p['format']!r} is not {PROGRAM_FORMAT!r}")
    if not parts:
        if p["inputs"] != PROGRAM_INPUTS:
            raise ValueError(f"settings.program.inputs {p['inputs']!r} is not {PROGRAM_INPUTS!r}")
        _dtype_shape(p["x_dtype"], p["x_shape"], "x")
        return [Column("x", "x", p["x_dtype"], p["x_shape"])]
    items = p["parts"]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_PARTS:
        raise ValueError(f"settings.program.parts is not a list of 1 to {MAX_PARTS} parts")
    cols = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"name", "dtype", "shape"} or not isinstance(item["name"], str) \
                or not PART_NAME.match(item["name"]):
            raise ValueError(f"settings.program.parts[{i}] is not {{name, dtype, shape}} with a part name")
        _dtype_shape(item["dtype"], item["shape"], f"parts[{i}]")
        cols.append(Column(f"x_{i}", "x." + item["name"], item["dtype"], item["shape"]))
    names = [item["name"] for item in items]
    if names != sorted(set(names)):
        raise ValueError(f"settings.program.parts {names} are not distinct and in canonical (sorted) order")
    want = [c.input for c in cols] + ["profiles"]
    if p["inputs"] != want:
        raise ValueError(f"settings.program.inputs {p['inputs']!r} is not {want!r}")
    return cols


def _dtype_shape(dtype: Any, shape: Any, what: str) -> None:
    if not isinstance(dtype, str) or not isinstance(shape, list) or not all(_uint(d) for d in shape):
        raise ValueError(f"settings.program {what}: dtype {dtype!r} and shape {shape!r} are not a dtype name and a "
                         "list of sizes")


def _frozen(s: Mapping[str, Any], fail: Callable[..., SettingsMismatch]) -> dict[str, bytes] | None:
    """Format 5 ``settings.frozen.tensors``, checked for form and against its digest; None before format 5."""
    if training_format(s) < FROZEN_FORMAT:
        if "frozen" in s:
            raise fail("settings.frozen is a format-5 field, in a run of an earlier format")
        return None
    f = s.get("frozen")
    if not isinstance(f, dict) or set(f) != {"digest", "tensors"} or not isinstance(f["tensors"], dict) or not all(
            type(n) is str and type(d) is bytes and len(d) == 32 for n, d in f["tensors"].items()):
        raise fail("settings.frozen is not {digest, tensors: {name: 32-byte digest}}")
    if checkpoint_digest(f["tensors"]) != f["digest"]:
        raise fail("settings.frozen.digest is not the digest of its tensors")
    both = set(f["tensors"]) & set(s.get("parameters") or ())
    if both:
        raise fail(f"settings.frozen names {sorted(both)[0]!r}, which settings.parameters lists as trainable")
    return f["tensors"]


def monitors(s: Mapping[str, Any], fail: Callable[[str], Exception] = ValueError) -> dict[str, Any]:
    """Format 6 ``settings.monitors`` (specs/dynamics.md §2.2), checked for form: ``{}`` or
    ``{"memorization": {"fraction": binary64 in (0, 1], "min_trace": int in [2, 2**20]}}``; ``{}`` before
    format 6, where the field must be absent."""
    if training_format(s) < MONITORS_FORMAT:
        if "monitors" in s:
            raise fail("settings.monitors is a format-6 field, in a run of an earlier format")
        return {}
    m = s.get("monitors")
    known = {"memorization", "profiles"} if training_format(s) >= PROFILES_FORMAT else {"memorization"}
    if not isinstance(m, dict) or not set(m) <= known:
        raise fail("settings.monitors is not a map of the monitors specs/dynamics.md §2.2 and §5.1 name "
                   "(profiles from format 8)")
    p = m.get("memorization")
    methods = training_format(s) >= SCAN_METHOD_FORMAT
    if p is not None and not scan_parameters(p, methods=methods):
        method = f", ? method: {MEAN_LOSS}" if methods else f" (a method only from format {SCAN_METHOD_FORMAT})"
        raise fail(f"settings.monitors.memorization is not {{fraction: float in (0, 1], min_trace: int in [2, 2**20]"
                   f"{method}}}")
    if "profiles" in m and not profile_settings(m["profiles"]):
        raise fail("settings.monitors.profiles is not {dataset: {name, seq, root, count in [1, 4096]}, method: "
                   "'ncm-entropy', temperature: float in [0.001, 1000], ? slice: 'authority' or 'review'} "
                   "(specs/dynamics.md §5.1)")
    return dict(m)


#: specs/dynamics.md §5.1: the held-out set's bound, and the temperature's.
MAX_PROFILE_EXAMPLES = 4096
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3


def profile_settings(p: Any) -> bool:
    """§5.1: ``{"dataset": {"name", "seq", "root", "count"}, "method": "ncm-entropy", "temperature"}``."""
    keys = {"dataset", "method", "temperature"}
    if not isinstance(p, dict) or set(p) - {"slice"} != keys or p["method"] != "ncm-entropy" \
            or p.get("slice", "authority") not in ("authority", "review"):
        return False
    d, t = p["dataset"], p["temperature"]
    return isinstance(d, dict) and set(d) == {"name", "seq", "root", "count"} and type(d["name"]) is str \
        and type(d["seq"]) is int and d["seq"] >= 0 and isinstance(d["root"], bytes) and len(d["root"]) == 32 \
        and type(d["count"]) is int and 1 <= d["count"] <= MAX_PROFILE_EXAMPLES \
        and type(t) is float and MIN_TEMPERATURE <= t <= MAX_TEMPERATURE


def distributed_world(s: Mapping[str, Any], fail: Callable[[str], Exception] | None = None) -> int | None:
    """Format 7 ``settings.distributed`` (specs/distributed.md §1): the world size, or None for a run on one
    process. Malformed: ``fail``'s exception (without ``fail``: None, and the settings check names it)."""
    d = s.get("distributed") if isinstance(s, Mapping) else None
    if d is None and not (isinstance(s, Mapping) and "distributed" in s):
        return None
    ok = training_format(s) >= DISTRIBUTED_FORMAT and isinstance(d, dict) and set(d) == {"world", "backend"} \
        and type(d["world"]) is int and 2 <= d["world"] <= MAX_WORLD and type(d["backend"]) is str \
        and 0 < len(d["backend"]) <= 64
    if not ok:
        if fail is not None:
            raise fail(f"settings.distributed {d!r} is not {{world: int in [2, {MAX_WORLD}], backend: text}} in a "
                       f"run of format {DISTRIBUTED_FORMAT} or later (specs/distributed.md §1)")
        return None
    return d["world"]


def scan_parameters(p: Any, methods: bool = True) -> bool:
    """specs/dynamics.md §1.1: a MemorizationScan's parameters; ``method`` (present only as ``"mean-loss"``:
    without it the method is LT-IQR) where ``methods``."""
    keys = {"fraction", "min_trace", "method"} if methods and isinstance(p, dict) and "method" in p \
        else {"fraction", "min_trace"}
    return isinstance(p, dict) and set(p) == keys and type(p["fraction"]) is float \
        and 0.0 < p["fraction"] <= 1.0 and type(p["min_trace"]) is int and 2 <= p["min_trace"] <= 1 << 20 \
        and p.get("method", MEAN_LOSS) == MEAN_LOSS


def _check_frozen(run: RunView, observations: Sequence[Sealed], fail: Callable[..., SettingsMismatch]) -> None:
    """Format 5: every frozen parameter holds its committed value in every Checkpoint of the run."""
    tensors = _frozen(run.settings, fail)
    for c in run.checkpoints if tensors else ():
        body = observations[c].body
        held = body.get("tensors") if isinstance(body.get("tensors"), dict) else {}
        for name, digest in tensors.items():
            if held.get("model." + name) != digest:
                raise fail(f"settings.frozen.tensors {name!r} is not that tensor in Checkpoint {c} (step "
                           f"{body.get('step')}): a frozen parameter changed, or the commitment is not the base's")


def _check_program(run: RunView, artifact: Callable[[bytes], bytes | None],
                   fail: Callable[..., SettingsMismatch]) -> None:
    try:
        cols = program_columns(run.settings)
    except ValueError as exc:
        raise fail(str(exc)) from None
    rows = _inputs_rows(artifact, run.inputs)
    if rows is None:
        return
    if set(rows) != {c.tensor for c in cols}:
        raise fail(f"settings.program names inputs {[c.tensor for c in cols]}, the committed inputs hold "
                   f"{sorted(rows)}")
    for c in cols:
        got = rows[c.tensor]
        if (c.dtype, c.shape) == got:
            continue
        if c.tensor == "x":
            what = "x_dtype" if c.dtype != got[0] else "x_shape"
            raise fail(f"settings.program.{what}: x_dtype {c.dtype!r} and x_shape {c.shape!r} are not the committed "
                       f"inputs' rows ({got[0]} {got[1]})")
        raise fail(f"settings.program.parts {c.tensor[2:]!r}: dtype {c.dtype!r} and shape {c.shape!r} are not the "
                   f"committed inputs' rows ({got[0]} {got[1]})")


# -- replay's part: what needs the program itself ------------------------------------------------
#
# The program is read only where replay reads it (in the replay worker, behind its sandbox,
# specs/replay.md §7), never by the structural checks.


def check_program(program: Program, settings: Mapping[str, Any], run_seq: int) -> dict[str, bytes]:
    """The settings that only the program can confirm (specs/verification.md §6 settings, item 5):
    its user inputs and input ``x`` against ``settings.program``, the band prefixes resolved against
    its parameters to ``band_params``. Returns the digests of the weights it stores (parameters and
    persistent buffers), under their checkpoint names (``model.<name>``), for ``check_step0``."""
    def fail(what: str) -> SettingsMismatch:
        return SettingsMismatch(f"RunStarted {run_seq}: {what}", seq=run_seq)

    try:
        cols = program_columns(settings)
    except ValueError as exc:
        raise fail(str(exc)) from None
    graph = program.graph
    want = [c.input for c in cols] + ["profiles"]
    if list(graph.user_inputs) != want:
        raise fail(f"settings.program.inputs {want!r}, but the model program's user inputs are "
                   f"{list(graph.user_inputs)!r}")
    for c in cols:
        x = program.inputs.get(c.input)
        if x is None:
            raise fail(f"settings.program: the model program has no input {c.input!r}")
        dtype = str(x.dtype).removeprefix("torch.")
        what = "x_dtype" if c.input == "x" else f"parts {c.tensor[2:]!r} dtype"
        if c.dtype != dtype:
            raise fail(f"settings.program.{what} {c.dtype!r}, but the model program's input {c.input} is {dtype}")
        shape = list(x.sizes[1:])
        if not same_cbor(c.shape, shape):
            what = "x_shape" if c.input == "x" else f"parts {c.tensor[2:]!r} shape"
            raise fail(f"settings.program.{what} {c.shape!r}, but the model program's input {c.input} has rows of "
                       f"shape {shape!r}")
    prefix = _check_prefixes(settings, program, fail)
    if training_format(settings) >= 2:
        _check_parameters(settings, program, prefix, fail)
    frozen = _frozen(settings, fail)
    if frozen is not None:
        # Format 5: exactly the program's parameters that do not train, with the program's own values.
        held = {i.target[len(prefix):]: tensor_digest(program.state[i.target]) for i in graph.inputs
                if i.kind == "parameter" and i.target is not None and i.target.startswith(prefix)
                and i.target not in program.requires_grad}
        if frozen != held:
            name = sorted(set(frozen) ^ set(held) or {n for n in frozen if frozen[n] != held[n]})[0]
            raise fail(f"settings.frozen.tensors {name!r}: the model program's frozen parameters "
                       f"({len(held)}) are not those committed ({len(frozen)}), with their values")
    stored = [i.target for i in graph.inputs if i.target is not None and i.target.startswith(prefix) and (
        i.kind == "parameter" or (i.kind == "buffer" and i.target in program.persistent))]
    return {"model." + t[len(prefix):]: tensor_digest(program.state[t]) for t in stored}


def _check_parameters(s: Mapping[str, Any], program: Program, prefix: str,
                      fail: Callable[[str], SettingsMismatch]) -> None:
    """Format 2 ``settings.parameters``: the model's trainable parameters in its own order (the order a
    recorded clip walks them in, specs/training.md §3.2), exactly the program's, in the program's order."""
    names = s.get("parameters")
    trainable = [i.target[len(prefix):] for i in program.graph.inputs if i.kind == "parameter" and i.target
                 is not None and i.target.startswith(prefix) and i.target in program.requires_grad]
    if not isinstance(names, list) or names != trainable:
        raise fail(f"settings.parameters {_brief_names(names)} are not the model program's trainable parameters "
                   f"in its order {_brief_names(trainable)}")


def _brief_names(names: Any) -> str:
    if not isinstance(names, list):
        return repr(names)[:60]
    return f"[{', '.join(map(repr, names[:3]))}{', ...' if len(names) > 3 else ''}] ({len(names)})"


def check_step0(weights: Mapping[str, bytes], checkpoint: Mapping[str, Any], checkpoint_seq: int,
                run_seq: int) -> None:
    """The program's stored weights (``check_program``) are the step-0 Checkpoint's tensors: the program is
    exported with the weights as at step 0 (specs/training.md §5)."""
    tensors = checkpoint.get("tensors") if isinstance(checkpoint.get("tensors"), dict) else {}
    for name, digest in weights.items():
        if tensors.get(name) != digest:
            what = "does not hold it" if name not in tensors else "holds other values"
            raise SettingsMismatch(f"RunStarted {run_seq}: artifacts.program: the model program stores {name!r} as "
                                   f"its weights at step 0, and the step-0 Checkpoint {checkpoint_seq} {what} "
                                   "(specs/training.md §5)", seq=run_seq)


def _matches(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _check_prefixes(s: Mapping[str, Any], program: Program, fail: Callable[[str], SettingsMismatch]) -> str:
    """specs/routing.md §1 resolution: the prefixes give exactly ``band_params``; returns the state prefix."""
    bands = _bands(s, fail)
    band_params = s.get("band_params")
    if not isinstance(band_params, list) or len(band_params) != len(bands):
        raise fail(f"settings.band_params does not list the parameters of each of the {len(bands)} bands")
    targets = [i.target for i in program.graph.inputs if i.kind == "parameter" and i.target is not None]
    recorded = [n for ns in band_params if isinstance(ns, list) for n in ns]
    fits = [q for q in (GATED_PREFIX, "")
            if recorded and all(isinstance(n, str) and q + n in targets for n in recorded)]
    if len(fits) != 1:
        raise fail("settings.band_params are not the model program's parameters (with or without the 'model.' "
                   "prefix)")
    prefix = fits[0]
    names = [t[len(prefix):] for t in targets if t.startswith(prefix)]
    trainable = {t[len(prefix):] for t in program.requires_grad if t.startswith(prefix)}
    owner: dict[str, int] = {}
    for k, band in enumerate(bands):
        for q in band["prefixes"]:
            if not any(_matches(q, n) for n in names):
                raise fail(f"settings.bands.bands[{k}].prefixes: {q!r} matches no parameter of the model program")
        derived = [n for n in names if n in trainable and any(_matches(q, n) for q in band["prefixes"])]
        for n in derived:
            if owner.setdefault(n, k) != k:
                raise fail(f"settings.bands.bands[{k}].prefixes: parameter {n!r} is also in band {owner[n]}")
        if not same_cbor(band_params[k], derived):
            raise fail(f"settings.bands.bands[{k}].prefixes {band['prefixes']!r} resolve to {derived!r} in the model "
                       f"program, but band_params[{k}] is {band_params[k]!r} (specs/routing.md §1)")
    missing = sorted(trainable - set(owner))
    if missing:
        raise fail(f"settings.bands: trainable parameter {missing[0]!r} of the model program is in no band")
    return prefix


def _inputs_rows(artifact: Callable[[bytes], bytes | None], digest: bytes | None) -> dict[str, tuple[str, list[int]]] | None:
    """The committed inputs' tensors, each with its dtype and row shape, from the safetensors header alone
    (None if unreadable: the dataset and artifacts checks report that)."""
    if digest is None:
        return None
    data = artifact(digest)
    if data is None or len(data) < 8:
        return None
    (size,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + size])
        header.pop("__metadata__", None)
        return {name: (_ST_DTYPES[x["dtype"]], list(x["shape"][1:])) for name, x in header.items()}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
