"""Semantic test on the shipped shapes model: a token learned from 16 pictures of the world's triangles, starting
from the word "shape", makes "a red <wedge>" come out as a triangle, where "a red shape" and "a red" do not.

The embedding ships with the plugin (``"wedge"``; src/diffsteer_textual_inversion/data/README.md says how it was
made); the evaluator (concepts.shape_of) classifies each image's object pixels among circle / square / triangle /
diamond by template mismatch. Measured on the shipped stage-8 model (16 images, 20 DDIM steps): seed 0: 16/16
with the token vs 0/16 ("a red shape", which draws squares) and 0/16 ("a red"); seed 1: 16/16 vs 1/16.

Until stage 7 this test used ``<diamond>``, a shape the model never saw; no recipe relearns it on stage 8
(docs/textual-inversion.md, "A shape the model never drew"), so the concept is now one the UNet can draw and the
test measures what textual inversion adds: a new word whose meaning comes only from the pictures.
"""

from __future__ import annotations

from diffsteer_textual_inversion import TextualInversion
from concepts import concept_set, shape_rate

N, STEPS = 16, 20
# Guidance at every step (shapes_pipe_every_step): under the shapes model's recommended interval (no guidance above
# t = 600) the word "shape" itself comes out a triangle in 11 of 16 images ("a red <wedge>": 16/16, "a red": 0/16),
# and a token is measured against a prior that does not already draw its concept.


def test_learned_wedge_token_draws_triangles(shapes_pipe_every_step):
    # the evaluator itself recognises the concept it is about
    assert shape_rate(concept_set("triangle", 8)[0], "triangle") == 1.0
    ti = TextualInversion(embeddings=["wedge"])
    run = lambda prompt, *plugins: shapes_pipe_every_step([prompt] * N, num_inference_steps=STEPS, seed=0,  # noqa: E731
                                               plugins=list(plugins)).images
    with_token = shape_rate(run("a red <wedge>", ti), "triangle")
    shape = shape_rate(run("a red shape"), "triangle")
    bare = shape_rate(run("a red"), "triangle")
    print(f"\ntriangle rate: 'a red <wedge>' {with_token:.3f} | 'a red shape' {shape:.3f} | 'a red' {bare:.3f}")
    assert with_token >= 0.75
    assert with_token - max(shape, bare) >= 0.5
