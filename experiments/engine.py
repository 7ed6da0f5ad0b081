"""The training engine of the MNIST experiments: ``fit`` and its jitted steps.

``fit`` trains any Flax NNX classifier whose ``__call__(x, *, dropout_key=None)`` maps a batch
of uint8-derived float images to logits. Its design goals, and how it meets them:

* Fast: the dataset lives on the device; an epoch is a handful of jitted ``lax.scan`` chunks
  (no per-step host round trip); train state buffers are donated.
* Reproducible and resumable bit for bit: every random key is derived from
  ``(seed, epoch, step)`` with ``fold_in``, never from history, and checkpoints hold params,
  optimizer state, the position ``(epoch, step)`` and the metric records so far. Resuming
  replays exactly the same chunks.
* Kill-safe: a ``SIGKILL`` at any instant leaves a run that ``resume`` continues from its newest
  complete checkpoint (or from the start), with ``metrics.jsonl`` repaired to match it (see
  ``runfiles``).
* Interruptible: SIGINT/SIGTERM set a flag; the current chunk finishes, a checkpoint is saved,
  and the process exits with status 130.
* Data parallel: a ``Mesh`` over ``--devices`` devices; each batch is sharded over the ``data``
  axis and parameters are replicated, so XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import devices
import jax
import jax.numpy as jnp
import numpy as np
import optax
import runfiles
from data.mnist import MNIST, MNIST_MEAN, MNIST_STD
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from signals import EXIT_INTERRUPTED, StopRequest
from tqdm import tqdm


def normalize(images: Any) -> Any:
    """uint8 pixels -> float32, standardised with the MNIST train-set mean and std."""
    return (images.astype(jnp.float32) / 255.0 - MNIST_MEAN) / MNIST_STD


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


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Full batches per epoch; the remainder is dropped (a fresh permutation every epoch)."""
    if batch_size > n_train:
        raise ValueError(f"batch size {batch_size} exceeds the {n_train} training examples")
    return n_train // batch_size


def chunk_bounds(n_steps: int, chunk_steps: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n_steps)`` in chunks of at most ``chunk_steps``.

    Prefers equal chunks (a divisor of ``n_steps`` no smaller than half of ``chunk_steps``),
    because every distinct chunk length is one more compilation of the scan.
    """
    size = largest_divisor_at_most(n_steps, chunk_steps)
    if 2 * size < chunk_steps:
        size = chunk_steps
    return [(s, min(s + size, n_steps)) for s in range(0, n_steps, size)]


def epoch_key(seed: int, epoch: int) -> Any:
    """Key for one epoch; its children (permutation, per-step dropout) depend on nothing else."""

    return jax.random.fold_in(jax.random.key(seed), epoch)


def random_shift(images: Any, key: Any, max_shift: int) -> Any:
    """Translates each uint8 image ``(B, 28, 28)`` by up to ``max_shift`` pixels, zero-filled.

    The classic MNIST augmentation: cheap, label-preserving, and for an MLP (which has no
    translation invariance of its own) worth a few tenths of a percent of test accuracy.
    """

    if max_shift <= 0:
        return images
    height, width = images.shape[1:]
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * max_shift + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1]), (height, width))

    return jax.vmap(crop)(padded, offsets)


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


def _silent(message: str) -> None:
    del message


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


# Compiled step functions by cache key (see ``fit``); lets tests run many tiny trainings fast.
_STEP_FUNCTIONS: dict[Any, tuple[Callable, Callable, Callable]] = {}


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
    """Trains ``model`` on ``data``, checkpointing to ``run_dir`` every epoch.

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
    stop = stop if stop is not None else StopRequest()
    mesh = devices.make_mesh(options.devices)
    if options.batch_size % options.devices:
        raise ValueError(
            f"batch size {options.batch_size} must be divisible by --devices {options.devices}"
        )
    replicated = NamedSharding(mesh, P())
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = optimizer.init(params)
    params, opt_state = devices.replicate((params, opt_state), replicated)
    main_process = jax.process_index() == 0  # multi-host: one process writes files

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / runfiles.METRICS
    checkpointer = runfiles.Checkpointer(run_dir / runfiles.CHECKPOINTS)
    start_epoch, start_step, resumed_loss_sum = 0, 0, 0.0
    records: list[dict[str, Any]] = []
    if resume:
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
            (params, opt_state),
        )
        restored = checkpointer.restore(abstract)
        if restored is None:
            print(f"no complete checkpoint under {run_dir}: starting from the beginning")
        else:
            (params, opt_state), position = restored
            start_epoch, start_step = position["epoch"], position["step"]
            resumed_loss_sum = position.get("loss_sum", 0.0)
            records = list(position["records"])
            print(f"resumed from {run_dir} at epoch {start_epoch + 1}, step {start_step}")
    if main_process:  # drops any record a kill left ahead of the checkpoint
        runfiles.write_metrics(metrics_path, records)

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
    chunks = chunk_bounds(n_steps, options.chunk_steps)

    def build_step_functions() -> tuple[Callable, Callable, Callable]:
        train_chunk = make_train_chunk(graphdef, optimizer, loss_fn, mesh, options.max_shift)
        eval_batch = largest_divisor_at_most(len(data.test_images), options.eval_batch)
        evaluate = make_eval(graphdef, eval_loss_fn, eval_batch)
        n_train, batch = len(data.train_images), options.batch_size
        permute = jax.jit(
            lambda key: jax.random.permutation(jax.random.fold_in(key, 0), n_train)[
                : n_steps * batch
            ].reshape(n_steps, batch)
        )
        return train_chunk, evaluate, permute

    if cache_key is None:
        train_chunk, evaluate, permute = build_step_functions()
    else:
        # Same experiment config, graph, data sizes and mesh: reuse the compiled functions.
        key = (cache_key, graphdef, options, len(data.train_images), len(data.test_images))
        if key not in _STEP_FUNCTIONS:
            _STEP_FUNCTIONS[key] = build_step_functions()
        train_chunk, evaluate, permute = _STEP_FUNCTIONS[key]

    predictions = None
    interrupted = False
    for epoch in range(start_epoch, options.epochs):
        key = epoch_key(options.seed, epoch)
        # Dropout keys are fold_in(fold_in(epoch_key, 1), step): disjoint from the permutation.
        dropout_root = jax.random.fold_in(key, 1)
        order = permute(key)
        first_step = start_step if epoch == start_epoch else 0
        bar = tqdm(
            total=n_steps,
            initial=first_step,
            desc=f"epoch {epoch + 1}/{options.epochs}",
            unit="step",
            leave=False,
            disable=not (options.progress and main_process),
            dynamic_ncols=True,
        )
        # A mid-epoch resume carries the epoch's loss so far, so its record matches a clean run.
        loss_sum = resumed_loss_sum if epoch == start_epoch else 0.0
        loss_steps, trained_steps = first_step, 0
        t0 = time.perf_counter()
        for start, stop_step in chunks:
            if stop_step <= first_step:
                continue
            params, opt_state, chunk_loss = train_chunk(
                params,
                opt_state,
                images,
                labels,
                order[start:stop_step],
                dropout_root,
                jnp.int32(start),
            )
            loss_sum += float(chunk_loss)  # one host sync per chunk: cheap, keeps timing honest
            loss_steps += stop_step - start
            trained_steps += stop_step - start
            bar.update(stop_step - start)
            bar.set_postfix(loss=f"{loss_sum / loss_steps:.4f}", refresh=False)
            if on_chunk is not None:
                on_chunk(epoch, stop_step)
            if stop and stop_step < n_steps:
                interrupted = True
                position = {
                    "epoch": epoch,
                    "step": stop_step,
                    "loss_sum": loss_sum,
                    "records": records,
                }
                checkpointer.save(epoch * n_steps + stop_step, (params, opt_state), position)
                break
        train_seconds = time.perf_counter() - t0
        bar.close()
        if interrupted:
            break
        test_loss_sum, correct, predictions = evaluate(params, test_images, test_labels)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(loss_steps, 1),
            "test_loss": float(test_loss_sum) / len(data.test_images),
            "test_accuracy": int(correct) / len(data.test_images),
            "images_per_second": trained_steps * options.batch_size / train_seconds,
            "train_seconds": train_seconds,
        }
        records.append(record)
        # The checkpoint carries the records; metrics.jsonl may run ahead of a checkpoint that
        # is still being written, never behind it (a resume rewrites it from the checkpoint).
        position = {"epoch": epoch + 1, "step": 0, "records": records}
        checkpointer.save((epoch + 1) * n_steps, (params, opt_state), position)
        if main_process:
            runfiles.write_metrics(metrics_path, records)
        log = tqdm.write if main_process else _silent
        log(
            f"epoch {epoch + 1:3d}/{options.epochs}  train loss {record['train_loss']:.4f}  "
            f"test loss {record['test_loss']:.4f}  test acc {100 * record['test_accuracy']:.2f}%  "
            f"{record['images_per_second']:,.0f} img/s"
        )
        if stop:
            interrupted = epoch + 1 < options.epochs
            break
    checkpointer.close()
    if predictions is None and not interrupted:
        _, _, predictions = evaluate(params, test_images, test_labels)
    host_params = jax.device_get(params)
    if interrupted:
        print(
            f"interrupted by {stop.signal_name}: checkpoint saved under {run_dir / 'checkpoints'}; "
            f"continue with --resume {run_dir}",
            file=sys.stderr,
        )
    return FitResult(
        params=host_params,
        records=records,
        predictions=None if predictions is None else np.asarray(predictions),
        interrupted=interrupted,
        exit_code=EXIT_INTERRUPTED if interrupted else 0,
    )
