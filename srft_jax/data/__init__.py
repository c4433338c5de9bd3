"""Data for srft-jax: the record schema, dataset builders and batching.

One training row, everywhere: {"id": str, "prompt": str (the question),
"target": str (the demonstration response, e.g. "<think>\\n...\\n</think>\\n...
\\boxed{a}"), "answer": str (the ground truth)}.

`task` is the built-in verifiable reasoning task (offline, deterministic in a
seed); `builders` turns local files into TFDS datasets; `distill` turns a
teacher's verified responses into one (`python -m srft_jax.data distill`);
`pipeline` batches rows into per-host numpy batches (`pipeline.make_iterator`).
Submodules are imported explicitly so that importing this package stays cheap.
"""
