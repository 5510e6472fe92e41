"""Incremental detokenization for stop strings (SGLang semantics: the text is cut before the matched stop
string unless `no_stop_trim`; the token that completed the match stays in `output_ids`)."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Decodes output tokens one at a time, holding back incomplete UTF-8 sequences, and finds stop strings."""

    def __init__(self, tokenizer, stop: list[str], skip_special_tokens: bool = True, no_stop_trim: bool = False):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.skip_special_tokens, self.no_stop_trim = skip_special_tokens, no_stop_trim
        self.ids: list[int] = []
        self.text = ""
        self.prefix_offset = self.read_offset = 0
        self.max_stop_len = max((len(s) for s in self.stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_id: int) -> str | None:
        """Add a token; return the stop string it completed, if any (then `text` is final)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        start = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        best = None
        for s in self.stop:
            pos = self.text.find(s, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return None
        pos, s = best
        self.text = self.text[: pos + len(s)] if self.no_stop_trim else self.text[:pos]
        return s
