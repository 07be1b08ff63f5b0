"""ztt_jax: train, evaluate and export Zero Token Transformers with JAX/Flax."""

__version__ = "0.1.0"
