"""The incremental detokenizer gives the text a whole decode gives, token by token: for the embedded
backbone's byte-level BPE and for a SentencePiece-style tokenizer (Metaspace, byte fallback: the
leading-space rule Llama-2's tokenizer has), on real text and on random ids (unfinished and invalid
UTF-8 characters, special tokens)."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lamp_runtime.engine.detokenize import IncrementalDetokenizer

TEXTS = ["Once upon a time, naïve café owners sold crème brûlée (東京, 🎉) for 3.50€!",
         "Hello world. It's a test, isn't it?  Two  spaces,\nnew lines\tand tabs."]


def sentencepiece_style(clean_up: bool = False) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained here with Llama-2's decoder: ▁ for spaces, byte-fallback tokens,
    the first token's leading space stripped."""
    model = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    model.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=clean_up)


@pytest.fixture(scope="module", params=["byte-level", "sentencepiece"])
def tokenizer(request, backbone):
    return backbone.tokenizer if request.param == "byte-level" else sentencepiece_style()


def whole(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def check_stream(tokenizer, ids: list[int]) -> None:
    """At every step the text is the whole decode, short of an unfinished last character at most."""
    tokens: list[int] = []
    detokenizer = IncrementalDetokenizer(tokenizer, tokens)
    for token in ids:
        tokens.append(token)
        text, expected = detokenizer.update(), whole(tokenizer, tokens)
        if expected.endswith("\ufffd"):
            assert expected.startswith(text), (tokens, text, expected)
        else:
            assert text == expected, (tokens, text, expected)
    assert detokenizer.final() == whole(tokenizer, tokens)


def test_real_text_token_by_token(tokenizer):
    for text in TEXTS:
        check_stream(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])


def test_random_ids(tokenizer):
    rng = random.Random(3)
    for _ in range(60):
        check_stream(tokenizer, [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))])


def test_decodes_a_window_not_the_whole_answer(backbone):
    """The point of it: a step decodes the last few tokens, however long the answer."""
    calls = []

    class Counting:
        clean_up_tokenization_spaces = False

        def decode(self, ids, skip_special_tokens):
            calls.append(len(ids))
            return backbone.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    tokens: list[int] = []
    detokenizer = IncrementalDetokenizer(Counting(), tokens)
    for token in backbone.tokenizer(TEXTS[1] * 4, add_special_tokens=False)["input_ids"]:
        tokens.append(token)
        detokenizer.update()
    assert len(tokens) > 40 and max(calls) <= 4


def test_tokenizers_that_clean_up_spaces_decode_whole():
    """Cleaning up " ." after joining reads across a window's edge: such tokenizers decode whole."""
    tokenizer = sentencepiece_style(clean_up=True)
    ids = tokenizer("Hello world . It 's a test , isn't it ?", add_special_tokens=False)["input_ids"]
    tokens: list[int] = []
    detokenizer = IncrementalDetokenizer(tokenizer, tokens)
    assert not detokenizer.incremental
    for token in ids:
        tokens.append(token)
        assert detokenizer.update() == whole(tokenizer, tokens)
