"""`hub:` style metrics (pipeline.core.hubclassifier): a sequence classifier's probability of a
label. Offline: a tiny BERT classifier with a hand-made vocabulary is built in a fixture and
scored as a local folder; the hub path is checked up to the point where it would need the network."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.core import hubclassifier, tone
from pipeline.core.config import StyleCriterion, ToneConfig, parse_config
from pipeline.core.errors import ConfigError, TonetuneError

WORDS = ("the a you we it is was please kindly regards dear sir madam hey yo cool thanks lol sure "
         "cat sat on mat").split()
FORMAL = "Dear sir, please kindly sit on the mat. Regards."
CASUAL = "yo, cool cat lol!"
OTHER = "we sat on the mat, thanks."


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A 2-layer BERT sequence classifier (labels informal/formal) with its WordPiece vocabulary,
    saved as a plain Hugging Face folder; random weights, seeded, so the scores are fixed."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("formality")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, ".", ",", "!"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab_file=str(folder / "vocab.txt"), model_max_length=64)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.5,
                        id2label={0: "informal", 1: "formal"}, label2id={"informal": 0, "formal": 1})
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the classifier's weights are loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the metric was checked")

    monkeypatch.setattr(hubclassifier, "load", refuse)


def test_scores_are_the_labels_probabilities_in_input_order(classifier_dir):
    formal = tone.resolve_metric(f"hub:{classifier_dir}#formal")
    informal = tone.resolve_metric(f"hub:{classifier_dir}#informal")
    assert formal.column == "formal" and informal.column == "informal" and "formal" in formal.label
    long_text = " ".join([OTHER] * 200)  # ~1,400 tokens, past the model's 64 positions: truncated
    texts = [FORMAL, CASUAL, "", OTHER, long_text]
    scores = formal.scores(texts)
    assert scores.dtype == np.float64 and len(scores) == len(texts)
    assert math.isnan(scores[2])  # an empty answer has no score
    present = scores[[0, 1, 3, 4]]
    assert ((present > 0) & (present < 1)).all()
    assert len(set(np.round(present, 6))) == 4  # the texts get different scores (so order is testable)
    # the probabilities of the two labels add up to 1 (softmax over the labels)
    assert present + informal.scores([FORMAL, CASUAL, OTHER, long_text]) == pytest.approx(np.ones(4), abs=1e-6)
    # deterministic, batched = one at a time, and in input order whatever the order asked
    assert formal.scores(texts) == pytest.approx(scores, nan_ok=True, abs=0)
    assert [formal.scores([text])[0] for text in (FORMAL, CASUAL)] == pytest.approx(scores[:2], abs=1e-6)
    assert formal.scores(texts[::-1]) == pytest.approx(scores[::-1], nan_ok=True, abs=1e-6)


def test_a_tone_measured_by_a_classifier_is_reported_under_the_label(classifier_dir):
    metric = f"hub:{classifier_dir}#formal"
    spec = ToneConfig(name="formal", on_style=(StyleCriterion(metric=metric, direction="higher", threshold=0.5),))
    criteria = tone.on_style(spec).check()
    assert criteria.columns == ("formal",)
    scores = criteria.score([FORMAL, CASUAL, ""])
    assert list(scores) == ["formal"]
    assert criteria.mask(scores).tolist() == [bool(v >= 0.5) for v in scores["formal"][:2]] + [False]
    keys = tone.style_metric_keys(spec)
    assert keys == ("pct_formal", "pct_formal_ci_low", "pct_formal_ci_high", "formal_mean", "formal_median")
    assert not any("conversational" in key for key in keys)
    assert tone.user_function_files(spec) == []  # not a file of the tones/ package


@pytest.mark.parametrize(("metric", "message"), [
    ("hub:{folder}#polite", "label 'polite' is not one of the model's labels ['informal', 'formal']"),
    ("hub:s-nlp/roberta-base-formality-ranker#formal",
     "hub id s-nlp/roberta-base-formality-ranker needs a pinned revision"),
    ("hub:./models/nowhere#formal", "model folder ./models/nowhere not found"),
    ("hub:{folder}@main#formal", "is a local folder: it takes no @main"),
    ("hub:{empty}#formal", "is not a model folder (no config.json)"),
])
def test_a_bad_classifier_metric_is_one_line_before_any_model(classifier_dir, tmp_path, no_loading, metric, message):
    metric = metric.format(folder=classifier_dir, empty=tmp_path)
    with pytest.raises(TonetuneError) as error:
        tone.resolve_metric(metric)
    text = str(error.value)
    assert message in text and f"tone metric {metric!r}" in text and "\n" not in text
    with pytest.raises(TonetuneError, match="tone metric"):  # the stages' early check says the same
        tone.Criteria.build([StyleCriterion(metric=metric, threshold=0.5)]).check()


def test_a_pinned_hub_id_is_asked_for_its_config_only(no_loading):
    """Offline (HF_HUB_OFFLINE), the pinned hub id's config cannot be read: one line, no weights."""
    metric = "hub:s-nlp/roberta-base-formality-ranker@0123456789abcdef0123456789abcdef01234567#formal"
    spec = hubclassifier.check(metric)
    assert (spec.source, spec.revision, spec.label, spec.local) == (
        "s-nlp/roberta-base-formality-ranker", "0123456789abcdef0123456789abcdef01234567", "formal", False)
    assert tone.metric_column(metric) == "formal"
    with pytest.raises(TonetuneError) as error:
        tone.resolve_metric(metric)
    assert "cannot read the config of s-nlp/roberta-base-formality-ranker@0123" in str(error.value)
    assert "\n" not in str(error.value)


def test_the_params_accept_the_syntax_and_refuse_what_is_not():
    metric = "hub:s-nlp/roberta-base-formality-ranker@abc123#formal"
    config = parse_config({"tone": {"name": "formal", "on_style": [{"metric": metric, "threshold": 0.5}]}})
    assert config.tone.on_style[0].metric == metric
    with pytest.raises(ConfigError, match=r"tone.on_style.0.*'hub:some/model'.*hub:<hub id>@<revision>#<label>"):
        parse_config({"tone": {"on_style": [{"metric": "hub:some/model", "threshold": 0.5}]}})
    two = [{"metric": "hub:a/b@1#formal", "threshold": 0.5}, {"metric": "hub:c/d@2#formal", "threshold": 0.5}]
    with pytest.raises(ConfigError, match="would both be reported as column 'formal'"):
        parse_config({"tone": {"on_style": two}})


@pytest.mark.parametrize(("label", "column"), [("formal", "formal"), ("LABEL_1", "label_1"),
                                               ("Very Formal!", "very_formal"), ("1", "label_1")])
def test_the_column_is_the_label_made_readable(label, column):
    assert tone.metric_column(f"hub:a/b@c#{label}") == column
