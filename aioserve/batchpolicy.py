"""How long a batch queue waits for more items before it dispatches a batch.

How long to wait (``batch_wait_policy``), decided by :func:`dispatch_at` whenever the queue has
capacity and fewer than ``max_batch_size`` items wait:

* ``"fixed"``: wait until the batch is full or the oldest item has waited the timeout.
* ``"adaptive"`` (the default): the timeout is an upper bound. The batch goes out at once when
  waiting cannot be expected to make it bigger: one item waits and no batch of this queue is
  running (nothing else is in the system to join it), or the arrivals seen so far say the next
  item will not come before the timeout (the last arrival plus the mean gap between arrivals, a
  moving average, falls at or after it). Otherwise it waits as ``"fixed"`` does. Under load batches
  still fill: items that arrive while a batch runs wait for capacity and go out together.
"""

from __future__ import annotations

from .config import WaitPolicy

__all__ = ["GAP_WEIGHT", "dispatch_at"]

GAP_WEIGHT = 0.25  # weight of the newest gap in the moving average of gaps between arrivals


def dispatch_at(
    *,
    now: float,
    queued: int,
    running: int,
    max_batch_size: int,
    batch_wait_timeout_s: float,
    oldest_arrival: float,
    last_arrival: float,
    mean_gap_s: float,
    policy: WaitPolicy = "adaptive",
) -> float:
    """When a queue with capacity should dispatch the batch it is gathering: ``now`` (or
    earlier) means at once; otherwise the time to look again unless an item arrives first.

    ``queued`` items wait, the oldest since ``oldest_arrival``, the newest since
    ``last_arrival``; ``running`` batches of the queue are being dispatched; ``mean_gap_s`` is the
    moving average of the gaps between arrivals (``inf`` before two arrivals). A pure function of
    what the queue observes, so that the rule in the module docstring can be tested without a
    clock.
    """
    if queued >= max_batch_size or batch_wait_timeout_s == 0:
        return now
    flush_at = oldest_arrival + batch_wait_timeout_s
    if policy == "adaptive" and (
        (queued == 1 and running == 0) or last_arrival + mean_gap_s >= flush_at
    ):
        return now
    return flush_at
