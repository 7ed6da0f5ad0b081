"""Training and evaluation of the Brown language models: the losses, the jitted steps, ``fit``,
and ``train_and_evaluate``, which runs one configured run and writes its files.

* Training: the steps of an epoch run in jitted ``lax.scan`` chunks over windows gathered
  from the device-resident token stream (``input_pipeline``). Keys derive from ``(seed,
  epoch, step)`` only, so a resumed run replays exactly what an uninterrupted one does.
* Output layer and loss: ``jxent.fused_linear_cross_entropy`` on the features and the model's
  output matrix as the model holds it (the transformer's tied ``(V, D)`` embedding table with
  ``w_layout="vd"``, no transpose; the ``[tokens, V]`` logits are never formed), or, with
  ``loss="optax"``, optax's cross-entropy on materialised logits. Each step also reports its
  token accuracy and z-loss term (jxent: the fused loss's aux outputs), logged per epoch as
  ``train_accuracy`` and ``train_z_loss``.
* Evaluation: perplexity ``exp(mean CE)`` over every word of a split, unknown symbol included,
  computed with jxent in float32, on the overlapping windows of ``input_pipeline``.
* Epochs, checkpoints, interrupts and resumes: the loop of ``experiments.common.loop`` (shared
  with the MNIST engine); the best parameters by validation perplexity travel in every
  checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jxent
from experiments.brown.configs import EXPERIMENT, Config, describe
from experiments.brown.input_pipeline import (
    eval_windows,
    gather_windows,
    load_corpus,
    make_permute,
    pad_windows,
    steps_per_epoch,
)
from experiments.brown.models import build_model
from experiments.common import devices, loop, plots, runfiles
from experiments.common.signals import StopRequest
from experiments.data import brown

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
    """``(features (N, D), w, bias (V,), labels (N,), w_layout) -> (mean CE, metrics)``:
    jxent's or optax's, ``w`` being ``(D, V)`` (``w_layout="dv"``) or ``(V, D)`` (``"vd"``).
    ``metrics``: the batch's token ``accuracy`` and its z-loss term ``z_loss`` (part of the
    mean CE).

    ``chunk``: tokens per block of jxent's fused loss (None: its own choice, which keeps a
    whole batch of 2048 x 14,114 logits in one 116 MB block).
    """
    if name == "jxent":

        def fused(features, w, bias, labels, w_layout="dv"):
            loss, aux = jxent.fused_linear_cross_entropy(
                features,
                w,
                labels,
                bias=bias,
                chunk_size=chunk,
                label_smoothing=label_smoothing,
                z_loss=z_loss,
                w_layout=w_layout,
                return_aux=True,
            )
            return loss, {"accuracy": aux.accuracy, "z_loss": aux.z_loss}

        return fused
    if name == "optax":

        def materialised(features, w, bias, labels, w_layout="dv"):
            logits = (features @ (w if w_layout == "dv" else w.T)) + bias
            if label_smoothing:
                targets = optax.smooth_labels(
                    jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing
                )
                loss = optax.softmax_cross_entropy(logits, targets)
            else:
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            z_term = z_loss * jax.nn.logsumexp(logits, axis=-1) ** 2 if z_loss else 0.0 * loss
            # The label's logit is the row's maximum: argmax == label up to ties, without
            # argmax's reduction, which XLA:CPU runs 6x slower than a max.
            target = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
            accuracy = jnp.mean(target >= jnp.max(logits, axis=-1))
            return (loss + z_term).mean(), {"accuracy": accuracy, "z_loss": z_term.mean()}

        return materialised
    raise ValueError(f"loss {name!r} is not one of {LOSSES}")


# --------------------------------------------------------------------------------------------
# Jitted steps.


def features_and_output(graphdef: Any, params: Any, inputs: jax.Array, dropout_key: Any) -> Any:
    """``(features (N, D), w, bias, w_layout)``, ``w`` as the model holds it."""
    model = nnx.merge(graphdef, params)
    features = model(inputs, dropout_key=dropout_key)
    return (features.reshape(-1, features.shape[-1]), *model.output_weights())


def make_train_step(graphdef: Any, optimizer: Any, loss_fn: Callable) -> Callable:
    """One step on a batch of windows ``(B, context + 1)``: ``(params, opt_state, loss,
    metrics)``."""

    def train_step(params, opt_state, windows, dropout_key):
        def loss_of(params):
            features, w, bias, layout = features_and_output(
                graphdef, params, windows[:, :-1], dropout_key
            )
            return loss_fn(features, w, bias, windows[:, 1:].reshape(-1), layout)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    return train_step


def make_train_chunk(
    graphdef: Any, optimizer: Any, loss_fn: Callable, mesh: Any, context: int
) -> Callable:
    """Jitted ``(params, opt_state, tokens, starts (steps, B), key, first_step)`` ->
    ``(params, opt_state, sums)``, ``sums`` the chunk's sums of the steps' ``loss`` and
    metrics; step ``s`` draws dropout from ``fold_in(key, s)``."""
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    train_step = make_train_step(graphdef, optimizer, loss_fn)

    def train_chunk(params, opt_state, tokens, starts, key, first_step):
        def step(carry, inputs):
            params, opt_state = carry
            batch_starts, index = inputs
            windows = gather_windows(tokens, batch_starts, context + 1)
            windows = jax.lax.with_sharding_constraint(windows, batch_sharding)
            params, opt_state, loss, metrics = train_step(
                params, opt_state, windows, jax.random.fold_in(key, index)
            )
            carry = (jax.lax.with_sharding_constraint(params, replicated), opt_state)
            return carry, {"loss": loss, **metrics}

        indices = first_step + jnp.arange(starts.shape[0])
        (params, opt_state), per_step = jax.lax.scan(step, (params, opt_state), (starts, indices))
        return params, opt_state, jax.tree.map(jnp.sum, per_step)

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
            w, bias, layout = model.output_weights()
            losses = jxent.fused_linear_cross_entropy(
                features.reshape(-1, features.shape[-1]).astype(jnp.float32),
                w.astype(jnp.float32),
                y.reshape(-1),
                bias=bias.astype(jnp.float32),
                ignore_index=-1,
                reduction=reduction,
                w_layout=layout,
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
# The run.


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
    # Where the time limit stopped training (``loop.Outcome.time_limit_stop``), or None.
    time_limit_stop: dict[str, Any] | None = None


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
    time_limit: float | None = None,
    started: float | None = None,
) -> LMResult:
    """Trains ``model`` on ``corpus.ids[corpus.train]``, checkpointing every epoch (see ``loop``).

    ``resume`` continues from the newest complete checkpoint under ``run_dir`` (from the start
    if there is none). ``on_chunk(epoch, step)`` is a test hook called after every chunk.
    ``cache_key``: a hashable value that fully determines ``optimizer`` (e.g. the experiment's
    frozen config); runs in one process with equal keys share compiled step functions.
    ``time_limit``: seconds from ``started`` (a ``loop.clock()`` value, default now) within
    which training and the final evaluation must end (see ``loop.TimeLimit``).
    """
    started = loop.clock() if started is None else started
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
        params, opt_state, sums = train_chunk(
            state["params"], state["opt_state"], tokens, order, dropout_root, jnp.int32(start)
        )
        return {**state, "params": params, "opt_state": opt_state}, sums

    def end_epoch(state, stats: loop.EpochStats):
        valid_ppl = perplexity(*evaluate(state["params"], *valid))
        best_valid = min((r["valid_perplexity"] for r in stats.earlier), default=math.inf)
        if valid_ppl < best_valid:
            best_valid = valid_ppl
            # A copy: the next chunk donates the params' buffers.
            state = {**state, "best_params": jax.tree.map(jnp.copy, state["params"])}
        words = stats.trained_steps * options.batch_size * options.context
        # The mean over the epoch's steps of each step's token accuracy and z-loss term (the
        # fused loss's aux outputs); absent from records written before they were logged.
        trained = {f"train_{name}": value for name, value in stats.train_metrics.items()}
        return state, {
            "train_perplexity": math.exp(stats.train_loss),
            **trained,
            "valid_perplexity": valid_ppl,
            "best_valid_perplexity": best_valid,
            "words_per_second": words / stats.train_seconds,
        }

    def describe(record: dict[str, Any]) -> str:
        accuracy = record.get("train_accuracy")
        return (
            f"train ppl {record['train_perplexity']:8.2f}  "
            + ("" if accuracy is None else f"train acc {accuracy:6.2%}  ")
            + f"valid ppl {record['valid_perplexity']:8.2f}  "
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
        time_limit=None
        if time_limit is None
        else loop.TimeLimit(
            time_limit,
            started,
            # Until an evaluation is timed: forward passes over the validation and test
            # windows, at a third of a train step's cost per window.
            evaluation_steps=(valid[0].shape[0] + test[0].shape[0]) / (3 * options.batch_size),
        ),
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
    return LMResult(
        jax.device_get(best_params),
        outcome.records,
        test_ppl,
        sample,
        False,
        0,
        outcome.time_limit_stop,
    )


def build_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW (no decay on biases and norms), warmup then cosine to zero at the run's end.

    A schedule that ends with the run matters more than any other knob here: stopped while the
    learning rate is still high, the same network is tens of perplexity points worse.
    """
    assert config.epochs is not None and config.learning_rate is not None
    total = config.epochs * steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=min(config.warmup_steps, total // 2),
        decay_steps=total,
        end_value=0.0,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, weight_decay=config.weight_decay or 0.0, mask=decay_mask),
    )


def lm_options(config: Config, progress: bool) -> LMOptions:
    assert config.epochs is not None and config.eval_stride is not None
    return LMOptions(
        epochs=config.epochs,
        batch_size=config.batch_size,
        context=config.context,
        seed=config.seed,
        loss=config.loss,
        label_smoothing=config.label_smoothing,
        z_loss=config.z_loss,
        loss_chunk=config.loss_chunk or None,
        devices=config.devices,
        chunk_steps=config.chunk_steps,
        eval_stride=config.eval_stride,
        progress=progress,
    )


def train_and_evaluate(
    config: Config,
    run_dir: Path,
    *,
    resume: bool = False,
    corpus: brown.Corpus | None = None,
    progress: bool = True,
    stop: StopRequest | None = None,
    on_chunk: Any = None,
    plots_too: bool = True,
) -> LMResult:
    """Trains, evaluates and writes every artefact of one run into ``run_dir``.

    ``corpus`` replaces the Brown loader (tests); ``plots_too=False`` skips the PNG.
    ``config.time_limit`` counts from here.
    """
    started = loop.clock()
    if corpus is None:
        corpus = load_corpus(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    runfiles.ensure_config(run_dir, config)
    options = lm_options(config, progress)
    n_steps = steps_per_epoch(corpus.train.stop, config.batch_size, config.context)
    t0 = time.perf_counter()
    result = fit(
        model=build_model(config, corpus.vocab_size),
        optimizer=build_optimizer(config, n_steps),
        corpus=corpus,
        options=options,
        run_dir=run_dir,
        resume=resume,
        stop=stop,
        on_chunk=on_chunk,
        # The limit changes no step function: runs with and without one share them.
        cache_key=(EXPERIMENT, dataclasses.replace(config, time_limit=None), corpus.vocab_size),
        time_limit=60 * config.time_limit if config.time_limit else None,
        started=started,
    )
    if result.interrupted or jax.process_index() != 0:
        return result
    best = min(result.records, key=lambda r: r["valid_perplexity"])
    runfiles.write_json_atomic(
        run_dir / "results.json",
        {
            "test_perplexity": result.test_perplexity,
            "best_epoch": best["epoch"],
            "best_valid_perplexity": best["valid_perplexity"],
            "vocab_size": corpus.vocab_size,
            "test_words": corpus.test.stop - corpus.test.start,
            "train_seconds": sum(r["train_seconds"] for r in result.records),
            "wall_seconds_this_process": time.perf_counter() - t0,
            "peak_rss_bytes": peak_rss_bytes(),
            "sample": result.sample,
            "time_limit_stop": result.time_limit_stop,
        },
    )
    if plots_too:
        plots.plot_perplexity(result.records, run_dir / "curves.png", describe(config))
    return result
