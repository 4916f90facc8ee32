"""Loong's text tokenizer: a SentencePiece model, LLaMA's at paper size, one trained from the captions when tiny."""
from __future__ import annotations

import os

import pytest
import sentencepiece as spm

from datamodules.synthetic import attributes_for, caption_for
from modules.components import text_tokenizer as tt
from modules.components.text_tokenizer import TextTokenizer, text_tokenizer_path, train_text_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 512


@pytest.fixture(scope="module")
def captions() -> list[str]:
    """The embedded dataset's training captions, videos and images, as a tiny config would train on."""
    videos = [caption_for(*attributes_for(i)) for i in range(20000)]
    images = [caption_for(*attributes_for(i, image_mode=True)) for i in range(2000)]
    return videos + images


@pytest.fixture(scope="module")
def tokenizer(captions, tmp_path_factory) -> TextTokenizer:
    return train_text_tokenizer(captions, VOCAB, tmp_path_factory.mktemp("tokenizers"))


def test_trained_tokenizer_has_the_configured_size_and_llama_layout(tokenizer):
    assert tokenizer.vocab_size == VOCAB
    assert tokenizer.decode([]) == ""
    # LLaMA's special pieces: <unk> 0, <s> 1, </s> 2; encode adds neither <s> nor </s>
    assert tokenizer.pieces("a red circle") == ["▁a", "▁red", "▁circle"]
    assert 1 not in tokenizer.encode("a red circle") and 2 not in tokenizer.encode("a red circle")


def test_training_is_deterministic_across_cache_dirs(captions, tokenizer, tmp_path):
    other = train_text_tokenizer(captions, VOCAB, tmp_path)
    assert other.model_file != tokenizer.model_file
    assert other.model_file.read_bytes() == tokenizer.model_file.read_bytes()
    sample = captions[:50] + ["a magenta blob moving sideways"]
    assert other.encode_batch(sample) == tokenizer.encode_batch(sample)
    # the key is the captions as a multiset: another order is the same tokenizer
    assert text_tokenizer_path(reversed(captions), VOCAB, tmp_path) == other.model_file


def test_captions_round_trip(captions, tokenizer):
    for caption in sorted(set(captions)):
        ids = tokenizer.encode(caption)
        assert all(0 <= i < VOCAB for i in ids)
        assert tokenizer.decode(ids) == caption
    # every word of the synthetic captions is one piece
    assert len(tokenizer.encode("a yellow star rotating on a light background")) == 8
    # byte fallback: characters the captions never had still round-trip
    assert tokenizer.decode(tokenizer.encode("Ä 42 ümlauts, ok?")) == "Ä 42 ümlauts, ok?"


def test_cache_is_reused_without_retraining(captions, tmp_path, monkeypatch):
    first = train_text_tokenizer(captions[:3000], 300, tmp_path)
    mtime = os.stat(first.model_file).st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache holds the tokenizer")

    monkeypatch.setattr(tt.spm.SentencePieceTrainer, "train", no_training)
    second = train_text_tokenizer(captions[:3000], 300, tmp_path)
    assert second.model_file == first.model_file and os.stat(second.model_file).st_mtime_ns == mtime
    assert second.encode(captions[0]) == first.encode(captions[0])
    # only the model file is left (the temporary file was renamed)
    assert [p.name for p in first.model_file.parent.iterdir()] == ["tokenizer.model"]


def test_other_vocab_size_is_another_cache_entry(captions, tokenizer, tmp_path):
    assert text_tokenizer_path(captions, VOCAB, tmp_path) != text_tokenizer_path(captions, VOCAB - 1, tmp_path)
    assert text_tokenizer_path(captions, VOCAB, tmp_path) != text_tokenizer_path(captions[:-1], VOCAB, tmp_path)


def test_missing_paper_tokenizer_says_what_it_is(tmp_path):
    path = tmp_path / "llama" / "tokenizer.model"
    with pytest.raises(FileNotFoundError) as error:
        TextTokenizer(path, vocab_size=32000)
    message = str(error.value)
    assert str(path) in message and "LLaMA" in message and "SentencePiece" in message
    assert "train_text_tokenizer" in message


def test_piece_count_must_match_the_configured_vocabulary(tokenizer):
    with pytest.raises(ValueError, match=r"holds 512 pieces, but the configured text vocabulary is 32000"):
        TextTokenizer(tokenizer.model_file, vocab_size=32000)
    assert TextTokenizer(tokenizer.model_file, vocab_size=VOCAB).vocab_size == VOCAB


def test_foreign_sentencepiece_model_with_other_piece_count(captions, tmp_path):
    # a model made outside the project, straight with SentencePiece (as LLaMA's was), with the wrong size
    prefix = tmp_path / "other"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sorted(set(captions))), model_prefix=str(prefix),
                                   vocab_size=60, model_type="bpe", num_threads=1, minloglevel=2)
    assert TextTokenizer(f"{prefix}.model").vocab_size == 60
    with pytest.raises(ValueError, match=r"other.model holds 60 pieces, but the configured text vocabulary is 512"):
        TextTokenizer(f"{prefix}.model", vocab_size=512)


def test_serialised_model_round_trips_and_garbage_is_refused(tokenizer, tmp_path):
    again = TextTokenizer.from_bytes(tokenizer.model_bytes, vocab_size=VOCAB)
    assert again.encode("a blue cross growing") == tokenizer.encode("a blue cross growing")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        TextTokenizer(bad)


def test_impossible_vocabulary_size_is_a_clear_error(captions, tmp_path):
    with pytest.raises(ValueError, match=r"could not train a 5000-piece text tokenizer on 22000 captions"):
        train_text_tokenizer(captions, 5000, tmp_path)
    with pytest.raises(ValueError, match="no non-empty captions"):
        train_text_tokenizer(["", ""], VOCAB, tmp_path)
    assert not any(tmp_path.rglob("*.model")) and not any(tmp_path.rglob("*.tmp"))
