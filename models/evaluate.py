"""Evaluate a checkpoint on labelled images: metrics, interval coverage, plots, reports.

:func:`evaluate` is what ``boneage-worker evaluate`` calls. It writes into ``output_dir``:
``metrics.json``, ``report.md``, ``predictions.csv`` and three PNG plots (predicted vs.
true, Bland–Altman, residual by age). The metrics come with bootstrap confidence intervals
of MAE and bias (:func:`bootstrap_intervals`), and by age band with the observed coverage
of each conformal interval (:func:`summarise`, :func:`band_table`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from models.checkpoint import (
    CheckpointMeta,
    LoadedModel,
    load_checkpoint,
    why_no_file_can_be_created_in,
)
from models.data import LabelledImage, PreparedDataset, source_counts, split_groups
from models.gradcam import predict_z
from models.net import BoneAgeNet
from models.predictor import (
    MAX_BONE_AGE_MONTHS,
    MIN_BONE_AGE_MONTHS,
    inference_copy,
    precision_name,
    resolve_device,
    resolve_precision,
)
from models.preprocess import require_clahe

logger = logging.getLogger(__name__)

AGE_BANDS_MONTHS: tuple[tuple[float, float], ...] = (
    (0.0, 24.0),
    (24.0, 72.0),
    (72.0, 120.0),
    (120.0, 168.0),
    (168.0, 216.0),
    (216.0, math.inf),
)
"""Reference-age bands of the per-band metrics: 0–2, 2–6, 6–10, 10–14, 14–18, 18+ years."""

MIN_BAND_IMAGES = 20
"""Fewer images than this in an age band: its figures are marked as too few to mean
anything (an MAE of 19 images moves by a fifth of itself from one sample to the next)."""

BOOTSTRAP_RESAMPLES = 2000
"""Resamples of the bootstrap confidence intervals by default (``evaluate --bootstrap``):
enough that a 95 % interval's ends move by a few hundredths of a month with the seed."""

BOOTSTRAP_SEED = 0
"""Seed of the bootstrap, fixed: the same predictions give the same intervals."""

BOOTSTRAP_LEVEL = 0.95
"""Confidence level of the bootstrap intervals."""

BAND_TABLE_LEGEND = (
    "covered: the share of reference ages inside the conformal interval of that level; "
    f"too few: under {MIN_BAND_IMAGES} images, too few for the band's figures to mean anything"
)
"""What :func:`band_table`'s columns mean, printed with it."""

INTERVAL_TABLE_LEGEND = (
    "percentile bootstrap, as the intervals of all images, each band resampling its own "
    f"images (or patients); none for a band of under {MIN_BAND_IMAGES} images"
)
"""What :func:`band_interval_table` holds, printed with it."""

_BOOTSTRAP_DRAWS = 1 << 20
"""Resampled indices held at once (8 MB): a large set is resampled in chunks (2000
resamples of 12,600 images take about 0.2 s)."""


@dataclass(frozen=True)
class GateOutcome:
    """What the service's input gate did to the images before they were evaluated.

    The gate (``dicom_io.gate``, applied by the caller: this package reads no DICOM)
    decides which images the service assesses at all; figures of images it refuses are
    of nothing the service would report.

    Attributes
    ----------
    applied : bool
        The images the gate refuses were left out; False: every image was scored (asked
        for), also those the service would refuse.
    left_out : Mapping[str, int]
        The kind of the gate's reason (``body_part``, ``age`` ...) -> how many images it
        left out for it (empty where it was not applied, or refused none). Kinds, not the
        reasons themselves, which carry each image's values (its age, its size).
    examples : Mapping[str, str]
        For each kind, the reason of one image left out for it (the most frequent).
    """

    applied: bool
    left_out: Mapping[str, int] = field(default_factory=dict)
    examples: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def grouped(
        cls, reasons: Mapping[str, int], kind: Callable[[str], str], *, applied: bool = True
    ) -> GateOutcome:
        """The outcome of images left out for ``reasons`` (reason -> how many), counted by
        ``kind`` of reason (``db.queries.reason_category``, as ``status`` counts them)."""
        left_out: dict[str, int] = {}
        examples: dict[str, str] = {}
        for reason, count in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            left_out[kind(reason)] = left_out.get(kind(reason), 0) + count
            examples.setdefault(kind(reason), reason)
        return cls(applied, left_out, examples)

    def as_metrics(self) -> dict[str, Any]:
        """``{"applied", "left_out" (a count), "reasons" (kind -> count), "examples"
        (kind -> a reason)}``, the most frequent kind first, as ``metrics.json`` holds it."""
        reasons = sorted(self.left_out.items(), key=lambda kv: (-kv[1], kv[0]))
        return {
            "applied": self.applied,
            "left_out": sum(self.left_out.values()),
            "reasons": dict(reasons),
            "examples": {kind: self.examples[kind] for kind, _ in reasons if kind in self.examples},
        }


def gate_sentence(metrics: dict[str, Any]) -> str | None:
    """What the service's gate did, in words, as ``evaluate`` prints it and ``report.md``
    holds it; None where it had no say (images that are not DICOM)."""
    gate = metrics.get("gate")
    if not gate:
        return None
    if not gate["applied"]:
        return (
            "the service's gate was not applied: every image was scored, also those the "
            "service would refuse and never assess"
        )
    if not gate["left_out"]:
        return "the service's gate accepts every image"
    examples = gate.get("examples", {})

    def said(kind: str, count: int) -> str:
        if kind not in examples:
            return f"{count} × {kind}"
        return f"{count} × {kind} ({'' if count == 1 else 'e.g. '}{examples[kind]})"

    reasons = "; ".join(said(kind, count) for kind, count in gate["reasons"].items())
    return (
        f"the service's gate left out {gate['left_out']} image(s) it would refuse, not "
        f"in the figures: {reasons}"
    )


@dataclass
class EvaluationReport:
    """What :func:`evaluate` found and wrote.

    Attributes
    ----------
    metrics : dict
        ``overall``, ``by_sex`` (``male``/``female``), ``by_age_band`` (``"0-24"`` …):
        each a dict of :func:`regression_metrics` (a band's with its own ``coverage``
        and ``too_few``, see :func:`summarise`); ``coverage``: level -> observed share
        inside the conformal interval (empty without quantiles); ``bootstrap``: the
        confidence intervals of :func:`bootstrap_intervals` and their ``unit``
        (``"patient"`` or ``"image"``), absent when not asked for; ``model``: id, arch,
        trained flag; ``n_listed``/``n_missing``: images the source listed, and of those
        missing (not evaluated); ``gate``: where the service's input gate was asked about
        (DICOM images), :meth:`GateOutcome.as_metrics`.
    files : dict
        Name -> path of every file written.
    """

    metrics: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def regression_metrics(predicted: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, R², bias and share within ±6/±12 months.

    Parameters
    ----------
    predicted, true : numpy.ndarray
        Bone ages in months, same length.

    Returns
    -------
    dict
        ``n``, ``mae``, ``rmse``, ``r2`` (NaN with fewer than 2 values or no variance),
        ``bias`` (mean of predicted - true), ``within_6``, ``within_12`` (shares in [0, 1]).
    """
    p = np.asarray(predicted, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"predicted {p.shape} and true {t.shape} differ in shape")
    n = int(p.size)
    if n == 0:
        return {"n": 0}
    err = p - t
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    r2 = 1.0 - float(np.sum(err**2)) / ss_tot if n > 1 and ss_tot > 0 else math.nan
    return {
        "n": n,
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "r2": r2,
        "bias": float(np.mean(err)),
        "within_6": float(np.mean(np.abs(err) <= 6.0)),
        "within_12": float(np.mean(np.abs(err) <= 12.0)),
    }


def bland_altman_limits(predicted: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """Bland–Altman 95 % limits of agreement: mean difference ± 1.96 SD.

    Parameters
    ----------
    predicted, true : numpy.ndarray
        Bone ages in months, same length.

    Returns
    -------
    tuple of float
        ``(low, high)`` of predicted - true, months; NaN with fewer than 2 values.
    """
    diff = np.asarray(predicted, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    if diff.size < 2:
        return math.nan, math.nan
    bias, sd = float(np.mean(diff)), float(np.std(diff, ddof=1))
    return bias - 1.96 * sd, bias + 1.96 * sd


def interval_coverage(
    predicted: np.ndarray, true: np.ndarray, quantiles: dict[str, float]
) -> dict[str, float]:
    """Observed coverage of the conformal intervals (clipped to [0, 240] as reported).

    Parameters
    ----------
    predicted, true : numpy.ndarray
        Bone ages in months.
    quantiles : dict
        Level (as a string) -> absolute-residual quantile in months.

    Returns
    -------
    dict
        Level (string) -> share of ``true`` inside ``[predicted - q, predicted + q]``.
    """
    p = np.asarray(predicted, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    out: dict[str, float] = {}
    for level, q in sorted(quantiles.items(), key=lambda kv: float(kv[0])):
        low = np.maximum(p - q, MIN_BONE_AGE_MONTHS)
        high = np.minimum(p + q, MAX_BONE_AGE_MONTHS)
        out[level] = float(np.mean((t >= low) & (t <= high))) if p.size else math.nan
    return out


def predict_ages(
    model: BoneAgeNet,
    dataset: PreparedDataset,
    *,
    target_mean: float,
    target_sd: float,
    device: torch.device,
    precision: str = "auto",
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    """Predict bone ages (months, clipped to [0, 240]) for a dataset.

    Parameters
    ----------
    model : BoneAgeNet
        The model (put in eval mode here).
    dataset : PreparedDataset
        Examples.
    target_mean, target_sd : float
        De-z-scoring constants.
    device : torch.device
        Where to run.
    precision : str
        What the trunk runs in, as in the worker
        (:func:`~models.predictor.resolve_precision`): by default float16 autocast on
        CUDA, float32 elsewhere. Pooling and head run in float32, as in the worker
        (:func:`~models.gradcam.predict_z`).
    batch_size, num_workers : int
        DataLoader settings.
    progress : bool
        Show a progress bar.
    desc : str
        Progress bar label.

    Returns
    -------
    numpy.ndarray
        float64 predictions, one per example in order.
    """
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    dtype = resolve_precision(precision, device)
    lower = dtype != torch.float32
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for x, _age, male in tqdm(loader, desc=desc, disable=not progress, leave=False):
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=lower):
                z = predict_z(model, x, male.to(device))
            out.append((z * target_sd + target_mean).cpu().numpy())
    pred = np.concatenate(out) if out else np.zeros(0)
    return np.clip(pred.astype(np.float64), MIN_BONE_AGE_MONTHS, MAX_BONE_AGE_MONTHS)


def age_bands(true: np.ndarray) -> dict[str, np.ndarray]:
    """The bands of :data:`AGE_BANDS_MONTHS` that hold reference ages of ``true``, named
    ``"0-24"`` … ``"216+"`` (months), each with the mask of its images."""
    t = np.asarray(true, dtype=np.float64)
    bands = {}
    for low, high in AGE_BANDS_MONTHS:
        sel = (t >= low) & (t < high)
        if sel.any():
            bands[f"{low:g}-{high:g}" if math.isfinite(high) else f"{low:g}+"] = sel
    return bands


def summarise(
    predicted: np.ndarray,
    true: np.ndarray,
    male: np.ndarray,
    quantiles: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Overall, by-sex and by-age-band metrics and interval coverage.

    Parameters
    ----------
    predicted, true : numpy.ndarray
        Bone ages, months.
    male : numpy.ndarray
        bool per example.
    quantiles : dict, optional
        Conformal quantiles of the checkpoint.

    Returns
    -------
    dict
        ``overall`` (with the Bland–Altman limits ``loa_low``/``loa_high``), ``by_sex``,
        ``by_age_band``, ``coverage``. Each band of :data:`AGE_BANDS_MONTHS` that holds
        images (named ``"0-24"`` … ``"216+"``, months) has the :func:`regression_metrics`,
        its own ``coverage`` (level -> observed share, as :func:`interval_coverage`) and
        ``too_few``: fewer than :data:`MIN_BAND_IMAGES` images.
    """
    p = np.asarray(predicted, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    m = np.asarray(male, dtype=bool)
    bands: dict[str, dict[str, Any]] = {}
    for name, sel in age_bands(t).items():
        band: dict[str, Any] = dict(regression_metrics(p[sel], t[sel]))
        band["coverage"] = interval_coverage(p[sel], t[sel], quantiles or {})
        band["too_few"] = int(sel.sum()) < MIN_BAND_IMAGES
        bands[name] = band
    overall: dict[str, float] = regression_metrics(p, t)
    overall["loa_low"], overall["loa_high"] = bland_altman_limits(p, t)
    return {
        "overall": overall,
        "by_sex": {
            "male": regression_metrics(p[m], t[m]),
            "female": regression_metrics(p[~m], t[~m]),
        },
        "by_age_band": bands,
        "coverage": interval_coverage(p, t, quantiles or {}),
    }


def bootstrap_intervals(
    predicted: np.ndarray,
    true: np.ndarray,
    groups: Sequence[Hashable] | None = None,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = BOOTSTRAP_LEVEL,
) -> dict[str, Any]:
    """Percentile-bootstrap confidence intervals of the MAE and the bias.

    Each resample draws as many units as there are, with replacement: patients where
    ``groups`` says which images are one patient's (their images go in or out together,
    so that two images of one child do not count as two pieces of evidence), else
    images. A resample's MAE and bias are over the images it drew.

    Parameters
    ----------
    predicted, true : numpy.ndarray
        Bone ages in months, same length, at least one.
    groups : sequence of hashable, optional
        The unit of each image (equal values: one patient); None: each image alone.
    resamples : int
        Number of resamples, at least 1.
    seed : int
        Seed of the generator: the same arguments give the same intervals.
    level : float
        Confidence level in (0, 1).

    Returns
    -------
    dict
        ``mae`` and ``bias``: ``[low, high]`` in months; ``level``, ``resamples``,
        ``seed``, and ``n_units``: the units resampled.

    Raises
    ------
    ValueError
        If the lengths differ, there is nothing to resample, or ``resamples`` or
        ``level`` is out of range.
    """
    err = np.asarray(predicted, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    if err.ndim != 1 or err.size == 0:
        raise ValueError(f"need one or more predictions in a 1-D array, got shape {err.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if groups is None:
        codes = np.arange(err.size)
    else:
        if len(groups) != err.size:
            raise ValueError(f"groups has {len(groups)} entries for {err.size} predictions")
        number: dict[Hashable, int] = {}
        codes = np.array([number.setdefault(g, len(number)) for g in groups], dtype=np.intp)
    units = int(codes.max()) + 1
    # per unit: sum of |error|, sum of error, images; a resample adds up the units it drew
    per_unit = (
        np.bincount(codes, weights=np.abs(err), minlength=units),
        np.bincount(codes, weights=err, minlength=units),
        np.bincount(codes, minlength=units).astype(np.float64),
    )
    rng = np.random.default_rng(seed)
    drawn = np.empty((3, resamples))
    step = max(1, _BOOTSTRAP_DRAWS // units)
    for start in range(0, resamples, step):
        draw = rng.integers(0, units, size=(min(step, resamples - start), units))
        for sums, column in zip(drawn, per_unit, strict=True):
            sums[start : start + len(draw)] = column[draw].sum(axis=1)
    tail = (1.0 - level) / 2.0
    ends = np.quantile(drawn[:2] / drawn[2], [tail, 1.0 - tail], axis=1)
    return {
        "mae": [float(ends[0, 0]), float(ends[1, 0])],
        "bias": [float(ends[0, 1]), float(ends[1, 1])],
        "level": level,
        "resamples": resamples,
        "seed": seed,
        "n_units": units,
    }


def bootstrap_sentence(metrics: dict[str, Any]) -> str | None:
    """The bootstrap intervals in words, as ``evaluate`` prints them; None without them."""
    boot = metrics.get("bootstrap")
    if not boot:
        return None
    (mae_low, mae_high), (bias_low, bias_high) = boot["mae"], boot["bias"]
    return (
        f"{boot['level']:.0%} confidence intervals (bootstrap, {boot['resamples']} "
        f"resamples of the {boot['n_units']} {boot['unit']}s, seed {boot['seed']}): "
        f"MAE {mae_low:.2f} to {mae_high:.2f}, bias {bias_low:.2f} to {bias_high:.2f} months"
    )


def band_table(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """MAE, bias and interval coverage by age band: the table ``evaluate`` prints and
    ``report.md`` holds.

    Parameters
    ----------
    metrics : dict
        What :func:`evaluate` wrote to ``metrics.json``.

    Returns
    -------
    header : list of str
        Column names: band, n, MAE, bias, one observed coverage per conformal level of
        the checkpoint (``"90% covered"``), note.
    rows : list of list of str
        All images first, then each band holding images; a band of fewer than
        :data:`MIN_BAND_IMAGES` images says so in its note.
    """
    levels = list(metrics["coverage"])
    header = ["age (months)", "n", "MAE", "bias"]
    header += [f"{float(level):.0%} covered" for level in levels] + ["note"]

    def row(name: str, m: dict[str, Any], coverage: dict[str, float], note: str) -> list[str]:
        shares = [f"{coverage[level]:.1%}" for level in levels]
        return [name, str(int(m["n"])), _fmt(m["mae"]), _fmt(m["bias"]), *shares, note]

    rows = [row("all", metrics["overall"], metrics["coverage"], "")]
    for name, band in metrics["by_age_band"].items():
        note = f"too few (n < {MIN_BAND_IMAGES})" if band["too_few"] else ""
        rows.append(row(name, band, band["coverage"], note))
    return header, rows


def band_interval_table(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """The bootstrap confidence intervals of MAE and bias, of all images and of each age
    band with enough of them, each band's own images (or patients) resampled: the
    second table ``evaluate`` prints and ``report.md`` holds. None where the evaluation
    made no intervals.

    Returns
    -------
    header : list of str
        Band, n, the units resampled, the MAE and bias intervals at the level used.
    rows : list of list of str
        All images first, then each band; one of fewer than :data:`MIN_BAND_IMAGES`
        images has none ("–").
    """
    boot = metrics.get("bootstrap")
    if not boot:
        return None
    level = f"{boot['level']:.0%}"
    header = ["age (months)", "n", f"{boot['unit']}s", f"MAE {level} CI", f"bias {level} CI"]

    def row(name: str, n: int, within: dict[str, Any] | None) -> list[str]:
        if within is None:
            return [name, str(n), "–", "–", "–"]
        units = str(within["n_units"])
        return [name, str(n), units, _interval(within["mae"]), _interval(within["bias"])]

    rows = [row("all", int(metrics["overall"]["n"]), boot)]
    for name, band in metrics["by_age_band"].items():
        rows.append(row(name, int(band["n"]), band.get("bootstrap")))
    return header, rows


def _interval(ends: Sequence[float]) -> str:
    return f"{ends[0]:.2f} to {ends[1]:.2f}"


def _plot(
    predicted: np.ndarray, true: np.ndarray, male: np.ndarray, folder: Path
) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, Path] = {}
    colours = np.where(male, "tab:blue", "tab:red")
    diff = predicted - true
    mean = (predicted + true) / 2

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(true, predicted, s=6, c=colours, alpha=0.6)
    top = float(max(np.max(true, initial=0), np.max(predicted, initial=0), 1.0))
    ax.plot([0, top], [0, top], "k--", lw=1)
    ax.set_xlabel("reference bone age (months)")
    ax.set_ylabel("predicted bone age (months)")
    ax.set_title("Predicted vs. reference (blue: male, red: female)")
    files["pred_vs_true"] = folder / "pred_vs_true.png"
    fig.tight_layout()
    fig.savefig(files["pred_vs_true"])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.scatter(mean, diff, s=6, c=colours, alpha=0.6)
    bias = float(np.mean(diff)) if diff.size else 0.0
    low, high = bland_altman_limits(predicted, true)  # the ones metrics.json holds
    if math.isnan(low):
        low = high = bias
    for y, style in ((bias, "-"), (low, "--"), (high, "--")):
        ax.axhline(y, color="k", ls=style, lw=1)
    ax.set_xlabel("mean of predicted and reference (months)")
    ax.set_ylabel("predicted - reference (months)")
    ax.set_title(f"Bland–Altman: bias {bias:.1f}, limits ±{(high - low) / 2:.1f} months")
    files["bland_altman"] = folder / "bland_altman.png"
    fig.tight_layout()
    fig.savefig(files["bland_altman"])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.scatter(true, diff, s=6, c=colours, alpha=0.6)
    ax.axhline(0.0, color="k", lw=1)
    for half in (6.0, 12.0):
        ax.axhline(half, color="grey", ls=":", lw=1)
        ax.axhline(-half, color="grey", ls=":", lw=1)
    ax.set_xlabel("reference bone age (months)")
    ax.set_ylabel("residual (months)")
    ax.set_title("Residual by age (dotted: ±6, ±12 months)")
    files["residual_by_age"] = folder / "residual_by_age.png"
    fig.tight_layout()
    fig.savefig(files["residual_by_age"])
    plt.close(fig)
    return files


def _fmt(value: float) -> str:
    return (
        "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"
    )


def _markdown(metrics: dict[str, Any], meta: CheckpointMeta) -> str:
    header = (
        "| group | n | MAE | RMSE | R² | bias | ±6 mo | ±12 mo |\n|---|---|---|---|---|---|---|---|"
    )

    def row(name: str, m: dict[str, float]) -> str:
        if not m.get("n"):
            return f"| {name} | 0 | – | – | – | – | – | – |"
        return (
            f"| {name} | {int(m['n'])} | {_fmt(m['mae'])} | {_fmt(m['rmse'])} | {_fmt(m['r2'])} "
            f"| {_fmt(m['bias'])} | {m['within_6']:.1%} | {m['within_12']:.1%} |"
        )

    model = metrics["model"]
    lines = [
        "# Bone-age evaluation",
        "",
        f"- model id: `{model['id']}`",
        f"- architecture: {meta.arch}, input {meta.input_size} px",
        f"- trained: {'yes' if meta.trained else 'NO (random weights)'}",
        f"- precision of the trunk: {metrics['precision']}",
        f"- training data: {meta.data or '–'}",
        f"- evaluated on: {metrics.get('data') or '–'}",
        f"- images: {metrics['overall']['n']} evaluated of {metrics['n_listed']} listed, "
        f"{metrics['n_missing']} missing"
        + (" (the metrics are of the images found only)" if metrics["n_missing"] else ""),
    ]
    if (said := gate_sentence(metrics)) is not None:
        lines.append(f"- {said}")
    lines += [
        "",
        "Errors in months.",
        "",
        header,
        row("all", metrics["overall"]),
    ]
    lines += [row(name, m) for name, m in metrics["by_sex"].items()]
    lines += [row(f"{name} mo", m) for name, m in metrics["by_age_band"].items()]
    overall = metrics["overall"]
    if not math.isnan(overall.get("loa_low", math.nan)):
        lines += [
            "",
            f"Bland–Altman 95 % limits of agreement: {overall['loa_low']:.1f} to "
            f"{overall['loa_high']:.1f} months.",
        ]
    if (sentence := bootstrap_sentence(metrics)) is not None:
        lines += ["", sentence + "."]
    lines += ["", "## Prediction intervals (split-conformal)", ""]
    if metrics["coverage"]:
        lines += ["| nominal | half-width (mo) | observed |", "|---|---|---|"]
        for level, observed in metrics["coverage"].items():
            lines.append(f"| {float(level):.0%} | {meta.quantiles[level]:.1f} | {observed:.1%} |")
    else:
        lines.append("The checkpoint holds no conformal quantiles.")
    lines += _markdown_table("## By age band", BAND_TABLE_LEGEND, *band_table(metrics))
    if (intervals := band_interval_table(metrics)) is not None:
        heading = "### Confidence intervals by age band"
        lines += _markdown_table(heading, INTERVAL_TABLE_LEGEND, *intervals)
    lines += [
        "",
        "![predicted vs. reference](pred_vs_true.png)",
        "![Bland–Altman](bland_altman.png)",
        "![residual by age](residual_by_age.png)",
        "",
    ]
    return "\n".join(lines)


def _markdown_table(
    heading: str, legend: str, columns: list[str], rows: list[list[str]]
) -> list[str]:
    """The lines of a table in ``report.md``: after a blank line, its heading, legend,
    header and rows."""
    lines = ["", heading, "", legend, "", "| " + " | ".join(columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def _finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float inside it (dicts, lists) made None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value


def _check_output_folder(folder: Path) -> None:
    """Refuse an output folder that could not be made or written into, without making it:
    the folder itself if it exists, else the nearest one above it that does, must be a
    folder a file can be created in."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write the report into {folder}: {existing} is not a folder")
    if (why := why_no_file_can_be_created_in(existing)) is not None:
        raise ValueError(
            f"cannot write the report into {folder}: no file can be created in {existing} ({why})"
        )


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def evaluate(
    checkpoint: str | Path | LoadedModel,
    items: Sequence[LabelledImage],
    output_dir: str | Path,
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 16,
    num_workers: int = 0,
    cache: bool = False,
    progress: bool = True,
    plots: bool = True,
    allow_missing: bool = False,
    bootstrap: int = BOOTSTRAP_RESAMPLES,
    data: str = "",
    gate: GateOutcome | None = None,
) -> EvaluationReport:
    """Evaluate a checkpoint and write the report.

    The model runs as the worker runs it (:class:`~models.predictor.BoneAgePredictor`'s
    inference copy: batch norms folded, channels-last, in ``precision``), so the report
    is about the numbers the service would send.

    Parameters
    ----------
    checkpoint : str or pathlib.Path or LoadedModel
        A ``.safetensors`` checkpoint or an already loaded model.
    items : sequence of LabelledImage
        Labelled images (e.g. :func:`models.data.read_rsna`). Their ``key`` goes into
        ``predictions.csv``: pass non-identifying keys. A
        :class:`~models.data.LabelledSet` says how many images its source listed and
        how many were missing; both go into the report.
    output_dir : str or pathlib.Path
        Folder for ``metrics.json``, ``report.md``, ``predictions.csv`` and the plots
        (created if needed). ``metrics.json`` is strict JSON: a figure that is not a
        number (the R² of a band of one image) is ``null`` there, NaN in ``metrics``.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    precision : str
        What the trunk runs in (``BONEAGE_PRECISION``'s values): evaluate at the
        precision the worker will run, e.g. ``"bfloat16"`` before a CPU site turns it on.
    batch_size, num_workers : int
        DataLoader settings (workers preprocess images in parallel).
    cache : bool
        Preprocess all images up front (small in-memory sets).
    progress : bool
        Show progress bars.
    plots : bool
        Write the PNG plots (needs matplotlib).
    allow_missing : bool
        Evaluate the images found when some the source listed are missing; otherwise
        that is an error (the metrics would silently be of a subset).
    bootstrap : int
        Resamples of the 95 % confidence intervals of MAE and bias
        (:func:`bootstrap_intervals`, seed :data:`BOOTSTRAP_SEED`): of patients where
        any image has a ``group``, else of images. 0: none.
    data : str
        What the images are and how they were read (``worker.datasets.load_items``'s
        description: a DICOM folder says the input size and heat-map floor it was decoded
        for), recorded as ``data`` in ``metrics.json`` and in ``report.md``, so that a
        report says which decode its figures are of.
    gate : GateOutcome, optional
        What the service's input gate did before: the images it refused left out of
        ``items`` (counted by reason), or not applied. Recorded as ``gate`` in
        ``metrics.json`` and said in ``report.md``; None where it has no say (images
        that are not DICOM).

    Returns
    -------
    EvaluationReport
        Metrics and the files written.

    Raises
    ------
    ValueError
        If there are no images, images are missing and ``allow_missing`` is False,
        ``bootstrap`` is negative, or ``output_dir`` could not be made or written into
        (found before any image is read).
    ImportError
        If the checkpoint was trained with CLAHE and OpenCV is not installed.
    """
    n_listed, n_missing = source_counts(items)
    if n_missing and not allow_missing:
        raise ValueError(
            f"{n_missing} of the {n_listed} images the labels list are missing: the metrics "
            f"would be of the other {n_listed - n_missing} only (allow_missing, "
            "--allow-missing, to evaluate those)"
        )
    if not items:
        raise ValueError("no labelled images to evaluate")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be 0 (none) or a number of resamples, got {bootstrap}")
    folder = Path(output_dir)
    _check_output_folder(folder)  # before any image is read: the files are written last
    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_checkpoint(checkpoint)
    meta = loaded.meta
    if meta.clahe:
        require_clahe()  # before any work, not on the first image
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)  # an unusable one fails before any work
    # The copy the worker runs (BoneAgePredictor), so that an evaluation shows what the
    # service would report, in a lower precision too.
    model = inference_copy(loaded.model.eval(), dev, dtype, input_size=meta.input_size)
    dataset = PreparedDataset(
        items, meta.input_size, clahe=meta.clahe, cache=cache, progress=progress
    )
    predicted = predict_ages(
        model,
        dataset,
        target_mean=meta.target_mean,
        target_sd=meta.target_sd,
        device=dev,
        precision=precision,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        desc="evaluate",
    )
    true = np.array([it.age_months for it in items], dtype=np.float64)
    male = np.array([it.male for it in items], dtype=bool)
    metrics = summarise(predicted, true, male, meta.quantiles)
    if bootstrap:
        by_patient = any(it.group for it in items)
        groups = split_groups(items) if by_patient else None
        metrics["bootstrap"] = bootstrap_intervals(predicted, true, groups, resamples=bootstrap)
        metrics["bootstrap"]["unit"] = "patient" if by_patient else "image"
        # each band's own, resampling its images (or their patients) alone, where it has
        # enough of them for an interval to mean something
        for name, sel in age_bands(true).items():
            band = metrics["by_age_band"][name]
            if band["too_few"]:
                continue
            within = bootstrap_intervals(
                predicted[sel],
                true[sel],
                None if groups is None else [groups[i] for i in np.flatnonzero(sel)],
                resamples=bootstrap,
            )
            band["bootstrap"] = {k: within[k] for k in ("mae", "bias", "n_units")}
    metrics["model"] = {"id": loaded.model_id, "arch": meta.arch, "trained": meta.trained}
    metrics["precision"] = precision_name(dtype)
    metrics["n_listed"], metrics["n_missing"] = n_listed, n_missing
    metrics["data"] = data
    if gate is not None:
        metrics["gate"] = gate.as_metrics()

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files["metrics"] = folder / "metrics.json"
    # strict JSON: an R² of one image, or of a band of one age, is null, not NaN
    text = json.dumps(_finite_or_null(metrics), indent=2, sort_keys=True, allow_nan=False)
    _write_text(files["metrics"], text)
    files["predictions"] = folder / "predictions.csv"
    with open(files["predictions"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "male", "reference_months", "predicted_months"])
        for it, p in zip(items, predicted, strict=True):
            writer.writerow([it.key, int(it.male), f"{it.age_months:.2f}", f"{p:.2f}"])
    if plots:
        files.update(_plot(predicted, true, male, folder))
    files["report"] = folder / "report.md"
    _write_text(files["report"], _markdown(metrics, meta))
    overall = metrics["overall"]
    logger.info(
        "evaluated %d images: MAE %.2f, RMSE %.2f months, R² %.3f",
        overall["n"],
        overall["mae"],
        overall["rmse"],
        overall["r2"],
    )
    return EvaluationReport(metrics=metrics, files=files)
