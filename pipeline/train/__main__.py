"""Stage `train`, the command line: parse the grid point, check it and its inputs, train it.

    python -m pipeline.train --precision int8 --lora-r 32 --learning-rate 0.001 --n-train 150

Owns: argument parsing (usage errors are one-line TonetuneErrors), SIGTERM handled like Ctrl-C
(the MLflow run is marked KILLED, checkpoints stay), and the one-line summary.

Not here: anything the training does (run.train_grid_point and the modules it uses).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from pipeline.core.config import BASE_MODEL_DIR, load_config
from pipeline.core.contracts import GridPoint
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.modeling import PRECISIONS
from pipeline.train.inputs import TrainPaths, check_inputs, validate_grid_point
from pipeline.train.run import train_grid_point


# --------------------------------------------------------------------------- CLI
class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line TonetuneErrors (exit 2, no usage dump)."""

    def error(self, message: str):
        raise TonetuneError(f"{self.prog}: {message}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _ArgumentParser(
        prog="python -m pipeline.train",
        description="Stage train: LoRA fine-tuning of models/base on one grid point; the adapter goes to "
        "models/adapters/lora-<precision>-r<R>-lr<LR>-n<N>/ (params: train.*).",
    )
    parser.add_argument("--precision", required=True, help=f"one of {', '.join(PRECISIONS)}")
    parser.add_argument("--lora-r", type=int, required=True, help="LoRA rank (alpha = r)")
    parser.add_argument("--learning-rate", type=float, required=True, help="OneCycleLR max_lr")
    parser.add_argument("--n-train", type=int, required=True, help="training subset size (data/splits/train_<N>.parquet)")
    parser.add_argument("--adapter-dir", type=Path, default=None, help="output folder (default models/adapters/<run-name>)")
    parser.add_argument("--base-model-dir", type=Path, default=BASE_MODEL_DIR, help="base model folder")
    return parser.parse_args(argv)


def _interrupt(signum, frame):
    """SIGTERM handler: unwind like Ctrl-C, so the MLflow run is marked KILLED (checkpoints stay)."""
    raise KeyboardInterrupt(f"signal {signum}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config()
    point = GridPoint(args.precision, args.lora_r, args.learning_rate, args.n_train)
    validate_grid_point(point)
    paths = TrainPaths.for_point(point, args.adapter_dir, args.base_model_dir)
    check_inputs(point, paths)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, _interrupt)  # `dvc queue kill`, a scheduler: stop like Ctrl-C
    try:
        result = train_grid_point(point, config, paths)
    except KeyboardInterrupt:
        print(
            f"error: interrupted; checkpoints are in {paths.checkpoint_dir}: run the same command again to resume",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    losses = [f"{record['train_loss']:.3f}" for record in result.history]
    print(
        f"train {result.run_name}: {result.total_steps} steps, loss {losses[0] if losses else '?'} -> "
        f"{losses[-1] if losses else '?'}, {result.metrics['tokens_per_s']:.0f} tokens/s, "
        f"peak {result.metrics['peak_memory_mb']:.0f} MiB, {result.metrics['wall_time_s']:.0f} s "
        f"-> {result.adapter_dir} (MLflow run {result.run_id})"
    )


if __name__ == "__main__":
    main()
