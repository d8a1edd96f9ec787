"""Shared pieces of `funaudiochat check-reference`: one result line per compared case."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Comparison:
    """One tensor compared with its reference: max abs diff, and that diff relative to max|ref|."""

    name: str
    max_abs: float
    ref_scale: float
    tol_rel: float
    exact: bool = False  # integer tensors: must be identical

    @property
    def rel(self) -> float:
        return self.max_abs / self.ref_scale if self.ref_scale > 0 else self.max_abs

    @property
    def ok(self) -> bool:
        return self.max_abs == 0 if self.exact else self.rel <= self.tol_rel


def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, tol_rel: float = 1e-4,
            scale: str = "max") -> Comparison:
    """Compare two tensors. `scale="max"`: tolerance relative to max|ref|; `"value"`: to |ref| (scalars)."""
    ours, ref = ours.detach().cpu(), ref.detach().cpu()
    if ours.shape != ref.shape:
        return Comparison(f"{name} (shape {tuple(ours.shape)} != {tuple(ref.shape)})", float("inf"), 1.0, tol_rel)
    if not ref.is_floating_point():
        diff = float((ours.long() != ref.long()).sum())
        return Comparison(name, diff, 1.0, 0.0, exact=True)
    d = (ours.double() - ref.double()).abs()
    max_abs = float(d.max()) if d.numel() else 0.0
    ref_scale = float(ref.double().abs().max()) if ref.numel() else 0.0
    return Comparison(name, max_abs, ref_scale, tol_rel)


@dataclass
class CaseResult:
    """The outcome of one golden case: pass criteria plus debug-only intermediates."""

    case: str
    checks: list[Comparison] = field(default_factory=list)       # decide pass/fail
    diagnostics: list[Comparison] = field(default_factory=list)  # help locate a mismatch
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Passes when something was compared and everything compared is within tolerance."""
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    def line(self) -> str:
        if self.error:
            return f"FAIL {self.case}: {self.error}"
        worst = max(self.checks, key=lambda c: (not c.ok, c.rel)) if self.checks else None
        status = "ok  " if self.ok else "FAIL"
        if worst is None:
            return f"{status} {self.case}: nothing compared"
        kind = "mismatches" if worst.exact else f"max abs {worst.max_abs:.3g}, rel {worst.rel:.3g}"
        head = f"{status} {self.case}: worst {worst.name} {kind}" + ("" if worst.exact else f" (tol {worst.tol_rel:g})")
        if not self.ok:
            bad = [c.name for c in self.checks if not c.ok]
            head += f"; failing: {', '.join(bad)}"
            first_bad_diag = next((c for c in self.diagnostics if not c.ok), None)
            if first_bad_diag is not None:
                head += f"; first diverging intermediate: {first_bad_diag.name} (rel {first_bad_diag.rel:.3g})"
        return head
