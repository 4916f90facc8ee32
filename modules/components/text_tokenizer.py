"""The text tokenizer of Loong's language model (Wang et al. 2024, section 4.1): a SentencePiece model.

Loong trains its LLaMA-architecture model from scratch but keeps LLaMA's text vocabulary: 32,000 SentencePiece
pieces, ids [0, 32000) of the unified vocabulary (`modules/components/loong_sequence.py`). One class serves both
sizes:

- paper size: LLaMA's `tokenizer.model`, a local file named in the config (`TextTokenizer(path, vocab_size=32000)`);
- tiny configs: a small BPE model the project trains itself from the training captions on first use
  (`train_text_tokenizer`), cached under `.cache/t2v/text_tokenizers/<key>/tokenizer.model` and read back by the
  same class. The trainer settings follow LLaMA's tokenizer (BPE, byte fallback, identity normalisation, digits
  split), so a tiny model is the paper's tokenizer in small.

Ids are SentencePiece's own: `<unk>` 0, `<s>` 1, `</s>` 2 (LLaMA's layout). The language model does not use `<s>` and
`</s>`; its sequence has its own `<sot>`/`<eot>` special tokens. A language-model checkpoint depends on the exact
tokenizer: keep `model_bytes` with it (`TextTokenizer.from_bytes` reads them back), since retraining a tiny
tokenizer with another sentencepiece version is not guaranteed to give the same pieces.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

#: LLaMA's text vocabulary, the paper's (section 4.1)
PAPER_TEXT_VOCAB = 32000
DEFAULT_CACHE_DIR = Path(".cache/t2v/text_tokenizers")
MODEL_NAME = "tokenizer.model"
#: bump when the trainer settings below change, so cached tokenizers of other settings are not reused
FORMAT_VERSION = 1
# LLaMA's trainer settings (its tokenizer.model's trainer_spec), except character_coverage: a tiny caption corpus
# keeps every character it has (LLaMA: 0.99995), the rest go through byte fallback.
_TRAINER_SETTINGS = dict(
    model_type="bpe",
    character_coverage=1.0,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    split_digits=True,
    split_by_unicode_script=True,
    split_by_number=True,
    split_by_whitespace=True,
    allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)
TRAIN_HINT = (
    "for a small model, train a tokenizer from the training captions instead "
    "(modules.components.text_tokenizer.train_text_tokenizer(captions, vocab_size, cache_dir): "
    "seconds on a CPU, cached on disk)"
)


class TextTokenizer:
    """A SentencePiece model: `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size` pieces.

    `vocab_size`, when given, is the configured text vocabulary; a model with another piece count is refused (the
    language model's embedding and output layers are sized by the configuration, so ids would not line up).
    """

    def __init__(self, model_file: str | Path, vocab_size: int | None = None):
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(
                f"text tokenizer not found: {path}. It is a SentencePiece model in LLaMA's format (LLaMA's "
                f"`tokenizer.model`, {PAPER_TEXT_VOCAB} pieces, shipped with the LLaMA weights); put it there or point "
                f"the config at it, or {TRAIN_HINT}"
            )
        self._init(path.read_bytes(), vocab_size, source=str(path))
        self.model_file: Path | None = path

    @classmethod
    def from_bytes(cls, data: bytes, vocab_size: int | None = None, source: str = "<bytes>") -> TextTokenizer:
        """A tokenizer from a serialised model (`model_bytes`, e.g. as stored in a checkpoint)."""
        tokenizer = cls.__new__(cls)
        tokenizer._init(bytes(data), vocab_size, source)
        tokenizer.model_file = None
        return tokenizer

    def _init(self, data: bytes, vocab_size: int | None, source: str) -> None:
        self._processor = spm.SentencePieceProcessor()
        try:
            self._processor.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as error:
            raise ValueError(f"{source} is not a SentencePiece model ({error})") from error
        self.model_bytes = data
        self.source = source
        pieces = self._processor.get_piece_size()
        if vocab_size is not None and pieces != vocab_size:
            raise ValueError(
                f"text tokenizer {source} holds {pieces} pieces, but the configured text vocabulary is {vocab_size}: "
                f"set the text vocabulary to {pieces} or use the tokenizer made for {vocab_size} pieces "
                f"(LLaMA's tokenizer.model has {PAPER_TEXT_VOCAB})"
            )

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Piece ids of `text`, without `<s>`/`</s>`."""
        return self._processor.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._processor.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._processor.decode([int(i) for i in ids])

    def pieces(self, text: str) -> list[str]:
        """The pieces of `text` as strings (to read what the tokenizer does)."""
        return self._processor.encode(text, out_type=str)

    def __repr__(self) -> str:
        return f"TextTokenizer({self.source!r}, vocab_size={self.vocab_size})"


def _cache_key(captions: Sequence[str], vocab_size: int, byte_fallback: bool) -> str:
    digest = hashlib.sha256()
    settings = {"vocab_size": vocab_size, "byte_fallback": byte_fallback, "format": FORMAT_VERSION,
                "trainer": _TRAINER_SETTINGS}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for caption in captions:  # length-prefixed: no two caption lists hash alike by where they split
        data = caption.encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    return f"bpe{vocab_size}-{digest.hexdigest()[:16]}"


def text_tokenizer_path(captions: Iterable[str], vocab_size: int, cache_dir: str | Path = DEFAULT_CACHE_DIR,
                        byte_fallback: bool = True) -> Path:
    """Where `train_text_tokenizer` keeps the tokenizer of these captions and settings."""
    corpus = sorted(c for c in captions if c)
    return Path(cache_dir) / _cache_key(corpus, vocab_size, byte_fallback) / MODEL_NAME


def train_text_tokenizer(captions: Iterable[str], vocab_size: int, cache_dir: str | Path = DEFAULT_CACHE_DIR,
                         byte_fallback: bool = True) -> TextTokenizer:
    """A BPE tokenizer of exactly `vocab_size` pieces trained on `captions`, cached on disk and reused.

    The cache key is a hash of the captions (as a multiset: their order does not matter, so the same data in another
    order reuses the same tokenizer), the vocabulary size and the trainer settings. Training is deterministic (one
    thread, every sentence, sorted input), a fraction of a second for 20k short captions, and writes atomically (a
    temporary file renamed into place), so an interrupted run leaves no half file and processes training at the same
    time write the same bytes.

    `byte_fallback` (LLaMA's setting) spells characters the captions never had as UTF-8 byte pieces, so any prompt
    round-trips; it takes 256 + 3 ids, so `vocab_size` must be above ~300. Without it unseen characters become
    `<unk>`. A `vocab_size` larger than the captions can fill is an error that says the largest possible.
    """
    corpus = sorted(c for c in captions if c)
    if not corpus:
        raise ValueError("train_text_tokenizer: no non-empty captions to train on")
    path = Path(cache_dir) / _cache_key(corpus, vocab_size, byte_fallback) / MODEL_NAME
    if path.is_file():
        return TextTokenizer(path, vocab_size)

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_writer=model,
            vocab_size=vocab_size,
            byte_fallback=byte_fallback,
            num_threads=1,
            input_sentence_size=0,  # every sentence, no sampling
            shuffle_input_sentence=False,
            minloglevel=2,
            **_TRAINER_SETTINGS,
        )
    except RuntimeError as error:
        raise ValueError(
            f"could not train a {vocab_size}-piece text tokenizer on {len(corpus)} captions "
            f"({len(set(corpus))} distinct): {str(error).rstrip('.')}. The vocabulary needs an id per character of "
            f"the captions{' plus 259 for byte fallback and the special pieces' if byte_fallback else ''}, and can "
            "hold no more pieces than the captions can be merged into"
        ) from error

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)
    return TextTokenizer(path, vocab_size)
