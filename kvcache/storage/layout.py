"""The block layout every part of the cache agrees on (storage, kernels, accounting).

One layer's storage is a set of blocks: ``k``/``v`` are ``[num_blocks, num_kv_heads, block_size, width]``
so one (block, head) tile is contiguous; ``width`` is head_dim, or head_dim / 2 bytes for 4-bit codes
(:func:`kvcache.quant.pack_int4`: byte ``j`` holds channel ``j`` in its low nibble and ``j + head_dim/2``
in its high one). A token's *slot* is ``block_id * block_size + offset``. K and V each follow their
codec (:class:`kvcache.modes.Codec`):

- floats: the pool's float dtype, no parameters (a model's pool is 16-bit, :func:`kvcache.codec.kv_float_dtype`:
  bf16 for a bf16 model, else fp16);
- codes: int8 for 8-bit integer codes, else uint8 code indices, packed below 8 bits in bit planes
  (:func:`kvcache.quant.pack_codes`; ``width`` = head_dim * bits / 8);
- static codes: ``{k,v}_scale``/``{k,v}_zp`` of shape ``[num_kv_heads, head_dim]`` fp32;
- per-token codes: ``{k,v}_scale`` (and ``_zp`` unless symmetric) ``[num_blocks, num_kv_heads, block_size, groups]``
  in the codec's ``param_dtype`` (ours: the pool's dtype), one per token, head and group of channels (one group:
  the whole head);
- codebooks: ``{k,v}_grid`` ``[num_kv_heads, 2^bits]`` fp32 (a fixed one is one tensor shared by every layer,
  expanded over the heads); a per-tensor scale ``{k,v}_tscale`` ``[]`` fp32.
- allocated key codes: uint8, one bit stream per token and head (:func:`kvcache.quant.pack_widths`; ``width`` =
  head_dim * allocated / 8), each channel's width in ``k_widths`` ``[num_kv_heads, head_dim]`` int32, the levels of
  every width in ``k_grid`` ``[9, 256]`` (shared), one scale per token and head.

Rotations and the query-aware key transform live here too (``k_map``, ``q_map``, ``v_map``; applied by
the transformers glue, never by the kernels, which see only stored vectors). Sinks: with
``sink_tokens`` N, the first N tokens of every sequence are also kept in the pool's float dtype in
``{k,v}_sink`` ``[sink_slots, num_kv_heads, N, head_dim]``; ``sink_slot`` maps a sequence's first block to its slot
(-1: none), and attention reads those tokens from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codec import STATIC_PARAM_DTYPE, Codec
from ..encoding import SideParams


@dataclass
class LayerKV:
    k_codec: Codec
    v_codec: Codec
    head_dim: int
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    k_zp: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    v_zp: torch.Tensor | None = None
    k_map: torch.Tensor | None = None  # [kv_heads, d, d]: stored keys are k @ k_map
    q_map: torch.Tensor | None = None  # [kv_heads, d, d]: queries read them as q @ q_map (k_map's inverse transpose)
    v_map: torch.Tensor | None = None  # [d, d] orthonormal: stored values are v @ v_map, the output o' @ v_map^T
    sink_tokens: int = 0
    k_sink: torch.Tensor | None = None
    v_sink: torch.Tensor | None = None
    sink_slot: torch.Tensor | None = None  # [num_blocks] int32, shared by every layer of the pool
    k_grid: torch.Tensor | None = None  # [kv_heads, 2^bits] fp32: what each K code stands for (codebook grids)
    v_grid: torch.Tensor | None = None
    k_tscale: torch.Tensor | None = None  # [] fp32: K's per-tensor scale (codecs with tensor_scale)
    v_tscale: torch.Tensor | None = None
    k_widths: torch.Tensor | None = None  # [kv_heads, head_dim] int32: each key channel's code width (allocated codecs)
    k_layout: torch.Tensor | None = None  # [kv_heads, head_dim] int32: start_bit << 4 | width, as the kernels read it
    residual: int = 0  # an emulated transformers residual window (storage holds decoded 16-bit values)
    emulated: tuple[Codec, Codec] | None = None  # then: the K and V quantizers the flushes re-quantize with
    flush_codes: "LayerKV | None" = None  # our codecs' parameters for those flushes (a layer without blocks)

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    def codec(self, side: str) -> Codec:
        return self.k_codec if side == "k" else self.v_codec

    def params(self, side: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(scale, zero point)`` of ``side`` ('k' or 'v'); None where the codec has none."""
        return getattr(self, f"{side}_scale"), getattr(self, f"{side}_zp")

    def widths(self, side: str) -> torch.Tensor | None:
        """Each channel's code width of ``side`` (allocated codecs: keys only), or None."""
        return self.k_widths if side == "k" else None

    def side_params(self, side: str) -> SideParams:
        """What the layer holds once for ``side``, as :mod:`kvcache.encoding` takes it."""
        c = self.codec(side)
        scale, zp = self.params(side)
        pdt = scale.dtype if c.scaling == "token" and scale is not None else STATIC_PARAM_DTYPE  # as stored
        static = (scale, zp) if c.scaling == "static" else (None, None)
        return SideParams(*static, getattr(self, f"{side}_grid"), getattr(self, f"{side}_tscale"), pdt, self.widths(side))

    def per_block_tensors(self) -> list[str]:
        """Names of the tensors that have a block dimension (they grow with the pool)."""
        names = ["k", "v"]
        for side in ("k", "v"):
            c = self.codec(side)
            if c.scaling == "token":
                names += [f"{side}_scale"] + ([] if c.symmetric else [f"{side}_zp"])
        return names

    def static_tensors(self) -> list[torch.Tensor]:
        """Tensors held once per layer, whatever the number of tokens (static parameters, maps)."""
        out = []
        for side in ("k", "v"):
            if self.codec(side).scaling == "static":
                out += [t for t in self.params(side) if t is not None]
        extra = (self.k_map, self.q_map, self.v_map, self.k_grid, self.v_grid, self.k_tscale, self.v_tscale, self.k_widths,
                 self.k_layout)
        return out + [t for t in extra if t is not None]


def new_blocks(
    k_codec: Codec, v_codec: Codec, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
    device: torch.device | str, fp_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Zeroed per-block tensors for ``num_blocks`` blocks of one layer."""
    out = {}
    for side, c in (("k", k_codec), ("v", v_codec)):
        shape = (num_blocks, num_kv_heads, block_size, c.code_width(head_dim))
        out[side] = torch.zeros(shape, dtype=c.storage_dtype(fp_dtype), device=device)
        if c.scaling == "token":
            pshape = (num_blocks, num_kv_heads, block_size, c.groups(head_dim))
            pdt = c.param_dtype_in(fp_dtype)
            out[f"{side}_scale"] = torch.zeros(pshape, dtype=pdt, device=device)
            if not c.symmetric:
                out[f"{side}_zp"] = torch.zeros(pshape, dtype=pdt, device=device)
    return out


def slot_mapping(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slots of ``positions`` (``[batch, n]``) given per-row block tables (``[batch, max_blocks]``)."""
    blocks = torch.gather(block_tables.long(), 1, positions // block_size)
    return blocks * block_size + positions % block_size
