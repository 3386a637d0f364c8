"""DiffusionTransformer vs diffusers' DiTTransformer2DModel: CFG sampling throughput and training step time.

    pip install diffusers                         # or: pip install -e ".[bench]"
    python scripts/benchmark.py sample                               # CPU, preset 'cpu'
    python scripts/benchmark.py sample --device cuda --preset B --bf16 --compile

Both models get the same size: ``num_layers`` = depth, heads and head dim from the preset, an 8 x 8
token grid of D = 64 channels (``in_channels = D``, ``sample_size = 8``, ``patch_size = 1``) and
``--classes`` class labels (``num_embeds_ada_norm``). Note that diffusers' DiT blocks each carry their
own timestep-MLP + label table (``norm1.emb``), so it has more parameters than the original DiT;
both counts are printed.

Sampling: DDIM (eta = 0) with classifier-free guidance, ``--steps`` model evaluations, each on ONE
batch of 2B (conditional and null halves concatenated). Ours runs ``GaussianDiffusion.sample`` (which
calls ``forward_with_cfg``); the reference runs a plain DDIM loop with the same coefficients around
``DiTTransformer2DModel``. Reported: images/s = B / seconds per full sampling run.

Training: ms per forward + backward + AdamW step at ``--train-batch`` (ours through
``GaussianDiffusion.training_loss``, the reference through the same q_sample + eps MSE).

Timing: after ``--warmup`` runs, the two models alternate for ``--repeats`` rounds and the best
round of each is reported (other processes on a shared CPU only ever add time).

Model FLOPs utilisation (CUDA only), with h = hidden, S = tokens per item, L = depth, B' = batch
of model inputs (2B for CFG sampling):

    forward FLOPs = 2 * B' * S * (L * 12 h^2 + 2 * D * h)      # qkv + proj + MLP(4h) matmuls, in/out projections
                  + 2 * B' * (L * 6 h^2 + 2 h^2 + 256 h + h^2) # adaLN modulation + final adaLN + timestep MLP (per item)
                  + 4 * B' * L * S^2 * h                       # attention scores QK^T and weighted sum AV
    training FLOPs = 3 * forward FLOPs                         # backward ~ 2x forward

MFU = FLOPs / second / peak; peak is ``--peak-tflops`` or looked up from the GPU name (dense bf16).
The same formula is used for both models (diffusers' extra per-block embedding MLPs are not counted).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from multimodal.diffusion import GaussianDiffusion
from multimodal.dit import PRESETS, DiffusionTransformer

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0,
                    "V100": 125.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=None, help="trunk preset (default: 'cpu' on CPU, 'B' on CUDA)")
    parser.add_argument("--batch", type=int, default=16, help="images per sampling run (model batch is 2x)")
    parser.add_argument("--steps", default="25,50", help="comma-separated DDIM step counts")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--dim", type=int, default=64, help="latent dim D")
    parser.add_argument("--grid", type=int, default=8, help="token grid side (grid x grid tokens)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-iters", type=int, default=10, help="timed training steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed rounds; the best is kept")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA, or a CPU with avx512_bf16/AMX)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU")
    parser.add_argument("--seed", type=int, default=0)


def build_models(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    from diffusers import DiTTransformer2DModel

    cfg = PRESETS[args.preset]
    torch.manual_seed(args.seed)
    ours = DiffusionTransformer(in_dim=args.dim, preset=args.preset, patch_size=1, num_classes=args.classes)
    theirs = DiTTransformer2DModel(
        num_attention_heads=cfg["num_heads"], attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
        in_channels=args.dim, num_layers=cfg["depth"], sample_size=args.grid, patch_size=1,
        num_embeds_ada_norm=args.classes,
    )
    # adaLN-Zero starts at exactly zero output; give both some non-zero weights (timing only)
    for model in (ours, theirs):
        with torch.no_grad():
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0.0, 0.02)
    return ours.to(args.device), theirs.to(args.device), cfg


def forward_flops(cfg: dict, dim: int, batch: int, tokens: int) -> float:
    """The module docstring's analytic forward FLOPs."""
    h, depth = cfg["hidden_size"], cfg["depth"]
    per_token = depth * 12 * h * h + 2 * dim * h
    per_item = depth * 6 * h * h + 2 * h * h + 256 * h + h * h
    return 2 * batch * tokens * per_token + 2 * batch * per_item + 4 * batch * depth * tokens * tokens * h


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def reference_sample(model: torch.nn.Module, diff: GaussianDiffusion, y: torch.Tensor, args: argparse.Namespace,
                     steps: int, generator: torch.Generator) -> torch.Tensor:
    """A plain DDIM (eta = 0) loop with CFG around diffusers' DiT; both halves in one batch of 2B."""
    B, device = y.shape[0], y.device
    x = torch.randn((B, args.dim, args.grid, args.grid), generator=generator, device=device)
    labels = torch.cat([y, torch.full_like(y, args.classes)])
    abar = diff.alphas_cumprod.double().cpu()
    timesteps = diff.respaced_timesteps(steps)
    for i, t_now in enumerate(timesteps):
        a_t = abar[t_now].item()
        a_prev = abar[timesteps[i + 1]].item() if i + 1 < len(timesteps) else 1.0
        t = torch.full((2 * B,), t_now, dtype=torch.long, device=device)
        out = model(torch.cat([x, x]), timestep=t, class_labels=labels, return_dict=False)[0].float()
        eps_c, eps_u = out.chunk(2)
        eps = eps_u + args.guidance * (eps_c - eps_u)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


def run(args: argparse.Namespace) -> None:
    try:
        import diffusers
    except ImportError as err:
        raise SystemExit("needs diffusers: pip install diffusers") from err
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    if args.preset is None:
        args.preset = "cpu" if device.type == "cpu" else "B"
    if device.type != "cuda" and args.compile:
        print("note: --compile is for CUDA (inductor's CPU build takes minutes here); ignored on CPU")
        args.compile = False
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    ours, theirs, cfg = build_models(args)
    diff = GaussianDiffusion(1000, "linear").to(device)
    tokens = args.grid * args.grid
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"diffusers={diffusers.__version__} bf16={args.bf16} compile={args.compile}")
    print(f"preset={args.preset}: depth {cfg['depth']}, hidden {cfg['hidden_size']}, heads {cfg['num_heads']}; "
          f"{args.grid}x{args.grid} tokens of D={args.dim}, {args.classes} classes; "
          f"params ours {n_ours / 1e6:.2f}M, diffusers {n_theirs / 1e6:.2f}M")
    if args.compile:  # in place: every call of the module (also forward_with_cfg's) runs compiled
        ours.compile()
        theirs.compile()

    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    # ------------------------------------------------------------------ sampling
    ours.eval()
    theirs.eval()
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    grid = (args.grid, args.grid)

    def sample_ours(steps: int) -> torch.Tensor:
        with torch.inference_mode(), autocast():
            return diff.sample(ours, (args.batch, tokens, args.dim), steps=steps, guidance=args.guidance,
                               generator=torch.Generator(gen_device).manual_seed(args.seed), modality="image",
                               y=y, grid=grid)

    def sample_theirs(steps: int) -> torch.Tensor:
        with torch.inference_mode(), autocast():
            return reference_sample(theirs, diff, y, args, steps, torch.Generator(gen_device).manual_seed(args.seed))

    print(f"\nDDIM sampling with CFG (guidance {args.guidance}), batch {args.batch} images "
          f"(model batch {2 * args.batch}); best of {args.repeats}")
    header = f"{'steps':<8}{'ours img/s':>12}{'diffusers img/s':>17}{'ours/diffusers':>16}"
    if peak and device.type == "cuda":
        header += f"{'MFU ours':>10}{'MFU theirs':>12}"
    print(header)
    for steps in (int(s) for s in args.steps.split(",")):
        for _ in range(args.warmup):
            sample_ours(steps)
            sample_theirs(steps)
        t_ours, t_theirs = float("inf"), float("inf")
        for _ in range(args.repeats):
            t_ours = min(t_ours, timed(lambda s=steps: sample_ours(s), device))
            t_theirs = min(t_theirs, timed(lambda s=steps: sample_theirs(s), device))
        line = f"{steps:<8}{args.batch / t_ours:>12.2f}{args.batch / t_theirs:>17.2f}{t_theirs / t_ours:>15.2f}x"
        if peak and device.type == "cuda":
            flops = steps * forward_flops(cfg, args.dim, 2 * args.batch, tokens)
            line += f"{flops / t_ours / (peak * 1e12):>10.1%}{flops / t_theirs / (peak * 1e12):>12.1%}"
        print(line)

    # ------------------------------------------------------------------ training
    ours.train()
    theirs.train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    B = args.train_batch
    x0 = torch.randn(B, tokens, args.dim, device=device)
    labels = torch.randint(0, args.classes, (B,), device=device)

    def step_ours() -> None:
        with autocast():
            loss, _ = diff.training_loss(ours, x0, modality="image", y=labels, grid=grid)
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def step_theirs() -> None:
        t = torch.randint(0, diff.num_timesteps, (B,), device=device)
        noise = torch.randn_like(x0)
        x_t = diff.q_sample(x0, t, noise)
        img = x_t.transpose(1, 2).reshape(B, args.dim, args.grid, args.grid)
        drop = torch.rand(B, device=device) < 0.1  # label dropout, as ours does in training
        with autocast():
            out = theirs(img, timestep=t, class_labels=torch.where(drop, args.classes, labels),
                            return_dict=False)[0]
        loss = F.mse_loss(out.float().reshape(B, args.dim, tokens).transpose(1, 2), noise)
        opt_theirs.zero_grad(set_to_none=True)
        loss.backward()
        opt_theirs.step()

    def many(fn: Callable[[], None]) -> None:
        for _ in range(args.train_iters):
            fn()

    for _ in range(args.warmup):
        step_ours()
        step_theirs()
    t_ours, t_theirs = float("inf"), float("inf")
    for _ in range(args.repeats):
        t_ours = min(t_ours, timed(lambda: many(step_ours), device) / args.train_iters)
        t_theirs = min(t_theirs, timed(lambda: many(step_theirs), device) / args.train_iters)
    print(f"\ntraining step (forward + backward + AdamW), batch {B}; best of {args.repeats} x {args.train_iters}")
    header = f"{'':<8}{'ours ms':>12}{'diffusers ms':>17}{'diffusers/ours':>16}"
    line = f"{'':<8}{t_ours * 1e3:>12.1f}{t_theirs * 1e3:>17.1f}{t_theirs / t_ours:>15.2f}x"
    if peak and device.type == "cuda":
        flops = 3 * forward_flops(cfg, args.dim, B, tokens)
        header += f"{'MFU ours':>10}{'MFU theirs':>12}"
        line += f"{flops / t_ours / (peak * 1e12):>10.1%}{flops / t_theirs / (peak * 1e12):>12.1%}"
    print(header)
    print(line)
