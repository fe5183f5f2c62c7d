"""The student: a small decoder-only transformer in the Gemma style.

The student reads a comment as teacher (Gemma 3) token ids, followed by the answer so
far, and predicts at every position a distribution over the task's small output
vocabulary (525 tokens by default), trained to match the teacher's (see losses.py).
Context 75 = 25 comment tokens + 50 answer tokens.

Where each piece comes from:
- Pre-norm residual blocks: GPT-2 (Radford et al. 2019); Xiong et al. 2020, "On Layer
  Normalization in the Transformer Architecture".
- RMSNorm: Zhang & Sennrich 2019, with Gemma's `(1 + weight)` convention (weights start
  at zero, so every norm starts as the identity scale), computed in float32 and cast back
  (Gemma Team 2024, "Gemma"; 2025, "Gemma 3 Technical Report").
- Rotary position embeddings, RoPE: Su et al. 2021, "RoFormer", in the rotate-half
  layout that Gemma and Llama use in transformers.
- GeGLU feed-forward: Shazeer 2020, "GLU Variants Improve Transformer", with the tanh
  approximation of GELU (Hendrycks & Gimpel 2016), as in Gemma.
- Multi-head causal attention: Vaswani et al. 2017, through
  torch.nn.functional.scaled_dot_product_attention (FlashAttention, Dao et al. 2022,
  where the hardware has it).
- Input embeddings multiplied by sqrt(d_model), as Gemma does (and Vaswani et al. 2017,
  section 3.4). With init_std 0.02 and d_model 1024 the residual stream starts at
  RMS ~0.64 instead of 0.02, so the first blocks' updates do not swamp the token identity.
- Factorised (low-rank) input embedding, Embedding(V_in, R) then Linear(R, D): ALBERT
  (Lan et al. 2019). The 262,144-token input vocabulary otherwise dominates the count
  (262,144 x 1024 = 268M of the original 537M).
- Initialisation: normal(0, init_std) with the residual output projections scaled by
  1/sqrt(2 * n_layers) (GPT-2); optionally the input embedding from the teacher's
  (`init_embedding_from_teacher`, truncated SVD / PCA, Eckart & Young 1936).
- Untied output head Linear(D, V_out): the output vocabulary (525 tokens) is not the
  input vocabulary (262,144).
- Teacher-shaped blocks, so a student can start as a pruned copy of the teacher
  (`init_from_teacher_layers`; DistilBERT, Sanh et al. 2019, initialised its student from
  every other teacher layer; Gromov et al. 2024, "The Unreasonable Ineffectiveness of the
  Deeper Layers", and Men et al. 2024, "ShortGPT", prune a decoder's layers directly):
  grouped-query attention (`n_kv_heads`; Ainslie et al. 2023, "GQA"), a head width of its
  own (`head_dim`), RMSNorm on queries and keys (`qk_norm`; Gemma 3), norms on the
  attention and feed-forward outputs too (`post_norms`, Gemma 2/3's "sandwich"), and a
  RoPE base per layer (`layer_rope_theta`: Gemma 3's local 10k / global 1M layers).

Shape letters: B batch, T time, D d_model, H heads, Dh head dim, F d_ff,
R embedding rank, V_in input vocabulary, V_out output vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Configuration

# Parameter count, with V_in = 262,144, V_out = 525:
#   embeddings   V_in * D                  (full, embed_rank = 0)
#                V_in * R + R * D          (factorised, embed_rank = R)
#   per layer    4 * D^2 (q, k, v, o) + 3 * D * F (gate, up, down) + 2 * D (two norms)
#   final norm   D;   output head  D * V_out
# 537m: 268,435,456 + 16 * (4,194,304 + 12,582,912 + 2,048) + 1,024 + 537,600
#       = 537,442,304. d_ff = 4096 (4 * D) is what lands the original's 537M; the
#       earlier "470M" count fits a narrower d_ff (~2,700, about 8/3 * D).
# 200m: 67,108,864 + 196,608 + 14 * (2,359,296 + 7,077,888 + 1,536) + 768 + 403,200
#       = 199,851,520 (rank 256, as the original's low-rank variant).
# 50m:  16,777,216 + 32,768 + 8 * (1,048,576 + 3,145,728 + 1,024) + 512 + 268,800
#       = 50,641,920. Rank 256 alone would be 67M, so rank 64; the rest goes to depth.
# tiny: 4,194,304 + 1,024 + 2 * (16,384 + 24,576 + 128) + 64 + 33,600 = 4,311,168 (tests).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, d_ff=128, embed_rank=16),
    "50m": dict(d_model=512, n_layers=8, n_heads=8, d_ff=2048, embed_rank=64),
    "200m": dict(d_model=768, n_layers=14, n_heads=12, d_ff=3072, embed_rank=256),
    "537m": dict(d_model=1024, n_layers=16, n_heads=16, d_ff=4096, embed_rank=0),
}
PRESET_FIELDS = ("d_model", "n_layers", "n_heads", "d_ff", "embed_rank")


def _check(ok: bool, name: str, value, why: str) -> None:
    if not ok:
        raise ValueError(f"student.{name}={value!r}: {why}")


@dataclass
class StudentConfig:
    preset: str = "tiny"
    """Size preset: tiny | 50m | 200m | 537m. It fills the five size fields below that are
    left null; a field given explicitly wins over the preset."""
    d_model: Optional[int] = None
    """Hidden size D (null = from the preset)."""
    n_layers: Optional[int] = None
    """Transformer blocks (null = from the preset)."""
    n_heads: Optional[int] = None
    """Attention (query) heads (null = from the preset)."""
    d_ff: Optional[int] = None
    """GeGLU inner size F (null = from the preset)."""
    embed_rank: Optional[int] = None
    """Input embedding rank R: 0 = a full Embedding(V_in, D); R > 0 = Embedding(V_in, R)
    then Linear(R, D) (null = from the preset)."""
    input_vocab_size: Optional[int] = None
    """Input vocabulary: the teacher tokenizer's size (Gemma 3: 262,144; its -it models: 262,145);
    null = take it from the tokenizer when training or a benchmark starts."""
    output_vocab_size: int = 525
    """Output vocabulary: the task's answer tokens plus auxiliary tokens (vocab.size)."""
    max_comment_tokens: int = 25
    """Longest comment, in teacher tokens."""
    max_answer_tokens: int = 50
    """Longest answer, in teacher tokens."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    n_kv_heads: Optional[int] = None
    """Key/value heads, grouped-query attention (null = n_heads: ordinary multi-head attention)."""
    head_dim: Optional[int] = None
    """Width of each attention head, even for RoPE (null = d_model / n_heads)."""
    query_scale: Optional[float] = None
    """Multiplier of the attention scores q.k (null = 1 / sqrt(head_dim); Gemma 3: query_pre_attn_scalar^-0.5)."""
    qk_norm: bool = False
    """RMSNorm on every head's queries and keys before RoPE (Gemma 3's blocks)."""
    post_norms: bool = False
    """Also RMSNorm the attention and feed-forward outputs before they join the residual stream
    (Gemma 2/3's sandwich norms)."""
    layer_rope_theta: Optional[list[float]] = None
    """RoPE base of each layer (Gemma 3: 10k in sliding-window layers, 1M in global ones);
    null = rope_theta in every layer."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (0 = none)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation, and the entry RMS that a
    teacher-initialised input embedding is rescaled to."""

    def __post_init__(self):
        _check(self.preset in PRESETS, "preset", self.preset, f"must be one of {', '.join(PRESETS)}")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_comment_tokens", "max_answer_tokens"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        if self.head_dim is None:
            _check(self.d_model % self.n_heads == 0, "d_model", self.d_model,
                   f"must be divisible by student.n_heads ({self.n_heads}), or give student.head_dim")
            self.head_dim = self.d_model // self.n_heads
        _check(self.head_dim >= 2 and self.head_dim % 2 == 0, "head_dim", self.head_dim,
               "must be even for rotary embeddings (null: d_model / n_heads)")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _check(self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0, "n_kv_heads", self.n_kv_heads,
               f"must divide student.n_heads ({self.n_heads})")
        _check(self.query_scale is None or self.query_scale > 0, "query_scale", self.query_scale, "must be > 0 or null")
        if self.layer_rope_theta is not None:
            self.layer_rope_theta = [float(t) for t in self.layer_rope_theta]
            _check(len(self.layer_rope_theta) == self.n_layers and min(self.layer_rope_theta) > 0,
                   "layer_rope_theta", self.layer_rope_theta,
                   f"must give one positive base per layer ({self.n_layers}), or be null")
        _check(0 <= self.embed_rank < self.d_model, "embed_rank", self.embed_rank,
               f"must be 0 (full embedding) or between 1 and student.d_model - 1 ({self.d_model - 1})")
        _check(self.input_vocab_size is None or self.input_vocab_size >= 1, "input_vocab_size", self.input_vocab_size,
               "must be >= 1 or null")
        _check(self.output_vocab_size >= 2, "output_vocab_size", self.output_vocab_size, "must be >= 2")
        _check(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        _check(self.init_std > 0, "init_std", self.init_std, "must be > 0")

    @property
    def context(self) -> int:
        """Longest sequence the student reads: comment + answer."""
        return self.max_comment_tokens + self.max_answer_tokens

    def rope_thetas(self) -> list[float]:
        """The RoPE base of every layer."""
        return self.layer_rope_theta or [self.rope_theta] * self.n_layers


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """RMSNorm with Gemma's (1 + weight) scale, computed in float32 (as Gemma3RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., D)
        return (y * (1.0 + self.weight.float())).type_as(x)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles at integer `positions` (any shape P), each (*P, Dh), float32.

    Computed on the fly (75 x 32 numbers): no buffer to go stale on the `meta` device."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    inv_freq = 1.0 / (theta ** exponents)  # (Dh/2,)
    angles = positions.float()[..., None] * inv_freq  # (*P, Dh/2)
    angles = torch.cat((angles, angles), dim=-1)  # (*P, Dh)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate query or key vectors x (B, H, T, Dh) by their positions' angles (rotate-half layout)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, Dh/2) each
    rotated = torch.cat((-x2, x1), dim=-1)  # (B, H, T, Dh)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with RoPE on queries and keys; grouped-query when n_kv_heads < n_heads."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout, self.scale = cfg.dropout, cfg.query_scale
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else None

    def forward(self, x, cos, sin, mask: Optional[torch.Tensor], cache: Optional["KVCache"] = None,
                layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, Dh)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, Dh)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q.transpose(1, 2), cos, sin), apply_rotary(k.transpose(1, 2), cos, sin)  # (B, H|Hkv, T, Dh)
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # (B, Hkv, S + T, Dh): the tokens read before, then these
        # no mask: the causal fast path (FlashAttention on GPU); mask: (B, 1, T, S + T), True = may attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * Dh)
        return self.o_proj(y)  # (B, T, D)


class MLP(nn.Module):
    """GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x)), as Gemma3MLP."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)  # (B, T, F)
        return self.down_proj(h)  # (B, T, D)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); with post_norms,
    x + norm(attn(norm(x))), then x + norm(mlp(norm(x))) (Gemma 3's decoder layer)."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.attn_post_norm = RMSNorm(cfg.d_model) if cfg.post_norms else nn.Identity()
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.mlp_post_norm = RMSNorm(cfg.d_model) if cfg.post_norms else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, cache: Optional["KVCache"] = None, layer: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn_post_norm(self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)))  # (B, T, D)
        x = x + self.drop(self.mlp_post_norm(self.mlp(self.mlp_norm(x))))  # (B, T, D)
        return x


# -----------------------------------------------------------------------------
# The student


class KVCache:
    """Keys and values of every token a student has read, per layer: incremental decoding.

    Each forward pass with the cache reads only the new tokens of each row and attends to
    the cached ones. Rows may have padding anywhere (a left-padded prompt, then chunks of
    different lengths): `real` marks the real tokens, and `n_real` counts them, so every
    real token gets the position it would have had without padding and the logits are
    those of one forward pass over the unpadded sequence."""

    def __init__(self, n_layers: int):
        self.k: list[Optional[torch.Tensor]] = [None] * n_layers  # per layer (B, H, S, Dh)
        self.v: list[Optional[torch.Tensor]] = [None] * n_layers  # per layer (B, H, S, Dh)
        self.real: Optional[torch.Tensor] = None  # (B, S) bool, real tokens among the S cached slots
        self.n_real: Optional[torch.Tensor] = None  # (B,) long, real tokens read so far

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one layer's new keys and values (B, H, T, Dh); return all of them (B, H, S + T, Dh)."""
        if self.k[layer] is not None:
            k, v = torch.cat((self.k[layer], k), dim=2), torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row but `rows` (B',) (finished sequences leave the batch)."""
        self.k = [k[rows] if k is not None else None for k in self.k]
        self.v = [v[rows] if v is not None else None for v in self.v]
        if self.real is not None:
            self.real, self.n_real = self.real[rows], self.n_real[rows]


class Student(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        _check(cfg.input_vocab_size is not None, "input_vocab_size", None,
               "a student needs the teacher tokenizer's size (training fills it in)")
        r = cfg.embed_rank
        self.embed = nn.Embedding(cfg.input_vocab_size, r if r > 0 else cfg.d_model)
        self.embed_proj = nn.Linear(r, cfg.d_model, bias=False) if r > 0 else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.output_vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std); o_proj and down_proj (which write into the residual stream)
        scaled by 1/sqrt(2 * n_layers) (GPT-2); norms at zero (scale 1 + 0). The factorised
        embedding's projection gets std 1/sqrt(R), so embed_proj(embed(x)) has entries of
        std init_std, the same as a full embedding."""
        cfg = self.cfg
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.zeros_(p)
            elif name == "embed_proj.weight":
                nn.init.normal_(p, std=1.0 / math.sqrt(cfg.embed_rank))
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
            else:
                nn.init.normal_(p, std=cfg.init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """Logits (B, T, V_out) over the output vocabulary at every position.

        input_ids (B, T) teacher token ids, T <= context; positions are 0..T-1.
        attention_mask (B, T), True at real tokens. With right padding, real positions
        never attend to padding anyway (attention is causal), so their logits equal the
        unpadded ones; the mask also hides padding keys for other layouts (RoPE is
        relative, so left padding gives the same logits too). Each position may always
        attend to itself, so a row of padding never has all keys masked (no NaN).
        Logits at padded positions are meaningless; losses mask them out.

        With a KVCache (decoding), input_ids are the tokens that follow those already
        cached, attention_mask is required, and the cache grows by these tokens."""
        B, T = input_ids.shape
        x = self.embed(input_ids)  # (B, T, R) or (B, T, D)
        if self.embed_proj is not None:
            x = self.embed_proj(x)  # (B, T, D)
        x = self.drop(x * math.sqrt(self.cfg.d_model))  # (B, T, D), Gemma's sqrt(D) scale
        if cache is None:
            if T > self.cfg.context:
                raise ValueError(f"sequence length {T} exceeds the student's context {self.cfg.context}")
            positions = torch.arange(T, device=x.device)  # (T,)
            mask = None
            if attention_mask is not None:
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
                self_ = torch.eye(T, dtype=torch.bool, device=x.device)  # (T, T)
                keys = attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, T)
                mask = causal & (keys | self_)  # (B, 1, T, T)
        else:
            positions, mask = self._read_into(cache, attention_mask.to(device=x.device, dtype=torch.bool))
        rotary = {theta: rotary_cos_sin(positions, self.cfg.head_dim, theta)  # (T, Dh) or (B, 1, T, Dh) each
                  for theta in set(self.cfg.rope_thetas())}
        for i, (block, theta) in enumerate(zip(self.blocks, self.cfg.rope_thetas())):
            x = block(x, *rotary[theta], mask, cache, i)  # (B, T, D)
        return self.head(self.norm(x))  # (B, T, V_out)

    def _read_into(self, cache: KVCache, real: torch.Tensor):
        """Positions (B, 1, T) and attention mask (B, 1, T, S + T) of T new tokens read after the
        cache's S slots; records them in the cache as read."""
        B, T = real.shape
        if cache.real is None:
            cache.real = torch.zeros(B, 0, dtype=torch.bool, device=real.device)
            cache.n_real = torch.zeros(B, dtype=torch.long, device=real.device)
        S = cache.real.shape[1]
        positions = cache.n_real[:, None] + real.long().cumsum(1) - 1  # (B, T), padding repeats a position
        if int(positions.max()) >= self.cfg.context:  # host sync: once per call
            raise ValueError(f"sequence length {int(positions.max()) + 1} exceeds the student's context "
                             f"{self.cfg.context}")
        keys = torch.cat((cache.real, real), dim=1)  # (B, S + T)
        causal = torch.ones(T, S + T, dtype=torch.bool, device=real.device).tril(diagonal=S)  # (T, S + T)
        self_ = torch.zeros(T, S + T, dtype=torch.bool, device=real.device)
        self_[:, S:] = torch.eye(T, dtype=torch.bool, device=real.device)  # (T, S + T)
        mask = causal & (keys[:, None, None, :] | self_)  # (B, 1, T, S + T)
        cache.real, cache.n_real = keys, cache.n_real + real.sum(1)
        return positions.clamp(min=0)[:, None], mask

    def param_overview(self) -> dict[str, int]:
        """Parameter counts by part: embeddings, attention, feed_forward, norms, output_head, total."""
        overview = dict(embeddings=0, attention=0, feed_forward=0, norms=0, output_head=0)
        for name, p in self.named_parameters():
            if name.startswith(("embed.", "embed_proj.")):
                part = "embeddings"
            elif name.endswith("norm.weight"):
                part = "norms"
            elif ".attn." in name:
                part = "attention"
            elif ".mlp." in name:
                part = "feed_forward"
            elif name.startswith("head."):
                part = "output_head"
            else:
                raise RuntimeError(f"parameter {name} belongs to no part of param_overview")
            overview[part] += p.numel()
        overview["total"] = sum(p.numel() for p in self.parameters())
        return overview

    @torch.no_grad()
    def init_embedding_from_teacher(self, teacher_embedding: torch.Tensor, chunk_rows: int = 65536) -> None:
        """Start the input embedding from the teacher's (V_teacher, D_t) embedding matrix.

        Rows past input_vocab_size are dropped (a teacher may pad its matrix beyond the
        tokenizer's vocabulary); missing ones start as the mean row (`teacher_rows`). The
        teacher's embedding is reduced to its top-k principal directions by a truncated
        SVD, E ~ U_k S_k V_k^T, computed from the D_t x D_t Gram matrix E^T E (exact for
        the top k, deterministic, memory O(D_t^2); float32 row chunks on the teacher's
        device, eigh in float64 on the CPU); E V_k = U_k S_k keeps the best rank-k
        approximation of every inner product between token embeddings.
        - R > 0: embed = U_R S_R (V_in, R); embed_proj = sqrt(D / R) * Q with Q a random
          (D, R) matrix with orthonormal columns. The student's residual basis is its own,
          so any isometry works; a random one spreads the R directions over all D channels
          rather than putting them into R of them, and sqrt(D / R) gives embed_proj the
          same entry scale as its random initialisation (std 1/sqrt(R)).
        - R = 0, D == D_t: a copy. D > D_t: E times a random (D_t -> D) isometry.
          D < D_t: the top-D principal components U_D S_D (better than a random
          projection at keeping the geometry), turned by a random rotation as above.
        Finally one scalar rescales the table (keeping the relative row norms, which
        carry e.g. token frequency) so its entries have RMS init_std, the scale of a random
        initialisation: the rest of the initialisation and the learning rate still fit.
        The sqrt(D) multiplier in forward applies on top, as always.
        """
        cfg = self.cfg
        D_t = teacher_embedding.shape[1]
        E = teacher_rows(teacher_embedding.detach(), cfg.input_vocab_size)  # (V_in, D_t)
        r, D = cfg.embed_rank, cfg.d_model
        if r > D_t:
            raise ValueError(f"student.embed_rank={r}: larger than the teacher's embedding width {D_t}")
        if r == 0 and D == D_t:
            table = E.float()  # (V_in, D)
        else:
            k = r if r > 0 else min(D, D_t)
            gram = torch.zeros(D_t, D_t, dtype=torch.float64)
            for i in range(0, E.shape[0], chunk_rows):
                c = E[i:i + chunk_rows].float()  # (chunk, D_t)
                gram += (c.T @ c).double().cpu()  # (D_t, D_t)
            _, eigvecs = torch.linalg.eigh(gram)  # ascending eigenvalues = squared singular values
            V_k = eigvecs[:, -k:].flip(-1).float().to(E.device)  # (D_t, k), top singular vectors first
            table = torch.cat([E[i:i + chunk_rows].float() @ V_k for i in range(0, E.shape[0], chunk_rows)])  # (V_in, k)
            Q = nn.init.orthogonal_(torch.empty(D, k)).to(E.device)  # (D, k), orthonormal columns (D >= k)
            if r > 0:
                self.embed_proj.weight.copy_(Q * math.sqrt(D / r))  # (D, R)
            else:
                table = table @ Q.T  # (V_in, D)
        table = table * (cfg.init_std / table.pow(2).mean().sqrt().clamp_min(1e-12))
        self.embed.weight.copy_(table)


    # Gemma 3 (transformers' Gemma3ForCausalLM) parameter names of the student's, per block.
    TEACHER_BLOCK_NAMES = {
        "attn_norm": "input_layernorm", "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
        "attn.v_proj": "self_attn.v_proj", "attn.o_proj": "self_attn.o_proj", "attn.q_norm": "self_attn.q_norm",
        "attn.k_norm": "self_attn.k_norm", "attn_post_norm": "post_attention_layernorm",
        "mlp_norm": "pre_feedforward_layernorm", "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
        "mlp.down_proj": "mlp.down_proj", "mlp_post_norm": "post_feedforward_layernorm",
    }

    @torch.no_grad()
    def init_from_teacher_layers(self, teacher: dict[str, torch.Tensor], layers: list[int],
                                 output_ids: list[int]) -> None:
        """Start as a pruned copy of a Gemma 3 teacher: its blocks `layers` (teacher indices, in
        order), its input embedding (exactly, so the sqrt(D) scale matches the copied blocks), its
        final norm, and as the head its tied LM head's rows of the output vocabulary (`output_ids`,
        teacher ids), so before any training the student's logits are what the teacher's top layer
        would give over those tokens after these blocks. `teacher` is the teacher's state dict
        (transformers names: model.layers.{i}.self_attn.q_proj.weight, ...). The student must have
        the teacher's shapes (distill.train.teacher_shaped_student makes such a config); any
        tensor that does not fit stops with one line naming it."""
        if len(layers) != self.cfg.n_layers:
            raise ValueError(f"{len(layers)} teacher layers for a student of {self.cfg.n_layers}")
        if self.embed_proj is not None:
            raise ValueError("a pruned copy of the teacher needs the full embedding (student.embed_rank=0)")
        embed_key = next((k for k in teacher if k.endswith("embed_tokens.weight")), None)
        if embed_key is None:
            raise ValueError("the teacher's weights have no embed_tokens.weight")
        prefix = embed_key[: -len("embed_tokens.weight")]  # "model." (Gemma3ForCausalLM), "model.language_model." (4B-it)
        embedding = teacher[embed_key]  # (V_teacher, D)
        sources = {"embed.weight": teacher_rows(embedding, self.cfg.input_vocab_size),
                   "norm.weight": teacher[prefix + "norm.weight"],
                   "head.weight": embedding[torch.tensor(output_ids)]}  # (V_out, D): the tied head's rows
        for j, i in enumerate(layers):
            for mine, theirs in self.TEACHER_BLOCK_NAMES.items():
                sources[f"blocks.{j}.{mine}.weight"] = teacher[f"{prefix}layers.{i}.{theirs}.weight"]
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(sources))
        if missing:
            raise ValueError(f"student parameters with no teacher source: {', '.join(missing[:4])} "
                             "(a teacher-layer copy needs student.qk_norm and student.post_norms)")
        for name, value in sources.items():
            if name not in params:
                raise ValueError(f"student has no {name} to take the teacher's (student.qk_norm / post_norms off?)")
            if params[name].shape != value.shape:
                raise ValueError(f"{name}: student shape {tuple(params[name].shape)}, teacher's "
                                 f"{tuple(value.shape)}: the student needs the teacher's sizes")
            params[name].copy_(value)


def teacher_rows(embedding: torch.Tensor, n: int) -> torch.Tensor:
    """The first n rows of a teacher's (V_t, D) input embedding. Ids it has no row for (Gemma 3 1B-it: its
    tokenizer's <image_soft_token>, id 262,144, past the 262,144 rows) start as the mean row, said in one line."""
    missing = n - embedding.shape[0]
    if missing <= 0:
        return embedding[:n]
    print(f"[student] the teacher's embedding has {embedding.shape[0]:,} rows for {n:,} tokenizer ids: "
          f"the last {missing:,} start as its mean row", flush=True)
    return torch.cat([embedding, embedding.mean(0, keepdim=True).expand(missing, -1)])  # (n, D)


def build_student(cfg: StudentConfig) -> Student:
    """The student for this config, randomly initialised (in the default device and dtype)."""
    return Student(cfg)


def format_param_overview(overview: dict[str, int]) -> str:
    """An aligned table of param_overview(): count, millions, share of the total."""
    total = overview["total"]
    width = max(len(name) for name in overview)
    rows = [(name, n) for name, n in overview.items() if name != "total"] + [("total", total)]
    lines = []
    for name, n in rows:
        if name == "total":
            lines.append("-" * (width + 34))
        lines.append(f"{name:<{width}}  {n:>13,}  {n / 1e6:>9.2f}M  {100 * n / max(total, 1):>6.1f}%")
    return "\n".join(lines)
