"""Learning-rate schedule: warm-up, then constant, linear, cosine, inverse-square-root or WSD.

Steps are counted in samples, as Megatron-LM counts them when training by iterations:
the scheduler advances by the global batch size after every successful step. Weight decay
stays at ``weight_decay``, or grows from ``start_wd`` to ``end_wd`` over ``wd_incr_steps``
(linear or cosine), as Megatron-LM's ``--weight-decay-incr-style`` does.

On resume the schedule's shape is compared with the checkpoint's. ``use_checkpoint`` takes
the checkpoint's (``--use-checkpoint-opt_param-scheduler``), ``override`` the flags'
(``--override-opt_param-scheduler``). With neither, Megatron-LM stops on a difference; here
the flags' values are used and one line names the difference (runs that resume with a longer
``--train-iters`` keep working as they always have).
"""

import math


class OptimizerParamScheduler:
    """Sets each param group's ``lr`` (x ``lr_mult``) and ``weight_decay`` (x ``wd_mult``)."""

    DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
    WSD_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")

    def __init__(self, optimizer, init_lr: float, max_lr: float, min_lr: float,
                 lr_warmup_steps: int, lr_decay_steps: int, lr_decay_style: str,
                 weight_decay: float, wsd_decay_steps: int = 0,
                 lr_wsd_decay_style: str = "exponential", start_wd: float = None,
                 end_wd: float = None, wd_incr_steps: int = 0, wd_incr_style: str = "constant",
                 override: bool = False, use_checkpoint: bool = False):
        self.optimizer = optimizer
        self.init_lr, self.max_lr, self.min_lr = init_lr, max_lr, min_lr
        self.lr_warmup_steps, self.lr_decay_steps = lr_warmup_steps, lr_decay_steps
        self.lr_decay_style, self.wsd_decay_steps = lr_decay_style, wsd_decay_steps
        self.lr_wsd_decay_style = lr_wsd_decay_style
        self.start_wd = weight_decay if start_wd is None else start_wd
        self.end_wd = weight_decay if end_wd is None else end_wd
        self.wd_incr_steps, self.wd_incr_style = wd_incr_steps, wd_incr_style
        self.override, self.use_checkpoint = override, use_checkpoint
        self.num_steps = 0
        self.step(0)

    def get_lr(self, group: dict = None) -> float:
        """The learning rate now; a group's own ``max_lr`` / ``min_lr`` (--decoupled-lr)
        replace the scheduler's."""
        max_lr = (group or {}).get("max_lr", self.max_lr)
        min_lr = (group or {}).get("min_lr", self.min_lr)
        n, warmup, decay = self.num_steps, self.lr_warmup_steps, self.lr_decay_steps
        if warmup > 0 and n <= warmup:
            return self.init_lr + (max_lr - self.init_lr) * n / warmup
        if self.lr_decay_style == "constant":
            return max_lr
        if n > decay:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            return max(min_lr, max_lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(n, 1)))
        ratio = (n - warmup) / max(decay - warmup, 1)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.lr_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD: hold the peak, then anneal over the last wsd_decay_steps
            coeff = self._wsd_coeff(n)
        return min_lr + coeff * (max_lr - min_lr)

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

    def get_wd(self) -> float:
        n = self.num_steps
        if n > self.wd_incr_steps or self.wd_incr_style == "constant":
            return self.end_wd
        ratio = n / self.wd_incr_steps
        coeff = ratio if self.wd_incr_style == "linear" else \
            0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)  # cosine
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def step(self, increment: int) -> None:
        self.num_steps += increment
        wd = self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group) * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    def state_dict(self) -> dict:
        return {"max_lr": self.max_lr, "min_lr": self.min_lr,
                "lr_warmup_steps": self.lr_warmup_steps, "lr_decay_steps": self.lr_decay_steps,
                "lr_decay_style": self.lr_decay_style, "num_steps": self.num_steps,
                "start_wd": self.start_wd, "end_wd": self.end_wd,
                "wd_incr_style": self.wd_incr_style, "wd_incr_steps": self.wd_incr_steps}

    # (attribute, the checkpoint's key and its older spellings, the flag that sets it)
    _LR_FIELDS = (("max_lr", ("max_lr", "start_lr"), "--lr"),
                  ("min_lr", ("min_lr",), "--min-lr"),
                  ("lr_warmup_steps", ("lr_warmup_steps", "warmup_steps", "warmup_iter"),
                   "--lr-warmup-*"),
                  ("lr_decay_steps", ("lr_decay_steps", "decay_steps", "end_iter"),
                   "--lr-decay-*"),
                  ("lr_decay_style", ("lr_decay_style", "decay_style"), "--lr-decay-style"))
    _WD_FIELDS = (("start_wd", ("start_wd",), "--start-weight-decay"),
                  ("end_wd", ("end_wd",), "--end-weight-decay"),
                  ("wd_incr_steps", ("wd_incr_steps",), "--train-iters/--train-samples"),
                  ("wd_incr_style", ("wd_incr_style",), "--weight-decay-incr-style"))

    def load_state_dict(self, state: dict) -> None:
        """Resume the step count, and the schedule's shape as Megatron-LM resolves it."""
        self._check_and_set(state, self._LR_FIELDS)
        if "start_wd" in state:
            fields = self._WD_FIELDS
            if self.wd_incr_style == state.get("wd_incr_style") == "constant":
                # one deliberate difference from Megatron-LM: a constant weight decay never
                # reads its length (--train-iters x batch), so a longer run may resume
                fields = tuple(f for f in fields if f[0] != "wd_incr_steps")
            self._check_and_set(state, fields)
        # every value first, then the step: Megatron-LM steps before restoring the weight
        # decay fields, so its first resumed update can use the flags' weight decay
        # (NVIDIA/Megatron-LM#7468); with equal values (the default) both agree
        self.num_steps = 0
        self.step(int(state.get("num_steps", state.get("num_iters", 0))))

    def _check_and_set(self, state: dict, fields) -> None:
        if self.override:
            return
        differ = []
        for attr, keys, flag in fields:
            saved = next((state[k] for k in keys if k in state), None)
            if saved is None or saved == getattr(self, attr):
                continue
            differ.append(f"{attr} {saved} -> {getattr(self, attr)} ({flag})")
            if self.use_checkpoint:
                setattr(self, attr, saved)
        if differ and not self.use_checkpoint:
            from megatron.training.utils import print_rank_0
            print_rank_0("note: the learning-rate schedule differs from the checkpoint's ("
                         + ", ".join(differ) + "); using the flags' (Megatron-LM stops here "
                         "unless --override-opt_param-scheduler or "
                         "--use-checkpoint-opt_param-scheduler is given).")
