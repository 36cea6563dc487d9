"""Stage `report`: the paper's results, in the paper's shapes, from the per-model metrics files.

Reads metrics/eval/*.json (written by `score`, one per model; see pipeline.core.evalmetrics for
the record) and, when the OpenAI arm has run, metrics/openai/*.json, and writes:

- reports/results.md: the first table of appendix A.6 (base vs best fine-tuned % conversational
  per model family) and Table A.6 itself (model, data type, LoRA r, learning rate, training
  samples, % conversational, similarity; base rows have 0 training samples), plus the bootstrap
  interval, mean Flesch and answer length, and degeneration: % of answers that ended their turn
  and the repetition rate (share of repeated 4-grams). Below them, the decoding ablation (each
  model under plain greedy and under the policy, on the first `evaluate.ablation_limit`
  questions) when the score stage recorded one. OpenAI models show as "not run" when
  `openai.enabled` is false (or their metrics are missing).
- reports/figures/*.png in the shape of Figures 2-4: base vs fine-tuned bars (with 95% bootstrap
  intervals); % conversational vs training samples, one line per learning rate, one panel per
  precision and LoRA r; similarity vs training samples, same layout. Every line starts at the
  base model (0 training samples), as in the paper, where each condition's row 0 is the base.
- reports/plots/*.csv: the same numbers as tidy tables for `dvc plots show` (dvc.yaml `plots`).

It logs the figures, tables and results.md to one MLflow run named `report`. It works with a
single adapter (the demo) as well as the paper's 72-run grid; it does not evaluate anything.
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import (
    ALIGNMENT_METRICS_DIR,
    EVAL_METRICS_DIR,
    JUDGE_METRICS_DIR,
    OPENAI_METRICS_DIR,
    REPORTS_DIR,
    OpenAIConfig,
    load_config,
)
from pipeline.core.contracts import Tags, openai_family
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.modeling import DecodingPolicy
from pipeline.core.tone import on_style
from pipeline.core.tracking import code_version_tags, configure_mlflow

if TYPE_CHECKING:
    import pandas as pd

METRICS_DIRS = (EVAL_METRICS_DIR, OPENAI_METRICS_DIR)
RESULTS_PATH = REPORTS_DIR / "results.md"
FIGURES_DIR = REPORTS_DIR / "figures"
PLOTS_DIR = REPORTS_DIR / "plots"
FIGURE_FILES = {
    "fig2": "fig2_base_vs_finetuned.png",
    "fig3": "fig3_on_style_vs_samples.png",
    "fig4": "fig4_similarity_vs_samples.png",
}
NOT_RUN = "not run"
UNKNOWN = "unknown"
BASE_KINDS = ("base", "openai-base")
FINETUNED_KINDS = ("lora", "openai-finetuned")
PRECISION_NAMES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "int8": "int8"}


@dataclass(frozen=True)
class Style:
    """The tone's on-style rate as the report names it: its record key (pct_<tone.name>), the
    word in headers ("% conversational responses") and the rule in words."""

    key: str = "pct_conversational"
    name: str = "conversational"
    rule: str = "its Flesch reading ease is >= 60"

    @classmethod
    def of(cls, tone) -> Style:
        from pipeline.core.tone import describe_criteria, style_key

        return cls(style_key(tone), tone.name.replace("_", " "), describe_criteria(tone.on_style))

    @property
    def header(self) -> str:
        return f"% {self.name} responses"


DEFAULT_STYLE = Style()


# --------------------------------------------------------------------------- inputs


def load_records(folders: Iterable[Path] = METRICS_DIRS, style: Style = DEFAULT_STYLE) -> list[dict[str, Any]]:
    """Every model's metrics record, from all `*.json` files in `folders` (missing ones skipped)."""
    records = []
    for folder in folders:
        for path in sorted(Path(folder).glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise TonetuneError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
            missing = [key for key in ("model", "kind", style.key) if key not in record]
            if missing:
                raise TonetuneError(f"{path}: not a metrics record, missing {missing} (see pipeline/core/evalmetrics.py)")
            records.append(record)
    return records


def family_of(record: dict[str, Any]) -> str:
    """The model family a record belongs to (its base model's display name)."""
    if record.get("family"):
        return str(record["family"])
    if str(record.get("kind", "")).startswith("openai"):
        return openai_family(str(record.get("base_model") or record["model"]))
    return str(record["model"])


def not_run_openai_families(records: Sequence[dict[str, Any]], openai: OpenAIConfig) -> list[str]:
    """OpenAI families named in params but without metrics (disabled, or not evaluated yet)."""
    present = {family_of(r) for r in records if str(r.get("kind", "")).startswith("openai")}
    wanted = [openai_family(model) for model in openai.base_models]
    return [family for family in dict.fromkeys(wanted) if family not in present]


# --------------------------------------------------------------------------- tables


def _sort_key(record: dict[str, Any]) -> tuple:
    """Base first, then by precision, r, lr, training samples (the paper's row order)."""
    is_base = record.get("kind") in BASE_KINDS
    return (
        not is_base,
        str(record.get("precision") or ""),
        record.get("lora_r") or 0,
        record.get("learning_rate") or 0.0,
        record.get("n_train") or 0,
        str(record["model"]),
    )


def ordered_families(records: Sequence[dict[str, Any]]) -> list[str]:
    """Open-weights families first (what this pipeline trains), then OpenAI, each in file order."""
    open_weights = [family_of(r) for r in records if not str(r.get("kind", "")).startswith("openai")]
    closed = [family_of(r) for r in records if str(r.get("kind", "")).startswith("openai")]
    return list(dict.fromkeys(open_weights + closed))


def best_finetuned(records: Sequence[dict[str, Any]], family: str, style: Style = DEFAULT_STYLE) -> dict[str, Any] | None:
    """The family's most on-style fine-tuned model (ties: higher similarity), like Fig 2."""
    candidates = [r for r in records if family_of(r) == family and r.get("kind") in FINETUNED_KINDS]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (_num(r.get(style.key)), _num(r.get("similarity_mean"))))


def base_record(records: Sequence[dict[str, Any]], family: str) -> dict[str, Any] | None:
    """The family's base model record (the first, if several)."""
    return next((r for r in records if family_of(r) == family and r.get("kind") in BASE_KINDS), None)


def _num(value: Any) -> float:
    """A number for sorting; None -> -inf."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else -math.inf


def _float_or_none(text: str) -> float | None:
    """'0.001' -> 0.001; 'unknown' -> None."""
    try:
        return float(text)
    except ValueError:
        return None


def _fmt(value: Any, digits: int, missing: str = UNKNOWN) -> str:
    """A table cell: a rounded number, or `missing`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_lr(value: Any) -> str:
    """Learning rates as the paper writes them (0.0001, 0.001)."""
    return UNKNOWN if value is None else f"{float(value):g}" if float(value) >= 1e-4 else f"{float(value):.0e}"


def _fmt_interval(low: Any, high: Any) -> str:
    """'13.0-29.0', or '-' when the interval is unknown."""
    if low is None or high is None:
        return "-"
    return f"{_fmt(low, 1)}-{_fmt(high, 1)}"


def data_type(record: dict[str, Any]) -> str:
    """The paper's "Data type" column: bfloat16 / int8 / float32, unknown for OpenAI."""
    precision = record.get("precision")
    return PRECISION_NAMES.get(str(precision), str(precision)) if precision else UNKNOWN


def results_rows(records: Sequence[dict[str, Any]], not_run: Sequence[str], openai: OpenAIConfig,
                 style: Style = DEFAULT_STYLE, columns: Sequence[str] = ("flesch",)) -> list[dict[str, str]]:
    """Table A.6 as rows of strings, in the paper's order; not-run OpenAI models at the end."""
    rows = []
    for family in ordered_families(records):
        for record in sorted((r for r in records if family_of(r) == family), key=_sort_key):
            is_base = record.get("kind") in BASE_KINDS
            rows.append({
                "Model": family,
                "Data type": data_type(record),
                "LoRA r": "-" if is_base else _fmt(record.get("lora_r"), 0),
                "Learning rate": "-" if is_base else _fmt_lr(record.get("learning_rate")),
                "Training samples": _fmt(0 if is_base else record.get("n_train"), 0),
                style.header: _fmt(record.get(style.key), 1),
                "95% CI": _fmt_interval(record.get(f"{style.key}_ci_low"), record.get(f"{style.key}_ci_high")),
                "Similarity prediction & correct answer": _fmt(record.get("similarity_mean"), 3),
                "% ended turn": _fmt(record.get("stopped_pct"), 1, missing="-"),
                "repetition": _fmt(record.get("repetition_rate"), 3, missing="-"),
                **{mean_label(column): _fmt(record.get(f"{column}_mean"), 1) for column in columns},
                "Mean words": _fmt(record.get("answer_words_mean"), 0),
                "Run": str(record["model"]),
            })
    for family in not_run:
        for n_train in [0, *openai.n_train]:
            rows.append({
                "Model": family, "Data type": UNKNOWN, "LoRA r": UNKNOWN, "Learning rate": UNKNOWN,
                "Training samples": str(n_train), style.header: NOT_RUN, "95% CI": "-",
                "Similarity prediction & correct answer": NOT_RUN, "% ended turn": "-", "repetition": "-",
                **{mean_label(column): "-" for column in columns}, "Mean words": "-", "Run": "-",
            })
    return rows


def mean_label(column: str) -> str:
    """`Mean Flesch` for the flesch column, `Mean <column>` for another style metric."""
    return {"flesch": "Mean Flesch", "fk_grade": "Mean Flesch-Kincaid grade"}.get(column, f"Mean {column}")


def summary_rows(records: Sequence[dict[str, Any]], not_run: Sequence[str],
                 style: Style = DEFAULT_STYLE) -> list[dict[str, str]]:
    """The first table of A.6: per family, base and best fine-tuned % on-style."""
    rows = []
    for family in ordered_families(records):
        for label, record in (("base", base_record(records, family)), ("finetuned", best_finetuned(records, family, style))):
            if record is None:
                continue
            rows.append({
                "Model": f"{family} {label}",
                style.header: _fmt(record.get(style.key), 1),
                "Similarity": _fmt(record.get("similarity_mean"), 3),
                "% ended turn": _fmt(record.get("stopped_pct"), 1, missing="-"),
                "repetition": _fmt(record.get("repetition_rate"), 3, missing="-"),
                "Run": str(record["model"]),
            })
    for family in not_run:
        for label in ("base", "finetuned"):
            rows.append({"Model": f"{family} {label}", style.header: NOT_RUN, "Similarity": NOT_RUN,
                         "% ended turn": "-", "repetition": "-", "Run": "-"})
    return rows


ABLATION_COLUMNS = (  # after the tone's % on-style
    ("similarity", "similarity_mean", 3),
    ("% ended turn", "stopped_pct", 1),
    ("repetition", "repetition_rate", 3),
)


def ablation_rows(records: Sequence[dict[str, Any]], style: Style = DEFAULT_STYLE) -> list[dict[str, str]]:
    """The decoding ablation (score stage keys `ablation_greedy_*` / `ablation_policy_*`): each
    model under plain greedy and under the policy, on the same questions, side by side."""
    rows = []
    for record in sorted((r for r in records if r.get("ablation_n_eval")), key=_sort_key):
        row = {"Run": str(record["model"]), "Questions": _fmt(record.get("ablation_n_eval"), 0)}
        for label, key, digits in ((f"% {style.name}", style.key, 1), *ABLATION_COLUMNS):
            row[f"{label} greedy"] = _fmt(record.get(f"ablation_greedy_{key}"), digits, missing="-")
            row[f"{label} policy"] = _fmt(record.get(f"ablation_policy_{key}"), digits, missing="-")
        rows.append(row)
    return rows


def ablation_section(records: Sequence[dict[str, Any]], decoding: str | None, style: Style = DEFAULT_STYLE) -> str:
    """## Decoding ablation, or nothing when the score stage recorded none."""
    rows = ablation_rows(records, style)
    if not rows:
        return ""
    return (
        "\n## Decoding ablation\n\n"
        f"Every model under plain greedy decoding and under the evaluation's policy ({decoding or 'see params.yaml'}), "
        "on the same validation questions: the first `evaluate.ablation_limit` of them (a subset, to keep the demo "
        "short), so these figures differ from the tables above, which use every question. "
        "% ended turn: answers that ended their turn before the token cap; repetition: mean share of repeated "
        "word 4-grams per answer.\n\n"
        + markdown_table(rows)
    )


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    """A GitHub-flavoured markdown table; numeric-looking columns right-aligned."""
    if not rows:
        return "_no models evaluated_\n"
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if h in ("Model", "Run", "Data type") else "---:" for h in headers) + "|"]
    lines += ["| " + " | ".join(row[h] for h in headers) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def load_optional_records(folder: Path) -> list[dict[str, Any]]:
    """The optional stages' per-model records (`<model>.json`, the model named by the file); none
    when the folder is absent or holds only its summary."""
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise TonetuneError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        records.append({"model": path.stem, **record})
    return records


def judge_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per judged model: G-Eval means with their spread over repeats, pairwise counts."""
    rows = []
    for record in sorted(records, key=lambda r: str(r.get("model"))):
        rows.append({
            "Model": str(record.get("model")),
            "Accuracy (1-5)": f"{_fmt(record.get('accuracy_mean'), 2)} ± {_fmt(record.get('accuracy_repeat_std'), 2)}",
            "Completeness (1-5)": f"{_fmt(record.get('completeness_mean'), 2)} ± {_fmt(record.get('completeness_repeat_std'), 2)}",
            "Wins/ties/losses vs base": "/".join(_fmt(record.get(f"pairwise_{k}"), 0, "-") for k in ("wins", "ties", "losses")),
            "Position-inconsistent": _fmt(record.get("pairwise_inconsistent"), 0, "-"),
        })
    return rows


def alignment_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per model on the multiple-choice benchmark: accuracy and the tax vs the base."""
    return [{"Model": str(r.get("model")), "Accuracy": _fmt(r.get("accuracy"), 3), "Tax vs base": _fmt(r.get("tax"), 3, "-")}
            for r in sorted(records, key=lambda r: str(r.get("model")))]


def optional_sections(judge: Sequence[dict[str, Any]], alignment: Sequence[dict[str, Any]]) -> str:
    """The LLM judge and alignment-tax tables, or "not run" while those stages are off."""
    judged = markdown_table(judge_rows(judge)) if judge else f"{NOT_RUN} (`judge.enabled` is false or no model was judged).\n"
    aligned = (markdown_table(alignment_rows(alignment)) if alignment
               else f"{NOT_RUN} (`alignment.enabled` is false; it needs the Hugging Face hub).\n")
    return ("\n## LLM judge (G-Eval accuracy and completeness, mean ± spread over repeats; pairwise vs base in both orders)\n\n"
            + judged + "\n## Alignment tax (multiple choice by log-likelihood)\n\n" + aligned)


def render_results(
    records: Sequence[dict[str, Any]], not_run: Sequence[str], openai: OpenAIConfig, threshold: float | None = None,
    decoding: str | None = None, judge: Sequence[dict[str, Any]] = (), alignment: Sequence[dict[str, Any]] = (),
    style: Style | None = None, columns: Sequence[str] = ("flesch",),
) -> str:
    """The whole of reports/results.md (`threshold`: the paper's rule, Flesch >= it; `style`: a tone's)."""
    if style is None:
        style = Style(rule=f"its Flesch reading ease is >= {60 if threshold is None else threshold:g}")
    evaluated = sorted({r.get("n_eval") for r in records if r.get("n_eval")})
    figures = "\n".join(f"![{key}](figures/{name})" for key, name in FIGURE_FILES.items())
    return (
        "# Results (shape of the paper's appendix A.6)\n\n"
        f"Generated by `dvc repro report` from `metrics/eval/*.json`. A response is {style.name} when "
        f"{style.rule}. Base models answer with the paper's verbose system prompt, "
        "fine-tuned models with the concise one (appendix A.5). Similarity: mean cosine between the embeddings "
        f"of the answer and the reference answer. Validation questions per model: {', '.join(map(str, evaluated)) or '-'}. "
        f"95% CI: percentile bootstrap of % {style.name}. "
        f"Decoding, the same for every model: {decoding or 'see params.yaml evaluate.decoding'}. "
        "% ended turn: answers that ended their turn before the token cap (the rest ran to it); repetition: "
        "mean share of repeated word 4-grams per answer (a looping answer scores near 1).\n\n"
        "## Base vs best fine-tuned model\n\n"
        + markdown_table(summary_rows(records, not_run, style))
        + "\n## All models\n\n"
        + markdown_table(results_rows(records, not_run, openai, style, columns))
        + (f"\nOpenAI models marked {NOT_RUN!r}: `openai.enabled` is false or their metrics are missing.\n" if not_run else "")
        + ablation_section(records, decoding, style)
        + optional_sections(judge, alignment)
        + "\n## Figures\n\n"
        + figures
        + "\n"
    )


# --------------------------------------------------------------------------- plot data


def lora_points(records: Sequence[dict[str, Any]], style: Style = DEFAULT_STYLE) -> pd.DataFrame:
    """Tidy rows for Figs 3-4: one per (precision, r, lr, n_train), each line starting at the
    base model (n_train 0) of its family."""
    import pandas as pd

    rows = []
    for record in records:
        if record.get("kind") != "lora":
            continue
        rows.append({
            "family": family_of(record), "precision": str(record.get("precision") or UNKNOWN),
            "lora_r": record.get("lora_r"), "learning_rate": record.get("learning_rate"),
            "n_train": record.get("n_train"), style.key: record.get(style.key),
            "similarity": record.get("similarity_mean"), "model": record["model"],
        })
    frame = pd.DataFrame(rows, columns=["family", "precision", "lora_r", "learning_rate", "n_train",
                                        style.key, "similarity", "model"])
    frame = frame.dropna(subset=["n_train"])  # no x position without a training-set size
    if frame.empty:
        return frame.assign(panel=[], series=[])
    starts = []
    for (family, precision, r, lr), _ in frame.groupby(["family", "precision", "lora_r", "learning_rate"], dropna=False):
        base = base_record(records, family)
        if base is not None:
            starts.append({"family": family, "precision": precision, "lora_r": r, "learning_rate": lr, "n_train": 0,
                           style.key: base.get(style.key),
                           "similarity": base.get("similarity_mean"), "model": base["model"]})
    frame = pd.concat([pd.DataFrame(starts, columns=frame.columns), frame], ignore_index=True)
    frame["panel"] = frame["precision"].map(lambda p: PRECISION_NAMES.get(p, p)) + ", r=" + frame["lora_r"].map(
        lambda r: _fmt(r, 0)
    )
    frame["series"] = frame["learning_rate"].map(_fmt_lr)
    return frame.sort_values(["family", "precision", "lora_r", "learning_rate", "n_train"], kind="stable").reset_index(drop=True)


def bar_points(records: Sequence[dict[str, Any]], not_run: Sequence[str], style: Style = DEFAULT_STYLE) -> pd.DataFrame:
    """Fig 2's bars: per family, base and best fine-tuned (NaN for not-run families)."""
    import pandas as pd

    rows = []
    for family in [*ordered_families(records), *not_run]:
        for label, record in (("base", base_record(records, family)), ("fine-tuned", best_finetuned(records, family, style))):
            rows.append({
                "model": f"{family} {label}", "family": family, "variant": label,
                style.key: record.get(style.key) if record else math.nan,
                "ci_low": record.get(f"{style.key}_ci_low") if record else math.nan,
                "ci_high": record.get(f"{style.key}_ci_high") if record else math.nan,
                "run": record["model"] if record else NOT_RUN,
            })
    return pd.DataFrame(rows)


def write_plot_data(lines: pd.DataFrame, bars: pd.DataFrame, folder: Path = PLOTS_DIR,
                    style: Style = DEFAULT_STYLE) -> list[Path]:
    """CSV files behind `dvc plots show` (x/y columns named as in dvc.yaml's `plots` for the
    default tone; another tone's on-style column is its own pct_<name>)."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = ["panel", "series", "n_train"]
    paths = {
        "on_style_vs_samples.csv": lines[[*columns, style.key, "model"]],
        "similarity_vs_samples.csv": lines[[*columns, "similarity", "model"]],
        "base_vs_finetuned.csv": bars.dropna(subset=[style.key])[["model", style.key, "run"]],
    }
    written = []
    for name, frame in paths.items():
        path = folder / name
        frame.to_csv(path, index=False)
        written.append(path)
    return written


# --------------------------------------------------------------------------- figures


def _pyplot():
    """matplotlib with a file-only backend (no display on CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_base_vs_finetuned(bars: pd.DataFrame, threshold: float | None, path: Path,
                             style: Style = DEFAULT_STYLE) -> Path:
    """Fig 2: % on-style responses, base vs best fine-tuned, per model family."""
    import numpy as np

    plt = _pyplot()
    families = list(dict.fromkeys(bars["family"]))
    figure, axes = plt.subplots(figsize=(max(6.0, 2.8 * len(families) + 1.5), 5.0))
    width = 0.38
    colours = {"base": "#9aa5b1", "fine-tuned": "#2f6fb0"}
    for offset, variant in ((-width / 2, "base"), (width / 2, "fine-tuned")):
        part = bars[bars["variant"] == variant].set_index("family").reindex(families)
        x = np.arange(len(families)) + offset
        values = part[style.key].to_numpy(dtype=float)
        errors = np.vstack([values - part["ci_low"].to_numpy(dtype=float), part["ci_high"].to_numpy(dtype=float) - values])
        axes.bar(x, np.nan_to_num(values), width, color=colours[variant], label=variant,
                 yerr=np.where(np.isfinite(errors), errors, 0), capsize=4, error_kw={"elinewidth": 1})
        tops = np.fmax(values, part["ci_high"].to_numpy(dtype=float))  # label above the error bar
        for xi, value, top in zip(x, values, tops, strict=True):
            label = f"{value:.1f}" if np.isfinite(value) else NOT_RUN
            axes.text(xi, (top if np.isfinite(top) else 0) + 1.5, label, ha="center", va="bottom", fontsize=9,
                      rotation=0 if np.isfinite(value) else 90, color="black" if np.isfinite(value) else "#777777")
    best_runs = bars[bars["variant"] == "fine-tuned"].set_index("family").reindex(families)["run"]
    axes.set_xticks(np.arange(len(families)), [
        family if run == NOT_RUN else f"{family}\nfine-tuned: " + "\n".join(textwrap.wrap(str(run), 26))
        for family, run in zip(families, best_runs, strict=True)
    ], fontsize=8.5)
    axes.set_ylim(0, 115)
    axes.set_ylabel(f"{style.header} ({style.rule.removeprefix('its ')})" if threshold is None
                    else f"{style.header} (Flesch >= {threshold:g})")
    axes.set_title("Base model (verbose prompt) vs fine-tuned (concise prompt)")
    axes.legend(loc="upper left", frameon=False, ncols=2)
    axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    return _save(figure, path)


def figure_vs_samples(lines: pd.DataFrame, column: str, ylabel: str, title: str, path: Path,
                      ylim: tuple[float, float] | None = None) -> Path:
    """Figs 3-4: `column` vs training samples; a panel per (precision, r), a line per lr.

    x positions are the distinct sample counts, evenly spaced (0 has no place on a log axis,
    and 100/1000/5000/9000 would crowd on a linear one)."""
    plt = _pyplot()
    panels = list(dict.fromkeys(lines["panel"])) or ["no adapters evaluated"]
    precisions = list(dict.fromkeys(p.split(",")[0] for p in panels))
    ranks = list(dict.fromkeys(p.split(", ")[-1] for p in panels))
    figure, grid = plt.subplots(len(precisions), len(ranks), figsize=(max(3.6 * len(ranks) + 1.8, 7.5), 3.0 * len(precisions) + 1.0),
                                sharex=True, sharey=True, squeeze=False)
    counts = sorted(int(n) for n in lines["n_train"].dropna().unique()) or [0]
    position = {n: i for i, n in enumerate(counts)}
    series_names = sorted(dict.fromkeys(lines["series"]), key=lambda s: _num(_float_or_none(s.split()[-1])))
    colours = dict(zip(series_names, plt.get_cmap("tab10").colors, strict=False))
    for row, precision in enumerate(precisions):
        for col, rank in enumerate(ranks):
            axes = grid[row][col]
            panel = f"{precision}, {rank}"
            axes.set_title(panel, fontsize=10)
            part = lines[lines["panel"] == panel]
            if part.empty:
                axes.text(0.5, 0.5, "not in grid", transform=axes.transAxes, ha="center", color="#777777")
            for series, points in part.groupby("series", sort=False):
                points = points.sort_values("n_train")
                axes.plot([position[int(n)] for n in points["n_train"]], points[column], marker="o",
                          color=colours[series], label=series)
            axes.grid(alpha=0.3)
            axes.spines[["top", "right"]].set_visible(False)
            if row == len(precisions) - 1:
                axes.set_xlabel("training samples")
            if col == 0:
                axes.set_ylabel(ylabel)
    grid[0][0].set_xticks(range(len(counts)), [str(n) for n in counts])
    grid[0][0].set_xlim(-0.3, len(counts) - 0.7)
    if ylim:
        grid[0][0].set_ylim(*ylim)
    handles, labels = grid[0][0].get_legend_handles_labels()
    for axes in grid.flat[1:]:
        for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        figure.legend(handles, labels, loc="center right", frameon=False, title="learning rate", fontsize=9)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 0.84 if handles else 1, 1))
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    """Write a PNG (150 dpi) and release the figure's memory."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return path


def similarity_limits(lines: pd.DataFrame) -> tuple[float, float] | None:
    """A y-range that shows small differences but never exaggerates them (at least 0.2 wide)."""
    values = lines["similarity"].dropna()
    if values.empty:
        return None
    low, high = float(values.min()), float(values.max())
    middle, half = (low + high) / 2, max((high - low) / 2 + 0.03, 0.1)
    return max(0.0, middle - half), min(1.0, middle + half)


def make_figures(lines: pd.DataFrame, bars: pd.DataFrame, threshold: float | None, folder: Path = FIGURES_DIR,
                 style: Style = DEFAULT_STYLE) -> list[Path]:
    """Figures 2-4 as PNGs in `folder` (`threshold`: the paper's Flesch rule; None: the style's rule)."""
    rule = f"Flesch >= {threshold:g}" if threshold is not None else style.rule.removeprefix("its ")
    return [
        figure_base_vs_finetuned(bars, threshold, folder / FIGURE_FILES["fig2"], style),
        figure_vs_samples(lines, style.key, style.header,
                          f"{style.header} ({rule}) vs training samples",
                          folder / FIGURE_FILES["fig3"], ylim=(0, 105)),
        figure_vs_samples(lines, "similarity", "similarity (answer, reference)",
                          "Similarity of prediction and correct answer vs training samples",
                          folder / FIGURE_FILES["fig4"], ylim=similarity_limits(lines)),
    ]


# --------------------------------------------------------------------------- MLflow and wiring


def log_report(paths: Sequence[Path], records: Sequence[dict[str, Any]], tracking, style: Style = DEFAULT_STYLE) -> str:
    """One MLflow run `report` with results.md, the figures and the plot data; returns its id."""
    import mlflow

    configure_mlflow(tracking)
    with mlflow.start_run(run_name="report") as run:
        mlflow.set_tags({Tags.STAGE: "report", **code_version_tags()})
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path="report" if path.suffix != ".png" else "report/figures")
        metrics = {}
        for family in ordered_families(records):
            slug = "".join(c if c.isalnum() else "_" for c in family)
            for label, record in (("base", base_record(records, family)), ("best", best_finetuned(records, family, style))):
                if record and isinstance(record.get(style.key), int | float):
                    metrics[f"{slug}.{label}_{style.key}"] = float(record[style.key])
        mlflow.log_metrics(metrics)
        mlflow.log_metric("n_models", len(records))
        return run.info.run_id


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.report",
        description=f"Stage report: {RESULTS_PATH} (Table A.6 shape), {FIGURES_DIR}/*.png (Figs 2-4 shape) "
        f"and {PLOTS_DIR}/*.csv (dvc plots) from metrics/eval/*.json.",
    )
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config()
    style = Style.of(config.tone)
    records = load_records(style=style)
    if not records:
        raise TonetuneError(f"no metrics in {', '.join(map(str, METRICS_DIRS))} (run `dvc repro score` first)")
    not_run = not_run_openai_families(records, config.openai)
    paper_rule = (len(config.tone.on_style) == 1 and config.tone.on_style[0].metric == "flesch_reading_ease"
                  and config.tone.on_style[0].direction == "higher")
    threshold = config.tone.on_style[0].threshold if paper_rule else None  # the paper's wording when it is its rule
    if paper_rule:
        style = Style(style.key, style.name, f"its Flesch reading ease is >= {threshold:g}")
    columns = on_style(config.tone).columns
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    decoding = DecodingPolicy.for_evaluation(config.evaluate).describe()
    judge, alignment = load_optional_records(JUDGE_METRICS_DIR), load_optional_records(ALIGNMENT_METRICS_DIR)
    RESULTS_PATH.write_text(render_results(records, not_run, config.openai, threshold, decoding, judge, alignment,
                                           style=style, columns=columns))
    lines, bars = lora_points(records, style), bar_points(records, not_run, style)
    paths = [RESULTS_PATH, *write_plot_data(lines, bars, style=style), *make_figures(lines, bars, threshold, style=style)]
    run_id = None if args.no_mlflow else log_report(paths, records, config.tracking, style)
    print(f"report: {len(records)} model(s) -> {RESULTS_PATH}, {len(FIGURE_FILES)} figures in {FIGURES_DIR}"
          + (f"; MLflow run {run_id}" if run_id else ""))
    for row in summary_rows(records, not_run, style):
        print(f"report:   {row['Model']:<40} {row[style.header]:>8} % {style.name}, similarity "
              f"{row['Similarity']}, % ended turn {row['% ended turn']}, repetition {row['repetition']}")


if __name__ == "__main__":
    main()
