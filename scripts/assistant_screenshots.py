"""Drive the assistant's real page in headless Chromium and save a screenshot of each answer kind.

    python scripts/assistant_screenshots.py --ckpt runs/quickstart/stage2 --out runs/assistant_screens

Uses playwright (the ``browser`` extra) pointed at the system's Chromium (Debian's ``chromium``
package; ``--chromium PATH`` for another): no browser is downloaded. Starts ``lightning assist
--serve`` on a free 127.0.0.1 port, then for each case (a digit image, a shapes image, a spoken
clip, a sentence, a class, the chain speech -> drawing, a file that is not an image) fills the form
as a person would, submits it, and writes ``<case>.png``; it prints what each page says.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path


def _demo_file(cache: Path, demo: str, ext: str, index: int, out: Path) -> Path:
    """The test sample ``<demo>-test-<index>`` of a demo set (its first test shard), written to ``out``."""
    tar = next(cache.glob(f"{demo}-*/test-000000.tar"))
    name = f"{demo}-test-{index:06d}{ext}"
    with tarfile.open(tar) as t:
        path = out / name
        path.write_bytes(t.extractfile(t.getmember(name)).read())
        text = f"{demo}-test-{index:06d}.txt"
        if text in t.getnames():
            print(f"{name}: reference {t.extractfile(text).read().decode().strip()!r}")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", type=Path, default=Path("runs/assistant_screens"))
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "")
    args = p.parse_args(argv)
    if not args.chromium:
        raise SystemExit("no Chromium found: apt-get install chromium (or pass --chromium PATH)")
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    inputs = args.out / "inputs"
    inputs.mkdir(exist_ok=True)
    cache = Path(os.environ.get("MULTIMODAL_CACHE", ".cache/demo"))
    digit = _demo_file(cache, "digits", ".png", 3, inputs)
    shapes = _demo_file(cache, "shapes", ".png", 1, inputs)
    clip = _demo_file(cache, "spoken", ".wav", 2, inputs)
    digits_clip = _demo_file(cache, "spoken", ".wav", 14, inputs)  # "no nine": a digit to draw
    bad = inputs / "notes.png"
    bad.write_text("a text file with an image's name")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "multimodal", "assist", "--ckpt", args.ckpt, "--serve",
                               "--port", str(port), "--out", str(args.out / "generated"), "--samples", "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    cases = [("image_digit", {"file": digit}), ("image_shapes", {"file": shapes}), ("audio", {"file": clip}),
             ("text", {"text": "seven"}), ("class", {"label": "3"}), ("chain_speech_to_drawing", {"file": digits_clip, "chain": True}),
             ("bad_file", {"file": bad})]
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 900})
            deadline = time.time() + 120
            while True:
                try:
                    page.goto(url)
                    break
                except Exception:
                    if server.poll() is not None or time.time() > deadline:
                        raise SystemExit("the server did not start:\n" + (server.stdout.read() if server.stdout else "")) from None
                    time.sleep(0.5)
            for name, form in cases:
                page.goto(url)
                if "file" in form:
                    page.set_input_files("#file", str(form["file"]))
                if "text" in form:
                    page.fill("#text", form["text"])
                if "label" in form:
                    page.fill("#label", form["label"])
                if form.get("chain"):
                    page.check("input[name=chain]")
                page.click("button[type=submit]")
                page.wait_for_load_state("load")
                shot = args.out / f"{name}.png"
                page.screenshot(path=str(shot), full_page=True)
                shown = page.locator(".answers, .error").first.inner_text() if page.locator(".answers, .error").count() else ""
                print(f"{name}: {shot}\n  " + " | ".join(line for line in shown.splitlines() if line.strip()))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
