"""Training and evaluation of the MNIST classifiers: the losses, the jitted steps, ``fit``, and
``train_and_evaluate``, which runs one configured run and writes its files.

``fit`` trains any Flax NNX classifier whose ``__call__(x, *, dropout_key=None)`` maps a batch
of uint8-derived float images to logits. Its design goals, and how it meets them:

* Fast: the dataset lives on the device; an epoch is a handful of jitted ``lax.scan`` chunks
  (no per-step host round trip); train state buffers are donated.
* Reproducible, resumable bit for bit, kill-safe and interruptible: the epoch loop of
  ``experiments.common.loop``, which the language models' engine runs too.
* Data parallel: a ``Mesh`` over ``--devices`` devices; each batch is sharded over the ``data``
  axis and parameters are replicated, so XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import dataclasses
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
from experiments.common import devices, loop, runfiles
from experiments.common.plots import write_plots
from experiments.common.signals import StopRequest
from experiments.data.mnist import MNIST
from experiments.mnist import input_pipeline
from experiments.mnist.configs import SCHEDULES, Config, LeNet5Config, MLPConfig
from experiments.mnist.input_pipeline import normalize, random_shift, steps_per_epoch
from experiments.mnist.models import build_model

LOSSES = ("jxent", "optax")


def make_loss(name: str, label_smoothing: float = 0.0) -> Callable[[Any, Any], Any]:
    """Mean cross-entropy of integer labels: jxent's, or optax's for comparison."""

    if name == "jxent":

        def jxent_loss(logits: Any, labels: Any) -> Any:
            return jxent.cross_entropy(logits, labels, label_smoothing=label_smoothing)

        return jxent_loss
    if name == "optax":

        def optax_loss(logits: Any, labels: Any) -> Any:
            if label_smoothing:
                targets = optax.smooth_labels(
                    jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing
                )
                return optax.softmax_cross_entropy(logits, targets).mean()
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return optax_loss
    raise ValueError(f"loss {name!r} is not one of {LOSSES}")


def build_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """The config's optimizer, its schedule counting steps from 0 over the whole run.

    MLP: AdamW with linear warmup, then cosine decay to zero. LeNet-5: Keras' Adam (epsilon
    1e-7), its learning rate constant (the tutorial) or cosine-decayed to zero; decaying it
    is the one change to the tutorial's recipe: it removes the epoch-to-epoch jitter of
    constant-rate Adam, so the last epoch is the best.
    """
    total = config.epochs * steps_per_epoch
    if isinstance(config, MLPConfig):
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=config.learning_rate,
            warmup_steps=min(int(config.warmup_epochs * steps_per_epoch), total // 2),
            decay_steps=total,
            end_value=0.0,
        )
        return optax.adamw(schedule, weight_decay=config.weight_decay)
    if config.schedule == "constant":
        learning_rate: Any = config.learning_rate
    elif config.schedule == "cosine":
        learning_rate = optax.cosine_decay_schedule(config.learning_rate, total)
    else:
        raise ValueError(f"schedule {config.schedule!r} is not one of {SCHEDULES}")
    return optax.adam(learning_rate, eps=1e-7)


def title(config: Config) -> str:
    """The plots' title: the model and the loss."""
    if isinstance(config, LeNet5Config):
        return f"LeNet-5, {config.loss} loss"
    return f"MLP {'-'.join(map(str, (784, *config.hidden, 10)))}, {config.loss} loss"


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """Everything ``fit`` needs besides the model, optimizer, loss and data."""

    epochs: int
    batch_size: int
    seed: int
    devices: int = 1
    chunk_steps: int = 50  # steps per jitted scan: the granularity of progress and interrupts
    eval_batch: int = 1000
    max_shift: int = 0  # random-translation augmentation, in pixels (0: none)
    progress: bool = True


def make_train_chunk(
    graphdef: Any, optimizer: Any, loss_fn: Callable, mesh: Any, max_shift: int = 0
) -> Callable:
    """A jitted function running a chunk of training steps in one ``lax.scan``.

    ``(params, opt_state, images, labels, batch_indices, key, first_step)`` ->
    ``(params, opt_state, loss_sum)``; ``batch_indices`` is ``(steps, batch)`` into the
    device-resident dataset and step ``s`` draws dropout from ``fold_in(key, s)``.
    """

    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    def train_chunk(params, opt_state, images, labels, batch_indices, key, first_step):
        def train_step(carry, inputs):
            params, opt_state = carry
            indices, step = inputs
            step_key = jax.random.fold_in(key, step)
            dropout_key, shift_key = jax.random.split(step_key)
            # Gather on the replicated dataset, then shard the batch over the mesh.
            x = random_shift(images[indices].reshape(-1, 28, 28), shift_key, max_shift)
            x = normalize(jax.lax.with_sharding_constraint(x, batch_sharding))
            y = jax.lax.with_sharding_constraint(labels[indices], batch_sharding)

            def loss_of(params):
                logits = nnx.merge(graphdef, params)(x, dropout_key=dropout_key)
                return loss_fn(logits, y)

            loss, grads = jax.value_and_grad(loss_of)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (jax.lax.with_sharding_constraint(params, replicated), opt_state), loss

        steps = first_step + jax.numpy.arange(batch_indices.shape[0])
        (params, opt_state), losses = jax.lax.scan(
            train_step, (params, opt_state), (batch_indices, steps)
        )
        return params, opt_state, losses.sum()

    return jax.jit(train_chunk, donate_argnums=(0, 1))


def make_eval(graphdef: Any, loss_fn: Callable, eval_batch: int) -> Callable:
    """A jitted ``(params, images, labels) -> (loss_sum, correct, predictions)`` in batches."""

    def evaluate(params, images, labels):
        model = nnx.merge(graphdef, params)
        n = images.shape[0]

        def one_batch(batch):
            x, y = batch
            logits = model(normalize(x))
            return loss_fn(logits, y) * x.shape[0], jnp.argmax(logits, axis=-1)

        losses, predictions = jax.lax.map(
            one_batch,
            (
                images.reshape(n // eval_batch, eval_batch, *images.shape[1:]),
                labels.reshape(n // eval_batch, eval_batch),
            ),
        )
        predictions = predictions.reshape(n)
        return losses.sum(), (predictions == labels).sum(), predictions

    return jax.jit(evaluate)


@dataclasses.dataclass
class FitResult:
    """What ``fit`` leaves: final params (host numpy), per-epoch records, exit status."""

    params: Any
    records: list[dict[str, Any]]
    predictions: np.ndarray | None
    interrupted: bool
    exit_code: int


def fit(
    *,
    model: Any,
    optimizer: Any,
    loss_fn: Callable,
    eval_loss_fn: Callable,
    data: MNIST,
    options: FitOptions,
    run_dir: Path,
    resume: bool = False,
    stop: StopRequest | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    cache_key: Any = None,
) -> FitResult:
    """Trains ``model`` on ``data``, checkpointing to ``run_dir`` every epoch (see ``loop``).

    Args:
      model: an NNX module, already initialised from the seed (only its params are trained).
      optimizer: an optax transformation; its schedule must count steps from 0.
      loss_fn / eval_loss_fn: ``(logits, int labels) -> mean loss`` for training / testing.
      data: host arrays; they are copied once to the devices.
      options: epochs, batch size, seed, devices, chunking.
      run_dir: where ``metrics.jsonl`` and ``checkpoints/`` go.
      resume: continue from the newest complete checkpoint under ``run_dir`` (from the start
        if there is none).
      stop: the interruption flag (installed by the caller); checked between chunks.
      on_chunk: test hook called as ``on_chunk(epoch, step)`` after each chunk.
      cache_key: a hashable value that fully determines ``optimizer``, ``loss_fn`` and
        ``eval_loss_fn`` (e.g. the experiment's frozen config). Runs in one process with equal
        keys then share compiled step functions instead of compiling them again.
    """
    mesh = devices.make_mesh(options.devices, options.batch_size)
    replicated = NamedSharding(mesh, P())
    graphdef, params = nnx.split(model, nnx.Param)
    state = devices.replicate({"params": params, "opt_state": optimizer.init(params)}, replicated)

    # The whole dataset lives on every device (uint8: 47 MB); batches are gathered on device.
    images, labels, test_images, test_labels = devices.replicate(
        (
            data.train_images.reshape(len(data.train_images), -1),
            data.train_labels,
            data.test_images,
            data.test_labels,
        ),
        replicated,
    )
    n_steps = steps_per_epoch(len(data.train_images), options.batch_size)

    def build_step_functions() -> tuple[Callable, Callable, Callable]:
        train_chunk = make_train_chunk(graphdef, optimizer, loss_fn, mesh, options.max_shift)
        eval_batch = loop.largest_divisor_at_most(len(data.test_images), options.eval_batch)
        evaluate = make_eval(graphdef, eval_loss_fn, eval_batch)
        permute = input_pipeline.make_permute(len(data.train_images), options.batch_size)
        return train_chunk, evaluate, permute

    # Same experiment config, graph, data sizes and mesh: reuse the compiled functions.
    train_chunk, evaluate, permute = loop.compiled_once(
        None
        if cache_key is None
        else (cache_key, graphdef, options, len(data.train_images), len(data.test_images)),
        build_step_functions,
    )

    def run_chunk(state, order, dropout_root, start):
        params, opt_state, loss_sum = train_chunk(
            state["params"],
            state["opt_state"],
            images,
            labels,
            order,
            dropout_root,
            jnp.int32(start),
        )
        return {"params": params, "opt_state": opt_state}, loss_sum

    predictions = None

    def end_epoch(state, stats: loop.EpochStats):
        nonlocal predictions
        test_loss_sum, correct, predictions = evaluate(state["params"], test_images, test_labels)
        return state, {
            "test_loss": float(test_loss_sum) / len(data.test_images),
            "test_accuracy": int(correct) / len(data.test_images),
            "images_per_second": stats.trained_steps * options.batch_size / stats.train_seconds,
        }

    def describe(record: dict[str, Any]) -> str:
        return (
            f"train loss {record['train_loss']:.4f}  "
            f"test loss {record['test_loss']:.4f}  test acc {100 * record['test_accuracy']:.2f}%  "
            f"{record['images_per_second']:,.0f} img/s"
        )

    outcome = loop.run(
        state,
        hooks=loop.Hooks(
            order=permute,
            run_chunk=run_chunk,
            end_epoch=end_epoch,
            describe=describe,
            show_loss=lambda mean: {"loss": f"{mean:.4f}"},
        ),
        schedule=options,
        n_steps=n_steps,
        run_dir=run_dir,
        sharding=replicated,
        resume=resume,
        stop=stop,
        on_chunk=on_chunk,
    )
    params = outcome.state["params"]
    if predictions is None and not outcome.interrupted:
        _, _, predictions = evaluate(params, test_images, test_labels)
    return FitResult(
        params=jax.device_get(params),
        records=outcome.records,
        predictions=None if predictions is None else np.asarray(predictions),
        interrupted=outcome.interrupted,
        exit_code=outcome.exit_code,
    )


def train_and_evaluate(
    config: Config,
    run_dir: Path,
    *,
    resume: bool = False,
    data: MNIST | None = None,
    progress: bool = True,
    stop: StopRequest | None = None,
    on_chunk: Any = None,
    plots: bool = True,
) -> FitResult:
    """Trains ``config``'s model, evaluates it and writes every artefact of the run.

    ``data`` replaces the MNIST loader (tests); ``plots=False`` skips the PNGs (tests);
    ``stop``/``on_chunk`` are the interruption flag and a per-chunk hook (see ``fit``).
    An MLP config's ``label_smoothing`` applies to training only, its ``max_shift`` is the
    translation augmentation.
    """
    if data is None:
        data = input_pipeline.load_data(config)
    runfiles.ensure_config(run_dir, config)
    n_steps = steps_per_epoch(len(data.train_images), config.batch_size)
    result = fit(
        model=build_model(config),
        optimizer=build_optimizer(config, n_steps),
        loss_fn=make_loss(config.loss, getattr(config, "label_smoothing", 0.0)),
        eval_loss_fn=make_loss(config.loss),
        data=data,
        options=FitOptions(
            epochs=config.epochs,
            batch_size=config.batch_size,
            seed=config.seed,
            devices=config.devices,
            chunk_steps=config.chunk_steps,
            max_shift=getattr(config, "max_shift", 0),
            progress=progress,
        ),
        run_dir=run_dir,
        resume=resume,
        stop=stop,
        on_chunk=on_chunk,
        cache_key=(config.experiment, config),
    )
    if plots and not result.interrupted and jax.process_index() == 0:
        write_plots(run_dir, result, data, title(config))
    return result
