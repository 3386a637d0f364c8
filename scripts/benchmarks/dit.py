"""DiffusionTransformer vs facebookresearch/DiT vs diffusers' DiTTransformer2DModel, at fp32 and in bf16.

    pip install diffusers                                     # or: pip install -e ".[bench]"
    git clone https://github.com/facebookresearch/DiT .peers/DiT   # its models.py (ignored by git; never imported elsewhere)
    python scripts/benchmark.py dit --threads 1                                  # DiT-S/2 shapes, CPU
    python scripts/benchmark.py dit --device cuda --preset B --compile           # GPU (MFU against the peak)

The same network for all three: ``--preset`` depth/width/heads (S = DiT-S: 12 x 384, 6 heads), 2 x 2
patches of a ``--grid`` x ``--grid`` latent of ``--dim`` channels (DiT-S/2 on 256 px images: 32 x 32 x 4
= 256 tokens), ``--classes`` class labels. facebookresearch/DiT keeps its own ``learn_sigma=True``
(8 output channels; the first 4 are the prediction); diffusers' blocks each carry their own
timestep-MLP + label table, so it has more parameters (both counts are printed).

Every model runs at fp32 (the peers' default) and under ``torch.autocast(bfloat16)`` (the same autocast
for all three); ``ours`` also at the precision ``multimodal.precision`` chooses for the device
(bf16-mixed where matmuls have native bf16, which is what ``lightning fit`` runs by default). Ours
under bf16 on a CPU takes its explicit attention path (``multimodal.attention``); the peers call
``F.scaled_dot_product_attention`` as they always do.

* training step: forward + backward + AdamW at ``--train-batch``, eps-MSE at uniform timesteps, 10 %
  label dropout; ours through ``GaussianDiffusion.training_loss``;
* sampling: ``--sample-steps`` DDIM steps (eta 0) with classifier-free guidance for ``--batch`` images, both
  halves in one batch of 2B; ours through ``GaussianDiffusion.sample``, the peers in a plain DDIM loop
  with the same coefficients.

Times are medians of ``--repeats`` after ``--warmup``, the models taking turns. Achieved FLOP/s use the
analytic count below (the same for all three; diffusers' extra per-block embedding MLPs are not
counted) next to this machine's measured square-matmul rate (``benchmarks.matmul``) in fp32 and bf16;
on CUDA also MFU against ``--peak-tflops`` (or the GPU's dense bf16 peak from the table).

    forward FLOPs = 2 * B' * S * (L * 12 h^2 + 2 * D * h)      # qkv + proj + MLP(4h) matmuls, patch in/out
                  + 2 * B' * (L * 6 h^2 + 2 h^2 + 256 h + h^2) # adaLN modulation + final adaLN + timestep MLP
                  + 4 * B' * L * S^2 * h                       # attention scores QK^T and weighted sum AV
    training FLOPs = 3 * forward FLOPs                         # backward ~ 2x forward

(h = width, S = tokens per item, L = depth, D = channels per patch, B' = model batch: 2B for CFG).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from multimodal.diffusion import GaussianDiffusion
from multimodal.dit import PRESETS, DiffusionTransformer
from multimodal.precision import native_bf16

from .matmul import matmul_rate

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0,
                    "V100": 125.0}
ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="S", help="trunk preset (S = DiT-S)")
    parser.add_argument("--patch", type=int, default=2)
    parser.add_argument("--grid", type=int, default=32, help="latent side (32: a 256 px image through SD's VAE)")
    parser.add_argument("--dim", type=int, default=4, help="latent channels")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16, help="images per sampling run (model batch 2x)")
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model and precision (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--dit-repo", default=str(ROOT / ".peers" / "DiT"),
                        help="a clone of facebookresearch/DiT (its models.py); skipped when missing")
    parser.add_argument("--no-diffusers", action="store_true", help="leave diffusers out")
    parser.add_argument("--rope", action="store_true", help="also time ours with rotary positions (rope=True)")
    parser.add_argument("--conv-mlp", action="store_true",
                        help="also time ours with a depthwise conv in every MLP (conv_mlp=True)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (CUDA)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator bf16 peak for MFU")
    parser.add_argument("--seed", type=int, default=0)


def forward_flops(cfg: dict, dim: int, batch: int, tokens: int) -> float:
    """The module docstring's analytic forward FLOPs (``dim``: channels per patch token)."""
    h, depth = cfg["hidden_size"], cfg["depth"]
    per_token = depth * 12 * h * h + 2 * dim * h
    per_item = depth * 6 * h * h + 2 * h * h + 256 * h + h * h
    return 2 * batch * tokens * per_token + 2 * batch * per_item + 4 * batch * depth * tokens * tokens * h


class Peer:
    """A model under test: ``predict(x [B, C, H, W], t [B], y [B]) -> eps [B, C, H, W]`` in NCHW."""

    def __init__(self, name: str, module: torch.nn.Module, predict: Callable) -> None:
        self.name, self.module, self.predict = name, module, predict


def _load_dit(repo: Path):
    spec = importlib.util.spec_from_file_location("peer_dit_models", repo / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_peers(args: argparse.Namespace, cfg: dict) -> list[Peer]:
    C, grid = args.dim, args.grid

    def ours(name: str, **kwargs: bool) -> Peer:
        trunk = DiffusionTransformer(in_dim=C, preset=args.preset, patch_size=args.patch, num_classes=args.classes,
                                     **kwargs)

        def predict(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            B = x.shape[0]
            tokens = x.flatten(2).transpose(1, 2)  # [B, H*W, C], row-major
            out = trunk(tokens, t, "image", y=y, grid=(grid, grid))
            return out.transpose(1, 2).reshape(B, C, grid, grid)

        return Peer(name, trunk, predict)

    peers = [ours("ours")] + ([ours("ours + rope", rope=True)] if args.rope else [])
    peers += [ours("ours + conv_mlp", conv_mlp=True)] if args.conv_mlp else []
    repo = Path(args.dit_repo)
    if (repo / "models.py").is_file():
        dit_models = _load_dit(repo)
        dit = dit_models.DiT(input_size=grid, patch_size=args.patch, in_channels=C, hidden_size=cfg["hidden_size"],
                             depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
                             num_classes=args.classes)
        peers.append(Peer("facebookresearch/DiT", dit, lambda x, t, y: dit(x, t, y)[:, :C]))
    else:
        print(f"note: no {repo / 'models.py'}: facebookresearch/DiT left out (see --dit-repo)")
    if not args.no_diffusers:
        try:
            from diffusers import DiTTransformer2DModel
        except ImportError:
            print("note: diffusers is not installed: left out (pip install diffusers)")
        else:
            dif = DiTTransformer2DModel(num_attention_heads=cfg["num_heads"],
                                        attention_head_dim=cfg["hidden_size"] // cfg["num_heads"], in_channels=C,
                                        num_layers=cfg["depth"], sample_size=grid, patch_size=args.patch,
                                        num_embeds_ada_norm=args.classes)
            peers.append(Peer("diffusers", dif,
                              lambda x, t, y: dif(x, timestep=t, class_labels=y, return_dict=False)[0]))
    # adaLN-Zero starts at exactly zero output: give every model non-zero weights (timing only)
    for peer in peers:
        with torch.no_grad():
            for p in peer.module.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0.0, 0.02)
        peer.module.to(args.device)
    return peers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ddim_cfg(peer: Peer, diff: GaussianDiffusion, y: torch.Tensor, args: argparse.Namespace,
             generator: torch.Generator) -> torch.Tensor:
    """A plain DDIM (eta = 0) loop with CFG around a peer; both halves in one batch of 2B (null = num_classes)."""
    B, device = y.shape[0], y.device
    x = torch.randn((B, args.dim, args.grid, args.grid), generator=generator, device=generator.device).to(device)
    labels = torch.cat([y, torch.full_like(y, args.classes)])
    abar = diff.alphas_cumprod.double().cpu()
    timesteps = diff.respaced_timesteps(args.sample_steps)
    for i, t_now in enumerate(timesteps):
        a_t = abar[t_now].item()
        a_prev = abar[timesteps[i + 1]].item() if i + 1 < len(timesteps) else 1.0
        t = torch.full((2 * B,), t_now, dtype=torch.long, device=device)
        eps_c, eps_u = peer.predict(torch.cat([x, x]), t, labels).float().chunk(2)
        eps = eps_u + args.guidance * (eps_c - eps_u)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(PRESETS[args.preset])
    torch.manual_seed(args.seed)
    peers = build_peers(args, cfg)
    if args.compile:
        for peer in peers:
            peer.module.compile()
    diff = GaussianDiffusion(1000, "linear").to(device)
    tokens, patch_dim = (args.grid // args.patch) ** 2, args.dim * args.patch**2
    bf16_ok, why = native_bf16(device)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}; bf16: {why}")
    print(f"preset {args.preset} (depth {cfg['depth']}, width {cfg['hidden_size']}, heads {cfg['num_heads']}), "
          f"patch {args.patch} of a {args.grid}x{args.grid}x{args.dim} latent = {tokens} tokens, {args.classes} classes")
    print("params: " + ", ".join(f"{p.name} {sum(q.numel() for q in p.module.parameters()) / 1e6:.2f}M" for p in peers))
    rates = {"fp32": matmul_rate(1024, torch.float32, device), "bf16": matmul_rate(1024, torch.bfloat16, device)}
    print(f"measured 1024^3 matmul rate: fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s")
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)

    precisions = ["fp32", "bf16"] if bf16_ok or device.type == "cuda" else ["fp32"]
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    B = args.train_batch
    x0 = torch.randn(B, args.dim, args.grid, args.grid, device=device)
    labels = torch.randint(0, args.classes, (B,), device=device)

    def sampler(peer: Peer, precision: str) -> Callable[[], object]:
        def go() -> object:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                generator = torch.Generator(gen_device).manual_seed(args.seed)
                if peer.name != "ours":
                    return ddim_cfg(peer, diff, y, args, generator)
                return diff.sample(peer.module, (args.batch, args.grid * args.grid, args.dim), steps=args.sample_steps,
                                   guidance=args.guidance, generator=generator, modality="image", y=y,
                                   grid=(args.grid, args.grid))
        return go

    def trainer(peer: Peer, precision: str) -> Callable[[], object]:
        opt = torch.optim.AdamW(peer.module.parameters(), lr=1e-4)

        def go() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                if peer.name == "ours":
                    loss, _ = diff.training_loss(peer.module, x0.flatten(2).transpose(1, 2), modality="image",
                                                 y=labels, grid=(args.grid, args.grid))
                else:
                    t = torch.randint(0, diff.num_timesteps, (B,), device=device)
                    noise = torch.randn_like(x0)
                    drop = torch.rand(B, device=device) < 0.1
                    out = peer.predict(diff.q_sample(x0, t, noise), t, torch.where(drop, args.classes, labels))
                    loss = F.mse_loss(out.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return go

    def median_time(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        for fn in fns.values():
            for _ in range(args.warmup):
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.repeats):  # the models take turns (a busy machine slows all alike)
            for key, fn in fns.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[key].append(time.perf_counter() - start)
        return {k: statistics.median(v) for k, v in times.items()}

    sample_flops = args.sample_steps * forward_flops(cfg, patch_dim, 2 * args.batch, tokens)
    train_flops = 3 * forward_flops(cfg, patch_dim, B, tokens)
    for title, make, flops, train in (
        (f"training step (forward + backward + AdamW), batch {B}", trainer, train_flops, True),
        (f"{args.sample_steps} DDIM steps with CFG for {args.batch} images (model batch {2 * args.batch})", sampler,
         sample_flops, False),
    ):
        for peer in peers:
            peer.module.train(train)
        fns = {(p.name, prec): make(p, prec) for p in peers for prec in precisions}
        times = median_time(fns)
        print(f"\n{title}; median of {args.repeats}, seconds")
        mfu = " | MFU" if peak else ""
        print(f"| model | precision | seconds | GFLOP/s | of the matmul rate at that precision{mfu} |")
        print("| --- | --- | --- | --- | ---" + (" | ---" if peak else "") + " |")
        for (name, prec), seconds in times.items():
            rate = flops / seconds / 1e9
            extra = f" | {rate / (peak * 1e3):.1%}" if peak else ""
            print(f"| {name} | {prec} | {seconds:.3f} | {rate:.0f} | {rate / rates[prec]:.0%}{extra} |")
        ours = times[("ours", "bf16" if "bf16" in precisions and bf16_ok else "fp32")]
        for peer in peers[1:]:
            parts = [f"{peer.name} {prec} / ours default: {times[(peer.name, prec)] / ours:.2f}x" for prec in precisions]
            print("  " + "; ".join(parts))
