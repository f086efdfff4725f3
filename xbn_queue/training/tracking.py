"""Run logging: a local ``metrics.jsonl`` always, Weights & Biases when asked, and a PNG of the history.

``RunLogger(output_dir, config, project, mode, enabled, name)`` appends one JSON object per ``.log`` call
to ``output_dir/metrics.jsonl`` (flushed at once, so a killed run keeps every line it logged) and, with
``mode="online"`` or ``"offline"``, forwards the same values to ``wandb`` with the same ``step``. Tensors
and NumPy scalars are turned into Python numbers (a non-finite float is written as ``NaN`` / ``Infinity``,
which Python's ``json`` reads back). On non-main ranks pass ``enabled=False``: every method
is then a no-op and no file is touched::

    logger = RunLogger(out, config_to_dict(cfg), project=cfg.wandb_project, mode=cfg.wandb_mode,
                       enabled=ctx.is_main, resume_step=start_step if resumed else None)
    logger.log({"epoch": epoch, "recall@1": r1, "loss": loss}, step=step)
    logger.finish()
    plot_history(out / "metrics.jsonl", out / "recall.png", panels=[("recall@1",), ("drift_mean", "drift_max")])

A fresh run (``resume_step=None``) starts a new ``metrics.jsonl``; a resumed run passes the step of the
checkpoint it continues from, which keeps the records up to that step and drops the ones a killed run
wrote after its last checkpoint, so a resumed history equals an uninterrupted one. The W&B run id is
kept in ``output_dir/wandb-run-id.txt`` so that a resumed run continues the same W&B run.

A trainer also passes ``report=WandbReport(...)`` (:class:`WandbReport`): the W&B run then carries the
``job_type`` (the method), the ``group`` (``config["wandb_group"]``: ``compare`` / ``sweep`` set the series)
and the tags ``method=``, ``seed=``, ``dataset=`` plus ``config["wandb_tags"]`` (a sweep's varied values);
its summary holds the best and the last evaluation (:func:`score_summary`: ``best/recall@1``,
``best/map@r``, ``best/epoch``, ``last/...``), updated at every evaluation; and with
``config["wandb_log_model"]`` the run's checkpoint is logged at the end as a W&B artifact of type
``"model"`` (:meth:`RunLogger.finish`).

``wandb`` is imported only when a W&B mode is requested (``pip install "xbn-queue[wandb]"``);
``plot_history`` needs matplotlib (``pip install "xbn-queue[train]"``) and never touches pyplot's global
state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from xbn_queue.training._optional import require

__all__ = ["RunLogger", "WandbReport", "score_summary", "wandb_tag", "check_wandb_options", "plot_history", "plot_compare",
           "curve_stats", "read_metrics", "to_plain", "kalman_gain_record"]

PathLike = Union[str, "os.PathLike[str]"]
WANDB_MODES = ("online", "offline", "disabled")
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb-run-id.txt"
#: W&B's longest tag.
WANDB_TAG_MAX = 64


def _version(text: str) -> tuple[int, ...]:
    """``"0.19.10rc1"`` -> ``(0, 19, 10)``."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    return tuple(int(g or 0) for g in match.groups()) if match else (0, 0, 0)


def to_plain(value: Any) -> Any:
    """Convert tensors, NumPy values, paths and containers to JSON-friendly Python values.

    Args:
        value: A number, string, bool, ``None``, tensor, NumPy scalar/array, or a list/tuple/dict of them.

    Returns:
        The same value built from ``int``, ``float``, ``bool``, ``str``, ``None``, lists and dicts
        (a one-element tensor or array becomes a number, larger ones nested lists).

    Raises:
        TypeError: For anything else.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item):  # torch.Tensor, numpy scalar / ndarray
        detach = getattr(value, "detach", None)
        if callable(detach):
            value = detach().cpu()
        size = getattr(value, "numel", None)
        n = size() if callable(size) else getattr(value, "size", 1)
        if n == 1:
            return to_plain(value.item())
        return to_plain(value.tolist())
    raise TypeError(f"cannot log a value of type {type(value).__name__}: {value!r}")


def kalman_gain_record(adaptation: Any) -> dict[str, float]:
    """``{"kalman_gain": K}`` for an AXBN memory that has made a Kalman step, else ``{}``.

    ``K`` is the gain of AXBN's mean filter averaged over the dimensions (the weight the latest batch
    mean gets in the memory's target): about 0.999 with the paper's noise (``kalman_r=0.01``), where
    AXBN is XBN; ``kalman_r="sampling"`` gives less for small batches. One host read, for the
    evaluation record (not a training step).
    """
    from xbn_queue.adaptation import AXBN

    if not isinstance(adaptation, AXBN) or adaptation._t < 2:  # the first call only initialises (K = 0)
        return {}
    return {"kalman_gain": float(adaptation.mean_gain.double().mean())}


def read_metrics(path: PathLike) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file.

    Args:
        path: The file.

    Returns:
        One dict per non-empty line.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If a line is not a JSON object (naming the file and line number).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {str(path)!r} not found")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            records.append(record)
    return records


@dataclasses.dataclass(frozen=True)
class WandbReport:
    """What a trainer's W&B run reports besides its records (``RunLogger(..., report=...)``).

    Attributes:
        method: The config field that names the method (``"method"``; ``"adaptation"`` for MoCo): the
            run's W&B ``job_type``, its ``method=`` tag and the model artifact's ``method``.
        scores: The evaluation keys of the summary (:func:`score_summary`); the first one picks the best
            evaluation, as the trainer picks ``best.pt`` (its first maximum).
        model_file: The checkpoint in the run folder that ``--wandb-log-model`` logs as a model artifact.
        model_at: Which evaluation that checkpoint holds, ``"best"`` or ``"last"`` (the artifact's alias
            and the metrics in its metadata).
    """

    method: str
    scores: tuple[str, ...]
    model_file: str = "best.pt"
    model_at: str = "best"


def score_summary(records: Sequence[Mapping[str, Any]], scores: Sequence[str], x: str = "epoch") -> dict[str, Any]:
    """The W&B summary of a run's evaluations: ``best/<score>``, ``best/<x>``, ``last/<score>``, ``last/<x>``.

    The evaluations are the records with a finite number under ``scores[0]``; the best is the first one
    with the highest ``scores[0]`` (the trainers' rule for ``best.pt``), the last the final one. A score
    or ``x`` a record does not hold is left out.

    Args:
        records: The run's records (``metrics.jsonl``), in order.
        scores: The evaluation keys, the selecting one first (``("recall@1", "map@r")``).
        x: The key of the epoch.

    Returns:
        ``{"best/recall@1": ..., "best/map@r": ..., "best/epoch": ..., "last/recall@1": ..., ...}``;
        ``{}`` without an evaluation.
    """
    evals = [r for r in records if _is_number(r.get(scores[0]))]
    if not evals:
        return {}
    best = evals[0]
    for r in evals[1:]:
        if r[scores[0]] > best[scores[0]]:
            best = r
    out: dict[str, Any] = {}
    for name, r in (("best", best), ("last", evals[-1])):
        for key in (*scores, x):
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool):
                out[f"{name}/{key}"] = r[key]
    return out


def wandb_tag(name: str, value: Any) -> str:
    """A run's W&B tag for a setting: ``"method=xbn"``, ``"lr=0.001"``, ``"amp=False"`` (cut to W&B's 64 characters)."""
    return f"{name}={to_plain(value)}"[:WANDB_TAG_MAX]


def check_wandb_options(cfg: Any) -> None:
    """Refuse W&B options that cannot do what they say (before anything is written).

    Args:
        cfg: A trainer's configuration (``wandb_mode``, ``wandb_log_model``, ``wandb_tags``).

    Raises:
        UsageError: ``--wandb-log-model`` with ``--wandb-mode disabled``; an empty tag or one longer than
            W&B's 64 characters.
    """
    from xbn_queue.training.cli import UsageError

    if getattr(cfg, "wandb_log_model", False) and cfg.wandb_mode == "disabled":
        raise UsageError("--wandb-log-model: logs the checkpoint to W&B, which is off; add --wandb-mode offline or online")
    for tag in getattr(cfg, "wandb_tags", None) or ():
        if not 1 <= len(str(tag)) <= WANDB_TAG_MAX:
            raise UsageError(f"--wandb-tags {tag!r}: expected a tag of 1 to {WANDB_TAG_MAX} characters (W&B's limit)")


class RunLogger:
    """Log metrics to ``metrics.jsonl`` and optionally to Weights & Biases.

    Args:
        output_dir: Run folder; ``metrics.jsonl`` and the W&B files go there.
        config: The resolved configuration (plain types), stored with the W&B run.
        project: W&B project name (default ``"xbn-queue"``).
        mode: ``"disabled"`` (local file only), ``"offline"`` (W&B run written locally, nothing sent)
            or ``"online"``.
        enabled: False makes every method a no-op (use ``enabled=ctx.is_main`` under DDP).
        name: W&B run name.
        resume_step: ``None`` for a fresh run (an existing ``metrics.jsonl`` is replaced); for a resumed
            run, the step of the checkpoint: records with a larger ``step`` are dropped and new ones
            appended, and the previous W&B run (if its id was saved) is continued.
        filename: Name of the JSON-lines file.
        wandb_kwargs: Extra keyword arguments for ``wandb.init`` (e.g. ``entity``); they win over ``report``'s.
        report: What the W&B run reports besides the records (:class:`WandbReport`): ``job_type``
            ``config[report.method]``, ``group`` ``config["wandb_group"]``, tags ``method=``, ``seed=``,
            ``dataset=`` and ``config["wandb_tags"]``; the summary of the evaluations
            (:func:`score_summary`, from every record of the file, a resumed run's earlier ones included);
            ``report.model_file`` as a model artifact at :meth:`finish` when ``config["wandb_log_model"]``.

    Raises:
        ValueError: On an unknown ``mode``.
        ImportError: If a W&B mode is requested and ``wandb`` is not installed.
    """

    def __init__(
        self,
        output_dir: PathLike,
        config: Mapping[str, Any],
        project: Optional[str] = None,
        mode: str = "disabled",
        enabled: bool = True,
        name: Optional[str] = None,
        resume_step: Optional[int] = None,
        filename: str = METRICS_FILE,
        wandb_kwargs: Optional[Mapping[str, Any]] = None,
        report: Optional[WandbReport] = None,
    ) -> None:
        if mode not in WANDB_MODES:
            raise ValueError(f"unknown W&B mode {mode!r}; choose from {list(WANDB_MODES)}")
        self.output_dir = Path(output_dir)
        self.mode = mode
        self.enabled = enabled
        self.path = self.output_dir / filename
        self._file: Any = None
        self._run: Any = None
        self.report = report
        self._config = dict(config)
        #: The records that hold an evaluation (``report.scores[0]``), for the W&B summary.
        self._evals: list[dict[str, Any]] = []
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, Any]] = []
        if resume_step is None:
            self._file = open(self.path, "w", encoding="utf-8")
        else:
            kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step] if self.path.is_file() else []
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for record in kept:
                    f.write(json.dumps(record) + "\n")
            os.replace(tmp, self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        if mode != "disabled":
            try:
                extra = {**self._identity(), **dict(wandb_kwargs or {})}
                self._run = self._init_wandb(config, project, name, resume_step is not None, extra)
            except BaseException:
                self._file.close()
                self._file = None
                raise
        for record in kept:  # a resumed run's summary counts its earlier evaluations
            self._note_evaluation(record)

    def _identity(self) -> dict[str, Any]:
        """``group``, ``job_type`` and ``tags`` of the W&B run, from the config (``{}`` without ``report``)."""
        if self.report is None:
            return {}
        cfg = self._config
        method = cfg.get(self.report.method)
        tags = [wandb_tag(k, cfg[k]) for k in ("seed", "dataset") if cfg.get(k) is not None]
        tags = [*([wandb_tag("method", method)] if method is not None else []), *tags, *(cfg.get("wandb_tags") or [])]
        out: dict[str, Any] = {"tags": list(dict.fromkeys(str(t) for t in tags))}
        if method is not None:
            out["job_type"] = str(method)
        if cfg.get("wandb_group"):
            out["group"] = str(cfg["wandb_group"])
        return out

    def _note_evaluation(self, record: Mapping[str, Any]) -> None:
        """Keep an evaluation record and bring the W&B summary up to date."""
        if self.report is None or not _is_number(record.get(self.report.scores[0])):
            return
        self._evals.append(dict(record))
        if self._run is not None:
            self._run.summary.update(score_summary(self._evals, self.report.scores))

    @property
    def summary(self) -> dict[str, Any]:
        """The W&B summary of the evaluations so far (:func:`score_summary`; ``{}`` without ``report``)."""
        return score_summary(self._evals, self.report.scores) if self.report is not None else {}

    def _init_wandb(self, config: Mapping[str, Any], project: Optional[str], name: Optional[str],
                    resuming: bool, extra: dict[str, Any]) -> Any:
        wandb = require("wandb", f'RunLogger(mode="{self.mode}")')
        id_file = self.output_dir / WANDB_ID_FILE
        if resuming and id_file.is_file() and "id" not in extra:
            extra.setdefault("id", id_file.read_text().strip())
            extra.setdefault("resume", "allow")
        settings = extra.pop("settings", None)
        if settings is None:
            try:  # no console capture (it fights with tqdm), no system-metrics sampler
                settings = wandb.Settings(console="off", x_disable_stats=True)
            except Exception:  # older wandb spells the stats switch differently
                settings = wandb.Settings(console="off")
        # wandb >= 0.19.10 takes reinit="create_new"; older versions take a bool.
        extra.setdefault("reinit", "create_new" if _version(wandb.__version__) >= (0, 19, 10) else True)
        run = wandb.init(
            project=project or "xbn-queue",
            mode=self.mode,
            dir=str(self.output_dir),
            config=to_plain(dict(config)),
            name=name,
            settings=settings,
            **extra,
        )
        id_file.write_text(run.id + "\n")
        return run

    @property
    def wandb_run(self) -> Any:
        """The ``wandb`` run, or ``None``."""
        return self._run

    @property
    def wandb_run_dir(self) -> Optional[Path]:
        """Folder of the W&B run (``.../wandb/offline-run-*`` or ``run-*``), or ``None``."""
        return Path(self._run.dir).parent if self._run is not None else None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Append ``{"step": step, **metrics}`` to the JSON-lines file and send it to W&B.

        Args:
            metrics: Names to numbers (tensors and NumPy scalars are converted).
            step: Global step; must agree with ``metrics["step"]`` if that is present.

        Raises:
            ValueError: If ``metrics["step"]`` differs from ``step``.
            TypeError: If a value cannot be converted to JSON.
            RuntimeError: If called after :meth:`finish`.
        """
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("RunLogger.log called after finish()")
        plain = to_plain(dict(metrics))
        step = int(step)
        if "step" in plain and plain["step"] != step:
            raise ValueError(f"metrics['step']={plain['step']} differs from step={step}")
        record = {"step": step, **{k: v for k, v in plain.items() if k != "step"}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._run is not None:
            self._run.log({k: v for k, v in record.items() if k != "step"}, step=step)
        self._note_evaluation(record)

    def finish(self, failed: bool = False) -> None:
        """Close the file and finish the W&B run (idempotent).

        With ``report`` and ``config["wandb_log_model"]``, the run's ``report.model_file`` (when it exists)
        is first logged as a W&B artifact (:meth:`log_model`), unless ``failed``.

        Args:
            failed: The run ended with an error: no artifact, and W&B marks the run failed (exit code 1).
        """
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._run is not None:
            run, self._run = self._run, None
            try:
                if not failed and self.report is not None and self._config.get("wandb_log_model"):
                    self.log_model(run)
            finally:
                run.finish(exit_code=1 if failed else 0)

    def log_model(self, run: Any) -> Any:
        """Log ``report.model_file`` as a W&B artifact of type ``"model"`` (``None`` when the file does not exist).

        Its name is ``model-<run name>-<run id>`` (one collection per W&B run, a resumed run adds versions);
        its alias ``report.model_at`` (``best``); its metadata the method, the dataset, the group, the file,
        the epoch and the scores of the evaluation it holds (``{"recall@1": ..., "map@r": ...}``).
        """
        assert self.report is not None
        path = self.output_dir / self.report.model_file
        if not path.is_file():
            return None
        wandb = require("wandb", "--wandb-log-model")
        at, summary, cfg = self.report.model_at, self.summary, self._config
        metadata = {"method": cfg.get(self.report.method), "dataset": cfg.get("dataset"), "group": cfg.get("wandb_group"),
                    "file": path.name, "epoch": summary.get(f"{at}/epoch"),
                    "metrics": {k: summary[f"{at}/{k}"] for k in self.report.scores if f"{at}/{k}" in summary}}
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"model-{run.name or ''}-{run.id}").strip("-")[:128]
        artifact = wandb.Artifact(name, type="model", metadata=to_plain(metadata))
        artifact.add_file(str(path), name=path.name)
        return run.log_artifact(artifact, aliases=[at])

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.finish(failed=exc_type is not None)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_history(
    metrics_jsonl: PathLike,
    png_path: PathLike,
    panels: Sequence[Sequence[str]] = (("recall@1",), ("drift_mean", "drift_max")),
    x: str = "epoch",
    title: Optional[str] = None,
    percent: Sequence[str] = (),
) -> Path:
    """Plot metrics from a ``metrics.jsonl`` file into a PNG, one panel per tuple of keys.

    Only records that have ``x`` and a finite number for a key contribute to that key's line; keys
    that appear in no record are skipped, and a panel with none of its keys is left out. If nothing
    at all can be plotted the PNG says so (and a warning is issued).

    Args:
        metrics_jsonl: The metrics file.
        png_path: Output PNG (parent directories are created).
        panels: Key groups; each group shares one panel.
        x: Key for the horizontal axis (e.g. ``"epoch"`` or ``"step"``).
        title: Optional figure title.
        percent: Keys stored as fractions in [0, 1] that are plotted in % (``recall@1`` -> ``recall@1 (%)``),
            as every human-facing output shows them.

    Returns:
        ``png_path`` as a ``Path``.

    Raises:
        FileNotFoundError: If ``metrics_jsonl`` does not exist.
        ImportError: If matplotlib is not installed.
    """
    records = read_metrics(metrics_jsonl)
    require("matplotlib", "plot_history")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Accept a bare key ("loss") or a list of keys as shorthand for one-key panels.
    panels = [(p,) if isinstance(p, str) else tuple(p) for p in ([panels] if isinstance(panels, str) else panels)]
    series = _history_lines(records, panels, x, percent)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    n = max(len(series), 1)
    fig = Figure(figsize=(6.0, 2.8 * n), layout="constrained")
    FigureCanvasAgg(fig)
    if not series:
        wanted = ", ".join(k for keys in panels for k in keys)
        warnings.warn(f"plot_history: none of [{wanted}] (against {x!r}) found in {metrics_jsonl}", stacklevel=2)
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, f"no data for {wanted}", ha="center", va="center")
        ax.set_axis_off()
    for i, lines in enumerate(series):
        ax = fig.add_subplot(n, 1, i + 1)
        for key, xs, ys in lines:
            ax.plot(xs, ys, marker="o", markersize=3, label=key)
        _style(ax, x)
    return _save(fig, png_path, title)


def _history_lines(records: Sequence[Mapping[str, Any]], panels: Sequence[tuple[str, ...]], x: str,
                   percent: Sequence[str]) -> list[list[tuple[str, list[float], list[float]]]]:
    """The lines of :func:`plot_history`: per panel that has any, ``[(label, xs, ys), ...]`` for each of its keys
    with a finite point (``percent`` keys scaled to %)."""
    series: list[list[tuple[str, list[float], list[float]]]] = []
    for keys in panels:
        lines = []
        for key in keys:
            pts = [(r[x], r[key]) for r in records if _is_number(r.get(x)) and _is_number(r.get(key))]
            scale, label = (100.0, f"{key} (%)") if key in percent else (1.0, key)
            if pts:
                lines.append((label, [p[0] for p in pts], [scale * p[1] for p in pts]))
        if lines:
            series.append(lines)
    return series


def _style(ax: Any, xlabel: str, ylabel: Optional[str] = None) -> None:
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")


def _save(fig: Any, png_path: Path, title: Optional[str]) -> Path:
    if title:
        fig.suptitle(title)
    fig.savefig(png_path, format="png", dpi=100)
    return png_path


def curve_stats(runs: Sequence[Mapping[float, float]]) -> list[tuple[float, float, float, int]]:
    """Mean and sample standard deviation over runs at every ``x`` any run has (non-finite values ignored).

    Args:
        runs: One curve ``{x: y}`` per seed.

    Returns:
        ``[(x, mean, std, n), ...]`` sorted by ``x``; ``std`` is 0 where ``n == 1``.
    """
    xs = sorted({x for run in runs for x, y in run.items() if _is_number(x) and _is_number(y)})
    out = []
    for x in xs:
        ys = [run[x] for run in runs if x in run and _is_number(run[x])]
        mean = sum(ys) / len(ys)
        std = math.sqrt(sum((y - mean) ** 2 for y in ys) / (len(ys) - 1)) if len(ys) > 1 else 0.0
        out.append((x, mean, std, len(ys)))
    return out


def _mean_band(ax: Any, label: str, stats: Sequence[tuple[float, float, float, int]]) -> None:
    """One curve of :func:`plot_compare`: the mean line over seeds (``label (n=N)``) and, where several seeds
    have a value, the ± std band (``stats`` from :func:`curve_stats`)."""
    xs = [t[0] for t in stats]
    means = [t[1] for t in stats]
    (line,) = ax.plot(xs, means, marker="o", markersize=3, label=f"{label} (n={max(t[3] for t in stats)})")
    if any(t[3] > 1 for t in stats):
        ax.fill_between(xs, [m - t[2] for m, t in zip(means, stats)], [m + t[2] for m, t in zip(means, stats)],
                        color=line.get_color(), alpha=0.2, linewidth=0)


def plot_compare(
    panels: Sequence[tuple[str, Mapping[str, Sequence[Mapping[float, float]]]]],
    png_path: PathLike,
    xlabel: str = "epoch",
    title: Optional[str] = None,
    hlines: Optional[Mapping[str, Mapping[str, float]]] = None,
) -> Path:
    """Plot several methods' curves as mean ± std over seeds, one panel per metric.

    Each panel is ``(ylabel, {label: [curve of seed 0, curve of seed 1, ...]})`` with a curve
    ``{x: y}``. At every ``x`` the line is the mean over the seeds that have it and the band the
    sample standard deviation (no band where only one seed has a value); non-finite values are
    ignored. This is the picture of the paper's Figure 2 (k-NN accuracy per epoch with and
    without XBN) and of Recall@1 / drift per method.

    Args:
        panels: ``[(ylabel, {label: [ {x: y}, ... ]}), ...]``.
        png_path: Output PNG (parent directories are created).
        xlabel: Label of the horizontal axis.
        title: Optional figure title.
        hlines: ``{ylabel: {label: y}}``: reference values drawn as dashed horizontal lines in the
            panel of that ``ylabel`` (e.g. baselines that do not depend on the epoch).

    Returns:
        ``png_path`` as a ``Path``.

    Raises:
        ValueError: If no panel has a single finite point.
        ImportError: If matplotlib is not installed.
    """
    require("matplotlib", "plot_compare")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn = []
    for ylabel, curves in panels:
        lines = []
        for label, runs in curves.items():
            stats = curve_stats(runs)
            if stats:
                lines.append((label, stats))
        if lines:
            drawn.append((ylabel, lines))
    if not drawn:
        raise ValueError(f"plot_compare: nothing to plot for {[p[0] for p in panels]}")
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.5, 3.0 * len(drawn)), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (ylabel, lines) in enumerate(drawn):
        ax = fig.add_subplot(len(drawn), 1, i + 1)
        for label, stats in lines:
            _mean_band(ax, label, stats)
        for j, (label, y) in enumerate((hlines or {}).get(ylabel, {}).items()):
            ax.axhline(y, linestyle="--", linewidth=1, color=("grey", "black", "brown", "olive")[j % 4], label=label)
        _style(ax, xlabel, ylabel)
    return _save(fig, png_path, title)
