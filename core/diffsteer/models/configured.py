"""The base of every config-driven model (UNet, VAE, ControlNet): one immutable config, and the
``from_config`` / ``config`` / ``dtype`` / ``device`` surface diffusers users expect."""

from __future__ import annotations

from typing import Any, ClassVar, Generic, Mapping, TypeVar, Union

import torch
from torch import nn

from .config_utils import DiffusersConfig

C = TypeVar("C", bound=DiffusersConfig)
M = TypeVar("M", bound="ConfiguredModel[Any]")


class ConfiguredModel(nn.Module, Generic[C]):
    """A module built from a ``config_class`` object or a diffusers ``config.json`` mapping.

    Subclasses set ``config_class`` and call ``super().__init__(config)`` first; ``self.config`` is then
    the validated config (a bad field raises pydantic's ``ValidationError``, a ``ValueError``).
    """

    config_class: ClassVar[type[DiffusersConfig]]

    def __init__(self, config: Union[C, Mapping[str, Any]]) -> None:
        super().__init__()
        cls = self.config_class
        self._config: C = config if isinstance(config, cls) else cls.model_validate(dict(config))  # type: ignore[assignment]

    @classmethod
    def from_config(cls: type[M], config: Union[DiffusersConfig, Mapping[str, Any]]) -> M:
        """Build a randomly initialised model from a config object or a ``config.json`` mapping."""
        return cls(config)

    @property
    def config(self) -> C:
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
