"""The shapes world: procedural captioned images, control images, edit pairs, a tokenizer and evaluators.

It is what diffsteer's embedded default model is trained on and what semantic tests measure techniques with.
"""

from .evaluate import (
    DetectedObject,
    background_colour,
    bbox,
    centroid,
    colour_areas,
    connected_components,
    dominant_colour,
    dominant_colours,
    evaluate_caption,
    mask_iou,
    object_count,
    object_mask,
    objects,
    shape_class,
    shape_scores,
)
from .strict import StrictVerdict, clean_rate, evaluate_strict, strict_verdict
from .vocab import (
    BACKGROUNDS,
    COLOURS,
    EXTRA_SHAPES,
    POSITIONS,
    SHAPES,
    SIZES,
    VOCAB_WORDS,
    CaptionSpec,
    ObjectSpec,
    build_tokenizer,
    format_caption,
    load_tokenizer,
    parse_caption,
    vocab_size,
)
from .world import (
    CaptionStyle,
    Scene,
    ShapeObject,
    ShapesDataset,
    caption,
    conditioning_to_tensor,
    edit_pair,
    image_to_tensor,
    render,
    render_depth,
    render_mask,
    render_outline,
    sample_scene,
    scene_from_caption,
)

__all__ = [
    "BACKGROUNDS", "COLOURS", "EXTRA_SHAPES", "POSITIONS", "SHAPES", "SIZES", "VOCAB_WORDS", "CaptionSpec",
    "CaptionStyle", "DetectedObject", "ObjectSpec", "Scene", "ShapeObject", "ShapesDataset", "background_colour",
    "bbox", "build_tokenizer", "caption", "centroid", "colour_areas", "conditioning_to_tensor",
    "connected_components", "dominant_colour", "dominant_colours", "edit_pair", "evaluate_caption", "format_caption",
    "image_to_tensor", "load_tokenizer", "mask_iou", "object_count", "object_mask", "objects", "parse_caption",
    "render", "render_depth", "render_mask", "render_outline", "sample_scene", "scene_from_caption", "shape_class",
    "shape_scores", "vocab_size",
    # the strict evaluator (issue 14), the semantic tests' default check
    "StrictVerdict", "clean_rate", "evaluate_strict", "strict_verdict",
]
