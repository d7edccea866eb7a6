"""Which data-parallel replica serves a request: the least loaded, or the one that holds
the longest cached prefix of its prompt.

Least loaded means the fewest requests in flight through the front (ties go round
robin). With prefix routing, the front remembers, per replica, a bounded LRU of the
chained hashes of the prompt prefixes it sent there, and sends a request to the
replica with the longest matching chain (ties and misses: the least loaded), so a
conversation's turns and prompts sharing a long system prompt meet their KV in one
prefix cache instead of computing it once per replica.

The front hashes the prompt as text, in chunks of 64 characters (about 16 tokens, one
KV block), as vLLM's production-stack router and SGLang's cache-aware router do,
rather than tokenizing it: the front stays light (no tokenizer to load, no prompt
tokenized twice on the event loop), and routing needs only an estimate of the shared
prefix, not block-exact hashes. A prompt given as token ids is hashed in chunks of 16
ids. A conversation (chat, Messages, Responses) is hashed as the text of its tools and
system prompt, then each message's role and content in order: the chat template that
turns it into the replica's tokens is a function of the same sequence, so two
conversations sharing their first messages share those chunks.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ROUTING_POLICIES = ("least-loaded", "prefix")
CHUNK_CHARS = 64
CHUNK_TOKENS = 16
MAX_CHUNKS = 4096  # a prompt's first 256k characters decide its replica
LRU_ENTRIES = 1 << 16  # remembered prefix hashes per replica (about 4M characters)

# fields of a conversation request that come before its messages in the rendered prompt
_PREAMBLE = ("tools", "system", "instructions")


@dataclass
class ReplicaLoad:
    """What the front knows of one replica: alive, requests in flight, prefixes sent."""

    index: int
    alive: bool = True
    in_flight: int = 0
    routed: int = 0
    prefixes: OrderedDict[int, None] = field(default_factory=OrderedDict)

    def matched_chunks(self, hashes: Sequence[int]) -> int:
        """How many of the chain's first hashes this replica was sent."""
        count = 0
        for h in hashes:
            if h not in self.prefixes:
                break
            count += 1
        return count

    def remember(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self.prefixes[h] = None
            self.prefixes.move_to_end(h)
        while len(self.prefixes) > LRU_ENTRIES:
            self.prefixes.popitem(last=False)


class NoReplicaAlive(Exception):
    """Every replica has exited."""


class ReplicaChooser:
    """Chooses a replica per request and keeps the counts the choice depends on."""

    def __init__(self, num_replicas: int, policy: str = "least-loaded") -> None:
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"routing policy must be one of {ROUTING_POLICIES}, got {policy!r}")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        self.policy = policy
        self.replicas = [ReplicaLoad(i) for i in range(num_replicas)]
        self._next = 0  # where the round robin among equally loaded replicas resumes

    def choose(self, hashes: Sequence[int] = (), only: int | None = None) -> ReplicaLoad:
        """The replica for a request whose prompt has these prefix hashes (or replica
        `only`, which holds its state); counts it in flight (call `done` when it ends).
        Raises NoReplicaAlive."""
        candidates = [r for r in self.replicas if r.alive and only in (None, r.index)]
        if not candidates:
            raise NoReplicaAlive
        if self.policy == "prefix" and hashes:
            matched = {r.index: r.matched_chunks(hashes) for r in candidates}
            best = max(matched.values())
            if best:
                candidates = [r for r in candidates if matched[r.index] == best]
        replica = self._least_loaded(candidates)
        replica.in_flight += 1
        replica.routed += 1
        if self.policy == "prefix":
            replica.remember(hashes)
        return replica

    def _least_loaded(self, candidates: list[ReplicaLoad]) -> ReplicaLoad:
        fewest = min(r.in_flight for r in candidates)
        n = len(self.replicas)
        # the first equally loaded replica at or after the round robin's position
        replica = min(
            (r for r in candidates if r.in_flight == fewest),
            key=lambda r: (r.index - self._next) % n,
        )
        self._next = (replica.index + 1) % n
        return replica

    @staticmethod
    def done(replica: ReplicaLoad) -> None:
        replica.in_flight -= 1


def _chained(chunks: Sequence[Any]) -> list[int]:
    """Hashes of the prefixes ending at each chunk: each covers every chunk before it."""
    hashes, h = [], 0
    for chunk in chunks[:MAX_CHUNKS]:
        h = hash((h, chunk))
        hashes.append(h)
    return hashes


def _text_chunks(text: str) -> list[str]:
    whole = min(len(text) // CHUNK_CHARS, MAX_CHUNKS)  # a partial chunk is never cached
    return [text[i * CHUNK_CHARS : (i + 1) * CHUNK_CHARS] for i in range(whole)]


def _token_chunks(ids: list[Any]) -> list[tuple[int, ...]]:
    if not all(type(t) is int for t in ids):  # not token ids: the replica will say so
        return []
    whole = min(len(ids) // CHUNK_TOKENS, MAX_CHUNKS)
    return [tuple(ids[i * CHUNK_TOKENS : (i + 1) * CHUNK_TOKENS]) for i in range(whole)]


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _conversation_text(body: dict[str, Any], messages: Any) -> str:
    parts = [_as_text(body[k]) for k in _PREAMBLE if body.get(k)]
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                parts.append(f"{m.get('role')}\n{_as_text(m.get('content'))}")
            else:
                parts.append(_as_text(m))
    else:
        parts.append(_as_text(messages))
    return "\n\n".join(parts)


def prefix_hashes(path: str, body: Any) -> list[int]:
    """The chained prefix hashes of a request's prompt; [] when it has none to route by
    (an unreadable body goes to the least-loaded replica, which says what is wrong)."""
    if not isinstance(body, dict):
        return []
    if path == "/v1/completions" or path == "/v1/embeddings":
        prompt = body.get("prompt", body.get("input"))
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch: routed by its first prompt
        if isinstance(prompt, str):
            return _chained(_text_chunks(prompt))
        if isinstance(prompt, list):
            return _chained(_token_chunks(prompt))
        return []
    messages = body.get("messages", body.get("input"))
    if messages is None:
        return []
    return _chained(_text_chunks(_conversation_text(body, messages)))
