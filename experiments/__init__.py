"""jxent's experiments: Flax NNX examples trained with jxent's losses, laid out as Flax's examples.

One folder per example (``mnist``, ``brown``, ``clusters``), each with the same files: ``main.py``
(the command line), ``configs.py`` (the run's settings, saved as ``config.json``), ``models.py``,
``input_pipeline.py``, ``train.py`` and a ``README.md`` with its results and how to reproduce
them. ``common`` holds what every example shares (epoch loop, run files, command line, devices,
signals, plots); ``data`` the verified dataset loaders. Every module imports with absolute
``experiments.`` paths; the scripts beside this file (``mnist_mlp.py``, ``mnist_lenet5.py``,
``brown_lm.py``, ``five_clusters.py``) are the entry points users run.
"""
