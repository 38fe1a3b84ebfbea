"""twinbrain_jax.models."""
