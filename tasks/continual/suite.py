"""`python -m lightning_moe suite --config configs/continual/suite.yaml`: the continual-learning
benchmark suite. It trains every method x seed over one stream, resumably, and writes the
tables.

Each run is `fit --config <stream> --config <method>` with the run's seed (for the model and the
stream's subsets and shuffling). It writes to `<output_dir>/<method>/seed<seed>/`: the accuracy
matrix (json and npy), per-task adapter folders, Lightning's `checkpoints/last.ckpt` and
TensorBoard logs. A run whose matrix is complete is skipped. A run with a checkpoint resumes from
it, at the epoch (and so the task) where it stopped, so a killed suite continues when the same
command runs again. At the end, `results.md` and `results.csv` hold mean ± std over seeds of
every metric, with zero-shot CLIP (each seed's zero-shot matrix) as the reference row.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.utilities import rank_zero_info

from lightning_moe.cli import main as cli_main
from lightning_moe.errors import UserInputError
from lightning_moe.tasks.continual.report import RECORD_FILE, ContinualRecord, mean_std_table

ZERO_SHOT = "zero-shot"


def run_suite(
    stream: str,
    methods: dict[str, str],
    seeds: list[int] | None = None,
    output_dir: str = "runs/continual/suite",
    overrides: list[str] | None = None,
) -> str:
    """Train every method on the stream for every seed, then tabulate.

    Args:
        stream: Fit config of the stream: trainer, data and the model's CLIP.
        methods: Method name -> fit config that adds its adapters (and callbacks) to the stream's.
        seeds: One run per seed and method.
        output_dir: Where runs and tables go.
        overrides: Extra `fit` arguments for every run (e.g. a smaller stream).

    Returns:
        The markdown table.
    """
    seeds = [0, 1, 2] if seeds is None else list(seeds)
    check_suite(stream, methods, seeds)
    overrides = list(overrides or [])
    for config in methods.values():  # every config parses before anything trains
        cli_main(["--config", stream, "--config", config, *overrides], run=False)
    runs = [(method, config, seed) for method, config in methods.items() for seed in seeds]
    for index, (method, config, seed) in enumerate(runs):
        progress = {"run": index + 1, "runs": len(runs), "method": method, "seed": seed}
        run_method(stream, config, seed, Path(output_dir) / method / f"seed{seed}", overrides, progress)
    return write_tables(Path(output_dir), list(methods), seeds)


def check_suite(stream: str, methods: dict[str, str], seeds: list[int]) -> None:
    missing = [path for path in [stream, *methods.values()] if not Path(path).is_file()]
    if missing:
        raise UserInputError(f"suite config files not found: {missing}")
    if not methods or ZERO_SHOT in methods:
        raise UserInputError(
            f"methods must name at least one method config, and not {ZERO_SHOT!r} (every run measures "
            f"zero-shot CLIP), got {sorted(methods)}"
        )
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserInputError(f"seeds must be distinct and at least one, got {seeds}")


def run_method(
    stream: str, config: str, seed: int, folder: Path, overrides: list[str], progress: dict | None = None
) -> None:
    """One method x seed run, skipped when its matrix is complete and resumed from its last
    checkpoint when it has one; `progress` ({run, runs, method, seed}) labels its progress lines."""
    progress = progress or {"run": 1, "runs": 1, "method": Path(config).stem, "seed": seed}
    label = f"[run {progress['run']}/{progress['runs']}] {progress['method']} seed {seed}"
    if (folder / RECORD_FILE).is_file() and ContinualRecord.read(folder).complete:
        rank_zero_info(f"{label}: done earlier, skipped ({folder})")
        return
    last = folder / "checkpoints" / "last.ckpt"
    resume = [f"--ckpt_path={last}"] if last.is_file() else []
    rank_zero_info(f"{label}: {'resuming from ' + str(last) if resume else 'starting'} ({folder})")
    cli_main(
        [
            "fit",
            "--config",
            stream,
            "--config",
            config,
            *overrides,
            f"--seed_everything={seed}",
            f"--data.init_args.seed={seed}",
            "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
            f"--trainer.logger.init_args.save_dir={folder}",
            "--trainer.logger.init_args.name=",
            "--trainer.logger.init_args.version=",
            "--trainer.callbacks+=lightning_moe.tasks.continual.callbacks.SuiteRunProgress",
            *(f"--trainer.callbacks.{key}={value}" for key, value in progress.items()),
            *resume,
        ]
    )


def write_tables(output_dir: Path, methods: list[str], seeds: list[int]) -> str:
    """results.md and results.csv: mean ± std over seeds, zero-shot CLIP first."""
    records = {
        method: [ContinualRecord.read(output_dir / method / f"seed{seed}") for seed in seeds]
        for method in methods
    }
    results = {ZERO_SHOT: [record.zero_shot_summary() for record in records[methods[0]]]}
    results |= {method: [record.summary() for record in runs] for method, runs in records.items()}
    markdown, table = mean_std_table(results)
    (output_dir / "results.md").write_text(markdown)
    (output_dir / "results.csv").write_text(table)
    rank_zero_info(f"suite results in {output_dir / 'results.md'}:\n{markdown}")
    return markdown


def main(args: list[str] | None = None) -> str:
    """run the continual-learning suite: every method x seed over one stream, resumable, then the tables"""
    parser = ArgumentParser(prog="python -m lightning_moe suite", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(run_suite)
    settings = parser.parse_args(args).as_dict()
    settings.pop("config", None)
    return run_suite(**settings)
