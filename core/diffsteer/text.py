"""Prompt encoding with a transformers CLIP text encoder and tokenizer."""

from __future__ import annotations

import re
import threading
from contextvars import ContextVar
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from transformers import BatchEncoding, CLIPTextModel, CLIPTokenizer

from .errors import RequestError
from .models.context import PATH_ATTR, WeightPatch, name_layers, patched_linear


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
            layers = self.encoder.config.num_hidden_layers
            raise RequestError("clip_skip", f"is {clip_skip}, out of range for a text encoder with {layers} layers: "
                               f"give 0 to {layers - 1}")
        out = self.encoder(ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-(clip_skip + 1)]
        return _text_transformer(self.encoder).final_layer_norm(hidden)

    def encode(self, texts: Sequence[str], clip_skip: Optional[int] = None) -> torch.Tensor:
        """Hidden states ``(len(texts), max_length, hidden)``."""
        return self.encode_ids(self.token_ids(texts), clip_skip)

    def with_tokens(self, table: "Union[TokenTable, EncoderScope]") -> "PromptEncoder":
        """An encoder over the same models that also knows ``table``'s tokens (it changes neither model).

        Given an :class:`EncoderScope`, the encoder also applies the scope's weight patches.
        """
        scope = table if isinstance(table, EncoderScope) else EncoderScope(table)
        return PromptEncoder(TokenizerView(self.tokenizer, scope.table), EncoderView(self.encoder, scope))  # type: ignore[arg-type]


# -- tokens added for one call (textual inversion) -----------------------------------------------------------------
#
# The pipeline's tokenizer and text encoder are shared by concurrent calls, so a call never adds tokens to them.
# Instead each call owns a TokenTable; the call's PromptEncoder reads through a tokenizer view (which splits the
# table's tokens out of the text before the shared tokenizer sees it) and an encoder view (which swaps the table's
# vectors in for those ids inside the shared encoder's token embedding, through the call's EncoderScope).


class TokenTable:
    """New tokens and their embedding vectors, outside the tokenizer and text encoder they extend.

    A token may hold several vectors (multi-vector textual inversion): ``"<x>"`` with 3 vectors then spells the
    sub-tokens ``<x> <x>_1 <x>_2`` (diffusers' names), and ``"<x>"`` in a prompt stands for all three. New ids
    follow the base vocabulary (``base_size``). Adding is safe while other threads read: the tables are replaced,
    never changed in place.

    Example:
        >>> table = TokenTable(base_size=10, hidden_size=4)
        >>> table.add("<x>", torch.zeros(2, 4), owner="demo")
        >>> table.token_ids("<x>"), table.names
        ([10, 11], ['<x>', '<x>_1'])
    """

    def __init__(self, base_size: int, hidden_size: int, parent: Optional["TokenTable"] = None) -> None:
        self.base_size, self.hidden_size = int(base_size), int(hidden_size)
        self._lock = threading.Lock()
        # One immutable snapshot, replaced whole: (name -> ids, vectors, split pattern); row k of the vectors
        # belongs to id base_size + k. Readers in other threads see the old or the new table, never a mix.
        self._snap: tuple[dict[str, list[int]], torch.Tensor, Optional[re.Pattern[str]]] = (
            parent._snap if parent else ({}, torch.zeros(0, self.hidden_size), None)
        )

    @property
    def _ids(self) -> dict[str, list[int]]:
        return self._snap[0]

    @property
    def _vectors(self) -> torch.Tensor:
        return self._snap[1]

    def __len__(self) -> int:
        return int(self._vectors.shape[0])

    def __contains__(self, name: object) -> bool:
        return name in self._ids

    @property
    def names(self) -> list[str]:
        """Every spelling the tokenizer now knows (tokens and their ``_k`` sub-tokens), in id order."""
        return sorted(self._ids, key=lambda n: (self._ids[n][0], -len(self._ids[n])))

    @property
    def vectors(self) -> torch.Tensor:
        """``(len(self), hidden)``: row ``k`` is the vector of id ``base_size + k``."""
        return self._vectors

    def token_ids(self, name: str) -> list[int]:
        """The ids a prompt's ``name`` stands for."""
        return list(self._ids[name])

    def add(self, token: str, vectors: torch.Tensor, *, owner: str, known: Callable[[str], bool] = lambda s: False) -> None:
        """Add ``token`` with ``vectors`` ``(hidden,)`` or ``(n, hidden)``.

        ``known(spelling)`` says whether the base tokenizer already has a spelling; such a token, one already in
        the table, or a vector of the wrong size raises :class:`~diffsteer.errors.PluginError` naming ``owner``.
        """
        from .errors import PluginError

        vectors = vectors.detach()
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or vectors.shape[0] < 1 or vectors.shape[1] != self.hidden_size:
            raise PluginError(
                owner, f"the embedding of {token!r} has shape {tuple(vectors.shape)}, but this text encoder takes "
                f"vectors of size {self.hidden_size} (an embedding made for another model?)"
            )
        if not torch.isfinite(vectors).all():
            raise PluginError(owner, f"the embedding of {token!r} contains NaN or inf")
        if not token or token != token.strip():
            raise PluginError(owner, f"token {token!r} must be non-empty without surrounding spaces")
        spellings = [token] + [f"{token}_{k}" for k in range(1, vectors.shape[0])]
        with self._lock:
            have = {n.lower() for n in self._ids}
            for s in spellings:
                if s.lower() in have:
                    raise PluginError(owner, f"token {s!r} is already added (two embeddings for one token?)")
                if known(s):
                    raise PluginError(
                        owner, f"token {s!r} is already in the tokenizer's vocabulary; choose another token"
                    )
            first = self.base_size + len(self)
            ids = dict(self._ids)
            ids[token] = list(range(first, first + len(spellings)))
            for k, s in enumerate(spellings[1:], start=1):
                ids[s] = [first + k]
            # Longest first, so "<x>_1" is not read as "<x>" followed by "_1". Case-insensitive, as CLIP's
            # tokenizer matches added tokens on its lowercased text ("<cat-toy>" finds "<Cat-Toy>").
            names = sorted(ids, key=len, reverse=True)
            pattern = re.compile("(" + "|".join(re.escape(n) for n in names) + ")", re.IGNORECASE)
            self._snap = (ids, torch.cat([self._vectors, vectors.to(self._vectors.dtype).cpu()]), pattern)

    def add_all(self, embeddings: "Mapping[str, torch.Tensor]", *, owner: str, tokenizer: Any) -> None:
        """:meth:`add` each ``{token: vectors}``, refusing spellings that ``tokenizer`` already has (as a word
        or a word-final ``</w>`` piece)."""
        vocab = tokenizer.get_vocab()
        for token, vectors in dict(embeddings).items():
            self.add(token, vectors, owner=owner, known=lambda s: s in vocab or f"{s}</w>" in vocab)

    def split(self, text: str) -> list[Union[str, list[int]]]:
        """``text`` as plain pieces and the id lists of the tokens between them (as an added-token tokenizer splits)."""
        ids, _, pattern = self._snap
        if pattern is None:
            return [text]
        lower = {n.lower(): i for n, i in ids.items()}
        out: list[Union[str, list[int]]] = []
        for k, piece in enumerate(pattern.split(text)):
            if k % 2:
                out.append(lower[piece.lower()])
            elif piece:
                out.append(piece)
        return out


#: A transformers fast tokenizer stores padding and truncation settings in its Rust backend on every call, so
#: two threads tokenizing with different settings (one call padding to 77, another not) corrupt each other's
#: output (seen: a 77-token prompt came back 8 tokens long). Calls tokenize through views, which take this lock.
_TOKENIZER_LOCK = threading.RLock()


class TokenizerView:
    """A tokenizer that knows a :class:`TokenTable`'s tokens; everything else is the shared tokenizer's.

    Calling it supports what prompt encoders use: ``padding`` (``"max_length"``, ``True``/``"longest"``),
    ``max_length``, ``truncation``, ``add_special_tokens`` and ``return_tensors`` (``"pt"`` or lists).
    """

    def __init__(self, tokenizer: CLIPTokenizer, table: TokenTable) -> None:
        self._tokenizer, self._table = tokenizer, table

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return self._table.base_size + len(self._table)

    def convert_ids_to_tokens(self, ids: Any, **kwargs: Any) -> Any:
        names = {i[0]: n for n, i in self._table._ids.items() if len(i) == 1}
        if isinstance(ids, int):
            return names[ids] if ids in names else self._tokenizer.convert_ids_to_tokens(ids, **kwargs)
        return [self.convert_ids_to_tokens(int(i), **kwargs) for i in ids]

    def convert_tokens_to_ids(self, tokens: Any) -> Any:
        if isinstance(tokens, str):
            ids = self._table._ids.get(tokens)
            return ids[0] if ids and len(ids) == 1 else self._tokenizer.convert_tokens_to_ids(tokens)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def __call__(
        self,
        text: Union[str, Sequence[str]],
        *,
        padding: Union[bool, str] = False,
        max_length: Optional[int] = None,
        truncation: bool = False,
        add_special_tokens: bool = True,
        return_tensors: Optional[str] = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        if not len(self._table):
            with _TOKENIZER_LOCK:
                return self._tokenizer(
                    text, padding=padding, max_length=max_length, truncation=truncation,
                    add_special_tokens=add_special_tokens, return_tensors=return_tensors, **kwargs,
                )
        kwargs.pop("verbose", None)
        if kwargs:
            raise TypeError(f"the added-token tokenizer view does not support {sorted(kwargs)}")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        split = [self._table.split(t) for t in texts]
        plain = [p for parts in split for p in parts if isinstance(p, str)]
        with _TOKENIZER_LOCK:
            plain_ids = iter(self._tokenizer(plain, add_special_tokens=False)["input_ids"] if plain else [])
        rows = [[i for p in parts for i in (next(plain_ids) if isinstance(p, str) else p)] for parts in split]
        if truncation and max_length is not None:
            rows = [r[: max_length - (2 if add_special_tokens else 0)] for r in rows]
        if add_special_tokens:
            rows = [[self._tokenizer.bos_token_id, *r, self._tokenizer.eos_token_id] for r in rows]
        masks = [[1] * len(r) for r in rows]
        target = max_length if padding == "max_length" else max(map(len, rows)) if padding in (True, "longest") else None
        if target is not None:
            pad = self._tokenizer.pad_token_id
            masks = [m + [0] * (target - len(r)) for r, m in zip(rows, masks)]
            rows = [r + [pad] * (target - len(r)) for r in rows]
        data: dict[str, Any] = {"input_ids": rows, "attention_mask": masks}
        if single and return_tensors is None:
            data = {k: v[0] for k, v in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors)


class EncoderScope:
    """What one call changes in the shared text encoder, without changing it.

    ``table`` holds the call's added tokens; ``weights`` the weight patches of the encoder's linear layers
    (keyed by module path, set by :func:`~diffsteer.overrides.collect_weight_overrides`). One mechanism
    serves both: an :class:`EncoderView` activates its scope for the duration of one encoder forward, and
    hooks on the shared encoder's token embedding and linears read it. The encoder belongs to
    transformers, so its forward cannot take the scope as an argument (as the UNet's takes its
    :class:`~diffsteer.models.context.ForwardContext`); a :class:`contextvars.ContextVar` carries it
    instead, so concurrent calls in other threads see only their own scope, or none.
    """

    def __init__(self, table: TokenTable, weights: Optional[Mapping[str, WeightPatch]] = None) -> None:
        self.table = table
        self.weights: Mapping[str, WeightPatch] = dict(weights or {})


class _EncoderPass:
    """One encoder forward under a scope: which ids the embedding hooks swapped (set between the hooks)."""

    def __init__(self, scope: EncoderScope, tokens: bool) -> None:
        self.scope, self.tokens = scope, tokens
        self.positions: Optional[torch.Tensor] = None
        self.rows: Optional[torch.Tensor] = None


_ACTIVE: ContextVar[Optional[_EncoderPass]] = ContextVar("diffsteer_encoder_pass", default=None)
_HOOKS_LOCK = threading.Lock()


def _before_embedding(module: torch.nn.Module, args: tuple) -> Optional[tuple]:
    active = _ACTIVE.get()
    if active is None or not active.tokens:
        return None
    table = active.scope.table
    ids = args[0]
    new = ids >= table.base_size
    active.positions = new
    active.rows = (ids - table.base_size).clamp(min=0)
    return (ids.masked_fill(new, 0),) + tuple(args[1:])


def _after_embedding(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> Optional[torch.Tensor]:
    active = _ACTIVE.get()
    if active is None or active.positions is None or active.rows is None:
        return None
    vectors = active.scope.table.vectors.to(device=out.device, dtype=out.dtype)
    swapped = vectors[active.rows.to(out.device)]
    return torch.where(active.positions.to(out.device)[..., None], swapped, out)


def _patched_linear_hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> Optional[torch.Tensor]:
    active = _ACTIVE.get()
    if active is None or not active.scope.weights:
        return None
    patch = active.scope.weights.get(getattr(module, PATH_ATTR, ""))
    # Recomputed from the input: a hook cannot swap the weight before the shared layer runs. Only patched
    # layers pay it, once per prompt encoding.
    return None if patch is None else patched_linear(module, args[0], patch)  # type: ignore[arg-type]


def _install_hooks(encoder: torch.nn.Module, weights: bool) -> None:
    """Hook the shared encoder once: its token embedding always, its linears once a scope patches weights."""
    embedding = encoder.get_input_embeddings()  # type: ignore[operator]
    with _HOOKS_LOCK:
        if not getattr(embedding, "_diffsteer_token_hooks", False):
            embedding.register_forward_pre_hook(_before_embedding)
            embedding.register_forward_hook(_after_embedding)
            embedding._diffsteer_token_hooks = True
        if weights and not getattr(encoder, "_diffsteer_weight_hooks", False):
            name_layers(encoder)
            for module in encoder.modules():
                if isinstance(module, torch.nn.Linear):
                    module.register_forward_hook(_patched_linear_hook)
            encoder._diffsteer_weight_hooks = True


class EncoderView:
    """A text encoder seen through an :class:`EncoderScope`: the scope's tokens and weights; else the shared encoder.

    Calls without added tokens in their ids and without weight patches run the shared encoder untouched.
    """

    def __init__(self, encoder: CLIPTextModel, scope: Union[EncoderScope, TokenTable]) -> None:
        self._encoder = encoder
        self._scope = scope if isinstance(scope, EncoderScope) else EncoderScope(scope)
        _install_hooks(encoder, weights=False)

    @property
    def scope(self) -> EncoderScope:
        return self._scope

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def __call__(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        table, weights = self._scope.table, self._scope.weights
        tokens = bool(len(table)) and int(input_ids.max()) >= table.base_size
        if not tokens and not weights:
            return self._encoder(input_ids, *args, **kwargs)
        if tokens and int(input_ids.max()) >= table.base_size + len(table):
            raise ValueError(f"token id {int(input_ids.max())} is beyond this call's vocabulary")
        if weights:
            _install_hooks(self._encoder, weights=True)
        active = _ACTIVE.set(_EncoderPass(self._scope, tokens))
        try:
            return self._encoder(input_ids, *args, **kwargs)
        finally:
            _ACTIVE.reset(active)


def token_table_for(tokenizer: CLIPTokenizer, encoder: CLIPTextModel, parent: Optional[TokenTable] = None) -> TokenTable:
    """An empty table (or a copy of ``parent``) for tokens added beyond this tokenizer and encoder."""
    base = max(len(tokenizer), int(encoder.get_input_embeddings().num_embeddings))
    return TokenTable(base, int(encoder.config.hidden_size), parent=parent)
