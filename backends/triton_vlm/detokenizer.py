"""Turn a growing list of token ids into text deltas without splitting UTF-8 characters."""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self.text = ""

    def _decode(self) -> str:
        return self._tokenizer.decode(self._ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the new text that is final so far."""
        self._ids.append(token_id)
        text = self._decode()
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""  # an incomplete byte sequence: wait for the next token
        delta, self.text = text[len(self.text):], text
        return delta

    def flush(self) -> str:
        """At the end: whatever is left, even an incomplete character."""
        text = self._decode()
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text += delta
        return delta
