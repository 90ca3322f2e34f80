"""Train the caption tokenizer: a `tokenizers` BPE model saved as `tokenizer.json`."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Fixed ids, matching FsgrPmaConfig's defaults (pad 0, bos 1, eos 2).
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def train_caption_tokenizer(captions: Iterable[str], vocab_size: int = 10000) -> PreTrainedTokenizerFast:
    """Train a lowercase word-boundary BPE on `captions`; encodings are wrapped as `<bos> ... <eos>`."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, end_of_word_suffix="</w>")
    tokenizer.train_from_iterator(captions, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
