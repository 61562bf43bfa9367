"""Loading embeddings into calls: formats, multi-vector expansion, several at once, per-call vs persistent tokens,
concurrent calls on one pipeline, and bad input."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save_file

from diffsteer import PluginError, SettingsError
from diffsteer.testing import branch_recorder
from diffsteer.pipeline import Pipeline
from diffsteer_textual_inversion import (SHIPPED, TextualInversion, load_textual_inversion, read_embedding,
                                         shipped_embedding, write_embedding)



def hidden(pipe):
    return pipe.text_encoder.config.hidden_size


def vectors(pipe, n, seed):
    return torch.randn(n, hidden(pipe), generator=torch.Generator().manual_seed(seed))


def embed(pipe, prompt, plugins=()):
    seen = {}
    pipe(prompt, num_inference_steps=1, seed=0, output_type="latent", plugins=[*plugins, branch_recorder(seen)])
    return seen


def test_multi_vector_token_expands_to_all_its_vectors(tiny_pipe):
    v = vectors(tiny_pipe, 3, 0)
    ti = TextualInversion(tensors={"<x>": v})
    seen = embed(tiny_pipe, "a red <x> circle", [ti])
    base = len(tiny_pipe.tokenizer)
    red = tiny_pipe.tokenizer("a red", add_special_tokens=False)["input_ids"]
    circle = tiny_pipe.tokenizer("circle", add_special_tokens=False)["input_ids"]
    assert seen["ids"][0][: 1 + len(red) + 3 + len(circle) + 1] == (
        [tiny_pipe.tokenizer.bos_token_id, *red, base, base + 1, base + 2, *circle, tiny_pipe.tokenizer.eos_token_id]
    )
    # "<x>_1" alone is its second vector only
    assert embed(tiny_pipe, "a <x>_1", [ti])["ids"][0][2:4] == [base + 1, tiny_pipe.tokenizer.eos_token_id]


def test_token_changes_the_prompt_embedding_and_only_for_that_call(tiny_pipe):
    plain = embed(tiny_pipe, "a red <x> circle")
    ti = embed(tiny_pipe, "a red <x> circle", [TextualInversion(tensors={"<x>": vectors(tiny_pipe, 1, 1)})])
    again = embed(tiny_pipe, "a red <x> circle")
    assert not torch.allclose(plain["cond"], ti["cond"])
    assert torch.equal(plain["cond"], again["cond"]), "a call without the plugin must not see its token"
    assert len(tiny_pipe.tokenizer) == tiny_pipe.text_encoder.get_input_embeddings().num_embeddings
    assert "<x>" not in tiny_pipe.tokenizer.get_vocab()


def test_several_embeddings_at_once_equal_each_alone_where_they_do_not_interact(tiny_pipe, tmp_path):
    a, b = vectors(tiny_pipe, 1, 2), vectors(tiny_pipe, 2, 3)
    write_embedding(tmp_path / "a.safetensors", "<a>", a)
    write_embedding(tmp_path / "b.safetensors", "<b>", b)
    both = TextualInversion(embeddings=[tmp_path / "a.safetensors", {"path": tmp_path / "b.safetensors"}])
    assert both.tokens == {"<a>": 1, "<b>": 2}
    seen = embed(tiny_pipe, "<a> and <b>", [both])
    split = [TextualInversion(embeddings=[tmp_path / "a.safetensors"]), TextualInversion(embeddings=[tmp_path / "b.safetensors"])]
    assert torch.equal(embed(tiny_pipe, "<a> and <b>", split)["cond"], seen["cond"])
    base = len(tiny_pipe.tokenizer)
    assert {base, base + 1, base + 2} <= set(seen["ids"][0])


def test_persistent_tokens_serve_later_calls_without_the_plugin(tiny_sd1, tmp_path):
    pipe = Pipeline.from_pretrained(tiny_sd1, scheduler="ddim")
    v = vectors(pipe, 2, 4)
    write_embedding(tmp_path / "learned_embeds.safetensors", "<p>", v)
    per_call = embed(pipe, "a <p>", [TextualInversion(embeddings=[tmp_path])])["cond"]
    assert load_textual_inversion(pipe, tmp_path) == ["<p>"]
    assert torch.equal(embed(pipe, "a <p>")["cond"], per_call)
    assert torch.equal(embed(pipe.with_scheduler("euler"), "a <p>")["cond"], per_call)
    with pytest.raises(PluginError, match="already added"):
        embed(pipe, "a <p>", [TextualInversion(tensors={"<p>": v})])


def test_concurrent_calls_with_different_embeddings_on_one_pipeline(tiny_pipe):
    plugins = [TextualInversion(tensors={"<c>": vectors(tiny_pipe, n, 10 + n)}) for n in (1, 2, 3)] + [None]
    alone = [embed(tiny_pipe, "a red <c> square", [p] if p else [])["cond"] for p in plugins]
    results: dict[int, list] = {k: [] for k in range(len(plugins))}
    errors = []

    def worker(k):
        try:
            for _ in range(3):
                results[k].append(embed(tiny_pipe, "a red <c> square", [plugins[k]] if plugins[k] else [])["cond"])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(plugins))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, got in results.items():
        assert all(torch.equal(g, alone[k]) for g in got), f"call {k} saw another call's tokens"


# -- files and bad input -----------------------------------------------------------------------------------------


def test_formats_read_alike(tmp_path):
    v = torch.randn(2, 8)
    save_file({"<d>": v}, tmp_path / "d.safetensors")
    torch.save({"<d>": v}, tmp_path / "d.bin")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "<d>", "step": 3,
                "sd_checkpoint": "abc", "sd_checkpoint_name": "model"}, tmp_path / "a1111.pt")
    save_file({"emb_params": v}, tmp_path / "<d>.safetensors")
    for f in ("d.safetensors", "d.bin", "a1111.pt", "<d>.safetensors"):
        token, got = read_embedding(tmp_path / f)
        assert token == "<d>" and torch.equal(got, v), f
    assert read_embedding(tmp_path / "d.bin", token="<e>")[0] == "<e>"
    single_token, single = read_embedding(tmp_path / "d.safetensors")
    save_file({"<s>": v[0]}, tmp_path / "s.safetensors")
    assert read_embedding(tmp_path / "s.safetensors")[1].shape == (1, 8)


def test_bad_files_name_the_plugin_and_file(tmp_path, tiny_pipe):
    with pytest.raises(PluginError, match="textual-inversion.*missing.safetensors.*not found"):
        TextualInversion(embeddings=[tmp_path / "missing.safetensors"])
    with pytest.raises(PluginError, match="no learned_embeds"):
        TextualInversion(embeddings=[tmp_path])
    save_file({"a": torch.ones(4), "b": torch.ones(4)}, tmp_path / "two.safetensors")
    with pytest.raises(PluginError, match="two.safetensors.*not an embedding file"):
        TextualInversion(embeddings=[tmp_path / "two.safetensors"])
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(PluginError, match="junk.safetensors"):
        TextualInversion(embeddings=[tmp_path / "junk.safetensors"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"string_to_param": {"*": torch.ones(2, 4)}, "name": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(PluginError, match="evil.pt.*refused"):
        TextualInversion(embeddings=[tmp_path / "evil.pt"])
    with pytest.raises(SettingsError, match="textual-inversion.embeddings"):
        TextualInversion(embeddings=[{"path": "x", "colour": 1}])


def test_shipped_embeddings_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: the name must not depend on where the user runs
    assert "wedge" in SHIPPED
    token, vectors = read_embedding("wedge")
    assert token == "<wedge>" and vectors.ndim == 2 and vectors.shape[0] == 2  # the shipped token has two vectors
    assert torch.equal(vectors, read_embedding(shipped_embedding("wedge"))[1])
    assert TextualInversion(embeddings=["wedge"]).tokens == {"<wedge>": 2}
    assert TextualInversion(embeddings=[{"path": "wedge", "token": "<gem>"}]).tokens == {"<gem>": 2}
    # A path in the working directory wins over the shipped name of the same spelling.
    write_embedding(tmp_path / "wedge" / "learned_embeds.safetensors", "<mine>", torch.ones(3))
    assert TextualInversion(embeddings=["wedge"]).tokens == {"<mine>": 1}
    with pytest.raises(PluginError, match="textual-inversion.*'?ruby'?.*not found.*shipped: wedge"):
        TextualInversion(embeddings=["ruby"])


def test_shipped_embeddings_are_package_data():
    """A wheel carries each shipped file: the pyproject's package-data globs match it."""
    import fnmatch
    import tomllib
    from pathlib import Path

    import diffsteer_textual_inversion as package

    root = Path(package.__file__).parent
    pyproject = root.parents[1] / "pyproject.toml"
    globs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"][package.__name__]
    for name in SHIPPED:
        rel = shipped_embedding(name).relative_to(root).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not in package-data {globs}"


def test_bad_tokens_are_refused_before_any_work(tiny_pipe):
    h = hidden(tiny_pipe)
    with pytest.raises(PluginError, match="textual-inversion.*shape \\(2, 7\\).*size 32"):
        embed(tiny_pipe, "a", [TextualInversion(tensors={"<w>": torch.ones(2, 7)})])
    with pytest.raises(PluginError, match="'red'.*already in the tokenizer"):
        embed(tiny_pipe, "a", [TextualInversion(tensors={"red": torch.ones(h)})])
    with pytest.raises(PluginError, match="already added"):
        embed(tiny_pipe, "a", [TextualInversion(tensors={"<t>": torch.ones(h)}), TextualInversion(tensors={"<t>": torch.ones(h)})])
    with pytest.raises(PluginError, match="NaN"):
        embed(tiny_pipe, "a", [TextualInversion(tensors={"<n>": torch.full((h,), float("nan"))})])


def test_tokenizer_view_splits_as_a_tokenizer_with_added_tokens(tiny_pipe):
    """The per-call view tokenizes like transformers' tokenizer after add_tokens (what diffusers uses):
    tokens glued to words, repeated, in another case, and each sub-token of a multi-vector token."""
    import copy

    from diffsteer.text import TokenizerView, token_table_for

    reference = copy.deepcopy(tiny_pipe.tokenizer)
    reference.add_tokens(["<Cat-Toy>", "<dog>", "<dog>_1"])
    table = token_table_for(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    table.add("<Cat-Toy>", torch.zeros(hidden(tiny_pipe)), owner="test")
    table.add("<dog>", torch.zeros(2, hidden(tiny_pipe)), owner="test")
    view = TokenizerView(tiny_pipe.tokenizer, table)
    for text in ["a <Cat-Toy> red circle", "a <cat-toy> red", "red<dog>_1circle <dog>_1", "A RED <DOG>_1  square",
                 "<Cat-Toy><Cat-Toy>", "no token at all"]:
        for kw in ({}, {"padding": "max_length", "max_length": 77, "truncation": True}):
            assert view(text, **kw)["input_ids"] == reference(text, **kw)["input_ids"], (text, kw)
    with pytest.raises(PluginError, match="already added"):
        table.add("<CAT-toy>", torch.zeros(hidden(tiny_pipe)), owner="test")
