"""Fast checks of the Brown language models (experiments/brown/): shapes, one step, perplexity,
training, resume, ensembles, the command line, --compare.

Tiny models on a small synthetic corpus (a Markov chain over a few dozen words); no network.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.brown import compare, ensemble, input_pipeline, main, models, train
from experiments.brown.configs import Config
from experiments.common import loop, runfiles, signals
from experiments.data import brown

TINY = Config(
    epochs=2, batch_size=4, context=16, width=32, depth=1, heads=2, chunk_steps=17,
    learning_rate=1e-2, warmup_steps=5, dropout=0.1,
)  # fmt: skip
TINY_NPLM = dataclasses.replace(
    TINY, model="nplm", hidden=16, embed_dim=8, eval_stride=None, dropout=None
)


def markov_text(n_words: int, seed: int = 0) -> bytes:
    """Tagged text from a random Markov chain over 12 words, 2 successors each (ideal
    perplexity 2, unigram about 12): learnable in a few dozen steps, not trivially."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(12)]
    successors = rng.integers(0, len(vocab), size=(len(vocab), 2))
    word, out = 0, []
    for _ in range(n_words):
        out.append(f"{vocab[word]}/nn")
        word = successors[word, rng.integers(0, 2)]
    return " ".join(out).encode()


def small_corpus() -> brown.Corpus:
    return brown.make_corpus(markov_text(3000), train_words=2200, valid_words=400)


@pytest.fixture(scope="module")
def corpus() -> brown.Corpus:
    return small_corpus()


def model_of(config: Config, vocab: int) -> nnx.Module:
    return models.build_model(config, vocab)


@pytest.mark.parametrize("config", [TINY, TINY_NPLM], ids=["transformer", "nplm"])
def test_features_and_output_layer_shapes(config):
    model = model_of(config, 50)
    features = nnx.jit(lambda m, x: m(x))(model, jnp.zeros((3, config.context), jnp.int32))
    w, bias = model.output_layer()
    width = config.width if config.model == "transformer" else 4 * 8 + 16
    assert features.shape == (3, config.context, width)
    assert w.shape == (width, 50) and bias.shape == (50,)


def test_transformer_is_causal():
    model = model_of(TINY, 50)
    ids = jnp.arange(16)[None] % 50
    changed = ids.at[0, 10].set(49)
    call = nnx.jit(lambda m, x: m(x))
    a, b = call(model, ids), call(model, changed)
    np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-6)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_nplm_sees_exactly_the_last_n_minus_1_words():
    model = model_of(TINY_NPLM, 50)
    ids = jnp.arange(16)[None] + 1
    call = nnx.jit(lambda m, x: m(x))
    base = call(model, ids)
    changed = call(model, ids.at[0, 5].set(40))
    differs = np.abs(np.asarray(changed - base)).max(-1)[0] > 0
    # Position t predicts word t + 1 (the engine's targets are the inputs shifted by one) from
    # words t-3 .. t: word 5 feeds positions 5..8. (It once fed 6..9, skipping the word just
    # before the target: validation perplexity 406 instead of 2xx.)
    assert np.flatnonzero(differs).tolist() == [5, 6, 7, 8]


@pytest.mark.parametrize(
    ("config", "loss"), [(TINY, "jxent"), (TINY_NPLM, "optax")], ids=["transformer", "nplm"]
)
def test_one_training_step_decreases_the_loss(config, loss):
    config = dataclasses.replace(config, loss=loss, dropout=0.0)
    graphdef, params = nnx.split(model_of(config, 50), nnx.Param)
    optimizer = train.build_optimizer(dataclasses.replace(config, warmup_steps=0), 10)
    loss_fn = train.make_loss(loss)
    step = jax.jit(train.make_train_step(graphdef, optimizer, loss_fn))
    windows = jax.random.randint(jax.random.key(1), (8, config.context + 1), 0, 50)
    params, opt_state, before, metrics = step(params, optimizer.init(params), windows, None)
    _, _, after, _ = step(params, opt_state, windows, None)
    assert float(after) < float(before)
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0 and float(metrics["z_loss"]) == 0.0


def test_jxent_and_optax_losses_agree():
    features = jax.random.normal(jax.random.key(0), (24, 8))
    w = jax.random.normal(jax.random.key(1), (8, 30))
    bias = jax.random.normal(jax.random.key(2), (30,))
    labels = jax.random.randint(jax.random.key(3), (24,), 0, 30)
    for smoothing, z in ((0.0, 0.0), (0.1, 1e-3)):
        theirs, their_metrics = jax.jit(train.make_loss("optax", smoothing, z))(
            features, w, bias, labels
        )
        # The transformer's tied table is (V, D): the fused loss takes it untransposed.
        for weights, layout in ((w, "dv"), (w.T, "vd")):
            fused = jax.jit(train.make_loss("jxent", smoothing, z), static_argnums=4)
            ours, our_metrics = fused(features, weights, bias, labels, layout)
            np.testing.assert_allclose(ours, theirs, rtol=1e-5)
            np.testing.assert_allclose(our_metrics["accuracy"], their_metrics["accuracy"])
            np.testing.assert_allclose(our_metrics["z_loss"], their_metrics["z_loss"], rtol=1e-5)
        assert float(their_metrics["z_loss"]) > 0.0 if z else float(their_metrics["z_loss"]) == 0.0


@pytest.mark.parametrize("stride", [1, 5, 16])
def test_eval_windows_score_every_word_of_the_split_once(corpus, stride):
    inputs, targets = input_pipeline.eval_windows(corpus.ids, corpus.test, 16, stride)
    scored = targets[targets >= 0]
    np.testing.assert_array_equal(np.sort(scored), np.sort(corpus.ids[corpus.test]))
    # Each target is the word after its input: inputs are targets shifted by one.
    shifted = targets[:, :-1] >= 0
    np.testing.assert_array_equal(inputs[:, 1:][shifted], targets[:, :-1][shifted])
    assert (targets[:, : 16 - stride] == -1).all()


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(corpus):
    model = model_of(TINY_NPLM, corpus.vocab_size)
    model.out_w[...] = jnp.zeros_like(model.out_w[...])  # every logit 0: uniform
    graphdef, params = nnx.split(model, nnx.Param)
    windows = input_pipeline.pad_windows(
        *input_pipeline.eval_windows(corpus.ids, corpus.test, 16, 12), multiple=4
    )
    ce_sum, words = train.make_evaluate(graphdef, 4, 12)(params, *windows)
    assert int(words) == corpus.test.stop - corpus.test.start
    np.testing.assert_allclose(train.perplexity(ce_sum, words), corpus.vocab_size, rtol=1e-5)


def test_evaluation_equals_optax_on_every_position_of_the_windows(corpus):
    """The output layer sees only the scored (last ``stride``) positions; the sum must equal
    optax's over whole windows with the unscored targets masked."""
    model = model_of(TINY, corpus.vocab_size)
    # Far from uniform, so that features from the wrong positions would change the sum.
    model.embed.embedding[...] = 100.0 * model.embed.embedding[...]
    graphdef, params = nnx.split(model, nnx.Param)
    inputs, targets = input_pipeline.pad_windows(
        *input_pipeline.eval_windows(corpus.ids, corpus.test, TINY.context, 5), multiple=4
    )
    ce_sum, words = train.make_evaluate(graphdef, 4, 5)(params, inputs, targets)
    logits = model(jnp.asarray(inputs)) @ model.output_layer()[0] + model.output_layer()[1]
    per_word = optax.softmax_cross_entropy_with_integer_labels(logits, np.maximum(targets, 0))
    np.testing.assert_allclose(ce_sum, np.sum(np.where(targets >= 0, per_word, 0.0)), rtol=1e-5)
    assert int(words) == (targets >= 0).sum()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("brown-reference")
    return run_dir, train.train_and_evaluate(TINY, run_dir, corpus=corpus, progress=False)


def without_timings(records):
    drop = ("words_per_second", "train_seconds")
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def test_smoke_run_learns_and_leaves_every_artefact(reference, corpus):
    run_dir, result = reference
    assert not result.interrupted and result.exit_code == 0
    assert [r["epoch"] for r in result.records] == [1, 2]
    # The fused loss's aux outputs, logged per epoch.
    assert all(
        0.0 <= r["train_accuracy"] <= 1.0 and r["train_z_loss"] == 0.0 for r in result.records
    )
    assert result.records[-1]["valid_perplexity"] < corpus.vocab_size / 2
    assert result.test_perplexity < corpus.vocab_size / 2
    for name in ("config.json", "metrics.jsonl", "results.json", "curves.png"):
        assert (run_dir / name).stat().st_size > 0, name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test_perplexity"] == pytest.approx(result.test_perplexity)
    assert len(result.sample.split()) == 40


@pytest.fixture(scope="module")
def nplm_run(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("brown-nplm")
    return run_dir, train.train_and_evaluate(
        TINY_NPLM, run_dir, corpus=corpus, progress=False, plots_too=False
    )


def test_nplm_trains(nplm_run, corpus):
    assert nplm_run[1].test_perplexity < corpus.vocab_size / 2


def test_mixture_perplexity_equals_float64_numpy():
    losses = np.random.default_rng(0).gamma(2.0, 2.0, size=(3, 500))
    expected = np.exp(-np.mean(np.log(np.mean(np.exp(-losses), axis=0))))
    assert ensemble.mixture_perplexity(losses) == pytest.approx(expected, rel=1e-5)


def test_ensemble_of_a_run_with_itself_is_that_run(reference, corpus):
    run_dir, result = reference
    report = ensemble.ensemble([run_dir, run_dir], corpus)
    best_valid = min(r["valid_perplexity"] for r in result.records)
    for split, expected in (("test", result.test_perplexity), ("valid", best_valid)):
        assert report[split]["runs"] == pytest.approx([expected, expected], rel=1e-5)
        assert report[split]["mixture"] == pytest.approx(expected, rel=1e-5)


def test_ensemble_of_two_models_beats_the_geometric_mean_of_their_perplexities(
    reference, nplm_run, corpus
):
    # A transformer and an NPLM: different contexts and strides, the same words in order.
    report = ensemble.ensemble([reference[0], nplm_run[0]], corpus)
    runs = report["test"]["runs"]
    assert runs == pytest.approx([reference[1].test_perplexity, nplm_run[1].test_perplexity])
    assert report["test"]["mixture"] < math.sqrt(runs[0] * runs[1])


def test_ensemble_names_a_directory_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main.main(["--ensemble", str(tmp_path)])
    assert info.value.code == 2
    assert f"--ensemble {tmp_path}: no config.json there" in capsys.readouterr().err


def test_resume_after_sigint_mid_epoch_matches_uninterrupted_run(tmp_path, corpus, reference):
    def interrupt(epoch, step):
        if (epoch, step) == (1, 17):
            signal.raise_signal(signal.SIGINT)

    stop = signals.StopRequest()
    with stop.installed():
        first = train.train_and_evaluate(TINY, tmp_path, corpus=corpus, progress=False, stop=stop,
                               on_chunk=interrupt, plots_too=False)  # fmt: skip
    assert first.interrupted and first.exit_code == signals.EXIT_INTERRUPTED
    resumed = train.train_and_evaluate(TINY, tmp_path, corpus=corpus, progress=False, resume=True)
    assert resumed.test_perplexity == reference[1].test_perplexity
    assert without_timings(runfiles.read_metrics(tmp_path / "metrics.jsonl")) == without_timings(
        reference[1].records
    )
    assert math.isfinite(resumed.test_perplexity)


def test_resume_from_a_checkpoint_written_before_the_metrics_were_logged(tmp_path, corpus,
                                                                        reference):  # fmt: skip
    """A mid-epoch checkpoint of an older run (its position has no ``metric_sums``, its records
    no ``train_accuracy``) resumes; the resumed epoch averages the metrics over its steps."""

    def interrupt(epoch, step):
        if (epoch, step) == (1, 17):
            signal.raise_signal(signal.SIGINT)

    stop = signals.StopRequest()
    with stop.installed():
        train.train_and_evaluate(TINY, tmp_path, corpus=corpus, progress=False, stop=stop,
                                 on_chunk=interrupt, plots_too=False)  # fmt: skip
    for position in (tmp_path / "checkpoints").glob("*/position/metadata"):
        saved = json.loads(position.read_text())
        saved.pop("metric_sums")
        for record in saved["records"]:
            record.pop("train_accuracy"), record.pop("train_z_loss")
        position.write_text(json.dumps(saved))
    resumed = train.train_and_evaluate(TINY, tmp_path, corpus=corpus, progress=False, resume=True)
    assert resumed.test_perplexity == reference[1].test_perplexity
    old, new = resumed.records
    assert "train_accuracy" not in old and 0.0 < new["train_accuracy"] < 1.0
    assert new["train_accuracy"] != reference[1].records[1]["train_accuracy"]  # fewer steps


def test_resume_with_more_epochs_extends_a_finished_run(tmp_path, corpus, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    longer = dataclasses.replace(TINY, epochs=3)
    result = train.train_and_evaluate(
        longer, run_dir, corpus=corpus, progress=False, resume=True, plots_too=False
    )
    assert [r["epoch"] for r in result.records] == [1, 2, 3]
    assert without_timings(result.records[:2]) == without_timings(reference[1].records)


def test_command_line_help_and_a_conflicting_resume_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main.main(["--help"])
    assert info.value.code == 0 and "--model" in capsys.readouterr().out
    runfiles.write_json_atomic(tmp_path / "config.json", dataclasses.asdict(TINY))
    with pytest.raises(SystemExit, match="--width 64 conflicts"):
        main.main(["--resume", str(tmp_path), "--width", "64"])


def test_compare_measures_both_losses_steps_and_memory(corpus):
    timing = compare.interleaved_step_times(TINY, corpus, rounds=2, steps=3)
    assert set(timing["median_step_seconds"]) == {"jxent", "optax"}
    assert all(t > 0 for t in timing["median_step_seconds"].values())
    ratio = timing["median_step_seconds"]["jxent"] / timing["median_step_seconds"]["optax"]
    assert timing["jxent_over_optax"] == ratio
    memory = {loss: compare.compiled_step_memory(TINY, corpus, loss) for loss in ("jxent", "optax")}
    # Same model and optimizer state in and out; only the loss's temporaries differ.
    assert memory["jxent"]["argument_bytes"] == memory["optax"]["argument_bytes"] > 0
    assert all(m["temp_bytes"] > 0 for m in memory.values())


@pytest.fixture
def late_clock(monkeypatch):
    """The time limit's clock, which jumps an hour ahead after the chunk ``late_clock.at``
    ((epoch, step), as ``on_chunk`` sees it): training then looks out of time, deterministically."""

    class Clock:
        at: tuple[int, int] | None = None
        offset = 0.0

        def __call__(self):
            return time.perf_counter() + self.offset

        def on_chunk(self, epoch, step):
            if (epoch, step) == self.at:
                self.offset = 3600.0

    fake = Clock()
    monkeypatch.setattr(loop, "clock", fake)
    return fake


N_STEPS = input_pipeline.steps_per_epoch(2200, TINY.batch_size, TINY.context)  # 34


def test_time_limit_stops_mid_epoch_and_still_reports_test_perplexity(tmp_path, corpus,
                                                                     late_clock):  # fmt: skip
    limited = dataclasses.replace(TINY, time_limit=30.0)
    late_clock.at = (1, 17)
    result = train.train_and_evaluate(limited, tmp_path, corpus=corpus, progress=False,
                                      on_chunk=late_clock.on_chunk, plots_too=False)  # fmt: skip
    assert not result.interrupted and result.exit_code == 0
    stop = result.time_limit_stop
    assert stop["steps"] == N_STEPS + 17 and stop["epochs"] == 2 and stop["seconds"] > 3600
    assert stop["epoch"] == pytest.approx(1 + 17 / N_STEPS)
    # The partial epoch is evaluated and recorded; the test set is scored as at a run's end.
    assert [r["epoch"] for r in result.records] == [1, stop["epoch"]]
    assert result.records[-1]["steps"] == 17
    assert math.isfinite(result.test_perplexity) and result.test_perplexity < corpus.vocab_size
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["time_limit_stop"] == stop
    assert results["test_perplexity"] == pytest.approx(result.test_perplexity)
    assert json.loads((tmp_path / "config.json").read_text())["time_limit"] == 30.0
    assert runfiles.read_metrics(tmp_path / "metrics.jsonl") == result.records


def test_time_limit_at_an_epoch_boundary_and_resumes_after_it(tmp_path, corpus, late_clock):
    limited = dataclasses.replace(TINY, time_limit=30.0)
    late_clock.at = (0, N_STEPS)  # out of time after epoch 1's last chunk
    first = train.train_and_evaluate(limited, tmp_path, corpus=corpus, progress=False,
                                     on_chunk=late_clock.on_chunk, plots_too=False)  # fmt: skip
    assert first.time_limit_stop["steps"] == N_STEPS and first.time_limit_stop["epoch"] == 1
    assert [r["epoch"] for r in first.records] == [1]
    # A run stopped by its limit is finished: resuming it with the same config trains nothing.
    again = train.train_and_evaluate(limited, tmp_path, corpus=corpus, progress=False,
                                     resume=True, plots_too=False)  # fmt: skip
    assert again.records == first.records and again.test_perplexity == first.test_perplexity
    assert again.time_limit_stop == first.time_limit_stop
    # More epochs continue from the stop, with a fresh time budget (the clock is back to real).
    late_clock.offset = 0.0
    longer = dataclasses.replace(limited, epochs=3)
    extended = train.train_and_evaluate(longer, tmp_path, corpus=corpus, progress=False,
                                        resume=True, plots_too=False)  # fmt: skip
    assert extended.time_limit_stop is None
    assert [r["epoch"] for r in extended.records] == [1, 2, 3]
    assert without_timings(extended.records[:1]) == without_timings(first.records)


def test_resume_continues_a_run_stopped_mid_epoch_by_its_limit(tmp_path, corpus, late_clock):
    limited = dataclasses.replace(TINY, time_limit=30.0)
    late_clock.at = (0, 17)
    first = train.train_and_evaluate(limited, tmp_path, corpus=corpus, progress=False,
                                     on_chunk=late_clock.on_chunk, plots_too=False)  # fmt: skip
    assert first.time_limit_stop["steps"] == 17
    late_clock.offset = 0.0
    longer = dataclasses.replace(limited, epochs=3)
    extended = train.train_and_evaluate(longer, tmp_path, corpus=corpus, progress=False,
                                        resume=True, plots_too=False)  # fmt: skip
    # The partial epoch's record stays (a validation measured then); the epoch is completed.
    epochs = [r["epoch"] for r in extended.records]
    assert epochs == [pytest.approx(17 / N_STEPS), 1, 2, 3]
    assert extended.time_limit_stop is None and math.isfinite(extended.test_perplexity)


def test_time_limit_flag_is_saved_and_reported(tmp_path, capsys, corpus, monkeypatch,
                                               late_clock):  # fmt: skip
    monkeypatch.setattr(train, "load_corpus", lambda config: corpus)
    late_clock.at = (0, 17)
    monkeypatch.setattr(train.loop, "run", _with_on_chunk(train.loop.run, late_clock.on_chunk))
    run_dir = tmp_path / "run"
    code = main.main([
        "--epochs", "3", "--batch-size", "4", "--context", "16", "--width", "32",
        "--depth", "1", "--heads", "2", "--chunk-steps", "17", "--learning-rate", "1e-2",
        "--warmup-steps", "5", "--dropout", "0.1", "--time-limit", "0.5", "--no-progress",
        "--out-dir", str(run_dir),
    ])  # fmt: skip
    assert code == 0
    assert json.loads((run_dir / "config.json").read_text())["time_limit"] == 0.5
    out = capsys.readouterr().out
    assert "stopped at the 0.5-minute time limit after 17 steps (0.5 of 3 epochs)" in out
    assert "test perplexity" in out


def _with_on_chunk(run, on_chunk):
    """``loop.run`` with its test hook set (the command line has none)."""
    return lambda *args, **kwargs: run(*args, **{**kwargs, "on_chunk": on_chunk})


def test_resume_of_a_finished_run_trains_nothing_and_reports_it_again(tmp_path, corpus, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    again = train.train_and_evaluate(
        TINY, run_dir, corpus=corpus, progress=False, resume=True, plots_too=False
    )
    assert again.records == reference[1].records and again.time_limit_stop is None
    assert again.test_perplexity == reference[1].test_perplexity


def test_an_interrupted_run_resumes_with_the_time_it_had_spent(tmp_path, corpus, late_clock):
    limited = dataclasses.replace(TINY, time_limit=30.0)
    late_clock.at = (0, 17)

    def late_then_interrupt(epoch, step):
        late_clock.on_chunk(epoch, step)
        if (epoch, step) == (0, 17):
            signal.raise_signal(signal.SIGINT)

    stop = signals.StopRequest()
    with stop.installed():
        first = train.train_and_evaluate(limited, tmp_path, corpus=corpus, progress=False,
                                         stop=stop, on_chunk=late_then_interrupt,
                                         plots_too=False)  # fmt: skip
    assert first.interrupted and first.time_limit_stop is None
    late_clock.offset = 0.0
    # The hour counted before the interrupt is over the 30 minutes: the resume trains the
    # epoch's last chunk (a process always trains one before it can forecast) and stops.
    resumed = train.train_and_evaluate(limited, tmp_path, corpus=corpus, progress=False,
                                       resume=True, plots_too=False)  # fmt: skip
    assert resumed.time_limit_stop["epoch"] == 1 and resumed.time_limit_stop["seconds"] > 3600
    assert [r["epoch"] for r in resumed.records] == [1] and math.isfinite(resumed.test_perplexity)
