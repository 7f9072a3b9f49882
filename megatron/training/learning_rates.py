"""Learning-rate schedule: warm-up, then constant, linear, cosine, inverse-square-root or WSD.

Steps are counted in samples, as Megatron-LM counts them when training by iterations:
the scheduler advances by the global batch size after every successful step.
"""

import math


class OptimizerParamScheduler:
    """Sets each param group's ``lr`` (x ``lr_mult``) and ``weight_decay`` (x ``wd_mult``)."""

    DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
    WSD_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")

    def __init__(self, optimizer, init_lr: float, max_lr: float, min_lr: float,
                 lr_warmup_steps: int, lr_decay_steps: int, lr_decay_style: str,
                 weight_decay: float, wsd_decay_steps: int = 0,
                 lr_wsd_decay_style: str = "exponential"):
        self.optimizer = optimizer
        self.init_lr, self.max_lr, self.min_lr = init_lr, max_lr, min_lr
        self.lr_warmup_steps, self.lr_decay_steps = lr_warmup_steps, lr_decay_steps
        self.lr_decay_style, self.wsd_decay_steps = lr_decay_style, wsd_decay_steps
        self.lr_wsd_decay_style = lr_wsd_decay_style
        self.weight_decay = weight_decay
        self.num_steps = 0
        self.step(0)

    def get_lr(self) -> float:
        n, warmup, decay = self.num_steps, self.lr_warmup_steps, self.lr_decay_steps
        if warmup > 0 and n <= warmup:
            return self.init_lr + (self.max_lr - self.init_lr) * n / warmup
        if self.lr_decay_style == "constant":
            return self.max_lr
        if self.lr_decay_style == "inverse-square-root":
            return max(self.min_lr, self.max_lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(n, 1)))
        if n > decay:
            return self.min_lr
        ratio = (n - warmup) / max(decay - warmup, 1)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.lr_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD: hold the peak, then anneal over the last wsd_decay_steps
            coeff = self._wsd_coeff(n)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def _wsd_coeff(self, n: int) -> float:
        anneal_start = self.lr_decay_steps - self.wsd_decay_steps
        if n <= anneal_start:
            return 1.0
        ratio = (n - anneal_start) / max(self.wsd_decay_steps, 1)
        style = self.lr_wsd_decay_style
        if style == "linear":
            return 1.0 - ratio
        if style == "cosine":
            return 0.5 * (math.cos(math.pi * ratio) + 1.0)
        if style == "exponential":
            return (2.0 * math.pow(0.5, ratio)) - 1.0
        return 1.0 - math.sqrt(ratio)  # minus_sqrt

    def step(self, increment: int) -> None:
        self.num_steps += increment
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)

    def state_dict(self) -> dict:
        return {"max_lr": self.max_lr, "min_lr": self.min_lr,
                "lr_warmup_steps": self.lr_warmup_steps, "lr_decay_steps": self.lr_decay_steps,
                "lr_decay_style": self.lr_decay_style, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        """Resume the step count; the schedule's shape comes from the current flags."""
        self.num_steps = 0
        self.step(int(state["num_steps"]))
