"""Developer tools (`python -m srft_jax.tools.aot`: ahead-of-time TPU fit check)."""
