"""GPU check: the real train, predict and score stages on randomly initialised models, and what the
paper's grid would cost (`make gpu-check`).

    .venv/bin/python bench/gpu_check.py                         # a CUDA machine, no network needed
    .venv/bin/python bench/gpu_check.py --tiny --device cpu     # CPU dry run (tests run this)
    .venv/bin/python bench/gpu_check.py --out results/          # also write gpu_check.json there

For each of two model shapes, built here with random weights (throughput needs no trained
weights, and the machine needs no network):

  smol135m  SmolLM2-135M-Instruct's configuration (30 layers, hidden 576, 134.5M parameters)
  llama1b   Llama-3.2-1B's shapes (16 layers, hidden 2048, 32 heads / 8 KV heads) with SmolLM2's
            tokenizer and vocabulary (49,152 tokens), ~1.07B parameters

it makes a throw-away project folder (params composed from params.yaml + profiles/paper.yaml's
train/evaluate settings, splits from the demo recordings, the model as models/base) and runs the
stages there through their command lines, exactly as `dvc repro` would:

  python -m pipeline.train --precision bf16 ...   and   --precision int8 ...
  python -m pipeline.predict, then pipeline.score  (the base + both adapters, batched generation)

and reads back what they logged to MLflow (training tokens/s, generation tokens/s) plus the peak
GPU memory of each stage process. From the 1B figures (the paper's model size) it estimates the
GPU-hours of profiles/paper.yaml's grid: every point's n_train x epochs x tokens per example,
divided by the measured training tokens/s of its precision, plus evaluating every model on the
validation split at evaluate.max_new_tokens per answer.

What random weights change: losses mean nothing; generation almost never emits the end-of-turn
token, so every answer runs to max_new_tokens (an upper bound for evaluation time); int8 sees no
outlier activations (LLM.int8's fp16 decomposition is rarely taken), so it may look faster than
with real weights. lora_r and the learning rate are taken not to change throughput.

Needs the project's environment (`make setup ALLOW_CUDA=1` on a GPU machine); the preflight
names anything missing in one line. Exit 0 when every stage ran; 1 when one failed (its output
tail is printed); 2 on bad arguments or a missing dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pipeline.core.config import deep_merge  # noqa: E402

REQUIRED_MODULES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "mlflow",
                    "sentence_transformers", "textstat", "pydantic", "pandas", "pyarrow")
MIN_TRANSFORMERS = (5, 23)
PRECISIONS = ("bf16", "int8")
LORA_R, LEARNING_RATE = 32, 0.001
RESULT_MARKER = "GPU_CHECK_STAGE "
RANDOM_RECIPE = "random weights: torch.manual_seed(0) and the config's initializer_range (0.02)"


class CheckError(Exception):
    """Bad arguments or environment: one line, exit 2."""


# --------------------------------------------------------------------------- shapes


def smollm2_135m_shape() -> dict:
    """SmolLM2-135M-Instruct's config.json (the model the demo fine-tunes)."""
    return dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 100000.0})


def llama_1b_shape() -> dict:
    """Llama-3.2-1B(-Instruct)'s shapes (the paper's model); its vocabulary is replaced by SmolLM2's."""
    return dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


def tiny(shape: dict, hidden: int) -> dict:
    """Two layers, narrow: a CPU dry run of the same code path."""
    return {**shape, "hidden_size": hidden, "intermediate_size": hidden * 2, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": hidden // 4}


SHAPES = {
    "smol135m": ("SmolLM2-135M-Instruct", smollm2_135m_shape, 64),
    "llama1b": ("Llama-3.2-1B", llama_1b_shape, 96),
}


def load_tokenizer(tokenizer_dir: Path | None):
    """SmolLM2's tokenizer and chat template: from --tokenizer-dir, else the packaged GGUF."""
    from transformers import AutoTokenizer

    if tokenizer_dir is not None:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    from pipeline.core.assets import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def build_model(name: str, tokenizer, folder: Path, tiny_shapes: bool, device: str = "cpu") -> dict:
    """A random-weight Llama of shape `name`, saved as an HF folder with SmolLM2's tokenizer and a
    provenance file naming what it stands for. Returns its description."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    label, shape_of, tiny_hidden = SHAPES[name]
    shape = tiny(shape_of(), tiny_hidden) if tiny_shapes else shape_of()
    config = LlamaConfig(
        vocab_size=len(tokenizer), tie_word_embeddings=True, hidden_act="silu", attention_bias=False,
        mlp_bias=False, initializer_range=0.02, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1B parameters is much faster on the GPU
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    stands_for = f"{label} shape{' (tiny)' if tiny_shapes else ''}, random weights"
    (folder / "tonetune_base.json").write_text(json.dumps({
        "source": "gpu_check", "upstream": f"random-{name}{'-tiny' if tiny_shapes else ''}", "stands_for": stands_for,
        "weights": RANDOM_RECIPE, "architecture": "LlamaForCausalLM", "parameters": parameters, "dtype": "bfloat16",
    }, indent=2) + "\n")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"name": name, "stands_for": stands_for, "parameters": parameters,
            "layers": shape["num_hidden_layers"], "hidden": shape["hidden_size"], "vocab": len(tokenizer)}


# --------------------------------------------------------------------------- the project folder


def demo_examples() -> list[dict]:
    """Question + final conversational answer of every demo recording (the demo's training data)."""
    rows = []
    for part in sorted((REPO_ROOT / "recordings" / "demo").glob("part-*.jsonl")):
        for line in part.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                rows.append({"id": str(record.get("id", len(rows))), "question": record["question"],
                             "answer": record["rephrasings"][-1]})
    if not rows:
        raise CheckError("recordings/demo has no recordings to build the splits from")
    return rows


def write_splits(project: Path, n_train: int, n_val: int) -> dict:
    """data/splits/train_<n>.parquet and val.parquet from the demo rows (repeated, and said so,
    when more are asked for than there are)."""
    import pandas as pd

    rows = demo_examples()
    needed = n_train + n_val
    repeats = -(-needed // len(rows))
    pool = [dict(row, id=f"{row['id']}-{copy}") for copy in range(repeats) for row in rows][:needed]
    splits = project / "data" / "splits"
    splits.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(pool[n_val:]).to_parquet(splits / f"train_{n_train}.parquet", index=False)
    pd.DataFrame(pool[:n_val]).to_parquet(splits / "val.parquet", index=False)
    return {"demo_rows": len(rows), "train_rows": n_train, "val_rows": n_val,
            "repeated": needed > len(rows), "copies_of_each_row": repeats}


def composed_params(project: Path, args, n_train: int) -> dict:
    """The demo params with profiles/paper.yaml's train/evaluate settings deep-merged over them
    (the paper's sequence length, batch and generation length), then this check's own grid,
    sizes and MLflow store. Embeddings stay the demo's packaged model (no network)."""
    import yaml

    demo = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    paper = yaml.safe_load((REPO_ROOT / "profiles" / "paper.yaml").read_text())
    params = deep_merge(demo, {"train": paper.get("train", {}), "evaluate": paper.get("evaluate", {})})
    overrides = {
        "tracking": {"tracking_uri": f"sqlite:///{project / 'mlflow.db'}", "artifact_root": str(project / "mlartifacts")},
        "split": {"val_size": args.val, "train_sizes": [n_train]},
        "train": {"grid": {"precision": list(PRECISIONS), "lora_r": [LORA_R], "learning_rate": [LEARNING_RATE],
                           "n_train": [n_train]},
                  "epochs": args.epochs, "save_steps": 10**6},
        "evaluate": {"limit": args.val, "device": args.device},
    }
    if args.max_new_tokens:
        overrides["evaluate"]["max_new_tokens"] = args.max_new_tokens
    if args.eval_batch_size:
        overrides["evaluate"]["batch_size"] = args.eval_batch_size
    if args.max_seq_length:
        overrides["train"]["max_seq_length"] = args.max_seq_length
    return deep_merge(params, overrides)


# --------------------------------------------------------------------------- running a stage

# Runs `python -m <module> <args>` unchanged, and on exit prints the process's peak GPU memory
# (torch.cuda.max_memory_allocated, if torch and CUDA were used) and peak resident memory.
PROBE = """
import atexit, json, resource, runpy, sys
def _report():
    peak = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated() / 2**20
    print("{marker}" + json.dumps({{"peak_gpu_mib": peak,
          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}), flush=True)
atexit.register(_report)
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@dataclass
class StageRun:
    command: str
    returncode: int
    seconds: float
    output: str
    peak: dict = field(default_factory=dict)


def run_stage(project: Path, module: str, args: list[str], device: str, timeout: float) -> StageRun:
    env = dict(os.environ)
    env.update({
        # The project, then the caller's path (with --site's carried packages): all before site-packages.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        "TONETUNE_PARAMS": str(project / "params.yaml"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the stages pick CUDA whenever they see it
    command = [sys.executable, "-c", PROBE.format(marker=RESULT_MARKER), module, *args]
    shown = f"python -m {module} {' '.join(args)}".strip()
    print(f"  $ {shown}", flush=True)
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
        returncode, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        returncode = 124
        output = (error.stdout or b"").decode(errors="replace") if isinstance(error.stdout, bytes) else (error.stdout or "")
        output += f"\n(timed out after {timeout:.0f} s)"
    seconds = time.perf_counter() - started
    peak = {}
    for line in output.splitlines():
        if line.startswith(RESULT_MARKER):
            peak = json.loads(line[len(RESULT_MARKER):])
    return StageRun(shown, returncode, seconds, output, peak)


def mlflow_metrics(project: Path) -> dict[str, dict[str, float]]:
    """run name -> metrics, from the throw-away project's MLflow store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    metrics = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            metrics[run.info.run_name] = dict(run.data.metrics)
    return metrics


# --------------------------------------------------------------------------- one shape


def check_shape(name: str, args, tokenizer, workdir: Path) -> dict:
    project = workdir / name
    (project / "models").mkdir(parents=True)
    print(f"== {name}: building the random-weight model", flush=True)
    model = build_model(name, tokenizer, project / "models" / "base", args.tiny, args.device)
    print(f"   {model['stands_for']}: {model['parameters'] / 1e6:.1f}M parameters, {model['layers']} layers, "
          f"hidden {model['hidden']}", flush=True)
    data = write_splits(project, args.examples, args.val)
    if data["repeated"]:
        print(f"   note: {args.examples + args.val} rows asked for, the demo has {data['demo_rows']}: rows repeated "
              f"(up to {data['copies_of_each_row']} copies each)", flush=True)
    import yaml

    params = composed_params(project, args, args.examples)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    stages = {}
    for precision in PRECISIONS:
        stages[f"train-{precision}"] = run_stage(
            project, "pipeline.train",
            ["--precision", precision, "--lora-r", str(LORA_R), "--learning-rate", str(LEARNING_RATE),
             "--n-train", str(args.examples)],
            args.device, args.stage_timeout)
        if stages[f"train-{precision}"].returncode != 0:
            break
    if all(run.returncode == 0 for run in stages.values()):
        stages["predict"] = run_stage(project, "pipeline.predict", [], args.device, args.stage_timeout)
        if stages["predict"].returncode == 0:  # score logs the generation figures onto the runs
            stages["score"] = run_stage(project, "pipeline.score", [], args.device, args.stage_timeout)

    logged = mlflow_metrics(project) if (project / "mlflow.db").exists() else {}
    result = {"model": model, "data": data, "params": {"train": params["train"], "evaluate": params["evaluate"]},
              "stages": {}, "train": {}, "generation": {}}
    for stage, run in stages.items():
        result["stages"][stage] = {"command": run.command, "returncode": run.returncode,
                                   "seconds": round(run.seconds, 1), **run.peak}
        if run.returncode != 0:
            result["stages"][stage]["output_tail"] = run.output[-3000:]
    for precision in PRECISIONS:
        run_name = next((key for key in logged if key.startswith(f"lora-{precision}-")), None)
        if run_name and "tokens_per_s" in logged[run_name]:
            metrics = logged[run_name]
            result["train"][precision] = {
                "tokens_per_s": metrics["tokens_per_s"], "train_tokens": metrics.get("train_tokens"),
                "peak_memory_mib": metrics.get("peak_memory_mb"),
                "tokens_per_example": metrics["train_tokens"] / (args.examples * args.epochs)
                if metrics.get("train_tokens") else None,
            }
        if run_name and "eval_tokens_per_s" in logged.get(run_name, {}):
            result["generation"][f"adapter-{precision}"] = logged[run_name]["eval_tokens_per_s"]
    base_run = logged.get("eval-base", {})
    if "eval_tokens_per_s" in base_run:
        result["generation"]["base"] = base_run["eval_tokens_per_s"]
    return result


# --------------------------------------------------------------------------- the paper grid


def paper_grid_estimate(shape_result: dict) -> dict | None:
    """GPU-hours of profiles/paper.yaml's grid from one shape's measured throughput."""
    import yaml

    train = shape_result["train"]
    generation = shape_result["generation"]
    if not all(precision in train and train[precision]["tokens_per_example"] for precision in PRECISIONS):
        return None
    demo = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    paper = deep_merge(demo, yaml.safe_load((REPO_ROOT / "profiles" / "paper.yaml").read_text()))
    grid, epochs = paper["train"]["grid"], paper["train"]["epochs"]
    per_precision_configs = len(grid["lora_r"]) * len(grid["learning_rate"])
    points = len(grid["precision"]) * per_precision_configs * len(grid["n_train"])
    tokens_per_example = sum(train[p]["tokens_per_example"] for p in PRECISIONS) / len(PRECISIONS)
    train_hours = 0.0
    for precision in grid["precision"]:
        if precision not in train:
            return None
        tokens = per_precision_configs * sum(grid["n_train"]) * epochs * tokens_per_example
        train_hours += tokens / train[precision]["tokens_per_s"] / 3600
    models = points + 1  # every adapter and the base
    answer_tokens = models * paper["split"]["val_size"] * paper["evaluate"]["max_new_tokens"]
    rates = list(generation.values())
    eval_hours = answer_tokens / (sum(rates) / len(rates)) / 3600 if rates else None
    return {
        "points": points, "epochs": epochs, "n_train": grid["n_train"], "tokens_per_example": tokens_per_example,
        "train_gpu_hours": train_hours, "eval_gpu_hours_upper_bound": eval_hours,
        "val_size": paper["split"]["val_size"], "max_new_tokens": paper["evaluate"]["max_new_tokens"],
    }


# --------------------------------------------------------------------------- preflight and report


def preflight(device: str) -> dict:
    """Versions of what the stages need, the device, and (CUDA) one bitsandbytes int8 matmul."""
    import importlib
    import importlib.metadata

    missing = []
    versions = {}
    for module in REQUIRED_MODULES:
        try:
            importlib.import_module(module)
            versions[module] = importlib.metadata.version(module.replace("_", "-"))
        except Exception as error:  # noqa: BLE001 - any import failure means "cannot run"
            missing.append(f"{module} ({type(error).__name__})")
    if missing:
        raise CheckError(f"missing: {', '.join(missing)}; install the project's environment "
                         "(`make setup`, on a GPU machine `make setup ALLOW_CUDA=1`)")
    major_minor = tuple(int(part) for part in versions["transformers"].split(".")[:2])
    if major_minor < MIN_TRANSFORMERS:
        raise CheckError(f"transformers {versions['transformers']} is older than 5.23 (pipeline.train passes "
                         "activation_checkpointing=, new in 5.23.0): pip install 'transformers>=5.23'")
    import torch

    info = {"versions": versions, "torch_cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise CheckError("--device cuda but torch sees no CUDA device (use --device cpu for a dry run)")
        properties = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB, cc {properties.major}.{properties.minor}"
        import bitsandbytes as bnb

        layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False, threshold=6.0).to("cuda")
        output = layer(torch.randn(4, 64, device="cuda", dtype=torch.float16))
        info["bitsandbytes_int8"] = f"ok ({tuple(output.shape)})"
    else:
        info["gpu"] = "none (CPU run)"
    return info


def report_lines(machine: dict, shapes: dict, estimate: dict | None) -> list[str]:
    unit = "GPU-hours" if machine["device"] == "cuda" else "hours on this CPU (a dry run: not a GPU figure)"
    lines = [f"machine: {machine['gpu']}; torch {machine['versions']['torch']} (CUDA {machine['torch_cuda']}), "
             f"transformers {machine['versions']['transformers']}, bitsandbytes {machine['versions']['bitsandbytes']}"]
    lines.append("| model | stage | rc | wall s | training tokens/s | generation tokens/s | peak GPU MiB | peak RSS MiB |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for result in shapes.values():
        for stage, run in result["stages"].items():
            precision = stage.removeprefix("train-")
            train_rate = result["train"].get(precision, {}).get("tokens_per_s") if stage.startswith("train-") else None
            gen = ", ".join(f"{k} {v:.0f}" for k, v in result["generation"].items()) if stage == "predict" else ""
            peak_gpu = run.get("peak_gpu_mib")
            lines.append(
                f"| {result['model']['stands_for']} | {stage} | {run['returncode']} | {run['seconds']} | "
                f"{'' if train_rate is None else f'{train_rate:.0f}'} | {gen} | "
                f"{'-' if peak_gpu is None else f'{peak_gpu:.0f}'} | {run.get('peak_rss_mib', 0):.0f} |"
            )
    if estimate:
        eval_hours = estimate["eval_gpu_hours_upper_bound"]
        lines.append(
            f"paper grid estimate (from {estimate['source']}): {estimate['points']} points x n_train "
            f"{estimate['n_train']} x {estimate['epochs']} epochs at {estimate['tokens_per_example']:.0f} tokens/example: "
            f"{estimate['train_gpu_hours']:.1f} {unit} of training"
            + (f" + at most {eval_hours:.1f} {unit} evaluating {estimate['points'] + 1} models on "
               f"{estimate['val_size']} questions x {estimate['max_new_tokens']} new tokens" if eval_hours else "")
        )
    else:
        lines.append("paper grid estimate: not available (a training stage did not report tokens/s)")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--tiny", action="store_true", help="2-layer narrow models and tiny sizes (CPU dry run)")
    parser.add_argument("--shapes", default="smol135m,llama1b", help="comma-separated subset of smol135m,llama1b")
    parser.add_argument("--examples", type=int, help="training examples per point (default 640; --tiny 8)")
    parser.add_argument("--val", type=int, help="validation questions (default 128; --tiny 4)")
    parser.add_argument("--epochs", type=float, help="epochs per point (default 1)")
    parser.add_argument("--max-new-tokens", type=int, help="override evaluate.max_new_tokens (default: the paper's; --tiny 8)")
    parser.add_argument("--eval-batch-size", type=int, help="override evaluate.batch_size (default: the paper's; --tiny 4)")
    parser.add_argument("--max-seq-length", type=int, help="override train.max_seq_length (default: the paper's; --tiny 256)")
    parser.add_argument("--stage-timeout", type=float, default=1800, help="seconds per stage process")
    parser.add_argument("--tokenizer-dir", type=Path, help="SmolLM2 tokenizer folder (default: the packaged GGUF's)")
    parser.add_argument("--site", type=Path, help="folder of carried packages to put first on the path, here and in "
                        "the stages (see bench/gpu_wheels.py)")
    parser.add_argument("--out", type=Path, help="write gpu_check.json (and keep the project folders) here")
    args = parser.parse_args(argv)
    defaults = {"examples": 8, "val": 4, "epochs": 1, "max_new_tokens": 8, "eval_batch_size": 4, "max_seq_length": 256} \
        if args.tiny else {"examples": 640, "val": 128, "epochs": 1}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.site:
        args.site = args.site.resolve()
        sys.path.insert(0, str(args.site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.site), os.environ.get("PYTHONPATH")]))
    try:
        if args.site and not args.site.is_dir():
            raise CheckError(f"--site {args.site}: no such folder")
        shapes = [name.strip() for name in args.shapes.split(",") if name.strip()]
        unknown = sorted(set(shapes) - set(SHAPES))
        if unknown or not shapes:
            raise CheckError(f"--shapes {args.shapes}: choose from {', '.join(SHAPES)}")
        if args.examples < 1 or args.val < 1 or args.epochs <= 0:
            raise CheckError("--examples, --val and --epochs must be positive")
        if args.device == "auto":
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        machine = preflight(args.device)
        tokenizer = load_tokenizer(args.tokenizer_dir)
    except CheckError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"gpu-check on {machine['gpu']}: shapes {', '.join(shapes)}, {args.examples} examples x {args.epochs} epoch(s), "
          f"{args.val} validation questions", flush=True)
    workdir = args.out / "projects" if args.out else Path(tempfile.mkdtemp(prefix="tonetune-gpu-check-"))
    if args.out and workdir.exists():
        shutil.rmtree(workdir)
    results = {}
    try:
        for name in shapes:
            results[name] = check_shape(name, args, tokenizer, workdir)
    finally:
        if not args.out:
            shutil.rmtree(workdir, ignore_errors=True)
    source = "llama1b" if "llama1b" in results else shapes[0]
    estimate = paper_grid_estimate(results[source])
    if estimate:
        estimate["source"] = f"{results[source]['model']['stands_for']}"
    lines = report_lines(machine, results, estimate)
    print("\n".join(lines))
    failed = [f"{name} {stage}" for name, result in results.items()
              for stage, run in result["stages"].items() if run["returncode"] != 0]
    for name, result in results.items():
        for stage, run in result["stages"].items():
            if run["returncode"] != 0:
                print(f"--- {name} {stage} failed (rc {run['returncode']}); last output:\n{run['output_tail'][-1500:]}",
                      file=sys.stderr)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine,
                   "args": {k: str(v) for k, v in vars(args).items()}, "shapes": results, "paper_grid": estimate,
                   "report": lines, "failed": failed}
        (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.out / 'gpu_check.json'}")
    if failed:
        print(f"error: stage(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
