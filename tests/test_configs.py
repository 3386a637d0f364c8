"""Every recipe in configs/ runs: fit (2 steps), test (report written) and predict, with tiny presets.

The configs are shrunk generically (``tests/tiny.py``), so a new YAML is covered the moment it is
added and a config cannot rot.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from multimodal.cli import main
from tests.tiny import CONFIGS, write_tiny_config

NAMES = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def test_there_are_configs() -> None:
    assert {"tokenizer.yaml", "generation.yaml"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_fits_tests_and_predicts(name: str, shard_dir: Path, tokenizer_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    path = write_tiny_config(name, shard_dir, run, tokenizer_run)
    main(["fit", "--config", str(path)])
    ckpt = next(run.rglob("last.ckpt"))
    main(["test", "--config", str(path), f"--ckpt_path={ckpt}"])
    heads = yaml.safe_load(path.read_text())["model"]["init_args"]["heads"]
    report = json.loads(max(run.rglob("test_metrics.json"), key=lambda p: p.stat().st_mtime).read_text())
    for task in heads:
        assert any(k.startswith(f"test/{task}/") for k in report), (task, sorted(report))
        if heads[task]["init_args"].get("scene_attributes"):  # caption -> image, judged object by object
            for prefix in ("scene", "scene_real", "scene_codec"):
                assert 0.0 <= report[f"test/{task}/{prefix}/all_captions/all"] <= 1.0, sorted(report)
            for attribute in heads[task]["init_args"].get("scene_breakdown") or {}:  # one-object captions per value
                assert any(k.startswith(f"test/{task}/scene_real/1_object_{attribute}=") for k in report), sorted(report)
        if heads[task]["init_args"].get("transcriber"):  # text -> speech, heard by the transcriber
            assert report[f"test/{task}/wer"] >= 0 and report[f"test/{task}/wer_real"] >= 0, sorted(report)
        if heads[task]["class_path"] == "tasks.VocoderHead":  # side by side with Griffin-Lim
            assert {f"test/{task}/{m}/si_sdr" for m in ("vocoder", "griffin_lim")} <= set(report), sorted(report)
    main(["predict", "--config", str(path), f"--ckpt_path={ckpt}"])
    for task in heads:
        jsonl = next(run.rglob(f"predictions/{task}.jsonl"))
        records = [json.loads(line) for line in jsonl.read_text().splitlines()]
        assert records and all("__key__" in r for r in records)
        for media in ("image", "audio"):  # generated media: one file per sample, named by its key
            assert all(Path(r[media]).is_file() and Path(r[media]).stem == r["__key__"] for r in records if media in r)


SCALE = sorted((CONFIGS / "scale").glob("*.yaml"))


@pytest.mark.parametrize("overlay", SCALE, ids=[p.name for p in SCALE])
def test_scale_overlays_compose_with_a_recipe(overlay: Path, capsys: pytest.CaptureFixture) -> None:
    """configs/scale/*.yaml are trainer overlays (GPU only): they must merge with a recipe and keep
    its model; here they are parsed and printed, not run (CI has no GPU)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "multitask.yaml"), "--config", str(overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    merged = yaml.safe_load(capsys.readouterr().out)
    expected = yaml.safe_load(overlay.read_text())["trainer"]
    assert merged["trainer"]["precision"] == expected["precision"] == "bf16-mixed"
    strategy = merged["trainer"]["strategy"]
    assert strategy == expected["strategy"] or strategy["class_path"] == expected["strategy"]["class_path"]
    assert set(merged["model"]["init_args"]["heads"]) == set(
        yaml.safe_load((CONFIGS / "multitask.yaml").read_text())["model"]["init_args"]["heads"])


SIZES = sorted((CONFIGS / "image_size").glob("[0-9]*.yaml"), key=lambda p: int(p.stem))


@pytest.mark.parametrize("overlay", SIZES, ids=[p.name for p in SIZES])
def test_image_size_overlays_set_the_codec_and_the_data_follows(overlay: Path, shard_dir: Path, tmp_path: Path) -> None:
    """configs/image_size/<side>.yaml on the image stage-1 recipe: the codec takes <side> px at the
    table's down-sampling, and the data module (image_size unset) follows it: the 16 px test images
    are upsampled and the fit trains (a size mismatch would fail the first step)."""
    from multimodal.image_codec import IMAGE_SIZES

    size = int(overlay.stem)
    run = tmp_path / "run"
    base = write_tiny_config("tokenizer_image.yaml", shard_dir, run)
    main(["fit", "--config", str(base), "--config", str(overlay), "--trainer.limit_val_batches=0"])
    saved = yaml.safe_load(next(run.rglob("config.yaml")).read_text())
    codec = saved["model"]["init_args"]["backbone"]["init_args"]["codecs"]["image"]["init_args"]
    assert (codec["image_size"], codec["downsample"]) == (size, IMAGE_SIZES[size]["downsample"])
    assert all(t["init_args"].get("image_size") is None for t in saved["data"]["init_args"]["tasks"].values())
    assert next(run.rglob("last.ckpt")).is_file()


def test_f2_overlay_and_generation_shapes_fit_the_trunk(capsys: pytest.CaptureFixture) -> None:
    """The real recipes, parsed: configs/image_size/f2.yaml makes the image stage 1 an f = 2 codec of
    16-dim codes (the codebook's size kept), and configs/generation_shapes.yaml's trunk reads that
    latent in patches no wider than itself (in_dim * p^2 <= hidden_size: else it cannot denoise)."""
    from multimodal.dit import PRESETS

    def printed(*configs: str) -> dict:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *[a for c in configs for a in ("--config", str(CONFIGS / c))], "--print_config"])
        assert exit_info.value.code in (0, None)
        return yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["backbone"]["init_args"]

    tokenizer = printed("tokenizer_image.yaml", "image_size/f2.yaml")
    base = yaml.safe_load((CONFIGS / "tokenizer_image.yaml").read_text())["model"]["init_args"]["backbone"]["init_args"]
    codec = tokenizer["codecs"]["image"]["init_args"]
    assert (codec["downsample"], codec["code_dim"], tokenizer["quantizer"]["init_args"]["dim"]) == (2, 16, 16)
    assert tokenizer["quantizer"]["init_args"]["num_codes"] == base["quantizer"]["init_args"]["num_codes"]
    trunk = printed("generation_shapes.yaml")["trunk"]["init_args"]
    assert trunk["in_dim"] == 16
    assert trunk["in_dim"] * trunk["patch_size"] ** 2 <= (trunk.get("hidden_size") or PRESETS[trunk["preset"]]["hidden_size"])


def test_f2_tokenizer_under_generation_shapes(shard_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """configs/image_size/f2.yaml on the image stage-1 recipe gives an f = 2 codec (16 px -> 8 x 8 grid);
    configs/generation_shapes.yaml on it patchifies that grid 2 x 2 and fits and tests, the scene
    judge's three reports included; scripts/denoise_probe.py scores it from two starts and draws them."""
    import importlib.util

    import torch
    from PIL import Image

    from tests.tiny import CODE_DIM

    tokenizer = tmp_path / "tok_f2"
    main(["fit", "--config", str(write_tiny_config("tokenizer_image.yaml", shard_dir, tokenizer)),
          "--config", str(CONFIGS / "image_size" / "f2.yaml"), "--trainer.limit_val_batches=0"])
    saved = yaml.safe_load(next(tokenizer.rglob("config.yaml")).read_text())
    assert saved["model"]["init_args"]["backbone"]["init_args"]["codecs"]["image"]["init_args"]["downsample"] == 2
    run = tmp_path / "gen"
    path = write_tiny_config("generation_shapes.yaml", shard_dir, run, tokenizer)
    main(["fit", "--config", str(path)])
    ckpt = next(run.rglob("last.ckpt"))
    weight = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]["backbone.trunk.x_embedder.weight"]
    assert weight.shape[1] == 4 * CODE_DIM  # 2 x 2 patches of the f = 2 grid
    main(["test", "--config", str(path), f"--ckpt_path={ckpt}"])
    report = json.loads(next(run.rglob("test_metrics.json")).read_text())
    assert 0.0 <= report["test/shapes/scene_codec/all_captions/all"] <= 1.0

    spec = importlib.util.spec_from_file_location("denoise_probe", CONFIGS.parent / "scripts" / "denoise_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    capsys.readouterr()
    grid = tmp_path / "probe.png"
    assert probe.main(["--ckpt", str(run), "--start", "0.5", "1.0", "--samples", "4", "--steps", "4",
                       "--grid", str(grid)]) == 0
    lines = capsys.readouterr().out.splitlines()
    scored = [line for line in lines if line.startswith("start ")]
    assert [line.split()[1] for line in scored] == ["0.50", "1.00"] and "(t = 500)" in scored[0]
    assert all("all_captions/all" in line and "judge_acc" in line for line in scored), lines
    # the recipe's scene_breakdown: one-object scenes are also scored per size, whenever there are any
    assert all(("'1_object/all'" in line) == ("'1_object_size=" in line) for line in scored), lines
    with Image.open(grid) as image:  # 4 rows (real, through the tokenizer, two starts) of the 4 square images
        assert image.height == image.width > 0
    # --swap: the test shards' captions are random words, so no scene's caption names its shape
    with pytest.raises(SystemExit, match="no one-object validation scene whose caption names its shape"):
        probe.main(["--ckpt", str(run), "--start", "0.6", "--samples", "8", "--steps", "2", "--swap", "shape"])
    with pytest.raises(SystemExit, match="--swap texture"):
        probe.main(["--ckpt", str(run), "--start", "0.6", "--samples", "4", "--swap", "texture"])
    with pytest.raises(SystemExit, match="--breakdown texture: needs a head with a scene judge and the attribute"):
        probe.main(["--ckpt", str(run), "--start", "0.6", "--samples", "4", "--breakdown", "texture"])
    _check_swapped_captions(probe)
    _check_loss_table(probe, run, capsys)
    _check_ideal_observer(run, capsys)


def _check_ideal_observer(run: Path, capsys: pytest.CaptureFixture) -> None:
    """scripts/ideal_observer.py on the tiny run: one line a noise level, accuracies in [0, 1], and the
    observer is never worse than chance by much on (nearly) clean latents."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ideal_observer", CONFIGS.parent / "scripts" / "ideal_observer.py")
    observer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(observer)
    capsys.readouterr()
    assert observer.main(["--ckpt", str(run), "--start", "0", "1", "--scenes", "8", "--draws", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("8 one-object scenes, 5 values of shape each") and "chance 0.200" in lines[0]
    scored = [line for line in lines if line.startswith("start ")]
    assert [line.split()[1] for line in scored] == ["0.00", "1.00"] and "(t = 0," in scored[0]
    accuracy = [json.loads(line.split("shape ")[1].replace("'", '"'))["all"] for line in scored]
    assert all(0.0 <= a <= 1.0 for a in accuracy), scored
    with pytest.raises(SystemExit):
        observer.main(["--ckpt", str(run), "--start", "1.5"])


def _check_loss_table(probe, run: Path, capsys: pytest.CaptureFixture) -> None:
    """denoise_probe's loss table on the tiny run: a "swap" to the same caption loses nothing (share 0)."""
    import argparse

    import torch

    from multimodal.checkpoint import resolve_checkpoint, run_datamodule
    from tasks import MultiTaskModule

    ckpt = resolve_checkpoint(str(run))
    model = MultiTaskModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    data = run_datamodule(ckpt, stage="validate")
    batch = next(iter(data.val_dataloader()))
    same = {"text_ids": batch["text_ids"], "text_lengths": batch["text_lengths"],
            "index": torch.arange(len(batch["text"]))}
    capsys.readouterr()
    with torch.no_grad():
        probe._loss_table(model.heads["shapes"], model.backbone, [(batch, same)],
                          argparse.Namespace(loss_t=[100, 900], seed=0, swap="shape"))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["loss at t = 100", "loss at t = 900"], lines
    for line in lines:
        numbers = [float(w.strip(",;")) for w in line.split(":")[1].split() if w[0].isdigit()]
        true, swapped, none = numbers[:3]
        assert true == swapped and none > 0, line
        helps, no_help = "word share 0.00", "(the caption does not help here)"
        # the printed losses are rounded: where they print equal, the unrounded gain decides either way
        endings = (helps,) if none > true else (no_help,) if none < true else (helps, no_help)
        assert line.endswith(endings), line


def _check_swapped_captions(probe) -> None:
    """denoise_probe's --swap batch: one-object scenes only, the word and its annotation both swapped."""
    import torch

    class Words:  # a stand-in tokenizer: one id a word
        pad_id = 0

        def encode(self, text: str) -> tuple:
            return torch.tensor([len(w) for w in text.split()]), False

    shapes = ["circle", "square", "triangle", "diamond", "cross"]
    objects = torch.full((3, 3, 5), -1.0)
    objects[0, 0] = torch.tensor([0.5, 0.5, 0, 0, 1])  # a large red circle
    objects[1, :2] = torch.tensor([[0.3, 0.5, 2, 4, 1], [0.7, 0.5, 0, 1, 0]])  # two objects: left alone
    objects[2, 0] = torch.tensor([0.5, 0.5, 1, 3, 0])  # a small green diamond
    batch = {"text": ["a large red circle", "a large blue cross left of a small red square",
                      "there is a little green diamond"], "objects": objects}
    out = probe._swapped(batch, "shape", shapes, 3, Words())
    assert out["index"].tolist() == [0, 2]
    assert out["objects"][:, 0, 3].tolist() == [1.0, 0.0]  # circle -> square; diamond -> circle (+2)
    assert torch.equal(out["objects_image"], objects[[0, 2]])
    assert out["text_lengths"].tolist() == [4, 6]
    assert out["text_ids"].tolist() == [[1, 5, 3, 6, 0, 0],  # "a large red square" (word lengths), padded
                                        [5, 2, 1, 6, 5, 6]]  # "there is a little green circle"


def test_caption_64_on_a_64_px_tokenizer(shard_dir: Path, tmp_path: Path) -> None:
    """configs/image_size/caption_64.yaml after caption_shapes.yaml, on a (tiny) 64 px stage-1 run: the
    trunk reads the 16 x 16 grid of the checkpoint's codec; fit and test run."""
    tokenizer = tmp_path / "tok64"
    main(["fit", "--config", str(write_tiny_config("tokenizer_image.yaml", shard_dir, tokenizer)),
          "--config", str(CONFIGS / "image_size" / "64.yaml"), "--trainer.limit_val_batches=0"])
    run = tmp_path / "cap64"
    base = write_tiny_config("caption_shapes.yaml", shard_dir, run, tokenizer)
    overlay = yaml.safe_load((CONFIGS / "image_size" / "caption_64.yaml").read_text())
    overlay["trainer"]["default_root_dir"] = str(run)
    overlay["model"]["init_args"]["backbone"]["init_args"]["tokenizer_ckpt"] = str(tokenizer)
    (tmp_path / "caption_64.yaml").write_text(yaml.safe_dump(overlay))
    main(["fit", "--config", str(base), "--config", str(tmp_path / "caption_64.yaml")])
    main(["test", "--config", str(base), "--config", str(tmp_path / "caption_64.yaml"),
          f"--ckpt_path={next(run.rglob('last.ckpt'))}"])
    report = json.loads(next(run.rglob("test_metrics.json")).read_text())
    assert "test/shapes/bleu4" in report
