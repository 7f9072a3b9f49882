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
import contextlib
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
def hf_runner(a, placement: str):
    """transformers' LlamaForCausalLM (pre) or Glm4ForCausalLM (peri) of the same shape, as a
    user trains it: ``model(input_ids, labels=...)``, sdpa attention; None for other
    placements. Raises ImportError without transformers."""
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


def build_runners(a, placement: str, recipes, notes: dict) -> dict:
    """Every row's runner for ``placement``; warms each up (compiling where asked) and
    leaves out those that cannot run, with a note why."""
    runners = {}
    for name, overrides in VARIANTS.items():
        if name not in a.variants:
            continue
        before = compiled_graphs()
        try:
            runner = framework_runner(a, placement, **overrides)
            time_steps(runner.step, 2, 0)
        except Exception as e:  # a compile or recompute feature not available here
            label = "compile unavailable" if overrides.get("torch_compile") else "unavailable"
            warnings.warn(f"{placement} {name}: {type(e).__name__}: {e}")
            notes[(placement, name)] = label
            continue
        if overrides.get("torch_compile") and compiled_graphs() == before:
            notes[(placement, name)] = "nothing compiled"
        runners[name] = runner
    for recipe in recipes:
        runners[f"ours fp8 {recipe}"] = framework_runner(
            a, placement, FP8Recipe(format=a.fp8_format, recipe=recipe))
    runners["plain"] = plain_runner(a, placement)
    if a.hf:
        try:
            hf = hf_runner(a, placement)
        except ImportError as e:
            hf = None
            notes[(placement, "hf")] = f"transformers not importable ({e}); " \
                                       "pip install -e .[hf]"
        if hf is not None:
            runners["hf " + HF_CLASS[placement][:-len("ForCausalLM")].lower()] = hf
    for name, runner in runners.items():
        if name not in VARIANTS:  # the framework's variants were warmed up above
            time_steps(runner.step, 2, 0)
    return runners


def time_rounds(a, runners: dict) -> dict:
    """Median seconds per step of each runner; rounds alternate between runners (rotating
    who goes first) so that a slow spell of the machine hits all of them alike."""
    times = {name: [] for name in runners}
    names = list(runners)
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(time_steps(runners[name].step, a.steps, 2 + r * a.steps))
    return {name: statistics.median(t) for name, t in times.items()}
