"""Training and evaluation of language models on one stream of word ids (see ``lm_models``).

* Training: every epoch cuts the training words into windows of ``context + 1`` words at a
  random offset, shuffles the windows, and runs the steps in jitted ``lax.scan`` chunks with the
  token stream resident on the device. Keys derive from ``(seed, epoch, step)`` only, so a
  resumed run replays exactly what an uninterrupted one does.
* Output layer and loss: ``jxent.fused_linear_cross_entropy`` on the features and the model's
  output matrix (the ``[tokens, V]`` logits are never formed), or, with ``loss="optax"``,
  optax's cross-entropy on materialised logits.
* Evaluation: perplexity ``exp(mean CE)`` over every word of a split, unknown symbol included,
  computed with jxent in float32. Windows overlap (``stride < context``) so each scored word
  sees at least ``context - stride`` words of context; a window may reach back across the
  split's start, since the corpus is one text.
* Epochs, checkpoints, interrupts and resumes: the loop of ``loop`` (shared with the MNIST
  engine); the best parameters by validation perplexity travel in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import devices
import jax
import jax.numpy as jnp
import loop
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from signals import StopRequest

import jxent

LOSSES = ("jxent", "optax")


@dataclasses.dataclass(frozen=True)
class LMOptions:
    """Everything ``fit`` needs besides the model, optimizer and data."""

    epochs: int
    batch_size: int
    context: int
    seed: int
    loss: str = "jxent"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    loss_chunk: int | None = None
    devices: int = 1
    chunk_steps: int = 50
    eval_stride: int = 32
    eval_batch: int = 64
    sample_words: int = 40
    progress: bool = True


def make_loss(
    name: str, label_smoothing: float = 0.0, z_loss: float = 0.0, chunk: int | None = None
) -> Callable:
    """``(features (N, D), w (D, V), bias (V,), labels (N,)) -> mean CE``: jxent's or optax's.

    ``chunk``: tokens per block of jxent's fused loss (None: its own choice, which keeps a
    whole batch of 2048 x 14,114 logits in one 116 MB block).
    """
    if name == "jxent":

        def fused(features, w, bias, labels):
            return jxent.fused_linear_cross_entropy(
                features,
                w,
                labels,
                bias=bias,
                chunk_size=chunk,
                label_smoothing=label_smoothing,
                z_loss=z_loss,
            )

        return fused
    if name == "optax":

        def materialised(features, w, bias, labels):
            logits = features @ w + bias
            if label_smoothing:
                targets = optax.smooth_labels(
                    jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing
                )
                loss = optax.softmax_cross_entropy(logits, targets)
            else:
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            if z_loss:
                loss = loss + z_loss * jax.nn.logsumexp(logits, axis=-1) ** 2
            return loss.mean()

        return materialised
    raise ValueError(f"loss {name!r} is not one of {LOSSES}")


# --------------------------------------------------------------------------------------------
# Batches.


def steps_per_epoch(n_tokens: int, batch_size: int, context: int) -> int:
    """Full batches of windows per epoch (the count at the worst random offset)."""
    windows = (n_tokens - context) // context
    if windows < batch_size:
        raise ValueError(
            f"{n_tokens} training words make {windows} windows of context {context}; "
            f"expected at least batch_size {batch_size}"
        )
    return windows // batch_size


def make_permute(n_tokens: int, batch_size: int, context: int) -> Callable:
    """Jitted ``epoch key -> (steps, batch)`` window starts: a random offset, shuffled windows."""
    n_steps = steps_per_epoch(n_tokens, batch_size, context)
    windows = (n_tokens - context) // context

    def permute(key):
        offset = jax.random.randint(jax.random.fold_in(key, 0), (), 0, context)
        order = jax.random.permutation(jax.random.fold_in(key, 2), windows)
        starts = offset + context * order[: n_steps * batch_size]
        return starts.reshape(n_steps, batch_size)

    return jax.jit(permute)


def gather_windows(tokens: jax.Array, starts: jax.Array, length: int) -> jax.Array:
    return tokens[starts[:, None] + jnp.arange(length)]


def eval_windows(
    ids: np.ndarray, split: slice, context: int, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(K, context)`` and targets ``(K, context)`` scoring each word of ``split`` once.

    Window ``k`` scores the words ``[a + k·stride, a + (k+1)·stride)`` (``a`` = split start),
    placed at its end, so each sees at least ``context - stride`` words before it; every other
    target is -1 (ignored).
    """
    start, stop = split.start, split.stop
    if not 0 < stride <= context:
        raise ValueError(f"eval stride {stride}: expected 1..context ({context})")
    if start < context + 1 - stride:
        raise ValueError(f"split {split} starts too early for context {context}")
    inputs, targets = [], []
    for lo in range(start, stop, stride):
        end = min(lo + stride, stop)
        target = ids[end - context : end].astype(np.int32)
        target[: context - (end - lo)] = -1
        inputs.append(ids[end - context - 1 : end - 1])
        targets.append(target)
    return np.stack(inputs).astype(np.int32), np.stack(targets)


# --------------------------------------------------------------------------------------------
# Jitted steps.


def features_and_output(graphdef: Any, params: Any, inputs: jax.Array, dropout_key: Any) -> Any:
    model = nnx.merge(graphdef, params)
    features = model(inputs, dropout_key=dropout_key)
    w, bias = model.output_layer()
    return features.reshape(-1, features.shape[-1]), w, bias


def make_train_step(graphdef: Any, optimizer: Any, loss_fn: Callable) -> Callable:
    """One step on a batch of windows ``(B, context + 1)``: ``(params, opt_state, loss)``."""

    def train_step(params, opt_state, windows, dropout_key):
        def loss_of(params):
            features, w, bias = features_and_output(graphdef, params, windows[:, :-1], dropout_key)
            return loss_fn(features, w, bias, windows[:, 1:].reshape(-1))

        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def make_train_chunk(
    graphdef: Any, optimizer: Any, loss_fn: Callable, mesh: Any, context: int
) -> Callable:
    """Jitted ``(params, opt_state, tokens, starts (steps, B), key, first_step)`` ->
    ``(params, opt_state, loss_sum)``; step ``s`` draws dropout from ``fold_in(key, s)``."""
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    train_step = make_train_step(graphdef, optimizer, loss_fn)

    def train_chunk(params, opt_state, tokens, starts, key, first_step):
        def step(carry, inputs):
            params, opt_state = carry
            batch_starts, index = inputs
            windows = gather_windows(tokens, batch_starts, context + 1)
            windows = jax.lax.with_sharding_constraint(windows, batch_sharding)
            params, opt_state, loss = train_step(
                params, opt_state, windows, jax.random.fold_in(key, index)
            )
            return (jax.lax.with_sharding_constraint(params, replicated), opt_state), loss

        indices = first_step + jnp.arange(starts.shape[0])
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (starts, indices))
        return params, opt_state, losses.sum()

    return jax.jit(train_chunk, donate_argnums=(0, 1))


def make_evaluate(graphdef: Any, eval_batch: int, scored: int, per_word: bool = False) -> Callable:
    """Jitted ``(params, inputs (K, T), targets (K, T)) -> (CE sum, words)`` with jxent, fp32.

    Only the last ``scored`` positions of a window carry targets (``eval_windows``), so only
    their features go through the output layer, the bulk of the cost: half of it at the
    transformer's default stride. ``per_word``: the CE of each of those positions instead,
    ``(K * scored,)`` in window order (0 where the target is -1), and the word count.
    """
    reduction = "none" if per_word else "sum"

    def evaluate(params, inputs, targets):
        def one_batch(batch):
            x, y = batch
            model = nnx.merge(graphdef, params)
            features = model(x)[:, -scored:]
            y = y[:, -scored:]
            w, bias = model.output_layer()
            losses = jxent.fused_linear_cross_entropy(
                features.reshape(-1, features.shape[-1]).astype(jnp.float32),
                w.astype(jnp.float32),
                y.reshape(-1),
                bias=bias.astype(jnp.float32),
                ignore_index=-1,
                reduction=reduction,
            )
            return losses, (y >= 0).sum()

        k, t = inputs.shape
        batched = (
            inputs.reshape(k // eval_batch, eval_batch, t),
            targets.reshape(-1, eval_batch, t),
        )
        losses, counts = jax.lax.map(one_batch, batched)
        return (losses.reshape(-1) if per_word else losses.sum()), counts.sum()

    return jax.jit(evaluate)


def pad_windows(inputs: np.ndarray, targets: np.ndarray, multiple: int) -> tuple[Any, Any]:
    """Pads the window count to a multiple of the eval batch with windows that score nothing."""
    extra = -len(inputs) % multiple
    inputs = np.concatenate([inputs, np.zeros((extra, inputs.shape[1]), inputs.dtype)])
    targets = np.concatenate([targets, np.full((extra, targets.shape[1]), -1, targets.dtype)])
    return inputs, targets


def make_generate(graphdef: Any, context: int, n_words: int) -> Callable:
    """Jitted ``(params, prompt (context,), key) -> n_words`` sampled ids (temperature 1).

    The unknown symbol (id 0) is never sampled: a sample of words reads better without it.
    """

    def generate(params, prompt, key):
        model = nnx.merge(graphdef, params)
        w, bias = model.output_layer()
        buffer = jnp.concatenate([prompt, jnp.zeros((n_words,), prompt.dtype)])

        def body(i, buffer):
            window = jax.lax.dynamic_slice(buffer, (i,), (context,))
            logits = model(window[None])[0, -1] @ w + bias
            logits = logits.at[0].set(-jnp.inf)
            word = jax.random.categorical(jax.random.fold_in(key, i), logits)
            return buffer.at[context + i].set(word.astype(buffer.dtype))

        return jax.lax.fori_loop(0, n_words, body, buffer)[context:]

    return jax.jit(generate)


# --------------------------------------------------------------------------------------------
# The loop.


def initial_state(params: Any, optimizer: Any) -> dict[str, Any]:
    """What ``fit`` trains and checkpoints: params, optimizer state, best params so far."""
    return {"params": params, "opt_state": optimizer.init(params), "best_params": params}


@dataclasses.dataclass
class LMResult:
    """What ``fit`` leaves: best params (host), per-epoch records, test perplexity, exit status."""

    params: Any
    records: list[dict[str, Any]]
    test_perplexity: float | None
    sample: str | None
    interrupted: bool
    exit_code: int


def perplexity(ce_sum: Any, words: Any) -> float:
    return math.exp(float(ce_sum) / int(words))


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fit(
    *,
    model: Any,
    optimizer: Any,
    corpus: Any,
    options: LMOptions,
    run_dir: Path,
    resume: bool = False,
    stop: StopRequest | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    cache_key: Any = None,
) -> LMResult:
    """Trains ``model`` on ``corpus.ids[corpus.train]``, checkpointing every epoch (see ``loop``).

    ``resume`` continues from the newest complete checkpoint under ``run_dir`` (from the start
    if there is none). ``on_chunk(epoch, step)`` is a test hook called after every chunk.
    ``cache_key``: a hashable value that fully determines ``optimizer`` (e.g. the experiment's
    frozen config); runs in one process with equal keys share compiled step functions.
    """
    mesh = devices.make_mesh(options.devices, options.batch_size)
    replicated = NamedSharding(mesh, P())
    graphdef, params = nnx.split(model, nnx.Param)
    state = devices.replicate(initial_state(params, optimizer), replicated)

    train_ids = corpus.ids[corpus.train]
    tokens, valid, test = devices.replicate(
        (
            train_ids,
            pad_windows(
                *eval_windows(corpus.ids, corpus.valid, options.context, options.eval_stride),
                options.eval_batch,
            ),
            pad_windows(
                *eval_windows(corpus.ids, corpus.test, options.context, options.eval_stride),
                options.eval_batch,
            ),
        ),
        replicated,
    )
    n_steps = steps_per_epoch(len(train_ids), options.batch_size, options.context)
    loss_fn = make_loss(options.loss, options.label_smoothing, options.z_loss, options.loss_chunk)

    def build_step_functions() -> tuple[Callable, ...]:
        return (
            make_train_chunk(graphdef, optimizer, loss_fn, mesh, options.context),
            make_evaluate(graphdef, options.eval_batch, options.eval_stride),
            make_permute(len(train_ids), options.batch_size, options.context),
            make_generate(graphdef, options.context, options.sample_words),
        )

    # Same config, graph and data size: reuse the compiled functions (tests run many).
    train_chunk, evaluate, permute, generate = loop.compiled_once(
        None if cache_key is None else (cache_key, graphdef, options, len(train_ids)),
        build_step_functions,
    )

    def run_chunk(state, order, dropout_root, start):
        params, opt_state, loss_sum = train_chunk(
            state["params"], state["opt_state"], tokens, order, dropout_root, jnp.int32(start)
        )
        return {**state, "params": params, "opt_state": opt_state}, loss_sum

    def end_epoch(state, stats: loop.EpochStats):
        valid_ppl = perplexity(*evaluate(state["params"], *valid))
        best_valid = min((r["valid_perplexity"] for r in stats.earlier), default=math.inf)
        if valid_ppl < best_valid:
            best_valid = valid_ppl
            # A copy: the next chunk donates the params' buffers.
            state = {**state, "best_params": jax.tree.map(jnp.copy, state["params"])}
        words = stats.trained_steps * options.batch_size * options.context
        return state, {
            "train_perplexity": math.exp(stats.train_loss),
            "valid_perplexity": valid_ppl,
            "best_valid_perplexity": best_valid,
            "words_per_second": words / stats.train_seconds,
        }

    def describe(record: dict[str, Any]) -> str:
        return (
            f"train ppl {record['train_perplexity']:8.2f}  "
            f"valid ppl {record['valid_perplexity']:8.2f}  "
            f"{record['words_per_second']:,.0f} words/s"
        )

    outcome = loop.run(
        state,
        hooks=loop.Hooks(
            order=permute,
            run_chunk=run_chunk,
            end_epoch=end_epoch,
            describe=describe,
            show_loss=lambda mean: {"ppl": f"{math.exp(mean):.1f}"},
        ),
        schedule=options,
        n_steps=n_steps,
        run_dir=run_dir,
        sharding=replicated,
        resume=resume,
        stop=stop,
        on_chunk=on_chunk,
    )
    best_params = outcome.state["best_params"]
    if outcome.interrupted:
        return LMResult(
            jax.device_get(best_params), outcome.records, None, None, True, outcome.exit_code
        )
    test_ppl = perplexity(*evaluate(best_params, *test))
    sample = None
    if options.sample_words:
        prompt = jnp.asarray(corpus.ids[corpus.test][: options.context])
        words = generate(best_params, prompt, jax.random.key(options.seed))
        sample = " ".join(corpus.words(np.asarray(words)))
        loop.log(f"sample (after the first {options.context} test words): {sample}")
    return LMResult(jax.device_get(best_params), outcome.records, test_ppl, sample, False, 0)
