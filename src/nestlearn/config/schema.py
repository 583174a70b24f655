"""Typed configuration of a run.

Every YAML file and every `a.b.c=value` override is validated against these dataclasses, so a
misspelt key or a wrong type fails before any work starts. Range checks live in `check()`
methods next to the fields they guard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nestlearn.config.errors import ConfigError

DEFAULT_CORPUS = "stdlib"


@dataclass
class TokenizerConfig:
    """SentencePiece tokenizer trained on the filtered training split (or loaded from `path`)."""

    name: str = "auto"  # "auto": derived from the data fingerprint and the settings below
    path: str | None = None  # an existing .model file to load instead of training one
    model_type: Literal["unigram", "bpe"] = "unigram"
    vocab_size: int = 4096
    character_coverage: float = 1.0
    max_sentences: int = 300_000  # lines sampled for training the tokenizer

    def check(self, where: str) -> None:
        if not 64 <= self.vocab_size <= 1_000_000:
            raise ConfigError(f"{where}.vocab_size", self.vocab_size, "an integer in [64, 1000000]")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ConfigError(
                f"{where}.character_coverage", self.character_coverage, "a number in [0.9, 1.0]"
            )
        if self.max_sentences < 1000:
            raise ConfigError(f"{where}.max_sentences", self.max_sentences, "an integer >= 1000")


@dataclass
class FilterConfig:
    """Document filters applied before tokenisation; what each drops is counted in stats."""

    min_chars: int = 64
    max_chars: int = 2_000_000
    dedup: bool = True  # exact duplicates by content hash
    near_dedup: bool = False  # MinHash-style near duplicates
    near_dedup_threshold: float = 0.9
    language: str | None = None  # e.g. "en" (needs the optional langdetect package)

    def check(self, where: str) -> None:
        if self.min_chars < 0:
            raise ConfigError(f"{where}.min_chars", self.min_chars, "an integer >= 0")
        if self.max_chars <= self.min_chars:
            raise ConfigError(f"{where}.max_chars", self.max_chars, f"an integer > min_chars ({self.min_chars})")
        if not 0.0 < self.near_dedup_threshold <= 1.0:
            raise ConfigError(
                f"{where}.near_dedup_threshold", self.near_dedup_threshold, "a number in (0, 1]"
            )


@dataclass
class DataConfig:
    """Where text comes from and how it becomes token shards."""

    # "stdlib" (the default corpus), files, directories, globs, "*.jsonl", "*.parquet",
    # or "hf:<dataset name>[:<split>]" for Hugging Face datasets (online users only).
    sources: list[str] = field(default_factory=lambda: [DEFAULT_CORPUS])
    weights: list[float] | None = None  # mixture weights, one per source (default: uniform)
    text_field: str = "text"  # field read from JSONL / Parquet / HF records
    val_fraction: float = 0.05  # share of documents (by path hash) held out for validation
    max_docs: int | None = None  # cap per source, after the split is decided (for smoke runs)
    max_chars_per_source: int | None = None  # cap on characters per source (for smoke runs)
    artifacts_dir: str = "artifacts"
    shard_tokens: int = 16_777_216  # tokens per shard file
    filter: FilterConfig = field(default_factory=FilterConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def check(self, where: str) -> None:
        if not self.sources:
            raise ConfigError(f"{where}.sources", self.sources, "a non-empty list of sources")
        if self.weights is not None:
            if len(self.weights) != len(self.sources):
                raise ConfigError(
                    f"{where}.weights", self.weights, f"{len(self.sources)} weights, one per source"
                )
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ConfigError(f"{where}.weights", self.weights, "non-negative weights with a positive sum")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"{where}.val_fraction", self.val_fraction, "a number in (0, 0.5)")
        if self.max_docs is not None and self.max_docs < 2:
            raise ConfigError(f"{where}.max_docs", self.max_docs, "an integer >= 2 or null")
        if self.max_chars_per_source is not None and self.max_chars_per_source < 1000:
            raise ConfigError(
                f"{where}.max_chars_per_source", self.max_chars_per_source, "an integer >= 1000 or null"
            )
        if self.shard_tokens < 1024:
            raise ConfigError(f"{where}.shard_tokens", self.shard_tokens, "an integer >= 1024")
        self.filter.check(f"{where}.filter")
        self.tokenizer.check(f"{where}.tokenizer")


@dataclass
class TitansConfig:
    """The `model.titans:` block of the Titans models (`titans_mac`, `titans_mag`, `titans_mal`,
    `titans_lmm`; Behrouz et al. 2025). Other model types ignore it.

    `memory_*`: the neural long-term memory of every layer (§3.1-§3.2, `NeuralMemoryConfig`):
    `memory_heads` x `memory_head_dim` is its inner width (independent of the attention's
    `n_heads`), `memory_depth`/`memory_expansion` its MLP, `memory_chunk_size` the tokens whose
    gradients share one chunk-start state (Eq. 16), `memory_momentum`/`memory_forgetting` switch
    η/α of Eq. 13, `memory_max_lr` bounds θ, `memory_conv_kernel` the q/k/v convolution (0: off),
    `memory_grad_clip` each token's surprise norm (null: off), `memory_write_bound` keeps the
    state a chunk hands on from stepping past its loss's minimiser (false: the paper's unbounded
    write, which overflows on real text; `memory.write_bound`), `memory_compile` runs its complete
    chunks through torch.compile (`NeuralMemoryConfig.compile`). `segment_size`: MAC's segment
    length C (§4.1). `window`: the sliding attention window of MAG and MAL (§4.2-§4.3), the token
    itself included. `n_persistent`: learned persistent memory tokens per attention layer (§3.3).
    """

    memory_heads: int = 4
    memory_head_dim: int = 32
    memory_depth: int = 2
    memory_expansion: float = 2.0
    memory_chunk_size: int = 16
    memory_momentum: bool = True
    memory_forgetting: bool = True
    memory_max_lr: float = 0.1
    memory_conv_kernel: int = 4
    memory_grad_clip: float | None = None
    memory_write_bound: bool = True
    memory_compile: bool = False
    segment_size: int = 64
    window: int = 64
    n_persistent: int = 4

    def check(self, where: str) -> None:
        for name in ("memory_heads", "memory_head_dim", "memory_depth", "memory_chunk_size",
                     "segment_size", "window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}", getattr(self, name), "an integer >= 1")
        if self.memory_depth >= 2 and round(self.memory_expansion * self.memory_head_dim) < 1:
            raise ConfigError(f"{where}.memory_expansion", self.memory_expansion,
                              "a number giving a hidden width round(expansion * head_dim) >= 1")
        if not 0.0 < self.memory_max_lr <= 10.0:
            raise ConfigError(f"{where}.memory_max_lr", self.memory_max_lr, "a number in (0, 10]")
        if self.memory_conv_kernel < 0:
            raise ConfigError(f"{where}.memory_conv_kernel", self.memory_conv_kernel, "an integer >= 0")
        if self.memory_grad_clip is not None and self.memory_grad_clip <= 0:
            raise ConfigError(f"{where}.memory_grad_clip", self.memory_grad_clip, "a number > 0 or null")
        if self.n_persistent < 0:
            raise ConfigError(f"{where}.n_persistent", self.n_persistent, "an integer >= 0")


@dataclass
class CMSConfig:
    """The `model.cms:` block: the Continuum Memory System of the Hope models (`hope_attention`,
    `hope_attn_titans`; Nested Learning §7). Other model types ignore it.

    `chunk_sizes`: C^(l) of each level, in forward order (level l updates once every C^(l)
    training steps under the level clocks, and every C^(l) tokens in context); `[1]` is a plain
    Transformer MLP. `hidden`: SwiGLU width of every level (null: `mlp_hidden`, else ~8/3
    d_model). `form`: how levels connect and learn their initial states (nested, sequential,
    independent: Eqs. 72-74). `in_context`: levels keep learning at test time from the
    next-token loss of the tokens seen (every chunk size must then be >= 2 and a multiple of the
    smallest; nested also needs each to divide the next larger). `lr`: the in-context learning
    rates η^(l), one for all levels or one per level.
    """

    chunk_sizes: list[int] = field(default_factory=lambda: [1])
    hidden: int | None = None
    form: Literal["nested", "sequential", "independent"] = "sequential"
    in_context: bool = False
    lr: list[float] = field(default_factory=lambda: [0.01])

    def level_lrs(self) -> list[float]:
        """η^(l) for every level."""
        return list(self.lr) * len(self.chunk_sizes) if len(self.lr) == 1 else list(self.lr)

    def check(self, where: str) -> None:
        sizes = self.chunk_sizes
        if not sizes or any(c < 1 for c in sizes):
            raise ConfigError(f"{where}.chunk_sizes", sizes, "a non-empty list of integers >= 1")
        if self.hidden is not None and self.hidden < 1:
            raise ConfigError(f"{where}.hidden", self.hidden, "an integer >= 1 or null")
        if len(self.lr) not in (1, len(sizes)) or any(lr < 0 for lr in self.lr):
            raise ConfigError(f"{where}.lr", self.lr,
                              f"one number >= 0, or {len(sizes)} (one per level)")
        if self.form == "nested" and len(set(sizes)) != len(sizes):
            raise ConfigError(f"{where}.chunk_sizes", sizes, "distinct chunk sizes (nested form)")
        if not self.in_context:
            return
        smallest = min(sizes)
        if smallest < 2 or any(c % smallest for c in sizes):
            raise ConfigError(f"{where}.chunk_sizes", sizes, "chunk sizes >= 2, multiples of the "
                              "smallest (in_context: each chunk learns from its own next tokens)")
        ordered = sorted(set(sizes))
        if self.form == "nested" and any(ordered[i + 1] % ordered[i] for i in range(len(ordered) - 1)):
            raise ConfigError(f"{where}.chunk_sizes", sizes,
                              "chunk sizes that each divide the next larger (nested in_context)")


@dataclass
class SelfRefConfig:
    """The `model.self_ref:` block: the self-referential Titans mixer of `hope` (heads =
    `model.n_heads`, head size d_model / n_heads). The paper's ablation rows: `dgd: false`
    (plain gradient step), `momentum: false` (no momentum inside the memories),
    `weight_decay: false` (α_t ≡ 1, no forget gate), and `static_projections` (which of k, v, q
    are static projections x W, i.e. moved to the lowest-frequency level; Hope's own is [q],
    `[q, k]` or `[q, v]` are the ablations, `[]` generates q by a memory too). `v_norm`
    L2-normalises v as the paper does q and k: not in the paper, but without it the
    self-generated targets feed back and overflow within a few hundred tokens at our init.
    `in_chunk_reads` lets o_t read the memory with its chunk's earlier writes applied (the
    per-token recurrence's read; false: the chunk-start memory, Eq. 90's read, the ablation).
    `mix_input` gives every head's memories the whole token (a d x d projection before the head
    split, as the paper's R^d -> R^d memories, starting as the identity; off, the default, as it
    trained worse at smoke scale: each reads its d/H slice). `step_bound` keeps a chunk's summed
    steps stable (`dgd_chunk.chunk_step_scale`; false: Eq. 90 as is, which diverged at chunk 8).
    `curvature_step` normalises each memory layer's step by its Gauss-Newton curvature along the
    token's gradient, the layers above it included (`dgd_chunk.layer_step`; false: by its input
    energy alone, with which a trained HOPE's memory diverged past its training length).
    `compile` runs each chunk through torch.compile; `activation_budget` (with it) is the share
    of the compiled chunk's activations kept for backward, the rest recomputed there
    (`SelfRefTitansConfig.activation_budget`): what lets long sequences train without
    `train.activation_checkpointing`."""

    depth: int = 2
    expansion: float = 1.0
    memory_chunk_size: int = 64
    other_chunk_size: int = 64
    momentum: bool = True
    dgd: bool = True
    qk_norm: bool = True
    v_norm: bool = True
    conv_kernel: int = 4
    eta_max: float = 0.5
    weight_decay: bool = True
    static_projections: list[str] = field(default_factory=lambda: ["q"])
    in_chunk_reads: bool = True
    mix_input: bool = False
    step_bound: bool = True
    curvature_step: bool = True
    compile: bool = False  # torch.compile each chunk step (SelfRefTitansConfig.compile)
    activation_budget: float = 1.0  # with compile: share of the chunk's activations kept for backward

    def check(self, where: str) -> None:
        static = self.static_projections
        if len(set(static)) != len(static) or not set(static) <= {"k", "v", "q"}:
            raise ConfigError(f"{where}.static_projections", static,
                              "a list of distinct names among k, v, q (Hope: [q])")
        for name in ("depth", "memory_chunk_size", "other_chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}", getattr(self, name), "an integer >= 1")
        if self.expansion <= 0:
            raise ConfigError(f"{where}.expansion", self.expansion, "a number > 0")
        if self.conv_kernel < 0:
            raise ConfigError(f"{where}.conv_kernel", self.conv_kernel, "an integer >= 0 (0 disables)")
        if not 0.0 < self.eta_max <= 1.0:
            raise ConfigError(f"{where}.eta_max", self.eta_max, "a number in (0, 1]")
        if not 0.0 < self.activation_budget <= 1.0:
            raise ConfigError(f"{where}.activation_budget", self.activation_budget, "a number in (0, 1]")


@dataclass
class ModelConfig:
    """Architecture; `type` picks the registry entry (see `nestlearn.models.available()`)."""

    type: str = "transformer"
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_hidden: int | None = None  # default: the SwiGLU width ~ 8/3 d_model, rounded to 32
    vocab_size: int | None = None  # default: the tokenizer's vocabulary
    max_seq_len: int = 4096  # the longest context the RoPE cache is built for (grows on demand)
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = True
    titans: TitansConfig = field(default_factory=TitansConfig)
    cms: CMSConfig = field(default_factory=CMSConfig)
    self_ref: SelfRefConfig = field(default_factory=SelfRefConfig)

    def check(self, where: str) -> None:
        for name in ("d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}", getattr(self, name), "an integer >= 1")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"{where}.n_heads", self.n_heads, f"a divisor of d_model ({self.d_model})"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"{where}.n_heads", self.n_heads, "a head size d_model/n_heads that is even (RoPE)")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ConfigError(f"{where}.mlp_hidden", self.mlp_hidden, "an integer >= 1 or null")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ConfigError(f"{where}.vocab_size", self.vocab_size, "an integer >= 2 or null")
        self.titans.check(f"{where}.titans")
        self.cms.check(f"{where}.cms")
        self.self_ref.check(f"{where}.self_ref")
        if self.self_ref.compile and self.cms.in_context:  # in-context CMS differentiates its gradients
            raise ConfigError(f"{where}.self_ref.compile", True,
                              "false with cms.in_context (a compiled backward has no double backward)")


@dataclass
class NestedOptimizerConfig:
    """The port guide's `nested_optimizer:` block (used when `optimizer.type: nested`)."""

    meta_lr: float = 1e-4
    k_unroll: int = 5
    cms_frequencies: list[int] = field(default_factory=lambda: [1, 10, 100])
    momentum_hidden_dim: int = 64
    controller_hidden_dim: int = 32
    use_gradient_checkpointing: bool = True
    mode: Literal["simple", "explicit"] = "simple"
    meta_update_freq: int = 100
    weight_decay: float = 0.0

    def check(self, where: str) -> None:
        if not 0.0 < self.meta_lr < 1.0:
            raise ConfigError(f"{where}.meta_lr", self.meta_lr, "a number in (0, 1)")
        for name in ("k_unroll", "momentum_hidden_dim", "controller_hidden_dim", "meta_update_freq"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}", getattr(self, name), "an integer >= 1")
        if not self.cms_frequencies or any(f < 1 for f in self.cms_frequencies):
            raise ConfigError(f"{where}.cms_frequencies", self.cms_frequencies,
                              "a non-empty list of integers >= 1")
        if self.weight_decay < 0:
            raise ConfigError(f"{where}.weight_decay", self.weight_decay, "a number >= 0")


@dataclass
class OptimizerConfig:
    """Outer-loop optimizer and learning-rate schedule.

    `adamw` is the baseline; `delta_momentum`, `dmgd` and `m3` are the Nested Learning paper's
    optimizers; `nested` is the port guide's DeepNestedOptimizer, whose learned controller owns
    the learning rate (the schedule below is then skipped); `chunked` is AdamW on level clocks
    for models that declare CMS levels (each level steps once per its chunk of steps), with
    `level_lr` the rule for a level's learning rate from its chunk size C (`level_clock.level_lr`:
    `mean` base lr / C, the seed's and the default, under which AdamW moves a slow level 1/C² as
    far per token as the fast one, measured best for HOPE (docs/results.md); `flat` 1, `sqrt` √C,
    `linear` C).
    """

    type: Literal["adamw", "nested", "dmgd", "delta_momentum", "m3", "chunked"] = "adamw"
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 20
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    momentum: float = 0.9  # delta_momentum and dmgd
    matrix_lr: float | None = None  # dmgd/m3: lr of the orthogonalised hidden matrices (default lr)
    m3_frequency: int = 100  # m3: steps between slow-momentum updates
    m3_alpha: float = 1.0  # m3: weight of the slow momentum
    nested_optimizer: NestedOptimizerConfig = field(default_factory=NestedOptimizerConfig)
    level_lr: Literal["mean", "flat", "sqrt", "linear"] = "mean"

    def check(self, where: str) -> None:
        if not 0.0 < self.lr < 1.0:
            raise ConfigError(f"{where}.lr", self.lr, "a number in (0, 1)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{where}.betas", self.betas, "two numbers in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError(f"{where}.weight_decay", self.weight_decay, "a number >= 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"{where}.warmup_steps", self.warmup_steps, "an integer >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{where}.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{where}.momentum", self.momentum, "a number in [0, 1)")
        if self.matrix_lr is not None and not 0.0 < self.matrix_lr < 1.0:
            raise ConfigError(f"{where}.matrix_lr", self.matrix_lr, "a number in (0, 1) or null")
        if self.m3_frequency < 1:
            raise ConfigError(f"{where}.m3_frequency", self.m3_frequency, "an integer >= 1")
        if self.m3_alpha < 0:
            raise ConfigError(f"{where}.m3_alpha", self.m3_alpha, "a number >= 0")
        self.nested_optimizer.check(f"{where}.nested_optimizer")


@dataclass
class TrainConfig:
    """The outer training loop."""

    steps: int = 200
    batch_size: int = 8  # sequences per micro-batch
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast on the forward pass
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_checkpoints: int = 2  # newest checkpoints kept (0 keeps all)
    log_every: int = 10
    max_bad_steps: int = 5  # consecutive non-finite losses tolerated (step skipped) before a rollback
    max_rollbacks: int = 2  # then back to the last checkpoint at a lower lr, this often; then fail
    rollback_lr_factor: float = 0.5  # the learning rate's factor at each rollback
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    flush_subnormals: bool = True  # FTZ/DAZ on CPU: the memories' decays make subnormals (utils.numerics)
    retain_freed_memory: bool = True  # glibc keeps freed memory for reuse: no page faults per step (utils.host_memory)

    def check(self, where: str) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches",
                     "ckpt_every", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}", getattr(self, name), "an integer >= 1")
        if self.grad_clip < 0:
            raise ConfigError(f"{where}.grad_clip", self.grad_clip, "a number >= 0 (0 disables)")
        if self.max_rollbacks < 0:
            raise ConfigError(f"{where}.max_rollbacks", self.max_rollbacks, "an integer >= 0 (0: fail at once)")
        if not 0 < self.rollback_lr_factor <= 1:
            raise ConfigError(f"{where}.rollback_lr_factor", self.rollback_lr_factor, "a number in (0, 1]")
        if self.keep_checkpoints < 0:
            raise ConfigError(f"{where}.keep_checkpoints", self.keep_checkpoints, "an integer >= 0")
        if self.threads < 0:
            raise ConfigError(f"{where}.threads", self.threads, "an integer >= 0")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"{where}.device", self.device, "one of auto, cpu, cuda, cuda:N")


@dataclass
class ParallelConfig:
    """Data parallelism over the processes `torchrun` starts (`nestlearn.train.distributed`)."""

    strategy: Literal["none", "ddp", "fsdp"] = "none"  # fsdp: FSDP2 fully_shard per block, then the root
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    sharded_checkpoints: bool = False  # fsdp: each rank writes its shards (train.sharded_checkpoint)

    def check(self, where: str) -> None:
        if self.sharded_checkpoints and self.strategy != "fsdp":
            raise ConfigError(f"{where}.sharded_checkpoints", True,
                              f"false with parallel.strategy={self.strategy} (only FSDP shards its state)")


@dataclass
class LoggingConfig:
    """Metric sinks: JSONL is always written; the others are opt-in."""

    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "nestlearn"
    progress: Literal["auto", "bar", "lines", "none"] = "auto"  # auto: a bar on a TTY

    def check(self, where: str) -> None:
        return None


@dataclass
class RunConfig:
    """A whole run: data, model, optimizer, training loop and logging."""

    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def check(self, where: str = "") -> None:
        if not self.name or any(c in self.name for c in "/\\ ") or self.name.startswith("."):
            raise ConfigError("name", self.name, "a run name without '/', '\\' or spaces")
        self.data.check("data")
        self.model.check("model")
        self.optimizer.check("optimizer")
        self.train.check("train")
        self.parallel.check("parallel")
        self.logging.check("logging")
        if self.parallel.strategy == "fsdp" and self.optimizer.type == "nested":
            raise ConfigError("optimizer.type", "nested", "another optimizer with parallel.strategy=fsdp (the "
                              "nested optimizer's meta-update samples whole tensors), or parallel.strategy=ddp")
        cms = self.model.cms
        if cms.in_context and self.model.type.startswith("hope") and max(cms.chunk_sizes) > self.train.seq_len:
            raise ConfigError("model.cms.chunk_sizes", cms.chunk_sizes,
                              f"in-context chunk sizes <= train.seq_len ({self.train.seq_len}): a "
                              "longer chunk never completes inside a sequence, so it never fires")
