"""A character-level tokenizer for the testbed tasks (pure Python), with ``to_hf()`` for transformers engines.

Ids: 0 ``<pad>``, 1 ``<eos>``, 2 ``<bos>``, then one id per character of ``ALPHABET``. Nothing comes from a hub.
"""
from __future__ import annotations

ALPHABET = "0123456789 +-*/=,>:"
SPECIALS = ("<pad>", "<eos>", "<bos>")


class CharTokenizer:
    pad_id, eos_id, bos_id = 0, 1, 2

    def __init__(self, alphabet: str = ALPHABET) -> None:
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated characters")
        self.alphabet = alphabet
        self.itos = list(SPECIALS) + list(alphabet)
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, eos: bool = False) -> list[int]:
        try:
            ids = [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer's alphabet {self.alphabet!r}") from None
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids, stop_at_eos: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id and stop_at_eos:
                break
            if i < len(SPECIALS):
                continue
            out.append(self.itos[i])
        return "".join(out)

    def to_hf(self):
        """The same vocabulary as a ``transformers.PreTrainedTokenizerFast`` (built with ``tokenizers``)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel(vocab=dict(self.stoi), unk_token="<pad>"))
        tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        tok.decoder = decoders.Fuse()
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
        hf.padding_side = "left"
        return hf
