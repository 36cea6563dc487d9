"""Stage `train` on a tiny random Llama with SmolLM2's real tokenizer and chat template.

Real TRL, PEFT, bitsandbytes and MLflow (sqlite) throughout. One clean fp32 training run is
shared by the loss, schedule, tracking and pyfunc tests (module fixture); the resume test makes
its own interrupted + resumed run. Bad-input tests run the CLI in a subprocess.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT
from tests.conftest import REPO_ROOT

TOPICS = [
    "cats", "dogs", "rain", "bread", "music", "trains", "stars", "rivers", "books", "coffee",
    "snow", "bees", "maps", "clocks", "boats", "tea", "kites", "moons", "farms", "bikes",
]
N_TRAIN = 20
# 20 examples, batch 4 -> 5 batches/epoch; accumulation 2 -> 3 optimizer steps/epoch (the last
# window has one batch); 3 epochs -> 9 steps. An off-by-one in the step count would make
# OneCycleLR raise or end above its floor.
TRAIN_OVERRIDES = {
    "epochs": 3,
    "per_device_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "max_seq_length": 128,
    "save_steps": 100,
    "grid": {"precision": ["fp32"], "lora_r": [8], "learning_rate": [0.01], "n_train": [N_TRAIN]},
}
EXPECTED_STEPS = 9
QUESTIONS = ["What can you tell me about cats?", "Why is the sky blue?", "What is a river?"]


def toy_rows(topics=TOPICS) -> list[dict]:
    """Question/answer pairs sharing one conversational answer pattern (learnable in steps)."""
    return [
        {
            "id": f"q{index}",
            "question": f"What can you tell me about {topic}?",
            "answer": f"Well, {topic} are pretty neat. Think of it like this: you just enjoy {topic} and that's it.",
        }
        for index, topic in enumerate(topics)
    ]


def write_splits(folder: Path, n_train: int = N_TRAIN) -> Path:
    """data/splits-like folder with train_<n>.parquet and val.parquet."""
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(toy_rows()[:n_train]).to_parquet(folder / f"train_{n_train}.parquet", index=False)
    pd.DataFrame(toy_rows(["owls", "lakes", "songs", "hills"])).to_parquet(folder / "val.parquet", index=False)
    return folder


def tiny_config(tmp_path: Path, overrides: dict | None = None):
    """The repo's params with the tiny training overrides and a private artifact root."""
    from pipeline.core.config import parse_config

    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["train"] = {**raw["train"], **TRAIN_OVERRIDES, **(overrides or {})}
    raw["tracking"] = {**raw["tracking"], "artifact_root": str(tmp_path / "mlartifacts"), "experiment": "tonetune-tests"}
    raw["evaluate"] = {**raw["evaluate"], "max_new_tokens": 12}
    return parse_config(raw)


def tiny_point(precision="fp32", lora_r=8, learning_rate=0.01, n_train=N_TRAIN):
    from pipeline.core.contracts import GridPoint

    return GridPoint(precision, lora_r, learning_rate, n_train)


def paths_for(point, root: Path, base_dir: Path):
    from pipeline.train import TrainPaths

    return TrainPaths.for_point(point, root / "models" / "adapters" / point.name, base_dir, root / "splits")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    """One clean fp32 training run of the tiny model, tracked in a module-private MLflow store."""
    import mlflow

    from pipeline.train import train_grid_point

    root = tmp_path_factory.mktemp("train")
    write_splits(root / "splits")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        config = tiny_config(root)
        point = tiny_point()
        paths = paths_for(point, root, tiny_llama_dir)
        result = train_grid_point(point, config, paths)
        yield {"result": result, "config": config, "paths": paths, "uri": uri, "root": root}


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("learning_rate", "text"),
    [(0.001, "0.001"), (1e-4, "0.0001"), (2e-4, "0.0002"), (1e-5, "1e-05"), (0.0003, "0.0003")],
)
def test_learning_rate_text_is_canonical(learning_rate, text):
    from pipeline.core.contracts import adapter_name as run_name
    from pipeline.core.contracts import format_learning_rate

    assert format_learning_rate(learning_rate) == text
    assert run_name("int8", 64, learning_rate, 100) == f"lora-int8-r64-lr{text}-n100"


@pytest.mark.parametrize("params_file", ["params.yaml", "profiles/paper.yaml"])
def test_run_names_match_the_paths_dvc_renders(tmp_path, params_file):
    """DVC itself renders dvc.yaml's train matrix from the params file; every rendered output
    folder and command must agree with the run name pipeline.train computes."""
    from dvc.repo import Repo

    from pipeline.core.contracts import GridPoint
    from pipeline.core.contracts import adapter_name as run_name
    from pipeline.train.__main__ import parse_args

    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text((REPO_ROOT / "dvc.yaml").read_text())
    from pipeline.core.config import deep_merge

    # A profile is an overlay on params.yaml (what `python -m pipeline.core.config apply` writes).
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    if params_file != "params.yaml":
        params = deep_merge(params, yaml.safe_load((REPO_ROOT / params_file).read_text()))
    grid = params["train"]["grid"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = [stage for stage in Repo(str(tmp_path)).index.stages if stage.name.startswith("train@")]
    expected = len(grid["precision"]) * len(grid["lora_r"]) * len(grid["learning_rate"]) * len(grid["n_train"])
    assert len(stages) == expected
    for stage in stages:
        arguments = parse_args(stage.cmd.split()[3:])
        name = GridPoint(arguments.precision, arguments.lora_r, arguments.learning_rate, arguments.n_train).name
        assert [str(out.def_path) for out in stage.outs] == [f"models/adapters/{name}"]
        assert name == run_name(arguments.precision, arguments.lora_r, arguments.learning_rate, arguments.n_train)
        deps = {str(dep.def_path) for dep in stage.deps}
        assert f"data/splits/train_{arguments.n_train}.parquet" in deps
        assert {"models/base", "pipeline/train", "pipeline/core/system_prompts.py"} <= deps


def test_optimizer_steps_match_the_trainer():
    from pipeline.train import optimizer_steps

    assert optimizer_steps(150, 16, 2, 5) == 25  # 10 batches -> 5 steps/epoch
    assert optimizer_steps(20, 4, 2, 3) == 9  # 5 batches -> 3 steps/epoch (last window: 1 batch)
    assert optimizer_steps(100, 16, 2, 5) == 20  # 7 batches -> 4 steps/epoch
    assert optimizer_steps(3, 16, 2, 1) == 1


def test_system_prompts_are_the_papers():
    from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT, VERBOSE_SYSTEM_PROMPT, chat_messages

    assert CONCISE_SYSTEM_PROMPT == (
        "You are a helpful assistant. You answer questions in a natural, conversational tone, like in a spoken conversation."
    )
    assert VERBOSE_SYSTEM_PROMPT.startswith(CONCISE_SYSTEM_PROMPT + " You give short and concise answers.")
    assert VERBOSE_SYSTEM_PROMPT.endswith("Reading Ease Score of above 60.")
    assert chat_messages("Q?") == [
        {"role": "system", "content": CONCISE_SYSTEM_PROMPT},
        {"role": "user", "content": "Q?"},
    ]


# --------------------------------------------------------------------------- labels
def test_labels_cover_only_the_assistant_answer(tmp_path, tiny_llama_dir):
    """Prompt/completion format: every label before the answer is -100, and the labelled tokens
    decode to exactly the answer plus the end-of-turn the model must learn to emit."""
    from transformers import AutoTokenizer

    from pipeline.core.modeling import load_base_model
    from pipeline.train import attach_lora, build_trainer, conversational_examples

    config = tiny_config(tmp_path)
    point = tiny_point()
    frame = pd.DataFrame(toy_rows()[:4])
    frame.loc[0, "answer"] += " And honestly, that's all there is to it, my friend."
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = attach_lora(load_base_model(tiny_llama_dir, "fp32"), 8, config.train, "fp32")
    trainer = build_trainer(model, tokenizer, conversational_examples(frame), point, config.train, tmp_path / "out")
    assert trainer.args.activation_checkpointing is False and trainer.args.gradient_checkpointing is False
    for row, example in zip(frame.itertuples(), trainer.train_dataset, strict=True):
        labels, input_ids = example["labels"], example["input_ids"]
        first = next(index for index, label in enumerate(labels) if label != -100)
        assert all(label == -100 for label in labels[:first])
        assert labels[first:] == input_ids[first:]
        assert tokenizer.decode(input_ids[first:]) == row.answer + "<|im_end|>\n"
        prompt = tokenizer.decode(input_ids[:first])
        assert prompt.endswith(f"{row.question}<|im_end|>\n<|im_start|>assistant\n")
        assert "You answer questions in a natural, conversational tone" in prompt
    batch = trainer.data_collator([trainer.train_dataset[index] for index in range(4)])
    padded = batch["attention_mask"] == 0
    assert padded.any()  # the answers differ in length
    assert (batch["labels"][padded] == -100).all()


def test_completion_loss_equals_trls_fused_loss(tmp_path, tiny_llama_dir):
    """The CPU loss (only completion positions through the LM head) is TRL's loss, value and
    gradients, with and without the accumulation window's token count."""
    import torch
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from pipeline.core.modeling import load_base_model
    from pipeline.train import (
        attach_lora,
        build_trainer,
        completion_loss,
        conversational_examples,
    )

    config = tiny_config(tmp_path, {"lora_dropout": 0.0})
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = attach_lora(load_base_model(tiny_llama_dir, "fp32"), 8, config.train, "fp32")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    frame = pd.DataFrame(toy_rows()[:4])
    frame.loc[1, "answer"] += " Longer, so the batch has padding."
    trainer = build_trainer(model, tokenizer, conversational_examples(frame), tiny_point(), config.train, tmp_path / "o")
    batch = trainer.data_collator([trainer.train_dataset[index] for index in range(4)])
    model.train()
    for num_items in (None, 100):
        gradients = []
        for loss_function in (
            functools.partial(SFTTrainer.compute_loss, trainer),
            functools.partial(completion_loss, trainer),
        ):
            model.zero_grad()
            loss = loss_function(model, dict(batch), num_items_in_batch=num_items)
            loss.backward()
            gradients.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        (trl_loss, trl_grads), (our_loss, our_grads) = gradients
        assert our_loss == pytest.approx(trl_loss.item(), rel=1e-5)
        for ours, theirs in zip(our_grads, trl_grads, strict=True):
            assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- training run
def test_loss_falls(trained):
    result = trained["result"]
    losses = [record["train_loss"] for record in result.history]
    assert len(losses) == EXPECTED_STEPS
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses


def one_cycle_reference(step: int, total: int, max_lr: float, pct_start=0.3, div=25.0, final_div=1e3) -> float:
    """OneCycleLR's documented formula (two cosine phases), written out independently."""
    initial, floor = max_lr / div, max_lr / div / final_div
    warmup_end, end = pct_start * total - 1, total - 1

    def cosine(start, stop, fraction):
        return stop + (start - stop) / 2 * (1 + math.cos(math.pi * fraction))

    if step <= warmup_end:
        return cosine(initial, max_lr, step / warmup_end)
    return cosine(max_lr, floor, (step - warmup_end) / (end - warmup_end))


def test_learning_rate_follows_one_cycle(trained):
    """Logged per step in MLflow: starts at max_lr/25, rises for the first 30% of the steps,
    then falls along a cosine to max_lr/(25*1e3) at the last step."""
    from mlflow import MlflowClient

    history = sorted(MlflowClient().get_metric_history(trained["result"].run_id, "learning_rate"), key=lambda m: m.step)
    assert [metric.step for metric in history] == list(range(1, EXPECTED_STEPS + 1))
    rates = [metric.value for metric in history]
    max_lr = 0.01
    peak = rates.index(max(rates))
    assert rates[0] == pytest.approx(max_lr / 25)
    assert peak == math.ceil(0.3 * EXPECTED_STEPS - 1)  # the first step past the warm-up phase
    assert all(a < b for a, b in itertools.pairwise(rates[: peak + 1]))
    assert all(a > b for a, b in itertools.pairwise(rates[peak:]))
    assert rates[-1] == pytest.approx(max_lr / (25 * 1e3))
    assert rates == pytest.approx([one_cycle_reference(step, EXPECTED_STEPS, max_lr) for step in range(EXPECTED_STEPS)])


def test_run_is_tracked_with_the_papers_params(trained):
    from mlflow import MlflowClient

    result = trained["result"]
    client = MlflowClient()
    run = client.get_run(result.run_id)
    params = run.data.params
    assert run.info.run_name == "lora-fp32-r8-lr0.01-n20"
    assert {key: params[key] for key in ("precision", "lora_r", "lora_alpha", "learning_rate", "n_train")} == {
        "precision": "fp32", "lora_r": "8", "lora_alpha": "8", "learning_rate": "0.01", "n_train": "20",
    }
    assert params["effective_batch_size"] == "8"
    assert params["lora_dropout"] == "0.2"
    assert params["total_steps"] == str(EXPECTED_STEPS)
    assert len(params["base_model_sha256"]) == 64
    # The logged pyfunc's model_config reaches the params too (MLflow refuses the whole batch if
    # one key would change an existing param, e.g. a second "system_prompt").
    assert params["system_prompt"] == "concise" and params["system_prompt_text"].startswith("You are")
    assert params["max_new_tokens"] == "12"
    for metric in ("tokens_per_s", "peak_memory_mb", "wall_time_s", "train_runtime_s"):
        assert run.data.metrics[metric] > 0
    assert len(client.get_metric_history(result.run_id, "train_loss")) == EXPECTED_STEPS
    contexts = {
        tag.value for dataset_input in run.inputs.dataset_inputs for tag in dataset_input.tags
        if tag.key == "mlflow.data.context"
    }
    assert contexts == {"training", "validation"}
    digests = {dataset_input.dataset.name: dataset_input.dataset.digest for dataset_input in run.inputs.dataset_inputs}
    from pipeline.core.dvcmeta import file_md5

    assert digests[f"train_{N_TRAIN}"] == file_md5(trained["paths"].train_split)
    assert digests["val"] == file_md5(trained["paths"].val_split)
    # grouped: a grid tag shared with the parent run
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["grid"] == run.data.tags["grid"]
    assert parent.info.run_name == f"train-grid-{run.data.tags['grid']}"


def test_adapter_folder_and_checkpoints(trained):
    paths = trained["paths"]
    assert (paths.adapter_dir / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((paths.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == adapter_config["lora_alpha"] == 8
    assert sorted(adapter_config["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
    assert adapter_config["lora_dropout"] == 0.2 and adapter_config["bias"] == "lora_only"
    metadata = json.loads((paths.adapter_dir / "tonetune_adapter.json").read_text())
    assert metadata["mlflow_run_id"] == trained["result"].run_id
    assert metadata["precision"] == "fp32" and metadata["n_train"] == N_TRAIN
    assert not paths.checkpoint_dir.exists()  # removed once the adapter is saved and logged


# --------------------------------------------------------------------------- pyfunc
def test_pyfunc_round_trip_answers_like_the_trained_model(trained):
    """Loaded back from MLflow (adapter artifact + base reference), the model gives exactly the
    answers the in-process trained model gives under the evaluation's decoding policy, which
    the logged model records along with its serving precision and batch size."""
    import mlflow
    import torch

    from pipeline.core.modeling import DecodingPolicy, answer_questions

    result, config = trained["result"], trained["config"]
    policy = DecodingPolicy.for_evaluation(config.evaluate)
    expected = answer_questions(result.model, result.tokenizer, QUESTIONS, CONCISE_SYSTEM_PROMPT, policy,
                                config.evaluate.batch_size).answers
    loaded = mlflow.pyfunc.load_model(result.model_uri)
    model_config = loaded.model_config
    assert model_config["precision"] == "fp32" and model_config["decoding"] == policy.to_dict()
    assert model_config["batch_size"] == config.evaluate.batch_size
    assert loaded.predict(pd.DataFrame({"question": QUESTIONS})) == expected
    assert loaded.predict(QUESTIONS) == expected  # a plain list of questions works too
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.data.tags["serve_precision"] == "fp32"
    inner = loaded.unwrap_python_model().server.model
    trained_weights = {n: p for n, p in result.model.named_parameters() if "lora_B" in n}
    loaded_weights = {n: p for n, p in inner.named_parameters() if "lora_B" in n}
    assert trained_weights.keys() == loaded_weights.keys()
    assert any(p.abs().sum() > 0 for p in trained_weights.values())  # the adapter learned something
    for name, parameter in trained_weights.items():
        assert torch.equal(parameter.detach(), loaded_weights[name].detach())


def test_pyfunc_refuses_a_missing_or_different_base(trained, tmp_path, monkeypatch, tiny_llama_dir):
    import shutil

    import mlflow
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.core.errors import TonetuneError

    uri = trained["result"].model_uri
    monkeypatch.setenv("TONETUNE_BASE_MODEL_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(TonetuneError, match="not found at"):
        mlflow.pyfunc.load_model(uri)
    other = tmp_path / "other_base"
    shutil.copytree(tiny_llama_dir, other)
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(other)
    monkeypatch.setenv("TONETUNE_BASE_MODEL_DIR", str(other))
    with pytest.raises(TonetuneError, match="weights sha256"):
        mlflow.pyfunc.load_model(uri)


# --------------------------------------------------------------------------- int8
def test_int8_path_gives_lora_gradients_on_cpu(tmp_path, tiny_llama_dir):
    """bitsandbytes 8-bit base (lm_head skipped, kept bf16), bf16 LoRA weights; one training
    step through the real collator gives non-zero gradients on every LoRA weight."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoTokenizer

    from pipeline.core.modeling import load_base_model
    from pipeline.train import attach_lora, build_trainer, conversational_examples

    config = tiny_config(tmp_path)
    base = load_base_model(tiny_llama_dir, "int8", config.train.int8_threshold)
    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert base.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8
    assert base.lm_head.weight.dtype == torch.bfloat16
    model = attach_lora(base, 8, config.train, "int8")
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in name for name in lora)
    assert {p.dtype for p in lora.values()} == {torch.bfloat16}
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    trainer = build_trainer(
        model, tokenizer, conversational_examples(pd.DataFrame(toy_rows()[:4])),
        tiny_point("int8"), config.train, tmp_path / "out",
    )
    batch = trainer.data_collator([trainer.train_dataset[index] for index in range(4)])
    with torch.no_grad():  # lora_B starts at zero: give it a value so lora_A gets a gradient too
        for name, parameter in lora.items():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in lora.items():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, tiny_llama_dir, mlflow_uri):
    """bf16: stop after step 4 (checkpoint at step 3), re-run: training restarts at step 3 in the
    same MLflow run and continues exactly like an uninterrupted run (same losses, same final
    adapter), with the adapter still bf16 and the optimizer still updating it.

    Exactness is what catches transformers' default PEFT resume, which swaps the bf16 LoRA
    parameters for new fp32 ones behind the optimizer's back (the loss then stalls).
    Slow: three tiny trainings (reference, interrupted, resumed) with their MLflow runs and two
    pyfunc model logs, 40-70 s on 2 shared cores."""
    import torch
    from mlflow import MlflowClient
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from pipeline.train import train_grid_point

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt("simulated Ctrl-C after step 4")

    config = tiny_config(tmp_path, {"save_steps": 3})
    point = tiny_point("bf16")
    reference_paths = paths_for(point, tmp_path / "reference", tiny_llama_dir)
    paths = paths_for(point, tmp_path / "interrupted", tiny_llama_dir)
    for root in (tmp_path / "reference", tmp_path / "interrupted"):
        write_splits(root / "splits")
    reference = train_grid_point(point, config, reference_paths)

    with pytest.raises(KeyboardInterrupt):
        train_grid_point(point, config, paths, callbacks=[Interrupt()])
    assert (paths.checkpoint_dir / "checkpoint-3" / "trainer_state.json").is_file()
    assert not paths.adapter_dir.exists()
    client = MlflowClient()
    killed = client.search_runs(client.get_experiment_by_name("tonetune-tests").experiment_id,
                                filter_string="attributes.status = 'KILLED'")
    assert len(killed) == 1

    result = train_grid_point(point, config, paths)
    assert result.resumed_at_step == 3
    assert [record["step"] for record in result.history] == list(range(4, EXPECTED_STEPS + 1))
    expected = {record["step"]: record for record in reference.history}
    for record in result.history:
        assert record["train_loss"] == pytest.approx(expected[record["step"]]["train_loss"], rel=1e-6)
        assert record["learning_rate"] == pytest.approx(expected[record["step"]]["learning_rate"], rel=1e-9)
    assert {p.dtype for n, p in result.model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    resumed_weights = load_file(paths.adapter_dir / "adapter_model.safetensors")
    reference_weights = load_file(reference_paths.adapter_dir / "adapter_model.safetensors")
    assert resumed_weights.keys() == reference_weights.keys()
    assert all(torch.equal(resumed_weights[key], reference_weights[key]) for key in reference_weights)

    assert result.run_id == killed[0].info.run_id
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_at_step"] == "3"
    assert not paths.checkpoint_dir.exists()


@pytest.mark.slow
def test_cli_stops_on_sigterm_and_resumes_when_run_again(tmp_path, tiny_llama_dir, write_params):
    """The real entry point, twice: SIGTERM after the first checkpoint exits 130 with one line
    saying how to resume and marks the MLflow run KILLED; the same command then resumes into the
    same run and writes the adapter. Slow: two fresh interpreters importing torch, TRL and MLflow
    (~15 s each here) plus 24 tiny training steps."""
    import signal
    import time

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_params({
        "train": {**TRAIN_OVERRIDES, "epochs": 8, "save_steps": 2},
        "tracking": {"tracking_uri": uri, "artifact_root": str(tmp_path / "mlartifacts"), "experiment": "cli"},
        "evaluate": {"max_new_tokens": 8},
    })
    write_splits(tmp_path / "data" / "splits")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(tiny_llama_dir)
    arguments = ["--precision", "fp32", "--lora-r", "8", "--learning-rate", "0.01", "--n-train", str(N_TRAIN)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO_ROOT)]))
    command = [sys.executable, "-m", "pipeline.train", *arguments]
    checkpoint = tmp_path / "models" / ".checkpoints" / "lora-fp32-r8-lr0.01-n20" / "checkpoint-2" / "trainer_state.json"

    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted; checkpoints are in models/.checkpoints/")
    mlflow.set_tracking_uri(uri)
    [killed] = mlflow.search_runs(experiment_names=["cli"], filter_string="tags.`tonetune.role` = 'train'",
                                  output_format="list")
    assert killed.info.status == "KILLED"

    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "resuming from models/.checkpoints/lora-fp32-r8-lr0.01-n20/checkpoint-" in completed.stdout
    assert "models/adapters/lora-fp32-r8-lr0.01-n20" in completed.stdout.strip().splitlines()[-1]
    [run] = mlflow.search_runs(experiment_names=["cli"], filter_string="tags.`tonetune.role` = 'train'",
                               output_format="list")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert (tmp_path / "models" / "adapters" / "lora-fp32-r8-lr0.01-n20" / "adapter_model.safetensors").is_file()


def test_checkpoints_of_another_config_are_discarded(tmp_path):
    from pipeline.train import find_resume_state, write_checkpoint_state

    folder = tmp_path / ".checkpoints" / "lora-x"
    write_checkpoint_state(folder, "fingerprint-a", "run-1", "lora-x")
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-6").mkdir()  # incomplete (killed while saving): ignored
    state = find_resume_state(folder, "fingerprint-a")
    assert state.checkpoint == folder / "checkpoint-4" and state.mlflow_run_id == "run-1"
    assert (tmp_path / ".checkpoints" / ".gitignore").read_text().strip().endswith("*")
    assert find_resume_state(folder, "fingerprint-b").checkpoint is None
    assert not folder.exists()


# --------------------------------------------------------------------------- bad input
def run_cli(arguments: list[str], cwd: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(extra_env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO_ROOT)]))
    return subprocess.run(
        [sys.executable, "-m", "pipeline.train", *arguments], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=120,
    )


@pytest.fixture
def project(tmp_path, write_params):
    """A working directory with params, splits for n=20 and a (config-only) base model folder:
    everything the input checks look at, nothing that would let training start."""
    write_params({"tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    write_splits(tmp_path / "data" / "splits")
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "config.json").write_text("{}")
    return tmp_path


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--precision", "bf16", "--lora-r", "0", "--learning-rate", "0.001", "--n-train", "20"], "--lora-r must be a positive"),
        (["--precision", "bf16", "--lora-r", "-8", "--learning-rate", "0.001", "--n-train", "20"], "--lora-r must be a positive"),
        (["--precision", "bf16", "--lora-r", "8", "--learning-rate", "0", "--n-train", "20"], "--learning-rate must be a positive"),
        (["--precision", "bf16", "--lora-r", "8", "--learning-rate=-1e-3", "--n-train", "20"], "--learning-rate must be a positive"),
        (["--precision", "fp16", "--lora-r", "8", "--learning-rate", "0.001", "--n-train", "20"], "unknown precision 'fp16'"),
        (["--precision", "bf16", "--lora-r", "8", "--learning-rate", "0.001", "--n-train", "999"], "no training split for --n-train 999"),
        (["--precision", "bf16", "--lora-r", "eight", "--learning-rate", "0.001", "--n-train", "20"], "invalid int value"),
        (["--precision", "bf16", "--lora-r", "8", "--n-train", "20"], "required: --learning-rate"),
    ],
)
def test_bad_input_fails_with_one_line(project, arguments, message):
    completed = run_cli(arguments, project)
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], completed.stderr
    assert not (project / "models" / "adapters").exists()


def test_int8_without_bitsandbytes_fails_with_one_line(project, tmp_path):
    """A bitsandbytes that cannot be imported (shadowed by a package that raises ImportError)."""
    shadow = tmp_path / "shadow" / "bitsandbytes"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named bitsandbytes (simulated)')\n")
    arguments = ["--precision", "int8", "--lora-r", "8", "--learning-rate", "0.001", "--n-train", "20"]
    completed = run_cli(arguments, project, {"PYTHONPATH": str(shadow.parent)})
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and "int8 needs bitsandbytes" in lines[0], completed.stderr


def test_missing_base_model_fails_with_one_line(project):
    import shutil

    shutil.rmtree(project / "models" / "base")
    arguments = ["--precision", "fp32", "--lora-r", "8", "--learning-rate", "0.001", "--n-train", "20"]
    completed = run_cli(arguments, project)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == ["error: base model not found at models/base (run `dvc repro base_model`)"]


def test_help_is_fast_and_imports_nothing_heavy():
    completed = subprocess.run(
        [sys.executable, "-c", "import sys, pipeline.train; print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'mlflow') if m in sys.modules))"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    assert completed.stdout.strip() == "[]"
