"""Control-plane watches: one generic blocking watch (`BlockingWatch`) that every follower of
Consul's state runs on (upstream health, intentions, config entries, the datacenter read)."""

from agent.watches.blocking import (
    AnswerRejected,
    BlockingWatch,
    WatchSettings,
    WatchState,
    unindexed,
)
from agent.watches.hash_blocking import HashedFetch

__all__ = [
    "AnswerRejected",
    "BlockingWatch",
    "HashedFetch",
    "WatchSettings",
    "WatchState",
    "unindexed",
]
