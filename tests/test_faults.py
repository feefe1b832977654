"""What clusters do to jobs: preemption signals, kill -9, corrupt checkpoints, full disks, hung rewards,
and config errors that must stay one line."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sage_fast import checkpoint as ckpt
from sage_fast import config as C
from sage_fast import train_config  # noqa: F401 (recipes)
from sage_fast.train import EXIT_PREEMPTED, EXIT_SAVE_FAILED, main
from sage_fast.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crash_soak  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = crash_soak.TINY


def _cfg(tmp_path, *extra):
    return C.apply_overrides(C.get_recipe("tiny_world"), TINY + [f"run.output_dir={tmp_path}/run", *extra])


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONFAULTHANDLER="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SAGE_FAST_CHECKPOINT_WRITE_DELAY_S"):
        env.pop(k, None)
    return env


def _train_records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return [r for r in rows if r.get("kind") == "train"]


# ---------------------------------------------------------------------------------------------
# 1. preemption


RUN8 = ["run.steps=8", "run.eval_every=4", "run.save_every=4"]


def _start_training(command: list[str], out: Path) -> subprocess.Popen:
    """Start a run and return once it has finished its first iteration."""
    proc = subprocess.Popen(command, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 180
    while proc.poll() is None and len(_train_records(out)) < 1 and time.time() < deadline:
        time.sleep(0.01)
    return proc


def test_sigterm_saves_exits_75_and_resume_is_exact(tmp_path):
    ref = tmp_path / "ref"
    base = [sys.executable, "-m", "sage_fast.train", *TINY, *RUN8]
    assert subprocess.run(base + [f"run.output_dir={ref}"], env=_env(), cwd=ROOT, capture_output=True).returncode == 0
    out = tmp_path / "pre"
    proc = _start_training(base + [f"run.output_dir={out}"], out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "SIGTERM" in err and "--resume" in err
    stopped_at = len(_train_records(out))
    assert 1 <= stopped_at < 8  # the current iteration finished, then it stopped
    latest = ckpt.CheckpointManager(out).latest()
    assert latest.name == f"step_{stopped_at:08d}"  # a checkpoint of the iteration it stopped after
    done = subprocess.run(base + [f"run.output_dir={out}", "--resume"], env=_env(), cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert crash_soak.compare_runs(ref, out) == []


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _worker_rank(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.dist
def test_sigterm_on_one_of_two_ranks_stops_both_and_resume_is_exact(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "sage_fast.train", *TINY, *RUN8, "grpo.samples_per_rank=2"]
    ref = tmp_path / "ref"
    done = subprocess.run(torchrun + [f"run.output_dir={ref}"], env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "pre"
    proc = _start_training(torchrun + [f"run.output_dir={out}"], out)
    rank1 = [p for p in _children(proc.pid) if _worker_rank(p) == 1]
    assert rank1, "rank 1's worker process not found"
    os.kill(rank1[0], signal.SIGTERM)  # only rank 1 is told: rank 0 must learn it through the collective
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0  # the launcher reports the workers' exit code 75 as a failure
    assert "exitcode  : 75" in err or "exit code 75" in err, err[-3000:]
    stopped_at = len(_train_records(out))
    assert 1 <= stopped_at < 8
    assert ckpt.CheckpointManager(out).latest().name == f"step_{stopped_at:08d}"
    done = subprocess.run(torchrun + [f"run.output_dir={out}", "--resume"], env=_env(), cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert crash_soak.compare_runs(ref, out) == []


def test_preempt_signal_names_are_checked():
    with pytest.raises(ValueError, match="run.preempt_signals"):
        C.apply_overrides(C.get_recipe("tiny_world"), ["run.preempt_signals=SIGKILL"])
    with pytest.raises(ValueError, match="run.preempt_signals"):
        C.apply_overrides(C.get_recipe("tiny_world"), ["run.preempt_signals=SIGNOPE"])
    assert train_config.preempt_signal_numbers("") == []
    assert train_config.preempt_signal_numbers("term, usr1") == [signal.SIGTERM, signal.SIGUSR1]


# ---------------------------------------------------------------------------------------------
# 2. kill -9 at random moments


def test_kill_minus_nine_at_random_moments_resumes_exactly(tmp_path):
    result = crash_soak.soak(tmp_path, kills=3, in_save=1, seed=1, log=lambda *_: None)
    assert result["failed_starts"] == 0, result["failures"]
    assert result["kills"] == 3 and result["in_save"] >= 1
    assert result["differences"] == []


@pytest.mark.slow
def test_kill_minus_nine_soak(tmp_path):
    result = crash_soak.soak(tmp_path, kills=24, in_save=4, seed=0, log=lambda *_: None)
    assert result["failed_starts"] == 0, result["failures"]
    assert result["kills"] == 24 and result["in_save"] >= 4
    assert result["differences"] == []


def test_torn_metrics_line_and_config_are_survived(tmp_path):
    from sage_fast.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, tensorboard=False)
    for it in (1, 2, 3):
        writer.write({"iteration": it, "loss": float(it)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "iterat')  # a kill in the middle of a line
    writer.truncate_after(2)
    assert [json.loads(x)["iteration"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ---------------------------------------------------------------------------------------------
# 3. bad checkpoints


def _two_checkpoints(tmp_path):
    manager = ckpt.CheckpointManager(tmp_path, keep=3)
    manager.save(1, {"w": torch.ones(1000)}, [{"r": 1}])
    manager.save(2, {"w": torch.full((1000,), 2.0)}, [{"r": 2}])
    return manager, tmp_path / "checkpoints" / "step_00000002"


def test_checkpoints_carry_checksums(tmp_path):
    _, path = _two_checkpoints(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    for name in ("state.pt", "rng.pt"):
        assert meta["files"][name]["sha256"] == ckpt.file_digest(path / name)
        assert meta["files"][name]["bytes"] == (path / name).stat().st_size


@pytest.mark.parametrize("damage,message", [
    ("truncate", "state.pt: .* bytes, meta.json records"),
    ("flip", "state.pt: SHA-256 does not match"),
    ("missing", "rng.pt: missing"),
    ("meta", "meta.json: missing or unreadable"),
])
def test_a_bad_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, damage, message, caplog):
    manager, path = _two_checkpoints(tmp_path)
    state = path / "state.pt"
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    elif damage == "missing":
        (path / "rng.pt").unlink()
    else:
        (path / "meta.json").write_text('{"step": 2, "fi')
    with pytest.raises(ckpt.CheckpointError, match=message):
        manager.load(fallback=False)
    with caplog.at_level("WARNING", logger="sage_fast.checkpoint"):
        step, loaded, rng = manager.load()
    assert step == 1 and torch.equal(loaded["w"], torch.ones(1000)) and rng == [{"r": 1}]
    assert "step_00000002" in caplog.text and "older checkpoint step_00000001" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match=message):
        manager.load(path)  # an explicit checkpoint is never swapped for another


def test_no_usable_checkpoint_fails_with_every_fault_named(tmp_path):
    manager, path = _two_checkpoints(tmp_path)
    for p in (path, tmp_path / "checkpoints" / "step_00000001"):
        (p / "state.pt").write_bytes(b"junk")
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint.*step_00000002.*step_00000001"):
        manager.load()


def test_resume_from_a_corrupt_latest_falls_back_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + [f"run.output_dir={out}", "run.steps=4", "run.save_every=2", "run.eval_every=100"]
    assert main(args) == 0
    latest = ckpt.CheckpointManager(out).latest()
    (latest / "state.pt").write_bytes((latest / "state.pt").read_bytes()[:200])
    assert main(args + ["run.resume_fallback=false", "--resume"]) == 6
    assert "state.pt" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0  # from step 2, redoing 3 and 4
    assert ckpt.CheckpointManager(out).latest().name == "step_00000004"


def test_a_checkpoint_of_another_config_is_refused_by_name(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + [f"run.output_dir={out}", "run.steps=2", "run.save_every=2", "run.eval_every=100"]) == 0
    code = main(TINY + [f"run.output_dir={out}", "run.steps=4", "model.lora_rank=2", "--resume"])
    err = capsys.readouterr().err
    assert code == 6 and "step_00000002/state.pt does not fit" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# 4. disk full, unwritable folder


def test_a_failed_save_keeps_the_previous_checkpoint_and_latest(tmp_path, monkeypatch):
    manager = ckpt.CheckpointManager(tmp_path)
    manager.save(1, {"w": torch.ones(3)})
    real = ckpt._save_file

    def full_disk(obj, path):
        real(obj, path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_save_file", full_disk)
    with pytest.raises(ckpt.CheckpointSaveError, match="step_00000002 not written.*No space left"):
        manager.save(2, {"w": torch.zeros(3)})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000001"]  # no temporary folder left, latest untouched
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000001"


@pytest.mark.parametrize("policy,code", [("stop", EXIT_SAVE_FAILED), ("continue", 0)])
def test_run_on_save_error(tmp_path, monkeypatch, policy, code, caplog):
    real = ckpt.CheckpointManager.save
    calls = []

    def flaky(self, step, *args, **kwargs):
        calls.append(step)
        if step == 2:
            raise ckpt.CheckpointSaveError(f"checkpoint step_{step:08d} not written (OSError: disk full)")
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ckpt.CheckpointManager, "save", flaky)
    out = tmp_path / "run"
    args = TINY + [f"run.output_dir={out}", "run.steps=4", "run.save_every=1", "run.eval_every=100",
                   f"run.on_save_error={policy}"]
    with caplog.at_level("ERROR"):
        assert main(args) == code
    assert "disk full" in caplog.text
    done = sorted(ckpt.CheckpointManager(out).by_step())
    assert done == ([1] if policy == "stop" else [3, 4])


# ---------------------------------------------------------------------------------------------
# 5. hung or slow rewards


def _sleepy(video, prompts):
    time.sleep(60)


def _dies(video, prompts):
    os._exit(3)


def test_a_hung_reward_times_out_its_batch_and_the_run_goes_on(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "task.reward_timeout_s=1.5"))
    good = trainer.task.reward_fn
    try:
        trainer.task.reward_fn = _sleepy
        t0 = time.time()
        metrics = trainer.step()
        assert time.time() - t0 < 30
        assert metrics["reward/failed"] == 4 and metrics["reward/timed_out"] == 4
        assert metrics["update_skipped"] is True
        assert trainer.timed_reward.process is None  # the hung worker was killed, not left running
        trainer.task.reward_fn = _dies
        metrics = trainer.step()
        assert metrics["reward/failed"] == 4 and metrics["reward/timed_out"] == 0
        trainer.task.reward_fn = good
        metrics = trainer.step()  # a fresh worker
        assert metrics["reward/failed"] == 0 and metrics["update_skipped"] is False
        pid = trainer.timed_reward.process.pid
    finally:
        trainer.close()
    assert trainer.timed_reward.process is None and not Path(f"/proc/{pid}").exists()


def test_a_timed_reward_equals_the_in_process_one(tmp_path):
    plain = Trainer(_cfg(tmp_path / "a"))
    timed = Trainer(_cfg(tmp_path / "b", "task.reward_timeout_s=60"))
    try:
        a, b = plain.step(), timed.step()
    finally:
        timed.close()
    assert a["reward/mean"] == b["reward/mean"] and a["loss"] == b["loss"]


def test_reward_timeout_is_validated():
    with pytest.raises(ValueError, match="task.reward_timeout_s"):
        C.apply_overrides(C.get_recipe("tiny_world"), ["task.reward_timeout_s=-2"])


# ---------------------------------------------------------------------------------------------
# 6. config errors found past the config check stay one line


@pytest.mark.parametrize("override,match", [
    ("grpo.group_size=3", "grpo.group_size=3 must divide"),
])
def test_config_errors_in_the_trainer_are_one_line(tmp_path, capsys, override, match):
    out = tmp_path / "run"
    assert main(TINY + [f"run.output_dir={out}", override]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert sum(line.startswith("sage_fast.train:") for line in err.splitlines()) == 1
    assert not out.exists()  # no half-started run folder is left to block the next try
