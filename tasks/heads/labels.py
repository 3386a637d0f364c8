"""The class names of a labelled head, kept inside its checkpoint.

A head that predicts or generates classes stores the names of its data's classes (``info.json``'s
``classes``), bound at setup like the text vocabulary (:mod:`tasks.heads.vocab`), so that one
checkpoint can answer "3" or "circle" without the data folder (``tasks.assistant``). A checkpoint
saved before the names existed loads without them: the classes are then named by their ids.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from tasks.heads.vocab import tolerate_missing_extra_state

log = logging.getLogger(__name__)


class ClassNames(nn.Module):
    """``num_classes`` names (``str(i)`` until bound), saved as module extra state."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.names: list[str] = [str(i) for i in range(self.num_classes)]
        self.bound = False

    def bind(self, names: list[str] | None, task: str) -> None:
        """Take the data's class names; the first ``num_classes`` when the data has more (those labels
        are skipped in training anyway), ids for the rest when it has fewer."""
        if not names:
            return
        names = [str(n) for n in names]
        if len(names) != self.num_classes:
            log.warning("head %r has %d classes, its data names %d: using the first names", task,
                        self.num_classes, len(names))
        self.names = names[: self.num_classes] + [str(i) for i in range(len(names), self.num_classes)]
        self.bound = True

    def index(self, name: str | int) -> int:
        """A class id from an id or a name (exact, then case-insensitive); ValueError naming the classes."""
        if isinstance(name, int) or (isinstance(name, str) and name.strip().lstrip("-").isdigit()
                                     and name.strip() not in self.names):
            i = int(name)
            if not 0 <= i < self.num_classes:
                raise ValueError(f"class id {i} is outside [0, {self.num_classes}) (classes: {self.names})")
            return i
        text = str(name).strip()
        if text in self.names:
            return self.names.index(text)
        folded = [n.casefold() for n in self.names]
        if text.casefold() in folded:
            return folded.index(text.casefold())
        raise ValueError(f"unknown class {name!r}: the classes are {self.names}")

    def get_extra_state(self) -> dict[str, Any]:
        return {"names": list(self.names) if self.bound else []}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        names = list(state.get("names") or [])
        if names:
            self.names = [str(n) for n in names][: self.num_classes]
            self.names += [str(i) for i in range(len(self.names), self.num_classes)]
            self.bound = True

    _load_from_state_dict = tolerate_missing_extra_state(nn.Module._load_from_state_dict)
