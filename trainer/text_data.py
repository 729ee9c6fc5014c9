"""Text corpora for language modelling: reading, vocabulary, batchify, BPTT segments.

Word-level corpora are in the Mikolov plain-text format used by AWD-LSTM:
`train.txt`, `valid.txt`, `test.txt`, whitespace-separated tokens, rare words
already replaced by `<unk>`; every line, blank ones included, ends with an
`<eos>` token, and the vocabulary is that of the training file (ids in order
of first appearance, as AWD-LSTM's `data.Corpus` assigns them).

Character-level corpora treat every character, newlines included, as a
token. Tiny Shakespeare is one file, split 90% / 5% / 5% into train /
validation / test exactly as the tfds `tiny_shakespeare` dataset splits it.

A corpus becomes B parallel streams (`batchify`); training walks them in
segments of AWD-LSTM's random length (`bptt_segments`), evaluation in fixed
ones (`fixed_segments`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping, NamedTuple

import numpy as np

EOS = "<eos>"
SPLITS = ("train", "valid", "test")
# Other names the same files go by: the PTB tarball and the WikiText-2 zip.
_ALTERNATIVE_NAMES = {
    "train": ("ptb.train.txt", "wiki.train.tokens"),
    "valid": ("ptb.valid.txt", "wiki.valid.tokens"),
    "test": ("ptb.test.txt", "wiki.test.tokens"),
}
CHAR_SPLIT_FRACTION = 0.9  # tfds tiny_shakespeare: the first 90% trains, the rest halves.


class CorpusCounts(NamedTuple):
  """Token counts of the three splits (with `<eos>` for word corpora) and vocabulary size."""

  train: int
  valid: int
  test: int
  vocab: int


# As published: PTB (Mikolov et al. 2010, the counts AWD-LSTM reports),
# WikiText-2 (Merity et al. 2016) and tfds's tiny_shakespeare.
PUBLISHED_COUNTS: Mapping[str, CorpusCounts] = {
    "ptb": CorpusCounts(train=929_589, valid=73_760, test=82_430, vocab=10_000),
    "wikitext2": CorpusCounts(train=2_088_628, valid=217_646, test=245_569, vocab=33_278),
    "tiny_shakespeare": CorpusCounts(train=1_003_854, valid=55_770, test=55_770, vocab=65),
}
# dataset name -> token level. 'words' and 'chars' are any corpus of that
# level; their counts are not checked.
DATASETS: Mapping[str, str] = {
    "ptb": "word",
    "wikitext2": "word",
    "words": "word",
    "tiny_shakespeare": "char",
    "chars": "char",
}


class CorpusError(ValueError):
  """A corpus file is empty, malformed, or does not match the published counts."""


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A tokenised corpus.

  Attributes:
    name: the dataset name it was loaded as.
    level: 'word' or 'char'.
    vocab: token string of every id; `vocab[i]` is token i.
    train, valid, test: int32 token ids, 1-D.
  """

  name: str
  level: str
  vocab: tuple[str, ...]
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  @property
  def counts(self) -> CorpusCounts:
    return CorpusCounts(len(self.train), len(self.valid), len(self.test), self.vocab_size)

  def split(self, name: str) -> np.ndarray:
    if name not in SPLITS:
      raise ValueError(f"split={name!r}; valid: {list(SPLITS)}")
    return getattr(self, name)


# ---------------------------------------------------------------------------
# Reading.


def load_corpus(dataset: str, data_dir: str, num_train_tokens: int = 0,
                num_eval_tokens: int = 0) -> Corpus:
  """Loads `dataset` from `data_dir` and checks it against the published counts.

  Args:
    dataset: a key of `DATASETS`. 'ptb', 'wikitext2' and 'tiny_shakespeare'
      must match `PUBLISHED_COUNTS`; 'words' and 'chars' load any corpus.
    data_dir: for word corpora, the directory holding train/valid/test; for
      character corpora, either one text file (split 90/5/5) or a directory
      holding train.txt, valid.txt and test.txt.
    num_train_tokens, num_eval_tokens: > 0: keep only the first this many
      tokens of the training text, and of the validation and test texts
      (after the counts are checked).

  Raises:
    FileNotFoundError: a file is missing.
    CorpusError: a file is empty or malformed, or the counts differ from
      the published ones.
  """
  if dataset not in DATASETS:
    raise ValueError(f"dataset={dataset!r}; valid: {sorted(DATASETS)}")
  if DATASETS[dataset] == "word":
    corpus = load_word_corpus(data_dir, name=dataset)
  else:
    corpus = load_char_corpus(data_dir, name=dataset)
  if dataset in PUBLISHED_COUNTS:
    check_counts(corpus, PUBLISHED_COUNTS[dataset])
  if num_train_tokens or num_eval_tokens:
    cut = lambda x, n: x[:n] if n else x
    corpus = dataclasses.replace(
        corpus, train=cut(corpus.train, num_train_tokens), valid=cut(corpus.valid, num_eval_tokens),
        test=cut(corpus.test, num_eval_tokens))
  return corpus


def load_word_corpus(directory: str, name: str = "words") -> Corpus:
  """Reads a Mikolov-format word corpus: vocabulary from train, `<eos>` after every line."""
  paths = {split: _find_split_file(directory, split) for split in SPLITS}
  lines = {split: _read_lines(path) for split, path in paths.items()}

  word_to_id: dict[str, int] = {}
  for line in lines["train"]:
    for word in line.split() + [EOS]:
      word_to_id.setdefault(word, len(word_to_id))

  ids = {}
  for split, split_lines in lines.items():
    tokens = []
    for line_number, line in enumerate(split_lines, start=1):
      for word in line.split() + [EOS]:
        token = word_to_id.get(word)
        if token is None:
          raise CorpusError(
              f"{paths[split]}, line {line_number}: word {word!r} is not in the training "
              "vocabulary. The Mikolov format has a closed vocabulary (rare words are "
              "already <unk> in every split); is this file preprocessed?")
        tokens.append(token)
    ids[split] = np.asarray(tokens, np.int32)
  vocab = tuple(sorted(word_to_id, key=word_to_id.get))
  return Corpus(name=name, level="word", vocab=vocab, **ids)


def load_char_corpus(path: str, name: str = "chars") -> Corpus:
  """Reads a character corpus: one file split 90/5/5, or a train/valid/test directory.

  The vocabulary is the sorted set of the training characters.
  """
  if os.path.isdir(path):
    texts = {split: _read_text(_find_split_file(path, split)) for split in SPLITS}
  else:
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"character corpus {path!r} not found; give a text file (split 90/5/5) or a "
          "directory holding train.txt, valid.txt and test.txt.")
    text = _read_text(path)
    if len(text) < 20:
      raise CorpusError(f"{path}: {len(text)} characters is too short to split 90/5/5.")
    train_end = int(len(text) * CHAR_SPLIT_FRACTION)
    valid_end = train_end + (len(text) - train_end) // 2
    texts = {"train": text[:train_end], "valid": text[train_end:valid_end],
             "test": text[valid_end:]}

  vocab = tuple(sorted(set(texts["train"])))
  char_to_id = {c: i for i, c in enumerate(vocab)}
  ids = {}
  for split, text in texts.items():
    unknown = set(text) - char_to_id.keys()
    if unknown:
      raise CorpusError(
          f"the {split} split of {path!r} holds characters absent from the training split: "
          f"{sorted(unknown)[:10]}; the vocabulary comes from the training text.")
    ids[split] = np.fromiter((char_to_id[c] for c in text), np.int32, len(text))
  return Corpus(name=name, level="char", vocab=vocab, **ids)


def check_counts(corpus: Corpus, expected: CorpusCounts) -> None:
  """Raises CorpusError naming every count that differs from `expected`."""
  found = corpus.counts
  wrong = [f"{field}: expected {want:,}, found {got:,}"
           for field, want, got in zip(CorpusCounts._fields, expected, found) if want != got]
  if wrong:
    raise CorpusError(
        f"the {corpus.name!r} corpus does not have the published size ("
        + "; ".join(wrong) + "). Is it the standard preprocessed version? To train on "
        f"another corpus use dataset='{'words' if corpus.level == 'word' else 'chars'}'.")


def _find_split_file(directory: str, split: str) -> str:
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f"corpus directory {directory!r} not found; it must hold train.txt, valid.txt "
        "and test.txt (Mikolov format: one sentence per line).")
  for name in (f"{split}.txt",) + _ALTERNATIVE_NAMES[split]:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"no {split} file in {directory!r}: expected {split}.txt (or one of "
      f"{list(_ALTERNATIVE_NAMES[split])}).")


def _read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise CorpusError(f"{path} is not UTF-8 text ({e}).") from None
  if "\x00" in text:
    raise CorpusError(f"{path} holds NUL bytes; it is not a text file.")
  if not text.strip():
    raise CorpusError(f"{path} is empty.")
  return text


def _read_lines(path: str) -> list[str]:
  # Split on '\n' only: str.splitlines() would also break lines at the
  # unicode separators some WikiText lines contain, changing the <eos> count.
  lines = _read_text(path).split("\n")
  if lines[-1] == "":
    lines.pop()  # The newline ending the last line does not start another.
  return lines


# ---------------------------------------------------------------------------
# Streams and segments.


def batchify(tokens: np.ndarray, batch_size: int) -> np.ndarray:
  """Cuts a token sequence into `batch_size` contiguous streams, `[B, N // B]`.

  Stream b is `tokens[b * L : (b + 1) * L]`; the last `N mod B` tokens are
  dropped, as AWD-LSTM's `batchify` drops them.
  """
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}; must be a positive int")
  length = len(tokens) // batch_size
  if length < 2:
    raise ValueError(
        f"{len(tokens)} tokens give streams of {length} tokens at batch size {batch_size}; "
        "a stream needs at least 2 (an input and its target).")
  return np.asarray(tokens[:length * batch_size], np.int32).reshape(batch_size, length)


def bptt_segments(stream_length: int, rng: np.random.Generator, *, bptt: int,
                  full_probability: float = 0.95, std: float = 5.0,
                  min_length: int = 5) -> np.ndarray:
  """AWD-LSTM's variable-length BPTT segments of one epoch, `[N, 2]` (start, length).

  Each segment's base length is `bptt` with probability `full_probability`,
  else `bptt / 2`; its length is `max(min_length, int(Normal(base, std)))`,
  cut short at the end of the streams. Segment n covers inputs
  `[start, start + length)` and targets one token later, so the segments
  tile positions `0 .. stream_length - 2`.
  """
  if stream_length < 2:
    raise ValueError(f"stream_length={stream_length}; must be >= 2")
  # Each segment is at least min_length long, so this many draws always suffice.
  max_segments = (stream_length - 1) // min_length + 1
  base = np.where(rng.random(max_segments) < full_probability, bptt, bptt / 2.0)
  lengths = np.maximum(min_length, rng.normal(base, std).astype(np.int64))
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  # AWD-LSTM's loop condition: `while i < len(data) - 1 - 1`.
  keep = starts < stream_length - 2
  starts, lengths = starts[keep], lengths[keep]
  lengths = np.minimum(lengths, stream_length - 1 - starts)
  return np.stack([starts, lengths], axis=1)


def fixed_segments(stream_length: int, seq_len: int) -> np.ndarray:
  """Segments of `seq_len` tokens (the last one shorter), `[N, 2]` (start, length)."""
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len}; must be >= 1")
  starts = np.arange(0, stream_length - 1, seq_len)
  lengths = np.minimum(seq_len, stream_length - 1 - starts)
  return np.stack([starts, lengths], axis=1)


def padded_length(length: int, bucket: int) -> int:
  """`length` rounded up to a multiple of `bucket`: one compiled step per bucket."""
  return -(-length // bucket) * bucket


def segment(streams: np.ndarray, start: int, length: int, padded: int) -> dict[str, np.ndarray]:
  """Inputs and next-token targets of one segment, zero-padded to `padded` steps.

  Returns:
    {'inputs': int32 [B, padded], 'targets': int32 [B, padded]}; only the
    first `length` steps are real.
  """
  if not 1 <= length <= padded:
    raise ValueError(f"length={length} must be in [1, padded={padded}]")
  inputs = np.zeros((streams.shape[0], padded), np.int32)
  targets = np.zeros_like(inputs)
  inputs[:, :length] = streams[:, start:start + length]
  targets[:, :length] = streams[:, start + 1:start + 1 + length]
  return {"inputs": inputs, "targets": targets}


def stacked_segments(streams: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """Every fixed-length segment of the streams, stacked for a scan.

  Returns:
    {'inputs', 'targets': int32 [N, B, seq_len], 'length': int32 [N]}; the
    last segment is zero-padded past its `length`.
  """
  segments = fixed_segments(streams.shape[1], seq_len)
  parts = [segment(streams, int(s), int(n), seq_len) for s, n in segments]
  return {
      "inputs": np.stack([p["inputs"] for p in parts]),
      "targets": np.stack([p["targets"] for p in parts]),
      "length": segments[:, 1].astype(np.int32),
  }


def unigram_perplexity(train: np.ndarray, tokens: np.ndarray, vocab_size: int) -> float:
  """Perplexity of `tokens` under the unigram distribution of `train` (add-one smoothed).

  The reference a language model has to beat: exp(-mean_t log p(w_t)).
  """
  counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
  log_probs = np.log(counts) - np.log(counts.sum())
  return float(math.exp(-log_probs[tokens].mean()))
