"""Guards that skip an optimizer update: NaN/Inf losses and gradients, and loss spikes.

``--check-for-nan-in-loss-and-grad`` (on by default, as in Megatron-LM; off with
``--no-check-for-nan-in-loss-and-grad``): a step whose loss or gradient norm is not finite
is not applied and counts in the log line's ``number of nan iterations``; after
``--max-nan-iterations`` such steps in one job the run saves a checkpoint (the last good
weights, with --save) and stops with one sentence. Megatron-LM stops at the first one.

``--skip-spiky-updates``: a step whose loss or gradient norm is more than
``--spike-threshold`` standard deviations above the mean of the last ``--spike-window``
applied steps is not applied and counts in ``number of skipped iterations``. The test starts
once the window holds 10 values; the standard deviation is floored at 1% of the window's mean,
so that the small noise of a flat curve is not called a spike.

A skipped step leaves the weights, the optimizer's state (moments, step count, loss scaler) and
the learning-rate schedule as they were. Every rank takes the same decision: the loss is
broadcast from the last rank (a last pipeline stage's, where it lives) and the gradient norm
is global already.
"""

import math
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist

SPIKE_MIN_HISTORY = 10
SPIKE_STD_FLOOR = 0.01  # x |mean|


def add_guard_args(parser) -> None:
    g = parser.add_argument_group("update guards (NaN, loss spikes)")
    g.add_argument("--check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_true", default=True,
                   help="skip a step with a NaN/Inf loss or grad norm, count it, stop after "
                   "--max-nan-iterations (default: on)")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false")
    g.add_argument("--max-nan-iterations", type=int, default=10,
                   help="with the NaN check: save and stop after this many NaN steps")
    g.add_argument("--skip-spiky-updates", action="store_true",
                   help="skip a step whose loss or grad norm spikes above the recent window")
    g.add_argument("--spike-threshold", type=float, default=6.0,
                   help="standard deviations above the window's mean that make a spike")
    g.add_argument("--spike-window", type=int, default=100,
                   help="applied steps in the running window")


def guard_args_error(args) -> Optional[str]:
    """One sentence when the guard flags cannot work, else None."""
    if args.max_nan_iterations <= 0:
        return f"--max-nan-iterations {args.max_nan_iterations} must be positive."
    if not args.spike_threshold > 0:
        return f"--spike-threshold {args.spike_threshold} must be a positive number of " \
               "standard deviations."
    if args.spike_window < SPIKE_MIN_HISTORY:
        return f"--spike-window {args.spike_window} must be at least {SPIKE_MIN_HISTORY} " \
               "steps (the spike test needs that many to estimate a spread)."
    return None


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


class UpdateGuard:
    """One decision per step: apply the update, or skip it as a NaN or a spike step."""

    def __init__(self, args):
        self.check_nan = args.check_for_nan_in_loss_and_grad
        self.max_nan = args.max_nan_iterations
        self.skip_spikes = args.skip_spiky_updates
        self.threshold = args.spike_threshold
        self.windows = {"loss": deque(maxlen=args.spike_window),
                        "grad norm": deque(maxlen=args.spike_window)}
        self.nan_iterations = 0  # in this job
        self.spike_iterations = 0
        self.last = None  # None, "nan" or a sentence naming the spike

    @property
    def active(self) -> bool:
        return self.check_nan or self.skip_spikes

    def should_stop(self) -> bool:
        return self.check_nan and self.nan_iterations >= self.max_nan

    @staticmethod
    def share_loss(losses: dict) -> float:
        """The step's loss (the first reported one) on every rank: collective."""
        value = float(next(iter(losses.values()))) if losses else float("nan")
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([value], dtype=torch.float64, device=device)
            dist.broadcast(t, src=dist.get_world_size() - 1)
            value = float(t.item())
        return value

    def should_skip(self, loss: float, grad_norm: float) -> bool:
        """Decide (the same on every rank, given the shared loss and the global grad norm);
        the reason is left in ``last``."""
        self.last = None
        if self.check_nan and not (_finite(loss) and _finite(grad_norm)):
            self.nan_iterations += 1
            self.last = "nan"
            return True
        values = {"loss": loss, "grad norm": grad_norm}
        if self.skip_spikes and _finite(loss) and _finite(grad_norm):
            for name, value in values.items():
                limit = self._limit(self.windows[name])
                if limit is not None and value > limit:
                    self.spike_iterations += 1
                    self.last = f"{name} {value:.4g} above {limit:.4g}"
                    return True
            for name, value in values.items():
                self.windows[name].append(value)
        return False

    def _limit(self, window) -> Optional[float]:
        if len(window) < SPIKE_MIN_HISTORY:
            return None
        mean = sum(window) / len(window)
        std = math.sqrt(sum((v - mean) ** 2 for v in window) / len(window))
        return mean + self.threshold * max(std, SPIKE_STD_FLOOR * abs(mean))
