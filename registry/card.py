"""The model card: the text a registered version carries as its description.

Owns: `model_card(name, version, tags)`, built only from the version's tags (so it can be
rebuilt from the registry alone), including, for a forced promotion, which guards were
overridden, why each refused, and the reason given. Does not own: which tags exist
(registry/evidence.py writes them, pipeline.core.contracts.Tags names them) or writing the
description (registry/store.py / registry/promote.py). Pure text: no MLflow import.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.contracts import Tags
from registry.evidence import MAX_TAG_CHARS, redact
from registry.policy import DEFAULT_TONE, as_float, tone_of

PRODUCTION = "production"
METRIC_ROWS = (  # (label, metric key, digits) of the default tone
    ("% conversational", "pct_conversational", 1),
    ("similarity to reference", "similarity_mean", 3),
    ("similarity to the factual answer", "content_similarity_mean", 3),
    ("mean Flesch", "flesch_mean", 1),
    ("mean words per answer", "answer_words_mean", 0),
    ("% answers that ended their turn", "stopped_pct", 1),
    ("repeated 4-gram rate", "repetition_rate", 3),
)
STYLE_LABELS = {"flesch": "mean Flesch", "fk_grade": "mean Flesch-Kincaid grade", "words": "mean words"}


def metric_rows(tags: dict[str, str]) -> tuple[tuple[str, str, int], ...]:
    """The card's metric rows for the version's tone: % on-style under its own name, then the mean
    of each style metric the version carries (`metric.<column>_median` marks one)."""
    tone = tone_of(tags)
    columns = [key.removeprefix(Tags.METRIC_PREFIX).removesuffix("_median") for key in tags
               if key.startswith(Tags.METRIC_PREFIX) and key.endswith("_median")]
    style = tuple((STYLE_LABELS.get(column, f"mean {column}"), f"{column}_mean", 1) for column in sorted(columns))
    rows = (METRIC_ROWS[0:1] if tone == DEFAULT_TONE else ((f"% {tone.replace('_', ' ')}", f"pct_{tone}", 1),))
    return (*rows, *METRIC_ROWS[1:3], *(style or METRIC_ROWS[3:4]), *METRIC_ROWS[4:])


def fmt(value: Any, digits: int) -> str:
    """A number for the card ('-' when missing)."""
    number = as_float(value)
    return "-" if number != number else f"{number:.{digits}f}"


def fmt_tag(tags: dict[str, str], key: str, digits: int) -> str:
    """A numeric tag rounded ('-' when absent)."""
    return fmt(tags.get(key), digits)


CHECK_LABELS = (  # (tag name, label, unit, digits)
    ("style_gain", "style gain", " points", 1),
    ("content_non_inferiority", "content", "", 3),
    ("repetition", "repetition", "", 3),
    ("ended_turn", "ended turn", "%", 1),
)


def decision_lines(tags: dict) -> list[str]:
    """The test-set decision recorded on a version (or a run): each check with its bound and limit."""
    decision = Tags.decision
    if decision("outcome") not in tags:
        return ["  decision      none on record (decided before the test-set rule)"]
    lines = [f"  decision      {tags[decision('outcome')]} by the rule declared in "
             f"{str(tags.get(decision('declared_in'), '-'))[:12]}: {tags.get(decision('rule'), '-')}",
             f"  test set      n = {tags.get(decision('n_test'), '-')} (md5 {tags.get(decision('test_md5'), '-')}), "
             f"bootstrap seed {tags.get(decision('seed'), '-')}, {tags.get(decision('bootstrap_samples'), '-')} resamples"]
    for name, label, unit, digits in CHECK_LABELS:
        if decision(f"{name}.estimate") in tags:
            lines.append(f"  {label:<13} {fmt_tag(tags, decision(f'{name}.estimate'), digits)}{unit}, one-sided bound "
                         f"{fmt_tag(tags, decision(f'{name}.bound'), digits)} (limit "
                         f"{fmt_tag(tags, decision(f'{name}.limit'), digits)}): "
                         f"{'pass' if tags.get(decision(f'{name}.passed')) == 'true' else 'not shown'}")
    if decision("beats_production.bound") in tags:
        lines.append(f"  vs Production {tags.get(decision('incumbent'), '-')}: "
                     f"{fmt_tag(tags, decision('beats_production.estimate'), 1)} points, exact McNemar p = "
                     f"{fmt_tag(tags, decision('beats_production.bound'), 4)}")
    lines.append(f"  power         content {fmt_tag(tags, decision('power.content_power'), 2)}, style "
                 f"{fmt_tag(tags, decision('power.style_power'), 2)} (at the validation SDs)")
    lines.append(f"  machine       {tags.get(decision('machine.cpu'), '-')}, torch {tags.get(decision('machine.torch'), '-')}, "
                 f"{tags.get(decision('machine.torch_threads'), '-')} threads, ONEDNN_MAX_CPU_ISA="
                 f"{tags.get(decision('machine.ONEDNN_MAX_CPU_ISA')) or '-'}, ATEN_CPU_CAPABILITY="
                 f"{tags.get(decision('machine.ATEN_CPU_CAPABILITY')) or '-'}")
    return lines


def forced_section(tags: dict[str, str]) -> str:
    """What a forced promotion overrode, and why ('' when it was not forced)."""
    if tags.get(Tags.PROMOTE_FORCED) != "true":
        return ""
    overridden = tags.get(Tags.PROMOTE_OVERRIDDEN) or "none"
    details = [line for line in (tags.get(Tags.PROMOTE_OVERRIDES) or "").splitlines() if line and line != "none"]
    listed = "\n".join(f"- {line}" for line in details) or "- (no guard refused it: forced without need)"
    return (f"\n**FORCED promotion** ({tags.get(Tags.PROMOTE_AT, '-')}): the policy would not have promoted "
            f"this version; overridden: {overridden}.\n{listed}\n\nReason given: "
            f"{tags.get(Tags.PROMOTE_FORCE_REASON) or '-'}\n")


def prompt_line(tags: dict[str, str]) -> str:
    """The prompt files the adapter was trained with: name, version (sha256 of the file, 12 hex)
    and Prompt Registry URI, from the training run's tags; a version registered before prompts
    were files has none."""
    names = sorted(key.removeprefix("prompt.").removesuffix(".version") for key in tags
                   if key.startswith("prompt.") and key.endswith(".version"))
    if not names:
        return "not recorded (trained before prompts were versioned files: the paper's texts)"
    listed = [f"`{n}` {tags[f'prompt.{n}.version']}" + (f" ({tags[f'prompt.{n}.uri']})" if tags.get(f"prompt.{n}.uri") else "")
              for n in names]
    return f"{', '.join(listed)}; from `{tags.get('tone.prompts', '-')}`."


def model_card(name: str, version: str, tags: dict[str, str]) -> str:
    """The version description: what it is, its data, its metrics vs the base, how to load it,
    and (when forced) what the promotion overrode and why."""
    datasets = sorted({parsed[0] for key in tags if (parsed := Tags.parse_dataset(key)) and parsed[1] == "dvc_md5"})
    data_lines = [f"- {tags.get(Tags.dataset(d, 'path'), d)}: DVC md5 `{tags[Tags.dataset(d, 'dvc_md5')]}`" for d in datasets]
    quality = {"true": "passed", "false": "FAILED"}.get(tags.get(Tags.DQ_SUCCESS, ""), "unknown")
    mine, base, param = Tags.METRIC_PREFIX, Tags.BASE_PREFIX, Tags.PARAM_PREFIX
    table = "\n".join(f"| {label} | {fmt(tags.get(mine + key), d)} | {fmt(tags.get(base + key), d)} |"
                      for label, key, d in metric_rows(tags))
    tone = tone_of(tags)
    key = f"pct_{tone}"
    interval = f"[{fmt(tags.get(mine + key + '_ci_low'), 1)}, {fmt(tags.get(mine + key + '_ci_high'), 1)}]"
    on_style = tags.get("tone.on_style") or f"Flesch >= {tags.get('evaluate.conversational_threshold')}"
    described = (f"in {tags['tone.description']}" if tags.get("tone.description")
                 else "in a natural, conversational tone for voice agents")
    card = f"""# {name} v{version}: {tone.replace('_', ' ')} LoRA adapter for {tags.get(param + 'base_model_id', 'the base model')}

**What it is.** A LoRA adapter (precision {tags.get(param + 'precision')}, r={tags.get(param + 'lora_r')}, \
alpha={tags.get(param + 'lora_alpha')}, learning rate {tags.get(param + 'learning_rate')}) fine-tuned on \
{tags.get(param + 'n_train')} LLM-simulated question/answer pairs {described} \
(tonetune's reproduction of "Fine-tuning on simulated data outperforms prompting for agent tone of \
voice"). It answers with the concise system prompt it was trained with. The base model is referenced, not \
copied (weights sha256 `{str(tags.get(param + 'base_model_sha256', '-'))[:16]}...`).
{forced_section(tags)}
**Data.**
{chr(10).join(data_lines) or '- (no dataset tags on the training run)'}
- pairs.parquet md5 `{tags.get(Tags.DQ_PAIRS_MD5, '-')}`, data-quality gate: {quality} \
({tags.get(Tags.DQ_SOURCE, '-')}); generation run `{tags.get(Tags.GENERATION_RUN_ID, '-')}`

**Prompts.** {prompt_line(tags)}

**Decision on the held-out test set** (paired by question against the base; docs/evaluation.md
explains how to read it):

{chr(10).join('- ' + line.strip() for line in decision_lines(tags))}

**Metrics vs the base model** (validation set, n = {fmt(tags.get(mine + 'n_eval'), 0)}; {tone.replace('_', ' ')} = \
{on_style}; 95% bootstrap interval {interval}; the base \
answers with the paper's verbose prompt; the last two rows are degeneration: answers that ran to the \
token cap, and loops):

| metric | this version | base |
|---|---|---|
{table}

**How to load.**

    import mlflow
    model = mlflow.pyfunc.load_model("models:/{name}@{PRODUCTION}")  # or "models:/{name}/{version}"
    model.predict(["Why is the sky blue?"])

Needs the tonetune package importable and the base model at its recorded path (or
TONETUNE_BASE_MODEL_DIR pointing at a copy with the same weights).

**Lineage.** Training run `{tags.get(Tags.TRAINING_RUN_ID)}` ({tags.get(Tags.TRAINING_RUN_NAME)}), code \
`{tags.get(Tags.GIT_COMMIT, '-')}`, dvc.lock digest `{tags.get(Tags.DVC_LOCK_MD5, '-')}`. Audit it with \
`python -m registry lineage models:/{name}/{version}`.

**Promotion rule.** {tags.get(Tags.PROMOTE_POLICY)}.
"""
    return redact(card)[:MAX_TAG_CHARS]
