"""Attention over the paged KV cache, plugged into transformers' attention interface.

A step packs every sequence's new tokens into one row (``[1, T]``) so the projections and
MLPs of all of them run as one matrix product — that is where batching pays. Only attention
is per sequence: this function writes the step's keys and values into their cells, then
attends each sequence to its own cells. Sequences decoding one token attend together in one
padded call; prompt chunks attend one by one with a causal mask offset by what is cached.
What the step looks like travels in ``StepLayout`` through the model's keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention

from helexa.neuron.harness.transformers.paged import PagedKv

ATTENTION = "helexa_paged"
STEP_KWARG = "helexa_step"


@dataclass
class PromptSpan:
    """Query rows ``first..first+count`` of one sequence reading positions start..start+count."""

    first: int
    count: int
    start: int
    keys: slice | torch.Tensor  # the sequence's cells for positions 0..start+count


@dataclass
class DecodeGroup:
    """Sequences feeding one token each; their query rows and cells, padded to the longest."""

    rows: torch.Tensor  # [B]
    keys: slice | torch.Tensor  # [B, L] cells (or one contiguous run when B == 1)
    lengths: torch.Tensor  # [B] positions each sequence attends to
    longest: int
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor | None:
        if window not in self._masks:
            if isinstance(self.keys, slice) and (window is None or window >= self.longest):
                self._masks[window] = None
            else:
                position = torch.arange(self.longest, device=self.lengths.device)
                last = self.lengths[:, None] - 1
                allowed = position[None, :] <= last
                if window is not None:
                    allowed &= position[None, :] > last - window
                self._masks[window] = allowed[:, None, None, :]
        return self._masks[window]


@dataclass
class StepLayout:
    kv: PagedKv
    write: torch.Tensor  # [T] cell of each new token
    spans: list[PromptSpan]
    decode: DecodeGroup | None
    _masks: dict[tuple[int, int | None], torch.Tensor | None] = field(default_factory=dict)

    def span_mask(self, index: int, window: int | None) -> torch.Tensor | None:
        key = (index, window)
        if key not in self._masks:
            span = self.spans[index]
            length = span.start + span.count
            if span.start == 0 and (window is None or window >= length):
                self._masks[key] = None  # plain causal
            else:
                device = self.write.device
                query = torch.arange(span.start, length, device=device)[:, None]
                position = torch.arange(length, device=device)[None, :]
                allowed = position <= query
                if window is not None:
                    allowed &= position > query - window
                self._masks[key] = allowed
        return self._masks[key]


def _gather(store: torch.Tensor, keys: slice | torch.Tensor) -> torch.Tensor:
    """Cells of ``store`` ([kv_heads, cells, dim]) as [batch, kv_heads, length, dim]."""
    if isinstance(keys, slice):
        return store[:, keys].unsqueeze(0)
    if keys.dim() == 1:
        return store[:, keys].unsqueeze(0)
    return store[:, keys].permute(1, 0, 2, 3)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``query`` [1, heads, T, dim], ``key``/``value`` [1, kv_heads, T, dim] of the new tokens;
    returns [1, T, heads, dim] as transformers' attention functions do."""
    step: StepLayout = kwargs[STEP_KWARG]
    layer = module.layer_idx
    keys, values = step.kv.keys[layer], step.kv.values[layer]
    keys.index_copy_(1, step.write, key[0])
    values.index_copy_(1, step.write, value[0])
    heads, dim = query.shape[1], query.shape[3]
    gqa = heads != keys.shape[0]
    out = query.new_empty(query.shape[2], heads, dim)
    group = step.decode
    if group is not None:
        q = query[0][:, group.rows].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, dim]
        attended = scaled_dot_product_attention(
            q,
            _gather(keys, group.keys),
            _gather(values, group.keys),
            attn_mask=group.mask(sliding_window),
            scale=scaling,
            enable_gqa=gqa,
        )
        out[group.rows] = attended[:, :, 0]
    for index, span in enumerate(step.spans):
        rows = slice(span.first, span.first + span.count)
        mask = step.span_mask(index, sliding_window)
        attended = scaled_dot_product_attention(
            query[:, :, rows],
            _gather(keys, span.keys),
            _gather(values, span.keys),
            attn_mask=mask,
            is_causal=mask is None and span.count > 1,
            scale=scaling,
            enable_gqa=gqa,
        )
        out[rows] = attended[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register() -> None:
    """Make ``ATTENTION`` a name models can be switched to (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, paged_attention)
