"""One trained checkpoint answering any input: the Python API (:mod:`.core`), what it reads
(:mod:`.inputs`), the command line (:mod:`.cli`, ``lightning assist``) and a local web page
(:mod:`.web`, ``lightning assist --serve``; the ``web`` extra)."""

from .core import Answer, Assistant, Response
from .inputs import InputError

__all__ = ["Answer", "Assistant", "InputError", "Response"]
