"""bench/train.py and bench/gpu_check.py, run as a user runs them (subprocesses, real models).

bench/train.py: refuses more examples than the data has (one line), says up front when mlflow
is missing (pipeline.train's attach_lora imports registry.model), and names the base model it
measured. bench/gpu_check.py: its CPU dry run (a tiny random model of the paper's shape) drives the real
train and evaluate stages through their command lines and prints every figure it promises.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def run_script(args: list[str], timeout: float = 600, code: str | None = None, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="")
    env.pop("TONETUNE_PARAMS", None)
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def named_tiny_base(tiny_llama_dir, tmp_path):
    """The tiny Llama with a provenance file naming what it is."""
    folder = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "tonetune_base.json").write_text(json.dumps({"upstream": "tests/tiny-llama", "parameters": 3_300_000}))
    return folder


def test_bench_train_refuses_more_examples_than_the_data_has(named_tiny_base):
    result = run_script(["bench/train.py", "--examples", "100000", "--base-model-dir", str(named_tiny_base)])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --examples 100000 but "), result.stderr
    assert "rows: use --examples" in lines[0]
    assert result.stdout == ""


def test_bench_train_without_mlflow_says_why_in_one_line(named_tiny_base):
    code = ("import runpy, sys\nsys.modules['mlflow'] = None  # as if not installed\n"
            "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    result = run_script(["bench/train.py", "--examples", "4", "--base-model-dir", str(named_tiny_base)], code=code)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "install mlflow" in lines[0] and "registry.model" in lines[0], result.stderr


def test_bench_train_names_the_base_model_it_measured(named_tiny_base):
    result = run_script(["bench/train.py", "--examples", "4", "--rounds", "1", "--precision", "fp32",
                         "--base-model-dir", str(named_tiny_base)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "base model: tests/tiny-llama" in result.stdout
    assert "LoRA training throughput, tests/tiny-llama" in result.stdout
    assert "SmolLM2" not in result.stdout.split("## train", 1)[1]
    assert "| ours | 1 |" in result.stdout and "| naive | 1 |" in result.stdout


@pytest.mark.slow
def test_gpu_check_cpu_dry_run(tmp_path):
    """`bench/gpu_check.py --tiny --device cpu --shapes llama1b`: the paper's shape, tiny, runs its
    four stage processes (train bf16, train int8, predict, score), each importing
    torch/transformers/trl/mlflow, so this takes over a minute on two shared cores (hence slow).
    The other shape, smol135m, runs the same code with other numbers in its config (checked
    below without running it): running both took 150-170 s of a suite kept under 20 minutes."""
    out = tmp_path / "out"
    result = run_script(["bench/gpu_check.py", "--tiny", "--device", "cpu", "--shapes", "llama1b", "--out", str(out)],
                        timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["failed"] == []
    assert set(summary["shapes"]) == {"llama1b"}
    for shape in summary["shapes"].values():
        assert set(shape["stages"]) == {"train-bf16", "train-int8", "predict", "score"}
        assert all(stage["returncode"] == 0 for stage in shape["stages"].values())
        assert "python -m pipeline.train --precision int8" in shape["stages"]["train-int8"]["command"]
        for precision in ("bf16", "int8"):
            assert shape["train"][precision]["tokens_per_s"] > 0
            assert shape["train"][precision]["tokens_per_example"] > 10
        assert set(shape["generation"]) == {"base", "adapter-bf16", "adapter-int8"}
        assert all(rate > 0 for rate in shape["generation"].values())
    # Both shapes stay in the script, and the 1B stand-in is wider than the 135M one, also when tiny.
    shapes = run_script([], code="import json, sys; sys.path.insert(0, 'bench'); import gpu_check as g; "
                        "print(json.dumps({name: g.tiny(shape(), hidden) for name, (_, shape, hidden) in g.SHAPES.items()}))")
    assert shapes.returncode == 0, shapes.stderr[-2000:]
    tiny_shapes = json.loads(shapes.stdout.strip().splitlines()[-1])
    assert set(tiny_shapes) == {"smol135m", "llama1b"}
    assert tiny_shapes["llama1b"]["hidden_size"] > tiny_shapes["smol135m"]["hidden_size"]
    assert summary["shapes"]["llama1b"]["model"]["hidden"] == tiny_shapes["llama1b"]["hidden_size"]
    grid = summary["paper_grid"]
    assert grid["points"] == 72 and grid["epochs"] == 5 and grid["n_train"] == [100, 1000, 5000, 9000]
    assert grid["train_gpu_hours"] > 0 and grid["eval_gpu_hours_upper_bound"] > 0
    assert "hours on this CPU (a dry run: not a GPU figure) of training" in result.stdout
    assert "| predict |" in result.stdout and "| score |" in result.stdout


def test_gpu_wheels_slims_bitsandbytes_to_the_cuda_libraries_asked_for(tmp_path):
    """A wheel shaped like bitsandbytes' (one native library per toolkit, RECORD listing them)."""
    import zipfile

    libraries = ["cpu", "cuda118", "cuda126", "cuda130", "cuda132", "rocm63", "xpu"]
    wheel = tmp_path / "in" / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    wheel.parent.mkdir()
    record = [f"bitsandbytes/libbitsandbytes_{name}.so,sha256=x,3" for name in libraries] + ["bitsandbytes/__init__.py,,"]
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in libraries:
            archive.writestr(f"bitsandbytes/libbitsandbytes_{name}.so", b"elf")
        archive.writestr("bitsandbytes/__init__.py", "")
        archive.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "\n".join(record) + "\n")
    result = run_script(["bench/gpu_wheels.py", "slim-bnb", str(wheel), str(tmp_path / "out"), "--cuda", "130"])
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(tmp_path / "out" / wheel.name) as archive:
        names = set(archive.namelist())
        kept_record = archive.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert {n for n in names if n.endswith(".so")} == {"bitsandbytes/libbitsandbytes_cpu.so",
                                                       "bitsandbytes/libbitsandbytes_cuda130.so"}
    assert "cuda118" not in kept_record and "libbitsandbytes_cuda130.so" in kept_record
    assert "bitsandbytes/__init__.py" in names


def test_gpu_check_refuses_bad_arguments_in_one_line(tmp_path):
    for args, fragment in [(["--site", str(tmp_path / "nowhere")], "no such folder"),
                           (["--shapes", "gpt5"], "choose from smol135m, llama1b")]:
        result = run_script(["bench/gpu_check.py", "--tiny", "--device", "cpu", *args], timeout=300)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
