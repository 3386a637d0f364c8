"""The assistant (tasks.assistant): one tiny multi-task checkpoint answering every input kind, chains,
bad inputs, the command line, and the web page driven over HTTP on a free localhost port."""

from __future__ import annotations

import copy
import json
import shutil
import socket
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from datamodules.shards import encode_png, encode_wav
from multimodal.checkpoint import resolve_checkpoint
from multimodal.cli import main
from tasks.assistant import Assistant, InputError
from tests.tiny import tiny_config

RATE = 16000


def _add_heads(cfg: dict[str, Any], shard_dir: Path) -> dict[str, Any]:
    """The quickstart recipe (tiny) plus a head for every other input kind and a chain to speech."""
    cfg = copy.deepcopy(cfg)
    model = cfg["model"]["init_args"]
    model["backbone"]["init_args"]["trunk"]["init_args"].update(sequence_output=True, text_vocab_size=64)
    heads, tasks = model["heads"], cfg["data"]["init_args"]["tasks"]
    diffusion = heads["generate"]["init_args"]["diffusion"]
    heads["shape_text"] = {"class_path": "tasks.ClassificationHead",
                           "init_args": {"modality": "text", "num_classes": 3, "trunk_hidden": 64}}
    heads["spoken_class"] = {"class_path": "tasks.ClassificationHead",
                             "init_args": {"modality": "audio", "num_classes": 3, "trunk_hidden": 64}}
    for name, modality in (("draw", "image"), ("speak", "audio")):
        heads[name] = {"class_path": "tasks.GenerationHead",
                       "init_args": {"modality": modality, "condition": "text", "num_classes": 3, "sample_steps": 2,
                                     "eval_samples": 4, "audio_tokens": 5, "diffusion": diffusion}}
    data = {"root": str(shard_dir), "batch_size": 4, "samples_per_epoch": 8, "eval_batch_size": None, "vocab_size": 40}
    for name, keys in (("shape_text", ["text", "label"]), ("spoken_class", ["audio", "label"]),
                       ("draw", ["image", "text", "label"]), ("speak", ["audio", "text", "label"])):
        tasks[name] = {"class_path": "datamodules.WebDataModule", "init_args": {**data, "keys": keys}}
    model["loss_weights"] = {}
    return cfg


@pytest.fixture(scope="module")
def run(shard_dir: Path, tokenizer_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("assistant") / "run"
    cfg = _add_heads(tiny_config("quickstart.yaml", shard_dir, root, tokenizer_run), shard_dir)
    path = root.parent / "assistant.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path)])
    return root


@pytest.fixture(scope="module")
def assistant(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Assistant:
    # the checkpoint alone, away from its run folder: names and tokenizers come from inside it
    lone = tmp_path_factory.mktemp("lone") / "model.ckpt"
    shutil.copy(resolve_checkpoint(run), lone)
    return Assistant.from_checkpoint(lone, out_dir=tmp_path_factory.mktemp("out"), samples=2, steps=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    out = {}
    out["png"] = d / "digit.png"
    out["png"].write_bytes(encode_png(rng.integers(0, 256, (40, 28, 3), dtype=np.uint8)))
    out["wav"] = d / "clip.wav"
    out["wav"].write_bytes(encode_wav(0.3 * np.sin(np.arange(6000) * 0.1), RATE))
    rgba = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: white after compositing
    out["rgba"] = d / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(out["rgba"])
    out["png16"] = d / "deep.png"
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(out["png16"])
    out["stereo8k"] = d / "stereo8k.wav"
    stereo = np.stack([np.sin(np.arange(4000) * 0.2), np.zeros(4000)], axis=1) * 0.3
    out["stereo8k"].write_bytes(encode_wav(stereo, 8000))
    out["long"] = d / "long.wav"
    out["long"].write_bytes(encode_wav(0.2 * rng.standard_normal(RATE * 30) * (np.arange(RATE * 30) % RATE < RATE // 2), RATE))
    out["truncated"] = d / "broken.png"
    out["truncated"].write_bytes(out["png"].read_bytes()[:60])
    out["badwav"] = d / "broken.wav"
    out["badwav"].write_bytes(out["wav"].read_bytes()[:100])
    out["notes"] = d / "notes.png"
    out["notes"].write_text("not an image at all")
    return out


def _plain(response: dict[str, Any]) -> dict[str, Any]:
    """A response dict without its timings (which differ run to run)."""
    response = copy.deepcopy(response)
    response.pop("seconds", None)
    for a in response["answers"]:
        a.pop("seconds", None)
        a["files"] = [Path(f).name for f in a["files"]]
    response["steps"] = [_plain(s) for s in response["steps"]]
    return response


# ---------------------------------------------------------------------------------------- the API
def test_every_input_kind_is_answered_by_the_heads_that_read_it(assistant: Assistant, files: dict[str, Path]) -> None:
    image = assistant(image=files["png"])
    assert {a.task: a.kind for a in image.answers} == {"classify": "class", "caption": "caption"}
    cls = image.answer("classify")
    assert list(cls.probs)[0] == cls.text and set(cls.probs) == {"c0", "c1", "c2"}  # names from the data
    assert abs(sum(cls.probs.values()) - 1) < 1e-3 and cls.label == ["c0", "c1", "c2"].index(cls.text)
    audio = assistant(audio=files["wav"])
    assert {a.task: a.kind for a in audio.answers} == {"transcribe": "transcript", "spoken_class": "class"}
    text = assistant(text="a red circle")
    kinds = {a.task: a.kind for a in text.answers}
    assert kinds == {"shape_text": "class", "draw": "image", "speak": "audio"}  # no class named: 'generate' absent
    draw = text.answer("draw")
    size = assistant.model.backbone.codec("image").image_size
    assert len(draw.files) == 2 and all(Image.open(f).size == size[::-1] for f in draw.files)
    assert all(Path(f).read_bytes()[:4] == b"RIFF" for f in text.answer("speak").files)
    label = assistant(label="c1")
    assert [a.task for a in label.answers] == ["generate"] and label.answer("generate").prompt == "c1"
    assert assistant(label=1).answer("generate").files == label.answer("generate").files
    named = assistant(text="draw a C1 please", tasks=["generate"])
    assert named.answer("generate").notes == ["'draw a C1 please' names class 'c1' (2 sample(s) each, in that order)"]
    several = assistant(text="c2 then c0 and c2", tasks=["generate"]).answer("generate")
    assert "names classes 'c2', 'c0'" in several.notes[0] and len(several.files) == 4
    alone = assistant(label="c0").answer("generate").files
    assert [Path(f).read_bytes() for f in several.files[2:]] == [Path(f).read_bytes() for f in alone]
    # the same request, the same answers and files
    again = assistant(text="a red circle")
    assert _plain(again.to_dict()) == _plain(text.to_dict())
    assert [Path(f).read_bytes() for f in again.answer("draw").files] == [Path(f).read_bytes() for f in draw.files]


def test_inputs_in_memory_equal_the_files(assistant: Assistant, files: dict[str, Path]) -> None:
    from_file = assistant(image=files["png"]).to_dict()
    for value in (Image.open(files["png"]), np.asarray(Image.open(files["png"])), files["png"].read_bytes()):
        assert _plain(assistant(image=value).to_dict())["answers"] == _plain(from_file)["answers"]
    import soundfile as sf

    wave, rate = sf.read(files["wav"], dtype="float32")
    assert _plain(assistant(audio=wave, sample_rate=rate).to_dict())["answers"] == \
        _plain(assistant(audio=files["wav"]).to_dict())["answers"]


def test_chains_keep_every_step(assistant: Assistant, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # a 2-step model hears and sees little: its words are fixed here, the chaining is what is tested
    said = lambda backbone, batch, *a: ["say  a RED circle"] * len(batch["__key__"])  # noqa: E731
    monkeypatch.setattr(assistant.readers["audio"]["transcribe"], "transcribe", said)
    monkeypatch.setattr(assistant.readers["image"]["caption"], "generate", said)
    spoken = assistant(audio=files["wav"], chain=True, tasks=["transcribe"])
    assert spoken.answer("transcribe").text == "say  a RED circle"
    step = spoken.steps[0]
    assert step.input == "text" and step.value == "say a RED circle"
    assert {a.task: a.kind for a in step.answers} == {"shape_text": "class", "draw": "image", "speak": "audio"}
    assert _plain(step.to_dict())["answers"] == _plain(assistant(text="say a RED circle").to_dict())["answers"]
    seen = assistant(image=files["png"], chain=True)  # image -> caption -> speech (and a drawing)
    assert seen.steps[0].answer("speak").files and "then:" in seen.render()
    monkeypatch.setattr(assistant.readers["audio"]["transcribe"], "transcribe", lambda b, batch: [""])
    silent = assistant(audio=files["wav"], chain=True, tasks=["transcribe"])
    assert silent.notes == ["chain: no caption or transcript to pass on"] and not silent.steps


def test_bad_inputs_get_clear_answers(assistant: Assistant, files: dict[str, Path]) -> None:
    transparent = assistant(image=files["rgba"])
    assert transparent.answers  # composited over white, answered
    assert assistant(image=files["png16"]).answers  # 16-bit rescaled, answered
    odd = assistant(audio=files["stereo8k"])
    assert "resampled 8000 Hz -> 16000 Hz" in odd.notes and odd.answers
    long = assistant(audio=files["long"])
    assert any("cut into" in n for n in long.notes) and long.answers
    cases = [
        (dict(image=files["truncated"]), "damaged image"),
        (dict(image=files["notes"]), "not an image"),
        (dict(image=files["png"].with_name("missing.png")), "not found"),
        (dict(audio=files["badwav"]), "truncated audio"),
        (dict(audio=np.zeros(100)), "needs its sample rate"),
        (dict(text="   "), "the text is empty"),
        (dict(label="c7"), "unknown class 'c7'"),
        (dict(label=5), r"class id 5 is outside \[0, 3\)"),
        (dict(image=files["png"], tasks=["nope"]), r"no head \['nope'\]"),
        (dict(audio=files["wav"], tasks=["caption"]), r"do not read audio"),
        (dict(image=files["png"], text="x"), "exactly one of"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            assistant(**kwargs)
    capped = Assistant(assistant.model, out_dir=assistant.out_dir, max_audio_seconds=10)
    with pytest.raises(InputError, match="30 s long; the assistant takes at most 10 s"):
        capped(audio=files["long"])


def test_a_tokenizer_checkpoint_is_refused(tokenizer_run: Path) -> None:
    with pytest.raises(InputError, match="tokenizer .*checkpoint with no head that answers"):
        Assistant.from_checkpoint(tokenizer_run)


# ---------------------------------------------------------------------------------------- the command line
def test_command_line(run: Path, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["assist", "--ckpt", str(run), str(files["png"]), str(files["wav"]), "a red circle", "--class", "c2",
            "--json", "--out", str(tmp_path), "--steps", "2"]
    main(argv)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["input"] for r in lines] == ["image", "audio", "text", "class"]
    assert Path(lines[3]["answers"][0]["files"][0]).is_file()
    with pytest.raises(SystemExit) as exit_:
        main(["assist", "--ckpt", str(run), str(files["notes"]), "a red circle", "--out", str(tmp_path)])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "is not an image PIL can read" in out and "[shape_text] class" in out  # the next input still answered


# ---------------------------------------------------------------------------------------- the web page
class _Answers(HTMLParser):
    """What the page shows: {task: {"kind", "text", "probs", "files"}} from its data-* elements."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, dict[str, Any]] = {}
        self.error: str | None = None
        self._task: str | None = None
        self._field: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "data-task" in a and self._task is None:
            self._task = a["data-task"]
            self.answers.setdefault(self._task, {"kind": a["data-kind"], "text": None, "probs": {}, "files": []})
        field = a.get("data-field")
        if field == "prob":
            self.answers[self._task]["probs"][a["data-name"]] = float(a["data-value"])
        elif field == "file":
            self.answers[self._task]["files"].append(a["src"])
        elif field == "text" or a.get("data-kind") == "error":
            self._field = field or "error"

    def handle_data(self, data: str) -> None:
        if self._field == "text":
            self.answers[self._task]["text"] = data
        elif self._field == "error":
            self.error = data

    def handle_endtag(self, tag: str) -> None:
        self._field = None  # a shown value is the text of one element

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)


def _shown(page: str) -> _Answers:
    parser = _Answers()
    # answers are siblings: parse each one on its own so nested tags cannot confuse the task
    for chunk in page.split('<div class="answer" ')[1:]:
        parser._task = None
        parser.feed('<div class="answer" ' + chunk.split('<div class="answer" ')[0])
    if 'data-kind="error"' in page:
        parser._task = None
        parser.feed(page[page.index('<div class="error"'):])
    return parser


@pytest.fixture(scope="module")
def server(assistant: Assistant):
    import uvicorn

    from tasks.assistant.web import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(assistant, max_upload_mb=0.5), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_web_page_shows_the_api_answers(server: str, assistant: Assistant, files: dict[str, Path]) -> None:
    import httpx

    with httpx.Client(base_url=server, timeout=60) as http:
        home = http.get("/")
        assert home.status_code == 200 and 'type="file"' in home.text and "caption" in home.text
        assert http.get("/health").json()["tasks"]["caption"] == "CaptioningHead(image)"
        for kind, path in (("image", files["png"]), ("audio", files["wav"])):
            page = http.post("/", files={"file": (path.name, path.read_bytes())})
            assert page.status_code == 200
            shown = _shown(page.text).answers
            api = assistant(**{kind: path})
            assert set(shown) == {a.task for a in api.answers}
            for a in api.answers:
                assert shown[a.task]["kind"] == a.kind
                if a.kind == "class":
                    assert shown[a.task]["text"] == a.text and shown[a.task]["probs"] == a.probs
                else:
                    assert (shown[a.task]["text"] or "") == a.text
            as_json = http.post("/api/answer", files={"file": (path.name, path.read_bytes())}).json()
            api_plain = _plain(api.to_dict())
            api_plain["value"] = path.name
            assert _plain(as_json) == api_plain
        page = http.post("/", data={"text": "a red circle"})
        shown = _shown(page.text).answers
        api = assistant(text="a red circle")
        assert shown["shape_text"]["text"] == api.answer("shape_text").text
        for task in ("draw", "speak"):
            urls = shown[task]["files"]
            assert [u.rsplit("/", 1)[1] for u in urls] == [Path(f).name for f in api.answer(task).files]
            assert http.get(urls[0]).content == Path(api.answer(task).files[0]).read_bytes()
        assert http.post("/", data={"label": "c1"}).status_code == 200
        # bad requests: a message on the page, and the server goes on serving
        for data, upload, status, message in (
            ({}, ("notes.png", files["notes"].read_bytes()), 400, "neither an image nor an audio file"),
            ({}, ("broken.png", files["truncated"].read_bytes()), 400, "damaged image"),
            ({}, ("broken.wav", files["badwav"].read_bytes()), 400, "truncated audio"),
            ({"text": " "}, None, 400, "the text is empty"),
            ({"label": "c9"}, None, 400, "unknown class"),
            ({}, ("big.wav", b"RIFF" + bytes(700_000)), 413, "limit is 0.5 MB"),
        ):
            page = http.post("/", data=data, files={"file": upload} if upload else None)
            assert page.status_code == status, (message, page.text[-400:])
            assert message in (_shown(page.text).error or ""), page.text[-400:]
        assert http.get("/files/../../etc/passwd").status_code == 404
        assert http.post("/", files={"file": (files["png"].name, files["png"].read_bytes())}).status_code == 200
