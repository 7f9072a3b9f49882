"""--log-layer-stats: per-layer statistics written to layer_stats.jsonl, TensorBoard and W&B.

Every ``--layer-stats-interval`` iterations the step's statistics (see
megatron/core/models/gpt/layer_stats.py) are gathered from all ranks and the last rank
writes them. The file (``--layer-stats-file``, default ``<save>/layer_stats.jsonl``, else
``<tensorboard-dir>/layer_stats.jsonl``) holds one JSON object per line, each with a "type":

- ``run``: once per job: the iteration it starts from, ``placement``, ``embedding_norm``,
  ``layer_placements``, the model sizes, ``lr``, ``seed``, the parallel layout, ``label``;
- ``train``: every iteration: ``lm_loss``, ``grad_norm``, ``lr``, ``consumed_samples`` and the
  0/1 flags ``skipped``, ``nan``, ``spike``;
- ``valid``: after each evaluation: the validation losses (``lm_loss``);
- ``layer_stats``: ``iteration``, ``lm_loss``, ``grad_norm`` and ``layers``: one dict per
  entry (``layer`` 0 = embedding output, 1..L, L + 1 = final norm and output layer) with
  ``kind`` (embedding / pre / post / peri / output), ``residual``, ``attention``, ``mlp``
  (and ``attention_normed``, ``mlp_normed`` for Peri-LN), each ``{mean, var, rms, max_abs}``,
  ``grad_norm``, ``norms``: ``{name: {mean, std}}`` of each norm's gain, and with
  ``--fp8-format`` ``fp8``: ``{input|weight|grad_output: {saturated, underflowed}}``, the
  fractions of the layer's quantized elements that saturated or underflowed;
- ``stop``: when the run stops on NaNs (``reason``, ``message``).

A value that is not finite is written as null. A resumed job first drops the lines past the
iteration it resumes from (written after that checkpoint), then appends.
"""

import json
import math
import os
from typing import Optional

from megatron.core.models.gpt.layer_stats import SITES, LayerStatsCollector
from megatron.training import log_writers
from megatron.training.utils import is_last_rank

STATS = ("var", "rms", "max_abs")  # what goes to TensorBoard / W&B per site


def add_layer_stats_args(parser) -> None:
    g = parser.add_argument_group("layer statistics (the Peri-LN paper's evidence)")
    g.add_argument("--log-layer-stats", action="store_true",
                   help="record per-layer activation, gradient and norm-gain statistics")
    g.add_argument("--layer-stats-interval", type=int, default=100,
                   help="iterations between two recorded steps")
    g.add_argument("--layer-stats-file", default=None,
                   help="the JSONL file (default: <save>/layer_stats.jsonl, else "
                   "<tensorboard-dir>/layer_stats.jsonl)")


def layer_stats_path(args) -> Optional[str]:
    if args.layer_stats_file:
        return args.layer_stats_file
    folder = args.save or args.tensorboard_dir
    return os.path.join(folder, "layer_stats.jsonl") if folder else None


def layer_stats_args_error(args) -> Optional[str]:
    """One sentence when the flags cannot work, else None."""
    if args.layer_stats_interval <= 0:
        return f"--layer-stats-interval {args.layer_stats_interval} must be a positive " \
               "number of iterations."
    if not args.log_layer_stats:
        return None
    path = layer_stats_path(args)
    if path is None:
        return "--log-layer-stats needs a place for layer_stats.jsonl: give " \
               "--layer-stats-file, --save or --tensorboard-dir."
    if os.path.isdir(path):
        return f"--layer-stats-file {path} is a directory; give a file name."
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # the nearest folder that exists must be writable
        folder = os.path.dirname(folder)
    if not os.access(folder, os.W_OK) or not os.path.isdir(folder):
        return f"cannot write the layer statistics to {path}: {folder} is not a writable " \
               "folder."
    return None


def _clean(value):
    """JSON-safe: non-finite floats become None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _kept_lines(path: str, start_iteration: int) -> list:
    """The lines of an existing file that precede a job starting at ``start_iteration``."""
    if start_iteration == 0 or not os.path.exists(path):
        return []
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                iteration = int(record["iteration"])
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a crash
            if iteration < start_iteration or \
                    (iteration == start_iteration and record.get("type") != "run"):
                kept.append(line if line.endswith("\n") else line + "\n")
    return kept


class LayerStatsLog:
    """The collector (every rank) and the JSONL file (last rank) of one job."""

    def __init__(self, args, model, config):
        self.interval = args.layer_stats_interval
        self.collector = LayerStatsCollector(model, config)
        self.file = None
        self.path = layer_stats_path(args)
        if is_last_rank():
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            kept = _kept_lines(self.path, args.iteration)
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
            self.file = open(self.path, "a", encoding="utf-8")
            self._write(self._run_record(args, config))

    @staticmethod
    def _run_record(args, config) -> dict:
        label = args.norm_placement + ("+embnorm" if args.embedding_norm else "")
        return {
            "type": "run", "version": 1, "iteration": args.iteration,
            "placement": args.norm_placement, "embedding_norm": args.embedding_norm,
            "mix_ln_alpha": args.mix_ln_alpha,
            "layer_placements": [config.layer_placement(n).value
                                 for n in range(1, config.num_layers + 1)],
            "num_layers": args.num_layers, "hidden_size": args.hidden_size,
            "num_attention_heads": args.num_attention_heads, "seq_length": args.seq_length,
            "normalization": args.normalization, "lr": args.lr, "min_lr": args.min_lr,
            "seed": args.seed, "global_batch_size": args.global_batch_size,
            "train_iters": args.train_iters, "layer_stats_interval": args.layer_stats_interval,
            "params_dtype": str(args.params_dtype).replace("torch.", ""),
            "tensor_model_parallel_size": args.tensor_model_parallel_size,
            "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
            "data_parallel_size": args.data_parallel_size,
            "sequence_parallel": args.sequence_parallel, "label": label}

    def _write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(_clean(record)) + "\n")
            self.file.flush()

    def wants(self, iteration: int) -> bool:
        """Whether ``iteration`` (1-based, the one about to run) is recorded."""
        return iteration % self.interval == 0

    def write_train(self, iteration, consumed_samples, losses, grad_norm, lr, skipped, nan,
                    spike) -> None:
        record = {"type": "train", "iteration": iteration, "consumed_samples": consumed_samples}
        for key, value in losses.items():
            record[key.replace(" ", "_")] = float(value)
        record.update({"grad_norm": grad_norm, "lr": lr, "skipped": int(skipped),
                       "nan": int(nan), "spike": int(spike)})
        self._write(record)

    def write_valid(self, iteration, losses) -> None:
        self._write({"type": "valid", "iteration": iteration,
                     **{k.replace(" ", "_"): float(v) for k, v in losses.items()}})

    def write_stop(self, iteration, reason, message) -> None:
        self._write({"type": "stop", "iteration": iteration, "reason": reason,
                     "message": message})

    def write_step(self, iteration, layers, loss, grad_norm) -> None:
        """The recorded step: the JSONL line, and the scalars to TensorBoard / W&B."""
        if not is_last_rank():
            return
        self._write({"type": "layer_stats", "iteration": iteration, "lm_loss": loss,
                     "grad_norm": grad_norm, "layers": layers})
        scalars = {}
        for entry in layers:
            prefix = f"layer-stats/layer-{entry['layer']:02d}"
            for site in SITES:
                for stat in STATS if site in entry else ():
                    scalars[f"{prefix}/{site}-{stat}"] = entry[site][stat]
            if entry.get("grad_norm") is not None:
                scalars[f"{prefix}/grad-norm"] = entry["grad_norm"]
            for name, gain in entry["norms"].items():
                scalars[f"{prefix}/{name}-gain-mean"] = gain["mean"]
                scalars[f"{prefix}/{name}-gain-std"] = gain["std"]
        log_writers.write_scalars(_clean(scalars), iteration)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
