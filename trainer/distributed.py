"""One run on several processes through accelerate (DDP or FSDP2); a no-op for a single process.

Launch with ``accelerate launch -m trainer train …`` or ``torchrun -m trainer train …``
(or ``python -m trainer train --num-processes N``). Each process computes its share of
every global batch. With DDP each holds the whole frozen base and accelerate's wrapper
averages the LoRA gradients; with an FSDP accelerate config (:mod:`trainer.fsdp`) each
holds 1/N of the denoiser. Only the main process writes events, checkpoints and
exports; the others wait at barriers (and, under FSDP, take part in gathering the
LoRA and in rendering samples, which need every shard).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from trainer import events as ev
from trainer.errors import UnsupportedError, UserError
from trainer.fsdp import FsdpPlan, full_optimizer_state, full_tensors, no_gradient_sync, plan_from_env
from trainer.fsdp import shard as shard_model


# how gloo reports a collective whose peer process has exited (NCCL raises DistError subclasses)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


SILENT_PEER = ("another process of this run ended without saying why (killed, e.g. when the system ran out of "
               "memory); this one stopped with it")


class PeerFailed(UserError):
    """Another process of this run failed first; this one stopped with it (the other one says why).

    A note, not an error line: one failure should read as one ``error:`` line in the terminal. Its own
    exit code tells the launcher that this process did not fail by itself (see :func:`failure_report`).
    """

    label = "note"
    exit_code = 3


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    accelerator: Optional[object] = None
    fsdp: Optional[FsdpPlan] = None  # set: the denoiser is sharded, and gathering/sampling are collective

    @property
    def sharded(self) -> bool:
        return self.fsdp is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def wrap(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> torch.nn.Module:
        """The module to call for forward/backward: DDP-wrapped, or sharded in place under FSDP.

        FSDP replaces the parameters, so ``optimizer`` (with any state a resume loaded) is moved onto
        the shards, and callers must list ``model.parameters()`` again afterwards.
        """
        if self.accelerator is None:
            return model
        if self.fsdp is not None:
            return shard_model(model, optimizer, self.fsdp, self.world, torch.device(self.accelerator.device))
        return self.accelerator.prepare_model(model, device_placement=False)

    def describe(self, model: torch.nn.Module) -> str:
        """One line for the run's log saying how the processes share the work."""
        if self.fsdp is None:
            return f"{self.world} processes (DDP): each holds the whole frozen base"
        from torch.distributed.fsdp import FSDPModule

        units = sum(isinstance(m, FSDPModule) for m in model.modules())
        return f"{self.world} processes (FSDP2): each holds 1/{self.world} of the denoiser, sharded in {units} units"

    def full_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state dict with full tensors; under FSDP a collective every process must call."""
        if self.fsdp is None:
            return state
        return full_tensors(state)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """``optimizer.state_dict()`` in single-process layout (gathered under FSDP: every process calls it)."""
        if self.fsdp is None:
            return optimizer.state_dict()
        return full_optimizer_state(optimizer)

    def mean(self, value: float) -> float:
        if self.accelerator is None:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device, dtype=torch.float64)
        return float(self.accelerator.reduce(tensor, reduction="mean"))

    def any(self, flag: bool) -> bool:
        """True on every process if it is true on one (a stop request must end all ranks at the same step)."""
        if self.accelerator is None:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(tensor, reduction="sum") > 0)

    def no_sync(self, model: torch.nn.Module, skip: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
        if self.accelerator is None or not skip:
            return contextlib.nullcontext()
        if self.fsdp is not None:
            return no_gradient_sync(model)
        return self.accelerator.no_sync(model)

    def explain(self, err: Exception) -> Exception:
        """``err``, or :class:`PeerFailed` when a collective broke because another process died."""
        if self.world == 1 or isinstance(err, UserError):
            return err
        if isinstance(err, torch.distributed.DistError) or any(mark in str(err) for mark in _PEER_GONE):
            return PeerFailed("this process stopped because another process of this run failed (its error line says why)")
        return err

    def error_line(self, err: Exception, message: str, events_path: Path) -> Optional[str]:
        """The line this process adds to events.jsonl for ``err``, or None when another process records it.

        The process that failed records its own error (naming itself when it is not the main one); a
        peer's failure is recorded by the main process only if nothing was (the peer was killed).
        """
        if self.world == 1:
            return message
        last = ev.read_jsonl(events_path)[-1:] if events_path.is_file() else []
        recorded = last[0].message if last and isinstance(last[0], ev.Error) else None
        if isinstance(err, PeerFailed):  # nothing recorded: the other process was killed before it could say why
            return SILENT_PEER if self.is_main and recorded is None else None
        line = message if self.is_main else f"process {self.rank + 1} of {self.world}: {message}"
        return None if recorded is not None and recorded.endswith(message) else line

    def device(self, requested: str) -> str:
        return str(self.accelerator.device) if self.accelerator is not None else requested


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(requested_device: str) -> Dist:
    """A :class:`Dist` for this process; creates an ``Accelerator`` only when launched on several processes."""
    if world_size_from_env() <= 1:
        return Dist()
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    plan = plan_from_env(os.environ)  # before the Accelerator: a refused config fails without starting anything
    accelerator = Accelerator(cpu=requested_device == "cpu" or not torch.cuda.is_available())
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise UnsupportedError(
            "DeepSpeed is not supported: use an FSDP config with fsdp_version: 2 (docs/multi-gpu.md) for a base that "
            "does not fit one GPU, or plain multi-GPU (DDP), where every GPU holds the frozen base (NF4 keeps it small)"
        )
    return Dist(rank=accelerator.process_index, world=accelerator.num_processes, accelerator=accelerator, fsdp=plan)


def launch(processes: int, argv: list[str]) -> int:
    """Run ``python -m trainer <argv>`` on ``processes`` local processes with torchrun's launcher; the exit code.

    When one process fails, the launcher stops the others (no rank is left waiting in a collective).
    The failed process has printed its own ``error:`` line; torchrun's multi-line failure report
    would only repeat it, so it is replaced by the first failure's exit code (2 for a user error).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # its "sending SIGTERM", "failed (exitcode …)" and "received death signal" lines would only repeat what the
    # processes say; torch gives each module's logger its own level, so the parent's is not enough
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # after Ctrl-C torchrun waits this long for the processes to stop before it kills them (30 s by default): the
    # main one may still be hashing the base and writing the exports (torch >= 2.13 reads it; older ones wait 30 s)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={processes}", "-m", "trainer", *argv]))
    except SignalException as err:
        # Ctrl-C (or SIGTERM) reaches only the launcher: torchrun starts each process in its own session. It
        # passes the signal on once to each, which stops after its step and writes what it should, then
        # raises this; the exit status is the shell's 128 + the signal, as for one process.
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        code, line = failure_report(err.failures, processes)
        if line is not None:
            print(f"error: {line}", file=sys.stderr, flush=True)
        return code
    return 0


def failure_report(failures: dict, processes: int) -> tuple[int, Optional[str]]:
    """(exit code, line the launcher must print) for a run in which processes failed.

    A process that failed by itself has printed its own ``error:`` line: its exit code is reported
    (the first one's), and nothing more is said. The ones that stopped because a peer failed exit with
    :class:`PeerFailed`'s code; the ones the launcher stopped, or that broke while exiting, report
    signals (negative codes) and can carry the same timestamp second as the real failure. When no
    process failed by itself, nobody has said why, so the launcher names the first one killed.
    """
    own = [failure for failure in failures.values() if failure.exitcode > 0 and failure.exitcode != PeerFailed.exit_code]
    if own:
        return min(own, key=lambda failure: failure.timestamp).exitcode, None
    killed = {rank: failure for rank, failure in failures.items() if failure.exitcode < 0}
    if not killed:  # only peers that stopped with one another: nothing points at a cause
        return 1, f"all {processes} processes stopped, each waiting on another; nothing else is known"
    # timestamps are whole seconds: in a tie, the launcher's own SIGTERM to the others is not the cause
    rank, first = min(killed.items(), key=lambda item: (item[1].timestamp, item[1].exitcode == -signal.SIGTERM))
    hint = (" (the system most likely ran out of host memory: try a smaller batch or resolution, or --precision nf4)"
            if first.exitcode == -signal.SIGKILL else "")
    return 1, f"process {rank + 1} of {processes} was killed by {first.signal_name()} before it could say why{hint}"
