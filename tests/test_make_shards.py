"""scripts/make_shards.py: image folders, audio folders and manifests to WebDataset shards."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from PIL import Image

from datamodules.shards import AudioDecodeError, read_audio, wav_truncation

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_shards.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_shards", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


make_shards = _load_script()


# ------------------------------------------------------------------------------------------ helpers
def save_image(path: Path, value: int, fmt: str | None = None, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    pixels = (rng.integers(0, 40, (size, size, 3)) + value).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def save_corrupt_image(path: Path) -> Path:
    """A PNG cut in half: PIL identifies it but cannot decode it."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def tone(rate: int, seconds: float, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def save_audio(path: Path, wave: np.ndarray, rate: int, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, rate, format=fmt, subtype="PCM_16")
    return path


def save_truncated_wav(path: Path, rate: int = 8000) -> Path:
    """A WAV whose data chunk is half as long as its header says (libsndfile reads it silently)."""
    buf = io.BytesIO()
    sf.write(buf, tone(rate, 0.5), rate, format="WAV", subtype="PCM_16")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def run(*argv: str | Path) -> int:
    return make_shards.main([str(a) for a in argv] + ["--quiet"])


def read_split(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    """``{key: {ext: bytes}}`` of every shard of a split, read with tarfile."""
    info = json.loads((out / "info.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for name in info["splits"][split]["shards"]:
        with tarfile.open(out / name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def assert_clean(out: Path, info: dict) -> None:
    """No temporary files; the shard files on disk are exactly those info.json lists."""
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    listed = {name for entry in info["splits"].values() for name in entry["shards"]}
    assert {p.name for p in out.glob("*.tar")} == listed


# -------------------------------------------------------------------------------------------- tests
@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    src = tmp_path / "images"
    save_image(src / "cat" / "a.jpeg", 10, "JPEG")
    save_image(src / "cat" / "b.png", 20)
    save_image(src / "cat" / "sub" / "c.webp", 30, "WEBP")
    save_image(src / "dog" / "d.jpg", 40, "JPEG")
    save_image(src / "dog" / "e.png", 50)
    save_image(src / "dog" / "f.bmp", 60, "BMP")
    save_corrupt_image(src / "dog" / "broken.png")
    (src / "dog" / "garbage.jpg").write_bytes(b"not an image at all")
    (src / "dog" / "notes.txt").write_text("not an image")
    (src / "dog" / ".DS_Store").write_bytes(b"\0")  # hidden: ignored, not counted
    (src / "README.md").write_text("outside the class folders")
    (src / "empty_class").mkdir()
    return src


def test_imagefolder_round_trip(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("imagefolder", image_folder, out, "--val-ratio", "0.34", "--max-count", "2") == 0
    info = json.loads((out / "info.json").read_text())
    assert info["classes"] == ["cat", "dog", "empty_class"]
    assert info["modalities"] == ["image", "label"]
    assert info["sample_rate"] is None
    assert info["skipped"] == {"corrupt_image": 2, "no_class_folder": 1, "unsupported_type": 1}
    assert sorted(info["bad_samples"]) == [
        ["README.md", "no_class_folder"],
        ["dog/broken.png", "corrupt_image"],
        ["dog/garbage.jpg", "corrupt_image"],
        ["dog/notes.txt", "unsupported_type"],
    ]
    counts = {s: e["count"] for s, e in info["splits"].items()}
    assert counts == {"train": 4, "val": 2, "test": 0}
    assert len(info["splits"]["train"]["shards"]) == 2 and info["splits"]["test"]["shards"] == []
    assert_clean(out, info)

    samples = {**read_split(out, "train"), **read_split(out, "val")}
    assert len(samples) == 6
    by_source = {json.loads(s["json"])["source"]: s for s in samples.values()}
    assert set(by_source) == {
        "cat/a.jpeg",
        "cat/b.png",
        "cat/sub/c.webp",
        "dog/d.jpg",
        "dog/e.png",
        "dog/f.bmp",
    }
    expected_ext = {"cat/a.jpeg": "jpg", "cat/b.png": "png", "cat/sub/c.webp": "webp", "dog/d.jpg": "jpg"}
    expected_ext |= {"dog/e.png": "png", "dog/f.bmp": "png"}
    for source, sample in by_source.items():
        ext = expected_ext[source]
        assert set(sample) == {ext, "cls", "json"}
        assert int(sample["cls"]) == (0 if source.startswith("cat/") else 1)
        original = (image_folder / source).read_bytes()
        if source.endswith(".bmp"):  # not a shard format: re-encoded, same pixels
            assert np.array_equal(
                np.asarray(Image.open(io.BytesIO(sample["png"]))),
                np.asarray(Image.open(image_folder / source)),
            )
        else:
            assert sample[ext] == original  # the original bytes are kept

    # plain webdataset reads the same samples
    urls = [str(out / n) for n in info["splits"]["train"]["shards"]]
    read = list(wds.WebDataset(urls, shardshuffle=False))
    assert sorted(s["__key__"] for s in read) == sorted(read_split(out, "train"))


def test_imagefolder_png_and_overwrite(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("imagefolder", image_folder, out, "--val-ratio", "0") == 0
    with pytest.raises(SystemExit) as exc:  # an existing output is refused without --overwrite
        run("imagefolder", image_folder, out)
    assert exc.value.code == 2
    assert (
        run("imagefolder", image_folder, out, "--val-ratio", "0", "--image-format", "png", "--overwrite") == 0
    )
    info = json.loads((out / "info.json").read_text())
    assert info["splits"]["train"]["count"] == 6 and info["options"]["image_format"] == "png"
    for sample in read_split(out, "train").values():
        assert set(sample) == {"png", "cls", "json"}
        Image.open(io.BytesIO(sample["png"])).load()
    assert_clean(out, info)


def test_audiofolder_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "audio"
    stereo = np.stack([tone(8000, 0.5, amp=0.6), np.zeros(4000, np.float32)], axis=1)
    save_audio(src / "no" / "a.wav", stereo, 8000)  # stereo 8 kHz: downmix + upsample
    save_audio(src / "no" / "b.flac", tone(22050, 0.25), 22050, "FLAC")
    save_audio(src / "yes" / "c.wav", tone(16000, 0.3), 16000)
    save_audio(src / "yes" / "d.wav", tone(48000, 0.2), 48000)
    save_truncated_wav(src / "yes" / "truncated.wav")
    save_audio(src / "yes" / "empty.wav", np.zeros(0, np.float32), 16000)
    (src / "yes" / "noise.wav").write_bytes(b"RIFX this is not audio")
    (src / "yes" / "image.png").write_bytes(b"")

    out = tmp_path / "out"
    assert run("audiofolder", src, out, "--val-ratio", "0", "--sample-rate", "16000", "--max-count", "3") == 0
    info = json.loads((out / "info.json").read_text())
    assert info["classes"] == ["no", "yes"]
    assert info["modalities"] == ["audio", "label"]
    assert info["sample_rate"] == 16000
    assert info["skipped"] == {
        "empty_audio": 1,
        "truncated_audio": 1,
        "undecodable_audio": 1,
        "unsupported_type": 1,
    }
    assert {s: e["count"] for s, e in info["splits"].items()} == {"train": 4, "val": 0, "test": 0}
    assert len(info["splits"]["train"]["shards"]) == 2
    assert_clean(out, info)

    durations = {"no/a.wav": 0.5, "no/b.flac": 0.25, "yes/c.wav": 0.3, "yes/d.wav": 0.2}
    for sample in read_split(out, "train").values():
        assert set(sample) == {"wav", "cls", "json"}
        source = json.loads(sample["json"])["source"]
        wave, rate = sf.read(io.BytesIO(sample["wav"]), dtype="float32")
        assert rate == 16000 and wave.ndim == 1
        assert sf.info(io.BytesIO(sample["wav"])).subtype == "PCM_16"
        assert abs(len(wave) - durations[source] * 16000) <= 2
        assert int(sample["cls"]) == (0 if source.startswith("no/") else 1)
        peak = np.abs(wave[len(wave) // 4 : 3 * len(wave) // 4]).max()
        assert peak == pytest.approx(0.3 if source == "no/a.wav" else 0.5, abs=0.02)  # stereo averaged


def test_audiofolder_flac_output(tmp_path: Path) -> None:
    save_audio(tmp_path / "src" / "x" / "a.wav", tone(8000, 0.25), 8000)
    out = tmp_path / "out"
    assert (
        run(
            "audiofolder",
            tmp_path / "src",
            out,
            "--val-ratio",
            "0",
            "--sample-rate",
            "22050",
            "--audio-format",
            "flac",
        )
        == 0
    )
    (sample,) = read_split(out, "train").values()
    assert set(sample) == {"flac", "cls", "json"}
    wave, rate = sf.read(io.BytesIO(sample["flac"]))
    assert rate == 22050 and abs(len(wave) - 0.25 * 22050) <= 2
    assert json.loads((out / "info.json").read_text())["sample_rate"] == 22050


ROWS = [  # path, text, label, split; the comment says what happens
    ("media/red.png", "a red square", "cat", "train"),  # kept, train
    ("media/blue.jpg", "a blue square", "dog", "val"),  # kept, val
    ("media/clip.wav", "hello world", "dog", "test"),  # kept, test (audio)
    ("media/navy.jpg", "  another blue  ", "bird", "validation"),  # kept, val (alias)
    ("media/broken.png", "broken", "cat", "train"),  # corrupt_image
    ("media/cut.wav", "cut short", "cat", "train"),  # truncated_audio
    ("media/red.png", "   ", "cat", "train"),  # empty_text
    ("media/ghost.png", "not there", "dog", "train"),  # missing_file
    ("media/red.png", "odd split", "cat", "holdout"),  # unknown_split
    ("media/notes.txt", "what", "cat", "train"),  # unsupported_type
]


@pytest.fixture
def media(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    save_image(root / "media" / "red.png", 200)
    save_image(root / "media" / "blue.jpg", 20, "JPEG")
    save_image(root / "media" / "navy.jpg", 30, "JPEG")
    save_corrupt_image(root / "media" / "broken.png")
    save_audio(root / "media" / "clip.wav", tone(8000, 0.5), 8000)
    save_truncated_wav(root / "media" / "cut.wav")
    (root / "media" / "notes.txt").write_text("x")
    return root


def write_manifest(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_manifest_round_trip(media: Path, tmp_path: Path, suffix: str) -> None:
    rows = [dict(zip(("path", "text", "label", "split"), r)) for r in ROWS]
    manifest = write_manifest(media / f"manifest{suffix}", rows)
    out = tmp_path / "out"
    assert run("manifest", manifest, out, "--sample-rate", "16000", "--val-ratio", "0.5") == 0
    info = json.loads((out / "info.json").read_text())
    assert info["classes"] == ["bird", "cat", "dog"]  # names in sorted order, from every row
    assert info["modalities"] == ["audio", "image", "label", "text"]
    assert info["modality_counts"] == {"audio": 1, "image": 3, "label": 4, "text": 4}
    assert info["sample_rate"] == 16000
    assert info["skipped"] == {
        "corrupt_image": 1,
        "empty_text": 1,
        "missing_file": 1,
        "truncated_audio": 1,
        "unknown_split": 1,
        "unsupported_type": 1,
    }
    assert {s: e["count"] for s, e in info["splits"].items()} == {"train": 1, "val": 2, "test": 1}
    assert info["source"].startswith("manifest ") and info["source"].endswith(manifest.name)
    assert_clean(out, info)

    # the split column decides, keys are manifest row numbers
    train, val, test = (read_split(out, s) for s in ("train", "val", "test"))
    assert set(train) == {"00000000"} and set(val) == {"00000001", "00000003"} and set(test) == {"00000002"}
    assert set(train["00000000"]) == {"png", "txt", "cls", "json"}
    assert train["00000000"]["png"] == (media / "media" / "red.png").read_bytes()
    assert train["00000000"]["txt"].decode() == "a red square" and train["00000000"]["cls"] == b"1"
    assert val["00000003"]["txt"].decode() == "another blue" and val["00000003"]["cls"] == b"0"
    assert set(val["00000001"]) == {"jpg", "txt", "cls", "json"} and val["00000001"]["cls"] == b"2"
    clip = test["00000002"]
    assert set(clip) == {"wav", "txt", "cls", "json"} and clip["txt"] == b"hello world"
    wave, rate = sf.read(io.BytesIO(clip["wav"]))
    assert rate == 16000 and abs(len(wave) - 8000) <= 2


def test_manifest_groups_captions_of_a_path(media: Path, tmp_path: Path) -> None:
    rows = [
        {"path": "media/red.png", "text": "a red square", "split": "train"},
        {"path": "media/blue.jpg", "text": "a blue square", "split": "val"},
        {"path": "media/red.png", "text": "a square in red", "split": "train"},
        {"path": "media/red.png", "text": "a red square", "split": "train"},  # the same caption again: kept once
        {"path": "media/red.png", "text": "  ", "split": "train"},  # empty_text (the other rows stay)
        {"path": "media/navy.jpg", "text": ["a navy square", 7], "split": "train"},  # bad_captions
        {"path": "media/clip.wav", "text": [], "split": "train"},  # empty_text: no caption at all
        {"path": "media/blue.jpg", "text": ["blue, square", " a square of blue "], "split": "val"},  # a list
    ]
    manifest = write_manifest(media / "captions.jsonl", rows)
    out = tmp_path / "out"
    assert run("manifest", manifest, out) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["skipped"] == {"bad_captions": 1, "empty_text": 2}
    assert info["captions_per_sample"] == {"2": 1, "3": 1}
    assert {s: e["count"] for s, e in info["splits"].items()} == {"train": 1, "val": 1, "test": 0}
    (red,), (blue,) = read_split(out, "train").values(), read_split(out, "val").values()
    assert red["txt"] == b"a red square" and json.loads(red["captions.json"]) == ["a red square", "a square in red"]
    assert json.loads(blue["captions.json"]) == ["a blue square", "blue, square", "a square of blue"]
    assert set(red) == {"png", "txt", "captions.json", "json"}

    # the decoder: evaluation takes the first caption and keeps all; training draws among them (seeded)
    from datamodules.decode import SampleDecoder

    sample = {"__key__": "k", **red}
    evaluated = SampleDecoder(keys=("text",))(sample)
    assert evaluated["text"] == "a red square" and evaluated["references"] == ["a red square", "a square in red"]
    import random

    draws = [SampleDecoder(keys=("text",), train=True, rng=random.Random(i))(sample)["text"] for i in range(20)]
    assert set(draws) == {"a red square", "a square in red"}
    again = [SampleDecoder(keys=("text",), train=True, rng=random.Random(i))(sample)["text"] for i in range(20)]
    assert draws == again


@pytest.mark.parametrize("what", ["split", "label"])
def test_manifest_refuses_a_path_in_two_splits_or_labels(media: Path, tmp_path: Path, what: str, capsys) -> None:
    rows = [{"path": "media/red.png", "text": "a red square", "split": "train", "label": "cat"},
            {"path": "media/red.png", "text": "the red one", "split": "train", "label": "cat"}]
    rows[1][what] = {"split": "test", "label": "dog"}[what]
    manifest = write_manifest(media / "captions.csv", rows)
    with pytest.raises(SystemExit) as exit_info:
        run("manifest", manifest, tmp_path / "out")
    assert exit_info.value.code == 2
    assert f"manifest: media/red.png has captions with {what}" in capsys.readouterr().err
    assert not (tmp_path / "out" / "info.json").exists()


def test_decoder_skips_bad_caption_lists() -> None:
    from datamodules.decode import BadSample, SampleDecoder

    decode = SampleDecoder(keys=("text",))
    for member, reason in ((b'["a", 3]', "bad_captions"), (b'{"a": 1}', "bad_captions"), (b"[a", "bad_captions"),
                           (b'["  ", ""]', "empty_text")):
        with pytest.raises(BadSample) as bad:
            decode({"__key__": "k", "txt": b"fallback", "captions.json": member})
        assert bad.value.reason == reason, member


def test_manifest_int_labels_text_only(tmp_path: Path) -> None:
    lines = [
        json.dumps({"text": "zero", "label": 0}),
        json.dumps({"text": "two", "label": "2"}),
        json.dumps({"text": "negative", "label": -1}),
        json.dumps({"text": "", "label": 1}),
        "{not json",
        json.dumps({"text": "no label"}),
        "",
        json.dumps({"text": "one", "label": 1.0}),
    ]
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert run("manifest", manifest, out, "--val-ratio", "0", "--no-shuffle") == 0
    info = json.loads((out / "info.json").read_text())
    assert info["classes"] == ["0", "1", "2"] and info["num_classes"] == 3
    assert info["modalities"] == ["label", "text"] and info["sample_rate"] is None
    assert info["skipped"] == {"bad_label": 1, "bad_row": 1, "empty_text": 1, "missing_label": 1}
    samples = read_split(out, "train")
    assert {k: (s["txt"].decode(), int(s["cls"])) for k, s in samples.items()} == {
        "00000000": ("zero", 0),
        "00000001": ("two", 2),
        "00000006": ("one", 1),
    }
    assert set(samples["00000000"]) == {"txt", "cls", "json"}


def test_ratio_split_is_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "images"
    for i in range(12):
        save_image(src / ("ab"[i % 2]) / f"{i:02d}.png", i * 10)
    args = ["--val-ratio", "0.25", "--test-ratio", "0.25", "--max-count", "2"]
    outs = [tmp_path / name for name in ("one", "two", "other_seed", "in_order")]
    assert run("imagefolder", src, outs[0], *args, "--seed", "7") == 0
    assert run("imagefolder", src, outs[1], *args, "--seed", "7") == 0
    assert run("imagefolder", src, outs[2], *args, "--seed", "8") == 0
    assert run("imagefolder", src, outs[3], *args, "--seed", "7", "--no-shuffle") == 0

    info = json.loads((outs[0] / "info.json").read_text())
    assert {s: e["count"] for s, e in info["splits"].items()} == {"train": 6, "val": 3, "test": 3}
    assert {s: len(e["shards"]) for s, e in info["splits"].items()} == {"train": 3, "val": 2, "test": 2}
    for shard in outs[0].glob("*.tar"):
        assert shard.read_bytes() == (outs[1] / shard.name).read_bytes()
    assert sorted(p.name for p in outs[0].iterdir()) == sorted(p.name for p in outs[1].iterdir())
    keys = [{s: sorted(read_split(o, s)) for s in ("train", "val", "test")} for o in outs]
    assert keys[0] == keys[1] == keys[3] and keys[0] != keys[2]
    # the seeded shuffle is also the writing order; --no-shuffle writes in listing order
    shuffled = [
        s["__key__"] for s in wds.WebDataset(str(outs[0] / "train-{000000..000002}.tar"), shardshuffle=False)
    ]
    in_order = [
        s["__key__"] for s in wds.WebDataset(str(outs[3] / "train-{000000..000002}.tar"), shardshuffle=False)
    ]
    assert in_order == sorted(shuffled) and shuffled != in_order
    assert sorted(k for ks in keys[0].values() for k in ks) == [f"{i:08d}" for i in range(12)]


def test_max_size_starts_new_shards(tmp_path: Path) -> None:
    src = tmp_path / "images"
    for i in range(4):
        save_image(src / "a" / f"{i}.png", i * 10, size=16)
    out = tmp_path / "out"
    assert run("imagefolder", src, out, "--val-ratio", "0", "--max-size", "0.2kB") == 0
    info = json.loads((out / "info.json").read_text())
    assert len(info["splits"]["train"]["shards"]) == 4  # every image is over 200 bytes
    assert make_shards.parse_size("500MB") == 5e8 and make_shards.parse_size("1e8") == 1e8
    assert make_shards.parse_size("256MiB") == 256 * 2**20 and make_shards.parse_size("1.5gb") == 1.5e9


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("label,split\n1,train\n")
    with pytest.raises(SystemExit) as exc:
        run("manifest", manifest, tmp_path / "out")
    assert exc.value.code == 2 and "neither a 'path' nor a 'text' column" in capsys.readouterr().err
    for bad in (["--val-ratio", "0.7", "--test-ratio", "0.5"], ["--max-size", "lots"], ["--max-count", "0"]):
        with pytest.raises(SystemExit) as exc:
            run("manifest", manifest, tmp_path / "out", *bad)
        assert exc.value.code == 2
    empty = tmp_path / "empty.csv"
    empty.write_text("text\n   \n\t\n")
    assert run("manifest", empty, tmp_path / "out2") == 1  # nothing valid: a failure, info still written
    assert json.loads((tmp_path / "out2" / "info.json").read_text())["skipped"] == {"empty_text": 2}


def test_help_mentions_every_option() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    options = [
        "--val-ratio", "--test-ratio", "--seed", "--max-count", "--max-size", "--sample-rate",
        "--audio-format", "--image-format", "--no-shuffle", "--overwrite", "--quiet",
    ]  # fmt: skip
    for option in options:
        assert option in result.stdout
    assert "examples:" in result.stdout
    for kind in ("imagefolder", "audiofolder", "manifest"):
        assert f"make_shards.py {kind}" in result.stdout


def test_read_audio_checks() -> None:
    buf = io.BytesIO()
    sf.write(buf, tone(8000, 0.5), 8000, format="WAV", subtype="PCM_16")
    whole = buf.getvalue()
    empty = io.BytesIO()
    sf.write(empty, np.zeros(0, np.float32), 8000, format="WAV", subtype="PCM_16")
    assert wav_truncation(whole) is None and "data chunk" in wav_truncation(whole[:-10])
    nan = io.BytesIO()
    sf.write(nan, np.array([0.1, np.nan, 0.2], np.float32), 8000, format="WAV", subtype="FLOAT")
    wave, rate = read_audio(whole, 24000)
    assert rate == 24000 and wave.dtype == np.float32 and abs(len(wave) - 12000) <= 2
    assert math.isclose(float(np.abs(wave[3000:9000]).max()), 0.5, abs_tol=0.02)
    for data, reason in (
        (whole[:-10], "truncated_audio"),
        (whole[:44], "truncated_audio"),
        (empty.getvalue(), "empty_audio"),
        (nan.getvalue(), "non_finite_audio"),
        (b"junk", "undecodable_audio"),
    ):
        with pytest.raises(AudioDecodeError) as exc:
            read_audio(data)
        assert exc.value.reason == reason


def test_crash_leaves_no_partial_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "images"
    for i in range(5):
        save_image(src / "a" / f"{i}.png", i * 10)
    real, calls = make_shards.build_sample, []

    def failing(item, args):
        calls.append(item)
        if len(calls) == 4:
            raise RuntimeError("disk on fire")
        return real(item, args)

    monkeypatch.setattr(make_shards, "build_sample", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        run("imagefolder", src, out, "--val-ratio", "0", "--max-count", "2")
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar"]  # complete shards only, no info
