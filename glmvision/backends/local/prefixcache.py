"""Prefix KV reuse: the keys and values of recent prompts in a radix tree, so a prompt that starts the
same way (system prompt, images, earlier turns) prefills only what follows.

A prompt is matched by its token keys: text tokens by id, image tokens by their image's hash, so two
different images behind the same placeholder tokens never match. Each node holds one segment of keys
and its KV (per layer, [1, kv_heads, tokens, head_dim]); a match copies the segments along its path
into one tensor per layer. Only the model thread touches the tree. It is bounded in tokens, and the
least recently used leaves go first, also whenever the scheduler needs their room for a request.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Keys of image tokens are negative (token ids never are): -1 - the image hash's low 62 bits.
_IMAGE_KEY_BITS = (1 << 62) - 1


def image_key(image_hash: int) -> int:
    """The key every token of one image gets in a prompt's keys."""
    return -1 - (image_hash & _IMAGE_KEY_BITS)


def prompt_keys(
    input_ids: Any, token_types: Any | None, image_hashes: list[int], image_tokens: list[int]
) -> np.ndarray | None:
    """A prompt's keys: token ids, each image's tokens replaced by its hash's key; None when the
    prompt holds tokens of another kind (video) that the keys cannot tell apart."""
    keys = np.asarray(input_ids, dtype=np.int64).copy()
    if token_types is None:
        return keys
    types = np.asarray(token_types)
    if np.any(types > 1):
        return None
    at = np.flatnonzero(types == 1)
    if len(at) != sum(image_tokens) or len(image_hashes) != len(image_tokens):
        return None
    start = 0
    for image_hash, count in zip(image_hashes, image_tokens, strict=True):
        keys[at[start : start + count]] = image_key(image_hash)
        start += count
    return keys


def common_length(first: np.ndarray, second: np.ndarray) -> int:
    """How many leading keys the two have in common."""
    n = min(len(first), len(second))
    differ = np.flatnonzero(first[:n] != second[:n])
    return int(differ[0]) if len(differ) else n


@dataclass(eq=False)
class _Node:
    keys: np.ndarray
    kv: list[tuple[Any, Any]]  # per layer (keys, values), [1, kv_heads, len(self.keys), head_dim]
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)
    used: int = 0  # the tree's clock at its last match or insert


@dataclass
class PrefixStats:
    """What the prefix cache did: lookups that found a prefix or not, tokens reused, leaves evicted."""

    hits: int = 0
    misses: int = 0
    hit_tokens: int = 0
    evictions: int = 0


class PrefixCache:
    """Recent prompts' KV, shared by prefix, bounded in tokens; one tree per adapter (KV differs)."""

    def __init__(self, capacity_tokens: int, bytes_per_token: int = 0) -> None:
        self.capacity = max(0, capacity_tokens)
        self.bytes_per_token = bytes_per_token  # for reporting bytes held
        self.tokens = 0
        self.stats = PrefixStats()
        self._roots: dict[str | None, _Node] = {}
        self._clock = itertools.count(1)

    @property
    def bytes(self) -> int:
        return self.tokens * self.bytes_per_token

    def match(
        self, adapter: str | None, keys: np.ndarray, limit: int, least: int = 1
    ) -> tuple[int, list[tuple[Any, Any]]]:
        """The longest cached prefix of `keys` (at most `limit` tokens; none if under `least`): its
        length and its KV per layer."""
        path = self._walk(adapter, keys[:limit])
        matched = sum(taken for _, taken in path)
        if matched < max(1, least):
            self.stats.misses += 1
            return 0, []
        self.stats.hits += 1
        self.stats.hit_tokens += matched
        import torch

        now = next(self._clock)
        for node, _ in path:
            node.used = now
        layers = len(path[0][0].kv)
        kv = []
        for layer in range(layers):
            parts = [
                (node.kv[layer][0][:, :, :taken], node.kv[layer][1][:, :, :taken]) for node, taken in path
            ]
            kv.append((torch.cat([k for k, _ in parts], dim=2), torch.cat([v for _, v in parts], dim=2)))
        return matched, kv

    def insert(self, adapter: str | None, keys: np.ndarray, kv: list[tuple[Any, Any]]) -> None:
        """Keep a prompt's KV (per layer, covering every key): only what the tree lacks is copied."""
        if self.capacity == 0 or len(keys) == 0:
            return
        root = self._roots.get(adapter)
        if root is None:
            root = self._roots[adapter] = _Node(np.empty(0, dtype=np.int64), [], None)
        now = next(self._clock)
        node, done = root, 0
        while done < len(keys):
            child = node.children.get(int(keys[done]))
            if child is None:
                break
            taken = common_length(child.keys, keys[done:])
            if taken < len(child.keys):
                child = self._split(child, taken)
            child.used = now
            node, done = child, done + taken
        if done == len(keys):
            return
        rest = [(k[:, :, done:].clone(), v[:, :, done:].clone()) for k, v in kv]
        leaf = _Node(keys[done:].copy(), rest, node, used=now)
        node.children[int(keys[done])] = leaf
        self.tokens += len(leaf.keys)
        self.shrink(self.capacity)

    def shrink(self, tokens: int) -> int:
        """Evict least recently used leaves until at most `tokens` are held; the tokens freed."""
        before = self.tokens
        while self.tokens > max(0, tokens):
            leaves = [node for node in self._nodes() if not node.children]
            if not leaves:
                break
            oldest = min(leaves, key=lambda node: node.used)
            assert oldest.parent is not None
            del oldest.parent.children[int(oldest.keys[0])]
            self.tokens -= len(oldest.keys)
            self.stats.evictions += 1
        return before - self.tokens

    def clear(self) -> None:
        """Drop everything (GPU memory ran out)."""
        self.shrink(0)
        self._roots.clear()

    def _walk(self, adapter: str | None, keys: np.ndarray) -> list[tuple[_Node, int]]:
        node = self._roots.get(adapter)
        path: list[tuple[_Node, int]] = []
        done = 0
        while node is not None and done < len(keys):
            child = node.children.get(int(keys[done]))
            if child is None:
                break
            taken = common_length(child.keys, keys[done:])
            path.append((child, taken))
            done += taken
            if taken < len(child.keys):
                break
            node = child
        return path

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut `node` after `at` keys; the new head takes its place and the rest hangs below it."""
        parent = node.parent
        assert parent is not None
        head = _Node(
            node.keys[:at].copy(),
            [(k[:, :, :at].clone(), v[:, :, :at].clone()) for k, v in node.kv],
            parent,
            used=node.used,
        )
        # Copies, so that each part holds only its own memory once the other is evicted.
        node.keys = node.keys[at:].copy()
        node.kv = [(k[:, :, at:].clone(), v[:, :, at:].clone()) for k, v in node.kv]
        node.parent = head
        head.children[int(node.keys[0])] = node
        parent.children[int(head.keys[0])] = head
        return head

    def _nodes(self) -> list[_Node]:
        found: list[_Node] = []
        stack = [child for root in self._roots.values() for child in root.children.values()]
        while stack:
            node = stack.pop()
            found.append(node)
            stack.extend(node.children.values())
        return found
