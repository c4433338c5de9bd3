"""Data for srft-jax: the record schema, dataset builders and batching.

Rows everywhere follow docs/CONTRACTS.md: {"id", "prompt", "target", "answer"}.
`srft_jax.data.task` is the built-in verifiable reasoning task (offline,
deterministic in a seed). Submodules are imported explicitly so that importing
this package stays cheap.
"""
