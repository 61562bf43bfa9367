"""Weighted, chunked prompt encoding: parsed prompts → CLIP hidden states.

Long prompts are split into chunks of ``model_max_length - 2`` (75) tokens; each chunk is wrapped in BOS/EOS,
padded to 77 tokens and encoded on its own, and the chunks' hidden states are concatenated along the token axis
(as compel with ``truncate_long_prompts=False`` and A1111 do). Texts encoded together are padded to the same
number of chunks with the empty prompt's chunk ``[BOS, EOS, pad, ...]``.

Weights follow the tool whose syntax is used:

* **compel**: a token of weight ``w`` gets ``empty + (z - empty) * w`` (``empty``: the hidden states of the empty
  chunk, position by position). A fragment with ``w < 1`` is additionally pulled toward the prompt encoded with that
  fragment masked out of the attention: the result is the normalised sum of the prompt (weight 1) and each masked
  variant (weight ``tan((1 - w) π / 2)``), so ``w = 0.5`` lands halfway and ``w → 0`` removes the fragment.
* **a1111** ("Original" emphasis): each chunk's hidden states are multiplied by the token weights, then rescaled so
  the chunk's mean is what it was before weighting (``normalize_emphasis=False``: A1111's "No norm").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch

from diffsteer import PluginError

from .a1111_syntax import parse_a1111
from .compel_syntax import parse_compel
from .syntax import Blend, Break, Conjunction, Fragment, Prompt

Syntax = Literal["compel", "a1111"]
#: Errors name the plugin this encoder serves, also when it is used on its own.
OWNER = "prompt-weighting"

#: A1111 moves the tail of a full chunk to the next one when a comma lies within this many tokens of the end.
COMMA_BACKTRACK = 20
_SENTENCE_END = (".</w>",)
_PHRASE_END = (".</w>", ",</w>", ";</w>", ":</w>")


@dataclass
class ChunkedPrompt:
    """A :class:`Prompt` laid out in 77-token chunks: ``ids``/``weights`` are ``(chunks, 77)``.

    ``downweighted`` lists, for each fragment of weight < 1 (compel), its weight and the flat positions
    ``(first, last)`` of its tokens.
    """

    ids: torch.Tensor
    weights: torch.Tensor
    downweighted: list[tuple[float, int, int]] = field(default_factory=list)
    truncated: int = 0

    @property
    def chunks(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class EncodingPlan:
    """A parsed, tokenized text: its tree with each :class:`Prompt` replaced by a :class:`ChunkedPrompt`."""

    text: str
    tree: Conjunction
    parts: list[Union[ChunkedPrompt, list[ChunkedPrompt]]]  # one per conjunction part (a list for a blend)

    @property
    def chunks(self) -> int:
        """How many 77-token chunks this text encodes to (before padding)."""
        return sum(max(c.chunks for c in p) if isinstance(p, list) else p.chunks for p in self.parts)

    @property
    def truncated(self) -> int:
        """Tokens dropped by ``truncate_long_prompts``."""
        return sum(sum(c.truncated for c in p) if isinstance(p, list) else p.truncated for p in self.parts)


class WeightedPromptEncoder:
    """Encodes prompts with compel or A1111 weighting syntax into CLIP hidden states, chunking long prompts.

    Usable on its own, like compel::

        encoder = WeightedPromptEncoder(pipe.tokenizer, pipe.text_encoder, syntax="compel")
        embeddings = encoder.encode(["a red++ circle", "a blue square"])  # (2, 77, hidden)

    ``clip_skip`` counts layers skipped from the end, the final layer norm still applied (as the core does).
    """

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        *,
        syntax: Syntax = "compel",
        truncate_long_prompts: bool = False,
        normalize_emphasis: bool = True,
        clip_skip: Optional[int] = None,
    ) -> None:
        if syntax not in ("compel", "a1111"):
            raise PluginError(OWNER, f"syntax must be 'compel' or 'a1111', got {syntax!r}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.syntax = syntax
        self.truncate = truncate_long_prompts
        self.normalize_emphasis = normalize_emphasis
        self.clip_skip = clip_skip
        self.length = int(tokenizer.model_max_length)
        self.bos = int(tokenizer.bos_token_id)
        self.eos = int(tokenizer.eos_token_id)
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        self._plans: dict[str, EncodingPlan] = {}
        self._empty: Optional[torch.Tensor] = None
        self._token_text: dict[int, str] = {}
        comma = tokenizer.convert_tokens_to_ids(",</w>")
        self.comma = comma if isinstance(comma, int) and comma != tokenizer.unk_token_id else None

    @property
    def chunk_tokens(self) -> int:
        """Prompt tokens per chunk (75 for CLIP's 77 positions)."""
        return self.length - 2

    # -- parsing and layout ----------------------------------------------------------------------------------------
    def parse(self, text: str) -> Conjunction:
        """The parsed tree of ``text``; raises :class:`~.syntax.PromptSyntaxError`."""
        return parse_compel(text) if self.syntax == "compel" else parse_a1111(text)

    def plan(self, text: str) -> EncodingPlan:
        """Parse and tokenize ``text`` (cached); ``plan(text).chunks`` is its chunk count."""
        if text not in self._plans:
            tree = self.parse(text)
            parts: list = []
            for part in tree.parts:
                if isinstance(part, Blend):
                    parts.append([self._layout(p) for p in part.prompts])
                else:
                    parts.append(self._layout(part))
            self._plans[text] = EncodingPlan(text, tree, parts)
        return self._plans[text]

    def _tokens(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    def _layout(self, prompt: Prompt) -> ChunkedPrompt:
        frags = [f for f in prompt.fragments if isinstance(f, Fragment)]
        token_lists = iter(self._tokens([f.text for f in frags]))
        # one (fragment index, token ids, weight) per fragment, None for a break
        pieces: list = []
        for k, f in enumerate(prompt.fragments):
            pieces.append(None if isinstance(f, Break) else (k, next(token_lists), f.weight))
        if self.syntax == "a1111":
            chunks = self._chunks_a1111(pieces)
        else:
            chunks = self._chunks_compel(pieces)
        total = sum(len(p[1]) for p in pieces if p is not None)
        kept = sum(len(c) for c in chunks)
        if self.truncate:
            chunks = chunks[:1]
            kept = len(chunks[0])
        ids = torch.full((len(chunks), self.length), self.pad, dtype=torch.long)
        weights = torch.ones((len(chunks), self.length), dtype=torch.float32)
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for c, chunk in enumerate(chunks):
            ids[c, 0] = self.bos
            for j, (token, weight, frag) in enumerate(chunk):
                ids[c, 1 + j] = token
                weights[c, 1 + j] = weight
                position = c * self.length + 1 + j
                first.setdefault(frag, position)
                last[frag] = position
            ids[c, 1 + len(chunk)] = self.eos
        downweighted = []
        if self.syntax == "compel":
            for k, f in enumerate(prompt.fragments):
                if isinstance(f, Fragment) and f.weight < 1 and k in first:
                    downweighted.append((f.weight, first[k], last[k]))
        return ChunkedPrompt(ids, weights, downweighted, truncated=total - kept)

    def _token_str(self, token: int) -> str:
        if token not in self._token_text:
            self._token_text[token] = self.tokenizer.convert_ids_to_tokens(token)
        return self._token_text[token]

    def _split_point(self, tokens: list[tuple[int, float, int]]) -> int:
        """compel's rule: cut a too-long run after its last sentence end (".") within the first 75 tokens, else
        after its last phrase end (. , ; :), else after its last word end, else at 75 tokens."""
        size = self.chunk_tokens
        if len(tokens) <= size or self.truncate:
            return size
        names = [self._token_str(t) for t, _, _ in tokens[:size]]
        for accept in (lambda n: n in _SENTENCE_END, lambda n: n in _PHRASE_END, lambda n: n.endswith("</w>")):
            for index in range(len(names) - 1, -1, -1):
                if accept(names[index]):
                    return index + 1
        return size

    def _chunks_compel(self, pieces: list) -> list[list[tuple[int, float, int]]]:
        flat = [(t, w, k) for k, toks, w in pieces for t in toks]
        chunks = []
        while True:
            cut = self._split_point(flat)
            chunks.append(flat[:cut])
            flat = flat[cut:]
            if not flat or self.truncate:
                return chunks

    def _chunks_a1111(self, pieces: list) -> list[list[tuple[int, float, int]]]:
        """A1111's rule: fill 75-token chunks; when one is full and a comma lies within the last 20 tokens, the
        tokens after that comma move to the next chunk. BREAK closes the current chunk."""
        size = self.chunk_tokens
        chunks: list[list] = []
        chunk: list = []
        last_comma = -1
        for piece in pieces:
            if piece is None:
                chunks.append(chunk)
                chunk, last_comma = [], -1
                continue
            k, toks, weight = piece
            for token in toks:
                if token == self.comma:
                    last_comma = len(chunk)
                elif len(chunk) == size and last_comma != -1 and len(chunk) - last_comma <= COMMA_BACKTRACK:
                    moved = chunk[last_comma + 1:]
                    chunks.append(chunk[:last_comma + 1])
                    chunk, last_comma = moved, -1
                if len(chunk) == size:
                    chunks.append(chunk)
                    chunk, last_comma = [], -1
                chunk.append((token, weight, k))
        if chunk or not chunks:
            chunks.append(chunk)
        return chunks

    # -- encoding ----------------------------------------------------------------------------------------------------
    def chunk_count(self, texts: Sequence[str]) -> int:
        """The most chunks any of ``texts`` needs."""
        return max(self.plan(t).chunks for t in texts)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], chunks: Optional[int] = None) -> torch.Tensor:
        """Hidden states ``(len(texts), chunks * 77, hidden)`` in float32.

        ``chunks`` pads every text to that many chunks (default: the most any text needs); a text that needs more
        raises ``ValueError``.
        """
        texts = list(texts)
        plans = [self.plan(t) for t in texts]
        need = max(p.chunks for p in plans)
        chunks = need if chunks is None else chunks
        if need > chunks:
            longest = max(plans, key=lambda p: p.chunks)
            raise PluginError(OWNER, f"{longest.text!r} needs {longest.chunks} chunks, more than the {chunks} allowed")
        rows = _Rows(self)
        builders = [self._build(plan, rows) for plan in plans]
        rows.run()
        out = []
        for build in builders:
            z = build()
            missing = chunks - z.shape[0] // self.length
            if missing:
                z = torch.cat([z, self.empty_chunk().repeat(missing, 1)])
            out.append(z)
        return torch.stack(out)

    def empty_chunk(self) -> torch.Tensor:
        """Hidden states ``(77, hidden)`` of the empty chunk ``[BOS, EOS, pad, ...]``: the padding, and the origin
        that compel's weights scale from. Encoded on its own (so plain prompts batch exactly as in the core)."""
        if self._empty is None:
            ids = torch.full((1, self.length), self.pad, dtype=torch.long)
            ids[0, 0], ids[0, 1] = self.bos, self.eos
            self._empty = self.run_encoder(ids, None)[0]
        return self._empty

    def _build(self, plan: EncodingPlan, rows: "_Rows") -> Callable[[], torch.Tensor]:
        """Queue the encoder rows ``plan`` needs; the returned function assembles its ``(tokens, hidden)``."""
        builders = []
        for node, part in zip(plan.tree.parts, plan.parts):
            if isinstance(node, Blend):
                builders.append(self._build_blend(node, part, rows))
            else:
                builders.append(self._build_prompt(part, rows))

        def assemble() -> torch.Tensor:
            outs = []
            for weight, build in zip(plan.tree.weights, builders):
                z = build()
                if weight != 1:  # a weighted .and() part: scale its difference from the empty prompt
                    base = self.empty_chunk().repeat(z.shape[0] // self.length, 1)
                    z = base + (z - base) * weight
                outs.append(z)
            return torch.cat(outs)

        return assemble

    def _build_blend(
        self, blend: Blend, prompts: list[ChunkedPrompt], rows: "_Rows"
    ) -> Callable[[], torch.Tensor]:
        builders = [self._build_prompt(p, rows) for p in prompts]

        def assemble() -> torch.Tensor:
            zs = [b() for b in builders]
            longest = max(z.shape[0] for z in zs)
            zs = [torch.cat([z, self.empty_chunk().repeat((longest - z.shape[0]) // self.length, 1)]) for z in zs]
            w = torch.tensor(blend.weights, dtype=zs[0].dtype, device=zs[0].device)
            if blend.normalize:
                w = w / w.sum()
            return torch.sum(torch.stack(zs) * w.reshape(-1, 1, 1), dim=0)

        return assemble

    def _build_prompt(self, chunked: ChunkedPrompt, rows: "_Rows") -> Callable[[], torch.Tensor]:
        base = [rows.add(chunked.ids[c]) for c in range(chunked.chunks)]
        variants = []  # compel: (lerp weight, row handles) of each masked-out fragment
        for weight, first, last in chunked.downweighted:
            mask = torch.ones(chunked.chunks * self.length, dtype=torch.long)
            mask[first:last + 1] = 0
            mask[0::self.length] = 1  # keep each chunk's BOS ...
            mask[self.length - 1::self.length] = 1  # ... and last position, as compel does
            mask = mask.view(chunked.chunks, self.length)
            handles = [rows.add(chunked.ids[c], mask[c]) for c in range(chunked.chunks)]
            variants.append((math.tan((1.0 - max(1e-5, weight)) * math.pi / 2), handles))

        def weighted(handles: list[int]) -> torch.Tensor:
            out = []
            for c, h in enumerate(handles):
                z = rows[h]
                w = chunked.weights[c].to(z.device, z.dtype)
                if self.syntax == "compel":
                    identity = (w == 1).unsqueeze(-1).expand_as(z)
                    if not bool(identity.all()):
                        e = self.empty_chunk()
                        z = torch.where(identity, z, e + (z - e) * w.unsqueeze(-1))
                elif not bool((w == 1).all()):
                    mean = z.mean()
                    z = z * w.unsqueeze(-1)
                    if self.normalize_emphasis:
                        z = z * _mean_ratio(mean, z)
                out.append(z)
            return torch.cat(out)

        def assemble() -> torch.Tensor:
            z = weighted(base)
            if not variants:
                return z
            stacked = torch.stack([z] + [weighted(h) for _, h in variants])
            lerp = torch.tensor([1.0] + [v for v, _ in variants], dtype=z.dtype, device=z.device)
            lerp = lerp / lerp.sum()
            return torch.sum(stacked * lerp.reshape(-1, 1, 1), dim=0)

        return assemble

    # -- the text encoder ----------------------------------------------------------------------------------------------
    def run_encoder(self, ids: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Hidden states of ``ids`` ``(n, 77)``, as the core's ``PromptEncoder.encode_ids`` computes them, with an
        optional attention ``mask`` on top of the encoder's own padding mask."""
        encoder = self.text_encoder
        ids = ids.to(encoder.device)
        if getattr(encoder.config, "use_attention_mask", False):
            own = (ids != self.pad).long()
            mask = own if mask is None else own * mask.to(encoder.device)
        elif mask is not None:
            mask = mask.to(encoder.device)
        if not self.clip_skip:
            return encoder(ids, attention_mask=mask)[0].float()
        layers = encoder.config.num_hidden_layers
        if self.clip_skip < 0 or self.clip_skip >= layers:
            raise PluginError(OWNER, f"clip_skip={self.clip_skip} is out of range for a text encoder with {layers} layers")
        out = encoder(ids, attention_mask=mask, output_hidden_states=True)
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        return norm(out.hidden_states[-(self.clip_skip + 1)]).float()


def _mean_ratio(before: torch.Tensor, weighted: torch.Tensor) -> torch.Tensor:
    """A1111's rescaling factor ``before / weighted.mean()``, or 1 when either mean is negligible next to the
    values' typical size (|mean| < 1e-3 · mean |z|): a text encoder whose final layer norm has no bias gives
    hidden states of mean ~0, and the ratio of two such means is rounding noise, not a scale."""
    after = weighted.mean()
    floor = 1e-3 * weighted.abs().mean()
    if before.abs() < floor or after.abs() < floor:
        return torch.ones((), dtype=weighted.dtype, device=weighted.device)
    return before / after


class _Rows:
    """The 77-token rows one ``encode`` needs, run through the text encoder in two batches (unmasked, masked)."""

    def __init__(self, owner: WeightedPromptEncoder) -> None:
        self.owner = owner
        self.plain: list[torch.Tensor] = []
        self.masked: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles: list[tuple[bool, int]] = []
        self.results: dict[bool, torch.Tensor] = {}

    def add(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> int:
        if mask is None:
            self.handles.append((False, len(self.plain)))
            self.plain.append(ids)
        else:
            self.handles.append((True, len(self.masked)))
            self.masked.append((ids, mask))
        return len(self.handles) - 1

    def run(self) -> None:
        if self.plain:
            self.results[False] = self.owner.run_encoder(torch.stack(self.plain), None)
        if self.masked:
            ids = torch.stack([i for i, _ in self.masked])
            mask = torch.stack([m for _, m in self.masked])
            self.results[True] = self.owner.run_encoder(ids, mask)

    def __getitem__(self, handle: int) -> torch.Tensor:
        masked, index = self.handles[handle]
        return self.results[masked][index]
