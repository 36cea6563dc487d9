"""The evaluation (stages `predict` + `score`) and the inference path it shares with serving
(pipeline.core.modeling): batched generation under the decoding policy, end-of-turn stopping,
adapter switching, the stages on a tiny model (predictions, metrics files, MLflow runs), and the
registered pyfunc answering exactly as the predict stage did.

The tiny models share SmolLM2's real tokenizer and chat template (conftest.tiny_llama_dir), so
stop ids are derived from the same template the demo uses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import predict, score
from pipeline.core import adapterinfo, modeling
from pipeline.core.errors import TonetuneError
from pipeline.core.modeling import DecodingPolicy

QUESTIONS = [
    "Why is the sky blue?",
    "Who wrote Hamlet, and when was it first performed in London?",
    "What is a prime number?",
    "How do bees turn the nectar they collect from flowers into honey, and why does it keep so long?",
    "Name a planet.",
]
SYSTEM_PROMPT = "You are a helpful assistant."


def copy_tokenizer(source: Path, folder: Path) -> None:
    """The tokenizer files and chat template of one model folder, into another."""
    for path in Path(source).iterdir():
        if "token" in path.name or path.suffix == ".jinja":
            shutil.copy(path, folder / path.name)


@pytest.fixture(scope="module")
def chatty_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """tiny_llama_dir's architecture and tokenizer, but untied and initialised 5x larger.

    The shared tiny model (tied, init 0.02) greedily repeats the prompt's last token ("\n")
    whatever the question, so batched and one-at-a-time answers would agree trivially; this
    one writes different text for different questions."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.tie_word_embeddings = False
    config.initializer_range = 0.1
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("chatty_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    copy_tokenizer(tiny_llama_dir, folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.padding_side = "right"  # generate_answers must pad on the left regardless
    return tok


def load_tiny(tiny_llama_dir):
    """A fresh fp32 copy of the tiny random Llama (PEFT wraps models in place)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def save_random_adapter(tiny_llama_dir, folder: Path, seed: int, r: int = 4, bias: str = "none") -> Path:
    """A LoRA adapter with random (non-zero) B matrices, so it really changes the answers; with
    `bias="lora_only"` (the paper's setting) the adapted layers' biases are random too."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False, bias=bias
    )
    model = get_peft_model(load_tiny(tiny_llama_dir), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or (name.endswith(".bias") and parameter.requires_grad):
                parameter.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [([5, 6, 2, 7, 8], ([5, 6], True)), ([5, 6, 7], ([5, 6, 7], False)), ([2], ([], True)), ([5, 0, 2], ([5], True))],
)
def test_cut_at_stop_keeps_only_tokens_before_the_first_stop(tokens, expected):
    assert modeling.cut_at_stop(tokens, [2, 0]) == expected


def test_a_looping_answer_is_counted_by_the_repetition_metric():
    from pipeline.core.textmetrics import repeated_ngram_rate

    loop = "He was also a teacher of the school of Sharia, which is the Islamic law. " * 6
    assert repeated_ngram_rate(loop) > 0.75  # 6 copies: 5 of every 6 sentences' 4-grams repeat
    assert repeated_ngram_rate("Bees turn nectar into honey by drying it and adding enzymes.") == 0.0
    assert repeated_ngram_rate("Mars.") == 0.0  # fewer than 4 words: nothing to repeat
    assert repeated_ngram_rate("a b c d a b c d") == pytest.approx(1 / 5)  # 5 4-grams, 1 repeated


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lora-int8-r32-lr0.001-n150", {"precision": "int8", "lora_r": 32, "learning_rate": 0.001, "n_train": 150}),
        ("lora-bf16-r64-lr2e-4-n9000", {"precision": "bf16", "lora_r": 64, "learning_rate": 2e-4, "n_train": 9000}),
        ("my-adapter", {"precision": None, "lora_r": None, "learning_rate": None, "n_train": None}),
    ],
)
def test_adapter_metadata_from_folder_name(tmp_path, name, expected):
    folder = tmp_path / name
    folder.mkdir()
    metadata = adapterinfo.adapter_metadata(folder)
    assert {key: metadata[key] for key in expected} == expected


def test_adapter_metadata_prefers_training_run_params_over_files(tmp_path):
    folder = tmp_path / "lora-int8-r32-lr0.001-n150"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 16}))
    from_files = adapterinfo.adapter_metadata(folder)
    assert from_files["lora_r"] == 16 and from_files["lora_alpha"] == 16  # adapter_config beats the name
    params = {"precision": "bf16", "lora_r": "48", "lora_alpha": "48", "learning_rate": "0.0002", "n_train": "100"}
    assert adapterinfo.adapter_metadata(folder, params) == {
        "precision": "bf16", "lora_r": 48, "lora_alpha": 48, "learning_rate": 0.0002, "n_train": 100
    }


def test_end_of_turn_comes_from_the_chat_template_not_only_eos(tokenizer):
    from transformers import GenerationConfig

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # A model whose generation_config and tokenizer both name <|endoftext|> as eos (the
    # Llama-3-style mismatch): the chat template still says the turn ends with <|im_end|>.
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.eos_token = "<|endoftext|>"
    ids = modeling.end_of_turn_ids(tok, GenerationConfig(eos_token_id=endoftext))
    assert ids[0] == im_end
    assert endoftext in ids


# --------------------------------------------------------------------------- generation


def test_batched_greedy_answers_equal_one_at_a_time(chatty_llama_dir, tokenizer):
    model = load_tiny(chatty_llama_dir)
    prompts = modeling.build_prompts(tokenizer, SYSTEM_PROMPT, QUESTIONS)
    stop_ids = modeling.end_of_turn_ids(tokenizer, model.generation_config)
    batched = modeling.generate_answers(model, tokenizer, prompts, stop_ids, DecodingPolicy.greedy(12), rows=3)
    single = [modeling.generate_answers(model, tokenizer, [prompt], stop_ids, DecodingPolicy.greedy(12), rows=3)
              for prompt in prompts]
    assert batched.answers == [result.answers[0] for result in single]
    assert batched.n_tokens == [result.n_tokens[0] for result in single]
    assert all(batched.answers) and len(set(batched.answers)) > 1  # real, question-dependent text
    assert all(answer == answer.strip() for answer in batched.answers)


@pytest.fixture(scope="module")
def biased_llama_dir(chatty_llama_dir, tmp_path_factory) -> Path:
    """chatty_llama_dir with biases in attention (like Qwen), so `lora_only` adapters carry biases."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(chatty_llama_dir)
    config.attention_bias = True
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("biased_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    copy_tokenizer(chatty_llama_dir, folder)
    return folder


@pytest.mark.parametrize("bias", ["none", "lora_only", "lora_only-biased-base"])
def test_adapters_switch_on_one_base_and_match_a_fresh_load(chatty_llama_dir, biased_llama_dir, tokenizer, tmp_path,
                                                            bias):
    """Every order of base and adapters gives exactly what a fresh load gives. `lora_only` (the
    paper's and the demo's setting) once crashed the evaluate stage: PEFT refuses a second
    adapter beside a biased one; on a base with biases the adapter also overwrites them."""
    tiny_llama_dir = biased_llama_dir if bias.endswith("biased-base") else chatty_llama_dir
    bias = bias.removesuffix("-biased-base")
    from peft import PeftModel

    adapter_a = save_random_adapter(tiny_llama_dir, tmp_path / "lora-bf16-r4-lr0.001-n10", seed=1, bias=bias)
    adapter_b = save_random_adapter(tiny_llama_dir, tmp_path / "lora-int8-r8-lr0.0002-n20", seed=2, r=8, bias=bias)
    prompts = modeling.build_prompts(tokenizer, SYSTEM_PROMPT, QUESTIONS[:4])
    base = load_tiny(tiny_llama_dir)
    stop_ids = modeling.end_of_turn_ids(tokenizer, base.generation_config)

    def answers(model, rows=4):
        return modeling.generate_answers(model, tokenizer, prompts, stop_ids, DecodingPolicy.greedy(10), rows).answers

    def fresh(adapter):
        return answers(PeftModel.from_pretrained(load_tiny(tiny_llama_dir), str(adapter)).eval())

    base_answers = answers(base)
    switcher = modeling.AdapterSwitcher(base, "fp32")
    specs = {"a": (adapter_a.name, adapter_a), "b": (adapter_b.name, adapter_b), "base": ("base", None)}
    seen = {}
    for key in ["a", "b", "base", "a", "b"]:
        with switcher.activate(*specs[key]) as model:
            seen.setdefault(key, []).append(answers(model))
    assert seen["a"][0] != base_answers and seen["b"][0] != seen["a"][0]
    assert seen["a"][0] == fresh(adapter_a)  # on the shared base == a fresh load
    assert seen["b"][0] == fresh(adapter_b)
    assert seen["base"][0] == base_answers  # the bare base again, biases included
    assert seen["a"][1] == seen["a"][0] and seen["b"][1] == seen["b"][0]  # reloading after a switch is exact
    assert list(switcher.peft_model.peft_config) == [switcher.adapter_key(adapter_b.name)]  # one loaded at a time


def bigram_model(tokenizer, prompt_last_token: int, chain: list[int]):
    """A 1-layer Llama whose next token depends only on the current one (attention and MLP
    outputs are zeroed, so the residual stream is the token embedding): greedy decoding after
    `prompt_last_token` follows `chain` exactly."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = 64
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for step, (current, following) in enumerate(zip([prompt_last_token, *chain], chain, strict=False)):
            model.model.embed_tokens.weight[current, step] = 1.0
            model.lm_head.weight[following, step] = 10.0
    model.generation_config.eos_token_id = config.eos_token_id
    return model


def test_generation_stops_at_the_end_of_the_assistant_turn(tokenizer):
    prompts = modeling.build_prompts(tokenizer, SYSTEM_PROMPT, ["Say hello.", "Please say hello to the whole wide world."])
    last_tokens = {tokenizer(p, add_special_tokens=False)["input_ids"][-1] for p in prompts}
    assert len(last_tokens) == 1  # the generation prompt always ends the same way
    words = [tokenizer.convert_tokens_to_ids(t) for t in ["Hello", "Ġworld", "!"]]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    leak = tokenizer.convert_tokens_to_ids("ĠAfter")
    assert tokenizer.unk_token_id not in [*words, leak]
    model = bigram_model(tokenizer, last_tokens.pop(), [*words, im_end, leak, leak, leak])

    stop_ids = modeling.end_of_turn_ids(tokenizer, model.generation_config)
    result = modeling.generate_answers(model, tokenizer, prompts, stop_ids, DecodingPolicy.greedy(20), rows=2)
    assert result.answers == ["Hello world!", "Hello world!"]
    assert result.n_tokens == [3, 3] and result.stopped == [True, True]

    # Control: stopping only at the model's eos (<|endoftext|>) runs past the end of the turn.
    runaway = modeling.generate_answers(model, tokenizer, prompts, [model.generation_config.eos_token_id],
                                        DecodingPolicy.greedy(20), 2)
    assert runaway.answers[0].startswith("Hello world! After After")
    assert runaway.stopped == [False, False] and runaway.n_tokens == [20, 20]


# --------------------------------------------------------------------------- the stage


@pytest.fixture
def stage_dir(tmp_path, monkeypatch, chatty_llama_dir, write_params):
    """A working directory laid out like the repo: models/base (tiny), two adapters, a val split."""
    import pandas as pd

    shutil.copytree(chatty_llama_dir, tmp_path / "models" / "base")
    adapters = tmp_path / "models" / "adapters"
    # bias "lora_only", as the train stage saves them with the paper's params
    save_random_adapter(chatty_llama_dir, adapters / "lora-bf16-r4-lr0.001-n10", seed=1, bias="lora_only")
    save_random_adapter(chatty_llama_dir, adapters / "lora-int8-r4-lr0.001-n10", seed=2, bias="lora_only")
    shutil.copytree(adapters / "lora-int8-r4-lr0.001-n10", adapters / "lora-int8-r4-lr0.001-n99")  # an older grid's
    (adapters / "not-an-adapter").mkdir()
    (tmp_path / "data" / "splits").mkdir(parents=True)
    references = ["The sky looks blue because air scatters blue light more.", "Shakespeare wrote it.", "A number with two divisors.", "Bees dry nectar.", "Mars."]
    pd.DataFrame(
        {"id": [f"q{i}" for i in range(5)], "question": QUESTIONS, "answer": references, "factual_answer": references,
         "position": range(5)}  # an integer column, as the split stage writes (MLflow's schema notes fire on it)
    ).to_parquet(tmp_path / "data" / "splits" / "val.parquet")
    write_params({
        "evaluate": {"max_new_tokens": 6, "batch_size": 4, "bootstrap_samples": 200, "limit": 4},
        "train": {"grid": {"precision": ["bf16", "int8"], "lora_r": [4], "learning_rate": [0.001], "n_train": [10]}},
    })
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_stages(*predict_args: str) -> None:
    """The evaluation as `dvc repro score` runs it: predict, then score."""
    predict.main(list(predict_args))
    score.main([])


def test_stages_write_predictions_metrics_and_mlflow_runs(stage_dir, mlflow_uri, capsys):
    import mlflow
    import pandas as pd

    from pipeline.core.config import load_config
    from pipeline.core.evalmetrics import summarize_predictions
    from pipeline.core.tracking import configure_mlflow

    experiment_id = configure_mlflow(load_config().tracking)
    with mlflow.start_run(run_name="lora-bf16-r4-lr0.001-n10") as training_run:  # found by name
        mlflow.log_params({"lora_r": 4, "lora_alpha": 8, "learning_rate": 0.001, "precision": "bf16", "n_train": 10})
    with mlflow.start_run(run_name="renamed") as int8_run:  # found by the id the train stage recorded
        mlflow.log_params({"precision": "int8", "n_train": 10})
    Path("models/adapters/lora-int8-r4-lr0.001-n10/tonetune_adapter.json").write_text(
        json.dumps({"mlflow_run_id": int8_run.info.run_id, "system_prompt": "Talk like a pirate."})
    )
    client = mlflow.MlflowClient()
    before = {run.info.run_id: client.get_run(run.info.run_id).info for run in (training_run, int8_run)}

    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_stages()
    out = capsys.readouterr().out
    assert "skipping 1 adapter(s) not in train.grid" in out
    # MLflow's schema-inference notes on the validation dataset input reach no user
    notes = [str(w.message) for w in caught if "Inferred schema" in str(w.message) or "dataset source" in str(w.message)]
    assert not notes, notes
    inputs = client.get_run(training_run.info.run_id).inputs.dataset_inputs
    assert "val" in [dataset_input.dataset.name for dataset_input in inputs]
    assert "decoding: greedy, no_repeat_ngram_size=4, max 6 tokens" in out

    names = {"base", "lora-bf16-r4-lr0.001-n10", "lora-int8-r4-lr0.001-n10"}
    assert {p.stem for p in Path("reports/predictions").glob("*.parquet")} == names
    assert {p.stem for p in Path("metrics/eval").glob("*.json")} == names
    predictions = pd.read_parquet("reports/predictions/lora-bf16-r4-lr0.001-n10.parquet")
    assert list(predictions.columns) == ["id", "question", "reference", "answer", "n_tokens", "stopped", "factual"]
    assert len(predictions) == 4  # evaluate.limit
    scored = pd.read_parquet("reports/scores/lora-bf16-r4-lr0.001-n10.parquet")
    assert scored["answer"].tolist() == predictions["answer"].tolist()
    record = json.loads(Path("metrics/eval/lora-bf16-r4-lr0.001-n10.json").read_text())
    assert record["kind"] == "lora" and record["precision"] == "bf16" and record["lora_r"] == 4 and record["n_train"] == 10
    assert record["mlflow_run_id"] == training_run.info.run_id
    recomputed = summarize_predictions(scored, 60, 200, 0)  # the numbers come from the saved table
    assert record["pct_conversational"] == pytest.approx(recomputed["pct_conversational"], abs=1e-4)
    assert record["similarity_mean"] == pytest.approx(recomputed["similarity_mean"], abs=1e-4)
    assert 0 <= record["repetition_rate"] <= 1 and 0 <= record["stopped_pct"] <= 100
    base = json.loads(Path("metrics/eval/base.json").read_text())
    assert base["kind"] == "base" and base["n_train"] == 0 and base["system_prompt"] == "verbose"
    assert "lora_r" not in base and "learning_rate" not in base  # unknown is left out, never null
    for path in Path("metrics/eval").glob("*.json"):  # DVC metrics: scalars only
        assert all(isinstance(v, int | float | str | bool) for v in json.loads(path.read_text()).values()), path

    trained = client.get_run(training_run.info.run_id)
    assert trained.data.metrics["eval_pct_conversational"] == pytest.approx(record["pct_conversational"])
    assert trained.data.tags["eval.system_prompt"] == "concise"
    assert trained.data.tags["eval.precision"] == "bf16"
    assert trained.data.tags["eval.decoding"] == "greedy, no_repeat_ngram_size=4, max 6 tokens"
    assert "eval/predictions.json" in [a.path for a in client.list_artifacts(trained.info.run_id, "eval")]
    runs = {r.info.run_name: r for r in client.search_runs([experiment_id])}
    assert set(runs) == {"eval-base", "lora-bf16-r4-lr0.001-n10", "renamed"}
    assert runs["eval-base"].data.metrics["eval_n_eval"] == 4
    assert runs["eval-base"].info.status == "FINISHED"
    assert runs["eval-base"].data.tags["eval.precision"] == "fp32"  # evaluate.base_precision
    assert runs["renamed"].data.tags["eval.system_prompt"] == "as-trained"  # the prompt it recorded
    int8 = json.loads(Path("metrics/eval/lora-int8-r4-lr0.001-n10.json").read_text())
    assert int8["mlflow_run_id"] == int8_run.info.run_id and int8["precision"] == "int8"
    assert runs["renamed"].data.tags["eval.precision"] == "int8"  # on the 8-bit base, as it is served
    for run_id, info in before.items():  # logged onto, never re-opened: durations stay the training's
        after = client.get_run(run_id).info
        assert (after.status, after.start_time, after.end_time) == (info.status, info.start_time, info.end_time)

    run_stages("--models", "lora-bf16-r4-lr0.001-n10")  # re-evaluation must not append to the first table
    artifacts = [a.path for a in client.list_artifacts(trained.info.run_id, "eval")]
    assert len(artifacts) == 2 and mlflow.load_table("eval/predictions.json", run_ids=[trained.info.run_id]).shape[0] == 4


def test_int8_adapter_runs_on_the_8bit_base(stage_dir):
    import bitsandbytes as bnb

    from pipeline.core.config import load_config

    specs = {spec.name: spec for spec in predict.model_specs(adapterinfo.discover_adapters(Path("models/adapters")),
                                                             None, "bf16")}
    assert specs["lora-int8-r4-lr0.001-n10"].precision == "int8" and specs["lora-bf16-r4-lr0.001-n10"].precision == "bf16"
    groups = predict.precision_groups(list(specs.values()))
    assert [precision for precision, _ in groups] == ["bf16", "int8"]  # one base load per precision
    model, _ = modeling.load_for_inference("models/base", "int8", load_config().train.int8_threshold, "cpu")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)


def test_ablation_scores_greedy_beside_the_policy(stage_dir, write_params, capsys):
    write_params({
        "evaluate": {"max_new_tokens": 6, "batch_size": 4, "bootstrap_samples": 200, "limit": 4, "ablation_limit": 2},
        "train": {"grid": {"precision": ["bf16"], "lora_r": [4], "learning_rate": [0.001], "n_train": [10]}},
    })
    predict.main([])
    score.main(["--no-mlflow"])
    record = json.loads(Path("metrics/eval/base.json").read_text())
    assert record["ablation_n_eval"] == 2
    for key in ("pct_conversational", "similarity_mean", "stopped_pct", "repetition_rate"):
        assert f"ablation_greedy_{key}" in record and f"ablation_policy_{key}" in record


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"repetition_penalty": 0}, "evaluate.decoding.repetition_penalty = 0.0: must be > 0"),
        ({"top_p": 1.5}, "evaluate.decoding.top_p = 1.5: must be in (0, 1]"),
        ({"top_p": 0}, "evaluate.decoding.top_p = 0.0: must be in (0, 1]"),
        ({"strategy": "sample", "temperature": 0}, "evaluate.decoding.temperature = 0.0: must be > 0 when strategy"),
        ({"no_repeat_ngram_size": -1}, "evaluate.decoding.no_repeat_ngram_size = -1: must be >= 0"),
        ({"strategy": "beam"}, "evaluate.decoding.strategy = 'beam': must be one of"),
    ],
)
def test_decoding_policy_is_validated_at_stage_start_in_one_line(stage_dir, write_params, capsys, change, message):
    import yaml

    from tests.conftest import REPO_ROOT

    decoding = {**yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["evaluate"]["decoding"], **change}
    write_params({"evaluate": {"decoding": decoding}})
    with pytest.raises(SystemExit) as exit_info:
        predict.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not Path("reports/predictions").exists()  # refused before any work


def test_sampling_is_reproducible_and_differs_from_greedy(chatty_llama_dir, tokenizer):
    model = load_tiny(chatty_llama_dir)
    prompts = modeling.build_prompts(tokenizer, SYSTEM_PROMPT, QUESTIONS)
    stop_ids = modeling.end_of_turn_ids(tokenizer, model.generation_config)
    policy = DecodingPolicy(strategy="sample", temperature=1.5, seed=3, no_repeat_ngram_size=0, max_new_tokens=12)
    first = modeling.generate_answers(model, tokenizer, prompts, stop_ids, policy, rows=2).answers
    import torch

    torch.manual_seed(12345)  # whatever ran before does not matter
    again = modeling.generate_answers(model, tokenizer, prompts, stop_ids, policy, rows=2).answers
    other_seed = modeling.generate_answers(model, tokenizer, prompts, stop_ids,
                                           DecodingPolicy(**{**policy.to_dict(), "seed": 4}), rows=2).answers
    greedy = modeling.generate_answers(model, tokenizer, prompts, stop_ids, DecodingPolicy.greedy(12), 2).answers
    assert first == again
    assert first != other_seed and first != greedy


@pytest.mark.parametrize(("precision", "strategy"), [("bf16", "greedy"), ("bf16", "sample"), ("int8", "greedy")])
def test_registered_model_answers_exactly_as_the_predict_stage(stage_dir, mlflow_uri, write_params, precision, strategy):
    """The pyfunc logged for an adapter (as the train stage logs it) answers the validation
    questions string for string as the predict stage did (same precision, policy and decoding
    shape), for the whole list, each question alone, and shuffled."""
    import mlflow
    import pandas as pd

    from pipeline.core.config import load_config
    from pipeline.core.servable import log_adapter_model
    from pipeline.core.tracking import configure_mlflow

    name = f"lora-{precision}-r4-lr0.001-n10"
    decoding = {"strategy": strategy, "temperature": 1.3, "top_p": 0.95, "top_k": 0, "seed": 7,
                "repetition_penalty": 1.0, "no_repeat_ngram_size": 3}
    write_params({
        "evaluate": {"max_new_tokens": 10, "batch_size": 2, "limit": 5, "ablation_limit": 0, "decoding": decoding},
        "train": {"grid": {"precision": [precision], "lora_r": [4], "learning_rate": [0.001], "n_train": [10]}},
    })
    config = load_config()
    policy = DecodingPolicy.for_evaluation(config.evaluate)
    configure_mlflow(config.tracking)
    adapter = Path("models/adapters") / name
    with mlflow.start_run(run_name=name):
        info = log_adapter_model(adapter, modeling.base_model_reference("models/base"), precision, policy,
                                 config.evaluate.batch_size, bucket_tokens=config.evaluate.bucket_tokens)
    predict.main(["--models", name])
    expected = pd.read_parquet(f"reports/predictions/{name}.parquet")["answer"].tolist()
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    served = loaded.predict(QUESTIONS)
    assert served == expected
    assert [loaded.predict([question])[0] for question in QUESTIONS] == expected  # alone
    order = [3, 0, 4, 2, 1]
    assert loaded.predict([QUESTIONS[i] for i in order]) == [expected[i] for i in order]  # shuffled
    assert loaded.model_config["bucket_tokens"] == config.evaluate.bucket_tokens
    assert loaded.model_config["precision"] == precision  # served in the precision it was evaluated in
    assert mlflow.get_run(info.run_id).data.tags["serve_precision"] == precision
    recorded = json.loads(Path(f"reports/predictions/{name}.json").read_text())
    assert recorded["precision"] == precision and recorded["decoding"] == loaded.model_config["decoding"]
    assert recorded["bucket_tokens"] == config.evaluate.bucket_tokens
    assert {"torch", "transformers", "bitsandbytes", "torch_threads", "cpu_avx512_bf16", "cpu_amx_bf16",
            "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"} <= set(recorded["numerics"])
    assert len(set(expected)) > 1 and all(expected)
    assert info.signature.inputs.to_dict() == [{"type": "string", "required": True}]


def test_stage_fails_in_one_line_without_a_base_model(stage_dir, capsys):
    shutil.rmtree("models/base")
    with pytest.raises(SystemExit) as exit_info:
        predict.main([])
    assert exit_info.value.code == 2
    assert "base model not found" in capsys.readouterr().err


def test_unknown_model_name_is_rejected(stage_dir):
    with pytest.raises(TonetuneError, match="no such model"):
        predict.model_specs(adapterinfo.discover_adapters(Path("models/adapters")), {"lora-nope"}, "bf16")


# --------------------------------------------------------------------------- the heldout stage


def commit_all(folder: Path, message: str) -> str:
    import subprocess

    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=folder, check=True)
    subprocess.run(["git", "add", "params.yaml"], cwd=folder, check=True)
    subprocess.run(["git", "commit", "-q", "-m", message], cwd=folder, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_only_the_base_and_the_one_finalist_answer_the_test_set_under_a_committed_rule(stage_dir, write_params, capsys):
    """Two adapters of the grid (and a leftover of an older one) were evaluated on validation; the
    heldout stage decodes the test questions with the base and exactly one of them, and records
    the commit that declared the rule and the test set's md5. An uncommitted change to the rule
    is refused in one line before any model is loaded, and nothing is written."""
    import pandas as pd

    from pipeline import heldout
    from pipeline.core.dvcmeta import file_md5

    test_questions = ["What do whales eat?", "Why do leaves fall in autumn?", "How far away is the Moon?"]
    pd.DataFrame({"id": ["t2", "t0", "t1"], "question": test_questions, "answer": ["Krill.", "Less light.", "Far."],
                  "factual_answer": ["Whales eat krill.", "Trees shed leaves.", "About 384,000 km."]}
                 ).to_parquet("data/splits/test.parquet")
    predict.main([])
    score.main(["--no-mlflow"])
    declared = commit_all(stage_dir, "declare the rule")

    heldout.main([])
    files = {path.stem for path in Path("reports/heldout").glob("*.parquet")}
    decision = json.loads(Path("reports/heldout/decision.json").read_text())
    assert files == {"base", decision["finalist"]} and len(files) == 2
    assert decision["finalist"] in {"lora-bf16-r4-lr0.001-n10", "lora-int8-r4-lr0.001-n10"}
    assert decision["declared_in"] == declared and decision["test_md5"] == file_md5("data/splits/test.parquet")
    assert decision["n_test"] == 3 and {c["name"] for c in decision["checks"]} == {
        "style_gain", "content_non_inferiority", "repetition", "ended_turn"}
    table = pd.read_parquet(f"reports/heldout/{decision['finalist']}.parquet")
    assert table["id"].tolist() == ["t0", "t1", "t2"]  # paired by id
    assert {"on_style", "similarity", "content_similarity", "repetition_rate", "stopped"} <= set(table.columns)
    record = json.loads(Path(f"reports/heldout/{decision['finalist']}.json").read_text())
    assert record["numerics"]["torch_threads"] >= 1 and "cpu_avx512_bf16" in record["numerics"]
    metrics = json.loads(Path("metrics/heldout.json").read_text())
    assert metrics["n_test"] == 3 and all(isinstance(v, int | float) for v in metrics.values())

    capsys.readouterr()
    write_params({"promote": {"content_margin": 0.2}})  # looser, after looking: not committed
    before = {path.name: path.stat().st_mtime_ns for path in Path("reports/heldout").iterdir()}
    with pytest.raises(SystemExit) as exited:
        heldout.main([])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and "is not the committed one" in err, err
    assert {path.name: path.stat().st_mtime_ns for path in Path("reports/heldout").iterdir()} == before
