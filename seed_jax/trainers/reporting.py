"""What a run reports: metrics (metrics.jsonl + TensorBoard), progress lines, and the sums and means they show."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class MetricsWriter:
    """One JSON object per line in WORKDIR/metrics.jsonl, plus TensorBoard under
    WORKDIR/tb/STAGE: a TensorBoard run per stage (each counts its steps from 0), its
    tags `split/metric`."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb: dict = {}  # stage -> its SummaryWriter, opened at its first event
        self._purge_steps: dict[str, int] = {}  # stage -> the step its writer drops the earlier runs' events from

    def tb(self, stage: str):
        """The tensorboardX SummaryWriter of `stage` (process 0 only)."""
        if stage not in self._tb:
            from tensorboardX import SummaryWriter

            self._tb[stage] = SummaryWriter(os.path.join(self.workdir, "tb", stage),
                                            purge_step=self._purge_steps.pop(stage, None))
        return self._tb[stage]

    def write(self, step: int, stage: str, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "stage": stage, "split": split,
                  **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        tb = self.tb(stage)
        for k, v in metrics.items():
            tb.add_scalar(f"{split}/{k}", float(v), int(step))
        tb.flush()

    def _lines(self) -> list[tuple[str, dict | None]]:
        """metrics.jsonl's lines with their records (None for a line cut short by a kill)."""
        if not self.enabled or not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            lines = f.readlines()
        parsed = []
        for line in lines:
            try:
                parsed.append((line, json.loads(line)))
            except json.JSONDecodeError:
                parsed.append((line, None))
        return parsed

    def forget_after(self, stage: str, step: int) -> None:
        """Drops the lines of `stage` past `step` (the step a run resumes from): a run that
        stopped without a checkpoint at its last logged step (a crash, a kill) logged steps
        that the resumed run logs again. A line cut short by a kill goes too, and a whole
        last line the kill left without its newline gets one (the next line was appended
        to it). TensorBoard drops them too: the stage's next event file starts with a
        SessionLog START at `step` + 1, and TensorBoard hides the events of the run's
        earlier files from that step on."""
        if self.enabled:
            if stage in self._tb:
                self._tb.pop(stage).close()
            self._purge_steps[stage] = step + 1
        lines = self._lines()
        kept = [line if line.endswith("\n") else line + "\n" for line, record in lines
                if record is not None and not (record["stage"] == stage and record["step"] > step)]
        if kept != [line for line, _ in lines]:
            if len(kept) < len(lines):
                logging.info("%s: dropped %d lines of metrics.jsonl past step %d", stage, len(lines) - len(kept),
                             step)
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)

    def holds(self, stage: str, step: int, split: str) -> bool:
        """Whether metrics.jsonl has a `split` line of `stage` at `step`: process 0 reads
        it, every process gets its answer."""
        found = any(record is not None and (record["stage"], record["step"], record["split"]) == (stage, step, split)
                    for _, record in self._lines())
        if jax.process_count() > 1:
            found = bool(multihost_utils.broadcast_one_to_all(np.asarray(found)))
        return found

    def close(self):
        for tb in self._tb.values():
            tb.close()
        self._tb = {}


class Progress:
    """Log lines with step, loss, steps/s and ETA."""

    def __init__(self, name: str, start_step: int, num_steps: int):
        self.name, self.num_steps = name, num_steps
        self.last_step, self.last_time = start_step, time.perf_counter()

    def log(self, step: int, metrics: dict[str, float]) -> float:
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        eta = (self.num_steps - step) / max(rate, 1e-9)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        logging.info("%s step %d/%d %s | %.2f steps/s | ETA %dm%02ds", self.name, step, self.num_steps, shown,
                     rate, eta // 60, eta % 60)
        return rate


def summed_over_processes(counts: dict[str, float]) -> dict[str, float]:
    """`counts` (the same keys on every process) summed over processes."""
    if jax.process_count() == 1 or not counts:
        return counts
    keys = sorted(counts)
    totals = multihost_utils.process_allgather(np.asarray([counts[k] for k in keys], np.float32)).sum(axis=0)
    return {k: float(v) for k, v in zip(keys, totals)}


def mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
    """Averages per-step device metrics after one transfer to host."""
    host = jax.device_get(history)
    return {k: float(np.mean([h[k] for h in host])) for k in host[0]}
