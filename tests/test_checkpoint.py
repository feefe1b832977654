"""Exact, atomic checkpoints: round trip, RNG replay, crash safety, pruning."""

import random

import numpy as np
import pytest
import torch

from sage_fast import checkpoint as ckpt


def _draw():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_capture_restore_replays_the_same_numbers():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()
    state = ckpt.capture_rng_state()
    first = [_draw() for _ in range(3)]
    _draw()
    ckpt.restore_rng_state(state)
    assert [_draw() for _ in range(3)] == first


def test_save_load_round_trip_and_latest(tmp_path):
    manager = ckpt.CheckpointManager(tmp_path, keep=2)
    assert manager.load() is None
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "data": {"epoch": 1, "position": 7}}
    for step in (10, 20, 30):
        manager.save(step, state, [ckpt.capture_rng_state()], meta={"note": "test"})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000020", "step_00000030"]  # keep=2 pruned step 10
    step, loaded, rngs = manager.load()
    assert step == 30 and loaded["data"] == {"epoch": 1, "position": 7} and len(rngs) == 1
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    manager = ckpt.CheckpointManager(tmp_path, keep=3)
    manager.save(1, {"w": torch.ones(3)})
    real_save = torch.save
    calls = []

    def dying_save(obj, f, *args, **kwargs):
        calls.append(1)
        real_save(obj, f, *args, **kwargs)
        raise OSError("disk full")  # the process dies after writing part of the checkpoint

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        manager.save(2, {"w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    assert calls
    step, state, _ = manager.load()
    assert step == 1 and torch.equal(state["w"], torch.ones(3))
    # the next successful save cleans the crashed writer's temporary folder
    manager.save(3, {"w": torch.full((3,), 3.0)})
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert manager.load()[0] == 3


def test_latest_pointer_to_an_incomplete_checkpoint_falls_back(tmp_path):
    manager = ckpt.CheckpointManager(tmp_path)
    manager.save(5, {"x": torch.tensor(5)})
    (tmp_path / "checkpoints" / "step_00000009").mkdir()  # a folder without meta.json
    (tmp_path / "checkpoints" / "latest").write_text("step_00000009")
    assert manager.latest().name == "step_00000005"
    assert manager.load()[0] == 5
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ckpt.CheckpointManager(tmp_path, keep=0)
