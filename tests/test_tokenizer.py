"""Tokenizer interface: sentencepiece and HF tokenizer.json trained inside the test."""

import io
import json

import numpy as np
import pytest

from srft_jax import tokenizer as tokenizer_lib

TEXTS = [
  "The cat sat on the mat.",
  "Question: What is 12 + 30? Answer: 42",
  "Tom has 7 apples and gives 3 to Ann.",
  "Reasoning goes first, then the answer in a box.",
  "How many marbles are left now?",
  "A small model learns small arithmetic.",
] * 10
ROUND_TRIP = ["The cat sat.", "Tom has 7 apples, 12 + 30? 42.", "answer in a box", ""]


def _train_sp(pad_id: int) -> bytes:
  import sentencepiece as spm

  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(TEXTS),
    model_writer=buf,
    vocab_size=80,
    hard_vocab_limit=False,
    model_type="unigram",
    character_coverage=1.0,
    pad_id=pad_id,
    unk_id=1,
    bos_id=2,
    eos_id=3,
    num_threads=1,
    minloglevel=2,
  )
  return buf.getvalue()


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  path = tmp_path_factory.mktemp("sp") / "tok.model"
  path.write_bytes(_train_sp(pad_id=0))
  return path


def _train_hf(directory, config=None):
  from tokenizers import Tokenizer
  from tokenizers import decoders
  from tokenizers import models
  from tokenizers import pre_tokenizers
  from tokenizers import trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=320,
    show_progress=False,
    special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(TEXTS, trainer=trainer)
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  if config is not None:
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  # Qwen2.5-Instruct style: no BOS, EOS = <|im_end|>, pad = <|endoftext|>.
  return _train_hf(
    tmp_path_factory.mktemp("hf"),
    {
      "bos_token": None,
      "eos_token": "<|im_end|>",
      "pad_token": {"content": "<|endoftext|>", "special": True},
    },
  )


# -- sentencepiece --------------------------------------------------------------


def test_sentencepiece_round_trip_and_specials(sp_model):
  tok = tokenizer_lib.load_tokenizer(sp_model)
  assert isinstance(tok, tokenizer_lib.SentencePieceTokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  assert tok.stop_ids == (3,)
  assert 10 < tok.vocab_size <= 80
  for text in ROUND_TRIP:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
  ids = tok.encode("The cat sat.", add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert tok.decode(ids) == "The cat sat."  # specials skipped by default
  shown = tok.decode(ids, skip_special=False)
  assert shown.startswith(tok.id_to_token(tok.bos_id)) and shown.endswith(
    tok.id_to_token(tok.eos_id)
  )
  assert tok.decode(np.asarray(ids, np.int32)) == "The cat sat."
  assert tok.token_to_id("definitely-not-a-piece") is None
  # A character never seen in training ("=") becomes <unk>, not a crash.
  assert tok.unk_id in tok.encode("1 = 1")


def test_sentencepiece_without_pad_falls_back_to_eos(tmp_path):
  path = tmp_path / "nopad.model"
  path.write_bytes(_train_sp(pad_id=-1))
  tok = tokenizer_lib.load_tokenizer(tmp_path)  # a directory with one *.model
  assert tok.pad_id == tok.eos_id == 3


# -- HF tokenizer.json ------------------------------------------------------------


def test_hf_round_trip_and_config_specials(hf_dir):
  tok = tokenizer_lib.load_tokenizer(hf_dir)
  assert isinstance(tok, tokenizer_lib.HFTokenizer)
  im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
  assert tok.bos_id is None
  assert tok.eos_id == im_end and tok.pad_id == eot
  assert tok.stop_ids[0] == im_end and eot in tok.stop_ids
  with pytest.raises(ValueError, match="BOS"):
    tok.encode("x", add_bos=True)
  # Byte-level BPE round-trips anything, including unseen characters.
  for text in ROUND_TRIP + ["café ∑ 𝑥\n\ttabs"]:
    assert tok.decode(tok.encode(text)) == text
  prompt = tokenizer_lib.render_prompt("What is 12 + 30?", template="chatml_plain")
  ids = tok.encode(prompt)
  # The chat markers are single special tokens, not spelled out in bytes.
  assert ids[0] == tok.token_to_id("<|im_start|>") and ids.count(im_end) == 1
  assert tok.decode(ids, skip_special=False) == prompt
  assert "<|im_start|>" not in tok.decode(ids)


def test_hf_file_without_config_and_overrides(tmp_path):
  d = _train_hf(tmp_path / "bare")
  tok = tokenizer_lib.load_tokenizer(d / "tokenizer.json")
  # Fallback by name: <|endoftext|> (Qwen base) is EOS, and pads with EOS.
  assert tok.eos_id == tok.token_to_id("<|endoftext|>") == tok.pad_id
  assert tok.token_to_id("<|im_end|>") in tok.stop_ids
  tok = tokenizer_lib.load_tokenizer(d, eos_token="<|im_end|>")
  assert tok.eos_id == tok.token_to_id("<|im_end|>")
  with pytest.raises(ValueError, match="not in the vocabulary"):
    tokenizer_lib.load_tokenizer(d, pad_token="<pad>")


def test_hf_matches_transformers_fast_tokenizer(hf_dir):
  from transformers import PreTrainedTokenizerFast

  ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
  tok = tokenizer_lib.load_tokenizer(hf_dir)
  for text in TEXTS[:6] + [tokenizer_lib.render_prompt("What is 2+2?")]:
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    tokenizer_lib.load_tokenizer(tmp_path / "missing.model")
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tokenizer_lib.load_tokenizer(tmp_path)  # empty directory


# -- batching -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_batch_encode_left_and_right_padding(kind, sp_model, hf_dir):
  tok = tokenizer_lib.load_tokenizer(sp_model if kind == "sp" else hf_dir)
  texts = ["The cat sat on the mat.", "Tom", "How many marbles are left now?"]
  rows = [tok.encode(t) for t in texts]
  width = max(map(len, rows))
  tokens, mask = tok.batch_encode(texts)
  assert tokens.dtype == np.int32 and mask.dtype == np.int32
  assert tokens.shape == mask.shape == (3, width)
  for b, row in enumerate(rows):
    n = len(row)
    # Left padding: real tokens flush right, so every row ends at the same column.
    assert mask[b].tolist() == [0] * (width - n) + [1] * n
    assert tokens[b, width - n :].tolist() == row
    assert (tokens[b, : width - n] == tok.pad_id).all()
  assert tok.batch_decode(tokens, mask) == texts

  tokens, mask = tok.batch_encode(texts, max_len=width + 4, left_pad=False, add_eos=True)
  assert tokens.shape == (3, width + 4)
  for b, row in enumerate(rows):
    n = len(row) + 1
    assert mask[b].tolist() == [1] * n + [0] * (width + 4 - n)
    assert tokens[b, :n].tolist() == row + [tok.eos_id]
    assert (tokens[b, n:] == tok.pad_id).all()


def test_batch_encode_overlong_rows(sp_model):
  tok = tokenizer_lib.load_tokenizer(sp_model)
  text = "How many marbles are left now?"
  ids = tok.encode(text)
  with pytest.raises(ValueError, match="max_len"):
    tok.batch_encode([text], max_len=3)
  tokens, mask = tok.batch_encode([text, ""], max_len=3, truncate="left")
  assert tokens[0].tolist() == ids[-3:] and mask.tolist() == [[1, 1, 1], [0, 0, 0]]
  tokens, _ = tok.batch_encode([text], max_len=3, truncate="right")
  assert tokens[0].tolist() == ids[:3]


# -- templates -------------------------------------------------------------------


def test_render_prompt_templates():
  q = "What is 2+3?"
  qwen = tokenizer_lib.render_prompt(q)
  assert qwen == (
    "<|im_start|>system\n" + tokenizer_lib.QWEN_MATH_SYSTEM_PROMPT + "<|im_end|>\n"
    "<|im_start|>user\nQuestion: What is 2+3? Answer:<|im_end|>\n<|im_start|>assistant\n"
  )
  # docs/method.md §5: the system prompt asks for <think> reasoning and a \boxed{} answer.
  for needle in ("<think>", "</think>", "\\boxed{}"):
    assert needle in tokenizer_lib.QWEN_MATH_SYSTEM_PROMPT
  assert tokenizer_lib.render_prompt(q, system="S.").startswith(
    "<|im_start|>system\nS.<|im_end|>\n"
  )
  assert (
    tokenizer_lib.render_prompt(f"  {q}\n", template="plain") == "Question: What is 2+3? Answer: "
  )
  assert tokenizer_lib.render_prompt(q, template="chatml_plain") == (
    "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
  )
  with pytest.raises(ValueError, match="unknown template"):
    tokenizer_lib.render_prompt(q, template="llama")
