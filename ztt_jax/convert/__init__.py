"""Converters between ztt_jax exports and other model formats (see `hf_gpt2`)."""
