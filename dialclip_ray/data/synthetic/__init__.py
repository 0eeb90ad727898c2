"""Deterministic synthetic corpus in the real PhotoChat and MMDialog formats (README: the synthetic task).

``generate(out, dialogs, seed, image_size, workers)`` renders attribute scenes
(colour, shape, count, background, size; plus jitter), writes dialogs about
them in the real file formats, image captions for pretraining a small CLIP,
``synth_meta.json`` and a ground-truth sidecar (``synth_truth.json``).
"""

from dialclip_ray.data.synthetic.vocab import ALL_SCENES, ATTRIBUTES, Scene, attribute_caption, differing, neighbours
from dialclip_ray.data.synthetic.writer import GENERATOR_VERSION, SynthConfig, generate, photochat_split_sizes

__all__ = ["ALL_SCENES", "ATTRIBUTES", "GENERATOR_VERSION", "Scene", "SynthConfig", "attribute_caption",
           "differing", "generate", "neighbours", "photochat_split_sizes"]
