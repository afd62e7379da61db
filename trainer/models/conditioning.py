"""What the UNet is conditioned on, for every family, built by one function.

- SD 1.x / 2.x: the text encoder's last hidden states (``encoder_hidden_states``).
- SD3: three encoders (CLIP-L, CLIP-G, T5), encoded by ``trainer/models/sd3.py``; the
  pooled projection of both CLIPs travels as ``text_embeds``.
- SDXL: the **penultimate** hidden states of both text encoders (CLIP ViT-L, then OpenCLIP
  ViT-bigG), concatenated along the feature axis; the second encoder's **pooled, projected**
  output as ``text_embeds``; and six ``time_ids`` per example: its original size, the
  top-left corner of its crop and the size it trains at, each as (height, width) (SDXL
  paper, section 2.2; diffusers' SDXL pipeline orders them the same way).

:func:`condition` turns a batch into a :class:`Conditioning`, from cached text-encoder outputs
or from token ids, and is what training, the validation loss and the text cache all call
(the cache through :func:`encode_ids`), so the three can never disagree. The SD 1.x path is
the single call it always was: ``text_encoder(ids, return_dict=False)[0]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# SDXL reads the hidden states one layer before the last (what A1111/ComfyUI call clip skip 2
# for SD 1.x); the first encoder's last layer therefore never contributes, and LoRA skips it.
SDXL_HIDDEN_LAYER = -2


def unread_layers(sdxl: bool) -> dict[str, int]:
    """How many last layers of each text encoder the conditioning never reads, by component.

    SDXL reads the first encoder's penultimate states only; the second encoder's last layer
    still feeds its pooled output, and SD 1.x/2.x read the last states.
    """
    return {"text_encoder": -1 - SDXL_HIDDEN_LAYER} if sdxl else {}


@dataclass
class Conditioning:
    """The UNet's conditioning inputs for one batch.

    Attributes:
        hidden: ``encoder_hidden_states``, (batch, tokens, width).
        text_embeds: SDXL: the second text encoder's pooled projection, (batch, dim).
        time_ids: SDXL: (batch, 6) original (h, w), crop top-left (top, left), target (h, w).
    """

    hidden: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def unet_kwargs(self) -> dict[str, object]:
        """Keyword arguments of ``UNet2DConditionModel.forward`` beyond the sample and t."""
        kwargs: dict[str, object] = {"encoder_hidden_states": self.hidden}
        if self.text_embeds is not None:
            # time_ids stay fp32: the UNet embeds them sinusoidally in fp32, and a size such
            # as 3000 is not exact in bf16.
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.text_embeds,
                "time_ids": self.time_ids,
            }
        return kwargs


def tokenize(tokenizers: Sequence, captions: Sequence[str]) -> list[torch.Tensor]:
    """Token ids of ``captions`` for each tokenizer, padded/truncated to its length (77)."""
    return [
        tok(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=tok.model_max_length,
            return_tensors="pt",
        ).input_ids
        for tok in tokenizers
    ]


def encode_ids(
    encoders: Sequence[torch.nn.Module],
    ids: Sequence[torch.Tensor],
    trained: Sequence[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states (and SDXL's pooled projection) of token ids.

    Args:
        encoders: The text encoders in pipeline order: one (SD 1.x/2.x), two (SDXL) or three
            (SD3).
        ids: Token ids for each encoder, on its device.
        trained: Whether each encoder is trained (gradients flow); default none.

    Returns:
        ``(hidden, None)`` for one encoder, ``(hidden, text_embeds)`` for SDXL's two and
        SD3's three.
    """
    trained = list(trained or [False] * len(encoders))
    if len(encoders) == 3:  # SD3: CLIP-L, CLIP-G and T5 (or its stand-in)
        from trainer.models import sd3

        return sd3.encode_ids(encoders, ids, trained)
    if len(encoders) == 1:
        with torch.set_grad_enabled(trained[0]):
            return encoders[0](ids[0], return_dict=False)[0], None
    states, pooled = [], None
    for encoder, token_ids, grad in zip(encoders, ids, trained, strict=True):
        with torch.set_grad_enabled(grad):
            out = encoder(token_ids, output_hidden_states=True, return_dict=True)
        states.append(out.hidden_states[SDXL_HIDDEN_LAYER])
        # The last encoder's pooled output is the projected one (CLIPTextModelWithProjection).
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return torch.cat(states, dim=-1), pooled


def condition(
    batch: Mapping[str, torch.Tensor],
    encoders: Sequence[torch.nn.Module],
    trained: Sequence[bool] | None = None,
) -> Conditioning:
    """The UNet's conditioning for a batch: from cached text states or from token ids.

    Args:
        batch: ``encoder_hidden_states`` (+ ``text_embeds``) when the text cache serves them,
            else ``input_ids`` (+ ``input_ids_2``); SDXL batches carry ``time_ids``.
        encoders: The text encoders (trained or frozen), in pipeline order.
        trained: Whether each encoder is trained.
    """
    if "encoder_hidden_states" in batch:
        hidden, pooled = batch["encoder_hidden_states"], batch.get("text_embeds")
    else:
        # SD3 without T5 has three encoders and two tokenizers: its T5 stand-in reads none.
        names = [n for n in ("input_ids", "input_ids_2", "input_ids_3") if n in batch]
        hidden, pooled = encode_ids(encoders, [batch[n] for n in names], trained)
    return Conditioning(hidden, pooled, batch.get("time_ids"))
