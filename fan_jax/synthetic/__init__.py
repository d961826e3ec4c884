"""Procedural cartoon faces with exact 68-point (300W / iBUG) landmarks (the renderer).

`fan_jax.synthetic_300w` writes them as a 300W release tree; `sources` gives them in memory.

A face is a small 3D model (head cross-sections, eyes, brows, nose, lips), posed with yaw, pitch
and roll and projected orthographically. The jaw landmarks are the silhouette of the head, so a
yawed face keeps its outline while the nose slides toward the far side and that side compresses.
Everything is drawn through the landmarks (the jaw is the face outline, eye contours are the lids,
the lips are the lip contours), so the landmark-image relationship is the same in every image
while identity, pose, expression, colours, lighting, clutter, occluders and blur vary.

Landmarks are 0-based pixel centres (x, y) in memory; `.pts` files hold them 1-based (300W).
Images are RGB in memory. Every image comes from its own seed, (seed, subset, index), so any file
can be regenerated alone and the tree can be written by several processes.

    python -m fan_jax.synthetic --out /tmp/synth300w --num_train 600 --num_test 150

The modules, in the order an image is made:

  seeds      per-image generators (`image_rng`) and the 300W folders' seed streams (`SUBSETS`)
  parts      the 68-point markup: `NUM_LANDMARKS` and each part's indices
  sampling   identity, expression, pose and appearance of one face
  layout     the 3D head and features, posed and projected: landmarks and 2D shapes
  drawing    anti-aliased shapes, curves through landmarks, clipped layers, noise tiles
  scene      background clutter, occluders, lighting, blur and noise
  face       the face drawn through its landmarks
  render     `render_face`, `sources`
  preview    `draw_landmarks`, `write_preview`
"""

from fan_jax.synthetic.face import _draw_face
from fan_jax.synthetic.layout import _layout
from fan_jax.synthetic.parts import (
    INNER_LIP,
    JAW,
    LEFT_BROW,
    LEFT_EYE,
    NOSE_BRIDGE,
    NOSTRILS,
    NUM_LANDMARKS,
    OUTER_LIP,
    RIGHT_BROW,
    RIGHT_EYE,
)
from fan_jax.synthetic.preview import draw_landmarks, write_preview
from fan_jax.synthetic.render import _render, render_face, sources
from fan_jax.synthetic.sampling import _sample_face
from fan_jax.synthetic.seeds import SUBSETS, image_rng

__all__ = [
    "INNER_LIP",
    "JAW",
    "LEFT_BROW",
    "LEFT_EYE",
    "NOSE_BRIDGE",
    "NOSTRILS",
    "NUM_LANDMARKS",
    "OUTER_LIP",
    "RIGHT_BROW",
    "RIGHT_EYE",
    "SUBSETS",
    "_draw_face",
    "_layout",
    # The stages, for tests: switch them off one by one (_render), or run them alone.
    "_render",
    "_sample_face",
    "draw_landmarks",
    "image_rng",
    "render_face",
    "sources",
    "write_preview",
]
