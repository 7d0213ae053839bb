"""DistilBERT, written out by hand, plus pooling (mean, the default; CLS; max).

Shapes: B batch, L sequence length, D model dim, H heads, Dh = D / H head dim, F FFN hidden dim.

One block (post-LN, as in BERT and DistilBERT):

    h = LayerNorm(x + W_o · MultiHeadAttention(x))              attention probabilities: softmax(q kᵀ/√Dh) → dropout
    y = LayerNorm(h + Dropout(W_2 · GELU(W_1 · h)))

Parameter names are exactly those of transformers' `DistilBertModel`, so a checkpoint loads key by key with a
shape check (bertino/plumbing/weights.py). This is the plain model: `nn.Linear`, `nn.Dropout`, and attention through
`F.scaled_dot_product_attention` (`ScaledDotProductAttention`), which picks a fused kernel where one exists and
draws the attention-probability dropout itself. Training-time speed-ups (the config's `speedups` section) replace
some of these modules with equivalent ones when bertino/build.py builds the training step (bertino/speedups/);
nothing here knows about them, and with `"speedups": null` this is exactly the model that trains.

A mini-batch without padding passes no attention mask at all (checked on CPU only: on CUDA it would be a sync).

Pooling turns the token vectors x_t (t = 0..L-1, mask m_t) into one sentence vector e. Mean pooling (bertino's
default, the card's) averages the real tokens; CLS pooling takes the first token's vector ([CLS]); max pooling
takes each dimension's largest value over the real tokens:

    mean: e = Σ_t m_t · x_t / max(Σ_t m_t, 1e-9)        cls: e = x_0        max: e_j = max_{t: m_t = 1} x_tj

None of them looks at padding, so a text's vector does not depend on the batch it is in (what GradCache needs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


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


def _activation(name: str):
    if name == "gelu":
        return F.gelu  # exact (erf) GELU, as DistilBERT and BERT
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
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        positions = torch.arange(L, device=input_ids.device)  # (L,)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, L, D)
        return self.dropout(self.LayerNorm(x))


class ScaledDotProductAttention(nn.Module):
    """softmax(q kᵀ/√Dh, masked) · v, with dropout p on the attention probabilities while training.

    q, k, v (B, H, L, Dh), keep (B, 1, 1, L) bool (True = a real key) or None → (B, H, L, Dh).
    """

    def __init__(self, dropout: float):
        super().__init__()
        self.p = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        p = self.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)  # (B, H, L, Dh)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads:
            raise ValueError(f"dim {cfg.dim} is not divisible by n_heads {cfg.n_heads}")
        self.n_heads = cfg.n_heads
        self.q_lin = nn.Linear(cfg.dim, cfg.dim)
        self.k_lin = nn.Linear(cfg.dim, cfg.dim)
        self.v_lin = nn.Linear(cfg.dim, cfg.dim)
        self.attend = ScaledDotProductAttention(cfg.attention_dropout)
        self.out_lin = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, D), keep (B, 1, 1, L) bool (True = a real key) or None (no padding) → (B, L, D)."""
        B, L, D = x.shape
        H = self.n_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, Dh)

        y = self.attend(heads(self.q_lin(x)), heads(self.k_lin(x)), heads(self.v_lin(x)), keep)  # (B, H, L, Dh)
        return self.out_lin(y.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class FFN(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.lin1 = nn.Linear(cfg.dim, cfg.hidden_dim)
        self.lin2 = nn.Linear(cfg.hidden_dim, cfg.dim)
        self.act = _activation(cfg.activation)
        self.dropout = nn.Dropout(cfg.dropout)

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


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The first token's vector ([CLS]; texts are right-padded). hidden (B, L, D) → (B, D)."""
    return hidden[:, 0]  # (B, D)


def max_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each dimension's maximum over the real tokens. hidden (B, L, D), attention_mask (B, L) → (B, D)."""
    pad = ~attention_mask.bool().unsqueeze(-1)  # (B, L, 1)
    return hidden.masked_fill(pad, torch.finfo(hidden.dtype).min).amax(dim=1)  # (B, D)


POOLING = {"mean": mean_pool, "cls": cls_pool, "max": max_pool}  # the modes a model folder may ask for
