"""Training step of this framework against plain PyTorch and transformers, per placement.

    python tools/benchmark_training.py                # the shape of issue 13, all placements
    python tools/benchmark_training.py --placements pre peri --rounds 7
    python tools/benchmark_training.py --quick        # tiny shapes, 2 rounds (used by tests)

Default shape (issue 13): fp32, 4 layers, hidden 256, FFN 688, 4 heads, sequence 256,
micro-batch 8, vocabulary 8192, RMSNorm + SwiGLU + RoPE, untied embeddings, no biases,
dropout 0, AdamW (lr 1e-4, weight decay 0.01) with gradient clipping at 1.0. The shape flags
keep Megatron's names (``--no-swiglu``, ``--normalization LayerNorm``, ... pick others).

For each norm placement it times, in alternating rounds so machine noise hits all alike:

- ``ours``: the framework's real training step -- mock GPTDataset and DataLoader, the
  no-pipelining schedule, the gradient buffer (DistributedDataParallel), the Megatron
  optimizer with clipping, the LR schedule;
- ``ours compiled``: the same with ``TransformerConfig(torch_compile=True)`` (a compile
  error prints a warning and marks the row "compile unavailable");
- ``ours selective`` / ``ours full``: selective recomputation (default modules) and full
  recomputation (uniform, one layer per group);
- ``plain``: a minimal PyTorch model of the same shape and placement, torch.optim.AdamW and
  clip_grad_norm_ on ready-made batches;
- ``hf llama`` (pre) / ``hf glm4`` (peri): transformers' LlamaForCausalLM / Glm4ForCausalLM
  of the same shape (sdpa attention, torch.optim.AdamW, clip_grad_norm_), when transformers
  is importable.

Each codebase is timed the way its users run it. pretrain_gpt.py keeps freed host memory for
reuse on a CPU (megatron/training/host_memory.py: glibc's malloc without mmap or trimming,
which spares each step's page faults), so the ``ours`` rows run in a process set up so;
``plain`` and transformers run in a process with glibc's defaults. The setting is
process-wide, hence the two processes; rounds alternate between them. For the comparison at
equal allocators, ``ours [glibc]`` is our eager step under glibc's defaults and ``hf llama
[reuse]`` / ``hf glm4 [reuse]`` transformers' step with freed memory kept; the ratios line
gives both.

It prints the median step time, tokens/s, MFU against the fp32 matmul rate measured at the
start of the same run, and memory. Torch does not track the CPU allocator's peak, so memory
is counted exactly instead: ``act MB`` is the activation bytes kept for backward after one
forward (``torch.autograd.graph.saved_tensors_hooks``: the unique storages saved, parameters
and buffers left out), ``state MB`` the parameters + gradients + optimizer state; their sum
is the step's peak less transient workspace.

Full recomputation should keep only each layer's input. The embedding, final norm, output
layer and loss keep a fixed amount on top (the log-softmax of the logits alone is
s x b x vocab x 4 bytes, far more than one layer), so the layers' share is measured by
differencing: (bytes at L layers - bytes at 1 layer) / (L - 1), compared with the layer input
s x b x h x 4 bytes (target: within 5%).

The memory-budget section predicts, from those measured bytes per layer, the largest number
of layers of this width that fits ``--memory-budget-gb`` per GPU: at TP=1 (no recomputation,
replicated optimizer), TP=1 with the distributed optimizer over ``--data-parallel-size``
ranks and full recomputation, and TP=2 with sequence parallelism, the distributed optimizer
and full recomputation (weights, the layer input and the vocabulary-parallel loss split two
ways; norms replicated). It then checks the method against a run: the model predicted for the
TP=1 full-recomputation layout at ``--check-budget-mb`` is built here and its bytes measured.

Targets (issue 13; eager and compiled ours against transformers Llama's eager step,
Peri-LN against Pre-LN, recomputation against no recomputation) are printed as check lines.
Timings on a shared 2-core machine are noisy, so a missed target only sets exit code 1 with
``--strict``; by default the script exits 0.

``--compare-fp8`` also times the eager step with the transformer layers' GEMMs in FP8
(``TransformerConfig(fp8=FP8Recipe(...))``: torch._scaled_mm, with ``fp8_step`` after the
optimizer step), once per recipe, and prints FP8 / fp32 per placement (informational: on a
CPU ``_scaled_mm`` is emulated; no target).
"""

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTLowLevelDataset
from megatron.core.datasets.samplers import MegatronPretrainingSampler
from megatron.core.datasets.utils import Split
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.fp8 import FP8Recipe, fp8_metas, fp8_step
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.transformer import TransformerConfig
from megatron.training.host_memory import reuse_freed_memory
from megatron.training.learning_rates import OptimizerParamScheduler

MB = 2 ** 20
LR, WEIGHT_DECAY, CLIP = 1e-4, 0.01, 1.0
VARIANTS = {  # row name: TransformerConfig overrides
    "ours": {},
    "ours compiled": {"torch_compile": True},
    "ours selective": {"recompute_granularity": "selective"},
    "ours full": {"recompute_granularity": "full", "recompute_method": "uniform",
                  "recompute_num_layers": 1},
}
HF_CLASS = {"pre": "LlamaForCausalLM", "peri": "Glm4ForCausalLM"}
MALLOCS = ("reuse", "glibc")  # freed host memory kept (pretrain_gpt.py on a CPU) / glibc's own


# ------------------------------------------------------------------ rates and FLOPs
def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """The fp32 matmul rate this machine reaches (best of several timings)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n ** 3 / best / 1e9


def model_flops_per_step(a, tokens: int) -> float:
    """Forward + backward matmul FLOPs of one step (3x forward; attention scores counted
    as computed in full, as Megatron's formula counts them)."""
    h, f, s, L, v = a.hidden_size, a.ffn_hidden_size, a.seq_length, a.num_layers, a.vocab_size
    mlp_matrices = 3 if a.swiglu else 2
    per_token = L * (2 * 4 * h * h + 2 * mlp_matrices * h * f + 2 * 2 * s * h) + 2 * h * v
    return 3 * per_token * tokens


def phase(name: str):
    """A label that tools/profile_step.py's profiles show as ``step: <name>``."""
    return torch.profiler.record_function("step: " + name)


# ------------------------------------------------------------------ memory accounting
def _storages(tensors) -> dict:
    """{storage address: bytes} of ``tensors``, each storage once."""
    out = {}
    for t in tensors:
        if torch.is_tensor(t) and t.device.type != "meta":
            out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out


def activation_bytes(forward, model: nn.Module) -> int:
    """Bytes of the unique storages autograd keeps for backward during one ``forward()``
    (parameters and buffers left out: they exist whether or not a step runs)."""
    held = set(_storages(list(model.parameters()) + list(model.buffers())))
    saved = {}

    def pack(t):
        if t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in held:
                saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    return sum(saved.values())


def state_bytes(params, grads, optimizer: torch.optim.Optimizer) -> int:
    """Parameters + gradients + optimizer state, each storage once."""
    tensors = list(params) + list(grads)
    for state in optimizer.state.values():
        tensors.extend(v for v in state.values() if torch.is_tensor(v) and v.numel() > 1)
    return sum(_storages(tensors).values())


# ------------------------------------------------------------------ the framework
def framework_config(a, placement: str, num_layers=None, fp8=None, **overrides):
    return TransformerConfig(
        num_layers=num_layers or a.num_layers, hidden_size=a.hidden_size,
        ffn_hidden_size=a.ffn_hidden_size, num_attention_heads=a.num_attention_heads,
        norm_placement=placement, normalization=a.normalization, norm_epsilon=a.norm_epsilon,
        gated_linear_unit=a.swiglu, add_bias_linear=not a.disable_bias_linear,
        position_embedding_type=a.position_embedding_type,
        share_embeddings_and_output_weights=not a.untie_embeddings_and_output_weights,
        hidden_dropout=0.0, attention_dropout=0.0, max_position_embeddings=a.seq_length,
        fp8=fp8, **overrides)


def framework_runner(a, placement: str, fp8=None, num_layers=None, **overrides):
    """The framework's training step (``.step(i)``), one forward to measure (``.forward()``)
    and its model and optimizer. ``fp8``: an FP8Recipe for the transformer layers' GEMMs (its
    delayed scales updated after each optimizer step, as the training loop does)."""
    set_random_seed(0)
    config = framework_config(a, placement, num_layers, fp8, **overrides)
    model = DistributedDataParallel(DistributedDataParallelConfig(),
                                    GPTModel(config, a.vocab_size))
    opt = get_megatron_optimizer(OptimizerConfig(lr=LR, weight_decay=WEIGHT_DECAY,
                                                 clip_grad=CLIP), [model])
    sched = OptimizerParamScheduler(opt, 0.0, LR, LR / 10, 0, 10 ** 9, "cosine", WEIGHT_DECAY)
    low = MockGPTLowLevelDataset(a.vocab_size - 1, a.vocab_size - 1)
    data = GPTDataset(low, np.arange(len(low)), 10 ** 5, Split.train,
                      GPTDatasetConfig(sequence_length=a.seq_length, eod=a.vocab_size - 1))
    loader = torch.utils.data.DataLoader(data, batch_sampler=MegatronPretrainingSampler(
        len(data), 0, a.micro_batch_size, 0, 1), num_workers=0)
    it = iter(loader)
    metas = fp8_metas(model) or None

    def loss_of(b):
        out = model(b["tokens"], b["position_ids"], labels=b["labels"])
        mask = b["loss_mask"].reshape(-1)
        return out, lambda o: ((o.reshape(-1) * mask).sum() / mask.sum(),) * 2

    def forward_step(data_iterator, model):
        with phase("data"):
            batch = next(data_iterator)
        with phase("forward"):
            return loss_of(batch)

    def step(i):
        with phase("zero grads"):
            model.zero_grad_buffer()
        with phase("forward+backward"):
            forward_backward_no_pipelining(forward_step_func=forward_step, data_iterator=it,
                                           model=model, num_microbatches=1,
                                           grad_scale_func=opt.scale_loss)
            model.finish_grad_sync()
        with phase("clip+optimizer"):
            opt.step()
            sched.step(a.micro_batch_size)
            if metas is not None:
                fp8_step(metas)

    fixed = next(iter(torch.utils.data.DataLoader(data, batch_size=a.micro_batch_size)))

    def forward():
        out, loss_func = loss_of(fixed)
        return loss_func(out)[0]

    return SimpleNamespace(step=step, forward=forward, model=model.module,
                           state=lambda: state_bytes(model.module.parameters(),
                                                     [model.grad_buffer], opt.optimizer))


# ------------------------------------------------------------------ a plain PyTorch model
def _rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class PlainBlock(nn.Module):
    """One transformer layer written directly in PyTorch, with the placement's norms."""

    def __init__(self, a, placement):
        super().__init__()
        h, f, bias = a.hidden_size, a.ffn_hidden_size, not a.disable_bias_linear
        norm = (lambda: nn.RMSNorm(h, eps=a.norm_epsilon)) if a.normalization == "RMSNorm" \
            else (lambda: nn.LayerNorm(h, eps=a.norm_epsilon))
        self.heads, self.placement, self.swiglu = a.num_attention_heads, placement, a.swiglu
        self.qkv, self.proj = nn.Linear(h, 3 * h, bias=bias), nn.Linear(h, h, bias=bias)
        self.fc1 = nn.Linear(h, (2 if a.swiglu else 1) * f, bias=bias)
        self.fc2 = nn.Linear(f, h, bias=bias)
        self.n1, self.n2 = norm(), norm()
        if placement == "peri":
            self.n1_out, self.n2_out = norm(), norm()

    def attn(self, x, rope):
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, h))

    def mlp(self, x):
        if self.swiglu:
            gate, up = self.fc1(x).chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * up)
        return self.fc2(F.gelu(self.fc1(x)))

    def forward(self, x, rope):
        if self.placement == "post":
            x = self.n1(x + self.attn(x, rope))
            return self.n2(x + self.mlp(x))
        if self.placement == "peri":
            x = x + self.n1_out(self.attn(self.n1(x), rope))
            return x + self.n2_out(self.mlp(self.n2(x)))
        x = x + self.attn(self.n1(x), rope)
        return x + self.mlp(self.n2(x))


class PlainGPT(nn.Module):
    def __init__(self, a, placement):
        super().__init__()
        h, d = a.hidden_size, a.hidden_size // a.num_attention_heads
        self.wte = nn.Embedding(a.vocab_size, h)
        self.wpe = nn.Embedding(a.seq_length, h) if a.position_embedding_type != "rope" else None
        kinds = [placement] * a.num_layers
        if placement == "mix":
            n_post = int(0.25 * a.num_layers + 0.5)
            kinds = ["post"] * n_post + ["pre"] * (a.num_layers - n_post)
        self.blocks = nn.ModuleList(PlainBlock(a, k) for k in kinds)
        self.ln_f = PlainBlock(a, "pre").n1 if placement != "post" else nn.Identity()
        self.head = None if not a.untie_embeddings_and_output_weights \
            else nn.Linear(h, a.vocab_size, bias=False)
        inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        freqs = torch.outer(torch.arange(a.seq_length, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, ids, labels):
        x = self.wte(ids)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(ids.shape[1]))
        else:
            rope = (self.cos[:ids.shape[1]], self.sin[:ids.shape[1]])
        for block in self.blocks:
            x = block(x, rope)
        logits = F.linear(self.ln_f(x), self.wte.weight if self.head is None else self.head.weight)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))


def _batches(a):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, a.vocab_size, (a.micro_batch_size, a.seq_length + 1), generator=g)
            for _ in range(4)]


def _torch_runner(model, loss_of, a):
    """A step of ``loss_of(model, batch)`` with torch.optim.AdamW (the same hyper-parameters
    as ours, default implementation) and clip_grad_norm_, on ready-made batches."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    batches = _batches(a)

    def step(i):
        with phase("forward+backward"):
            with phase("forward"):
                loss = loss_of(model, batches[i % len(batches)])
            loss.backward()
        with phase("clip+optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
        with phase("zero grads"):
            opt.zero_grad(set_to_none=True)

    def state():  # gradients exist from backward to zero_grad: count one per parameter
        grads = [torch.empty_like(p) for p in model.parameters()]
        return state_bytes(model.parameters(), grads, opt)

    model.train()
    return SimpleNamespace(step=step, forward=lambda: loss_of(model, batches[0]), model=model,
                           state=state)


def plain_runner(a, placement):
    torch.manual_seed(0)
    return _torch_runner(PlainGPT(a, placement), lambda m, b: m(b[:, :-1], b[:, 1:]), a)


# ------------------------------------------------------------------ transformers
def hf_config(a, placement: str):
    """transformers' LlamaConfig (pre) or Glm4Config (peri) of the benchmark's shape, sdpa
    attention; None where no native class holds the shape. Raises ImportError without
    transformers."""
    if placement not in HF_CLASS or a.normalization != "RMSNorm" or not a.swiglu or \
            a.position_embedding_type != "rope":
        return None
    import transformers
    common = dict(vocab_size=a.vocab_size, hidden_size=a.hidden_size,
                  intermediate_size=a.ffn_hidden_size, num_hidden_layers=a.num_layers,
                  num_attention_heads=a.num_attention_heads,
                  num_key_value_heads=a.num_attention_heads,
                  head_dim=a.hidden_size // a.num_attention_heads, hidden_act="silu",
                  max_position_embeddings=a.seq_length, rms_norm_eps=a.norm_epsilon,
                  tie_word_embeddings=not a.untie_embeddings_and_output_weights,
                  attention_bias=not a.disable_bias_linear, attention_dropout=0.0,
                  pad_token_id=None, bos_token_id=None, eos_token_id=None, use_cache=False)
    if placement == "pre":
        config = transformers.LlamaConfig(mlp_bias=not a.disable_bias_linear, **common)
    else:  # Glm4 has no MLP biases and rotates all channels with partial_rotary_factor 1
        config = transformers.Glm4Config(partial_rotary_factor=1.0, **common)
    config._attn_implementation = "sdpa"
    return config


def hf_runner(a, placement: str):
    """transformers' LlamaForCausalLM (pre) or Glm4ForCausalLM (peri) of the same shape, as a
    user trains it: ``model(input_ids, labels=...)``; None for other placements."""
    config = hf_config(a, placement)
    if config is None:
        return None
    import transformers
    torch.manual_seed(0)
    model = getattr(transformers, HF_CLASS[placement])(config)
    return _torch_runner(model, lambda m, b: m(input_ids=b[:, :-1], labels=b[:, :-1]).loss, a)


# ------------------------------------------------------------------ timing
def time_steps(step, n: int, offset: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        step(offset + i)
    return (time.perf_counter() - start) / n


def compiled_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
        return sum(counters["stats"].values()) if "stats" in counters else 0
    except Exception:  # no dynamo in this torch build
        return 0


def build_runners(a, placement: str, recipes, notes: dict, malloc: str = "reuse") -> dict:
    """Every row for ``placement`` timed under the allocator ``malloc``, warmed up (compiled
    where asked); a variant that cannot run is left out with a note why. Each codebase's rows
    run the way its users run it -- ours under ``"reuse"`` (what pretrain_gpt.py sets on a
    CPU), plain PyTorch and transformers under ``"glibc"`` -- and each allocator also times
    the other side's main row, marked ``[glibc]`` / ``[reuse]``, for the same-allocator
    comparison."""
    runners = {}
    for name, overrides in VARIANTS.items():
        if name not in a.variants or (malloc == "glibc" and name != "ours"):
            continue
        key = name if malloc == "reuse" else f"{name} [glibc]"
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                runner = framework_runner(a, placement, **overrides)
                time_steps(runner.step, 2, 0)
        except Exception as e:  # a compile or recompute feature not available here
            label = "compile unavailable" if overrides.get("torch_compile") else "unavailable"
            print(f"warning: {placement} {name}: {type(e).__name__}: {e}")
            notes[(placement, key)] = label
            continue
        failed = [w for w in caught if not issubclass(w.category, DeprecationWarning)
                  and "could not compile" in str(w.message)]
        for w in failed:
            print(f"warning: {placement} {name}: {w.message}")
        if overrides.get("torch_compile"):
            if failed:
                notes[(placement, key)] = "compile unavailable (ran eager)"
            elif compiled_graphs() == 0:  # (later placements may reuse compiled code)
                notes[(placement, key)] = "(nothing compiled)"
        runners[key] = runner
    warmed = set(runners)
    if malloc == "reuse":
        for recipe in recipes:
            runners[f"ours fp8 {recipe}"] = framework_runner(
                a, placement, FP8Recipe(format=a.fp8_format, recipe=recipe))
    else:
        runners["plain"] = plain_runner(a, placement)
    if a.hf:
        try:
            hf = hf_runner(a, placement)
        except ImportError as e:
            hf = None
            notes[(placement, "hf")] = f"transformers not importable ({e}): " \
                                       "pip install -e .[hf]"
        if hf is not None:
            name = "hf " + HF_CLASS[placement][:-len("ForCausalLM")].lower()
            runners[name if malloc == "glibc" else f"{name} [reuse]"] = hf
    for name, runner in runners.items():
        if name not in warmed:
            time_steps(runner.step, 2, 0)
    return runners


def _timing_worker(conn, a, malloc: str, recipes) -> None:
    """A process timing every placement's rows under one allocator: it builds them, measures
    their memory, then runs steps on request until it receives None."""
    torch.set_num_threads(a.threads)
    if malloc == "reuse":
        reuse_freed_memory()
    notes, runners, memory = {}, {}, {}
    for placement in a.placements:
        rows = build_runners(a, placement, recipes, notes, malloc)
        mine = {n: r for n, r in rows.items() if "[" not in n}  # [..]: timed for comparison
        memory[placement] = measure_memory(a, placement, mine, notes)
        runners.update({(placement, n): r for n, r in rows.items()})
    conn.send((list(runners), memory, notes))
    while (request := conn.recv()) is not None:
        key, n, offset = request
        conn.send(time_steps(runners[key].step, n, offset))


class TimingProcesses:
    """One process per allocator setting (glibc's malloc differs process-wide), each holding
    its rows' runners; ``time(key, n, offset)`` runs a row's steps in its process."""

    def __init__(self, a, recipes):
        ctx = torch.multiprocessing.get_context("spawn")
        self.procs, self.conns, self.owner = [], {}, {}
        self.memory, self.notes, self.keys = {p: {} for p in a.placements}, {}, []
        for malloc in MALLOCS:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_timing_worker, args=(theirs, a, malloc, recipes),
                               daemon=True)
            proc.start()
            self.procs.append(proc)
            self.conns[malloc] = mine
        for malloc, conn in self.conns.items():  # built in parallel, collected in turn
            keys, memory, notes = conn.recv()
            self.keys += keys
            self.owner.update({k: malloc for k in keys})
            self.notes.update(notes)
            for p, m in memory.items():
                self.memory[p].update(m)

    def time(self, key, n: int, offset: int) -> float:
        conn = self.conns[self.owner[key]]
        conn.send((key, n, offset))
        return conn.recv()

    def close(self) -> None:
        for conn in self.conns.values():
            conn.send(None)
        for proc in self.procs:
            proc.join(timeout=60)


def time_rounds(a, timer: TimingProcesses) -> dict:
    """Median seconds per step of each row; every round runs every row (rotating who goes
    first) so that a slow spell of the machine hits all of them alike."""
    keys = timer.keys
    times = {key: [] for key in keys}
    for r in range(a.rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[key].append(timer.time(key, a.steps, 2 + r * a.steps))
    return {key: statistics.median(t) for key, t in times.items()}


def machine_load() -> str:
    """The load average and any other busy processes: timings on a shared machine are only
    as good as its quiet."""
    line = "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        import subprocess
        ps = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu"], capture_output=True,
                            text=True, timeout=10).stdout.splitlines()[1:]
        busy = [f"{c} ({u}%)" for pid, u, c in (r.split(None, 2) for r in ps)
                if float(u) >= 20 and int(pid) != os.getpid()]
        line += "; other busy processes: " + (", ".join(busy[:6]) or "none")
    except Exception:  # no ps here
        pass
    return line


# ------------------------------------------------------------------ memory
def measure_memory(a, placement: str, runners: dict, notes: dict) -> dict:
    """{row: (activation bytes, state bytes)}; for the framework's eager and full-recompute
    rows also the layers' share per layer, by differencing against a one-layer model."""
    out = {}
    for name, runner in runners.items():
        try:
            out[name] = (activation_bytes(runner.forward, runner.model), runner.state())
        except Exception as e:  # e.g. saved-tensor hooks inside a compiled region
            notes[(placement, name + " memory")] = f"{type(e).__name__}: {e}"
    if a.num_layers > 1:
        for name in ("ours", "ours full"):
            if name in out:
                one = framework_runner(a, placement, num_layers=1, **VARIANTS[name])
                per_layer = (out[name][0] - activation_bytes(one.forward, one.model)) / \
                    (a.num_layers - 1)
                out[name + " per layer"] = per_layer
    return out


def layer_input_bytes(a, tp: int = 1) -> int:
    """One layer's input, [s / tp, b, h] fp32 (sequence-parallel shard at tp > 1)."""
    return a.seq_length // tp * a.micro_batch_size * a.hidden_size * 4


# ------------------------------------------------------------------ tables
def print_table(a, placement, times, memory, notes, flops, peak, ref):
    """One row per runner: median step, tokens/s, MFU, memory, and the step against ``ref``
    seconds (transformers Llama's eager step, or ours eager without transformers)."""
    tokens = a.micro_batch_size * a.seq_length
    for name in sorted(times, key=lambda n: "[" in n):  # the same-allocator rows last
        sec = times[name]
        act, state = memory.get(name, (float("nan"), float("nan")))
        note = notes.get((placement, name), "")
        print(f"{placement:>9} | {name:<19} | {sec * 1e3:8.1f} | {tokens / sec:9.0f} | "
              f"{flops / sec / 1e9 / peak:6.1%} | {act / MB:8.1f} | {state / MB:8.1f} | "
              f"{(act + state) / MB:8.1f} | {sec / ref:7.3f} {note}".rstrip())
    for name in VARIANTS:
        if (placement, name) in notes and name not in times:
            print(f"{placement:>9} | {name:<19} | {notes[(placement, name)]}")


def print_ratios(results: dict) -> None:
    """The ratios the issue asks for, each from the same alternating rounds."""
    print("\nratios (step time):")
    pre = results.get("pre", {}).get("times", {})
    for p, r in results.items():
        t = r["times"]
        pairs = [("ours / hf llama", t.get("ours"), pre.get("hf llama")),
                 ("compiled / hf llama eager", t.get("ours compiled"), pre.get("hf llama")),
                 ("compiled / ours eager", t.get("ours compiled"), t.get("ours")),
                 ("selective recompute / no recompute", t.get("ours selective"), t.get("ours")),
                 ("full recompute / no recompute", t.get("ours full"), t.get("ours")),
                 ("ours / plain", t.get("ours"), t.get("plain")),
                 ("ours / hf glm4", t.get("ours"), t.get("hf glm4")),
                 ("same allocator: ours / hf llama, both glibc", t.get("ours [glibc]"),
                  pre.get("hf llama")),
                 ("ours / hf llama, both reuse", t.get("ours"), pre.get("hf llama [reuse]")),
                 ("ours / hf glm4, both glibc", t.get("ours [glibc]"), t.get("hf glm4")),
                 ("ours / hf glm4, both reuse", t.get("ours"), t.get("hf glm4 [reuse]")),
                 ("ours reuse / glibc", t.get("ours"), t.get("ours [glibc]")),
                 ("hf reuse / glibc", t.get("hf llama [reuse]") or t.get("hf glm4 [reuse]"),
                  t.get("hf llama") or t.get("hf glm4"))]
        if p != "pre":
            pairs += [(f"{p} / pre, eager", t.get("ours"), pre.get("ours")),
                      (f"{p} / pre, compiled", t.get("ours compiled"), pre.get("ours compiled"))]
        shown = [f"{label} {x / y:.3f}" for label, x, y in pairs if x and y]
        print(f"  {p}: " + "; ".join(shown))


def print_recompute_memory(a, results: dict) -> None:
    """Activation bytes kept for backward, per layer (differenced), against one layer's input."""
    expected = layer_input_bytes(a)
    print(f"\nactivation bytes kept per layer ((bytes at {a.num_layers} layers - bytes at 1) / "
          f"{a.num_layers - 1}); one layer's input [s, b, h] fp32 = {expected / MB:.3f} MB:")
    for p, r in results.items():
        m = r["memory"]
        eager, full = m.get("ours per layer"), m.get("ours full per layer")
        line = f"  {p}: no recompute {eager / MB:.3f} MB" if eager is not None else f"  {p}:"
        if full is not None:
            line += f"; full recompute {full / MB:.3f} MB, inputs only {expected / MB:.3f} MB, " \
                    f"measured / expected {full / expected:.3f}"
        print(line)


def check_targets(a, results: dict) -> bool:
    """Print issue 13's targets against this run; True when none is missed (targets whose
    rows are missing are reported as skipped)."""
    ok = True

    def check(label, value, limit):
        nonlocal ok
        if value is None or math.isnan(value):
            print(f"  [skip] {label}: not measured")
            return
        met = value <= limit
        ok = ok and met
        print(f"  [{'ok' if met else 'MISSED'}] {label}: {value:.3f} (target <= {limit})")

    def ratio(p, num, p2, den):
        t = results.get(p, {}).get("times", {})
        t2 = results.get(p2, {}).get("times", {})
        return t[num] / t2[den] if num in t and den in t2 else None

    print("targets (issue 13; timing targets are informational unless --strict):")
    for p in ("pre", "peri"):
        check(f"{p} ours eager / hf llama eager", ratio(p, "ours", "pre", "hf llama"), 0.95)
        check(f"{p} ours compiled / hf llama eager",
              ratio(p, "ours compiled", "pre", "hf llama"), 0.85)
    check("peri / pre, compiled", ratio("peri", "ours compiled", "pre", "ours compiled"), 1.03)
    check("peri / pre, eager", ratio("peri", "ours", "pre", "ours"), 1.05)
    for p in results:
        check(f"{p} selective recompute / eager", ratio(p, "ours selective", p, "ours"), 1.10)
        per_layer = results[p]["memory"].get("ours full per layer")
        expected = layer_input_bytes(a)
        value = None if per_layer is None else abs(per_layer / expected - 1)
        check(f"{p} full recompute: |layer activation bytes / layer input - 1| "
              f"({(per_layer or 0) / MB:.2f} MB vs {expected / MB:.2f} MB)", value, 0.05)
    return ok


# ------------------------------------------------------------------ memory budget
def param_counts(model: nn.Module):
    """(one layer's tensor-parallel-split, its replicated, the split and replicated counts of
    everything outside the layers) parameter counts of ``model`` (one layer: the first)."""
    layer = model.decoder.layers[0]
    in_layer = {id(p) for p in model.decoder.layers.parameters()}

    def count(params, split):
        return sum(p.numel() for p in params
                   if bool(getattr(p, "tensor_model_parallel", False)) == split)
    rest = [p for p in model.parameters() if id(p) not in in_layer]
    return (count(layer.parameters(), True), count(layer.parameters(), False),
            count(rest, True), count(rest, False))


def budget_layouts(a, memory: dict, model: nn.Module, num_params: int) -> list:
    """(layout, activation bytes per layer, state bytes per layer, fixed bytes) for TP=1
    without recomputation, TP=1 with the distributed optimizer and full recomputation, and
    TP=2 with SP, the distributed optimizer and full recomputation; from the bytes this run
    measured (state bytes per parameter: measured; the optimizer's share, all but parameter
    and gradient, is divided over ``--data-parallel-size`` ranks by the distributed
    optimizer)."""
    d = a.data_parallel_size
    per_param = memory["ours"][1] / num_params
    sharded = 8 + (per_param - 8) / d  # fp32 parameter + gradient stay whole on each rank
    layer_split, layer_repl, rest_split, rest_repl = param_counts(model)
    act_eager = memory["ours per layer"]
    act_full = memory.get("ours full per layer", layer_input_bytes(a))
    fixed_eager = memory["ours"][0] - a.num_layers * act_eager
    fixed_full = memory["ours full"][0] - a.num_layers * act_full if "ours full" in memory \
        else fixed_eager
    rows = [("TP=1, no recompute", act_eager, (layer_split + layer_repl) * per_param,
             fixed_eager + (rest_split + rest_repl) * per_param),
            (f"TP=1, dist-opt /{d}, full recompute", act_full,
             (layer_split + layer_repl) * sharded, fixed_full + (rest_split + rest_repl) * sharded)]
    # TP=2 + SP: weights, the layer input (sequence shard) and the vocabulary-parallel
    # output layer and loss split two ways; norms replicated
    rows.append((f"TP=2+SP, dist-opt /{d}, full recompute", act_full / 2,
                 (layer_split / 2 + layer_repl) * sharded,
                 fixed_full / 2 + (rest_split / 2 + rest_repl) * sharded))
    return rows


def max_layers(budget: float, per_layer: float, fixed: float) -> int:
    return max(0, int((budget - fixed) // per_layer))


def print_budget(a, memory: dict, model: nn.Module, placement: str) -> None:
    """The largest number of layers of this width fitting --memory-budget-gb per rank, per
    layout; then the TP=1 full-recompute prediction at --check-budget-mb, built and measured."""
    num_params = sum(p.numel() for p in model.parameters())
    budget = a.memory_budget_gb * 2 ** 30
    print(f"\nlargest {placement} model of this width within {a.memory_budget_gb:g} GB per rank "
          f"(micro-batch {a.micro_batch_size}, sequence {a.seq_length}, fp32, from measured "
          "bytes per layer):")
    header = f"{'layout':<36} | {'act MB/layer':>12} | {'state MB/layer':>14} | " \
             f"{'fixed MB':>9} | {'max layers':>10}"
    print(header + "\n" + "-" * len(header))
    for name, act, state, fixed in budget_layouts(a, memory, model, num_params):
        print(f"{name:<36} | {act / MB:12.3f} | {state / MB:14.3f} | {fixed / MB:9.1f} | "
              f"{max_layers(budget, act + state, fixed):10d}")
    one_rank = SimpleNamespace(**{**vars(a), "data_parallel_size": 1})
    _, act, state, fixed = budget_layouts(one_rank, memory, model, num_params)[1]
    check = a.check_budget_mb * MB
    layers = max_layers(check, act + state, fixed)
    print(f"check against a run: TP=1, one rank, full recompute, budget {a.check_budget_mb:g} "
          f"MB -> predicted {layers} layers, "
          f"{(fixed + layers * (act + state)) / MB:.1f} MB predicted")
    if layers < 1:
        print("  budget too small for one layer; raise --check-budget-mb")
        return
    run = framework_runner(a, placement, num_layers=layers, **VARIANTS["ours full"])
    run.step(0)  # creates the optimizer state
    measured = activation_bytes(run.forward, run.model) + run.state()
    print(f"  built {layers} layers: measured {measured / MB:.1f} MB "
          f"(measured / predicted {measured / (fixed + layers * (act + state)):.3f}; "
          f"{'fits' if measured <= check else 'DOES NOT FIT'} the budget)")


# ------------------------------------------------------------------ command line
QUICK = dict(num_layers=2, hidden_size=64, ffn_hidden_size=172, num_attention_heads=2,
             seq_length=32, micro_batch_size=2, vocab_size=512, rounds=2, steps=1,
             check_budget_mb=4.0, threads=1)  # one thread: tiny ops stall on a busy machine


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--ffn-hidden-size", type=int, default=688)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--normalization", default="RMSNorm", choices=["LayerNorm", "RMSNorm"])
    p.add_argument("--norm-epsilon", type=float, default=1e-5)
    p.add_argument("--swiglu", default=True, action=argparse.BooleanOptionalAction)
    p.add_argument("--position-embedding-type", default="rope",
                   choices=["rope", "learned_absolute"])
    p.add_argument("--untie-embeddings-and-output-weights", default=True,
                   action=argparse.BooleanOptionalAction)
    p.add_argument("--disable-bias-linear", default=True, action=argparse.BooleanOptionalAction)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--steps", type=int, default=2, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--placements", nargs="+", default=None,
                   help="default: pre post peri mix (pre peri with --quick)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="the framework's rows to run")
    p.add_argument("--hf", default=True, action=argparse.BooleanOptionalAction,
                   help="transformers' Llama / Glm4 rows (when transformers is importable)")
    p.add_argument("--memory-budget-gb", type=float, default=80.0)
    p.add_argument("--data-parallel-size", type=int, default=8,
                   help="ranks the distributed optimizer shards over, in the budget table")
    p.add_argument("--check-budget-mb", type=float, default=256.0,
                   help="budget of the model built to check the budget prediction")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, 2 rounds of 1 step, pre and peri (for tests)")
    p.add_argument("--compare-fp8", action="store_true",
                   help="also time the framework step with FP8 GEMMs and print FP8 / fp32")
    p.add_argument("--fp8-format", default="hybrid", choices=["e4m3", "hybrid"],
                   help="FP8 format of --compare-fp8")
    p.add_argument("--fp8-recipes", nargs="+", default=["delayed", "tensorwise"],
                   choices=["delayed", "tensorwise"], help="FP8 recipes of --compare-fp8")
    a = p.parse_args(argv)
    if a.quick:
        given = {k for k in QUICK if any(arg.startswith("--" + k.replace("_", "-"))
                                         for arg in (argv or sys.argv[1:]))}
        for key, value in QUICK.items():
            if key not in given:
                setattr(a, key, value)
    if a.placements is None:
        a.placements = ["pre", "peri"] if a.quick else ["pre", "post", "peri", "mix"]
    return a


def print_fp8_table(fp32_ms: dict, fp8_ms: dict, recipes, fmt: str) -> None:
    """Per placement: the fp32 step, each recipe's FP8 step and the ratio FP8 / fp32."""
    print(f"\nFP8 GEMMs ({fmt}) against fp32, framework step (informational, no target):")
    header = f"{'placement':>9} | {'fp32 ms':>8}" + "".join(
        f" | {r + ' ms':>13} | {r + '/fp32':>15}" for r in recipes)
    print(header)
    print("-" * len(header))
    for placement, fp32 in fp32_ms.items():
        row = f"{placement:>9} | {fp32:8.1f}"
        for r in recipes:
            row += f" | {fp8_ms[placement][r]:13.1f} | {fp8_ms[placement][r] / fp32:15.2f}"
        print(row)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    recipes = list(dict.fromkeys(a.fp8_recipes)) if a.compare_fp8 else []
    print(f"machine at start: {machine_load()}")
    peak = matmul_gflops()
    tokens = a.micro_batch_size * a.seq_length
    flops = model_flops_per_step(a, tokens)
    timer = TimingProcesses(a, recipes)
    try:
        medians = time_rounds(a, timer)
    finally:
        timer.close()
    notes, memory = timer.notes, timer.memory
    peak_end = matmul_gflops()
    print(f"machine at end: {machine_load()}")
    print(f"fp32 matmul rate: {peak:.1f} GFLOP/s at start, {peak_end:.1f} at end (MFU against "
          f"the higher); {torch.get_num_threads()} threads; {tokens} tokens per step; "
          f"{a.rounds} alternating rounds x {a.steps} steps, median")
    peak = max(peak, peak_end)
    results = {p: {"times": {n: t for (p2, n), t in medians.items() if p2 == p},
                   "memory": memory[p]} for p in a.placements}
    ref = results.get("pre", {}).get("times", {}).get("hf llama")
    ref_name = "/llama" if ref else "/ours"
    header = f"{'placement':>9} | {'row':<19} | {'step ms':>8} | {'tokens/s':>9} | " \
             f"{'MFU':>6} | {'act MB':>8} | {'state MB':>8} | {'peak MB':>8} | {ref_name:>7}"
    print("\n" + header + "\n" + "-" * len(header))
    for p, r in results.items():
        print_table(a, p, r["times"], r["memory"], notes, flops, peak,
                    ref or r["times"].get("ours", float("nan")))
    for (p, n), note in notes.items():
        if n == "hf" or n.endswith("memory"):
            print(f"note: {p} {n}: {note}")
    print_ratios(results)
    print_recompute_memory(a, results)
    if recipes:
        print_fp8_table({p: r["times"]["ours"] * 1e3 for p, r in results.items()},
                        {p: {rc: r["times"][f"ours fp8 {rc}"] * 1e3 for rc in recipes}
                         for p, r in results.items()}, recipes, a.fp8_format)
    first = a.placements[0]
    if "ours per layer" in memory[first]:
        print_budget(a, memory[first], framework_runner(a, first).model, first)
    ok = check_targets(a, results)
    print("targets met" if ok else "TARGET MISSED" + ("" if a.strict else
                                                      " (exit code 0 without --strict)"))
    return 0 if ok or not a.strict else 1


if __name__ == "__main__":
    sys.exit(main())
