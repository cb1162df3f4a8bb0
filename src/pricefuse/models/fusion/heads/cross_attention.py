"""`cross_attention`: text tokens attend over image, unit, numeric (and joint) tokens.

Why this shape (Team Rocket's feature attention, Amazon ML Challenge 2025, generalised): the
text says what the product is, and the other inputs qualify it; letting the text ask the other
tokens for what it needs weighs them per row, like the gated head's gates but per text aspect.
The text embedding becomes `text_tokens` tokens (one linear map to text_tokens x d_model, split),
the image `image_tokens`, the unit, the numeric features and the joint embedding one each. One
attention layer (text queries; residual + LayerNorm, then an FFN, residual + LayerNorm), the
text tokens mean-pooled, an MLP to the price. With text_tokens = 1 it is the one-token case.

A row without an image: its image tokens are zero (no NaN can reach the attention) and
excluded through `key_padding_mask`, so their attention weight is exactly 0 and the row takes
the text-only path. The unit and numeric tokens are always there, so no row attends to nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from pricefuse.core.config import CrossAttentionConfig
from pricefuse.models.fusion.heads.base import FusionHeadBase, keep_image, stack


class Tokens(nn.Module):
    """A vector -> `count` tokens of width `d_model` (one linear map, split)."""

    def __init__(self, in_dim: int, count: int, d_model: int) -> None:
        super().__init__()
        self.count, self.d_model = count, d_model
        self.linear = nn.Linear(in_dim, count * d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).view(-1, self.count, self.d_model)


class CrossAttentionHead(FusionHeadBase):
    """Knobs: fusion.heads.cross_attention (d_model, n_heads, text_tokens, image_tokens, widths
    of the MLP after pooling, dropout)."""

    def build(self) -> None:
        opts = self.arch.parse_options(CrossAttentionConfig)
        if opts.text_tokens < 1 or opts.image_tokens < 1:
            raise ValueError("fusion.heads.cross_attention needs text_tokens, image_tokens >= 1")
        d = opts.d_model
        self.unit_embedding = self.new_unit_embedding()
        counts = {"text": opts.text_tokens, "image": opts.image_tokens}
        dims = self.modality_dims()
        self.tokens = nn.ModuleDict(
            {name: Tokens(dim, counts.get(name, 1), d) for name, dim in dims.items()}
        )
        self.attention = nn.MultiheadAttention(
            d, opts.n_heads, dropout=opts.dropout, batch_first=True
        )
        self.norm1 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(opts.dropout), nn.Linear(2 * d, d)
        )
        self.norm2 = nn.LayerNorm(d)
        self.mlp, width = stack(
            d,
            opts.widths,
            lambda i, o: nn.Sequential(nn.Linear(i, o), nn.GELU(), nn.Dropout(opts.dropout)),
        )
        self.out = nn.Linear(width, 1)

    def raw(self, parts: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        query = self.tokens["text"](parts["text"])
        keys, ignore = [], []
        for name, x in parts.items():
            if name == "text":
                continue
            tokens = self.tokens[name](x)
            absent = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            if name == "image":
                tokens = keep_image(mask, tokens)
                absent = ~mask.expand(-1, tokens.shape[1])
            keys.append(tokens)
            ignore.append(absent)
        memory = torch.cat(keys, dim=1)
        attended, _ = self.attention(
            query, memory, memory, key_padding_mask=torch.cat(ignore, dim=1), need_weights=False
        )
        x = self.norm1(query + attended)
        x = self.norm2(x + self.ffn(x))
        return self.out(self.mlp(x.mean(dim=1))).squeeze(-1)
