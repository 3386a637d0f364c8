"""VectorQuantizer and FSQ: interface, gradients, codebook health, masking, checkpoints, DDP sync."""

from __future__ import annotations

import multiprocessing
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from multimodal.fsq import FSQ
from multimodal.quantizer import VectorQuantizer, rotation_trick


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clustered(n: int, centers: torch.Tensor, spread: float = 0.05) -> torch.Tensor:
    """n points [n, d] around random rows of centers [C, d]."""
    pick = torch.randint(centers.shape[0], (n,))
    return centers[pick] + spread * torch.randn(n, centers.shape[1])


# ---------------------------------------------------------------------------- interface


@pytest.mark.parametrize("use_ema", [True, False])
@pytest.mark.parametrize("use_cosine", [False, True])
@pytest.mark.parametrize("code_dim", [None, 8])
def test_shapes_dtypes_and_stats(use_ema: bool, use_cosine: bool, code_dim: int | None) -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=64, dim=32, code_dim=code_dim, use_ema=use_ema, use_cosine=use_cosine)
    z = torch.randn(3, 20, 32)
    q, codes, loss, stats = vq(z, torch.rand(3, 20) > 0.2)
    assert q.shape == z.shape and q.dtype == z.dtype
    assert codes.shape == (3, 20) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 64
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(stats) == {"perplexity", "usage", "usage_window", "dead_codes", "commit_loss"}
    assert all(v.ndim == 0 and not v.requires_grad for v in stats.values())
    assert vq.num_codes == 64 and vq.dim == 32
    assert vq.lookup(codes).shape == (3, 20, 32)
    assert vq.code_usage_counts().sum() > 0
    vq.reset_usage()
    assert vq.code_usage_counts().sum() == 0
    if use_cosine:
        torch.testing.assert_close(vq.codes_in_use().norm(dim=1), torch.ones(64))


def test_bf16_autocast_quantizes_in_float32() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=32, dim=16, code_dim=8)
    z = torch.randn(2, 40, 16)
    vq(z)  # k-means init
    vq.eval()
    _, codes_fp32, _, _ = vq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, codes, loss, _ = vq(z.bfloat16())
    assert q.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert (codes == codes_fp32).float().mean() > 0.9  # only the bf16 rounding of z differs


@pytest.mark.parametrize("code_dim", [None, 8])
@pytest.mark.parametrize("use_cosine", [False, True])
def test_lookup_equals_quantized_in_eval(code_dim: int | None, use_cosine: bool) -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=32, dim=16, code_dim=code_dim, use_cosine=use_cosine)
    vq(torch.randn(2, 50, 16))  # k-means init in training mode
    vq.eval()
    z = torch.randn(2, 10, 16)
    state = _tensor_state(vq)
    q, codes, _, _ = vq(z)
    torch.testing.assert_close(vq.lookup(codes), q, rtol=0, atol=1e-6)
    assert torch.equal(vq.encode(z), codes)
    for k, v in _tensor_state(vq).items():  # eval is a pure lookup
        assert torch.equal(v, state[k]), k


def _tensor_state(vq: VectorQuantizer) -> dict[str, torch.Tensor]:
    """The tensors of the state dict (the restart ring buffer and generator travel as extra state)."""
    return {k: v.clone() for k, v in vq.state_dict().items() if torch.is_tensor(v)}


def test_bad_arguments_name_the_argument() -> None:
    for kwargs, name in [({"num_codes": 1}, "num_codes"), ({"decay": 1.0}, "decay"), ({"grad": "x"}, "grad"),
                         ({"beta": -1.0}, "beta"), ({"dead_code_steps": 0}, "dead_code_steps"),
                         ({"code_dim": 0}, "code_dim"), ({"eps": 0.0}, "eps")]:
        with pytest.raises(ValueError, match=name):
            VectorQuantizer(**kwargs)
    with pytest.raises(ValueError, match="levels"):
        FSQ(levels=[8, 1])
    with pytest.raises(ValueError, match="dim"):
        VectorQuantizer(dim=8)(torch.randn(1, 2, 4))


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("grad", ["ste", "rotation"])
def test_gradient_reaches_the_encoder(grad: str) -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=16, dim=8, grad=grad, beta=0.0)
    z = torch.randn(2, 30, 8, requires_grad=True)
    q, _, _, _ = vq(z)
    (q * torch.randn_like(q)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_rotation_trick_value_and_gradient() -> None:
    torch.manual_seed(0)
    e = torch.randn(64, 8, requires_grad=True)
    q = torch.randn(64, 8)
    out = rotation_trick(e, q)
    assert torch.equal(out, q)  # forward value is exactly the code
    g = torch.randn(64, 8)
    out.backward(g)
    # dL/de = (|q| / |e|) R^T g with R orthogonal: norms scale by |q| / |e| ...
    scale = q.norm(dim=1) / e.detach().norm(dim=1)
    torch.testing.assert_close(e.grad.norm(dim=1), scale * g.norm(dim=1))
    # ... and R maps e's direction onto q's, so R^T maps q's onto e's: g = q^ gives grad = scale * e^
    e.grad = None
    rotation_trick(e, q).backward(q / q.norm(dim=1, keepdim=True))
    e_hat = e.detach() / e.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close(e.grad, scale[:, None] * e_hat, atol=1e-5, rtol=1e-5)


def test_commitment_trains_encoder_and_codebook_loss_trains_codebook() -> None:
    torch.manual_seed(0)
    beta = 0.25
    vq = VectorQuantizer(num_codes=16, dim=8, beta=beta, use_ema=False, kmeans_init=False,
                         restart_dead_codes=False)
    z = torch.randn(2, 30, 8, requires_grad=True)
    _, codes, loss, _ = vq(z)
    loss.backward()
    q = vq.codebook.detach()[codes]
    # beta * ||z - sg(q)||^2 -> encoder; ||sg(z) - q||^2 -> codebook (taming's legacy quantizer swapped these)
    torch.testing.assert_close(z.grad, beta * 2 * (z.detach() - q) / z.numel())
    expected = torch.zeros_like(vq.codebook).index_add_(0, codes.flatten(), (2 * (q - z.detach()) / z.numel()).flatten(0, 1))
    torch.testing.assert_close(vq.codebook.grad, expected)

    ema = VectorQuantizer(num_codes=16, dim=8, beta=beta, use_ema=True)
    z = torch.randn(2, 30, 8, requires_grad=True)
    _, _, loss, _ = ema(z)
    loss.backward()
    assert z.grad.abs().sum() > 0
    assert not ema.codebook.requires_grad and ema.codebook.grad is None
    assert "codebook" not in dict(ema.named_parameters())


# ---------------------------------------------------------------------------- codebook health


def test_kmeans_init_puts_a_code_on_every_cluster() -> None:
    torch.manual_seed(0)
    centers = 4 * torch.randn(16, 8)
    vq = VectorQuantizer(num_codes=32, dim=8, kmeans_init=True, kmeans_init_batches=2, kmeans_iters=10)
    assert not vq.initialized
    vq(clustered(256, centers)[None])
    assert not vq.initialized  # two batches are pooled
    vq(clustered(256, centers)[None])
    assert vq.initialized
    nearest = torch.cdist(centers, vq.codebook).min(dim=1).values
    assert nearest.max() < 0.5, nearest


def test_dead_codes_restart_at_recent_encoder_outputs() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=16, dim=4, kmeans_init=False, dead_code_steps=2, restart_buffer_size=64)
    far = 100 + torch.randn(1, 32, 4)  # far from every N(0, 1) code: only a few codes ever win
    total_dead = 0.0
    for _ in range(6):
        *_, stats = vq(far)
        total_dead += float(stats["dead_codes"])
    assert total_dead > 0
    # restarted codes were put on encoder outputs (~200 away from where the N(0, 1) codes started)
    near = torch.cdist(vq.codebook, far[0]).min(dim=1).values < 5
    assert near.all(), near


def test_masked_tokens_do_not_touch_codebook_or_stats() -> None:
    torch.manual_seed(0)
    centers = 3 * torch.randn(8, 8)
    z = clustered(4 * 40, centers).view(4, 40, 8)
    mask = torch.rand(4, 40) > 0.3
    z_padded = torch.where(mask[..., None], z, torch.full_like(z, 1e4))  # garbage in the padding
    kwargs = dict(num_codes=16, dim=8, kmeans_init=True, restart_dead_codes=False)
    torch.manual_seed(1)
    a = VectorQuantizer(**kwargs)
    torch.manual_seed(1)
    b = VectorQuantizer(**kwargs)
    for _ in range(3):
        torch.manual_seed(2)
        _, _, loss_a, stats_a = a(z_padded, mask)
        torch.manual_seed(2)
        _, _, loss_b, stats_b = b(z[mask][None])  # only the valid tokens
    for name in ("codebook", "ema_cluster_size", "ema_embed_sum"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name))
    torch.testing.assert_close(loss_a, loss_b)
    for k in stats_a:
        torch.testing.assert_close(stats_a[k], stats_b[k])
    torch.testing.assert_close(a.code_usage_counts(), b.code_usage_counts())


def test_all_padding_batch_postpones_kmeans_init() -> None:
    vq = VectorQuantizer(num_codes=16, dim=8)
    z = torch.randn(2, 10, 8)
    *_, stats = vq(z, torch.zeros(2, 10, dtype=torch.bool))
    assert not vq.initialized and float(stats["usage"]) == 0
    vq(z, torch.ones(2, 10, dtype=torch.bool))
    assert vq.initialized


def test_state_dict_round_trip_keeps_init_flag_and_codebook() -> None:
    torch.manual_seed(0)
    kwargs = dict(num_codes=16, dim=8, code_dim=4, restart_dead_codes=False)
    a = VectorQuantizer(**kwargs)
    for _ in range(3):
        a(torch.randn(2, 32, 8))
    b = VectorQuantizer(**kwargs)
    assert not b.initialized
    b.load_state_dict(a.state_dict())
    assert b.initialized and torch.equal(b.codebook, a.codebook)
    for name in ("ema_cluster_size", "ema_embed_sum", "usage.step", "usage.last_used"):
        assert torch.equal(b.get_buffer(name), a.get_buffer(name))
    z = torch.randn(2, 32, 8)
    qa, _, _, _ = a(z)
    qb, _, _, _ = b(z)  # no second k-means: it continues exactly like the original
    assert torch.equal(qa, qb) and torch.equal(a.codebook, b.codebook)


def _train_usage(features_on: bool, steps: int = 250, seed: int = 0) -> float:
    """Fraction of codes used on held-out data after training a tiny autoencoder through the quantizer."""
    torch.manual_seed(seed)
    centers = 2 * torch.randn(64, 16)
    enc, dec = nn.Linear(16, 32), nn.Linear(32, 16)
    vq = VectorQuantizer(num_codes=128, dim=32, kmeans_init=features_on, restart_dead_codes=features_on,
                         dead_code_steps=20)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=3e-3)
    for _ in range(steps):
        x = clustered(256, centers, spread=0.1)[None]
        q, _, vq_loss, _ = vq(enc(x))
        loss = (dec(q) - x).pow(2).mean() + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    vq.eval()
    with torch.no_grad():
        _, _, _, stats = vq(enc(clustered(4096, centers, spread=0.1)[None]))
    return float(stats["usage"])


def test_codebook_health_features_matter() -> None:
    on, off = _train_usage(True), _train_usage(False)
    assert on >= 2 * off, (on, off)


# ---------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # The quantizers are built BEFORE the process group exists, as under Lightning.
    models = {}
    for sync in (True, False):
        torch.manual_seed(0)
        models[sync] = VectorQuantizer(num_codes=32, dim=8, kmeans_init_batches=2, kmeans_iters=5,
                                       dead_code_steps=2, restart_buffer_size=128, sync_ddp=sync)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        for sync, vq in models.items():
            torch.manual_seed(100 + rank)  # different data and different random draws on every rank
            centers = 3 * torch.randn(6, 8) + 5 * rank
            snapshots, seen, restarted = [], [], 0.0
            for step in range(10):
                shift = 0.0 if step < 4 else 4.0  # the data moves: codes die and are restarted
                z = clustered(2 * 48, centers + shift).view(2, 48, 8)
                mask = torch.rand(2, 48) > 0.2
                *_, stats = vq(z, mask)
                seen.append(z[mask])
                restarted += float(stats["dead_codes"])
                if step in (1, 9):  # right after the k-means init, and at the end
                    snapshots.append(_tensor_state(vq))
            seen = torch.cat(seen)
            torch.save({"snapshots": snapshots, "restarted": restarted, "low": seen.min(0).values,
                        "high": seen.max(0).values}, Path(out_dir) / f"sync{int(sync)}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_keeps_codebooks_identical(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]

    synced = [torch.load(tmp_path / f"sync1_rank{r}.pt") for r in range(2)]
    assert synced[0]["restarted"] > 0  # dead-code restarts happened inside the run
    for when in range(2):  # after the k-means init, and after EMA steps and restarts
        state0, state1 = (s["snapshots"][when] for s in synced)
        assert state0["initialized"]
        for key, value in state0.items():
            assert torch.equal(value, state1[key]), (when, key)
    # every code is a mix of data points some rank saw: restarts took real vectors, not a sum of ranks'
    low = torch.minimum(synced[0]["low"], synced[1]["low"])
    high = torch.maximum(synced[0]["high"], synced[1]["high"])
    codebook = synced[0]["snapshots"][-1]["codebook"]
    assert ((codebook >= low - 1e-4) & (codebook <= high + 1e-4)).all()

    unsynced = [torch.load(tmp_path / f"sync0_rank{r}.pt") for r in range(2)]
    for key in ("codebook", "ema_cluster_size", "ema_embed_sum"):
        assert not torch.equal(unsynced[0]["snapshots"][-1][key], unsynced[1]["snapshots"][-1][key]), key


# ---------------------------------------------------------------------------- FSQ


def test_fsq_codes_lookup_and_gradient() -> None:
    torch.manual_seed(0)
    fsq = FSQ(levels=[8, 5, 5, 5], dim=16)
    assert fsq.num_codes == 1000 and fsq.dim == 16
    z = (3 * torch.randn(4, 50, 16)).requires_grad_()
    mask = torch.rand(4, 50) > 0.5
    q, codes, loss, stats = fsq(z, mask)
    assert q.shape == z.shape and codes.shape == (4, 50) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 1000
    assert float(loss) == 0.0 and set(stats) >= {"perplexity", "usage", "usage_window", "dead_codes"}
    assert torch.equal(fsq.lookup(codes), q)
    assert torch.equal(fsq.encode(z), codes)
    assert fsq.code_usage_counts().sum() == mask.sum()  # padding is not counted
    q.pow(2).sum().backward()
    assert z.grad.abs().sum() > 0

    grid = FSQ(levels=[8, 5, 5, 5], dim=4).lookup(torch.arange(1000))  # no projections: the raw grid
    assert torch.unique(grid, dim=0).shape[0] == 1000  # every code is a different vector
    assert grid.min() == -1 and grid.max() == 1  # odd levels reach +-1, even levels -1 and 1 - 2 / L


def test_balance_calls_gives_a_small_modality_its_share_of_the_codes() -> None:
    """Two 'modalities' per step, 2000 tokens and 100 tokens in far-apart regions: by token count the
    small one gets 1/21 of the tokens and 9-19 % of the codes at initialisation (k-means++ seeds
    favour far points); balanced, about half (42-53 % over seeds 0-2)."""

    def share(balance: bool) -> float:
        torch.manual_seed(0)
        vq = VectorQuantizer(num_codes=64, dim=4, kmeans_init_batches=2, balance_calls=balance).train()
        big = torch.randn(1, 2000, 4)
        small = torch.randn(1, 100, 4) + torch.tensor([50.0, 0.0, 0.0, 0.0])
        vq(big)
        vq(small)  # the second pooled batch: k-means runs now
        return float((vq.codebook[:, 0] > 25).float().mean())

    assert share(False) < 0.25
    assert 0.35 < share(True) < 0.65
    # the restart buffer: every call writes the same number of rows when balanced
    vq = VectorQuantizer(num_codes=8, dim=2, restart_buffer_size=64, balance_calls=True, kmeans_init=False).train()
    vq(torch.randn(1, 3, 2))
    assert vq._recent_filled == 16  # 64 / 4 rows from a batch of 3 tokens (drawn with replacement)
