"""Turn a growing list of token ids into text deltas without splitting UTF-8 characters.

Each step decodes only a short window (vLLM's prefix/read offsets), not the whole output, so the
cost per token does not grow with the length of the answer.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    WINDOW = 6  # tokens of context before the unread ones, so merges and spaces decode right

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids up to here are already in `text`
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the new text that is final so far."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        if full.endswith("\ufffd") or len(full) <= len(prefix) or not full.startswith(prefix):
            return ""  # an incomplete byte sequence (or nothing new): wait for the next token
        delta = full[len(prefix):]
        self.text += delta
        self._read = len(self._ids)
        self._prefix = max(0, self._read - self.WINDOW)
        return delta

    def flush(self) -> str:
        """At the end: whatever is left, even an incomplete character."""
        prefix = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        delta = full[len(prefix):] if full.startswith(prefix) else ""
        self.text += delta
        self._read = len(self._ids)
        return delta
