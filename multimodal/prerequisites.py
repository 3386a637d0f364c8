"""What a run needs before it can start, checked on the parsed config before anything is built.

A missing stage-1 checkpoint, shard folder or sentencepiece model, or heads that do not match the
data's tasks, is one :class:`SetupError` line: what is missing, the setting that names it, and the
command that makes it. ``multimodal.cli.main`` prints that line instead of the traceback the
instantiation would give (jsonargparse wraps an error raised inside a nested ``class_path`` into a
~90-line "Does not validate against any of the Union subtypes" dump).

The config is read as plain data (``Namespace`` / dict / list), so nothing here imports the
packages that define the classes: a setting is recognised by its name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jsonargparse import Namespace


class SetupError(Exception):
    """A prerequisite of the run is missing; ``str()`` is the one line to print."""

    def __init__(self, what: str, setting: str, command: str | None = None) -> None:
        self.what, self.setting, self.command = what, setting, command
        line = f"{what} (set by {setting})"
        super().__init__(line + (f"; to make it: {command}" if command else ""))


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted setting, value) of a parsed config, into dicts and lists (``heads``, ``tasks``)."""
    if isinstance(node, Namespace):
        node = vars(node)
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")
    else:
        yield path, node


def _has_checkpoint(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.rglob("*.ckpt")))


def _value(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        if isinstance(node, Namespace):
            node = vars(node)
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check(config: Any) -> None:
    """Raise :class:`SetupError` for the first missing prerequisite of ``config`` (a subcommand's
    parsed config: ``model``, ``data``, ``trainer``, ``ckpt_path``)."""
    for setting, value in walk(config):
        if value is None or not isinstance(value, (str, Path)) or "://" in str(value) or str(value).startswith("pipe:"):
            continue
        name = setting.rsplit(".", 1)[-1]
        path = Path(value)
        if name == "tokenizer_ckpt" and not _has_checkpoint(path):
            raise SetupError(f"no stage-1 tokenizer checkpoint at {path}", setting,
                             f"lightning fit --config configs/tokenizer.yaml --trainer.default_root_dir {path}")
        if name == "init_from" and not _has_checkpoint(path):
            raise SetupError(f"no checkpoint to initialise from at {path}", setting,
                             "train that run first, or set it to null to start fresh")
        if name == "root" and setting.startswith("data") and not (path / "info.json").is_file():
            what = f"no shard folder at {path}" if not path.exists() else f"{path} holds no info.json (not a shard folder)"
            raise SetupError(what, setting, f"python scripts/make_shards.py imagefolder|audiofolder|manifest SRC {path}")
        if name == "tokenizer_path" and setting.startswith("data") and not path.is_file():
            raise SetupError(f"no sentencepiece model at {path}", setting,
                             "leave it unset: the data trains one on its training split at the first run")
    heads = _value(config, "model.init_args.heads")
    tasks = _value(config, "data.init_args.tasks")
    if isinstance(heads, dict) and isinstance(tasks, dict) and set(heads) != set(tasks):
        raise SetupError(f"the model's heads {sorted(heads)} and the data's tasks {sorted(tasks)} differ: "
                         "every head needs a data task of the same name, and every task a head",
                         "model.init_args.heads / data.init_args.tasks",
                         "add or remove entries so both lists match")
