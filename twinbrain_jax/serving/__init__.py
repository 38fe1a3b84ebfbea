"""twinbrain_jax.serving."""
