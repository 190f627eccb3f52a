"""The Studio's disk-space side: what a run takes, and giving it back (its earlier checkpoints, or the whole
run with its queue jobs). The files work is ``trainer.housekeeping``'s; this decides when it may run.

A mixin of :class:`ui.studio.Studio`: it uses ``run_dir``, ``run_names``, ``_job_for``, ``queue`` and ``mix``.
Nothing here touches a run that trains or waits in the queue.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer import housekeeping
from trainer.checkpoint import checkpoint_dirs, checkpoint_step
from trainer.errors import UserError
from trainer.housekeeping import RunUsage, human_bytes, run_usage
from trainer.job import LIVE
from trainer.steps import exported_step_files

NO_EARLIER_CHECKPOINTS = "'{}' has no earlier checkpoints to delete (its last one stays, so it can train on)"


class RunSpace:
    """Disk space of runs in ``outputs/`` (see the module docstring)."""

    def disk_usage(self, run: str) -> RunUsage:
        return run_usage(self.run_dir(run))

    def _idle_run_dir(self, run: str, doing: str) -> Path:
        """The folder of ``run`` when no job trains it or waits to (those own their files)."""
        run_dir = self.run_dir(run)
        job = self._job_for(run_dir)
        if job is not None and job.state in LIVE:
            how = "take it out of the queue (Stop)" if job.state == "queued" else "stop it and wait until it has"
            raise UserError(f"'{run_dir.name}' is {job.state}: {how} before {doing}")
        return run_dir

    def prune_question(self, run: str) -> str:
        """What "Delete earlier checkpoints" would delete, asked before it does: the steps, their size, and
        which of them have no exported LoRA (those are gone for good with their checkpoint).

        Raises:
            UserError: the run trains or waits, or it has no earlier checkpoint.
        """
        run_dir = self._idle_run_dir(run, "deleting its checkpoints")
        doomed, size = housekeeping.prunable(run_dir)
        if not doomed:
            raise UserError(NO_EARLIER_CHECKPOINTS.format(run_dir.name))
        steps = [checkpoint_step(p) for p in doomed]
        unexported = [s for s in steps if s not in exported_step_files(run_dir)]
        one = len(unexported) == 1
        lost = (f" Step {', '.join(map(str, unexported))} {'has' if one else 'have'} no exported LoRA: pick "
                f"{'it' if one else 'them'} on the Export tab first to keep {'its file' if one else 'their files'}."
                if unexported else " Every one of them was exported: their LoRA files stay.")
        return f"Delete the checkpoints of step {', '.join(map(str, steps))} ({human_bytes(size)})?" + lost

    def prune_checkpoints(self, run: str) -> str:
        """Delete all but the run's last checkpoint (that one lets it train on); one line saying what went."""
        run_dir = self._idle_run_dir(run, "deleting its checkpoints")
        steps, freed = housekeeping.prune_checkpoints(run_dir, keep=1)
        if not steps:
            return NO_EARLIER_CHECKPOINTS.format(run_dir.name) + "."
        kept = checkpoint_dirs(run_dir)
        return (f"Deleted the checkpoints of step {', '.join(map(str, steps))} ({human_bytes(freed)}); the last one"
                + (f" (step {checkpoint_step(kept[-1])})" if kept else "") + " stays, so the run can train on. "
                "Steps exported before keep their files on the Export tab.")

    def check_deletable(self, run: str) -> Path:
        """The run's folder, if it may be deleted now.

        Raises:
            UserError: no such run, or it is training or waiting in the queue.
        """
        run_dir = self._idle_run_dir(run, "deleting it")
        if run_dir.name not in self.run_names():  # a folder without a dataset or a training is not the app's
            raise UserError(f"'{run_dir.name}' has no folder to delete")
        return run_dir

    def delete_run(self, run: str) -> str:
        """Delete the run's folder (dataset, checkpoints, LoRA files, samples) and its jobs in the queue.

        Raises:
            UserError: as :meth:`check_deletable`.
        """
        run_dir = self.check_deletable(run)
        size = run_usage(run_dir).total
        for lora in run_dir.rglob("*.safetensors"):  # a preview may hold its LoRA files as adapters
            self.mix.forget_file(str(lora.resolve()))
        hidden = housekeeping.hide_run_folder(run_dir)  # first: a folder that cannot move keeps its jobs too
        try:
            self.queue.forget(run_dir)  # refuses if a job was queued since the check above
        except UserError:
            os.replace(hidden, run_dir)
            raise
        if not housekeeping.remove_hidden(hidden):
            return (f"Deleted '{run_dir.name}' from the list; some of its files are held open elsewhere and go when "
                    "the app next starts.")
        return f"Deleted '{run_dir.name}' and its files ({human_bytes(size)})."
