"""fan_jax: MobileFAN facial landmark detection and feature distillation in JAX/Flax."""

__version__ = "0.1.0"
