"""A style metric learned by a sequence classifier: `hub:<model>[@<revision>]#<label>`.

The score of an answer is the probability (0..1) the classifier gives `label`, e.g.

    metric: "hub:s-nlp/roberta-base-formality-ranker@<commit>#formal"   # a hub id, pinned
    metric: "hub:models/formality#formal"                               # a local folder

- `<model>` is a Hugging Face hub id or a local folder (a path that exists; relative to the
  working directory, the repository root under dvc). A hub id REQUIRES `@<revision>` (a commit
  sha or a tag) so that the metric cannot drift under a re-run; a local folder takes none.
- `<label>` must be one of the model's labels (its config's `id2label`); the probability is the
  softmax over the labels (a sigmoid for a one-logit or multi-label model).
- The column the scores are stored under is the label, lower-cased, with `_` for anything that
  is not a letter or digit (`formal`), so a tone that measures formality never reports
  "conversational".

The revision is part of the metric's name, which is part of params `tone.gate` / `tone.on_style`,
which dvc.yaml lists as params of every stage that scores style: pinning another revision re-runs
them (a local folder's files are not a DVC dependency: pin a hub revision for reproducible runs).

Texts are scored in batches of `BATCH_SIZE`, each truncated to the model's limit (at most
`MAX_TOKENS` tokens), on the CPU, in inference mode; the model is loaded once per process.
Every check that needs no weights (syntax, revision, folder, label) fails in one line naming the
metric before the model is loaded (`check`).

What this module does not do: download anything in tests (they build a tiny local classifier),
or combine scores into criteria (pipeline.core.tone).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import TonetuneError
from pipeline.core.metricnames import StyleMetric, metric_column

if TYPE_CHECKING:
    import numpy as np

SPEC = re.compile(r"^hub:(?P<source>[^@#\s]+)(?:@(?P<revision>[^@#\s]+))?#(?P<label>[^#]+)$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
BATCH_SIZE = 32
MAX_TOKENS = 512


@dataclass(frozen=True)
class HubSpec:
    """A parsed `hub:` metric: the model (hub id or folder), its revision, the label."""

    metric: str
    source: str
    revision: str | None
    label: str
    local: bool

    @property
    def where(self) -> str:
        return self.source if self.local else f"{self.source}@{self.revision}"


def parse(metric: str) -> HubSpec:
    """The parts of a `hub:` metric; one line naming it when the syntax, the revision or the
    folder is wrong. Touches only the file system (no import of transformers, no network)."""
    match = SPEC.match(metric)
    if not match:
        raise TonetuneError(f"tone metric {metric!r}: expected `hub:<hub id>@<revision>#<label>` or "
                            "`hub:<local folder>#<label>`")
    source, revision, label = match["source"], match["revision"], match["label"]
    if Path(source).is_dir():
        if revision is not None:
            raise TonetuneError(f"tone metric {metric!r}: {source} is a local folder: it takes no @{revision} "
                                "(pin a revision of a hub id instead)")
        return HubSpec(metric, source, None, label, local=True)
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1 or not HUB_ID.match(source)
    if looks_like_path:
        raise TonetuneError(f"tone metric {metric!r}: model folder {source} not found "
                            "(paths are relative to the repository root)")
    if revision is None:
        raise TonetuneError(f"tone metric {metric!r}: hub id {source} needs a pinned revision, "
                            f"`hub:{source}@<commit sha or tag>#{label}` (no folder {source} exists either)")
    return HubSpec(metric, source, revision, label, local=False)


def _labels_of_folder(spec: HubSpec) -> list[str]:
    config = Path(spec.source) / "config.json"
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TonetuneError(f"tone metric {spec.metric!r}: {spec.source} is not a model folder "
                            "(no config.json)") from None
    except ValueError as error:
        raise TonetuneError(f"tone metric {spec.metric!r}: {config} is not JSON: {error}") from None
    return [str(label) for label in (raw.get("id2label") or {}).values()]


def _check_label(spec: HubSpec, labels: list[str]) -> None:
    if spec.label not in labels:
        raise TonetuneError(f"tone metric {spec.metric!r}: label {spec.label!r} is not one of the model's "
                            f"labels {labels} (its config's id2label)")


def check(metric: str) -> HubSpec:
    """Everything that can be checked without the weights or the network: the syntax, the
    revision of a hub id, a local folder and its label. Returns the parsed metric."""
    spec = parse(metric)
    if spec.local:
        _check_label(spec, _labels_of_folder(spec))
    return spec


@dataclass
class Classifier:
    """A loaded tokenizer and sequence-classification model, and the index of the label scored."""

    tokenizer: Any
    model: Any
    max_tokens: int

    def probabilities(self, texts: list[str], label_index: int) -> np.ndarray:
        """P(label) of every text, in input order, in batches of BATCH_SIZE (truncated)."""
        import numpy as np
        import torch

        multi_label = self.model.config.num_labels == 1 or self.model.config.problem_type == "multi_label_classification"
        out = np.empty(len(texts), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH_SIZE):
                batch = texts[start:start + BATCH_SIZE]
                encoded = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_tokens,
                                         return_tensors="pt")
                logits = self.model(**encoded).logits.float()
                probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)
                out[start:start + len(batch)] = probs[:, label_index].numpy()
        return out


@functools.lru_cache(maxsize=4)
def load(source: str, revision: str | None) -> Classifier:
    """The tokenizer and model (eval mode, CPU), once per process per (source, revision)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    model = AutoModelForSequenceClassification.from_pretrained(source, revision=revision)
    model.eval()
    if tokenizer.pad_token is None:  # decoder-only classifiers (Llama, GPT-2) often have none
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    limits = [MAX_TOKENS, getattr(tokenizer, "model_max_length", None),
              getattr(model.config, "max_position_embeddings", None)]
    return Classifier(tokenizer, model, min(int(limit) for limit in limits if limit))


def _label_index(spec: HubSpec, classifier: Classifier) -> int:
    id2label = {int(index): str(label) for index, label in classifier.model.config.id2label.items()}
    _check_label(spec, list(id2label.values()))
    return next(index for index, label in id2label.items() if label == spec.label)


def style_metric(metric: str) -> StyleMetric:
    """The `hub:` metric as a StyleMetric: the checks first (one line, nothing loaded), then for
    a hub id its config alone (the label), then the weights, once per process."""
    spec = check(metric)
    if not spec.local:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(spec.source, revision=spec.revision)
        except (OSError, ValueError) as error:
            raise TonetuneError(f"tone metric {metric!r}: cannot read the config of {spec.where}: "
                                f"{' '.join(str(error).split())[:300]}") from None
        _check_label(spec, [str(label) for label in (config.id2label or {}).values()])
    classifier = load(spec.source, spec.revision)
    index = _label_index(spec, classifier)

    def batch(texts: list[str]) -> np.ndarray:
        return classifier.probabilities(list(texts), index)

    return StyleMetric(metric, metric_column(metric), f"P({spec.label}) by {spec.where}",
                       lambda text: float(batch([text])[0]), batch=batch)
