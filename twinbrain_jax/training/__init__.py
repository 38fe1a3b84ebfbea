"""twinbrain_jax.training."""
