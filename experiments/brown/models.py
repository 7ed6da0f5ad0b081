"""Language models for the Brown corpus, in Flax NNX.

Every model maps a batch of word ids ``(B, T)`` to features ``(B, T, D)`` (position ``t`` sees
words ``<= t`` only) and exposes its output layer as ``(w: (D, V), bias: (V,))``
(``output_layer``) and as it holds it (``output_weights``: the transformer's tied embedding
table is ``(V, D)``, which the fused loss takes as it is, ``w_layout="vd"``); the training
step applies the output layer itself, either fused with the loss (``jxent``) or as materialised
logits (``optax``). That split is what lets the softmax over the vocabulary, which dominates the
compute of these models, go through ``jxent.fused_linear_cross_entropy``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.brown.configs import Config


def _split(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


class NPLM(nnx.Module):
    """Bengio et al. (2003)'s neural probabilistic language model (their eq. 1).

    ``y = b + W x + U tanh(d + H x)``, where ``x`` concatenates the ``m``-dimensional feature
    vectors of the ``n - 1`` previous words. The direct connections ``W`` and the hidden-to-output
    weights ``U`` are one output matrix over the features ``[x, tanh(d + H x)]``, so the whole
    output layer is a single linear map (``D = (n - 1) m + h``). Position ``t`` of the window
    predicts word ``t + 1`` from words ``t - n + 2, ..., t``; positions with fewer than ``n - 1``
    words in the window see the unknown symbol (id 0) in their place.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        order: int = 5,
        embed_dim: int = 60,
        hidden: int = 50,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self.context = order - 1
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.hidden = nnx.Linear(self.context * embed_dim, hidden, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        width = self.context * embed_dim + hidden
        self.out_w = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (width, vocab_size)))
        self.out_b = nnx.Param(jnp.zeros((vocab_size,)))

    def __call__(self, ids: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        padded = jnp.pad(ids, ((0, 0), (self.context - 1, 0)))  # id 0: the unknown symbol
        steps = ids.shape[1]
        # Position t predicts word t + 1 (as every model here does) from words t-(n-2), ..., t,
        # oldest first.
        context = jnp.stack([padded[:, k : k + steps] for k in range(self.context)], axis=-1)
        x = self.embed(context).reshape(*ids.shape, -1)
        h = jnp.tanh(self.hidden(x))
        features = jnp.concatenate([x, h], axis=-1)
        return self.dropout(features, deterministic=dropout_key is None, rngs=dropout_key)

    def output_layer(self) -> tuple[jax.Array, jax.Array]:
        return self.out_w[...], self.out_b[...]

    def output_weights(self) -> tuple[jax.Array, jax.Array, str]:
        """``(w, bias, w_layout)`` as held: ``w`` is ``(D, V)``."""
        return self.out_w[...], self.out_b[...], "dv"


class Block(nnx.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP, each residual."""

    def __init__(self, width: int, heads: int, dropout: float, *, rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, use_bias=False, rngs=rngs)
        self.proj = nnx.Linear(width, width, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.fc1 = nnx.Linear(width, 4 * width, rngs=rngs)
        self.fc2 = nnx.Linear(4 * width, width, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        k_attn, k_mlp, k_hidden = _split(dropout_key, 3)
        batch, steps, width = x.shape
        q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
        shape = (batch, steps, self.heads, width // self.heads)
        attended = jax.nn.dot_product_attention(
            q.reshape(shape), k.reshape(shape), v.reshape(shape), is_causal=True
        ).reshape(x.shape)
        x = x + self._drop(self.proj(attended), k_attn)
        hidden = self._drop(jax.nn.gelu(self.fc1(self.norm2(x))), k_hidden)
        return x + self._drop(self.fc2(hidden), k_mlp)

    def _drop(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        return self.dropout(x, deterministic=key is None, rngs=key)


class Transformer(nnx.Module):
    """A small causal transformer with learned positions and input/output weight tying.

    Tying (the output matrix is the embedding's transpose) halves the parameters that a
    14k-word vocabulary costs and regularises them: on a million-word corpus that is worth
    more than the extra capacity of a separate output matrix.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        context: int,
        width: int,
        depth: int,
        heads: int,
        dropout: float,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(vocab_size, width, embedding_init=init, rngs=rngs)
        self.position = nnx.Embed(context, width, embedding_init=init, rngs=rngs)
        self.blocks = nnx.List([Block(width, heads, dropout, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.out_b = nnx.Param(jnp.zeros((vocab_size,)))

    def __call__(self, ids: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        keys = _split(dropout_key, len(self.blocks) + 1)
        x = self.embed(ids) + self.position(jnp.arange(ids.shape[1]))
        x = self.dropout(x, deterministic=keys[0] is None, rngs=keys[0])
        for block, key in zip(self.blocks, keys[1:], strict=True):
            x = block(x, key)
        return self.norm(x)

    def output_layer(self) -> tuple[jax.Array, jax.Array]:
        return self.embed.embedding[...].T, self.out_b[...]

    def output_weights(self) -> tuple[jax.Array, jax.Array, str]:
        """``(w, bias, w_layout)`` as held: the embedding table, ``(V, D)``, untransposed."""
        return self.embed.embedding[...], self.out_b[...], "vd"


def build_model(config: Config, vocab_size: int) -> nnx.Module:
    """The config's model, initialised from ``config.seed`` alone (one compiled initialiser
    per shape)."""
    return _compiled_init(config, vocab_size)(jax.random.key(config.seed))


@functools.cache
def _compiled_init(config: Config, vocab_size: int) -> Any:
    def init(key: jax.Array) -> nnx.Module:
        rngs = nnx.Rngs(params=key)
        if config.model == "nplm":
            return NPLM(
                vocab_size,
                order=config.order,
                embed_dim=config.embed_dim,
                hidden=config.hidden,
                dropout=config.dropout or 0.0,
                rngs=rngs,
            )
        return Transformer(
            vocab_size,
            context=config.context,
            width=config.width,
            depth=config.depth,
            heads=config.heads,
            dropout=config.dropout or 0.0,
            rngs=rngs,
        )

    return nnx.jit(init)
