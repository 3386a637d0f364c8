"""The assistant: one trained multi-task checkpoint answering one input at a time.

    assistant = Assistant.from_checkpoint("runs/quickstart/stage2")
    assistant(image="digit.png")            # caption, class with probabilities
    assistant(audio="clip.wav")             # transcript, class (any rate, any length)
    assistant(text="a red circle")          # text class; images/speech generated from it
    assistant(label="3")                    # a class name or id -> a generated sample
    assistant(audio="say_three.wav", chain=True)   # transcript -> generated from the transcript

Every call returns a :class:`Response` of plain data: one :class:`Answer` per head that can answer
that input (heads the checkpoint lacks are simply absent), the files generation wrote, notes on
what was done to the input (resampled, chunked, truncated), and with ``chain=True`` the next
step, the text answer fed back in as text. Asking a head that is absent or that does not read the
input (``tasks=[...]``) is a :class:`InputError` naming the heads there are.

The heads answer through their own methods (``CaptioningHead.generate``, ``SpeechHead.transcribe``,
``ClassificationHead.logits``, ``GenerationHead.generate``), on the EMA weights the checkpoint
holds, under the precision ``multimodal.precision`` picks for the device (bf16 where it is native).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datamodules.decode import pad_1d
from multimodal.checkpoint import resolve_checkpoint
from multimodal.precision import autocast_dtype
from multimodal.writer import png_bytes, wav_bytes
from tasks.assistant.inputs import InputError, audio_chunks, audio_wave, image_tensor
from tasks.heads import CaptioningHead, ClassificationHead, GenerationHead, ReconstructionHead, SpeechHead
from tasks.module import MultiTaskModule

log = logging.getLogger(__name__)

INPUTS = ("image", "audio", "text", "label")
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                "sixteen seventeen eighteen nineteen twenty").split()
"""Spoken forms of numeric class names ("three" names the class "3"): transcripts spell numbers out."""


@dataclass
class Answer:
    """One head's answer. ``kind``: caption | transcript | class | image | audio."""

    task: str
    kind: str
    text: str | None = None
    label: int | None = None
    probs: dict[str, float] | None = None
    prompt: str | None = None
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class Response:
    """The answers to one input; ``steps``: the chained responses that followed it."""

    input: str
    value: str
    answers: list[Answer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    steps: list[Response] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def answer(self, task: str) -> Answer:
        for a in self.answers:
            if a.task == task:
                return a
        raise KeyError(f"no answer from {task!r} (answers: {[a.task for a in self.answers]})")

    def render(self, indent: str = "") -> str:
        """Readable lines, as the command line prints them."""
        lines = [f"{indent}{self.input}: {self.value}"]
        lines += [f"{indent}  note: {n}" for n in self.notes]
        for a in self.answers:
            head = f"{indent}  [{a.task}] {a.kind}"
            if a.kind in ("caption", "transcript"):
                lines.append(f"{head}: {a.text!r}")
            elif a.kind == "class":
                top = ", ".join(f"{k} {v:.2f}" for k, v in list((a.probs or {}).items())[:3])
                lines.append(f"{head}: {a.text} ({top})")
            else:
                lines.append(f"{head} of {a.prompt!r}: {', '.join(a.files)}")
            lines += [f"{indent}    note: {n}" for n in a.notes]
        for step in self.steps:
            lines.append(f"{indent}  then:")
            lines.append(step.render(indent + "    "))
        return "\n".join(lines)


def _slug(text: str, limit: int = 32) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "x"


class Assistant:
    """Args:
    model: a trained ``tasks.MultiTaskModule`` (``from_checkpoint`` builds one from a file or run folder).
    out_dir: where generated files go (created on first use).
    device: ``cpu`` or ``cuda``.
    samples: images or clips generated per request.
    steps / guidance: sampling steps and classifier-free guidance (default: each head's own).
    seed: the seed of every generation (same seed, same files).
    chunk_seconds: long clips are cut into windows of at most this length (at quiet frames) for the
        audio heads, whose trunk was trained on short clips; transcripts are joined, class
        probabilities averaged by length.
    max_audio_seconds: longer clips are refused.
    """

    def __init__(self, model: MultiTaskModule, out_dir: str | Path = "assistant_out", device: str = "cpu",
                 samples: int = 1, steps: int | None = None, guidance: float | None = None, seed: int = 0,
                 chunk_seconds: float = 8.0, max_audio_seconds: float = 900.0) -> None:
        if samples < 1 or (steps is not None and steps < 1) or (guidance is not None and guidance < 0):
            raise ValueError(f"assistant: samples and steps must be >= 1, guidance >= 0 (got {samples}, {steps}, {guidance})")
        self.model = model.to(device).eval()
        self.checkpoint: Path | None = None  # set by from_checkpoint
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        self.samples, self.steps, self.guidance, self.seed = samples, steps, guidance, seed
        self.chunk_seconds, self.max_audio_seconds = float(chunk_seconds), float(max_audio_seconds)
        self.lock = threading.Lock()  # one request at a time through the model (the web server's threads)
        heads = dict(model.heads.items())
        self.readers: dict[str, dict[str, nn.Module]] = {m: {} for m in ("image", "audio", "text")}
        self.generators: dict[str, GenerationHead] = {}
        for task, head in heads.items():
            if isinstance(head, GenerationHead):
                self.generators[task] = head
            elif isinstance(head, (CaptioningHead, SpeechHead, ClassificationHead)):
                self.readers[head.modality][task] = head
        if not any(self.readers.values()) and not self.generators:
            kinds = sorted({type(h).__name__ for h in heads.values()})
            what = "a tokenizer (stage-1) checkpoint" if all(isinstance(h, ReconstructionHead) for h in heads.values()) else "a checkpoint"
            raise InputError(f"this is {what} with no head that answers (heads: {sorted(heads)}, {kinds}): "
                             "give the assistant a stage-2 checkpoint with caption, transcribe, classify or generation heads")
        dtype = autocast_dtype(str(self.device))
        self._autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype is not None else nullcontext
        self.precision = "bf16" if dtype is not None else "fp32"

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs: Any) -> Assistant:
        """A checkpoint file or a run folder (its newest last.ckpt); kwargs as for the class."""
        ckpt = resolve_checkpoint(path)
        device = kwargs.get("device", "cpu")
        try:
            model = MultiTaskModule.load_from_checkpoint(ckpt, map_location=device, weights_only=True)
        except (KeyError, TypeError) as err:
            raise InputError(f"{ckpt} is not a tasks.MultiTaskModule checkpoint written by `lightning fit` ({err})") from err
        _bind_from_run(model, ckpt)
        assistant = cls(model, **kwargs)
        assistant.checkpoint = ckpt
        return assistant

    @property
    def tasks(self) -> dict[str, str]:
        """``{task: what it answers}`` for every head the assistant can use."""
        out = {t: f"{type(h).__name__}({h.modality})" for m in self.readers.values() for t, h in m.items()}
        out.update({t: f"GenerationHead({h.condition} -> {h.modality})" for t, h in self.generators.items()})
        return out

    # ------------------------------------------------------------------ the call
    def __call__(self, image: Any = None, audio: Any = None, text: str | None = None, label: str | int | None = None,
                 sample_rate: int | None = None, tasks: list[str] | None = None, chain: bool = False,
                 generate: bool = True) -> Response:
        """Exactly one of ``image``, ``audio`` (``sample_rate`` for arrays), ``text``, ``label``.

        tasks: only these heads (each must exist and read the input). chain: feed the first caption
        or transcript back in as text (e.g. speech -> what to draw). generate: False leaves generation
        out of text answers (understanding only)."""
        given = {k: v for k, v in (("image", image), ("audio", audio), ("text", text), ("label", label)) if v is not None}
        if len(given) != 1:
            raise InputError(f"give exactly one of image=, audio=, text=, label= (got {sorted(given) or 'none'})")
        kind, value = next(iter(given.items()))
        with self.lock, torch.no_grad():
            start = time.perf_counter()
            response = getattr(self, f"_{kind}")(value, sample_rate=sample_rate, tasks=tasks, generate=generate)
            if chain:
                said = next((a.text for a in response.answers if a.kind in ("caption", "transcript") and a.text), None)
                if said is None:
                    response.notes.append("chain: no caption or transcript to pass on")
                else:
                    step_start = time.perf_counter()
                    step = self._text(said, tasks=None, generate=True)
                    step.seconds = round(time.perf_counter() - step_start, 4)
                    response.steps.append(step)
            response.seconds = round(time.perf_counter() - start, 4)
        return response

    def _select(self, candidates: dict[str, nn.Module], tasks: list[str] | None, kind: str) -> dict[str, nn.Module]:
        every = set(self.tasks)
        if tasks is None:
            if not candidates:
                raise InputError(f"this checkpoint has no head that reads {kind} (heads: {self.tasks})")
            return candidates
        unknown = [t for t in tasks if t not in every]
        if unknown:
            raise InputError(f"no head {unknown} in this checkpoint (heads: {self.tasks})")
        wrong = [t for t in tasks if t not in candidates]
        if wrong:
            raise InputError(f"head(s) {wrong} do not read {kind} (heads that do: {sorted(candidates) or 'none'})")
        return {t: candidates[t] for t in tasks}

    # ------------------------------------------------------------------ images
    def _image(self, value: Any, tasks: list[str] | None, **_: Any) -> Response:
        heads = self._select(self.readers["image"], tasks, "images")
        codec = self.model.backbone.codec("image")
        x = image_tensor(value, codec.image_size, codec.in_channels)
        response = Response("image", str(value) if isinstance(value, (str, Path)) else type(value).__name__)
        batch = {"image": x[None].to(self.device), "__key__": ["input"]}
        for task, head in heads.items():
            start = time.perf_counter()
            with self._autocast():
                answer = self._understand(task, head, batch)
            answer.seconds = round(time.perf_counter() - start, 4)
            response.answers.append(answer)
        return response

    def _understand(self, task: str, head: nn.Module, batch: dict[str, Any]) -> Answer:
        if isinstance(head, CaptioningHead):
            return Answer(task, "caption", text=head.generate(self.model.backbone, batch)[0])
        if isinstance(head, SpeechHead):
            return Answer(task, "transcript", text=head.transcribe(self.model.backbone, batch)[0])
        probs = head.logits(self.model.backbone, batch).float().softmax(-1)[0].cpu()
        return self._class_answer(task, head, probs)

    def _class_answer(self, task: str, head: ClassificationHead, probs: torch.Tensor) -> Answer:
        names = head.class_names.names
        order = probs.argsort(descending=True).tolist()
        best = order[0]
        return Answer(task, "class", text=names[best], label=best,
                      probs={names[i]: round(float(probs[i]), 4) for i in order})

    # ------------------------------------------------------------------ audio
    def _audio(self, value: Any, sample_rate: int | None, tasks: list[str] | None, **_: Any) -> Response:
        heads = self._select(self.readers["audio"], tasks, "audio")
        rate = self.model.backbone.codec("audio").sample_rate
        wave, source_rate = audio_wave(value, rate, sample_rate)
        seconds = len(wave) / rate
        if seconds > self.max_audio_seconds:
            raise InputError(f"the clip is {seconds:.0f} s long; the assistant takes at most {self.max_audio_seconds:.0f} s")
        response = Response("audio", str(value) if isinstance(value, (str, Path)) else f"array at {source_rate} Hz")
        if source_rate != rate:
            response.notes.append(f"resampled {source_rate} Hz -> {rate} Hz")
        if float(np.abs(wave).max()) < 1e-4:
            response.notes.append("the clip is silent")
        spans = audio_chunks(wave, rate, self.chunk_seconds)
        if len(spans) > 1:
            response.notes.append(f"{seconds:.1f} s clip cut into {len(spans)} windows of <= {self.chunk_seconds:g} s")
        for task, head in heads.items():
            start = time.perf_counter()
            texts, probs, weights = [], [], []
            for first in range(0, len(spans), 16):  # windows in batches of 16
                group = spans[first:first + 16]
                audio, lengths = pad_1d([torch.from_numpy(wave[a:b]) for a, b in group], 0.0)
                batch = {"audio": audio.to(self.device), "audio_lengths": lengths.to(self.device),
                         "__key__": [f"w{i}" for i in range(len(group))]}
                with self._autocast():
                    if isinstance(head, SpeechHead):
                        texts += head.transcribe(self.model.backbone, batch)
                    elif isinstance(head, CaptioningHead):
                        texts += head.generate(self.model.backbone, batch)
                    else:
                        probs.append(head.logits(self.model.backbone, batch).float().softmax(-1).cpu())
                        weights.append(lengths.float())
            if probs:
                w = torch.cat(weights)
                answer = self._class_answer(task, head, (torch.cat(probs) * (w / w.sum())[:, None]).sum(0))
            else:
                kind = "transcript" if isinstance(head, SpeechHead) else "caption"
                answer = Answer(task, kind, text=" ".join(t for t in texts if t).strip())
                if not answer.text:
                    answer.notes.append("nothing recognised")
            answer.seconds = round(time.perf_counter() - start, 4)
            response.answers.append(answer)
        return response

    # ------------------------------------------------------------------ text and classes
    def _text(self, value: str, tasks: list[str] | None, generate: bool = True, **_: Any) -> Response:
        if not isinstance(value, str):
            raise InputError(f"text must be a string, not {type(value).__name__}")
        text = " ".join(value.split())
        if not text:
            raise InputError("the text is empty: type a sentence (a caption to draw, a command, a class name)")
        candidates: dict[str, nn.Module] = dict(self.readers["text"])
        if generate:
            candidates.update(self.generators)
        heads = self._select(candidates, tasks, "text")
        response = Response("text", text)
        for task, head in heads.items():
            start = time.perf_counter()
            if isinstance(head, GenerationHead):
                answer = self._generate_from_text(task, head, text)
            else:
                answer = self._read_text(task, head, text)
            if answer is None:
                continue
            answer.seconds = round(time.perf_counter() - start, 4)
            response.answers.append(answer)
        if not response.answers:
            response.notes.append("no head could use this text (heads: " + ", ".join(f"{t}: {k}" for t, k in self.tasks.items()) + ")")
        return response

    def _read_text(self, task: str, head: ClassificationHead, text: str) -> Answer:
        vocab = head.reader.vocab
        if vocab is None or not vocab.ready:
            raise InputError(f"head {task!r} reads text but its checkpoint holds no tokenizer (saved before heads kept "
                             "theirs): run the assistant from the run folder, whose config names it")
        ids, lengths, truncated = vocab.encode([text], self.device)
        with self._autocast():
            probs = head.logits(self.model.backbone, {"text_ids": ids, "text_lengths": lengths}).float().softmax(-1)[0].cpu()
        answer = self._class_answer(task, head, probs)
        if truncated:
            answer.notes.append(f"text truncated to {vocab.max_length - 2} tokens")
        return answer

    def _generate_from_text(self, task: str, head: GenerationHead, text: str) -> Answer | None:
        if head.condition == "text":
            vocab = head.text_vocab
            if vocab is None or not vocab.ready:
                raise InputError(f"head {task!r} draws from text but its checkpoint holds no tokenizer (saved before "
                                 "heads kept theirs): run the assistant from the run folder, whose config names it")
            ids, lengths, truncated = vocab.encode([text] * self.samples, self.device)
            answer = self._generate(task, head, text, text_ids=ids, text_lengths=lengths)
            if truncated:
                answer.notes.append(f"caption truncated to {vocab.max_length - 2} tokens")
            return answer
        if head.condition == "label":
            found = named_classes(text, head.class_names.names)
            if not found:
                return None  # the text names no class of this head: nothing to draw
            answers = [self.generate_class(task, head, i, prompt=text) for i in found]
            answer = answers[0]
            answer.files = [f for a in answers for f in a.files]
            names = [head.class_names.names[i] for i in found]
            answer.notes.append(f"{text!r} names class{'es' if len(names) > 1 else ''} "
                                + ", ".join(repr(n) for n in names) + f" ({self.samples} sample(s) each, in that order)")
            return answer
        return None

    def _label(self, value: str | int, tasks: list[str] | None, **_: Any) -> Response:
        heads = self._select({t: h for t, h in self.generators.items() if h.condition == "label"}, tasks, "a class")
        response = Response("class", str(value))
        for task, head in heads.items():
            start = time.perf_counter()
            try:
                index = head.class_names.index(value)
            except ValueError as err:
                raise InputError(f"head {task!r}: {err}") from None
            answer = self.generate_class(task, head, index)
            answer.seconds = round(time.perf_counter() - start, 4)
            response.answers.append(answer)
        return response

    # ------------------------------------------------------------------ generation
    def generate_class(self, task: str, head: GenerationHead, index: int, prompt: str | None = None) -> Answer:
        y = torch.full((self.samples,), index, dtype=torch.long, device=self.device)
        name = head.class_names.names[index]
        return self._generate(task, head, prompt or name, tag=f"class-{name}" if prompt else None, y=y)

    def _generate(self, task: str, head: GenerationHead, prompt: str, tag: str | None = None, **cond: Any) -> Answer:
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        with self._autocast():
            samples, _ = head.generate(self.model.backbone, generator=generator, steps=self.steps or head.sample_steps,
                                       guidance=self.guidance, num=self.samples, **cond)
        samples = samples.float().cpu()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{task}-{_slug(prompt)}{'-' + _slug(tag) if tag else ''}-s{self.seed}"
        files = []
        for i, sample in enumerate(samples):
            if head.modality == "image":
                path, data = self.out_dir / f"{stem}-{i}.png", png_bytes(sample)
            else:
                rate = self.model.backbone.codec("audio").sample_rate
                path, data = self.out_dir / f"{stem}-{i}.wav", wav_bytes(sample, rate, peak=0.9)
            tmp = path.with_name(path.name + ".partial")
            tmp.write_bytes(data)
            tmp.replace(path)
            files.append(str(path))
        return Answer(task, head.modality, prompt=prompt, files=files)


def named_classes(text: str, names: list[str]) -> list[int]:
    """The classes ``text`` names as whole words (case-insensitive), in the order they are first
    named; numeric names also by their English word ("three" -> "3")."""
    words = re.findall(r"[\w']+", text.casefold())
    first: dict[int, int] = {}
    for i, name in enumerate(names):
        forms = {name.casefold()}
        if name.isdigit() and int(name) < len(NUMBER_WORDS):
            forms.add(NUMBER_WORDS[int(name)])
        for f in forms:
            n = len(f.split())
            hits = [k for k in range(len(words)) if " ".join(words[k:k + n]) == f]
            if hits:
                first[i] = min(first.get(i, hits[0]), hits[0])
    return sorted(first, key=first.get)


def _bind_from_run(model: MultiTaskModule, ckpt: Path) -> None:
    """Checkpoints saved before heads kept their class names and text tokenizers: bind them from the
    run's data config (``config.yaml`` beside the checkpoints) where it is still there."""
    def unbound(head: nn.Module) -> bool:
        names = getattr(head, "class_names", None)
        vocabs = [getattr(head, "vocab", None), getattr(head, "text_vocab", None),
                  getattr(getattr(head, "reader", None), "vocab", None)]
        return (names is not None and not names.bound) or any(v is not None and not v.ready for v in vocabs)

    todo = [t for t, h in model.heads.items() if unbound(h)]
    if not todo:
        return
    from multimodal.checkpoint import run_datamodule

    try:
        data = run_datamodule(ckpt)
        for task in todo:
            part = data.tasks[task] if isinstance(getattr(data, "tasks", None), dict) else data
            if getattr(part, "tokenizer", None) is None:
                part.setup("predict")  # WebDataModule: loads the text tokenizer
            model.heads[task].bind_data(part, task)
    except Exception as err:  # an old run whose data is gone: classes stay numbered
        log.warning("heads %s: no class names or tokenizer in the checkpoint, and the run's data could not "
                    "supply them (%s)", todo, err)
