"""Train the caption tokenizer: a `tokenizers` BPE model saved as `tokenizer.json`."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Fixed ids, matching FsgrPmaConfig's defaults (pad 0, bos 1, eos 2).
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]

# The pre-tokenizer splits punctuation into words of its own ("ring," → "ring" ","), so the BPE decoder puts a space
# before it; these rewrites close the spaces again on the decoded string: "ring , a" → "ring, a",
# "man ' s" → "man's", "t - shirt" → "t-shirt". The same list as transformers' `clean_up_tokenization` plus hyphens, colons and brackets.
JOINS = [
    (" ,", ","), (" .", "."), (" !", "!"), (" ?", "?"), (" ;", ";"), (" :", ":"), (" )", ")"), ("( ", "("),
    (" ' ", "'"), (" - ", "-"),
]


def caption_decoder() -> decoders.Decoder:
    """BPE word-end suffixes to spaces, then punctuation written as in the captions: `there is a red ring, a ...`.

    Stored in `tokenizer.json`, so every loader of the saved tokenizer (transformers, `tokenizers`, the remote-code
    processor) decodes the same way.
    """
    steps = [decoders.BPEDecoder(suffix="</w>"), decoders.Fuse()]  # Fuse: one string, so rewrites see across tokens
    return decoders.Sequence(steps + [decoders.Replace(old, new) for old, new in JOINS])


def train_caption_tokenizer(captions: Iterable[str], vocab_size: int = 10000) -> PreTrainedTokenizerFast:
    """Train a lowercase word-boundary BPE on `captions`; encodings are wrapped as `<bos> ... <eos>`."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = caption_decoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, end_of_word_suffix="</w>")
    tokenizer.train_from_iterator(captions, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
