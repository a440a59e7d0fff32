"""When a sequence stops: EOS, a stop token id, or a stop string in the decoded tail of its output."""

from __future__ import annotations

from typing import Any

from rexrag_fast.engine.config import SamplingParams


class StopChecker:
    """Per-sequence stop test, called after each new token.

    A stop string counts when it appears in the decoded text of the last `window` output tokens but not in
    that text without the newest token, i.e. the newest token completed it. The window (2 tokens per stop
    character + 4) covers any tokenisation of the string, byte-level pieces included.
    """

    def __init__(self, sampling: SamplingParams, tokenizer: Any, prompt_len: int) -> None:
        self.sampling = sampling
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stop_ids = frozenset(sampling.stop_token_ids)
        self.window = 2 * max((len(s) for s in sampling.stop), default=0) + 4

    def check(self, token_ids: list[int], new_token: int, eos_ids: frozenset[int]) -> tuple[str | None, str | None]:
        """(finish_reason or None, matched stop string or None) after `new_token` was appended to token_ids."""
        if new_token in eos_ids and not self.sampling.ignore_eos:
            return "eos", None
        if new_token in self.stop_ids:
            return "stop", None
        if self.sampling.stop:
            tail = token_ids[max(self.prompt_len, len(token_ids) - self.window):]
            text = self.tokenizer.decode(tail, skip_special_tokens=False)
            hits = [s for s in self.sampling.stop if s in text]
            if hits:
                before = self.tokenizer.decode(tail[:-1], skip_special_tokens=False)
                new_hits = [s for s in hits if s not in before]
                if new_hits:
                    return "stop", min(new_hits, key=text.index)
        return None, None
