"""srft-jax: SRFT (Supervised Reinforcement Fine-Tuning) in JAX / Flax NNX.

Submodules are imported lazily by users (`from srft_jax import objectives`), so
importing the package itself stays cheap and pulls in no model or trainer code.
"""

__version__ = "0.1.0"
