"""The embedded demo data sets (datamodules/demo.py) and the espeak-ng binding (datamodules/espeak.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from datamodules import demo
from datamodules.demo import DEMO_SETS, FORMAT_VERSIONS, default_cache_dir, demo_root
from datamodules.shards import read_info

REPO = Path(__file__).resolve().parents[1]
MEMBERS = {
    "shapes": {"png", "txt", "captions.json", "cls", "json"},
    "spoken": {"wav", "txt", "cls", "json"},
    "digits": {"png", "txt", "cls", "json"},
}


def needs_espeak(name: str) -> None:
    if name == "spoken":
        pytest.importorskip("espeakng_loader")


def read_split(root: Path, shards: list[str]) -> list[dict[str, bytes]]:
    """All samples of a split, in order: ``{"__key__": ..., ext: bytes}``."""
    samples: list[dict] = []
    for shard in shards:
        with tarfile.open(root / shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][ext] = tar.extractfile(member).read()
    return samples


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.suffix in (".tar", ".json")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """Tiny sets generated once per module (seed 0), by name."""
    cache = tmp_path_factory.mktemp("demo-cache")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        needs_espeak(name)
        if name not in made:
            made[name] = demo_root(name, cache, seed=0, size="tiny")
        return made[name]

    return get


# --------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", DEMO_SETS)
def test_tiny_set_is_complete_and_consistent(tiny, name: str) -> None:
    root = tiny(name)
    assert root.name == f"{name}-v{FORMAT_VERSIONS[name]}-s0-tiny"
    info = read_info(root)
    assert info["classes"], "classes must not be empty"
    assert f"demo:{name}" in info["source"] and "seed 0" in info["source"]
    expected_splits = {"train", "val", "test"} | ({"heldout"} if name == "spoken" else set())
    assert set(info["splits"]) == expected_splits
    assert sorted(p.name for p in root.glob("*.tar")) == sorted(
        s for split in info["splits"].values() for s in split["shards"]
    )
    assert not list(root.glob("*.tmp")), "no temporary shard may remain"
    keys = set()
    for split, entry in info["splits"].items():
        assert len(entry["shards"]) >= demo.MIN_SHARDS, f"{split}: too few shards to split across workers"
        samples = read_split(root, entry["shards"])
        assert len(samples) == entry["count"] > 0
        for sample in samples:
            assert set(sample) - {"__key__"} == MEMBERS[name], sample["__key__"]
            label = int(sample["cls"])
            assert 0 <= label < len(info["classes"])
            assert sample["txt"].decode().strip()
            json.loads(sample["json"])
            keys.add(sample["__key__"])
    assert len(keys) == sum(e["count"] for e in info["splits"].values()), "keys must be unique"


def test_shapes_captions_and_images(tiny) -> None:
    root = tiny("shapes")
    info = read_info(root)
    assert info["modalities"] == ["image", "label", "text"] and info["sample_rate"] is None
    classes = info["classes"]
    assert {"circle", "square", "triangle"} <= set(classes)
    for entry in info["splits"].values():
        for sample in read_split(root, entry["shards"]):
            image = Image.open(io.BytesIO(sample["png"]))
            assert image.size == (32, 32) and image.mode == "RGB"
            caption, shape = sample["txt"].decode(), classes[int(sample["cls"])]
            words = caption.split()
            assert words[0] == "a" and words[1] in ("small", "large") and words[3] == shape, caption
            meta = json.loads(sample["json"])
            radii = [obj["r"] for obj in meta["objects"]]
            assert meta["objects"][0]["shape"] == shape
            assert all(radii[0] > r for r in radii[1:]), "the labelled object must be strictly the largest"
            assert caption.count(" a ") == len(radii) - 1
            # four true paraphrases: the same objects (shape and colour), named in another order or words
            captions = json.loads(sample["captions.json"])
            assert captions[0] == caption and len(set(captions)) == 4
            objects = sorted((o["colour"], o["shape"]) for o in meta["objects"])
            for other in captions:
                words = other.replace(",", "").split()
                named = sorted((words[i - 1], w) for i, w in enumerate(words) if w in demo.SHAPES)
                assert named == objects, (other, objects)
                assert words.count("large") + words.count("big") == (meta["objects"][0]["size"] == "large") * 1
            pixels = np.asarray(image)
            assert pixels.std() > 5, "the scene must not be blank"


def test_spoken_audio_and_heldout_voices(tiny) -> None:
    root = tiny("spoken")
    info = read_info(root)
    assert info["sample_rate"] == 16000 and "audio" in info["modalities"]
    heldout = set(info["heldout_voices"])
    assert heldout and not heldout & set(info["voices"])
    for split, entry in info["splits"].items():
        for sample in read_split(root, entry["shards"]):
            wave, rate = sf.read(io.BytesIO(sample["wav"]), dtype="float32")
            assert rate == 16000 and wave.ndim == 1
            assert 0.2 < len(wave) / rate <= demo.MAX_SECONDS + 1e-6
            assert np.sqrt(np.mean(wave**2)) > 0.01, "clip is silent"
            words = sample["txt"].decode().split()
            assert words[0] == info["classes"][int(sample["cls"])]
            assert 1 <= len(words) <= 4 and all(w in demo.DIGIT_WORDS for w in words[1:])
            voice = json.loads(sample["json"])["voice"]
            assert (voice in heldout) == (split == "heldout"), (split, voice)


def test_digits_images_and_stratified_split(tiny) -> None:
    root = tiny("digits")
    info = read_info(root)
    assert info["classes"] == [str(d) for d in range(10)]
    for entry in info["splits"].values():
        samples = read_split(root, entry["shards"])
        assert {int(s["cls"]) for s in samples} == set(range(10)), "every split holds every digit"
        for sample in samples:
            image = Image.open(io.BytesIO(sample["png"]))
            assert image.size == (32, 32) and image.mode == "L"
            pixels = np.asarray(image)
            assert pixels.max() == 255 and pixels.min() == 0
            assert sample["txt"].decode() == f"a handwritten {demo.DIGIT_WORDS[int(sample['cls'])]}"


def test_digits_default_split_is_stratified_80_10_10() -> None:
    labels = np.repeat(np.arange(10), 180)
    parts = demo._digits_split(labels, seed=0, size="default")
    assert sum(len(p) for p in parts.values()) == len(labels)
    assert len(np.unique(np.concatenate(list(parts.values())))) == len(labels), "splits must not overlap"
    for split, fraction in demo.DIGITS_FRACTIONS.items():
        counts = np.bincount(labels[parts[split]], minlength=10)
        assert np.all(counts == round(180 * fraction)), (split, counts)


# --------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", DEMO_SETS)
def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path: Path, name: str) -> None:
    first = tiny(name)
    again = demo_root(name, tmp_path / "again", seed=0, size="tiny")
    assert shard_bytes(again) == shard_bytes(first)
    other = demo_root(name, tmp_path / "other", seed=1, size="tiny")
    assert other.name == f"{name}-v{FORMAT_VERSIONS[name]}-s1-tiny"
    a, b = shard_bytes(first), shard_bytes(other)
    assert a.keys() == b.keys()
    assert a["train-000000.tar"] != b["train-000000.tar"]


# --------------------------------------------------------------------------------------- cache, rename, lock
def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shapes, spoken, digits"):
        demo_root("mnist")
    with pytest.raises(ValueError, match="default, tiny"):
        demo_root("shapes", size="huge")
    with pytest.raises(ValueError, match="seed"):
        demo_root("shapes", seed=-1)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MULTIMODAL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("MULTIMODAL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "multimodal-dit"


def _counting_generator(monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> list[int]:
    """Replace the digits generator by one that counts its calls (and may be slow)."""
    calls: list[int] = []
    real = demo.GENERATORS["digits"]

    def generator(out: Path, seed: int, size: str) -> dict:
        calls.append(threading.get_ident())
        time.sleep(delay)
        return real(out, seed, size)

    monkeypatch.setitem(demo.GENERATORS, "digits", generator)
    return calls


def test_existing_set_is_reused_and_broken_set_regenerated(monkeypatch, tmp_path: Path) -> None:
    calls = _counting_generator(monkeypatch)
    root = demo_root("digits", tmp_path, size="tiny")
    assert demo_root("digits", tmp_path, size="tiny") == root and len(calls) == 1
    (root / read_info(root)["splits"]["val"]["shards"][0]).unlink()  # a shard went missing
    assert demo_root("digits", tmp_path, size="tiny") == root and len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [root.name]


def test_crash_leaves_no_half_set(monkeypatch, tmp_path: Path) -> None:
    def crashing(out: Path, seed: int, size: str) -> dict:
        (out / "train-000000.tar").write_bytes(b"half written")
        raise RuntimeError("generator crashed")

    monkeypatch.setitem(demo.GENERATORS, "digits", crashing)
    with pytest.raises(RuntimeError, match="crashed"):
        demo_root("digits", tmp_path, size="tiny")
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    # a stale temporary folder from a killed process is cleaned up by the next generation
    stale = tmp_path / f".digits-v{FORMAT_VERSIONS['digits']}-s0-tiny.tmp-killed"
    stale.mkdir()
    monkeypatch.undo()
    root = demo_root("digits", tmp_path, size="tiny")
    assert read_info(root)["splits"]["train"]["count"] > 0 and not stale.exists()


def test_concurrent_threads_generate_once(monkeypatch, tmp_path: Path) -> None:
    calls = _counting_generator(monkeypatch, delay=0.3)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(demo_root("digits", tmp_path, size="tiny")))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 4 and len(set(results)) == 1
    assert read_info(results[0])["splits"]["test"]["count"] > 0


def test_concurrent_processes_generate_once(tmp_path: Path) -> None:
    """Two processes (like two DDP ranks) asking at once: one generates, both get the set."""
    log = tmp_path / "calls.log"
    code = textwrap.dedent(
        f"""
        import os, time
        from datamodules import demo
        real = demo.GENERATORS["digits"]
        def generator(out, seed, size):
            with open({str(log)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(0.5)
            return real(out, seed, size)
        demo.GENERATORS["digits"] = generator
        print(demo.demo_root("digits", {str(tmp_path / "cache")!r}, size="tiny"))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1
    assert len(log.read_text().split()) == 1, "the set must be generated exactly once"


# --------------------------------------------------------------------------------------- espeak
@pytest.fixture(scope="module")
def tts():
    pytest.importorskip("espeakng_loader")
    from datamodules.espeak import Espeak

    return Espeak()


def test_espeak_output(tts) -> None:
    assert tts.sample_rate == 22050
    wave = tts.synthesize("go three one", voice="en-us+f2", rate=170, pitch=50, seed=0)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 0.5 < len(wave) / tts.sample_rate < 2.5
    assert 0.05 < np.abs(wave).max() <= 1.0


def synthesize_in_fresh_process(calls: list[tuple]) -> list[np.ndarray]:
    from datamodules.espeak import EspeakProcess

    with EspeakProcess() as tts:
        assert tts.sample_rate == 22050
        return [tts.synthesize(*call) for call in calls]


def test_espeak_same_call_sequence_in_fresh_processes_same_samples(tts) -> None:
    calls = [
        ("stop six", "en+f2", 150, 40, 1),  # a breathy variant: the seed drives its breath noise
        ("left two nine", "en-gb-x-rp+m3", 210, 70, 3),
        ("yes", "en-us", 130, 30, 4),
        ("stop six", "en+f2", 150, 40, 1),
    ]
    first = synthesize_in_fresh_process(calls)
    tts.synthesize("go", voice="en+f5", seed=9)  # this process's own library plays no part
    second = synthesize_in_fresh_process(calls)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(wave.dtype == np.float32 and wave.size > 0 for wave in first)
    (other_seed,) = synthesize_in_fresh_process([(*calls[0][:4], 2)])
    assert not np.array_equal(first[0], other_seed), "seed must matter"


@pytest.mark.parametrize("voice", ["xx-not-a-voice", "en+not-a-variant"])
def test_espeak_bad_voice(tts, voice: str) -> None:
    with pytest.raises(ValueError, match=voice.split("+")[-1]):
        tts.synthesize("go", voice=voice)
    assert tts.synthesize("go").size > 0, "a bad voice must not break the instance"


def test_espeak_process_errors_and_close(tts) -> None:
    from datamodules.espeak import EspeakProcess

    with EspeakProcess() as child:
        with pytest.raises(ValueError, match="not-a-variant"):
            child.synthesize("go", voice="en+not-a-variant")
        with pytest.raises(ValueError, match="xx-not-a-voice"):
            child.synthesize("go", voice="xx-not-a-voice")
        with pytest.raises(ValueError, match="empty"):
            child.synthesize("  ")
        assert child.synthesize("go").size > 0, "a bad voice must not break the child"
        proc = child._proc
    assert proc.poll() is not None, "closing must end the child process"
    with pytest.raises(RuntimeError, match="closed"):
        child.synthesize("go")
    crashed = EspeakProcess()
    crashed._proc.kill()
    crashed._proc.wait()
    with pytest.raises(RuntimeError, match="child process"):
        crashed.synthesize("go")
    crashed.close()


def test_espeak_child_imports_neither_torch_nor_the_package() -> None:
    pytest.importorskip("espeakng_loader")
    from datamodules import espeak

    probe = "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'datamodules'}))"
    code = espeak._CHILD_CODE.replace("module._serve()", probe)
    assert code != espeak._CHILD_CODE
    out = subprocess.run(
        [sys.executable, "-c", code, espeak.__file__], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_espeak_empty_text(tts) -> None:
    with pytest.raises(ValueError, match="empty"):
        tts.synthesize("   ")


def test_espeak_missing_package_says_how_to_install(monkeypatch) -> None:
    from datamodules import espeak

    monkeypatch.setitem(sys.modules, "espeakng_loader", None)
    for make in (espeak._loader, espeak.EspeakProcess):
        with pytest.raises(ImportError, match=r'pip install -e "\.\[demo\]"'):
            make()


def test_espeak_long_data_path_is_shortened(tmp_path: Path) -> None:
    from datamodules import espeak

    target = tmp_path / ("x" * 60) / ("y" * 60)
    target.mkdir(parents=True)
    short = espeak._short_data_path(str(target))
    assert len(short) < espeak.MAX_DATA_PATH and Path(short).resolve() == target.resolve()
    assert espeak._short_data_path(str(target)) == short  # stable, and safe to call again


# --------------------------------------------------------------------------------------- timing
@pytest.mark.slow
def test_default_sets_generate_within_a_minute(request, tmp_path: Path) -> None:
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("timing check of the full-size sets: run with -m slow")
    pytest.importorskip("espeakng_loader")
    start = time.perf_counter()
    for name in DEMO_SETS:
        demo_root(name, tmp_path)
    assert time.perf_counter() - start < 60


def test_shapes_hold_combinations_out_of_training(tiny) -> None:
    """No training object has a held-out (shape, colour); the evaluation splits do, and info.json says
    which, with the attribute vocabularies the scene annotations use."""
    root = tiny("shapes")
    info = read_info(root)
    held = {(c["shape"], c["colour"]) for c in info["heldout_combinations"]}
    assert held == {(c["shape"], c["colour"]) for c in demo.HELDOUT_COMBINATIONS} and len(held) == 5
    assert info["attributes"]["shape"] == list(demo.SHAPES) and info["heldout_from"] == "train"
    found = {}
    for split, entry in info["splits"].items():
        pairs = [(o["shape"], o["colour"]) for s in read_split(root, entry["shards"])
                 for o in json.loads(s["json"])["objects"]]
        assert all(o in info["attributes"]["colour"] for _, o in pairs)
        found[split] = held & set(pairs)
    assert not found["train"] and found["val"] | found["test"], found
