"""The learned vocoder against Griffin-Lim, side by side, on real clips resynthesised from their own codes.

    python scripts/vocoder_eval.py --vocoder runs/vocoder --judge runs/generation_audio \\
        --transcriber runs/generation_speech --threads 1 --out runs/vocoder_eval

Every clip of the split (default ``test``) of ``--demo`` (default ``spoken``) or ``--root`` (a shard folder
with audio, transcripts and labels) is encoded by the
vocoder run's frozen tokenizer, snapped to its codes, decoded to log-mel, and turned back into a
waveform by the learned vocoder and by Griffin-Lim (the codec's 32 iterations). Measured for the
original clips and for both resyntheses:

* ``judge_acc``: the spoken-command judge of a generation run (``--judge``: its ``GenerationHead``'s
  judge, trained on real clips) on each clip's log-mel;
* ``wer``: a transcriber against the transcripts (``--transcriber``): the CTC transcriber of a text ->
  speech run (``GenerationHead(transcriber=True)``, on log-mel) or a speech recognition run
  (``configs/transcribe_spoken.yaml``'s ``SpeechHead``, which re-encodes the clip with its own tokenizer);
* ``si_snr`` / ``si_sdr`` (torchmetrics) and ``mel_l1`` (log-mel of the result vs the original);
* ``rtf``: seconds of compute per second of audio for log-mel -> waveform, on ``--threads`` threads
  (1 = one core), float32, after one warm-up batch.

Writes ``vocoder_eval.json`` and ``vocoder_eval.md`` (the table) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torchmetrics.audio import ScaleInvariantSignalDistortionRatio, ScaleInvariantSignalNoiseRatio
from torchmetrics.text import WordErrorRate

from datamodules import WebDataModule
from multimodal.checkpoint import resolve_checkpoint
from tasks import GenerationHead, MultiTaskModule, SpeechHead, VocoderHead

METHODS = ("original", "vocoder", "griffin_lim")


def _load(path: str) -> MultiTaskModule:
    return MultiTaskModule.load_from_checkpoint(resolve_checkpoint(path), map_location="cpu", weights_only=True).eval()


def _head(model: MultiTaskModule, kind: type, need: str | None = None):
    for head in model.heads.values():
        if isinstance(head, kind) and (need is None or getattr(head, need, None) is not None):
            return head
    raise SystemExit(f"no {kind.__name__}{' with a ' + need if need else ''} in that run (heads: {sorted(model.heads)})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocoder", required=True, help="a configs/vocoder.yaml run (folder or checkpoint)")
    p.add_argument("--judge", required=True, help="a generation run whose head has the command judge")
    p.add_argument("--transcriber", required=True,
                   help="a text -> speech run (its head has the transcriber) or a transcribe_spoken run; its data is used")
    p.add_argument("--demo", default="spoken", help="a demo set (default spoken)")
    p.add_argument("--root", default=None, help="a shard folder instead of --demo")
    p.add_argument("--split", default="test")
    p.add_argument("--max-clips", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    vocoder_model, judge_model, transcriber_model = _load(args.vocoder), _load(args.judge), _load(args.transcriber)
    voc = _head(vocoder_model, VocoderHead)
    judge = _head(judge_model, GenerationHead, "judge")
    speech = [h for h in transcriber_model.heads.values() if isinstance(h, SpeechHead)]
    asr = speech[0] if speech else _head(transcriber_model, GenerationHead, "transcriber")

    def transcribe(batch: dict) -> list[str]:
        if isinstance(asr, SpeechHead):
            return asr.transcribe(transcriber_model.backbone, batch)
        return asr.transcriber.transcribe(asr.judge_input(transcriber_model.backbone, batch), asr.text_vocab)

    backbone = vocoder_model.backbone
    source = {"root": args.root} if args.root else {"demo": args.demo}
    data = WebDataModule(**source, keys=["audio", "text", "label"], batch_size=16, test_split=args.split)
    data.prepare_data()
    data.setup("test")
    loader = data.test_dataloader()

    scores = {m: {"judge": [], "wer": WordErrorRate(), "si_snr": ScaleInvariantSignalNoiseRatio(),
                  "si_sdr": ScaleInvariantSignalDistortionRatio(), "mel_l1": []} for m in METHODS}
    seconds = {"vocoder": 0.0, "griffin_lim": 0.0}
    audio_seconds, clips, warm = 0.0, 0, False
    rate = backbone.codec("audio").sample_rate
    frontend = backbone.codec("audio").frontend
    with torch.no_grad():
        for batch in loader:
            if clips >= args.max_clips:
                break
            batch = {k: v[: args.max_clips - clips] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()}
            mel, target = voc.inputs(backbone, batch)
            lengths = batch["audio_lengths"]
            waves = {"original": target}
            for method in ("vocoder", "griffin_lim"):
                start = time.perf_counter()
                waves[method] = backbone.to_audio(mel, method=method) if method == "griffin_lim" else voc.vocoder(mel)
                if warm:
                    seconds[method] += time.perf_counter() - start
            if warm:
                audio_seconds += float(lengths.sum()) / rate
            warm = True
            texts = [" ".join(t.split()) for t in batch["text"]]
            for method, wave in waves.items():
                wave = wave[:, : target.shape[-1]] * (torch.arange(target.shape[-1])[None] < lengths[:, None])
                b = {"audio": wave, "audio_lengths": lengths}
                s = scores[method]
                s["judge"] += (judge.judge.classify(judge.judge_input(judge_model.backbone, b)).argmax(-1) == batch["label"]).tolist()
                s["wer"].update(transcribe(b), [asr.reference(t) if isinstance(asr, SpeechHead) else t for t in texts])
                for i, n in enumerate(lengths.tolist()):
                    s["si_snr"].update(wave[i, :n], target[i, :n])
                    s["si_sdr"].update(wave[i, :n], target[i, :n])
                    s["mel_l1"].append(float((frontend(wave[i : i + 1, :n]) - frontend(target[i : i + 1, :n])).abs().mean()))
            clips += len(lengths)

    result = {"clips": clips, "split": args.split, "threads": args.threads}
    for method in METHODS:
        s = scores[method]
        row = {"judge_acc": sum(s["judge"]) / len(s["judge"]), "wer": float(s["wer"].compute())}
        if method != "original":
            row.update(si_snr=float(s["si_snr"].compute()), si_sdr=float(s["si_sdr"].compute()),
                       mel_l1=sum(s["mel_l1"]) / len(s["mel_l1"]), rtf=seconds[method] / max(audio_seconds, 1e-9))
        result[method] = row
    lines = [f"| clips ({args.split}, {clips}) | judge acc | transcriber WER | SI-SNR (dB) | SI-SDR (dB) | mel L1 | RTF ({args.threads} thread) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for method in METHODS:
        r = result[method]
        extra = (f"{r['si_snr']:.2f} | {r['si_sdr']:.2f} | {r['mel_l1']:.3f} | {r['rtf']:.4f}" if method != "original"
                 else "- | - | - | -")
        lines.append(f"| {method.replace('_', '-')} | {r['judge_acc']:.3f} | {r['wer']:.3f} | {extra} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocoder_eval.json").write_text(json.dumps(result, indent=2))
    (args.out / "vocoder_eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
