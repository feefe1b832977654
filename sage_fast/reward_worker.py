"""A reward with a time limit: the task's reward runs in a worker process that is killed past it.

    reward = TimedReward(TaskReward(task), timeout_s=60)   # task.reward_timeout_s > 0
    result = reward(video_bcfhw, prompts)             # a RewardResult, always; never hangs
    reward.close()

A reward model behind a remote service can hang, and a Python thread cannot be stopped, so the
reward runs in a child process (started on first use, reused across batches). A batch whose
reward takes longer than `timeout_s` is a failed batch: its rows are NaN (the trainer excludes
them, as for any failed reward), `RewardResult.timed_out` is set, and the child is killed with
SIGKILL and replaced at the next call: nothing is left running. A child that dies (a crash in the
reward) fails its batch the same way.

Start method: `fork` while CUDA is not initialised in this process (the child inherits the
reward, models included, at no cost), else `spawn` (the reward must then be picklable; a clear
error says so when it is not). Videos travel through shared memory (torch.multiprocessing).
The child runs torch with one thread; the parent waits meanwhile.

Leaves to others: what a reward computes (`sage_fast.task`), excluding failed rows (advantages).
"""

from __future__ import annotations

import logging
import pickle

import torch
import torch.multiprocessing as tmp

from sage_fast.task import RewardResult, failed_reward

__all__ = ["TimedReward", "TaskReward"]

log = logging.getLogger("sage_fast.reward")


class TaskReward:
    """`task.reward` looked up at call time (picklable when the task is, for a spawned worker)."""

    def __init__(self, task) -> None:
        self.task = task

    def __call__(self, video_bcfhw, prompts):
        return self.task.reward(video_bcfhw, prompts)


def _serve(fn, conn) -> None:
    """The child's loop: (video, prompts) in, ("ok", RewardResult) or ("error", text) out; None stops."""
    torch.set_num_threads(1)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if job is None:
            return
        video, prompts = job
        try:
            out = ("ok", fn(video, prompts))
        except Exception as err:  # noqa: BLE001 - reported to the parent as a failed batch
            out = ("error", f"{type(err).__name__}: {err}")
        conn.send(out)


class TimedReward:
    """`fn(video_bcfhw, prompts) -> RewardResult` with a per-batch time limit (see module doc)."""

    def __init__(self, fn, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"task.reward_timeout_s must be > 0 for a timed reward, got {timeout_s!r}")
        self.fn, self.timeout_s = fn, float(timeout_s)
        self.process = self.conn = None

    def _start(self) -> None:
        method = "spawn" if (torch.cuda.is_available() and torch.cuda.is_initialized()) else "fork"
        ctx = tmp.get_context(method)
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(target=_serve, args=(self.fn, child), daemon=True, name="sage_fast-reward")
        try:
            process.start()
        except (pickle.PicklingError, TypeError, AttributeError) as err:
            raise ValueError(f"task.reward_timeout_s: the reward cannot be sent to a '{method}' worker process "
                             f"({type(err).__name__}: {err}); use a picklable reward or task.reward_timeout_s=0") from err
        child.close()
        self.process, self.conn = process, parent

    def _kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join(timeout=10)
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = None

    def __call__(self, video_bcfhw: torch.Tensor, prompts: list[str]) -> RewardResult:
        batch = video_bcfhw.shape[0]
        if self.process is None or not self.process.is_alive():
            self._kill()
            self._start()
        try:
            self.conn.send((video_bcfhw.detach().cpu(), list(prompts)))
            ready = self.conn.poll(self.timeout_s)
            reply = self.conn.recv() if ready else None
        except (EOFError, OSError, BrokenPipeError) as err:  # the worker died (a crash in the reward)
            self._kill()
            return failed_reward(batch, RuntimeError(f"the reward worker died ({type(err).__name__}: {err})"))
        if reply is None:
            self._kill()
            result = failed_reward(batch, TimeoutError(f"the reward took longer than task.reward_timeout_s="
                                                      f"{self.timeout_s:g} s; its worker was killed"))
            result.timed_out = True
            return result
        kind, payload = reply
        if kind == "ok":
            return payload
        return failed_reward(batch, RuntimeError(payload))

    def close(self) -> None:
        """Stop the worker (politely, then by force)."""
        if self.process is not None and self.process.is_alive():
            try:
                self.conn.send(None)
                self.process.join(timeout=5)
            except (OSError, BrokenPipeError):
                pass
        self._kill()
