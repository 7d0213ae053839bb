"""DistilBERT, written out by hand, plus mean pooling.

Shapes: B batch, L sequence length, D model dim, H heads, Dh = D / H head dim, F FFN hidden dim.

One block (post-LN, as in BERT and DistilBERT):

    h = LayerNorm(x + Dropout(W_o · MultiHeadAttention(x)))
    y = LayerNorm(h + Dropout(W_2 · GELU(W_1 · h)))

Parameter names are exactly those of transformers' `DistilBertModel`, so a checkpoint loads key by key with a
shape check (see `checkpoint.py`). Attention runs through `F.scaled_dot_product_attention`, which picks a fused
kernel where one exists and applies attention-probability dropout itself.

Two CPU fast paths, both for training with dropout on CPU tensors (`Dropout.fast_cpu`, on by default; tested
against the plain paths in tests/test_perf_paths.py):
  - `Dropout` draws its keep-mask from 32 random bits per element instead of `bernoulli_`, whose CPU kernel is a
    serial double-precision loop outside Intel CPUs (MKL's vectorised one is used on Intel only): ~4× faster,
    and the mask is the same Bernoulli(1 − p) variable. It was ~12% of a GradCache step on a 2-core AMD EPYC.
  - With dropout on, CPU SDPA leaves its fused kernel for the unfused "math" one (which also spends passes on a
    NaN-safe softmax): attention is then written out, `softmax(q kᵀ/√Dh + mask) · keep/(1 − p) · v`, with the
    same `Dropout`. Without dropout (eval, `encode`) SDPA's fused CPU kernel runs as before.
A mini-batch without padding passes no attention mask at all (checked on CPU only: on CUDA it would be a sync).

Mean pooling averages the token vectors where `attention_mask == 1`:

    e = Σ_t m_t · x_t / max(Σ_t m_t, 1e-9)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .linear_tape import Linear


@dataclass
class EncoderConfig:
    """The DistilBERT hyperparameters (names as in transformers' `DistilBertConfig`)."""

    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 6
    n_heads: int = 12
    hidden_dim: int = 3072
    max_position_embeddings: int = 512
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-12  # DistilBERT hard-codes 1e-12; BERT's config calls it layer_norm_eps

    @classmethod
    def from_hf_dict(cls, d: dict) -> "EncoderConfig":
        """Build from a `config.json` of `model_type` "distilbert" or "bert" (BERT names are mapped)."""
        if d.get("model_type") == "bert" or "num_hidden_layers" in d:
            d = {
                "vocab_size": d["vocab_size"],
                "dim": d["hidden_size"],
                "n_layers": d["num_hidden_layers"],
                "n_heads": d["num_attention_heads"],
                "hidden_dim": d["intermediate_size"],
                "max_position_embeddings": d["max_position_embeddings"],
                "dropout": d.get("hidden_dropout_prob", 0.1),
                "attention_dropout": d.get("attention_probs_dropout_prob", 0.1),
                "activation": d.get("hidden_act", "gelu"),
                "pad_token_id": d.get("pad_token_id", 0) or 0,
                "layer_norm_eps": d.get("layer_norm_eps", 1e-12),
            }
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_hf_dict(self) -> dict:
        """A `config.json` that transformers' `DistilBertModel` (and so sentence-transformers) loads."""
        d = asdict(self)
        eps = d.pop("layer_norm_eps")
        if eps != 1e-12:
            raise ValueError(f"DistilBERT fixes LayerNorm eps at 1e-12; this model uses {eps}")
        return {
            "architectures": ["DistilBertModel"],
            "model_type": "distilbert",
            **d,
            "initializer_range": 0.02,
            "qa_dropout": 0.1,
            "seq_classif_dropout": 0.2,
            "sinusoidal_pos_embds": False,
            "tie_weights_": True,
        }


class Dropout(nn.Dropout):
    """`nn.Dropout`, with a faster keep-mask for CPU tensors (class attribute `fast_cpu`).

    y = x · m / (1 − p), m_i ~ Bernoulli(1 − p): m_i = [u_i ≥ t] for u_i uniform 32-bit integers and
    t = round(p · 2³²) − 2³¹, so P(drop) = p up to 2⁻³². The bits come from the default CPU generator (int64
    `random_` over the full range, two 32-bit draws per element), so `RandContext` replays the masks exactly.
    Autograd keeps the bool mask (1 byte/element) rather than a float one.
    """

    fast_cpu: bool = True  # False (on the class or one instance): torch's dropout; CUDA always uses torch's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast_cpu_dropout(self, x) or self.p >= 1:
            return super().forward(x)
        return x.mul(keep_mask(x.shape, self.p)).mul_(1.0 / (1.0 - self.p))


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A bool tensor of `shape` (CPU), True with probability 1 − p, from the default CPU generator."""
    n = 1
    for s in shape:
        n *= s
    bits = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(2**63), None)  # 64 uniform bits each
    u = bits.view(torch.int32)[:n].view(shape)  # uniform in [−2³¹, 2³¹)
    return u >= round(p * 2**32) - 2**31


def _fast_cpu_dropout(module: Dropout, x: torch.Tensor) -> bool:
    return module.training and module.p > 0 and module.fast_cpu and x.device.type == "cpu"


def _activation(name: str):
    if name == "gelu":
        return lambda x: F.gelu(x)  # exact (erf) GELU, as DistilBERT and BERT
    if name == "relu":
        return F.relu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unsupported activation {name!r} (expected gelu, gelu_new or relu)")


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        positions = torch.arange(L, device=input_ids.device)  # (L,)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, L, D)
        return self.dropout(self.LayerNorm(x))


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads:
            raise ValueError(f"dim {cfg.dim} is not divisible by n_heads {cfg.n_heads}")
        self.n_heads = cfg.n_heads
        self.dropout = Dropout(cfg.attention_dropout)  # on the attention probabilities
        self.q_lin = Linear(cfg.dim, cfg.dim, "q_lin")  # Linear: an nn.Linear that a LinearTape can replay
        self.k_lin = Linear(cfg.dim, cfg.dim, "k_lin")
        self.v_lin = Linear(cfg.dim, cfg.dim, "v_lin")
        self.out_lin = Linear(cfg.dim, cfg.dim, "out_lin")

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, D), keep (B, 1, 1, L) bool (True = a real key) or None (no padding) → (B, L, D)."""
        B, L, D = x.shape
        H = self.n_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, Dh)

        q, k, v = heads(self.q_lin(x)), heads(self.k_lin(x)), heads(self.v_lin(x))
        if _fast_cpu_dropout(self.dropout, x):
            # Written out: SDPA would run its unfused math kernel here anyway (see the module docstring).
            scores = (q @ k.transpose(-1, -2)).mul_((D // H) ** -0.5)  # (B, H, L, L)
            if keep is not None:
                scores.masked_fill_(~keep, float("-inf"))  # every row keeps [CLS]: never all -inf
            y = self.dropout(scores.softmax(dim=-1)) @ v  # (B, H, L, Dh)
        else:
            p = self.dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)  # (B, H, L, Dh)
        return self.out_lin(y.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class FFN(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.lin1 = Linear(cfg.dim, cfg.hidden_dim, "lin1")
        self.lin2 = Linear(cfg.hidden_dim, cfg.dim, "lin2")
        self.act = _activation(cfg.activation)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.lin2(self.act(self.lin1(x))))  # (B, L, D)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attention = MultiHeadSelfAttention(cfg)
        self.sa_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.ffn = FFN(cfg)
        self.output_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        # note: DistilBERT has no dropout after out_lin (BERT has). A converted BERT checkpoint is the same function
        # in eval mode; in training it follows DistilBERT: dropout on attention probabilities and FFN output only.
        h = self.sa_layer_norm(x + self.attention(x, keep))  # (B, L, D)
        return self.output_layer_norm(h + self.ffn(h))  # (B, L, D)


class Transformer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        for block in self.layer:
            x = block(x, keep)
        return x


class DistilBert(nn.Module):
    """`DistilBertModel` without the heads: token ids (B, L) → hidden states (B, L, D)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.transformer = Transformer(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)  # (B, L, D)
        # Boolean key mask, True where a key is a real token. It broadcasts over heads and queries, and works
        # under autocast whatever dtype q/k/v end up in. Every text has at least [CLS], so no row is all masked.
        # A mini-batch without padding (length-sorted passages often have none) needs no mask: attention skips
        # the masking pass. Checked on CPU only: on CUDA `.all()` would be a host-device sync.
        keep = attention_mask[:, None, None, :].bool()  # (B, 1, 1, L)
        if attention_mask.device.type == "cpu" and bool(keep.all()):
            keep = None
        return self.transformer(x, keep)  # (B, L, D)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token vectors of real tokens. hidden (B, L, D), attention_mask (B, L) → (B, D)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    summed = (hidden * m).sum(dim=1)  # (B, D)
    counts = m.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    return summed / counts
