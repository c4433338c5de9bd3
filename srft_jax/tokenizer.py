"""One tokenizer interface over sentencepiece `.model` files and HF `tokenizer.json`.

The rest of the project only sees `Tokenizer`: `encode`, `decode`, the special
ids, and `batch_encode`, which left-pads prompts into numpy int32 arrays (the
layout the sampler and `model.forward_logits` expect: positions are derived from
the mask, so left padding is safe). `render_prompt` holds the chat templates:
the paper's Qwen2.5 chat format (docs/method.md §5) and plain ones for tiny models.

HF tokenizers are read with the `tokenizers` library, not transformers, so the
runtime does not depend on transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm
import tokenizers

from srft_jax import paths

__all__ = [
  "Tokenizer",
  "SentencePieceTokenizer",
  "HFTokenizer",
  "load_tokenizer",
  "vocabulary_digest",
  "render_prompt",
  "TEMPLATES",
  "QWEN_MATH_SYSTEM_PROMPT",
]


class Tokenizer:
  """Common interface; subclasses implement the `_encode`/`_decode` primitives.

  Attributes every subclass sets: `vocab_size`, `bos_id` (None when the
  vocabulary has no BOS), `eos_id`, `pad_id`, `stop_ids` (ids that end a
  generation; `eos_id` first).
  """

  vocab_size: int
  bos_id: int | None
  eos_id: int
  pad_id: int
  stop_ids: tuple[int, ...]

  # -- primitives -----------------------------------------------------------
  def _encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode(self, ids: list[int], skip_special: bool) -> str:
    raise NotImplementedError

  def id_to_token(self, token_id: int) -> str:
    raise NotImplementedError

  def token_to_id(self, token: str) -> int | None:
    raise NotImplementedError

  # -- public API -------------------------------------------------------------
  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text`; special tokens are added only when asked for."""
    ids = self._encode(text)
    if add_bos:
      if self.bos_id is None:
        raise ValueError("add_bos=True but this tokenizer has no BOS token")
      ids = [self.bos_id] + ids
    if add_eos:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    """Text of `ids`. Accepts lists and numpy/jax arrays (1-D)."""
    return self._decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special)

  def batch_encode(
    self,
    texts: Sequence[str],
    max_len: int | None = None,
    left_pad: bool = True,
    add_bos: bool = False,
    add_eos: bool = False,
    truncate: str | None = None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Encode and pad a batch -> (tokens int32 [B, T], mask int32 [B, T]).

    T = `max_len` if given, else the longest row. Padding goes on the left
    (prompts, so every row ends where generation starts) or on the right
    (demonstrations). A row longer than `max_len` is an error unless
    `truncate` is "left" (keep the end, right for prompts) or "right"
    (keep the start): silently cutting training data hides bugs.
    """
    if truncate not in (None, "left", "right"):
      raise ValueError(f"truncate must be None, 'left' or 'right', got {truncate!r}")
    rows = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
    longest = max((len(r) for r in rows), default=0)
    width = longest if max_len is None else int(max_len)
    tokens = np.full((len(rows), width), self.pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=np.int32)
    for b, row in enumerate(rows):
      if len(row) > width:
        if truncate is None:
          raise ValueError(
            f"row {b} has {len(row)} tokens > max_len={width}; "
            "pass truncate='left'|'right' to cut it"
          )
        row = row[len(row) - width :] if truncate == "left" else row[:width]
      n = len(row)
      if n == 0:
        continue
      if left_pad:
        tokens[b, width - n :] = row
        mask[b, width - n :] = 1
      else:
        tokens[b, :n] = row
        mask[b, :n] = 1
    return tokens, mask

  def batch_decode(
    self, tokens: np.ndarray, mask: np.ndarray | None = None, skip_special: bool = True
  ) -> list[str]:
    """Decode each row, keeping only positions where `mask` is 1."""
    tokens = np.asarray(tokens)
    out = []
    for b in range(tokens.shape[0]):
      row = tokens[b] if mask is None else tokens[b][np.asarray(mask[b]) > 0]
      out.append(self.decode(row, skip_special=skip_special))
    return out


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece `.model` (file path or serialized proto bytes)."""

  def __init__(self, model: str | os.PathLike | bytes):

    if isinstance(model, (bytes, bytearray)):
      self._sp = spm.SentencePieceProcessor(model_proto=bytes(model))
    else:
      self._sp = spm.SentencePieceProcessor(model_file=os.fspath(model))
    sp = self._sp
    self.vocab_size = sp.get_piece_size()
    self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
    if sp.eos_id() < 0:
      raise ValueError("sentencepiece model has no EOS id (train it with eos_id >= 0)")
    self.eos_id = sp.eos_id()
    # Models trained without a pad piece pad with EOS: the mask, not the id,
    # marks padding everywhere in this project.
    self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else self.eos_id
    self.unk_id = sp.unk_id()
    self.stop_ids = (self.eos_id,)
    self._control = {i for i in range(self.vocab_size) if sp.is_control(i)}

  def _encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def _decode(self, ids: list[int], skip_special: bool) -> str:
    if skip_special:
      return self._sp.decode([i for i in ids if i not in self._control])
    # sentencepiece never renders control pieces; splice their names in.
    parts, run = [], []
    for i in ids:
      if i in self._control:
        parts.append(self._sp.decode(run))
        parts.append(self._sp.id_to_piece(i))
        run = []
      else:
        run.append(i)
    parts.append(self._sp.decode(run))
    return "".join(parts)

  def id_to_token(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def token_to_id(self, token: str) -> int | None:
    i = self._sp.piece_to_id(token)
    # piece_to_id maps unknown pieces to unk; report "absent" instead.
    if i == self.unk_id and token != self._sp.id_to_piece(self.unk_id):
      return None
    return i


# Fallback names when no tokenizer_config.json says which token is which,
# most specific first (Qwen, Llama 3, Llama 2 / Mistral, Gemma, BERT-style).
_EOS_CANDIDATES = (
  "<|endoftext|>",
  "<|end_of_text|>",
  "</s>",
  "<eos>",
  "<|eot_id|>",
  "<|im_end|>",
  "[SEP]",
)
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
# End-of-turn markers: a chat-formatted generation stops at these as well as EOS.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")


def _token_content(value) -> str | None:
  """tokenizer_config.json stores special tokens as a string or {"content": ...}."""
  if isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  return None


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json`, read with the `tokenizers` library.

  Special tokens come from (in order) the constructor arguments, the
  `tokenizer_config.json` / `special_tokens_map.json` beside the file, then
  well-known token names present in the vocabulary.
  """

  def __init__(
    self,
    tokenizer_file: str | os.PathLike,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
  ):

    path = os.fspath(tokenizer_file)
    self._tok = tokenizers.Tokenizer.from_file(path)
    # Padding/truncation baked into the json would corrupt our own padding.
    self._tok.no_padding()
    self._tok.no_truncation()
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    config = self._read_configs(os.path.dirname(path))
    bos = bos_token or _token_content(config.get("bos_token"))
    eos = eos_token or _token_content(config.get("eos_token"))
    pad = pad_token or _token_content(config.get("pad_token"))

    self.bos_id = self._lookup(
      bos, _BOS_CANDIDATES if bos is None and "bos_token" not in config else ()
    )
    eos_id = self._lookup(eos, _EOS_CANDIDATES if eos is None else ())
    if eos_id is None:
      raise ValueError(
        f"cannot tell the EOS token of {path}: pass eos_token=... or add "
        "tokenizer_config.json with an eos_token"
      )
    self.eos_id = eos_id
    pad_id = self._lookup(pad, _PAD_CANDIDATES if pad is None else ())
    self.pad_id = eos_id if pad_id is None else pad_id

    stops = [eos_id]
    for extra in config.get("_generation_eos_ids", []):
      if extra not in stops:
        stops.append(extra)
    for name in _END_OF_TURN:
      i = self._tok.token_to_id(name)
      if i is not None and i not in stops:
        stops.append(i)
    self.stop_ids = tuple(stops)

  @staticmethod
  def _read_configs(directory: str) -> dict:
    """Merge special_tokens_map.json < tokenizer_config.json, plus generation eos ids."""
    merged: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
      p = os.path.join(directory, name)
      if os.path.exists(p):
        with open(p, encoding="utf-8") as f:
          data = json.load(f)
        for key in ("bos_token", "eos_token", "pad_token"):
          if key in data:
            merged[key] = data[key]
    p = os.path.join(directory, "generation_config.json")
    if os.path.exists(p):
      with open(p, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token_id")
      merged["_generation_eos_ids"] = [eos] if isinstance(eos, int) else list(eos or [])
    return merged

  def _lookup(self, name: str | None, candidates: Sequence[str]) -> int | None:
    if name is not None:
      i = self._tok.token_to_id(name)
      if i is None:
        raise ValueError(f"special token {name!r} is not in the vocabulary")
      return i
    for cand in candidates:
      i = self._tok.token_to_id(cand)
      if i is not None:
        return i
    return None

  def _encode(self, text: str) -> list[int]:
    # No post-processor tokens (e.g. Llama's automatic BOS): `encode`'s
    # add_bos/add_eos flags are the single place specials get added.
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def _decode(self, ids: list[int], skip_special: bool) -> str:
    return self._tok.decode(ids, skip_special_tokens=skip_special)

  def id_to_token(self, token_id: int) -> str:
    return self._tok.id_to_token(int(token_id))

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)


def vocabulary_digest(tok: Tokenizer) -> str:
  """A hash of the id -> token table: two tokenizers with the same digest turn
  every text into the same ids (a teacher must share the student's, docs/method.md §19)."""
  h = hashlib.sha256(str(tok.vocab_size).encode())
  for i in range(tok.vocab_size):
    h.update(b"\0" + str(tok.id_to_token(i)).encode())
  return h.hexdigest()


def load_tokenizer(path: str | os.PathLike, **kwargs) -> Tokenizer:
  """Open a tokenizer by file type.

  - `*.model` -> sentencepiece;
  - `tokenizer.json` (or any `*.json`) -> HF tokenizers;
  - a directory -> its `tokenizer.json` (with tokenizer_config.json beside it
    naming eos/pad), else its single `*.model` (e.g. `tokenizer.model`).
  `kwargs` (bos_token/eos_token/pad_token) go to `HFTokenizer`. A remote
  path (gs://) is read from a local copy (`paths.local_copy`).
  """
  path = paths.local_copy(os.fspath(path))
  if os.path.isdir(path):
    hf = os.path.join(path, "tokenizer.json")
    if os.path.exists(hf):
      return HFTokenizer(hf, **kwargs)
    models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
    if len(models) == 1:
      return SentencePieceTokenizer(os.path.join(path, models[0]))
    raise FileNotFoundError(
      f"{path} holds no tokenizer.json and {len(models)} *.model files; point at the file itself"
    )
  if not os.path.exists(path):
    raise FileNotFoundError(f"no tokenizer at {path}")
  if path.endswith(".json"):
    return HFTokenizer(path, **kwargs)
  if kwargs:
    raise TypeError(f"sentencepiece tokenizers take no options, got {sorted(kwargs)}")
  return SentencePieceTokenizer(path)


# ---------------------------------------------------------------------------
# Chat templates.

# docs/method.md §5: reasoning inside <think>\n ... </think>\n, then the final answer
# in \boxed{}. The paper does not print its exact wording; this is ours.
QWEN_MATH_SYSTEM_PROMPT = (
  "You are a careful mathematical reasoner. First think through the problem "
  "step by step, writing your reasoning inside <think>\n ... </think>\n. "
  "Then give the final answer, enclosed in \\boxed{}."
)

TEMPLATES = ("qwen_math", "chatml_plain", "plain")


def _chatml(system: str | None, user: str) -> str:
  head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
  return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def render_prompt(question: str, template: str = "qwen_math", system: str | None = None) -> str:
  """The text a model is prompted with; the response is appended directly.

  - "qwen_math": Qwen2.5 chat format with the paper's system prompt and the
    user turn "Question: {q} Answer:" (docs/method.md §5). `system` overrides it.
  - "chatml_plain": Qwen2.5 chat format, the question as the whole user
    turn, a system turn only if `system` is given.
  - "plain": "Question: {q} Answer: " with no special tokens, for tiny models
    with a task-specific tokenizer (`system`, if given, goes on a line before).
  """
  question = question.strip()
  if template == "qwen_math":
    return _chatml(
      QWEN_MATH_SYSTEM_PROMPT if system is None else system, f"Question: {question} Answer:"
    )
  if template == "chatml_plain":
    return _chatml(system, question)
  if template == "plain":
    head = f"{system}\n" if system else ""
    return f"{head}Question: {question} Answer: "
  raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
