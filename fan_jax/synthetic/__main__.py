"""`python -m fan_jax.synthetic` writes a 300W tree (the CLI of fan_jax.synthetic_300w)."""

from fan_jax import synthetic_300w

if __name__ == "__main__":
    synthetic_300w.main()
