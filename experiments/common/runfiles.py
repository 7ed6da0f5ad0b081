"""A run directory's files: ``config.json``, ``metrics.jsonl`` and orbax ``checkpoints/``.

Kill safety: a ``SIGKILL`` may land at any instant, so no file may ever be half written and the
files may never disagree in a way a resume cannot repair.

* Every file is replaced atomically (write a temp file, then rename): ``config.json`` once at
  the start, ``metrics.jsonl`` whole after every epoch.
* Each checkpoint carries the metric records up to its position. orbax finalises a checkpoint
  by renaming its temp directory, so a checkpoint is either complete or invisible.
* ``metrics.jsonl`` may therefore run at most one epoch ahead of the newest complete checkpoint
  (the record is written while the checkpoint is still being saved in the background); a resume
  rewrites it from the checkpoint's records, and without any checkpoint starts from scratch.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


def new_run_dir(experiment: str, out_dir: str | None) -> Path:
    """``out_dir`` if given, else ``runs/<experiment>/<timestamp>/`` under the current dir."""
    if out_dir:
        return Path(out_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / experiment / stamp


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``text`` via a temp file in the same directory and a rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp creates 0600
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def ensure_config(run_dir: Path, config: Any) -> None:
    """Writes ``config.json`` (a dataclass) unless the run already has one; process 0 only."""
    import dataclasses

    import jax

    path = run_dir / CONFIG
    if jax.process_index() == 0 and not path.exists():
        write_json_atomic(path, dataclasses.asdict(config))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (an empty list if there is none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Replaces ``metrics.jsonl`` with ``records``, atomically."""
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


class Checkpointer:
    """orbax checkpoints of a state pytree plus a JSON position (which holds the records).

    Saves are asynchronous (training goes on while the previous epoch is written); a save that
    a kill interrupts leaves only orbax's temp directory, which ``latest_step`` ignores.
    """

    def __init__(self, directory: Path, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            directory.resolve(),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, global_step: int, state: Any, position: Mapping[str, Any]) -> None:
        ocp = self._ocp
        # The JSON is written in the background, after the caller has gone on appending to the
        # records list it passed: snapshot it now, or an epoch's checkpoint would carry the next
        # epoch's record too and a resume from it would repeat that record.
        snapshot = json.loads(json.dumps(dict(position)))
        self.manager.save(
            global_step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), position=ocp.args.JsonSave(snapshot)
            ),
            force=True,  # the position, not orbax's save interval, decides what is saved
        )

    def restore(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
        """``(state, position)`` of the newest complete checkpoint, or None if there is none."""
        ocp = self._ocp
        step = self.manager.latest_step()
        if step is None:
            return None
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


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
