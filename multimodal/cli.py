"""The ``lightning`` console script: a LightningCLI for every recipe in ``configs/``.

    lightning fit --config configs/tokenizer.yaml [--data.root DIR] [--trainer.devices 2]
    lightning test --config configs/tokenizer.yaml --ckpt_path runs/.../last.ckpt
    lightning fit --config a.yaml --config b.yaml --print_config

Model and data are ``class_path`` / ``init_args`` entries (any LightningModule / DataModule).
Runs go under ``runs/`` (``--trainer.default_root_dir DIR`` moves them) with a TensorBoard
logger; the resolved config is saved beside each run. ``test`` also writes the metrics to
``test_metrics.json`` and ``test_metrics.md`` in the run's log folder; ``predict`` writes each
task's outputs to ``predictions/<task>.jsonl`` (+ PNG/WAV files) there (``multimodal.writer``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from .allocator import tune_allocator
from .checkpoint import resolve_checkpoint
from .precision import resolve_precision
from .prerequisites import SetupError
from .prerequisites import check as check_prerequisites
from .progress import default_progress_bar
from .writer import PredictionWriter

DEFAULT_ROOT = "runs"


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_metrics_report(metrics: dict[str, Any], out_dir: str | os.PathLike, stem: str = "test_metrics") -> Path:
    """Write ``{stem}.json`` and a Markdown table ``{stem}.md`` into ``out_dir``; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = {k: _plain(v) for k, v in sorted(metrics.items())}
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(plain, indent=2) + "\n", encoding="utf-8")
    rows = ["| metric | value |", "| --- | --- |"]
    rows += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in plain.items()]
    (out_dir / f"{stem}.md").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


class MultimodalCLI(LightningCLI):
    """LightningCLI with this project's defaults and a metrics report after ``test``."""

    def _prepare_subcommand_parser(self, trainer_class: type, subcommand: str, **kwargs: Any) -> Any:
        """Default ``--weights_only true`` for fit/validate/test/predict: ``--ckpt_path`` checkpoints are
        read with ``torch.load(weights_only=True)`` (tensors and plain containers, no pickled code).
        ``--weights_only false`` is needed only for a checkpoint holding arbitrary Python objects, and
        is safe only with files you trust."""
        parser = super()._prepare_subcommand_parser(trainer_class, subcommand, **kwargs)
        if any(getattr(action, "dest", None) == "weights_only" for action in parser._actions):
            parser.set_defaults(weights_only=True)
        return parser

    def _parse_ckpt_path(self) -> None:
        """The model the user configured wins over the checkpoint's hyperparameters.

        Lightning's LightningCLI re-parses the model from ``--ckpt_path``'s saved hyperparameters on top
        of the parsed config, so every model setting of ``--config`` or the command line is silently
        replaced (``lightning test ... --model.init_args.heads.h.init_args.eval_samples 500`` evaluated
        the training run's 200). Here the checkpoint only fills in a model where none was configured;
        a configured model that does not fit the checkpoint fails at the state-dict load, by name.
        (A run folder as ``--ckpt_path`` never went through Lightning's step: now both agree.)"""
        sub = self.config.get("subcommand")
        model = self.config[sub].get("model") if sub else None
        if model is not None and model.get("class_path"):
            return
        super()._parse_ckpt_path()

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        """Add the progress bar that suits stdout (``multimodal.progress``) unless the config has one or
        turned progress bars off."""
        given = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, default_progress_bar()]
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        """``trainer.precision`` unset: bf16-mixed where the hardware has native bf16, else 32-true
        (``multimodal.precision``); bf16 asked for on hardware without it is refused here, at start."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_prerequisites(config)  # one line for a missing checkpoint, folder, model
        ckpt = config.get("ckpt_path")
        if isinstance(ckpt, str) and os.path.isdir(ckpt):  # a run folder: its newest last.ckpt
            config["ckpt_path"] = str(resolve_checkpoint(ckpt))
            rank_zero_info(f"ckpt_path {ckpt} -> {config['ckpt_path']}")
        trainer = config.get("trainer")
        if trainer is None:
            return
        trainer["precision"], why = resolve_precision(trainer.get("precision"), trainer.get("accelerator"))
        rank_zero_info(why)

    def after_test(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        out_dir = trainer.log_dir or trainer.default_root_dir
        path = write_metrics_report(trainer.callback_metrics, out_dir)
        print(f"test metrics written to {path}")


PROJECT_LOGGERS = ("multimodal", "tasks", "datamodules")

BENIGN_WARNINGS = (
    # ShardStream / CachedStream split their work by rank and worker themselves and know their length
    r"Your `IterableDataset` has `__len__` defined",
    # a frozen tokenizer is kept in eval mode on purpose (no codebook updates, no dropout)
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # short demo epochs: logging counts global steps across epochs, so it still happens
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # Lightning's own use of a torch API deprecated in this torch release
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # the summary's size estimate only; training runs in the precision chosen
    r"Precision bf16-mixed is not supported by the model summary",
)
"""Lightning warnings that say nothing about a run of this project (each with its reason); the CLI
silences them so that what it prints is worth reading."""


def quiet_benign_warnings() -> None:
    for message in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{message}")


def show_project_logs() -> None:
    """Print the project's INFO lines (the precision chosen, latent caches built or read, ...) like
    Lightning's own, where nothing else configured logging (no root handler, e.g. not under pytest)."""
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        if not logger.handlers:
            logger.addHandler(handler)


def build_cli(args: list[str] | None = None, run: bool = True) -> MultimodalCLI:
    """The project's LightningCLI (``run=False``: parse and instantiate only)."""
    tune_allocator()
    show_project_logs()
    quiet_benign_warnings()
    return MultimodalCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": DEFAULT_ROOT, "callbacks": [PredictionWriter()]},
        parser_kwargs={"description": "Multimodal shared-codebook DiT framework (LightningCLI)."},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning`` and ``python -m multimodal`` (returns None: exit status 0).

    ``lightning assist ...`` is the assistant's command line (``tasks.assistant.cli``), imported only
    when asked for: this package never imports ``tasks`` otherwise."""
    import sys

    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["assist"]:
        import importlib

        tune_allocator()
        quiet_benign_warnings()
        status = importlib.import_module("tasks.assistant.cli").main(argv[1:])
        if status:
            raise SystemExit(status)
        return
    try:
        build_cli(args)
    except SetupError as err:  # a missing prerequisite: one line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
