"""DiffusionTransformer: shapes, masking, adaLN-Zero init, conditioning, CFG, DiT parameter counts."""

from __future__ import annotations

import pytest
import torch

from multimodal.dit import PRESETS, DiffusionTransformer
from multimodal.dit_blocks import patchify, unpatchify

D = 8


def make(**kwargs) -> DiffusionTransformer:
    torch.manual_seed(0)
    kwargs = {"in_dim": D, "preset": "tiny", "num_classes": 5, "text_vocab_size": 20, **kwargs}
    return DiffusionTransformer(**kwargs).eval()


def randomize(model: DiffusionTransformer, std: float = 0.1) -> DiffusionTransformer:
    """Give the zero-initialised (adaLN-Zero) weights random values so every path is exercised."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def dit_reference_params(depth: int, hidden: int, patch: int = 2, channels: int = 4, size: int = 32,
                         classes: int = 1000) -> int:
    """facebookresearch/DiT's parameter count (learn_sigma: 2C outputs; pos_embed is a frozen Parameter)."""
    h = hidden
    total = patch * patch * channels * h + h  # PatchEmbed conv
    total += 256 * h + h + h * h + h  # timestep MLP
    total += (classes + 1) * h  # label table with the CFG null row
    total += depth * (3 * h * h + 3 * h + h * h + h + 8 * h * h + 5 * h + 6 * h * h + 6 * h)
    total += 2 * h * h + 2 * h + h * patch * patch * 2 * channels + patch * patch * 2 * channels
    return total + (size // patch) ** 2 * h


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("patch", [1, 2])
@pytest.mark.parametrize("grid", [(8, 8), (4, 6)])
def test_image_shapes(patch: int, grid: tuple[int, int]) -> None:
    model = randomize(make(patch_size=patch))
    x = torch.randn(3, grid[0] * grid[1], D)
    out = model(x, torch.tensor([0, 10, 999]), "image", y=torch.tensor([0, 4, -1]), grid=grid)
    assert out.shape == x.shape and torch.isfinite(out).all()
    feats = model.features(x, "image", grid=grid)
    assert feats.shape == (3, grid[0] * grid[1] // patch**2, 64)


def test_patchify_roundtrip() -> None:
    x = torch.randn(2, 4 * 6, D)
    p = patchify(x, (4, 6), 2)
    assert p.shape == (2, 6, 4 * D)
    # the first patch holds tokens (0,0), (0,1), (1,0), (1,1) of the row-major grid
    assert torch.equal(p[0, 0].view(2, 2, D)[1, 0], x[0, 6])
    assert torch.equal(unpatchify(p, (4, 6), 2), x)


@pytest.mark.parametrize("patch, extra", [(1, {}), (2, {}), (2, {"rope": True}), (1, {"conv_mlp": True})])
def test_audio_padding_does_not_leak(patch: int, extra: dict) -> None:
    model = randomize(make(patch_size=patch, **extra))
    lengths = torch.tensor([10, 6, 3])
    mask = torch.arange(10)[None, :] < lengths[:, None]
    x = torch.randn(3, 10, D)
    t = torch.tensor([5.0, 500.0, 900.0])
    out = model(x, t, "audio", x_mask=mask)
    assert out.shape == (3, 10, D)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    garbage = torch.where(mask[..., None], x, 100 * torch.randn_like(x))
    out2 = model(garbage, t, "audio", x_mask=mask)
    torch.testing.assert_close(out2[mask], out[mask])
    # each item alone, at its own length, gives the same valid outputs as in the padded batch
    for i, n in enumerate(lengths.tolist()):
        alone = model(x[i : i + 1, :n], t[i : i + 1], "audio")
        torch.testing.assert_close(alone[0], out[i, :n], atol=1e-5, rtol=1e-4)
    feats = model.features(garbage, "audio", x_mask=mask)
    torch.testing.assert_close(feats[mask], model.features(x, "audio", x_mask=mask)[mask])


# ---------------------------------------------------------------------------------------------- init


def test_adaln_zero_init() -> None:
    model = make(patch_size=2)
    x = torch.randn(2, 64, D)
    out = model(x, torch.tensor([3, 700]), "image", y=torch.tensor([1, 2]))
    assert torch.equal(out, torch.zeros_like(out))
    h = torch.randn(2, 16, 64)
    c = torch.randn(2, 64)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)
        assert torch.equal(block.adaLN_modulation[-1].weight, torch.zeros_like(block.adaLN_modulation[-1].weight))
    for layer in model.blocks[0].norm1, model.final_layer.norm_final:
        assert not layer.elementwise_affine


# ---------------------------------------------------------------------------------------------- conditioning


def test_text_condition_tokens() -> None:
    model = randomize(make())
    x = torch.randn(2, 16, D)
    t = torch.tensor([100, 200])
    ids = torch.randint(0, 20, (2, 5))
    cmask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = model(x, t, "image", cond_ids=ids, cond_mask=cmask)
    assert out.shape == (2, 16, D)  # only the x positions come back
    plain = model(x, t, "image")
    assert not torch.allclose(out, plain, atol=1e-4)
    # padded condition tokens do not matter
    ids2 = torch.where(cmask, ids, torch.randint(0, 20, ids.shape))
    torch.testing.assert_close(model(x, t, "image", cond_ids=ids2, cond_mask=cmask), out)
    # the null text condition (all tokens masked) is exactly "no condition tokens"
    empty = model(x, t, "image", cond_ids=ids, cond_mask=torch.zeros_like(cmask))
    torch.testing.assert_close(empty, plain, atol=1e-5, rtol=1e-4)


def test_pooled_condition() -> None:
    """pool_condition adds the masked mean of the condition to c: padding and the null condition add nothing."""
    model = randomize(make(pool_condition=True))
    x = torch.randn(2, 16, D)
    t = torch.tensor([100, 200])
    ids = torch.randint(0, 20, (2, 5))
    cmask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = model(x, t, "image", cond_ids=ids, cond_mask=cmask)
    ids2 = torch.where(cmask, ids, torch.randint(0, 20, ids.shape))
    torch.testing.assert_close(model(x, t, "image", cond_ids=ids2, cond_mask=cmask), out)
    empty = model(x, t, "image", cond_ids=ids, cond_mask=torch.zeros_like(cmask))
    torch.testing.assert_close(empty, model(x, t, "image"), atol=1e-5, rtol=1e-4)
    # the pooled vector changes the output on its own: the same tokens, the pooling MLP zeroed
    with torch.no_grad():
        model.cond_pool.mlp[-1].weight.zero_()
        model.cond_pool.mlp[-1].bias.zero_()
    assert not torch.allclose(model(x, t, "image", cond_ids=ids, cond_mask=cmask), out, atol=1e-4)
    # it is trained: the loss reaches the pooling MLP
    model = randomize(make(pool_condition=True)).train()
    model(x, t, "image", cond_ids=ids, cond_mask=cmask, drop_condition=False).square().mean().backward()
    assert model.cond_pool.mlp[0].weight.grad.abs().sum() > 0
    assert make().cond_pool is None


def test_patch_size_4() -> None:
    model = randomize(make(patch_size=4))
    x = torch.randn(2, 64, D)  # an 8 x 8 grid -> 4 tokens of 16 * D channels
    out = model(x, torch.tensor([1, 2]), "image")
    assert out.shape == x.shape
    assert model.x_embedder.in_features == 16 * D


def test_latent_condition_tokens() -> None:
    model = randomize(make(patch_size=2))
    x = torch.randn(2, 64, D)
    audio = torch.randn(2, 7, D)
    out = model(x, torch.tensor([1, 2]), "image", cond_latents=audio, cond_modality="audio")
    assert out.shape == x.shape
    img = torch.randn(2, 12, D)
    out2 = model(torch.randn(2, 9, D), torch.tensor([1, 2]), "audio", cond_latents=img, cond_modality="image",
                 cond_grid=(2, 6))
    assert out2.shape == (2, 9, D)


def test_label_dropout_only_in_training() -> None:
    model = randomize(make(class_dropout_prob=0.5))
    x = torch.randn(1, 16, D).expand(64, -1, -1)
    t = torch.full((64,), 300)
    y = torch.full((64,), 2)
    with torch.no_grad():
        cond = model(x[:1], t[:1], "image", y=y[:1])
        null = model(x[:1], t[:1], "image", y=None)
        assert torch.equal(model(x[:1], t[:1], "image", y=torch.tensor([-1])), null)
        assert not torch.allclose(cond, null)
        # eval mode never drops, whatever drop_condition says
        torch.testing.assert_close(model(x, t, "image", y=y, drop_condition=True), cond.expand(64, -1, -1))
        model.train()
        torch.manual_seed(0)
        out = model(x, t, "image", y=y)
        is_null = [torch.allclose(o, null[0], atol=1e-5) for o in out]
        is_cond = [torch.allclose(o, cond[0], atol=1e-5) for o in out]
        assert all(a or b for a, b in zip(is_null, is_cond))
        assert 10 < sum(is_null) < 54
        # drop_condition=False keeps every label in training
        torch.testing.assert_close(model(x, t, "image", y=y, drop_condition=False), cond.expand(64, -1, -1))


def test_text_dropout_in_training() -> None:
    model = randomize(make(cond_dropout_prob=0.5))
    x = torch.randn(1, 16, D).expand(64, -1, -1)
    ids = torch.randint(0, 20, (1, 4)).expand(64, -1)
    with torch.no_grad():
        plain = model(x[:1], torch.tensor([10]), "image")
        model.train()
        torch.manual_seed(0)
        out = model(x, torch.full((64,), 10), "image", cond_ids=ids)
    dropped = sum(torch.allclose(o, plain[0], atol=1e-5) for o in out)
    assert 10 < dropped < 54


def test_forward_with_cfg_is_one_batch_and_matches_two_calls() -> None:
    model = randomize(make())
    x = torch.randn(3, 16, D)
    t = torch.tensor([10, 400, 800])
    y = torch.tensor([0, 1, 4])
    ids = torch.randint(0, 20, (3, 5))
    cmask = torch.ones(3, 5, dtype=torch.bool)
    cmask[0, 3:] = False
    calls = []
    hook = model.blocks[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        got = model.forward_with_cfg(x, t, "image", 3.0, y=y, cond_ids=ids, cond_mask=cmask)
        hook.remove()
        cond = model(x, t, "image", y=y, cond_ids=ids, cond_mask=cmask)
        uncond = model(x, t, "image")  # null label, no condition tokens
    assert calls == [6]
    torch.testing.assert_close(got, uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_with_cfg(x, t, "image", 1.0, y=y), model(x, t, "image", y=y))
        torch.testing.assert_close(model.forward_with_cfg(x, t, "image", 0.0, y=y), model(x, t, "image"),
                                   atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- sizes


def test_param_counts_match_dit() -> None:
    assert dit_reference_params(28, 1152) == 675_129_632  # DiT-XL/2 as its repository reports it
    for name in ("S", "B", "L", "XL"):
        cfg = PRESETS[name]
        ref = dit_reference_params(cfg["depth"], cfg["hidden_size"])
        if name in ("S", "B"):
            model = DiffusionTransformer(in_dim=4, preset=name, patch_size=2, num_classes=1000)
        else:
            with torch.device("meta"):
                model = DiffusionTransformer(in_dim=4, preset=name, patch_size=2, num_classes=1000)
        ours = count(model)
        assert abs(ours - ref) / ref < 0.03, (name, ours, ref)
    assert 32e6 < dit_reference_params(12, 384) < 34e6 and 125e6 < dit_reference_params(12, 768) < 135e6


# ---------------------------------------------------------------------------------------------- training options


def test_grad_checkpointing_same_grads() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 12, D)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False
    grads = []
    for ckpt in (False, True):
        model = randomize(make(grad_checkpointing=ckpt, drop_path=0.1)).train()
        torch.manual_seed(1)
        out = model(x, torch.tensor([3, 30]), "audio", y=torch.tensor([1, 2]), x_mask=mask,
                    cond_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]))
        out.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_bf16_autocast() -> None:
    model = randomize(make(patch_size=2)).train()
    x = torch.randn(2, 64, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.tensor([1, 900]), "image", y=torch.tensor([0, 3]), cond_ids=torch.tensor([[1, 2]] * 2))
        loss = out.float().square().mean()
    loss.backward()
    assert torch.isfinite(out).all() and out.shape == x.shape
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_compiles_without_graph_breaks() -> None:
    model = randomize(make())
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(2, 10, D)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False
    with torch.no_grad():
        got = compiled(x, torch.tensor([5, 6]), "audio", y=torch.tensor([1, 2]), x_mask=mask)
        torch.testing.assert_close(got, model(x, torch.tensor([5, 6]), "audio", y=torch.tensor([1, 2]), x_mask=mask))


# ---------------------------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden_size": 66, "num_heads": 4}, "divisible by num_heads"),
        ({"preset": "huge"}, "preset must be one of"),
        ({"patch_size": 3}, "patch_size must be one of"),
        ({"class_dropout_prob": 1.0}, "class_dropout_prob"),
        ({"depth": 0}, "depth"),
        ({"hidden_size": 72, "num_heads": 4, "rope": True}, "rope needs a head dim divisible by 4"),
    ],
)
def test_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_bad_inputs() -> None:
    model = make(patch_size=2, text_vocab_size=0)
    x = torch.randn(1, 36, D)
    t = torch.tensor([1])
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(torch.randn(1, 15, D), t, "image", grid=(3, 5))
    with pytest.raises(ValueError, match="grid"):
        model(x, t, "image", grid=(4, 8))
    with pytest.raises(ValueError, match="not a square grid"):
        model(torch.randn(1, 24, D), t, "image")
    with pytest.raises(ValueError, match="modality"):
        model(x, t, "video")
    with pytest.raises(ValueError, match="text_vocab_size"):
        model(x, t, "image", cond_ids=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="latents must be"):
        model(torch.randn(1, 36, D + 1), t, "image")
    with pytest.raises(ValueError, match="guidance"):
        model.forward_with_cfg(x, t, "image", -1.0, y=torch.tensor([1]))
    with pytest.raises(ValueError, match="needs a condition"):
        model.forward_with_cfg(x, t, "image", 2.0)


def test_gelu_choice() -> None:
    """The MLP's GELU is exact by default (fast in bf16 on CPUs) and DiT's tanh approximation on request;
    the two agree to < 5e-4 on the same weights."""
    from timm.layers import GELUTanh

    torch.manual_seed(0)
    exact = DiffusionTransformer(in_dim=8, preset="tiny", num_classes=2)
    tanh = DiffusionTransformer(in_dim=8, preset="tiny", num_classes=2, gelu="tanh")
    assert isinstance(exact.blocks[0].mlp.act, torch.nn.GELU) and isinstance(tanh.blocks[0].mlp.act, GELUTanh)
    x = torch.randn(1000)
    assert (torch.nn.GELU()(x) - GELUTanh()(x)).abs().max() < 5e-4
    with pytest.raises(ValueError, match="gelu must be one of"):
        DiffusionTransformer(in_dim=8, preset="tiny", gelu="relu")


# ---------------------------------------------------------------------------------------------- rope


def test_rope_scores_depend_on_offsets_only() -> None:
    """Rotated q . k is a function of the two tokens' offset on the grid (and of 1-D offsets on a
    sequence); text condition tokens are not rotated."""
    from multimodal.rope import apply_rope, rope_table

    head = 16
    table = rope_table([("none", (3,)), ("grid", (5, 6)), ("sequence", (7,))], head)
    assert table.shape == (3 + 30 + 7, 2 * head)
    torch.manual_seed(0)
    q, k = torch.randn(head), torch.randn(head)

    def score(i: int, j: int) -> float:
        qi = apply_rope(q.expand(1, 1, 1, head), table[i : i + 1])
        kj = apply_rope(k.expand(1, 1, 1, head), table[j : j + 1])
        return float((qi * kj).sum())

    def cell(r: int, c: int) -> int:
        return 3 + r * 6 + c

    same = [score(cell(r, c), cell(r + 1, c + 2)) for r, c in ((0, 0), (2, 3), (3, 1))]
    assert max(same) - min(same) < 1e-5
    assert abs(score(cell(0, 0), cell(1, 2)) - score(cell(0, 0), cell(2, 1))) > 1e-3  # the offset matters
    seq = [score(33 + i, 33 + i + 3) for i in range(4)]
    assert max(seq) - min(seq) < 1e-5
    assert abs(score(0, 2) - float(q @ k)) < 1e-5  # text tokens: the identity


def test_rope_in_the_trunk() -> None:
    """rope changes what image tokens see, not what text alone gives; CFG, bf16 and torch.compile still
    agree with the plain forward."""
    plain, rotary = randomize(make(patch_size=2)), randomize(make(patch_size=2, rope=True))
    rotary.load_state_dict(plain.state_dict())  # no new parameters: the same weights
    x = torch.randn(2, 64, D)
    ids = torch.tensor([[4, 5, 6], [7, 8, 9]])
    t = torch.tensor([100, 700])
    assert (rotary(x, t, "image", cond_ids=ids) - plain(x, t, "image", cond_ids=ids)).abs().max() > 1e-3
    torch.testing.assert_close(rotary.text_features(ids), plain.text_features(ids))
    guided = rotary.forward_with_cfg(x, t, "image", 2.0, cond_ids=ids)
    cond, uncond = rotary(x, t, "image", cond_ids=ids), rotary(x, t, "image")
    torch.testing.assert_close(guided, uncond + 2.0 * (cond - uncond), atol=1e-5, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = rotary(x, t, "image", cond_ids=ids)
    assert (low.float() - cond).abs().max() < 0.05
    compiled = torch.compile(rotary, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, "image", cond_ids=ids, grid=(8, 8)), cond)  # as heads pass it


# ---------------------------------------------------------------------------------------------- conv_mlp


def test_conv_mlp_is_a_local_filter_on_grids_only() -> None:
    """ConvMlp: a token's output depends on its 3 x 3 grid neighbourhood (its 3 neighbours on a sequence),
    the same way at every place; text tokens get the plain MLP; a zero kernel is the plain MLP."""
    from multimodal.dit_blocks import ConvMlp

    torch.manual_seed(0)
    mlp = ConvMlp(8, 16, torch.nn.GELU)
    layout = (("none", (3,)), ("grid", (5, 6)), ("sequence", (7,)))
    x = torch.randn(2, 3 + 30 + 7, 8)
    plain = mlp.fc2(mlp.act(mlp.fc1(x)))
    torch.testing.assert_close(mlp(x, layout), plain)  # zero-initialised kernel
    torch.nn.init.normal_(mlp.dwconv.weight)
    with torch.no_grad():
        out = mlp(x, layout)
        torch.testing.assert_close(out[:, :3], plain[:, :3])  # text: no convolution
        bumped = x.clone()
        bumped[:, 3 + 2 * 6 + 3] += 1.0  # grid token (row 2, col 3)
        changed = (mlp(bumped, layout) - out).abs().amax(dim=(0, 2)) > 1e-6
        grid_changed = changed[3:33].reshape(5, 6).nonzero().tolist()
        assert grid_changed == [[r, c] for r in (1, 2, 3) for c in (2, 3, 4)]
        assert not changed[:3].any() and not changed[33:].any()
        seq = x.clone()
        seq[:, 33 + 4] += 1.0
        assert ((mlp(seq, layout) - out).abs().amax(dim=(0, 2)) > 1e-6).nonzero().flatten().tolist() == [36, 37, 38]
        # translation equivariance away from the border: the same pattern one column right
        img = torch.zeros(1, 30, 8)
        img[0, 1 * 6 + 1] = img[0, 2 * 6 + 2] = 1.0
        moved = torch.roll(img.reshape(1, 5, 6, 8), 1, dims=2).reshape(1, 30, 8)
        a = mlp(img, (("grid", (5, 6)),)).reshape(5, 6, 8)
        b = mlp(moved, (("grid", (5, 6)),)).reshape(5, 6, 8)
        torch.testing.assert_close(b[:, 2:5], a[:, 1:4])
    with pytest.raises(ValueError, match="covers 30 tokens but the sequence has 40"):
        mlp(x, (("grid", (5, 6)),))


def test_conv_mlp_in_the_trunk() -> None:
    """conv_mlp starts as the plain trunk (same weights, zero kernels), changes image outputs once its
    kernels are non-zero, and keeps CFG, gradient checkpointing, bf16 and torch.compile consistent."""
    plain = randomize(make(patch_size=2))
    conv = make(patch_size=2, conv_mlp=True)
    missing = conv.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".mlp.dwconv." in k for k in missing)
    x = torch.randn(2, 64, D)
    ids = torch.tensor([[4, 5, 6], [7, 8, 9]])
    t = torch.tensor([100, 700])
    torch.testing.assert_close(conv(x, t, "image", cond_ids=ids), plain(x, t, "image", cond_ids=ids))
    randomize(conv)
    cond = conv(x, t, "image", cond_ids=ids)
    assert (cond - plain(x, t, "image", cond_ids=ids)).abs().max() > 1e-3
    torch.testing.assert_close(conv.text_features(ids), plain.text_features(ids))  # text: no convolution
    uncond = conv(x, t, "image")
    torch.testing.assert_close(conv.forward_with_cfg(x, t, "image", 2.0, cond_ids=ids),
                               uncond + 2.0 * (cond - uncond), atol=1e-5, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (conv(x, t, "image", cond_ids=ids).float() - cond).abs().max() < 0.05
    compiled = torch.compile(conv, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, "image", cond_ids=ids, grid=(8, 8)), cond)
    grads = []
    for ckpt in (False, True):
        conv.grad_checkpointing = ckpt
        conv.zero_grad()
        conv.train()(x, t, "image", cond_ids=ids, drop_condition=False).square().sum().backward()
        grads.append(conv.blocks[0].mlp.dwconv.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("patch", [1, 2])
def test_self_condition_starts_as_the_plain_trunk_and_then_reads_the_estimate(patch: int) -> None:
    plain, self_cond = randomize(make(patch_size=patch)), make(patch_size=patch, self_condition=True)
    missing = self_cond.load_state_dict(plain.state_dict(), strict=False).missing_keys  # all but the new projections
    assert {k.split(".")[0] for k in missing} == {"self_cond_embedder"} | ({"self_cond_seq_embedder"} if patch > 1 else set())
    assert not self_cond.self_cond_embedder.weight.any()
    x, t, y = torch.randn(2, 16, D), torch.tensor([100, 700]), torch.tensor([1, 3])
    estimate = torch.randn(2, 16, D)
    with torch.no_grad():
        want = plain(x, t, "image", y=y)
        torch.testing.assert_close(self_cond(x, t, "image", y=y), want)  # zero projection: no effect yet
        torch.testing.assert_close(self_cond(x, t, "image", y=y, x_self_cond=estimate), want)
        randomize(self_cond)
        none = self_cond(x, t, "image", y=y)
        torch.testing.assert_close(none, self_cond(x, t, "image", y=y, x_self_cond=torch.zeros_like(x)))
        assert not torch.allclose(none, self_cond(x, t, "image", y=y, x_self_cond=estimate))
        audio = torch.randn(2, 7, D)  # sequences have their own projection (patch 2) or share it (patch 1)
        assert not torch.allclose(self_cond(audio, t, "audio"), self_cond(audio, t, "audio", x_self_cond=audio))
        # guidance: both halves see the same estimate, in one batch
        got = self_cond.forward_with_cfg(x, t, "image", 3.0, y=y, x_self_cond=estimate)
        cond = self_cond(x, t, "image", y=y, x_self_cond=estimate)
        uncond = self_cond(x, t, "image", x_self_cond=estimate)
        torch.testing.assert_close(got, uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="x_self_cond must be shaped like x"):
        self_cond(x, t, "image", x_self_cond=estimate[:, :8])
    with pytest.raises(ValueError, match="self_condition=False"):
        plain(x, t, "image", x_self_cond=estimate)


def test_long_skip_starts_as_the_plain_trunk_and_joins_mirror_blocks() -> None:
    plain, skip = randomize(make(depth=5)), make(depth=5, long_skip=True)
    missing = skip.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == [f"skip_linears.{i}.{p}" for i in range(2) for p in ("bias", "weight")]  # 5 // 2
    x, t, ids = torch.randn(2, 16, D), torch.tensor([100, 700]), torch.tensor([[4, 5, 6], [7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(skip(x, t, "image", cond_ids=ids), plain(x, t, "image", cond_ids=ids))
    seen: dict[str, torch.Tensor] = {}
    for i, block in enumerate(skip.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(f"out{i}", out))
        block.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(f"in{i}", args[0]))
    H = skip.hidden_size
    with torch.no_grad():  # before block 3 (mirror: 1) take only the skip; before block 4 (mirror: 0) half of each
        skip.skip_linears[0].weight.copy_(torch.cat([torch.zeros(H, H), torch.eye(H)], dim=1))
        skip.skip_linears[1].weight.copy_(torch.cat([torch.eye(H), torch.eye(H)], dim=1) / 2)
        skip(x, t, "image", cond_ids=ids)
    torch.testing.assert_close(seen["in3"], seen["out1"])
    torch.testing.assert_close(seen["in4"], (seen["out3"] + seen["out0"]) / 2)
    torch.testing.assert_close(seen["in2"], seen["out1"])  # the middle block of an odd depth has no skip
    fresh = randomize(make(depth=4, long_skip=True)).train()  # the skip half learns from the first step
    fresh(x, t, "image", cond_ids=ids, drop_condition=False).square().sum().backward()
    assert all(s.weight.grad[:, H:].abs().sum() > 0 for s in fresh.skip_linears)


@pytest.mark.parametrize("patch", [1, 2])
def test_refiner_starts_as_the_plain_trunk_and_refines_cells_locally(patch: int) -> None:
    plain, refined = randomize(make(patch_size=patch)), make(patch_size=patch, refiner=6)
    missing = refined.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("refiner.") for k in missing)
    x, t, ids = torch.randn(2, 64, D), torch.tensor([100, 700]), torch.tensor([[4, 5, 6], [7, 8, 9]])
    with torch.no_grad():  # zero output convolution: exactly the plain trunk
        torch.testing.assert_close(refined(x, t, "image", cond_ids=ids), plain(x, t, "image", cond_ids=ids))
        audio = torch.randn(2, 5, D)  # sequences never pass through it
        torch.testing.assert_close(refined(audio, t, "audio"), plain(audio, t, "audio"))
    randomize(refined)
    refiner = refined.refiner
    h = torch.randn(2, 64 // patch**2, refined.hidden_size)
    with torch.no_grad():  # two 3 x 3 convolutions: a cell's correction reads x within 2 cells of it only
        base = refiner(h, x, (8, 8))
        moved = x.clone()
        moved[:, 0] += 5.0  # cell (0, 0)
        diff = (refiner(h, moved, (8, 8)) - base).abs().sum(dim=(0, 2)).reshape(8, 8)
    assert diff[:3, :3].sum() > 0 and diff[3:].sum() == 0 and diff[:, 3:].sum() == 0
    fresh = make(patch_size=patch, refiner=6).train()  # the zero output convolution learns from the first step
    randomize(fresh.final_layer)  # (a zero output would give the squared loss no gradient)
    fresh(x, t, "image", cond_ids=ids, drop_condition=False).square().sum().backward()
    assert fresh.refiner.out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="refiner must be >= 0"):
        make(refiner=-1)
