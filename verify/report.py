"""What a verification found: named checks, the first failure, the verdict and figures.

Every check the verifier runs appends one ``Check``; a failed check carries the observation
sequence number or step it names. ``Report.to_json`` is the ``--json`` output. The verdict
vocabulary ("exact", "tolerance", "structure only", "failed") and what each covers are
specs/verification.md "Verdicts".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["pass", "fail", "skip"]
Verdict = Literal["exact", "tolerance", "structure only", "failed"]


@dataclass
class Check:
    name: str
    status: Status
    detail: str = ""
    #: The observation sequence number the failure names, when it names one.
    seq: int | None = None
    #: The training step the failure names, when it names one.
    step: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "status": self.status, "detail": self.detail}
        if self.seq is not None:
            out["seq"] = self.seq
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    #: How replay compared: "exact", "tolerance", or "none" (no segment was replayed).
    replay_mode: str = "none"
    #: What the user asked replay to cover: "full", "sample", "certificates" or "none".
    replay_scope: str = "none"
    figures: dict[str, Any] = field(default_factory=dict)
    certificates: list[dict[str, Any]] = field(default_factory=list)
    #: The verified head of each run and branch: its last Checkpoint, reached by governed updates
    #: (specs/verification.md "Verdicts"), and how much of the run replay covered.
    heads: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, status: Status, detail: str = "", *, seq: int | None = None, step: int | None = None) -> Check:
        check = Check(name, status, detail, seq, step)
        self.checks.append(check)
        return check

    @property
    def first_failure(self) -> Check | None:
        return next((c for c in self.checks if c.status == "fail"), None)

    @property
    def verified(self) -> bool:
        """No check failed, one passed, and nothing was skipped but the replay the user declined
        (``--replay none``): a report never verifies while a check it was asked for did not run."""
        skipped = [c for c in self.checks if c.status == "skip"]
        allowed = all(c.name == "replay" and self.replay_scope == "none" for c in skipped)
        return self.first_failure is None and allowed and any(c.status == "pass" for c in self.checks)

    @property
    def verdict(self) -> Verdict:
        if not self.verified:
            return "failed"
        if self.replay_mode == "none":
            return "structure only"
        return "tolerance" if self.replay_mode == "tolerance" else "exact"

    @property
    def weights_verified(self) -> bool:
        """Whether the weights of every run follow from its governed updates (replayed in full, or
        in a sample the trainer could not predict); never for --replay none or certificates."""
        return self.verdict in ("exact", "tolerance") and self.replay_scope in ("full", "sample")

    def to_json(self) -> dict[str, Any]:
        failure = self.first_failure
        return {
            "verified": self.verified,
            "verdict": self.verdict,
            "weights_verified": self.weights_verified,
            "replay_mode": self.replay_mode,
            "replay_scope": self.replay_scope,
            "heads": self.heads,
            "checks": [c.to_json() for c in self.checks],
            "first_failure": None if failure is None else failure.to_json(),
            "figures": self.figures,
            "certificates": self.certificates,
        }

    def render(self) -> str:
        marks = {"pass": "ok  ", "fail": "FAIL", "skip": "skip"}
        lines = [f"  [{marks[c.status]}] {c.name}: {c.detail}" for c in self.checks]
        for c in self.certificates:
            lines.append(f"  certificate {c.get('seq')} ({c.get('mode')} unlearning of {c.get('source')!r}): "
                         f"{c.get('status')}, branch replay {c.get('replay') or 'not run'}")
        for h in self.heads:
            lines.append(f"  head of run {h['run_id']!r} (observation {h['run']}): checkpoint {h['checkpoint']} "
                         f"at step {h['step']}, digest {h['digest'][:16]}..., replay: {h['replayed']}")
        for name, value in self.figures.items():
            lines.append(f"  {name}: {value}")
        return "\n".join(["gradledger-verify report", *lines, self._verdict_line()])

    def _verdict_line(self) -> str:
        failure = self.first_failure
        if not self.verified:
            if failure is not None:
                return f"FAILED at {failure.name}: {failure.detail}"
            skipped = next((c for c in self.checks if c.status == "skip"), None)
            return f"FAILED: {skipped.name} did not run: {skipped.detail}" if skipped else "FAILED: nothing was checked"
        verdict = self.verdict
        if verdict == "structure only":
            return "VERIFIED STRUCTURE ONLY: the weights were NOT checked (--replay none): no replay shows they " \
                   "follow from the governed updates"
        head = "VERIFIED WITHIN TOLERANCE" if verdict == "tolerance" else "VERIFIED"
        if self.replay_scope == "certificates":
            return f"{head}: the certified unlearning branches replayed; the original run's weights were NOT checked " \
                   "(--replay certificates)"
        if self.replay_scope == "sample":
            return f"{head}: a sample of the segments replayed ({self.figures.get('sample_segments')}, challenge nonce " \
                   f"{str(self.figures.get('challenge_nonce', ''))[:16]}...)"
        return head if verdict == "exact" else f"{head} (specs/replay.md §4 bounds; not bit for bit)"
