"""Writing an :class:`~training.evaluate.EvaluationReport`: R.json, R.md and PR/ROC plots.

R.json follows DESIGN.md 5.2 exactly::

    {"dataset": str, "images": int, "segmentation": {"miou": f},
     "detectors": {NAME: {"anomaly": {...}, "failure": {...}, "iou": {...}}},
     "skipped": {NAME: reason},
     "score_at": {"requested": "network"|"label", "detectors": {NAME: "network"|"label"}},
     "input_resize": "pil"|"fast", "anomaly_rule": "pooled"|"per_image"}

Choices where the contract is silent: "segmentation" is always there (DESIGN keeps the
key), its ``miou`` ``null`` on a split without segmentation labels; a detector lists only
the blocks it produces and the split can score; an undefined metric (e.g. no anomaly
pixel at all) is ``null``, since JSON has no NaN; "skipped" names detectors that were not
scored, with the reason; "score_at" says in which order each detector's map was made
("network": scored at the network's resolution, the map upsampled, as the node publishes
it; "label": logits upsampled to the label size, then scored, the benchmarks' protocol),
since a requested "label" applies only to detectors that need nothing but the logits;
"input_resize" says how the images were resized to the network's input (PIL's pixels, or
torch's faster uint8 kernel);
"anomaly_rule" says how the "anomaly" block was computed: "pooled" over every pixel
(Fishyscapes), or "per_image", each image's values averaged as StreetHazards' own
benchmark code does, with the pooled values beside it as "anomaly_pooled".
Fractions, not percent. The plots are ``R_anomaly.png`` and ``R_failure.png`` (PR left,
ROC right) beside R.json. Every file is written atomically.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from segmentation_safety.checkpoint import atomic_write_bytes
from training.evaluate import EvaluationReport, nan_to_none


def report_json(report: EvaluationReport) -> dict[str, Any]:
    """The DESIGN.md 5.2 dictionary of ``report`` (NaN -> None)."""
    out: dict[str, Any] = {"dataset": report.dataset, "images": int(report.images)}
    # The key is part of the contract: null where the split has no segmentation labels.
    miou = None if report.miou is None else nan_to_none(report.miou)
    out["segmentation"] = {"miou": miou}
    out["detectors"] = {
        name: {
            block: {
                k: nan_to_none(v, -1.0 if k in _CORRELATIONS else 0.0) for k, v in values.items()
            }
            for block, values in scores.blocks().items()
        }
        for name, scores in report.detectors.items()
    }
    out["skipped"] = dict(report.skipped)
    out["score_at"] = {"requested": report.score_at, "detectors": dict(report.scored_at)}
    out["input_resize"] = report.input_resize
    out["anomaly_rule"] = report.anomaly_rule
    return out


def report_markdown(report: EvaluationReport) -> str:
    """A human-readable summary: one table per kind of map, values in percent."""
    title = f"{report.dataset}/{report.split}" if report.split else report.dataset
    lines = [f"# Evaluation on {title}", ""]
    facts = [f"{report.images} images"]
    if report.segmenter:
        facts.append(f"segmenter {report.segmenter}")
    if report.seconds > 0:
        facts.append(f"{report.images_per_second:.2f} images/s")
    facts.append(f"pixel metrics: {report.metrics_mode}")
    facts.append(f"input resize: {report.input_resize}")
    lines += [", ".join(facts) + ".", "", scoring_order_text(report), ""]
    if report.miou is not None:
        lines += [
            f"Segmentation: mIoU {_pct(report.miou)}, pixel accuracy "
            f"{_pct(report.pixel_accuracy)}.",
            "",
        ]
        if report.class_iou is not None:
            lines += ["| class | IoU |", "| --- | ---: |"]
            for i, v in enumerate(report.class_iou):
                name = report.class_names[i] if i < len(report.class_names) else str(i)
                lines.append(f"| {name} | {_pct(v)} |")
            lines.append("")
    per_image = report.anomaly_rule == "per_image"
    anomaly_heading = (
        "Anomaly detection (pixel level, each image's values averaged: the benchmark's own rule)"
        if per_image
        else "Anomaly detection (pixel level, pooled)"
    )
    tables = [
        ("anomaly", anomaly_heading, ["ap", "auroc", "fpr95"]),
        ("anomaly_pooled", "Anomaly detection (pixel level, pooled)", ["ap", "auroc", "fpr95"]),
        (
            "failure",
            "Failure detection (pixel level, pooled)",
            ["aupr_error", "aupr_success", "auroc", "fpr95"],
        ),
        ("iou", "Per-class IoU prediction (image level)", ["mae", "pearson", "spearman"]),
        (
            "open_set",
            "Open-set segmentation (anomalies as class K, DenseHybrid eq. 16)",
            ["open_miou"],
        ),
    ]
    headers = {
        "ap": "AP ↑",
        "auroc": "AUROC ↑",
        "fpr95": "FPR95 ↓",
        "aupr_error": "AUPR-Error ↑",
        "aupr_success": "AUPR-Success ↑",
        "mae": "MAE ↓",
        "pearson": "Pearson ↑",
        "spearman": "Spearman ↑",
        "open_miou": "open-mIoU ↑",
    }
    for block, heading, keys in tables:
        rows = [(n, s.blocks()[block]) for n, s in report.detectors.items() if block in s.blocks()]
        if not rows:
            continue
        header = " | ".join(headers[k] for k in keys)
        lines += [f"## {heading}", "", f"| detector | {header} |"]
        lines.append("| --- |" + " ---: |" * len(keys))
        for name, values in rows:
            cells = [_corr(values[k]) if k in _CORRELATIONS else _pct(values[k]) for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if report.skipped:
        lines += ["## Not scored", ""]
        lines += [f"- {name}: {why}" for name, why in report.skipped.items()]
        lines.append("")
    pooling = (
        "anomaly metrics are each image's (images with both anomaly and inlier pixels) "
        "averaged, FPR95 at the TPR closest to 95%, as StreetHazards' eval_ood.py computes "
        "them; the pooled table and the other pixel metrics pool every valid pixel of every "
        "image"
        if per_image
        else "pixel metrics pool every valid pixel of every image (Fishyscapes rules)"
    )
    lines.append(
        f"Values in percent (correlations as coefficients); {pooling}; IoU prediction "
        "averages over classes."
    )
    return "\n".join(lines) + "\n"


def scoring_order_text(report: EvaluationReport) -> str:
    """One sentence on the order of resizing and scoring each detector used."""
    by_order: dict[str, list[str]] = {"label": [], "network": []}
    for name, order in report.scored_at.items():
        by_order[order].append(name)
    parts = []
    if by_order["label"]:
        parts.append(
            "logits upsampled to the label size, then scored (the benchmarks' protocol): "
            + ", ".join(by_order["label"])
        )
    if by_order["network"]:
        kept = (
            " (they cannot be scored from the logits alone)" if report.score_at == "label" else ""
        )
        parts.append(
            "scored at the network's resolution, map upsampled (what the node publishes)"
            f"{kept}: " + ", ".join(by_order["network"])
        )
    return f"Scores (--score-at {report.score_at}): " + "; ".join(parts) + "."


def plot_curves(report: EvaluationReport, block: str) -> bytes | None:
    """PNG of PR (left) and ROC (right) curves of every detector with a ``block`` result."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    results = {
        n: getattr(s, block) for n, s in report.detectors.items() if getattr(s, block) is not None
    }
    if not results:
        return None
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax_pr, ax_roc = fig.subplots(1, 2)
    positive = "anomaly" if block == "anomaly" else "error"
    for name, r in results.items():
        main = r.ap if block == "anomaly" else r.aupr_error
        if r.recall.size:
            ax_pr.plot(r.recall, r.precision, label=f"{name} ({_pct(main)})")
        if r.fpr.size:
            ax_roc.plot(r.fpr, r.tpr, label=f"{name} ({_pct(r.auroc)})")
    ax_roc.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
    ax_roc.axhline(0.95, color="0.7", linestyle="--", linewidth=1)
    ax_pr.set(xlabel=f"recall ({positive})", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1))
    ax_pr.set_title("PR (legend: AP %)" if block == "anomaly" else "PR (legend: AUPR-Error %)")
    ax_roc.set_title("ROC (legend: AUROC %)")
    for ax in (ax_pr, ax_roc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    title = f"{block} detection on {report.dataset}"
    fig.suptitle(f"{title}/{report.split}" if report.split else title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_report(report: EvaluationReport, out: str | Path) -> list[Path]:
    """Write R.json at ``out``, R.md and the PNG plots beside it; return the paths written."""
    out = Path(out)
    written = [out]
    text = json.dumps(report_json(report), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(out, text.encode())
    md = out.with_suffix(".md")
    atomic_write_bytes(md, report_markdown(report).encode())
    written.append(md)
    for block in ("anomaly", "failure"):
        png = plot_curves(report, block)
        if png is not None:
            path = out.with_name(f"{out.stem}_{block}.png")
            atomic_write_bytes(path, png)
            written.append(path)
    return written


_CORRELATIONS = ("pearson", "spearman")


def _corr(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.3f}"


def _pct(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{100 * value:.2f}"
