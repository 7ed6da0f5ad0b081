"""What every example shares: the epoch loop (``loop``), run directories and checkpoints
(``runfiles``), the command line and ``--resume`` (``cli``), devices and multi-process jobs
(``devices``), SIGINT/SIGTERM handling (``signals``) and plots (``plots``)."""
