"""VectorQuantizer vs vector-quantize-pytorch: forward+backward time and codebook usage.

    pip install vector-quantize-pytorch          # or: pip install -e ".[bench]"
    python scripts/benchmark.py quantizer
    python scripts/benchmark.py quantizer --device cuda --iters 200
    python scripts/benchmark.py quantizer --threads 1    # on a small or busy CPU: stable numbers

Both quantizers get the same settings: codebook size K, dim D, EMA decay, commitment weight, k-means
init (same iterations), and the same gradient estimator (straight-through or rotation trick). Dead
codes are defined differently by the two libraries and cannot be matched exactly: ours restarts a code
unused for ``--dead-code-steps`` steps, theirs a code whose EMA cluster size falls below
``--threshold-ema-dead-code``.

Timing: ms per forward+backward on the same input [B, N, D] after a warm-up (which includes the k-means
init). Usage: a tiny autoencoder (Linear 16 -> D -> quantizer -> Linear D -> 16) trained for
``--train-steps`` Adam steps on clustered data, same seed and data for both; then the fraction of codes
used, the perplexity and the reconstruction MSE on held-out data.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from multimodal.quantizer import VectorQuantizer

SETTINGS = [(32, 64, 64, 512), (32, 256, 64, 2048)]  # (B, N, D, K)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=30, help="timed forward+backward passes per setting")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--settings", default=",".join("x".join(map(str, s)) for s in SETTINGS),
                        help="comma-separated BxNxDxK")
    parser.add_argument("--grads", default="ste,rotation", help="gradient estimators to time")
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--beta", type=float, default=0.25, help="commitment weight")
    parser.add_argument("--kmeans-iters", type=int, default=10)
    parser.add_argument("--dead-code-steps", type=int, default=20, help="ours: restart after this many unused steps")
    parser.add_argument("--threshold-ema-dead-code", type=float, default=2.0,
                        help="theirs: restart when the EMA cluster size is below this")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--clusters", type=int, default=1024, help="clusters in the usage run's data")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--seed", type=int, default=0)


def build(which: str, dim: int, num_codes: int, grad: str, args: argparse.Namespace) -> nn.Module:
    if which == "ours":
        return VectorQuantizer(num_codes=num_codes, dim=dim, beta=args.beta, decay=args.decay, kmeans_init=True,
                               kmeans_iters=args.kmeans_iters, dead_code_steps=args.dead_code_steps, grad=grad)
    from vector_quantize_pytorch import VectorQuantize

    return VectorQuantize(dim=dim, codebook_size=num_codes, decay=args.decay, commitment_weight=args.beta,
                          kmeans_init=True, kmeans_iters=args.kmeans_iters,
                          threshold_ema_dead_code=args.threshold_ema_dead_code, rotation_trick=grad == "rotation")


def step(which: str, vq: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(quantized, codes, vq loss) from either library."""
    if which == "ours":
        q, codes, loss, _ = vq(z)
    else:
        q, codes, loss = vq(z)
    return q, codes, loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(shape: tuple[int, int, int, int], grad: str, args: argparse.Namespace) -> dict[str, float]:
    """Median ms per forward+backward for both libraries, measured in alternating rounds so that a
    busy machine slows both alike."""
    b, n, d, k = shape
    device = torch.device(args.device)
    runs = {}
    for which in ("ours", "theirs"):
        torch.manual_seed(args.seed)
        vq = build(which, d, k, grad, args).to(device).train()
        z = torch.randn(b, n, d, device=device, requires_grad=True)
        for _ in range(args.warmup):  # includes the k-means init
            q, _, loss = step(which, vq, z)
            (loss + q.pow(2).mean()).backward()
        runs[which] = (vq, z)
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    per_round = max(1, args.iters // args.rounds)
    for _ in range(args.rounds):
        for which, (vq, z) in runs.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(per_round):
                q, _, loss = step(which, vq, z)
                (loss + q.pow(2).mean()).backward()
            sync(device)
            times[which].append((time.perf_counter() - start) / per_round * 1e3)
    return {which: statistics.median(t) for which, t in times.items()}


def usage_run(which: str, args: argparse.Namespace, dim: int = 64, num_codes: int = 512) -> dict[str, float]:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    centers = 2 * torch.randn(args.clusters, 16, generator=gen)

    def data(tokens: int) -> torch.Tensor:
        pick = torch.randint(args.clusters, (tokens,), generator=gen)
        return (centers[pick] + 0.1 * torch.randn(tokens, 16, generator=gen)).view(-1, 64, 16).to(device)

    torch.manual_seed(args.seed)
    enc, dec = nn.Linear(16, dim).to(device), nn.Linear(dim, 16).to(device)
    vq = build(which, dim, num_codes, "ste", args).to(device).train()
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=3e-3)
    for _ in range(args.train_steps):
        x = data(32 * 64)
        q, _, vq_loss = step(which, vq, enc(x))
        loss = (dec(q) - x).pow(2).mean() + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    vq.eval()
    with torch.no_grad():
        x = data(16384)
        q, codes, _ = step(which, vq, enc(x))
        counts = torch.bincount(codes.flatten(), minlength=num_codes).float()
        p = counts / counts.sum()
        return {"usage": float((counts > 0).float().mean()),
                "perplexity": float(torch.special.entr(p).sum().exp()),
                "mse": float((dec(q) - x).pow(2).mean())}


def run(args: argparse.Namespace) -> None:
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError as err:
        raise SystemExit("needs vector-quantize-pytorch: pip install vector-quantize-pytorch") from err
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"vector-quantize-pytorch={_version('vector-quantize-pytorch')}")
    print(f"decay={args.decay} beta={args.beta} kmeans_iters={args.kmeans_iters} "
          f"dead codes: ours {args.dead_code_steps} steps unused / theirs EMA size < {args.threshold_ema_dead_code}")
    print(f"\nforward+backward, ms/iter (median of {args.rounds} alternating rounds, {args.iters} iters in all, "
          f"after {args.warmup} warm-up)")
    print(f"{'B x N x D, K':<22}{'grad':<10}{'ours':>10}{'theirs':>10}{'theirs/ours':>13}")
    for setting in args.settings.split(","):
        shape = tuple(int(v) for v in setting.split("x"))
        for grad in args.grads.split(","):
            t = time_pair(shape, grad, args)
            ours, theirs = t["ours"], t["theirs"]
            label = f"{shape[0]}x{shape[1]}x{shape[2]}, {shape[3]}"
            print(f"{label:<22}{grad:<10}{ours:>10.2f}{theirs:>10.2f}{theirs / ours:>12.2f}x")

    print(f"\ncodebook usage after {args.train_steps} training steps (K=512, D=64, {args.clusters} data clusters, "
          "2048 tokens/step; held-out 16384 tokens)")
    print(f"{'':<8}{'usage':>8}{'perplexity':>12}{'recon mse':>12}")
    for which in ("ours", "theirs"):
        r = usage_run(which, args)
        print(f"{which:<8}{r['usage']:>8.3f}{r['perplexity']:>12.1f}{r['mse']:>12.4f}")


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)
