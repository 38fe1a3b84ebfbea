"""twinbrain_jax: dual-system vision-language-action policies in JAX/Flax."""

__version__ = "0.1.0"
