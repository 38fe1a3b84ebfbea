"""twinbrain_jax.data."""
