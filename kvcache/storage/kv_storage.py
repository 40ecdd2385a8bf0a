"""The tensors that hold K/V: every layer's blocks, static parameters, maps and sinks, and their bytes.

As nano-vllm's model runner's kv cache, it knows nothing of who holds which block (:mod:`.allocator`);
every layer stores a token at the same slot, so one block table per sequence serves all layers.
"""

from __future__ import annotations

import torch

from ..codec import FP16, Codec
from ..modes import KVMode
from ..qparams import KVQParams
from ..quant import width_layout
from ..shape import KVShape
from .layout import LayerKV, new_blocks
from .maps import layer_maps
from .sinks import SinkSlots
from .tables import allocated_widths, layer_grid, layer_tensor_scale


class KVStorage:
    def __init__(self, mode: KVMode, shape: KVShape, *, block_size: int, num_blocks: int, device: torch.device,
                 fp_dtype: torch.dtype, qparams: KVQParams | None, sinks: SinkSlots):
        self.codecs = mode.layer_codecs(shape.num_layers)
        if qparams is not None:
            qparams.check_matches(shape, needs_transform=any(k.qk_transform for k, _ in self.codecs),
                                  needs_basis=any(k.allocated for k, _ in self.codecs))
        if mode.emulated:  # the sequence is kept as decoded 16-bit values and re-quantized in place
            self.emulated, self.codecs = self.codecs, [(FP16, FP16)] * shape.num_layers
        self.mode, self.shape, self.block_size, self.num_blocks = mode, shape, block_size, num_blocks
        self.qparams, self.device, self.fp_dtype, self.sinks = qparams, device, fp_dtype, sinks
        self.layers = [self._layer(i) for i in range(shape.num_layers)]

    def _layer(self, i: int) -> LayerKV:
        """Layer ``i``'s storage for its codecs: blocks, static parameters, maps, sinks.

        An emulated residual window of one of our modes: 16-bit blocks holding the values as its codecs' maps
        store them (rotated, transformed), beside a block-less layer of its real codecs whose parameters the
        flushes quantize with (transformers' schemes re-quantize by their own backends and need neither)."""
        if not self.mode.emulated:
            layer = self._coded_layer(i, *self.codecs[i], self.num_blocks)
        else:
            layer = self._coded_layer(i, FP16, FP16, self.num_blocks)
            layer.residual, layer.emulated = self.mode.residual, self.emulated[i]
            if self.mode.engine != "hf":  # transformers' backends re-quantize the whole sequence themselves
                layer.flush_codes = self._coded_layer(i, *self.emulated[i], 0)
                layer.k_map, layer.q_map, layer.v_map = (layer.flush_codes.k_map, layer.flush_codes.q_map,
                                                         layer.flush_codes.v_map)
        self.sinks.attach(layer, i)
        return layer

    def _coded_layer(self, i: int, k_codec: Codec, v_codec: Codec, num_blocks: int) -> LayerKV:
        """Layer ``i``'s blocks, static parameters and maps for ``k_codec`` and ``v_codec`` (no sinks)."""
        shape, dev = self.shape, self.device
        blocks = new_blocks(k_codec, v_codec, num_blocks, shape.num_kv_heads, self.block_size, shape.head_dim,
                            dev, self.fp_dtype)
        layer = LayerKV(k_codec, v_codec, shape.head_dim, **blocks)
        for side, codec in (("k", k_codec), ("v", v_codec)):
            if codec.scaling == "static":
                scale, zp = self.qparams.side(side, i, shape.num_kv_heads, shape.head_dim, codec.bits)
                setattr(layer, f"{side}_scale", scale.to(dev))
                setattr(layer, f"{side}_zp", zp.to(dev))
            table = getattr(self.qparams, f"{side}_table", None) if self.qparams is not None else None
            layer_table = table[i] if table is not None and codec.grid == "table" else None
            setattr(layer, f"{side}_grid", layer_grid(codec, shape.num_kv_heads, shape.head_dim, dev, layer_table))
            absmax = self.qparams.absmax(side, i) if codec.tensor_scale and self.qparams is not None else None
            setattr(layer, f"{side}_tscale", layer_tensor_scale(codec, absmax, dev))
        transform = self.qparams.k_transform[i] if k_codec.qk_transform else None
        if k_codec.allocated:  # keys in the eigenbasis, each channel's width from its weight
            transform = self.qparams.k_basis[i]
            layer.k_widths = allocated_widths(self.qparams.k_weight[i], k_codec, shape.head_dim).to(dev)
            layer.k_layout = width_layout(layer.k_widths)
        layer.k_map, layer.q_map, layer.v_map = layer_maps(k_codec, v_codec, shape.num_kv_heads, shape.head_dim,
                                                           transform, dev)
        return layer

    def grow(self, extra: int) -> None:
        """``extra`` more blocks in every layer (and the sink map)."""
        for i, layer in enumerate(self.layers):
            k_codec, v_codec = self.codecs[i]
            more = new_blocks(k_codec, v_codec, extra, self.shape.num_kv_heads, self.block_size, self.shape.head_dim,
                              self.device, self.fp_dtype)
            for name in layer.per_block_tensors():
                setattr(layer, name, torch.cat([getattr(layer, name), more[name]]))
        self.num_blocks += extra
        self.sinks.grow_blocks(extra, self.layers)

    @property
    def bytes_per_token(self) -> int:
        """Marginal bytes of one token across all layers as this storage holds it (data + per-token parameters)."""
        return self.mode.pool_bytes_per_token(self.shape, self.fp_dtype)

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def param_bytes(self) -> int:
        """Bytes of static parameters, held once whatever the number of tokens."""
        layers = self.layers + [layer.flush_codes for layer in self.layers if layer.flush_codes is not None]
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # a shared map counts once
                for layer in layers for t in layer.static_tensors()}
        return sum(held.values())

    @property
    def nbytes(self) -> int:
        """Bytes the storage holds now, used or free (what the device really spends): blocks, parameters, sinks."""
        return self.num_blocks * self.bytes_per_block + self.param_bytes + self.sinks.nbytes
