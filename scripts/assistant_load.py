"""Load test of the assistant's web page: N requests from C concurrent clients against 127.0.0.1.

    python scripts/assistant_load.py --ckpt runs/quickstart/stage2 --requests 200 --clients 8

Starts ``lightning assist --serve`` on a free local port (one process, one torch thread unless
``--threads``), then sends a bounded, mixed list of requests (demo images and clips from the
demo shards or generated ones, sentences, classes, and bad files: text named .png, a truncated
PNG and WAV, an empty sentence, an upload over the size limit) from ``--clients`` threads, and
reports: every status code counted, answered / dropped, requests per second, the latency
quantiles, and the server's resident memory (VmRSS) after warm-up and at the end, and its peak
(VmHWM). Only 127.0.0.1 is ever contacted; the loop stops after ``--requests`` or ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.shards import encode_png, encode_wav  # noqa: E402


def _rss(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, kb = line.split()[:2]
            values[key[:-1]] = int(kb) / 1024
    return values["VmRSS"], values["VmHWM"]


def _inputs(rng: np.random.Generator, demo: Path | None) -> list[tuple[str, dict]]:
    """(name, httpx request kwargs) of every kind the page takes, good and bad."""
    out = []
    if demo is not None:
        images = sorted(demo.glob("digits-*/test-000000.tar"))
    else:
        images = []
    pngs = [encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    wavs = [encode_wav(0.3 * np.sin(np.arange(16000) * f), 16000) for f in (0.05, 0.1)]
    if images:
        import tarfile

        with tarfile.open(images[0]) as tar:
            pngs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")][:8] or pngs
        spoken = sorted(demo.glob("spoken-*/test-000000.tar"))
        if spoken:
            with tarfile.open(spoken[0]) as tar:
                wavs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".wav")][:8] or wavs
    for i, png in enumerate(pngs):
        out.append(("image", {"files": {"file": (f"img{i}.png", png)}}))
    for i, wav in enumerate(wavs):
        out.append(("audio", {"files": {"file": (f"clip{i}.wav", wav)}}))
    stereo = np.stack([np.sin(np.arange(8000) * 0.1), np.zeros(8000)], 1) * 0.3
    out.append(("audio_8k_stereo", {"files": {"file": ("s.wav", encode_wav(stereo, 8000))}}))
    out.append(("text", {"data": {"text": "three"}}))
    out.append(("class", {"data": {"label": "7"}}))
    out.append(("bad_not_image", {"files": {"file": ("notes.png", b"just some text")}}))
    out.append(("bad_truncated_png", {"files": {"file": ("t.png", pngs[0][:50])}}))
    out.append(("bad_truncated_wav", {"files": {"file": ("t.wav", wavs[0][:80])}}))
    out.append(("bad_empty_text", {"data": {"text": " "}}))
    out.append(("bad_too_large", {"files": {"file": ("big.wav", b"RIFF" + bytes(3 * 2**20))}}))
    return out


def _round(base: str, plan: list[tuple[str, dict]], args: argparse.Namespace, pid: int, rss_warm: float) -> bool:
    """Send ``plan`` from ``args.clients`` threads; print the round's numbers; True when all answered."""
    import httpx

    statuses: Counter = Counter()
    by_kind: Counter = Counter()
    latencies: list[float] = []
    samples: list[float] = []
    lock = threading.Lock()
    queue = list(plan)
    deadline = time.perf_counter() + args.max_seconds

    def client() -> None:
        with httpx.Client(base_url=base, timeout=120) as http:
            while time.perf_counter() < deadline:
                with lock:
                    if not queue:
                        return
                    kind, request = queue.pop()
                t = time.perf_counter()
                try:
                    status = http.post("/api/answer", **request).status_code
                except httpx.HTTPError as err:
                    status = f"dropped ({type(err).__name__})"
                with lock:
                    statuses[status] += 1
                    by_kind[(kind, status)] += 1
                    latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client) for _ in range(args.clients)]

    def watch() -> None:
        while any(t.is_alive() for t in threads):
            samples.append(_rss(pid)[0])
            time.sleep(0.25)

    t0 = time.perf_counter()
    for t in threads:
        t.start()
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.join()
    watcher.join()
    wall = time.perf_counter() - t0
    rss_end, hwm = _rss(pid)
    answered = sum(v for k, v in statuses.items() if isinstance(k, int))
    lat = np.array(latencies)
    print(f"{len(latencies)} requests from {args.clients} clients in {wall:.1f} s: {len(latencies) / wall:.2f} requests/s")
    print(f"answered {answered}, dropped {len(latencies) - answered}; statuses {dict(statuses)}")
    for (kind, status), n in sorted(by_kind.items(), key=lambda kv: str(kv[0])):
        print(f"  {kind:>18}: {status} x {n}")
    print(f"latency p50 {np.median(lat):.2f} s, p90 {np.quantile(lat, 0.9):.2f} s, max {lat.max():.2f} s")
    print(f"server RSS: {rss_warm:.0f} MiB after warm-up, {min(samples or [rss_end]):.0f}-{max(samples or [rss_end]):.0f} "
          f"MiB under load, {rss_end:.0f} MiB at the end; peak (VmHWM) {hwm:.0f} MiB")
    return answered == len(latencies) == len(plan)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole load this often (memory per round)")
    p.add_argument("--out", default="runs/assistant_load", help="the server's folder for generated files")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen([sys.executable, "-m", "multimodal", "assist", "--ckpt", args.ckpt, "--serve",
                               "--port", str(port), "--out", args.out, "--max-upload-mb", "2"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.perf_counter() - started > 120:
                print(server.stdout.read() if server.stdout else "", file=sys.stderr)
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        print(f"server up in {time.perf_counter() - started:.1f} s (pid {server.pid}, port {port})")
        rng = np.random.default_rng(args.seed)
        kinds = _inputs(rng, Path(os.environ.get("MULTIMODAL_CACHE", ".cache/demo")))
        plan = [kinds[i % len(kinds)] for i in rng.permutation(args.requests)]
        with httpx.Client(base_url=base, timeout=120) as warm:  # one of each kind, then the memory baseline
            for _, request in kinds:
                warm.post("/api/answer", **request)
        rss_warm, _ = _rss(server.pid)
        ok = True
        for round_ in range(args.rounds):
            if args.rounds > 1:
                print(f"round {round_ + 1} of {args.rounds}")
            ok = _round(base, plan, args, server.pid, rss_warm) and ok
        return 0 if ok else 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
