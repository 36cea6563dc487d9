"""Stage `evaluate`: batched greedy generation, end-of-turn stopping, adapter switching, and the
whole stage on a tiny model (predictions, metrics files, MLflow runs).

The tiny models share SmolLM2's real tokenizer and chat template (conftest.tiny_llama_dir), so
stop ids are derived from the same template the demo uses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import evaluate
from pipeline.core.errors import TonetuneError

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


def test_length_sorted_batches_cover_every_index_once_longest_first():
    lengths = [5, 9, 1, 9, 3, 7, 2]
    batches = evaluate.length_sorted_batches(lengths, 3)
    assert batches == [[1, 3, 5], [0, 4, 6], [2]]
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [([5, 6, 2, 7, 8], ([5, 6], True)), ([5, 6, 7], ([5, 6, 7], False)), ([2], ([], True)), ([5, 0, 2], ([5], True))],
)
def test_cut_at_stop_keeps_only_tokens_before_the_first_stop(tokens, expected):
    assert evaluate.cut_at_stop(tokens, [2, 0]) == expected


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
    metadata = evaluate.adapter_metadata(folder)
    assert {key: metadata[key] for key in expected} == expected


def test_adapter_metadata_prefers_training_run_params_over_files(tmp_path):
    folder = tmp_path / "lora-int8-r32-lr0.001-n150"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 16}))
    from_files = evaluate.adapter_metadata(folder)
    assert from_files["lora_r"] == 16 and from_files["lora_alpha"] == 16  # adapter_config beats the name
    params = {"precision": "bf16", "lora_r": "48", "lora_alpha": "48", "learning_rate": "0.0002", "n_train": "100"}
    assert evaluate.adapter_metadata(folder, params) == {
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
    ids = evaluate.end_of_turn_ids(tok, GenerationConfig(eos_token_id=endoftext))
    assert ids[0] == im_end
    assert endoftext in ids


# --------------------------------------------------------------------------- generation


def test_batched_greedy_answers_equal_one_at_a_time(chatty_llama_dir, tokenizer):
    model = load_tiny(chatty_llama_dir)
    prompts = evaluate.build_prompts(tokenizer, SYSTEM_PROMPT, QUESTIONS)
    stop_ids = evaluate.end_of_turn_ids(tokenizer, model.generation_config)
    batched = evaluate.generate_answers(model, tokenizer, prompts, stop_ids, max_new_tokens=12, batch_size=3)
    single = evaluate.generate_answers(model, tokenizer, prompts, stop_ids, max_new_tokens=12, batch_size=1)
    assert batched.answers == single.answers
    assert batched.n_tokens == single.n_tokens
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
    prompts = evaluate.build_prompts(tokenizer, SYSTEM_PROMPT, QUESTIONS[:4])
    base = load_tiny(tiny_llama_dir)
    stop_ids = evaluate.end_of_turn_ids(tokenizer, base.generation_config)

    def answers(model, batch_size=4):
        return evaluate.generate_answers(model, tokenizer, prompts, stop_ids, 10, batch_size).answers

    def fresh(adapter):
        return answers(PeftModel.from_pretrained(load_tiny(tiny_llama_dir), str(adapter)).eval(), batch_size=1)

    base_answers = answers(base)
    switcher = evaluate.AdapterSwitcher(base)
    specs = {
        "a": evaluate.ModelSpec(adapter_a.name, "lora", "concise", "", adapter_dir=adapter_a),
        "b": evaluate.ModelSpec(adapter_b.name, "lora", "concise", "", adapter_dir=adapter_b),
        "base": evaluate.ModelSpec("base", "base", "verbose", ""),
    }
    seen = {}
    for key in ["a", "b", "base", "a", "b"]:
        with switcher.activate(specs[key]) as model:
            seen.setdefault(key, []).append(answers(model))
    assert seen["a"][0] != base_answers and seen["b"][0] != seen["a"][0]
    assert seen["a"][0] == fresh(adapter_a)  # batched on the shared base == one at a time, fresh load
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
    prompts = evaluate.build_prompts(tokenizer, SYSTEM_PROMPT, ["Say hello.", "Please say hello to the whole wide world."])
    last_tokens = {tokenizer(p, add_special_tokens=False)["input_ids"][-1] for p in prompts}
    assert len(last_tokens) == 1  # the generation prompt always ends the same way
    words = [tokenizer.convert_tokens_to_ids(t) for t in ["Hello", "Ġworld", "!"]]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    leak = tokenizer.convert_tokens_to_ids("ĠAfter")
    assert tokenizer.unk_token_id not in [*words, leak]
    model = bigram_model(tokenizer, last_tokens.pop(), [*words, im_end, leak, leak, leak])

    stop_ids = evaluate.end_of_turn_ids(tokenizer, model.generation_config)
    result = evaluate.generate_answers(model, tokenizer, prompts, stop_ids, max_new_tokens=20, batch_size=2)
    assert result.answers == ["Hello world!", "Hello world!"]
    assert result.n_tokens == [3, 3] and result.stopped == [True, True]

    # Control: stopping only at the model's eos (<|endoftext|>) runs past the end of the turn.
    runaway = evaluate.generate_answers(model, tokenizer, prompts, [model.generation_config.eos_token_id], 20, 2)
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
        {"id": [f"q{i}" for i in range(5)], "question": QUESTIONS, "answer": references, "factual_answer": references}
    ).to_parquet(tmp_path / "data" / "splits" / "val.parquet")
    write_params({
        "evaluate": {"max_new_tokens": 6, "batch_size": 4, "bootstrap_samples": 200, "limit": 4},
        "train": {"grid": {"precision": ["bf16", "int8"], "lora_r": [4], "learning_rate": [0.001], "n_train": [10]}},
    })
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_stage_writes_predictions_metrics_and_mlflow_runs(stage_dir, mlflow_uri, capsys):
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

    evaluate.main([])
    assert "skipping 1 adapter(s) not in train.grid" in capsys.readouterr().out

    names = {"base", "lora-bf16-r4-lr0.001-n10", "lora-int8-r4-lr0.001-n10"}
    assert {p.stem for p in Path("reports/predictions").glob("*.parquet")} == names
    assert {p.stem for p in Path("metrics/eval").glob("*.json")} == names
    predictions = pd.read_parquet("reports/predictions/lora-bf16-r4-lr0.001-n10.parquet")
    assert list(predictions.columns[:6]) == ["id", "question", "reference", "answer", "flesch", "similarity"]
    assert len(predictions) == 4  # evaluate.limit
    record = json.loads(Path("metrics/eval/lora-bf16-r4-lr0.001-n10.json").read_text())
    assert record["kind"] == "lora" and record["precision"] == "bf16" and record["lora_r"] == 4 and record["n_train"] == 10
    assert record["mlflow_run_id"] == training_run.info.run_id
    recomputed = summarize_predictions(predictions, 60, 200, 0)  # the numbers come from the saved table
    assert record["pct_conversational"] == pytest.approx(recomputed["pct_conversational"], abs=1e-4)
    assert record["similarity_mean"] == pytest.approx(recomputed["similarity_mean"], abs=1e-4)
    base = json.loads(Path("metrics/eval/base.json").read_text())
    assert base["kind"] == "base" and base["n_train"] == 0 and base["system_prompt"] == "verbose"

    client = mlflow.MlflowClient()
    trained = client.get_run(training_run.info.run_id)
    assert trained.data.metrics["eval_pct_conversational"] == pytest.approx(record["pct_conversational"])
    assert trained.data.tags["eval.system_prompt"] == "concise"
    assert "eval/predictions.json" in [a.path for a in client.list_artifacts(trained.info.run_id, "eval")]
    runs = {r.info.run_name: r for r in client.search_runs([experiment_id])}
    assert set(runs) == {"eval-base", "lora-bf16-r4-lr0.001-n10", "renamed"}
    assert runs["eval-base"].data.metrics["eval_n_eval"] == 4
    assert runs["renamed"].data.tags["eval.system_prompt"] == "as-trained"  # the prompt it recorded
    int8 = json.loads(Path("metrics/eval/lora-int8-r4-lr0.001-n10.json").read_text())
    assert int8["mlflow_run_id"] == int8_run.info.run_id and int8["precision"] == "int8"

    evaluate.main(["--models", "lora-bf16-r4-lr0.001-n10"])  # re-evaluation must not append to the first table
    artifacts = [a.path for a in client.list_artifacts(trained.info.run_id, "eval")]
    assert len(artifacts) == 2 and mlflow.load_table("eval/predictions.json", run_ids=[trained.info.run_id]).shape[0] == 4


def test_stage_fails_in_one_line_without_a_base_model(stage_dir, capsys):
    shutil.rmtree("models/base")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--no-mlflow"])
    assert exit_info.value.code == 2
    assert "base model not found" in capsys.readouterr().err


def test_unknown_model_name_is_rejected(stage_dir):
    with pytest.raises(TonetuneError, match="no such model"):
        evaluate.model_specs(evaluate.discover_adapters(Path("models/adapters")), {"lora-nope"})
