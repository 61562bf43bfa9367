"""Prompt encoding with a transformers CLIP text encoder and tokenizer."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from transformers import CLIPTextModel, CLIPTokenizer


def _text_transformer(encoder: CLIPTextModel) -> torch.nn.Module:
    # transformers 5 flattened CLIPTextModel; 4.x nests the same modules under `.text_model`.
    return getattr(encoder, "text_model", encoder)


class PromptEncoder:
    """Tokenizes and encodes prompts as Stable Diffusion does (padding to the tokenizer's max length).

    ``clip_skip`` counts layers skipped from the end, with the final layer norm still applied, as in
    A1111 and diffusers. SD 2.x's "penultimate layer" needs no skip here: its diffusers text encoder
    already has the last layer removed.
    """

    def __init__(self, tokenizer: CLIPTokenizer, encoder: CLIPTextModel) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    def token_ids(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``(len(texts), max_length)``, truncated and padded as diffusers pads them."""
        batch = self.tokenizer(
            list(texts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return batch.input_ids

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor, clip_skip: Optional[int] = None) -> torch.Tensor:
        """Hidden states ``(batch, tokens, hidden)`` for token ids."""
        ids = ids.to(self.encoder.device)
        mask = None
        if getattr(self.encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        if not clip_skip:
            return self.encoder(ids, attention_mask=mask)[0]
        if clip_skip < 0 or clip_skip >= self.encoder.config.num_hidden_layers:
            raise ValueError(
                f"clip_skip={clip_skip} is out of range for a text encoder with "
                f"{self.encoder.config.num_hidden_layers} layers"
            )
        out = self.encoder(ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-(clip_skip + 1)]
        return _text_transformer(self.encoder).final_layer_norm(hidden)

    def encode(self, texts: Sequence[str], clip_skip: Optional[int] = None) -> torch.Tensor:
        """Hidden states ``(len(texts), max_length, hidden)``."""
        return self.encode_ids(self.token_ids(texts), clip_skip)
