"""How a ``MultiTaskModule``'s weights come in and go out of checkpoints.

* ``init_from``: weights only, from any stage's checkpoint; backbone shape mismatches are an error
  naming the setting, head mismatches (a new class list) are reported and skipped;
* a frozen tokenizer that came from ``backbone.tokenizer_ckpt`` is referenced, not stored: saving drops
  its weights from ``state_dict`` (and EMA's ``current_model_state``) and writes the file it came from
  and its fingerprints (``tokenizer_reference``); every load puts the weights back after checking
  them (``multimodal.checkpoint.tokenizer_state``);
* a learned vocoder from ``backbone.vocoder_ckpt`` is frozen and always read from that file: saving
  drops its weights (writing ``vocoder_reference``, the file), loading puts the model's own back, so
  any stage-2 checkpoint can be tested or sampled with or without a vocoder;
* loading a checkpoint whose shapes do not fit the model names the setting before any weight is copied.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor

from multimodal.checkpoint import read_checkpoint, tokenizer_fingerprints, tokenizer_state

log = logging.getLogger(__name__)

STATE_KEYS = ("state_dict", "current_model_state")  # the model's weights and, under EMA, its raw weights
TOKENIZER_PREFIXES = ("backbone.codecs.", "backbone.quantizer.")
VOCODER_PREFIX = "backbone.vocoder."


class CheckpointWeights:
    """A mixin for ``MultiTaskModule`` (a LightningModule with ``backbone`` and ``heads``)."""

    def load_weights(self, path: str) -> None:
        """Initialise from a checkpoint's ``state_dict`` (``torch.load(weights_only=True)``)."""
        checkpoint = read_checkpoint(path)
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict):
            raise ValueError(f"model.init_from={path!r} has no state_dict: not a Lightning checkpoint")
        self.fill_tokenizer(checkpoint, ("state_dict",))
        own = self.state_dict()
        mismatched = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                      if k in own and isinstance(v, Tensor) and isinstance(own[k], Tensor) and v.shape != own[k].shape}
        backbone_bad = {k: v for k, v in mismatched.items() if not k.startswith("heads.")}
        if backbone_bad:
            lines = "\n  ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in list(backbone_bad.items())[:10])
            raise ValueError(
                f"model.init_from={path!r} does not match model.backbone (codebook size/dimension, codec or trunk "
                f"settings differ from the checkpoint's):\n  {lines}"
            )
        loadable = {k: v for k, v in state.items() if k in own and k not in mismatched}
        if not loadable:
            raise ValueError(f"model.init_from={path!r} shares no weights with this model (another model family?)")
        self.load_state_dict(loadable, strict=False)
        skipped = sorted(mismatched)
        fresh = sorted(k for k in own if k not in loadable)
        self.init_report = {"loaded": len(loadable), "skipped_shape": skipped, "not_in_checkpoint": fresh}
        log.info("init_from %s: loaded %d tensors; skipped (shape) %s; new %d", path, len(loadable), skipped, len(fresh))

    # ------------------------------------------------------------------ checkpoints
    def _tokenizer_reference(self) -> dict[str, Any] | None:
        """What names the frozen tokenizer instead of storing it: its file and fingerprints (None when the
        codecs or the quantizer train, or did not come from ``backbone.tokenizer_ckpt``)."""
        source = getattr(self.backbone, "tokenizer_source", None)
        parts = (self.backbone.codecs, self.backbone.quantizer)
        if source is None or any(p.requires_grad for part in parts for p in part.parameters()):
            return None
        return {"path": source, "fingerprints": tokenizer_fingerprints(self.backbone)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen tokenizer out (``state_dict`` and EMA's ``current_model_state``): it is the file
        ``backbone.tokenizer_ckpt`` named, referenced with its fingerprints (``tokenizer_reference``) and
        put back on load after a check (``multimodal.checkpoint.tokenizer_state``)."""
        reference = self._tokenizer_reference()
        vocoder = getattr(self.backbone, "vocoder_source", None)
        prefixes = (TOKENIZER_PREFIXES if reference is not None else ()) + ((VOCODER_PREFIX,) if vocoder else ())
        for key in STATE_KEYS:
            state = checkpoint.get(key)
            if isinstance(state, dict):
                for name in [k for k in state if k.startswith(prefixes)] if prefixes else []:
                    del state[name]
        if reference is not None:
            checkpoint["tokenizer_reference"] = reference
        if vocoder:
            checkpoint["vocoder_reference"] = {"path": vocoder}

    def fill_tokenizer(self, checkpoint: dict[str, Any], keys: tuple[str, ...] = STATE_KEYS) -> None:
        """Put a referenced tokenizer's weights, and the model's own vocoder, back into the checkpoint's
        state dicts (see above)."""
        own_vocoder = {k: v for k, v in self.state_dict().items() if k.startswith(VOCODER_PREFIX)}
        for key in keys:
            state = checkpoint.get(key)
            if isinstance(state, dict) and own_vocoder:
                for name in [k for k in state if k.startswith(VOCODER_PREFIX)]:
                    del state[name]  # the vocoder is the file model.backbone.vocoder_ckpt names now
                state.update(own_vocoder)
        if not checkpoint.get("tokenizer_reference"):
            return
        weights = {f"backbone.{k}": v for k, v in tokenizer_state(checkpoint, self.backbone).items()}
        for key in keys:
            state = checkpoint.get(key)
            if isinstance(state, dict):
                for name, value in weights.items():
                    state.setdefault(name, value)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put a referenced tokenizer back; name the setting when a checkpoint's shapes do not fit this
        model (before any weight is copied)."""
        self.fill_tokenizer(checkpoint)
        own = self.state_dict()
        bad = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in checkpoint.get("state_dict", {}).items()
            if k in own and hasattr(v, "shape") and v.shape != own[k].shape
        ]
        if bad:
            hint = " (codebook size/dimension: model.backbone.quantizer num_codes/dim)" if any("quantizer" in b for b in bad) else ""
            raise ValueError("checkpoint does not match the model" + hint + ":\n  " + "\n  ".join(bad[:10]))
