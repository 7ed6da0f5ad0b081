"""What the MNIST experiments share: data, losses, the training engine, checkpoints, plots.

The engine (``fit``) trains any Flax NNX classifier whose ``__call__(x, *, dropout_key=None)``
maps a batch of uint8-derived float images to logits. Its design goals, and how it meets them:

* Fast: the dataset lives on the device; an epoch is a handful of jitted ``lax.scan`` chunks
  (no per-step host round trip); train state buffers are donated.
* Reproducible and resumable bit for bit: every random key is derived from
  ``(seed, epoch, step)`` with ``fold_in``, never from history, and checkpoints hold params,
  optimizer state and the position ``(epoch, step)``. Resuming replays exactly the same chunks.
* Interruptible: SIGINT/SIGTERM set a flag; the current chunk finishes, a checkpoint is saved,
  and the process exits with status 130.
* Data parallel: a ``Mesh`` over ``--devices`` devices; each batch is sharded over the ``data``
  axis and parameters are replicated, so XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

EXPERIMENTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXPERIMENTS_DIR.parent
# Let `python experiments/<script>.py` find jxent in a plain checkout; an installed jxent wins.
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

# Train-set statistics of x / 255 (see /work/shared/README.md; also torchvision's docs).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
NUM_CLASSES = 10
EXIT_INTERRUPTED = 130


def initialize_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Joins a multi-host JAX job (``jax.distributed.initialize``); ``None`` = auto-detect.

    On SLURM, Open MPI, Kubernetes and Cloud TPU every argument can be left ``None``.
    """
    import jax

    # Only the CPU backend reads this: cross-process CPU collectives (a CPU-only test cluster).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


def set_cpu_device_count(devices: int) -> None:
    """Asks JAX for ``devices`` host (CPU) devices; must run before JAX's first operation."""
    import jax

    if devices <= 1:
        return
    try:
        jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError as err:  # backend already initialised
        raise RuntimeError(
            f"--devices {devices}: JAX's CPU backend was initialised before the device count "
            f"could be set ({err}); set it at program start"
        ) from None


# --------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class Dataset:
    """uint8 images ``(N, 28, 28)`` and integer labels, train and test, on the host."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


def load_dataset(
    data_dir: str | None, train_limit: int | None = None, test_limit: int | None = None
) -> Dataset:
    """Real, verified MNIST (``mnist_data.load_mnist``), optionally cut to the first examples."""
    import mnist_data

    mnist = mnist_data.load_mnist(data_dir)
    return Dataset(
        train_images=mnist.train_images[:train_limit],
        train_labels=mnist.train_labels[:train_limit].astype(np.int32),
        test_images=mnist.test_images[:test_limit],
        test_labels=mnist.test_labels[:test_limit].astype(np.int32),
        source="mnist",
    )


def synthetic_dataset(n_train: int, n_test: int, seed: int = 0) -> Dataset:
    """Learnable MNIST-shaped data for tests when the real files are not cached.

    Each class is a fixed random 28x28 template plus noise, so a classifier can learn it fast.
    """
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, size=(NUM_CLASSES, 28, 28))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
        noise = rng.normal(0, 60, size=(n, 28, 28))
        return np.clip(templates[labels] + noise, 0, 255).astype(np.uint8), labels

    train_images, train_labels = draw(n_train)
    test_images, test_labels = draw(n_test)
    return Dataset(train_images, train_labels, test_images, test_labels, source="synthetic")


def normalize(images: Any) -> Any:
    """uint8 pixels -> float32, standardised with the MNIST train-set mean and std."""
    import jax.numpy as jnp

    return (images.astype(jnp.float32) / 255.0 - MNIST_MEAN) / MNIST_STD


# --------------------------------------------------------------------------------------------
# Losses.

LOSSES = ("jxent", "optax")


def make_loss(name: str, label_smoothing: float = 0.0) -> Callable[[Any, Any], Any]:
    """Mean cross-entropy of integer labels: jxent's, or optax's for comparison."""
    import jax
    import optax

    if name == "jxent":
        import jxent

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


# --------------------------------------------------------------------------------------------
# Run directory, metrics, checkpoints.


def new_run_dir(experiment: str, out_dir: str | None) -> Path:
    """``out_dir`` if given, else ``runs/<experiment>/<timestamp>/`` under the current dir."""
    if out_dir:
        return Path(out_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / experiment / stamp


def write_json_atomic(path: Path, obj: Any) -> None:
    """Writes JSON through a temp file and a rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def prepare_run(config: Any, run_dir: Path, *, resume: bool, data: Dataset | None) -> Dataset:
    """The start every experiment shares: the data (MNIST unless given), the run directory,
    and ``config.json`` (written once, by process 0, unless resuming)."""
    import jax

    if data is None:
        data = load_dataset(config.data_dir, config.train_limit, config.test_limit)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and jax.process_index() == 0:
        write_json_atomic(run_dir / "config.json", dataclasses.asdict(config))
    return data


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (an empty list if there is none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rewrite_metrics(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Replaces ``metrics.jsonl`` atomically (used on resume to drop records past the restore)."""
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    os.replace(tmp, path)


def append_metrics(path: Path, record: Mapping[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


class Checkpointer:
    """orbax-checkpoint of ``{params, opt_state}`` plus a JSON position, async between epochs."""

    def __init__(self, directory: Path, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            directory.resolve(),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, global_step: int, state: Any, position: Mapping[str, int]) -> None:
        ocp = self._ocp
        self.manager.save(
            global_step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), position=ocp.args.JsonSave(dict(position))
            ),
        )

    def restore(self, abstract_state: Any) -> tuple[Any, dict[str, int]]:
        ocp = self._ocp
        step = self.manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.manager.directory}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), position=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["position"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# --------------------------------------------------------------------------------------------
# Interruption.


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between chunks; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name} received: finishing the current chunk, then saving a "
            "checkpoint (press Ctrl-C again to abort without saving)",
            file=sys.stderr,
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)


# --------------------------------------------------------------------------------------------
# The training engine.


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


def make_mesh(devices: int) -> Any:
    """A 1-D ``Mesh`` named ``data`` over the first ``devices`` devices."""
    import jax

    available = jax.devices()
    if devices < 1 or devices > len(available):
        raise ValueError(
            f"--devices {devices}: expected 1..{len(available)} (JAX sees {available}); on CPU "
            "the count is set with jax_num_cpu_devices before JAX starts"
        )
    return jax.sharding.Mesh(np.array(available[:devices]), ("data",))


def epoch_key(seed: int, epoch: int) -> Any:
    """Key for one epoch; its children (permutation, per-step dropout) depend on nothing else."""
    import jax

    return jax.random.fold_in(jax.random.key(seed), epoch)


def random_shift(images: Any, key: Any, max_shift: int) -> Any:
    """Translates each uint8 image ``(B, 28, 28)`` by up to ``max_shift`` pixels, zero-filled.

    The classic MNIST augmentation: cheap, label-preserving, and for an MLP (which has no
    translation invariance of its own) worth a few tenths of a percent of test accuracy.
    """
    import jax
    import jax.numpy as jnp

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
    import jax
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

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
    import jax
    import jax.numpy as jnp
    from flax import nnx

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


def replicate(tree: Any, sharding: Any) -> Any:
    """Host values -> global arrays replicated over ``sharding``'s mesh.

    ``make_array_from_callback`` also works when the mesh spans several processes (each process
    passes the same host values and fills its own devices), unlike a plain ``device_put``.
    """
    import jax

    def one(value: Any) -> Any:
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


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
    data: Dataset,
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
      resume: continue from the latest checkpoint under ``run_dir``.
      stop: the interruption flag (installed by the caller); checked between chunks.
      on_chunk: test hook called as ``on_chunk(epoch, step)`` after each chunk.
      cache_key: a hashable value that fully determines ``optimizer``, ``loss_fn`` and
        ``eval_loss_fn`` (e.g. the experiment's frozen config). Runs in one process with equal
        keys then share compiled step functions instead of compiling them again.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from tqdm import tqdm

    stop = stop if stop is not None else StopRequest()
    mesh = make_mesh(options.devices)
    if options.batch_size % options.devices:
        raise ValueError(
            f"batch size {options.batch_size} must be divisible by --devices {options.devices}"
        )
    replicated = NamedSharding(mesh, P())
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = optimizer.init(params)
    params, opt_state = replicate((params, opt_state), replicated)
    main_process = jax.process_index() == 0  # multi-host: one process writes files

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    checkpointer = Checkpointer(run_dir / "checkpoints")
    start_epoch, start_step = 0, 0
    if resume:
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
            (params, opt_state),
        )
        (params, opt_state), position = checkpointer.restore(abstract)
        start_epoch, start_step = position["epoch"], position["step"]
        resumed_loss_sum = position.get("loss_sum", 0.0)
        records = [r for r in read_metrics(metrics_path) if r["epoch"] <= start_epoch]
        if main_process:
            rewrite_metrics(metrics_path, records)
        print(f"resumed from {run_dir} at epoch {start_epoch + 1}, step {start_step}")
    else:
        records = []
        if main_process:
            rewrite_metrics(metrics_path, records)
        resumed_loss_sum = 0.0

    # The whole dataset lives on every device (uint8: 47 MB); batches are gathered on device.
    images, labels, test_images, test_labels = replicate(
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
                position = {"epoch": epoch, "step": stop_step, "loss_sum": loss_sum}
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
        if main_process:
            append_metrics(metrics_path, record)
        position = {"epoch": epoch + 1, "step": 0}
        checkpointer.save((epoch + 1) * n_steps, (params, opt_state), position)
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


# --------------------------------------------------------------------------------------------
# Command line plumbing shared by the MNIST scripts.


def add_run_flags(parser: argparse.ArgumentParser, defaults: Any, experiment: str) -> None:
    """Flags every MNIST experiment has: seed, loss, devices, data/out dirs, resume, limits."""
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--loss", choices=LOSSES, default=defaults.loss)
    parser.add_argument(
        "--devices", type=int, default=defaults.devices, help="data-parallel device count"
    )
    parser.add_argument(
        "--chunk-steps",
        type=int,
        default=defaults.chunk_steps,
        help="training steps per jitted scan (progress and interrupt granularity)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="MNIST cache (default: $JXENT_DATA_DIR or ~/.cache/jxent/mnist)",
    )
    parser.add_argument(
        "--out-dir", default=None, help=f"run directory (default: runs/{experiment}/<timestamp>)"
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the run in RUN_DIR from its latest checkpoint, with its config.json "
        "(other flags are ignored)",
    )
    parser.add_argument(
        "--train-limit", type=int, default=None, help="use the first N train images"
    )
    parser.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    multi_host = parser.add_argument_group(
        "multi-host", "run the same command on every host; --devices counts all hosts' devices"
    )
    multi_host.add_argument(
        "--distributed", action="store_true", help="call jax.distributed.initialize() first"
    )
    multi_host.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    multi_host.add_argument("--num-processes", type=int, default=None)
    multi_host.add_argument("--process-id", type=int, default=None)


def start_jax(args: argparse.Namespace, devices: int) -> None:
    """Multi-host initialisation or the CPU device count, before JAX's first operation."""
    if args.distributed:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    else:
        set_cpu_device_count(devices)


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    """The dataclass ``config_cls`` filled from the parsed flags of the same names."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)}
    return config_cls(**_tuples(values))


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def load_config(config_cls: type, run_dir: Path) -> Any:
    """The ``config_cls`` saved in ``run_dir/config.json`` (for ``--resume``)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise SystemExit(f"--resume {run_dir}: no config.json there; expected a run directory")
    return config_cls(**_tuples(json.loads(path.read_text())))


def print_summary(
    experiment: str, config: Any, result: FitResult, run_dir: Path, wall: float
) -> None:
    """The final summary line: accuracy, median throughput, wall time, run directory."""
    if not result.records:
        return
    last = result.records[-1]
    rates = [r["images_per_second"] for r in result.records[1:]] or [
        result.records[0]["images_per_second"]
    ]
    print(
        f"\n{experiment}: test accuracy {100 * last['test_accuracy']:.2f}% "
        f"(test loss {last['test_loss']:.4f}) after {last['epoch']} epochs; "
        f"{statistics.median(rates):,.0f} images/s (median epoch, epoch 1 excluded: it "
        f"compiles); {wall:.1f} s wall; {config.loss} loss on {config.devices} device(s)\n"
        f"run directory: {run_dir}"
    )


def run_from_args(experiment: str, config_cls: type, args: argparse.Namespace, train: Any) -> int:
    """Builds or reloads the config, installs the signal handlers, trains, summarises.

    ``train(config, run_dir, *, resume, progress, stop)`` must return a ``FitResult``.
    """
    t_start = time.perf_counter()
    if args.resume:
        run_dir = Path(args.resume)
        config = load_config(config_cls, run_dir)
    else:
        config = config_from_args(config_cls, args)
        run_dir = new_run_dir(experiment, args.out_dir)
    start_jax(args, config.devices)
    stop = StopRequest()
    with stop.installed():
        result = train(
            config, run_dir, resume=bool(args.resume), progress=not args.no_progress, stop=stop
        )
    print_summary(experiment, config, result, run_dir, time.perf_counter() - t_start)
    return result.exit_code


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, headless).


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Train/test loss and test accuracy against epoch."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], "o-", label="train (running)")
    ax_loss.plot(epochs, [r["test_loss"] for r in records], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * r["test_accuracy"] for r in records], "o-", color="C2")
    best = max(records, key=lambda r: r["test_accuracy"]) if records else None
    if best is not None:
        ax_acc.annotate(
            f"{100 * records[-1]['test_accuracy']:.2f}%",
            (records[-1]["epoch"], 100 * records[-1]["test_accuracy"]),
            textcoords="offset points",
            xytext=(-30, -15),
        )
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """``counts[true, predicted]``."""
    counts = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def plot_confusion(labels: np.ndarray, predictions: np.ndarray, path: Path, title: str) -> None:
    """The test confusion matrix, counts annotated (log colour scale so errors show)."""
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    counts = confusion_matrix(labels, predictions)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(counts + 1, cmap="Blues", norm=LogNorm())
    for (true, pred), count in np.ndenumerate(counts):
        if count:
            color = "white" if true == pred else "black"
            ax.text(pred, true, str(count), ha="center", va="center", fontsize=7, color=color)
    ax.set(
        xticks=range(NUM_CLASSES),
        yticks=range(NUM_CLASSES),
        xlabel="predicted",
        ylabel="true",
        title=f"{title}\n{int(np.trace(counts))}/{counts.sum()} correct",
    )
    fig.colorbar(image, ax=ax, label="count + 1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_mistakes(
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    path: Path,
    title: str,
    max_shown: int = 48,
    cols: int = 8,
) -> None:
    """A grid of misclassified test digits, each captioned ``true → predicted``.

    Drawn as one mosaic image with text on top (not one subplot per digit): many times faster.
    """
    plt = _pyplot()
    wrong_all = np.flatnonzero(labels != predictions)
    wrong = wrong_all[:max_shown]
    rows = max(1, math.ceil(len(wrong) / cols))
    cell, caption = 28 + 4, 12  # pixels per digit cell, caption band above each digit
    mosaic = np.zeros((rows * (cell + caption), cols * cell), dtype=np.float32)
    fig, ax = plt.subplots(figsize=(cols * 0.9, rows * 1.1 + 0.5))
    for i, index in enumerate(wrong):
        top = (i // cols) * (cell + caption) + caption + 2
        left = (i % cols) * cell + 2
        mosaic[top : top + 28, left : left + 28] = images[index] / 255.0
        ax.text(left + 14, top - 3, f"{labels[index]} → {predictions[index]}", ha="center",
                va="bottom", fontsize=8, color="C3")  # fmt: skip
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"{title}: {len(wrong_all)} mistakes (true → predicted)", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(run_dir: Path, result: FitResult, data: Dataset, title: str) -> None:
    """``curves.png``, ``confusion.png`` and ``mistakes.png`` in ``run_dir``."""
    plot_curves(result.records, run_dir / "curves.png", title)
    if result.predictions is not None:
        plot_confusion(data.test_labels, result.predictions, run_dir / "confusion.png", title)
        plot_mistakes(
            data.test_images, data.test_labels, result.predictions, run_dir / "mistakes.png", title
        )
