"""Tunix baselines run in a side interpreter (a venv with google-tunix; never this one).

`PREAMBLE` is the shared start of every side script: it reads the JSON spec
on argv[1], builds a word-level tokenizer over the spec's vocabulary and
defines `make_model()`, a random Tunix Qwen2 of the spec's shape (the shape the
calling benchmark gives its own model). `run` writes PREAMBLE + body to a file,
runs it and returns the `seconds` of the JSON line the body prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

PREAMBLE = r"""
import json, sys, time
import numpy as np
import jax
from flax import nnx
import tokenizers, transformers
from tunix.models.qwen2 import model as qwen2_lib

spec = json.loads(sys.argv[1])
v = spec["vocab"]
words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(2, v)]
tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
cfg = qwen2_lib.ModelConfig(
    num_layers=spec["layers"], vocab_size=v, embed_dim=spec["embed"], hidden_dim=spec["mlp"],
    num_heads=spec["heads"], head_dim=spec["head_dim"], num_kv_heads=spec["kv_heads"],
    rope_theta=1_000_000, norm_eps=1e-6, use_tied_embedding=False)
def make_model():
  return qwen2_lib.Qwen2(cfg, rngs=nnx.Rngs(0))
rs = np.random.RandomState(0)
def random_prompt():
  return " ".join(f"w{i}" for i in rs.randint(2, v, size=spec["prompt_len"]))
"""

MODEL_KEYS = ("vocab", "layers", "embed", "mlp", "heads", "kv_heads", "head_dim")


def run(python: str, body: str, spec: dict, env: dict | None = None) -> float:
  """Runs PREAMBLE + body in `python`; returns its printed {"seconds": ...}."""
  with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write(PREAMBLE + body)
  try:
    proc = subprocess.run(
      [python, f.name, json.dumps(spec)], capture_output=True, text=True, env=env, timeout=3600
    )
  finally:
    os.unlink(f.name)
  if proc.returncode != 0:
    errors = [l for l in proc.stderr.splitlines() if "Error" in l and not l.startswith(" ")]
    raise RuntimeError((errors or proc.stderr.strip().splitlines() or ["failed"])[-1])
  return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
