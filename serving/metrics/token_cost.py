"""The marginal time of one more token in a step, fit online from a replica's own steps.

Pooling removes soft-prompt positions from a forward that runs anyway, so what it saves is the
*marginal* cost of those positions, not a step's average cost per token: a decode step at batch
1 reads every weight for a single token, and a 100-token prefill costs far less than 100 of
those. So the fit is a least-squares line, step seconds = a + b * tokens computed in the step,
over the last `window` steps: the intercept `a` absorbs what every step pays whatever its size
(reading the weights, Python, sampling), and the slope `b` is the price of one more position.
Seconds saved by pooling are then b * (l - ceil(l/p)) for each request whose prefill ran its
soft prompt (none when the prompt-KV cache supplied its keys/values).
"""

from __future__ import annotations

import threading
from collections import deque

WINDOW_STEPS = 512
# Too few points, or steps that all computed about as many tokens, say nothing about the slope.
MIN_STEPS = 16
MIN_TOKEN_SPREAD = 4.0  # standard deviation of the tokens per step, in tokens


class TokenCostFit:
    def __init__(self, window: int = WINDOW_STEPS, min_steps: int = MIN_STEPS):
        if window < min_steps or min_steps < 2:
            raise ValueError(f"need window >= min_steps >= 2, got window={window}, min_steps={min_steps}")
        self.min_steps = min_steps
        self._points: deque[tuple[int, float]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, tokens: int, seconds: float) -> None:
        """One step: the positions its forwards computed and how long it took."""
        if tokens > 0 and seconds > 0:
            with self._lock:
                self._points.append((tokens, seconds))

    def seconds_per_token(self) -> float | None:
        """The slope of the line (>= 0), or None while the window cannot tell it."""
        with self._lock:
            points = list(self._points)
        n = len(points)
        if n < self.min_steps:
            return None
        mean_x = sum(x for x, _ in points) / n
        mean_y = sum(y for _, y in points) / n
        sxx = sum((x - mean_x) ** 2 for x, _ in points)
        if sxx / n < MIN_TOKEN_SPREAD**2:
            return None
        sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
        return max(sxy / sxx, 0.0)
