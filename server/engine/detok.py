"""Incremental detokenisation with stop strings.

Text is released only when it is final: not ending in a partial UTF-8
character and not a possible prefix of a stop string.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    """Decodes a growing token list without re-decoding all of it at every step.

    Each step decodes only a short window: the tokens from ``prefix`` on, and
    the text of the window's first (already released) part is subtracted. The
    window keeps the tokenizer's context (leading-space and byte-fallback
    rules), so the text equals a full decode; the cost per token stays flat
    instead of growing with the length of the generation.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids before this are in self.text
        self.text = ""  # decoded so far
        self.sent = 0  # chars of self.text already released
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _advance(self, final: bool = False) -> bool:
        """Move newly complete text into ``self.text``; False while a character is incomplete."""
        head = self._decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        full = self._decode(self.ids[self.prefix :])
        if full.endswith("\ufffd") and not final:
            return False  # wait for the rest of a multi-byte character
        if len(full) > len(head):
            self.text += full[len(head) :]
            self.prefix, self.read = self.read, len(self.ids)
        return True

    def add(self, token_id: int) -> str:
        """Add a token; return newly final text ('' if none). Sets ``stopped`` on a stop string."""
        self.ids.append(token_id)
        if not self._advance():
            return ""
        for s in self.stop:
            pos = self.text.find(s, max(0, self.sent - len(s) + 1))
            if pos != -1:
                self.stopped = True
                out = self.text[self.sent : pos] if pos > self.sent else ""
                self.sent = max(self.sent, pos)
                return out
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = len(self.text) - hold
        if end <= self.sent:
            return ""
        out = self.text[self.sent : end]
        self.sent = end
        return out

    def flush(self) -> str:
        """Release held-back text at the end of a generation that did not hit a stop string."""
        if self.stopped:
            return ""
        self._advance(final=True)
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out
