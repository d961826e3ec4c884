"""TFDS builders for WFLW, 300W and COFW (installed as `fan_jax_datasets`).

Importing a subpackage registers its TFDS name: `import fan_jax_datasets.the300w` makes
`tfds.data_source('the300w', ...)` work ('wflw', 'the300w', 'cofw'). `fan_jax.data`
imports all three. Each subpackage also has `fixtures.py`, writing tiny fake downloads
in the real formats.
"""
