"""Token ids as bytes and text, and where each token starts in a text, for byte-level BPE tokenizers.

GPT-2's byte-level BPE maps every byte to a printable character; a token's
bytes are those characters mapped back. A token whose bytes are not whole
UTF-8 characters (half of a multi-byte character) is written as OpenAI writes
it: `bytes:` followed by `\\xNN` escapes. Used wherever tokens are shown with
their log-probabilities (`pitchkeras generate --logprobs`, the servers).

Example:

>>> texts = TokenTexts.of(model.tokenizer)
>>> texts.text(464)
'The'
"""

from __future__ import annotations

import codecs
import weakref
from typing import Iterable

_BY_TOKENIZER: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> TokenTexts


class TokenTexts:
    """The bytes and the display text of token ids, for one byte-level BPE tokenizer (cached per id).

    Args:
        tokenizer: keras_hub.tokenizers.BytePairTokenizer. GPT-2's, or one trained like it.
    """

    def __init__(self, tokenizer):
        from keras_hub.src.tokenizers.byte_pair_tokenizer import bytes_to_unicode  # keras-hub's own table

        byte_values, characters = bytes_to_unicode()
        self._byte_of = dict(zip(characters, byte_values))
        self._tokenizer = tokenizer
        self._bytes: dict[int, bytes] = {}

    @classmethod
    def of(cls, tokenizer) -> "TokenTexts":
        """The shared instance for `tokenizer` (its cache outlives one call)."""
        if tokenizer not in _BY_TOKENIZER:
            _BY_TOKENIZER[tokenizer] = cls(tokenizer)
        return _BY_TOKENIZER[tokenizer]

    def bytes(self, token_id: int) -> bytes:
        """The token's bytes (a special token such as `<|endoftext|>`: its name as UTF-8)."""
        token_id = int(token_id)
        if token_id not in self._bytes:
            piece = self._tokenizer.id_to_token(token_id)
            if all(ch in self._byte_of for ch in piece):
                self._bytes[token_id] = b"".join(self._byte_of[ch] for ch in piece)
            else:
                self._bytes[token_id] = piece.encode("utf-8")
        return self._bytes[token_id]

    def text(self, token_id: int) -> str:
        """The token's text; `bytes:\\xNN...` when its bytes are not whole UTF-8 characters."""
        data = self.bytes(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class TextOffsets:
    """Where each token starts in the text the tokens decode to, in characters, token after token.

    A token that begins inside a multi-byte character starts where that
    character starts, as the text holds the character only once it is whole
    (the engine's deltas do the same); invalid bytes count as one U+FFFD each,
    as the detokenizer writes them. One instance follows one text across the
    deltas of a stream.

    Args:
        start: int. The offset of the first token (the length of an echoed prompt).
    """

    def __init__(self, start: int = 0):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.position = start

    def of(self, token_bytes: Iterable[bytes]) -> list[int]:
        """The offsets of the next tokens (given as their bytes)."""
        offsets = []
        for data in token_bytes:
            offsets.append(self.position)
            self.position += len(self._decoder.decode(data))
        return offsets


def logprob_records(logprobs: Iterable, texts: TokenTexts) -> list[dict]:
    """The engine's `TokenLogprob`s as JSON-ready dicts, named as `pitchkeras.v1.TokenLogprob`'s fields:
    `token_id`, `token`, `logprob`, `top_logprobs` (each `token_id`, `token`, `logprob`)."""
    return [
        {"token_id": int(entry.token_id), "token": texts.text(entry.token_id), "logprob": float(entry.logprob),
         "top_logprobs": [{"token_id": int(i), "token": texts.text(i), "logprob": float(lp)} for i, lp in entry.top]}
        for entry in logprobs
    ]
