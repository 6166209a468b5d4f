"""Incremental detokenisation with stop strings.

Text is released only when it is final: not ending in a partial UTF-8
character and not a possible prefix of a stop string.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str]):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far (all generated ids)
        self.sent = 0  # chars of self.text already released
        self.stopped = False

    def _decode(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Add a token; return newly final text ('' if none). Sets ``stopped`` on a stop string."""
        self.ids.append(token_id)
        text = self._decode()
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of a multi-byte character
        self.text = text
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
        text = self._decode()
        out = text[self.sent :]
        self.sent = len(text)
        return out
