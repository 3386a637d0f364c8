"""``lightning assist``: ask a trained checkpoint from the command line, or serve a local page.

    lightning assist --ckpt runs/quickstart/stage2 digit.png clip.wav "a red circle" --class 7
    lightning assist --ckpt runs/quickstart/stage2 clip.wav --chain --json
    lightning assist --ckpt runs/quickstart/stage2 --serve            # http://127.0.0.1:8765

Each INPUT is a file (an image or a clip, told by its extension, then by its first bytes) or, when
no such file exists, text. ``--class`` asks the class-conditional generation heads. Answers are
printed readably, or as one JSON object per input with ``--json``; generated files go to ``--out``.
An input that cannot be used prints its error and the next input is still answered; the exit
status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from tasks.assistant.inputs import InputError, kind_of


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning assist", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image or audio files, or text")
    p.add_argument("--ckpt", required=True, help="a stage-2 checkpoint, or a run folder (its newest last.ckpt)")
    p.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME",
                   help="a class name or id to generate (repeatable)")
    p.add_argument("--task", dest="tasks", action="append", default=None, metavar="HEAD",
                   help="only this head (repeatable; default: every head that reads the input)")
    p.add_argument("--chain", action="store_true", help="feed the caption or transcript back in as text")
    p.add_argument("--no-generate", action="store_true", help="understanding only: text is not drawn or spoken")
    p.add_argument("--json", action="store_true", help="one JSON object per input")
    p.add_argument("--out", default="assistant_out", help="folder for generated files (default assistant_out)")
    p.add_argument("--samples", type=int, default=1, help="images or clips per generation (default 1)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the head's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the head's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-rate", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--serve", action="store_true", help="serve the local web page instead of answering INPUTs")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload the page accepts (default 20)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.serve and not args.inputs and not args.classes:
        parser().error("give INPUTs, --class NAME, or --serve")
    import torch

    from tasks.assistant.core import Assistant

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        assistant = Assistant.from_checkpoint(args.ckpt, out_dir=args.out, device=device, samples=args.samples,
                                              steps=args.steps, guidance=args.guidance, seed=args.seed)
    except (InputError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.serve:
        from tasks.assistant.web import serve

        serve(assistant, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb)
        return 0
    failed = False
    asks = [(None, x) for x in args.inputs] + [("label", c) for c in args.classes]
    for kind, value in asks:
        try:
            kind = kind or (kind_of(value) if _is_path_like(value) else "text")
            response = assistant(**{kind: value}, sample_rate=args.sample_rate, tasks=args.tasks, chain=args.chain,
                                 generate=not args.no_generate)
        except InputError as err:
            failed = True
            message = {"input": kind or "file", "value": str(value), "error": str(err)}
            print(json.dumps(message) if args.json else f"{kind}: {value}\n  error: {err}", flush=True)
            continue
        print(json.dumps(response.to_dict()) if args.json else response.render(), flush=True)
    return 1 if failed else 0


def _is_path_like(x: str) -> bool:
    """A file argument: an existing file, or a name with a media extension (a missing file is then an
    error, not text)."""
    from pathlib import Path

    from tasks.assistant.inputs import AUDIO_SUFFIXES, IMAGE_SUFFIXES

    return Path(x).is_file() or (" " not in x and Path(x).suffix.lower() in IMAGE_SUFFIXES + AUDIO_SUFFIXES)


if __name__ == "__main__":
    sys.exit(main())
