"""Converters between ztt_jax exports and other model formats.

  hf_gpt2   Hugging Face GPT-2 <-> exports: the tensor mapping and the CLI.
  hf_io     a Hugging Face model directory, read and written for any family.
  fold      a pre-trained model's list of layers -> the vanilla or ZTT layout.
"""
from ztt_jax.errors import ConfigError


class ConvertError(ConfigError):
  """The input can't be converted; the message names the fix."""
