"""Corpus reading, vocabulary, batchify and BPTT segments (trainer/text_data.py)."""

import numpy as np
import pytest

from conftest import PTB_DIR, TEXT_DIR, needs_ptb
from trainer import text_data

SHAKESPEARE = TEXT_DIR / "tiny_shakespeare.txt"


def write_corpus(directory, train="a b c\nb c\n", valid="a c\n", test="c b\n"):
  directory.mkdir(parents=True, exist_ok=True)
  for name, text in (("train", train), ("valid", valid), ("test", test)):
    (directory / f"{name}.txt").write_text(text)
  return directory


@needs_ptb
def test_ptb_has_the_published_counts():
  corpus = text_data.load_corpus("ptb", str(PTB_DIR))
  assert corpus.counts == text_data.CorpusCounts(929_589, 73_760, 82_430, 10_000)
  assert corpus.counts == text_data.PUBLISHED_COUNTS["ptb"]
  # AWD-LSTM's ids: order of first appearance in train.txt, <eos> after each line.
  assert corpus.vocab[:3] == ("aer", "banknote", "berlitz")
  assert corpus.vocab[corpus.train[24]] == text_data.EOS
  assert "<unk>" in corpus.vocab
  assert corpus.train.dtype == np.int32 and corpus.train.max() < 10_000


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not found")
def test_tiny_shakespeare_splits_like_tfds():
  corpus = text_data.load_corpus("tiny_shakespeare", str(SHAKESPEARE))
  assert corpus.level == "char"
  assert corpus.counts == text_data.CorpusCounts(1_003_854, 55_770, 55_770, 65)
  text = SHAKESPEARE.read_text()
  decoded = "".join(corpus.vocab[i] for i in corpus.test[:40])
  assert decoded == text[1_003_854 + 55_770:][:40]


def test_word_corpus_adds_eos_to_every_line_and_builds_vocab_from_train(tmp_path):
  corpus = text_data.load_word_corpus(str(write_corpus(tmp_path, train="a b\n\nb c\n")))
  assert corpus.vocab == ("a", "b", "<eos>", "c")
  np.testing.assert_array_equal(corpus.train, [0, 1, 2, 2, 1, 3, 2])  # The blank line is <eos>.
  np.testing.assert_array_equal(corpus.valid, [0, 3, 2])
  # The last line needs no final newline.
  corpus = text_data.load_word_corpus(str(write_corpus(tmp_path, train="a b\nc")))
  assert len(corpus.train) == 5


def test_count_mismatch_names_the_count(tmp_path):
  write_corpus(tmp_path)
  with pytest.raises(text_data.CorpusError, match=r"train: expected 929,589, found 7.*'words'"):
    text_data.load_corpus("ptb", str(tmp_path))
  assert text_data.load_corpus("words", str(tmp_path)).vocab_size == 4


@pytest.mark.parametrize("files, error, message", [
    ({"valid": ""}, text_data.CorpusError, r"valid\.txt is empty"),
    ({"test": "a zebra\n"}, text_data.CorpusError, r"test\.txt, line 1: word 'zebra'"),
    ({"train": b"a \xff\xfe b\n"}, text_data.CorpusError, "not UTF-8"),
    ({"train": "a\x00b\n"}, text_data.CorpusError, "NUL"),
])
def test_malformed_files_fail_clearly(tmp_path, files, error, message):
  write_corpus(tmp_path)
  for name, content in files.items():
    path = tmp_path / f"{name}.txt"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
  with pytest.raises(error, match=message):
    text_data.load_corpus("words", str(tmp_path))


def test_missing_files_fail_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    text_data.load_corpus("ptb", str(tmp_path / "nowhere"))
  write_corpus(tmp_path)
  (tmp_path / "test.txt").unlink()
  with pytest.raises(FileNotFoundError, match=r"no test file .* test\.txt"):
    text_data.load_corpus("words", str(tmp_path))
  with pytest.raises(ValueError, match="dataset='ptb2'"):
    text_data.load_corpus("ptb2", str(tmp_path))


def test_char_corpus_rejects_characters_unseen_in_train(tmp_path):
  write_corpus(tmp_path, train="abc\n", valid="abz\n", test="a\n")
  with pytest.raises(text_data.CorpusError, match=r"valid split .* \['z'\]"):
    text_data.load_corpus("chars", str(tmp_path))


def test_batchify_makes_contiguous_streams_and_drops_the_remainder():
  streams = text_data.batchify(np.arange(23), 4)
  np.testing.assert_array_equal(streams, np.arange(20).reshape(4, 5))
  with pytest.raises(ValueError, match="at least 2"):
    text_data.batchify(np.arange(5), 4)


def test_bptt_segments_tile_the_streams_with_awd_lstm_lengths():
  stream_length = 20_000
  segments = text_data.bptt_segments(stream_length, np.random.default_rng(0), bptt=70)
  starts, lengths = segments[:, 0], segments[:, 1]
  np.testing.assert_array_equal(starts[1:], starts[:-1] + lengths[:-1])  # Contiguous.
  assert starts[0] == 0 and starts[-1] + lengths[-1] == stream_length - 1  # All targets used.
  assert lengths[:-1].min() >= 5
  full = lengths[:-1] > 52  # Halved base lengths are ~35 +- 5, full ones ~70 +- 5.
  assert abs(full.mean() - 0.95) < 0.03
  assert abs(lengths[:-1][full].mean() - 69.5) < 1.0  # int() truncates N(70, 5).
  # The same generator state gives the same epoch.
  again = text_data.bptt_segments(stream_length, np.random.default_rng(0), bptt=70)
  np.testing.assert_array_equal(segments, again)


def test_segment_pads_and_shifts_targets():
  streams = np.arange(20).reshape(2, 10)
  batch = text_data.segment(streams, start=6, length=3, padded=5)
  np.testing.assert_array_equal(batch["inputs"], [[6, 7, 8, 0, 0], [16, 17, 18, 0, 0]])
  np.testing.assert_array_equal(batch["targets"], [[7, 8, 9, 0, 0], [17, 18, 19, 0, 0]])
  stacked = text_data.stacked_segments(streams, 4)
  np.testing.assert_array_equal(stacked["length"], [4, 4, 1])
  assert stacked["inputs"].shape == (3, 2, 4)
  assert text_data.padded_length(33, 16) == 48 and text_data.padded_length(32, 16) == 32


@needs_ptb
def test_unigram_perplexity_of_ptb_valid():
  corpus = text_data.load_corpus("ptb", str(PTB_DIR))
  assert 650 < text_data.unigram_perplexity(corpus.train, corpus.valid, 10_000) < 720
