"""What a verification found: named checks, the first failure, the replay mode and figures.

Every check the verifier runs appends one ``Check``; a failed check carries the observation
sequence number or step it names. ``Report.to_json`` is the ``--json`` output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["pass", "fail", "skip"]


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
    #: "exact", "tolerance" or "none"; and whether replay covered every segment or a sample.
    replay_mode: str = "none"
    figures: dict[str, Any] = field(default_factory=dict)
    certificates: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, status: Status, detail: str = "", *, seq: int | None = None, step: int | None = None) -> Check:
        check = Check(name, status, detail, seq, step)
        self.checks.append(check)
        return check

    @property
    def first_failure(self) -> Check | None:
        return next((c for c in self.checks if c.status == "fail"), None)

    @property
    def verified(self) -> bool:
        return self.first_failure is None and any(c.status == "pass" for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        failure = self.first_failure
        return {
            "verified": self.verified,
            "replay_mode": self.replay_mode,
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
        for name, value in self.figures.items():
            lines.append(f"  {name}: {value}")
        failure = self.first_failure
        verdict = "VERIFIED" if self.verified else f"FAILED at {failure.name}: {failure.detail}" if failure else "NOTHING CHECKED"
        return "\n".join(["gradledger-verify report", *lines, verdict])
