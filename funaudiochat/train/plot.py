"""Plot a run's metrics.jsonl: loss curves (total, text, speech; a distilled run's KL; DPO loss) and, for DPO,
reward margin and accuracy per task."""
from __future__ import annotations

from pathlib import Path

from funaudiochat import fileio
from funaudiochat.errors import InputError
from funaudiochat.train.metrics import METRICS_FILE, read_metrics

LOSS_KEYS = ("loss", "text_loss", "speech_loss", "aux_loss", "distill_kl")


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise InputError(f"{run_dir}: no {METRICS_FILE} with metrics (is it a training run folder?)")
    dpo_keys = sorted({k for r in rows for k in r if k == "reward_margin" or k.startswith("margin/")})
    fig, axes = plt.subplots(1, 2 if dpo_keys else 1, figsize=(12 if dpo_keys else 7, 4.5), squeeze=False)
    _curves(axes[0, 0], rows, [k for k in LOSS_KEYS if any(k in r for r in rows)], "loss")
    if dpo_keys:
        _curves(axes[0, 1], rows, dpo_keys, "reward margin (chosen - rejected)")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else run_dir / "loss.png"
    try:
        with fileio.atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out


def _curves(ax, rows: list[dict], keys: list[str], ylabel: str) -> None:
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
