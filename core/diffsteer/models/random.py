"""Seeded Gaussian noise with diffusers' ``randn_tensor`` semantics, so equal seeds give equal latents."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def randn_tensor(
    shape: Sequence[int],
    generator: Generators = None,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Draw standard-normal noise of ``shape`` on ``device`` with ``dtype``.

    * A CPU generator used for a non-CPU ``device`` draws on the CPU and moves the result, so a seed
      gives the same noise whatever the accelerator; a CUDA generator for another device is an error.
    * A list of generators draws one ``(1, *shape[1:])`` sample per batch item, item ``i`` from
      ``generator[i]``, and concatenates them; a one-element list behaves like its single generator.
    """
    shape = tuple(shape)
    if isinstance(device, str):
        device = torch.device(device)
    draw_device: Union[torch.device, str, None] = device
    target = device or torch.device("cpu")

    if generator is not None:
        first = generator[0] if isinstance(generator, (list, tuple)) else generator
        gen_type = first.device.type
        if gen_type != target.type and gen_type == "cpu":
            draw_device = "cpu"
        elif gen_type != target.type and gen_type == "cuda":
            raise ValueError(f"Cannot generate a {target} tensor from a generator of type {gen_type}.")

    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]

    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"Got {len(generator)} generators for a batch of {shape[0]}; pass one per batch item.")
        item_shape = (1,) + shape[1:]
        draws = [torch.randn(item_shape, generator=g, device=draw_device, dtype=dtype) for g in generator]
        return torch.cat(draws, dim=0).to(target)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(target)
