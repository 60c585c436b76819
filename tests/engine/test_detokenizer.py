"""Tests of engine.detokenizer: deltas over byte-level BPE with characters split across tokens."""
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from crosspool_jax.engine.detokenizer import IncrementalDetokenizer

_CORPUS = "héllo wörld, naïve café. 日本語のテキスト 🙂🚀 € — the quick brown fox jumps "


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE small enough that CJK, emoji and € span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS * 4], trainer)
    return tok


def _stream(detok, ids, chunk_sizes):
    deltas, i = [], 0
    for n in chunk_sizes:
        deltas.append(detok.add(ids[i:i + n]))
        i += n
        assert detok.text == "".join(deltas)
    return deltas


def test_multibyte_characters_split_across_tokens(bpe):
    text = "café 日本語 🙂🚀 €!"
    ids = bpe.encode(text).ids
    pieces = [bpe.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # the test really splits characters
    detok = IncrementalDetokenizer(bpe, bpe.encode("the quick").ids)
    deltas = _stream(detok, ids, [1] * len(ids))
    assert detok.text == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # held back while a character was incomplete
    assert detok.output_token_ids == ids


def test_random_token_streams_match_full_decode(bpe):
    rng = np.random.default_rng(0)
    words = _CORPUS.split(" ")
    for trial in range(30):
        text = " ".join(rng.choice(words, size=rng.integers(1, 12)))
        ids = bpe.encode(text).ids
        prompt = bpe.encode(" ".join(rng.choice(words, size=rng.integers(0, 4)))).ids
        sizes, left = [], len(ids)
        while left:
            sizes.append(int(min(left, rng.integers(1, 4))))
            left -= sizes[-1]
        detok = IncrementalDetokenizer(bpe, prompt)
        deltas = _stream(detok, ids, sizes)
        assert detok.text == bpe.decode(ids), trial
        assert all("\ufffd" not in d for d in deltas)
        # Every intermediate text is a prefix of the final one (nothing is taken back).
        acc = ""
        for d in deltas:
            acc += d
            assert text.startswith(acc)


def test_special_tokens_skipped_or_kept(bpe):
    eos = bpe.token_to_id("<eos>")
    ids = bpe.encode("naïve café").ids + [eos]
    skip = IncrementalDetokenizer(bpe, [], skip_special_tokens=True)
    _stream(skip, ids, [1] * len(ids))
    assert skip.text == "naïve café"
    keep = IncrementalDetokenizer(bpe, [], skip_special_tokens=False)
    _stream(keep, ids, [2] * (len(ids) // 2) + [1] * (len(ids) % 2))
    assert keep.text == "naïve café<eos>"


def test_flush_emits_a_trailing_incomplete_character(bpe):
    ids = bpe.encode("ok 🙂").ids
    detok = IncrementalDetokenizer(bpe, [])
    for i in ids[:-1]:
        detok.add([i])
    assert detok.text.startswith("ok") and "ok ".startswith(detok.text)  # emoji bytes held back
    assert "\ufffd" in detok.flush()
    assert detok.text == bpe.decode(ids[:-1]) and detok.text.endswith("\ufffd")
    assert detok.flush() == ""


def test_prompt_tail_with_partial_character_is_not_used_as_context(bpe):
    ids = bpe.encode("日本").ids
    detok = IncrementalDetokenizer(bpe, ids[:1])  # the prompt ends inside a character
    out = bpe.encode(" fox").ids
    _stream(detok, out, [1] * len(out))
    assert detok.text == " fox"


class _Metaspace:
    """A SentencePiece-like fake: '▁' is a space, and decode drops the text's leading space."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(self.pieces[i] for i in ids).replace("\u2581", " ")
        return text[1:] if text.startswith(" ") else text


def test_prompt_context_keeps_the_first_tokens_leading_space():
    tok = _Metaspace(["\u2581Hello", "\u2581world", "!", "\u2581again"])
    detok = IncrementalDetokenizer(tok, [0])
    assert detok.add([1]) == " world"
    assert detok.add([2, 3]) == "! again"
    assert IncrementalDetokenizer(tok, []).add([1]) == "world"


def test_rejects_object_without_decode():
    with pytest.raises(ValueError, match="tokenizer"):
        IncrementalDetokenizer(object(), [])
