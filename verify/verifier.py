"""The verifier: structural checks, certificates, heads, environment, then replay (specs/verification.md).

    report = Verifier(trusted_roots, VerificationPolicy(replay="sample")).verify("run.glb")

It trusts nothing but ``trusted_roots``. Unusable input raises ``UnusableInput`` (exit 2);
everything that reads but does not check out is a failed ``Check`` in the report (exit 1). No
phase is optional, and the only skip is the replay a user declines (``--replay none``): the
verdicts are specs/verification.md "Verdicts".
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from gradledger.ledger.artifact_store import ArtifactStore
from gradledger.ledger.envelope import Sealed
from gradledger.ledger.errors import VerificationError

from ._internal import challenge, environment
from ._internal.certificates import check_certificates
from ._internal.external import ExternalFetcher
from ._internal.release import ReleaseInputs, check_release
from ._internal.replay import ATOL, RTOL, ReplayError, RunContext, SegmentResult
from ._internal.sandbox import DEFAULT_MAX_MEMORY_MIB, SandboxSpec
from ._internal.privacy import PrivacyInvalid, check_privacy
from ._internal.profiles import ProfileClaim, ProfileInvalid, check_profiles, compare_profiles, held_out_request
from ._internal.scans import ScanInvalid, check_scans
from ._internal.pool import WorkerPool
from ._internal.segments import iter_jobs, plan_segments, run_jobs
from ._internal.sources import Source, open_source
from ._internal.settings import program_columns
from ._internal.structure import Run, Structure, check_structure
from ._internal.traces import (TraceClaim, TraceInvalid, check_terms, compare_traces, read_traces,
                               recompute_influence, recompute_loss_trace, trace_jobs)
from .report import Report

ReplayMode = Literal["full", "sample", "certificates", "none"]


@dataclass(frozen=True)
class VerificationPolicy:
    replay: ReplayMode = "full"
    workers: int = 1
    #: Sample mode: the fraction of segments the challenge picks (at least one).
    sample_fraction: float = 0.25
    #: Mixed into the sample challenge (specs/replay.md §5). None: a fresh 32-byte nonce from
    #: os.urandom per verification, which the trainer cannot know; bytes reproduce a draw.
    nonce: bytes | None = None
    #: Allow tolerance mode (specs/replay.md §4) where this machine differs from a run's recorded
    #: environment. Never chosen by the bundle: without it such a difference fails verification.
    tolerance: bool = False
    #: Replay workers run behind the second wall (specs/replay.md §7): namespaces, a read-only
    #: filesystem, no network, seccomp and rlimits. False is ``--no-sandbox``; the report says so.
    sandbox: bool = True
    #: The sandboxed worker's address-space limit (RLIMIT_AS), in MiB (``--max-memory``).
    max_memory_mib: int = DEFAULT_MAX_MEMORY_MIB
    #: Where the checkpoints a version-2 bundle holds outside live (``--artifacts STORE``: a directory or
    #: an fsspec URL; specs/bundle.md §5). Replay fetches from it only the checkpoints it uses.
    artifacts: str | None = None
    #: Also check a release's chain to this bundle (``--release``; specs/release.md §6).
    release: ReleaseInputs | None = None
    #: Recompute every recorded ForensicTrace and compare (``--check-traces``; specs/forensics.md §7.3).
    #: Without it a trace's form and digests are still checked.
    check_traces: bool = False
    #: Where segments are replayed: "local" worker processes, or "ray" tasks on a Ray cluster
    #: (``--engine ray``; specs/replay.md §8), at most ``workers`` at a time either way.
    engine: Literal["local", "ray"] = "local"
    #: With engine "ray": None starts a local cluster of ``workers`` CPUs; "auto" or HOST:PORT joins one.
    ray_address: str | None = None


class Verifier:
    def __init__(self, trusted_roots: Sequence[bytes], policy: VerificationPolicy | None = None) -> None:
        self.trusted_roots = list(trusted_roots)
        self.policy = policy or VerificationPolicy()

    def verify(self, path: str | os.PathLike[str], *, progress: bool = False, pool: WorkerPool | None = None) -> Report:
        """Verify the bundle or ledger at ``path``. ``pool``: replay workers already started (the command
        line starts them first, so that their start overlaps this one's); used if their sandbox is
        the policy's, else new ones are started."""
        source = open_source(path)
        try:
            store = ArtifactStore(self.policy.artifacts) if self.policy.artifacts is not None else None
            return self._verify(source, os.fspath(path), progress, pool, store)
        finally:
            source.close()

    def _verify(self, source: Source, path: str, progress: bool, pool: WorkerPool | None = None,
                store: ArtifactStore | None = None) -> Report:
        from tqdm import tqdm

        report = Report(replay_scope=self.policy.replay)
        started = time.perf_counter()
        with tqdm(desc="structure", unit="obs", disable=None if progress else True, file=sys.stderr) as bar:
            structure = check_structure(source, self.trusted_roots, report, progress=lambda _: bar.update(1))
        report.figures["structural_seconds"] = round(time.perf_counter() - started, 3)
        if structure is None or report.first_failure is not None:
            return report
        observations: list[Sealed] = structure.observations
        report.figures["observations"] = len(observations)
        # Every phase is part of every verification (issue 9): a check that cannot be imported
        # makes the verifier unusable (exit 2), it never silently disappears.
        check_certificates(source, structure, report)
        if report.first_failure is not None:
            return report
        _check_scans(structure, report)
        if report.first_failure is not None:
            return report
        if self.policy.release is not None:
            started = time.perf_counter()
            facts = check_release(self.policy.release, structure, report)
            report.figures["release_seconds"] = round(time.perf_counter() - started, 3)
            if facts is None:
                return report
            report.figures["release"] = {
                "files": facts.files, "provenance_sha256": facts.provenance_sha256, "run_id": facts.run_id,
                "checkpoint_seq": facts.checkpoint_seq, "witnesses": facts.witnesses,
                "ledger": {"origin": facts.checkpoint.origin, "size": facts.checkpoint.size,
                           "root": facts.checkpoint.root.hex()}}
        try:
            plan: dict[int, list[Any]] | None = plan_segments(observations)
        except ReplayError:
            plan = None  # _replay plans again and reports the error
        try:
            claims = read_traces(structure, plan, _input_names)
        except TraceInvalid as exc:
            report.add("traces", "fail", str(exc), seq=exc.seq)
            return report
        heads = _heads(observations, report)
        if report.first_failure is not None:
            return report
        try:  # specs/dynamics.md §5.4: the profiles' form, before replay recomputes their values
            profile_claims = check_profiles(structure)
        except ProfileInvalid as exc:
            report.add("profiles", "fail", str(exc), seq=exc.seq)
            return report
        try:  # specs/privacy.md §4-5: every step's privacy record against the policy, and the epsilon it spent
            spent = check_privacy(structure)
        except PrivacyInvalid as exc:
            report.add("privacy", "fail", str(exc), seq=exc.seq)
            return report
        if spent:
            report.figures["privacy"] = [{"run": r.run_id, "steps": r.steps, "delta": r.delta, "epsilon": r.model,
                                          "epsilon_prv": r.prv, "epsilon_per_band": r.per_band,
                                          "epsilon_per_rule": r.per_rule} for r in spent]
            report.add("privacy", "pass", "; ".join(
                f"run {r.run_id!r}: {r.steps} steps clipped and noised as its policy says, epsilon {r.model:.4g} at "
                f"delta {r.delta:g} (PRV {r.prv:.4g}; per band: " + ", ".join(f"{b} {e:.4g}" for b, e in r.per_band.items())
                + "; per private rule: " + ", ".join(f"{n} {e:.4g}" for n, e in r.per_rule.items()) +
                f"; Opacus's accountants over the recorded noise and sample rates), as its {r.records} PrivacySpent "
                "record(s) state; replay re-measures the clip factors and regenerates the noise of every step it "
                "replays" for r in spent))
        terms: dict[int, dict[tuple[int, int], Any]] = {}
        profiles: dict[tuple[int, int], Any] = {}
        jobs = self._replay(source, path, structure, report, progress, pool,
                            claims if self.policy.check_traces else [], terms, plan, store, profiles)
        report.heads = _describe_heads(heads, runs_of=jobs, mode=self.policy.replay)
        if profile_claims and report.first_failure is None:
            self._check_profiles(profile_claims, profiles, report)
        if claims:
            self._check_traces(claims, structure, report, terms)
        return report

    def _check_profiles(self, claims: list[ProfileClaim], found: dict[tuple[int, int], Any], report: Report) -> None:
        """The ``profiles`` check (specs/dynamics.md §5.4): each recorded DepthProfile whose checkpoint a
        replayed segment reached, recomputed from its weights; in full replay every one of them."""
        n = len(claims)
        if self.policy.replay == "none":
            report.add("profiles", "pass", f"{n} depth profile(s) well formed, one at every checkpoint that declares "
                       "them; their values are recomputed by replay, which was not requested")
            return
        errors = [(k, v[0]) for k, v in found.items() if isinstance(v, tuple) and len(v) == 1]
        if errors:
            (run, step), why = errors[0]
            claim = next((c for c in claims if (c.run, c.step) == (run, step)), None)
            report.add("profiles", "fail", f"the depth profile of step {step} of run {run} cannot be recomputed: {why}",
                       seq=claim.seq if claim else run)
            return
        try:
            done, worst = compare_profiles(claims, found, exact=report.replay_mode != "tolerance")
        except ProfileInvalid as exc:
            report.add("profiles", "fail", str(exc), seq=exc.seq)
            return
        if self.policy.replay == "full" and done < n:
            missing = next(c for c in claims if (c.run, c.step) not in found)
            report.add("profiles", "fail", f"DepthProfile {missing.seq} (step {missing.step}) was not recomputed: no "
                       "replayed segment reached its checkpoint", seq=missing.seq)
            return
        report.figures["profile_deviation_bits"] = worst
        report.add("profiles", "pass", f"{done} of {n} depth profile(s) recomputed from the replayed checkpoints' "
                   f"weights over the held-out examples (largest deviation {worst:.2g} bits)"
                   + ("" if done == n else "; the others are at checkpoints outside the replayed segments"))

    def _check_traces(self, claims: list[TraceClaim], st: Structure, report: Report,
                      terms: dict[int, dict[tuple[int, int], Any]]) -> None:
        """The ``traces`` check: every recorded trace's form (always), and with ``check_traces`` its
        recomputation, compared within specs/forensics.md §7.3."""
        if not self.policy.check_traces:
            report.add("traces", "pass", f"{len(claims)} recorded trace(s) well formed (query and result digests "
                       "match); their scores were not recomputed (--check-traces recomputes them)")
            return
        worst = 0.0
        for claim in claims:
            where = f"ForensicTrace {claim.seq} ({claim.method} of run {claim.run.run_id!r})"
            try:
                found = self._recompute(claim, st, terms.get(claim.seq, {}))
            except TraceInvalid as exc:
                report.add("traces", "fail", f"{where}: {exc}", seq=claim.seq)
                return
            why, deviation = compare_traces(claim, found)
            if why is not None:
                report.add("traces", "fail", f"{where}: {why}", seq=claim.seq)
                return
            worst = max(worst, deviation)
        methods = ", ".join(sorted({c.method for c in claims}))
        report.figures["trace_deviation_of_tolerance"] = round(worst, 4)
        report.add("traces", "pass", f"{len(claims)} recorded trace(s) recomputed ({methods}): every recorded score "
                   f"within the tolerance of specs/forensics.md §7.3 (largest deviation {worst:.2g} of it)")

    def _recompute(self, claim: TraceClaim, st: Structure, terms: dict[tuple[int, int], Any]) -> dict[str, Any]:
        if claim.method == "loss-trace":
            return recompute_loss_trace(claim, st)
        if self.policy.replay == "none":
            raise TraceInvalid("the method's terms are recomputed by replay, and --replay none was asked", claim.seq)
        if not claim.segments:
            raise TraceInvalid("the traced run has no segment to replay", claim.seq)
        n, n_bands = len(claim.fields), len(claim.run.settings["band_params"])
        found = []
        for key in claim.segments:
            if key not in terms:
                raise TraceInvalid(f"segment {key[1]} of the lineage was not replayed to completion, so its terms "
                                   "were not recomputed", claim.seq)
            why = check_terms(terms[key], n, n_bands, claim.sealed.body["parameters"]["self_influence"])
            if why is not None:
                raise TraceInvalid(f"segment {key[1]}: the terms cannot be recomputed: {why}", claim.seq)
            found.append(terms[key])
        return recompute_influence(claim, st, found, n_bands)

    # -- replay ------------------------------------------------------------------------

    def _replay(self, source: Source, path: str, structure: Structure, report: Report,
                progress: bool, pool: WorkerPool | None = None, claims: list[TraceClaim] | None = None,
                terms: dict[int, dict[tuple[int, int], Any]] | None = None,
                plan: dict[int, list[Any]] | None = None, store: ArtifactStore | None = None,
                profiles: dict[tuple[int, int], Any] | None = None) -> dict[int, tuple[int, int]]:
        """Replay what the policy asks for; per replayed run, (segments replayed, segments in all).
        ``claims``: recorded traces to recompute: every segment of their lineages is replayed and computes
        their terms, which go into ``terms`` (trace seq -> (run seq, segment index) -> terms).

        Asked to replay (every mode but ``none``), a verification that cannot (no inputs, no
        checkpoints, nothing certified to replay) fails naming why; it never skips (issue 10.3).
        """
        observations = structure.observations
        mode = self.policy.replay
        if mode == "none":
            report.add("replay", "skip", "not requested (--replay none): the weights were NOT checked against the "
                       "governed updates")
            _certificate_replay(report, observations)
            return {}
        try:
            runs = plan if plan is not None else plan_segments(observations)
        except ReplayError as exc:
            report.add("replay", "fail", str(exc.args[0]), seq=exc.seq, step=exc.step)
            _certificate_replay(report, observations, error=exc)
            return {}
        contexts, missing = {}, []
        for obs in observations:
            if obs.type == "RunStarted" and obs.seq in runs and runs[obs.seq]:
                try:
                    ctx = _context(source, structure, obs)
                except VerificationError as exc:
                    report.add("replay", "fail", str(exc.args[0]), seq=exc.seq or obs.seq)
                    _certificate_replay(report, observations, error=exc)
                    return {}
                if ctx is None:
                    missing.append(obs)
                else:
                    contexts[obs.seq] = ctx
        if missing or not contexts:
            if missing:
                run = missing[0]
                why = (f"the bundle carries no inputs for run {run.body['run_id']!r} (its DatasetCommitted names "
                       "none, or the artifact is absent): replay was asked for and cannot run; export with the "
                       "data (the default), or verify with --replay none for the structure only")
                seq: int | None = run.seq
            else:
                why, seq = "the bundle has no run with checkpoints and updates to replay: replay was asked for and " \
                    "cannot run", None
            report.add("replay", "fail", why, seq=seq)
            _certificate_replay(report, observations, error=VerificationError(why, seq=seq))
            return {}
        jobs = iter_jobs(contexts, runs)
        # Every segment of a traced lineage is replayed: the trace's terms are computed there.
        probing = trace_jobs(claims or [])
        total = len(jobs)
        if mode == "sample":
            heads = [o for o in observations if o.type == "TreeHead"]
            root = heads[-1].body["root"] if heads else b""
            count = challenge.sample_size(total, self.policy.sample_fraction)
            nonce = self.policy.nonce if self.policy.nonce is not None else os.urandom(challenge.NONCE_BYTES)
            report.figures["challenge_nonce"] = nonce.hex()
            chosen = set(challenge.choose(root, total, count, nonce))
            report.figures["sample_chosen"] = sorted(chosen)
            # A certificate's claim rests on its branch's weights: those segments are always replayed.
            certified = {c["branch_run"] for c in report.certificates if c["status"] == "pass"}
            forced = {i for i, (ctx, seg) in enumerate(jobs)
                      if ctx.run_seq in certified or (ctx.run_seq, seg.index) in probing} - chosen
            jobs = [job for i, job in enumerate(jobs) if i in chosen or i in forced]
            if forced:
                report.figures["certified_branch_segments"] = len(forced)
            report.figures["sample_segments"] = f"{len(jobs)} of {total}"
            report.figures["sample_detect_prob"] = round(challenge.detection_probability(total, count), 4)
        elif mode == "certificates":
            # Only what the certificates' claims rest on: every segment of every certified branch.
            certified = {c["branch_run"] for c in report.certificates if c["status"] == "pass"}
            jobs = [job for job in jobs if job[0].run_seq in certified or (job[0].run_seq, job[1].index) in probing]
            report.figures["certified_branch_segments"] = f"{len(jobs)} of {total}"
            if not jobs:
                why = "no certified unlearning branch to replay (--replay certificates was asked for)"
                report.add("replay", "fail", why)
                _certificate_replay(report, observations, error=VerificationError(why))
                return {}
        # specs/replay.md §4: exact unless this machine differs from a replayed run's recorded
        # environment; then tolerance only if the user asked for it, never because the bundle says so.
        replayed = {ctx.run_seq: ctx for ctx, _ in jobs}
        diffs = {seq: _env_differences(ctx.environment) for seq, ctx in sorted(replayed.items())}
        exact = not any(diffs.values())
        if not exact:
            seq, first = next((seq, d) for seq, d in diffs.items() if d)
            if not self.policy.tolerance:
                report.add("environment", "fail", f"differs from the one recorded by RunStarted ({'; '.join(first)}): "
                           "exact replay is not possible on this machine (--tolerance allows replay within the "
                           "bounds of specs/replay.md §4)", seq=seq)
                _certificate_replay(report, observations, error=VerificationError("environment", seq=seq))
                return {}
            report.add("environment", "pass", f"differs from the recorded one ({'; '.join(first[:3])}): replay in "
                       f"tolerance mode (--tolerance), rtol {RTOL:g}, atol {ATOL:g} on every loss, band norm and "
                       "checkpoint tensor", seq=seq)
        else:
            report.add("environment", "pass", "matches the recorded one: replay must be bit for bit")
        report.replay_mode = "exact" if exact else "tolerance"
        steps = sum(len(seg.updates) for _, seg in jobs)
        sandbox = SandboxSpec(self.policy.sandbox, self.policy.max_memory_mib)
        report.figures["sandbox"] = sandbox.description
        if sandbox.enabled:
            report.figures["sandbox_max_memory_mib"] = sandbox.max_memory_mib
        started = time.perf_counter()
        saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
        from tqdm import tqdm

        # specs/replay.md §6.1: replay reads every artifact through the fetcher, which serves checkpoints
        # held outside the bundle from the store, each fetched as a worker asks for it and hashed.
        fetcher = ExternalFetcher(source, getattr(source, "external_digests", tuple)(), store, observations)
        source = fetcher
        try:
            with tqdm(total=steps, desc=f"replay ({mode})", unit="step", disable=None if progress else True,
                      file=sys.stderr) as bar:
                # Always in workers (issue 9): a SandboxUnavailable (exit 2) propagates.
                probes = {i: probing[(ctx.run_seq, seg.index)] for i, (ctx, seg) in enumerate(jobs)
                          if (ctx.run_seq, seg.index) in probing}
                results = self._run(jobs, path, source, report, exact=exact, probes=probes,
                                    progress=lambda r: bar.update(r.steps), sandbox=sandbox, pool=pool)
        except ReplayError as exc:
            exc = fetcher.first_failure() or exc
            report.add("replay", "fail", str(exc.args[0]), seq=exc.seq, step=exc.step)
            _certificate_replay(report, observations, error=exc)
            return {}
        finally:
            torch.set_num_threads(saved[0])
            environment.set_deterministic(saved[1])
        seconds = time.perf_counter() - started
        report.figures["replay_seconds"] = round(seconds, 3)
        # The segments' own time in their workers (program load, proofs, restore, steps, the final
        # comparison), summed over workers: replay without the workers' start.
        report.figures["replay_segment_seconds"] = round(sum(r.seconds for r in results), 3)
        report.figures["replayed_steps"] = steps
        if fetcher.external:
            fetcher.check_heads(observations[runs[seq][-1].end_seq] for seq in sorted(replayed) if runs.get(seq))
            report.figures.update(fetcher.figures())
            if (failed_fetch := fetcher.first_failure()) is not None:
                exc = failed_fetch
                report.add("replay", "fail", str(exc.args[0]), seq=exc.seq, step=exc.step)
                _certificate_replay(report, observations, error=exc)
                return {}
        _certificate_replay(report, observations, jobs, results)
        for (ctx, seg), r in zip(jobs, results):
            for found in r.traces if r.ok and terms is not None else ():
                if isinstance(found, dict) and type(found.get("trace")) is int:
                    terms.setdefault(found["trace"], {})[(ctx.run_seq, seg.index)] = found
            for entry in r.profiles if r.ok and profiles is not None else ():
                # [step, entropy, mean, slices], or [step, why] where the values could not be computed
                profiles[(ctx.run_seq, entry[0])] = tuple(entry[1:])
        failed = _first_failed(results)
        label = f"{len(jobs)} segment(s), {steps} step(s), {'bit for bit' if exact else 'within tolerance'}"
        if failed is not None:
            report.add("replay", "fail", f"segment {failed.index}: {failed.reason}", seq=failed.seq, step=failed.step)
        else:
            worst = max((r.max_deviation for r in results), default=0.0)
            extra = "" if exact else f"; largest relative deviation {worst:.3g}"
            report.add("replay", "pass", label + extra + fetcher.describe())
        covered: dict[int, tuple[int, int]] = {}
        for seq, segs in runs.items():
            done = sum(1 for ctx, _ in jobs if ctx.run_seq == seq)
            covered[seq] = (done if failed is None else 0, len(segs))
        return covered

    def _run(self, jobs: list[Any], path: str, source: Source, report: Report, *, exact: bool,
             probes: dict[int, Any], progress: Any, sandbox: SandboxSpec, pool: WorkerPool | None) -> list[SegmentResult]:
        """The chosen segments replayed by the policy's engine; both check every answer alike."""
        report.figures["engine"] = self.policy.engine
        if self.policy.engine == "local":
            return run_jobs(jobs, path, source.artifact, exact=exact, workers=self.policy.workers, probes=probes,
                            progress=progress, sandbox=sandbox, pool=pool)
        from ._internal.ray_engine import RayCluster, run_jobs_ray

        with RayCluster(self.policy.ray_address, self.policy.workers) as cluster:
            # Reported apart from replay: a cluster started here costs seconds that a running one does not.
            report.figures["ray_startup_seconds"] = round(cluster.startup_seconds, 3)
            report.figures["ray_nodes"] = cluster.nodes
            return run_jobs_ray(jobs, source.artifact, cluster, exact=exact, workers=self.policy.workers,
                                probes=probes, progress=progress, sandbox=sandbox)


def _check_scans(st: Structure, report: Report) -> None:
    """The ``scans`` check (specs/dynamics.md §2.3): every recorded MemorizationScan recomputed from the
    recorded losses, and a scan at every checkpoint of a run that declares one. No result without either."""
    started = time.perf_counter()
    try:
        n, required, canaried = check_scans(st)
    except ScanInvalid as exc:
        report.add("scans", "fail", str(exc), seq=exc.seq)
        return
    if n:
        report.figures["scans_seconds"] = round(time.perf_counter() - started, 3)
        report.add("scans", "pass", f"{n} memorization scan(s) recomputed from the recorded per-example losses, "
                   f"every score and flag the same; {required} required at checkpoints, all present"
                   + (f"; {canaried} rank their dataset's canaries, every rank the same (specs/dynamics.md §4.2)"
                      if canaried else ""))


def _heads(observations: list[Sealed], report: Report) -> dict[int, tuple[Sealed, Sealed]]:
    """Per run with checkpoints, (RunStarted, its head: the last Checkpoint); the ``heads`` check.

    specs/verification.md "Verdicts": a Checkpoint is a claim about weights that only replay of
    governed updates can support. A run whose checkpoints no GovernedUpdate leads to (only one
    checkpoint, or none of its updates after its first) makes a release claim no replay
    reproduces (issue 10.5: an ungoverned "packaging" run carrying fine-tuned weights): it fails,
    in every replay mode.
    """
    heads: dict[int, tuple[Sealed, Sealed]] = {}
    run: Sealed | None = None
    first: Sealed | None = None
    updates_after_first = 0

    def close() -> str | None:
        if run is None or first is None:
            return None
        head = heads[run.seq][1]
        if updates_after_first == 0:
            return (f"run {run.body.get('run_id')!r}: its Checkpoint at observation {head.seq} is not reached by any "
                    "governed update (no GovernedUpdate follows the run's first Checkpoint): a checkpoint no replay "
                    "reproduces is an unverifiable release claim")
        return None

    for obs in [*observations, None]:
        if obs is None or obs.type == "RunStarted":
            why = close()
            if why is not None:
                report.add("heads", "fail", why, seq=heads[run.seq][1].seq)  # type: ignore[union-attr]
                return heads
            if obs is None:
                break
            run, first, updates_after_first = obs, None, 0
        elif run is None:
            continue
        elif obs.type == "Checkpoint":
            first = first or obs
            heads[run.seq] = (run, obs)
        elif obs.type == "GovernedUpdate" and first is not None:
            updates_after_first += 1
    if heads:
        report.add("heads", "pass", f"{len(heads)} run(s) and branch(es), each head reached by governed updates")
    return heads


def _describe_heads(heads: dict[int, tuple[Sealed, Sealed]], *, runs_of: dict[int, tuple[int, int]],
                    mode: str) -> list[dict[str, Any]]:
    """The report's ``heads``: which checkpoint each run's verdict covers, and how much replay covered."""
    out = []
    for seq, (run, ckpt) in sorted(heads.items()):
        done, total = runs_of.get(seq, (0, 0))
        if mode == "none":
            replayed = "not replayed (--replay none)"
        elif done == 0:
            replayed = "not replayed" + (" (--replay certificates)" if mode == "certificates" else "")
        elif done == total:
            replayed = f"every segment ({total})"
        else:
            replayed = f"{done} of {total} segments (sample)"
        out.append({"run": seq, "run_id": run.body.get("run_id"), "branch": "branch" in (run.body.get("settings") or {}),
                    "checkpoint": ckpt.seq, "step": ckpt.body.get("step"), "digest": bytes(ckpt.body["digest"]).hex(),
                    "replayed": replayed})
    return out


def _certificate_replay(report: Report, observations: list[Sealed], jobs: Sequence[Any] | None = None,
                        results: Sequence[SegmentResult] = (), *, error: ReplayError | VerificationError | None = None) -> None:
    """Each passing certificate's "replay": pass iff every segment of its branch replayed, fail if one did not.

    "skip" where its branch was not replayed (--replay none, or --replay sample/certificates left it
    out, which they never do for a passing certificate). Where replay
    stopped on an error before results came back, a certificate is not verified: "fail" when the
    error lies in its branch or names no record, else "skip".
    """
    starts = [o.seq for o in observations if o.type == "RunStarted"]
    for cert in report.certificates:
        run = cert["branch_run"]
        if cert["status"] != "pass" or run is None:
            continue
        if error is not None:
            end = min([s for s in starts if s > run], default=len(observations))
            cert["replay"] = "fail" if error.seq is None or run <= error.seq < end else "skip"
            continue
        mine = [r for (ctx, _), r in zip(jobs or (), results) if ctx.run_seq == run]
        cert["replay"] = "skip" if not mine else "pass" if all(r.ok for r in mine) else "fail"


def _env_differences(env: dict[str, Any]) -> list[str]:
    environment.prepare(env)
    return environment.differences(env)


def _first_failed(results: list[SegmentResult]) -> SegmentResult | None:
    bad = [r for r in results if not r.ok]
    return min(bad, key=lambda r: (r.seq if r.seq is not None else math.inf)) if bad else None


def _input_names(run: Run) -> list[str]:
    """The dataset's input tensor names in the program's order (specs/training.md §5.1; none where the
    settings do not say: a query file then matches nothing)."""
    try:
        return [c.tensor for c in program_columns(run.settings)]
    except (ValueError, TypeError, KeyError):
        return []


def _context(source: Source, structure: Structure, run: Sealed) -> RunContext | None:
    """Labels per dataset index and the policy's profiles, for replaying ``run`` (None: no inputs).

    The labels and policy are the ones the structural checks parsed and recomputed for the run (on
    an unlearning branch, re-aggregated without the retired source), never read from an artifact
    the trainer chose.
    """
    settings = run.body["settings"]
    dataset = structure.datasets[settings["dataset"]["seq"]]
    if dataset.data is None or source.artifact(dataset.data) is None:
        return None
    labels = [m.label for m in dataset.manifests]
    routing = structure.routing.get(run.seq)
    if routing is not None:
        # A removed example (None) keeps a placeholder: the routing check forbids training on it.
        labels = [r.label if r is not None else label for r, label in zip(routing, labels)]
    policy = structure.policies[settings["policy_seq"]]
    profiles = {r: list(policy.outcome(r).profile) for r in range(-2, len(policy.rules))}
    return RunContext(run.seq, run.body["artifacts"]["program"], dataset.data, settings, labels, profiles,
                      dict(run.body["environment"]), held_out_request(structure, structure.runs[run.seq]),
                      sorted(policy.private_rules))
