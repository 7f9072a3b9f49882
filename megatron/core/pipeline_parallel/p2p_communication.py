"""Point-to-point transfers between adjacent pipeline stages.

Activations flow to the next stage (tag 0), gradients to the previous one (tag 1); the last
stage's next stage is the first (interleaved schedules wrap around). Sends are never waited
for before the schedule moves on -- only receives are -- so a schedule whose order respects
the data dependencies cannot deadlock. Each step posts its send together with the next
step's receive in one ``batch_isend_irecv``.
"""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.timers import get_timers

FORWARD_TAG, BACKWARD_TAG = 0, 1


class PipelineP2P:
    """Transfers of tensors of one shape and dtype (pipeline group)."""

    def __init__(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.next = ps.get_pipeline_model_parallel_next_rank()
        self.prev = ps.get_pipeline_model_parallel_prev_rank()
        self._sends: List[Tuple[object, torch.Tensor]] = []  # (work, tensor kept alive)
        self._recvs = {}  # key -> (work, buffer, forward?)

    def post(self, send: Optional[Tuple[torch.Tensor, bool]] = None,
             recv: Optional[Tuple[object, bool]] = None) -> None:
        """Post a send (tensor, forward?) and/or a receive (key, forward?) in one batch."""
        ops = []
        if send is not None:
            tensor, forward = send
            tensor = tensor.detach().contiguous()
            ops.append(dist.P2POp(dist.isend, tensor, self.next if forward else self.prev,
                                  tag=FORWARD_TAG if forward else BACKWARD_TAG))
        buffer = None
        if recv is not None:
            key, forward = recv
            buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, buffer, self.prev if forward else self.next,
                                  tag=FORWARD_TAG if forward else BACKWARD_TAG))
        if not ops:
            return
        timer = _timer_name(send, recv)
        if timer:  # Megatron-LM's names for a send, or a send batched with a receive
            get_timers()(timer, log_level=2).start()
        works = dist.batch_isend_irecv(ops)
        if timer:
            get_timers()(timer).stop()
        if send is not None:
            self._sends.append((works[0], ops[0].tensor))
        if recv is not None:
            self._recvs[recv[0]] = (works[-1], buffer, recv[1])
        self._release_finished_sends()

    def wait_recv(self, key) -> torch.Tensor:
        work, buffer, forward = self._recvs.pop(key)
        timer = get_timers()("forward-recv" if forward else "backward-recv", log_level=2)
        timer.start()
        work.wait()
        timer.stop()
        return buffer

    def _release_finished_sends(self) -> None:
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]

    def finish(self) -> None:
        """Wait for every send still in flight (end of the step)."""
        for work, _ in self._sends:
            work.wait()
        self._sends = []


def _timer_name(send, recv) -> Optional[str]:
    """"forward-send", "backward-send-forward-recv", ...: None for a lone receive (posting it
    costs nothing; its wait is timed as "forward-recv" / "backward-recv")."""
    if send is None:
        return None
    name = ("forward" if send[1] else "backward") + "-send"
    if recv is not None:
        name += "-" + ("forward" if recv[1] else "backward") + "-recv"
    return name
