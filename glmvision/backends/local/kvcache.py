"""A running batch's KV cache and attention mask: rows left-padded to one length, joined and dropped.

Every row ends at the last column, so one decode step feeds one token per row. A row shorter than
the longest is padded on the left with zero keys and values that its mask hides; columns that no
remaining row uses are cut off after rows leave, so the cache is never longer than its longest row.
"""

from __future__ import annotations

from typing import Any


def kv_bytes_per_token(text_config: Any, element_size: int) -> int:
    """Bytes of KV cache one token takes: keys and values, in every layer, for every KV head."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return 2 * text_config.num_hidden_layers * kv_heads * head_dim * element_size


def _pad_left(tensor: Any, length: int, dim: int) -> Any:
    import torch

    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class PaddedCache:
    """The KV cache (a transformers DynamicCache) and 2D attention mask of the rows decoding together."""

    def __init__(self, cache: Any, mask: Any) -> None:
        self.cache = cache
        self.mask = mask  # [rows, columns]: 1 over a row's own tokens, 0 over its padding

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def join(self, other: PaddedCache) -> None:
        """Append other's rows after ours, padding whichever is shorter on the left."""
        length = max(self.length, other.length)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = _cat_padded(mine.keys, theirs.keys, length)
            mine.values = _cat_padded(mine.values, theirs.values, length)
        self.mask = _cat_padded(self.mask, other.mask, length)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows, then cut the columns none of them uses."""
        import torch

        if indices == list(range(self.rows)):
            return
        index = torch.tensor(indices, device=self.mask.device)
        self.mask = self.mask[index]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.length
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def truncate(self, length: int) -> None:
        """Cut the mask and every layer back to `length` columns (undo a step that failed half-way)."""
        self.mask = self.mask[:, :length]
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]

    def grow(self) -> Any:
        """Extend the mask by one column for the tokens about to be fed; return it."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        return self.mask


def _cat_padded(first: Any, second: Any, length: int) -> Any:
    import torch

    dim = 1 if first.dim() == 2 else 2  # masks are [rows, columns]; keys [rows, heads, columns, dim]
    return torch.cat([_pad_left(first, length, dim), _pad_left(second, length, dim)], dim=0)


# GPU memory kept free beside the KV cache: activations of a prefill (vision tower, MLP, logits)
# and the allocator's fragmentation. At least this much, or this share of the GPU if larger.
ACTIVATION_RESERVE_BYTES = 2 << 30
ACTIVATION_RESERVE_SHARE = 0.08


def kv_token_budget(free_bytes: int, total_bytes: int, per_token: int) -> int:
    """Tokens of KV cache that fit in `free_bytes` once the activation reserve is set aside."""
    reserve = max(ACTIVATION_RESERVE_BYTES, int(ACTIVATION_RESERVE_SHARE * total_bytes))
    return max(0, (free_bytes - reserve) // per_token)


def memory_token_budget(model: Any, device: str) -> int:
    """On a GPU, the KV tokens its free memory holds after loading; elsewhere no cap (a very large number)."""
    if not device.startswith("cuda"):
        return 1 << 62
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    element = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 2
    return kv_token_budget(free, total, kv_bytes_per_token(model.config.text_config, element))
