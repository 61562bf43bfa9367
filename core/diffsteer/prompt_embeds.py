"""Prompt embeddings a caller made elsewhere (compel, a cache), passed as ``prompt_embeds`` /
``negative_prompt_embeds`` with diffusers' rules.

* ``prompt`` and ``prompt_embeds`` exclude each other, as do ``negative_prompt`` and ``negative_prompt_embeds``;
  one of ``prompt`` / ``prompt_embeds`` is required.
* Embeddings are ``(prompts, tokens, hidden)`` tensors, ``hidden`` being the UNet's ``cross_attention_dim``;
  ``num_images_per_prompt`` repeats each row. Given both, the two must have the same shape.
* Without ``negative_prompt_embeds`` the call encodes ``negative_prompt`` (or ``""``) itself, so its tokens
  must match ``prompt_embeds``' count (77 for SD unless the embeddings are longer).
* The call has no prompt text then: ``request.prompts`` holds one ``""`` per row. A plugin that replaces prompt
  encoding (``diffsteer_encode_prompt``: prompt weighting) is refused, since it would not see the given rows;
  plugins that edit embeddings (``diffsteer_edit_embeddings``) or add tokens (textual inversion) work as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import pluggy
import torch

from .errors import GenerationError, PluginError, RequestError
from .hook_chain import is_wrapper
from .plugins import plugin_label
from .request_checks import check_prompts

if TYPE_CHECKING:  # pragma: no cover
    from .call import GenerationCall, GenerationRequest

__all__ = ["check_embeddings", "describe", "mismatch_error", "per_image", "prompt_inputs", "refuse_prompt_encoders"]


def check_embeddings(name: str, value: Any, *, hidden: int) -> Optional[torch.Tensor]:
    """``value`` as a finite float ``(prompts, tokens, hidden)`` tensor (None passes); else a RequestError."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise RequestError(name, f"must be a torch.Tensor shaped (prompts, tokens, {hidden}), got {type(value).__name__}")
    shape = tuple(value.shape)
    if value.ndim != 3 or 0 in shape:
        raise RequestError(name, f"must be shaped (prompts, tokens, {hidden}), got {shape}")
    if not value.is_floating_point():
        raise RequestError(name, f"must hold floats, got {value.dtype}")
    if shape[2] != hidden:
        raise RequestError(
            name, f"have hidden size {shape[2]} but this model's UNet attends to {hidden} (cross_attention_dim): "
            "were they made with another model's text encoder?"
        )
    if not torch.isfinite(value).all():
        raise RequestError(name, "hold NaN or inf values")
    return value.detach()


def prompt_inputs(
    prompt: Any, negative_prompt: Any, prompt_embeds: Any, negative_prompt_embeds: Any, *, hidden: int
) -> tuple[list[str], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The call's prompts (``""`` per row of ``prompt_embeds``) and its checked embeddings, enforcing diffusers'
    exclusions."""
    if prompt is not None and prompt_embeds is not None:
        raise RequestError("prompt", "and prompt_embeds were both given: pass one of them")
    if prompt is None and prompt_embeds is None:
        raise RequestError("prompt", "must be a string or a non-empty list of strings, got None "
                                     "(or pass prompt_embeds: encoded text)")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise RequestError("negative_prompt", "and negative_prompt_embeds were both given: pass one of them")
    given = check_embeddings("prompt_embeds", prompt_embeds, hidden=hidden)
    prompts = check_prompts("prompt", prompt) if given is None else [""] * given.shape[0]
    negative = check_embeddings("negative_prompt_embeds", negative_prompt_embeds, hidden=hidden)
    if negative is not None:
        if given is not None and negative.shape != given.shape:
            raise RequestError(
                "negative_prompt_embeds", f"are shaped {tuple(negative.shape)} but prompt_embeds "
                f"{tuple(given.shape)}: they must have the same shape"
            )
        if negative.shape[0] != len(prompts):
            raise RequestError("negative_prompt_embeds", f"have {negative.shape[0]} rows for {len(prompts)} prompts")
    return prompts, given, negative


def refuse_prompt_encoders(hooks: pluggy.PluginManager, request: "GenerationRequest") -> None:
    """A plugin that replaces prompt encoding cannot serve a call whose prompts come encoded."""
    given = [n for n, v in (("prompt_embeds", request.prompt_embeds),
                            ("negative_prompt_embeds", request.negative_prompt_embeds)) if v is not None]
    if not given:
        return
    for impl in hooks.hook.diffsteer_encode_prompt.get_hookimpls():
        if not is_wrapper(impl):
            raise PluginError(
                plugin_label(impl.plugin),
                f"encodes prompt text itself (diffsteer_encode_prompt), but this call passes {' and '.join(given)}, "
                "which are encoded already: pass the text as prompt= with this plugin, or leave the plugin out",
            )


def per_image(call: "GenerationCall", embeddings: torch.Tensor) -> torch.Tensor:
    """Given per-prompt embeddings repeated for ``num_images_per_prompt`` (diffusers' order), in the call's dtype."""
    rows = embeddings.to(device=call.device, dtype=call.dtype)
    return rows.repeat_interleave(call.request.num_images_per_prompt, dim=0)


def mismatch_error(request: "GenerationRequest", negative: torch.Size, positive: torch.Size) -> Exception:
    """The error for negative and positive embeddings of different sizes, naming what the user gave."""
    if request.prompt_embeds is None and request.negative_prompt_embeds is None:
        return GenerationError(
            f"negative prompt embeddings {tuple(negative[1:])} differ from positive "
            f"{tuple(positive[1:])}; the prompt encoder must pad both alike"
        )
    if request.negative_prompt_embeds is not None:
        given, have, encoded_what, encoded = "negative_prompt_embeds", negative, "prompt", positive
    else:
        given, have, encoded_what, encoded = "prompt_embeds", positive, "negative prompt", negative
    return RequestError(
        given, f"have {tuple(have[1:])} (tokens, hidden) per row but the call encoded the {encoded_what} to "
        f"{tuple(encoded[1:])}: pass both prompt_embeds and negative_prompt_embeds, of one shape"
    )


def describe(embeddings: Optional[torch.Tensor]) -> Optional[str]:
    """How call metadata records given embeddings (tensors cannot be stored as JSON): shape and dtype."""
    if embeddings is None:
        return None
    return f"<tensor {'x'.join(str(s) for s in embeddings.shape)} {str(embeddings.dtype).replace('torch.', '')}>"
