"""What the engine did: token counts by kind and seconds per phase."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EngineCounters:
    """prompt_tokens: prompt tokens of submitted requests. prefill_tokens: tokens whose KV the prefill
    computed (re-computation after preemption included). cached_tokens: prompt tokens whose KV came from the
    prefix cache. decode_tokens: tokens fed by decode steps. preemptions: sequences preempted for blocks.
    *_seconds: wall time of prefill forwards, decode forwards, sampling + stop checks, and scheduling."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0
    decode_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    requests: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    sample_seconds: float = 0.0
    schedule_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)
