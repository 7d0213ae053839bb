"""Keyed dropout masks: every mask element a pure function of (seed, step, the text, layer, site, position, channel).

Shapes: B texts in a forward, L their padded length, D model dim, H heads, L_max the model's position embeddings.

Why. torch's dropout draws each forward's masks from one random stream, so a text's masks depend on where in the
stream its forward falls: on how the batch is chunked, on the padding, on the rank. GradCache then reproduces
pass 1's masks in pass 3 by replaying the stream (`grad_cache.RandContext`), and equals the full batch only "under
the masks its mini-batches drew". With keyed masks a text gets the same masks in a mini-batch of 1, of 16 or in the
whole batch, padded to any length, on any rank — so GradCache equals ONE plain full-batch forward/backward with
dropout on, W processes equal one, pass 3 needs no replay, and pass 1 may run in other (larger) chunks.

The masks. For a text with global index g (its place in the GLOBAL logical batch: text c·(W·B) + r·B + i is column
c of row i on rank r of W, as in one process with batch W·B) at optimizer step s of a run with seed S:

    k_step = mix(mix(S ⊕ ·) ⊕ h(s))        k_text = mix(k_step ⊕ h(g))        k_site = mix(k_text ⊕ h(site))
    u(e)   = top 32 bits of mix(k_site ⊕ h(n_e))          keep(e) = [u(e) ≥ round(p · 2³²)]

where mix is SplitMix64's output function (a bijection of 64-bit words: Steele, Lea & Flood 2014, the generator
whose outputs pass BigCrush), h(x) = mix((x + 1) · γ) with γ = 0x9e3779b97f4a7c15 (SplitMix64's own sequence of
inputs), `site` numbers (layer, kind) and n_e numbers the element within its site:

    embeddings                n = position · D + channel           (site 0)
    attention probabilities   n = (head · L_max + query) · L_max + key    (site 4ℓ + 1 in block ℓ)
    FFN output                n = position · D + channel           (site 4ℓ + 3; 4ℓ + 2 is BERT's attention output,
                                                                    which DistilBERT does not have)

The argument. (1) Within a site, distinct elements have distinct n, so distinct h(n) (h is a bijection), so distinct
inputs to mix and distinct 64-bit outputs: no two elements of one site ever share a value. (2) Across sites, texts,
steps and seeds, inputs coincide only when k₁ ⊕ k₂ = h(n₁) ⊕ h(n₂) for two pseudo-random 64-bit words: probability
2⁻⁶⁴ per pair of elements (an isolated pair, never a run of them — unlike adding n to the key, which makes whole
streams overlap). (3) Each output is a SplitMix64 output word; its top 32 bits u are uniform on [0, 2³²), so
P(keep) = 1 − round(p · 2³²)/2³² = 1 − p up to 2⁻³², exactly as `speedups.cpu_dropout.BitsDropout`, and
independent across elements as far as SplitMix64's outputs are (tests/test_keyed_dropout.py measures keep rates
and correlations between neighbouring positions, channels, layers and steps).

Arithmetic: int64 tensors whose multiplications wrap modulo 2⁶⁴ (two's complement, on CPU and CUDA; a test checks
it), logical right shifts written as arithmetic shifts and a mask. Pure PyTorch. The element hashes h(n) depend
only on the shape, so they are computed once per (length, device) and cached; a forward pays one xor, one mix and
one compare per element, in cache-sized blocks of texts.

How it is wired: `install_keyed_dropout(model)` replaces the model's dropout sites with `KeyedDropout` and its
attention with `KeyedAttention` (written out: SDPA cannot take a given mask), all reading the current texts' keys
from one `DropoutKeys`, which it also hangs on the model as `model.dropout_keys`. The keys travel with the input,
as the attention mask does: `SentenceEncoder.forward(features)` runs the model inside `use_keys(model,
features["dropout_keys"])`. In eval mode nothing is dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .model import DistilBert, ScaledDotProductAttention


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


GAMMA = _signed(0x9E3779B97F4A7C15)
_M1, _M2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
BLOCK_ELEMENTS = 1 << 18  # texts are masked in blocks of about this many elements (2 MB of int64: cache-sized)
SITES_PER_LAYER = 4  # embeddings/attention probabilities, attention output (unused), FFN output


# ------------------------------------------------------------------------------------------------ the hash
def mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 words (a bijection), in place: z ← mix(z)."""
    t = torch.empty_like(z)
    for shift, mult in ((30, _M1), (27, _M2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=t).bitwise_and_((1 << (64 - shift)) - 1)  # logical shift
        z.bitwise_xor_(t)
        if mult is not None:
            z.mul_(mult)  # wraps modulo 2⁶⁴
    return z


def mix_int(z: int) -> int:
    """`mix` on a Python int (exact): the same function, for the few keys computed on the host."""
    z &= (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return _signed(z ^ (z >> 31))


def h(x: torch.Tensor) -> torch.Tensor:
    """h(x) = mix((x + 1) · γ) for int64 counters x (a bijection)."""
    return mix((x + 1) * GAMMA)


def step_key(seed: int, step: int) -> int:
    """k_step: one 64-bit key per (seed, optimizer step)."""
    return mix_int(mix_int(seed ^ 0x5EED) ^ mix_int(((step + 1) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)))


def text_keys(seed: int, step: int, global_index: torch.Tensor) -> torch.Tensor:
    """k_text (T,) int64 for texts with these global indices (T,), at this step of this run."""
    return mix(h(global_index.to(torch.int64)) ^ step_key(seed, step))


def global_text_index(n_columns: int, rows: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The global index (T,) of each of this rank's texts, laid out column after column (T = n_columns · rows):
    text c·rows + i is column c of row i, which on rank r is row r·rows + i of the global batch of W·rows rows."""
    columns = torch.arange(n_columns, dtype=torch.int64)[:, None] * (world_size * rows)  # (n, 1)
    return (columns + rank * rows + torch.arange(rows, dtype=torch.int64)).reshape(-1)  # (n · rows,)


def keep_mask(site_keys: torch.Tensor, counters: torch.Tensor, p: float) -> torch.Tensor:
    """The keep-mask (bool) of every element: site_keys (B,) int64, counters h(n) broadcastable to (B, ...)."""
    out = torch.empty((site_keys.shape[0], *counters.shape), dtype=torch.bool, device=site_keys.device)
    threshold = round(p * 2**32)
    per_text = max(1, BLOCK_ELEMENTS // max(counters.numel(), 1))
    for b0 in range(0, site_keys.shape[0], per_text):  # blocks of texts: the int64 temporaries stay in cache
        keys = site_keys[b0 : b0 + per_text].view(-1, *([1] * counters.dim()))
        z = mix(counters ^ keys)  # (b, ...)
        torch.ge(torch.bitwise_right_shift(z, 32).bitwise_and_(0xFFFFFFFF), threshold, out=out[b0 : b0 + per_text])
    return out


# ------------------------------------------------------------------------------------------------ the modules
class DropoutKeys:
    """What the installed modules share: the keys k_text (B,) of the texts in the current forward."""

    def __init__(self, max_positions: int):
        self.max_positions = max_positions
        self.text_keys: torch.Tensor | None = None
        self._counters: dict[tuple, torch.Tensor] = {}

    @contextlib.contextmanager
    def use(self, text_keys: torch.Tensor) -> Iterator[None]:
        """Within the block, training forwards drop with the masks of these texts (B,) (in batch order)."""
        before, self.text_keys = self.text_keys, text_keys
        try:
            yield
        finally:
            self.text_keys = before

    def site_keys(self, site: int, device: torch.device) -> torch.Tensor:
        if self.text_keys is None:
            raise RuntimeError("keyed dropout: a training forward ran without the texts' keys (model.dropout_masks "
                               "\"keyed\" needs `with keys.use(text_keys):` around it)")
        return mix(self.text_keys.to(device) ^ mix_int(((site + 1) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)))

    def counters(self, kind: str, L: int, width: int, device: torch.device) -> torch.Tensor:
        """h(n) for a site's elements: (L, width) positions × channels, or (width = H, L, L) heads × queries × keys.

        Cached at the longest length seen so far and sliced: n depends on positions, not on the padded length."""
        key = (kind, width, device)
        cached = self._counters.get(key)
        if cached is None or cached.shape[-1 if kind == "attention" else 0] < L:
            n = self.max_positions
            if kind == "attention":  # n = (head · L_max + query) · L_max + key
                idx = (torch.arange(width, device=device)[:, None, None] * n
                       + torch.arange(L, device=device)[None, :, None]) * n + torch.arange(L, device=device)
            else:  # n = position · D + channel
                idx = torch.arange(L, device=device)[:, None] * width + torch.arange(width, device=device)
            cached = self._counters[key] = h(idx)
        return cached[:, :L, :L] if kind == "attention" else cached[:L]


class KeyedDropout(nn.Dropout):
    """Dropout on (B, L, D) hidden states with the texts' keyed masks at one site."""

    def __init__(self, p: float, site: int, keys: DropoutKeys):
        super().__init__(p)
        self.site, self.keys = site, keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        B, L, D = x.shape
        m = keep_mask(self.keys.site_keys(self.site, x.device), self.keys.counters("hidden", L, D, x.device), self.p)
        return x * m * (1.0 / (1.0 - self.p))  # (B, L, D)


class KeyedAttention(ScaledDotProductAttention):
    """Attention written out around keyed dropout of the probabilities: softmax(q kᵀ/√Dh + mask) · m/(1 − p) · v."""

    def __init__(self, p: float, site: int, keys: DropoutKeys):
        super().__init__(p)
        self.site, self.keys = site, keys

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        if not self.training or self.p == 0:
            return super().forward(q, k, v, keep)
        B, H, L, _ = q.shape
        scores = (q @ k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)  # (B, H, L, L)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))  # every row keeps [CLS]: never all -inf
        m = keep_mask(self.keys.site_keys(self.site, q.device), self.keys.counters("attention", L, H, q.device),
                      self.p)  # (B, H, L, L)
        return (scores.softmax(dim=-1) * m * (1.0 / (1.0 - self.p))) @ v  # (B, H, L, Dh)


def install_keyed_dropout(model: DistilBert) -> DropoutKeys:
    """Replace every dropout site of the DistilBERT with its keyed version, on one new `DropoutKeys` (also kept as
    `model.dropout_keys`, where `use_keys` finds it)."""
    keys = DropoutKeys(model.config.max_position_embeddings)
    emb = model.embeddings
    emb.dropout = KeyedDropout(emb.dropout.p, 0, keys)
    for layer, block in enumerate(model.transformer.layer):
        base = SITES_PER_LAYER * layer
        block.attention.attend = KeyedAttention(block.attention.attend.p, base + 1, keys)
        block.ffn.dropout = KeyedDropout(block.ffn.dropout.p, base + 3, keys)
    model.dropout_keys = keys
    return keys


def use_keys(model: nn.Module, text_keys: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """The context in which `model`'s forward drops with the masks of these texts (B,); nothing when None."""
    if text_keys is None:
        return contextlib.nullcontext()
    keys = getattr(model, "dropout_keys", None)
    if keys is None:
        raise RuntimeError("dropout_keys given, but the model has no keyed dropout masks (install_keyed_dropout)")
    return keys.use(text_keys)
