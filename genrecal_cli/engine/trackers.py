"""Experiment trackers (train.log_with), through accelerate's: every record of metrics.jsonl as
it is written, the recipe as the run's config, the accuracy table at the end."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from ..recipe import Recipe

_NOT_METRICS = ("stage", "step", "time")


def flat_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A recipe as one level of "table.key" -> number, string or bool (what every tracker takes,
    TensorBoard's hparams included); lists become comma-separated strings."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_config(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ", ".join(map(str, value))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
    return flat


class TrackerSink:
    """Takes metrics.jsonl records (Reporter.sinks) and logs their numbers as "stage/key" at a
    step that only grows through the run: a stage's steps follow the last step logged before it
    started (a resumed run starts from its first stage's step)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.offset: dict[str, int] = {}
        self.last = 0

    def __call__(self, record: Mapping[str, Any]) -> None:
        stage = record["stage"]
        base = self.offset.setdefault(stage, self.last)
        step = base + int(record["step"])
        values = {f"{stage}/{k}": v for k, v in record.items()
                  if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self.accelerator.log(values, step=step)
        self.last = max(self.last, step)


class _Tracking:
    def __init__(self, accelerator, sink: TrackerSink | None):
        self.accelerator, self.sink = accelerator, sink

    def summary(self, accuracy: Mapping[str, Any]) -> None:
        """The run's accuracy table (teacher, student before / after), at the run's last step."""
        if self.sink is None:
            return
        values = {f"accuracy/{name.replace(' ', '_')}": row["accuracy"] for name, row in accuracy.items()
                  if isinstance(row, Mapping) and isinstance(row.get("accuracy"), (int, float))}
        if values:
            self.accelerator.log(values, step=self.sink.last)


@contextmanager
def tracking(recipe: Recipe, accelerator, reporter, *, enabled: bool = True) -> Iterator[_Tracking]:
    """Start the recipe's trackers (none: nothing happens), feed them what the reporter records,
    and close them when the run ends, also when it stops on an error or a signal."""
    if not (enabled and recipe.train.log_with):
        yield _Tracking(accelerator, None)
        return
    accelerator.init_trackers("genrecal", config=flat_config(recipe.to_dict()))
    sink = TrackerSink(accelerator)
    if reporter is not None:
        reporter.sinks.append(sink)
    try:
        yield _Tracking(accelerator, sink)
    finally:
        if reporter is not None:
            reporter.sinks.remove(sink)
        accelerator.end_training()
