"""Crash consistency (issue 17): damaged checkpoints, non-finite state, torn logs, a full disk, preemption
signals, Ctrl-C during a slow reward, two runs in one directory, leftovers of a killed write.

The parts on their own first (checkpoint verification, the metrics log, the run lock, the reward worker,
the signal handler), then the trainer end to end in the style of tests/test_trainer.py: a run is damaged
or stopped, resumed, and compared bit for bit with a run that never was.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_trainer import TINY, _comparable, assert_same_state, records, small

from otca_fast import checkpoint as ckpt
from otca_fast import report, runlock
from otca_fast import trainer as trainer_module
from otca_fast.preemption import EXIT_STOPPED, StopSignals
from otca_fast.rollout import RewardWorker
from otca_fast.train import main
from otca_fast.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# checkpoint verification
# ------------------------------------------------------------------------------------------------

def _save(root: Path, step: int, **kw) -> Path:
    weights = {"a.lora_A.weight": torch.randn(3, 4), "b": torch.randn(5)}
    return ckpt.save_checkpoint(root, step, weights=weights, ema={n: w.clone() for n, w in weights.items()},
                                optimizer={"state": {0: {"exp_avg": torch.randn(3, 4)}}, "param_groups": []},
                                state={"x": torch.arange(3)}, config_yaml="run: {}\n", **kw)


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _zero_fill(f: Path) -> None:
    f.write_bytes(b"\0" * f.stat().st_size)


def _poison(f: Path) -> None:
    """The same file with one NaN: same size, loads fine, only the finiteness check can tell."""
    from safetensors import safe_open

    with safe_open(str(f), "pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(f))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[1] = float("nan")
    size = f.stat().st_size
    save_file(tensors, str(f), metadata=metadata)
    assert f.stat().st_size == size


@pytest.mark.parametrize("damage, file, expected", [
    (_truncate, "weights.safetensors", r"weights\.safetensors: \d+ bytes, written with \d+ \(truncated"),
    (_truncate, "state.pt", r"state\.pt: unreadable \(PytorchStreamReader failed reading zip archive"),
    (_zero_fill, "optimizer.pt", r"optimizer\.pt: unreadable \(not a PyTorch zip archive\)"),
    (_poison, "ema.safetensors", r"ema\.safetensors: tensor\['a\.lora_A\.weight'\] holds 1 NaN and 0 Inf of its 12"),
    (lambda f: f.unlink(), "ema.safetensors", r"ema\.safetensors: missing \(the checkpoint was written with it\)"),
    (lambda f: f.unlink(), "state.pt", r"missing \['state\.pt'\]"),
])
def test_a_damaged_checkpoint_is_named_file_and_cause(tmp_path, damage, file, expected):
    path = _save(tmp_path, 4)
    damage(path / file)
    with pytest.raises(ckpt.CheckpointError, match=expected) as info:
        ckpt.load_checkpoint(path)
    assert str(path / file) in str(info.value) or file == "state.pt"
    assert "weights_only=False" not in str(info.value)  # never torch's advice to load unsafely


def test_the_fallback_skips_damaged_checkpoints_and_says_why(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step)
    _zero_fill(ckpt.checkpoint_dirs(tmp_path)[-1][1] / "optimizer.pt")
    warned = []
    path, c, skipped = ckpt.load_newest_valid(tmp_path, ckpt.load_checkpoint, warned.append)
    assert path.name == "step_00000004" and c["step"] == 4
    assert [p.name for p, _ in skipped] == ["step_00000006"]
    assert len(warned) == 1 and "step_00000006 is damaged, skipped" in warned[0] and "optimizer.pt" in warned[0]
    moved = ckpt.set_aside(skipped[0][0])
    assert moved.name == "step_00000006.damaged" and ckpt.latest_checkpoint(tmp_path).name == "step_00000004"
    # none valid: one line naming every checkpoint and its file
    _truncate(path / "weights.safetensors")
    _truncate(tmp_path / "checkpoints" / "step_00000002" / "state.pt")
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_newest_valid(tmp_path, ckpt.load_checkpoint, lambda m: None)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("--resume: no valid checkpoint in")
    assert "step_00000004: " in msg and "weights.safetensors" in msg and "step_00000002: " in msg and "state.pt" in msg
    with pytest.raises(ckpt.CheckpointFileMissing, match="no checkpoint in"):
        ckpt.load_newest_valid(tmp_path / "empty", ckpt.load_checkpoint, lambda m: None)


def test_a_checkpoint_is_never_written_from_non_finite_values(tmp_path):
    _save(tmp_path, 1)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"not written: weights\['w'\] holds 0 NaN and 1 Inf"):
        ckpt.save_checkpoint(tmp_path, 2, weights={"w": torch.tensor([1.0, float("inf")])}, optimizer={}, state={})
    with pytest.raises(ckpt.CheckpointWriteError, match=r"optimizer\['state'\]\[0\]\['exp_avg_sq'\] holds 2 NaN"):
        ckpt.save_checkpoint(tmp_path, 2, weights={"w": torch.ones(2)}, state={},
                             optimizer={"state": {0: {"exp_avg_sq": torch.full((2,), float("nan"))}}})
    assert [s for s, _ in ckpt.checkpoint_dirs(tmp_path)] == [1]
    assert not list((tmp_path / "checkpoints").glob(".*"))


def test_a_full_disk_names_the_checkpoint_and_the_space_it_needed(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "torch_save", full)
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        _save(tmp_path, 2)
    msg = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert msg.startswith(f"no space left on device writing checkpoint {tmp_path / 'checkpoints' / 'step_00000002'}")
    assert "it needs about 2" in msg and " B, " in msg and "is free there" in msg  # 2xx bytes of tensors
    assert [s for s, _ in ckpt.checkpoint_dirs(tmp_path)] == [1]
    assert not list((tmp_path / "checkpoints").glob(".*"))  # the partial write is gone


class _FillingFile:
    """A file on a disk that fills up after ``room`` bytes."""

    def __init__(self, room: int):
        self.written, self.room = 0, room

    def write(self, data) -> int:
        if self.written + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_torch_save_reports_a_full_disk_as_such(tmp_path, monkeypatch):
    """torch.save says '[enforce fail at inline_container.cc] unexpected pos' when the disk fills up; torch_save
    raises the OSError underneath, naming the file (and so does a safetensors write, by its message)."""
    monkeypatch.setattr(ckpt, "open", lambda path, mode: _FillingFile(5000), raising=False)
    with pytest.raises(OSError) as info:
        ckpt.torch_save({"x": torch.ones(10_000)}, tmp_path / "optimizer.pt")
    assert info.value.errno == errno.ENOSPC and str(tmp_path / "optimizer.pt") in str(info.value)
    assert ckpt.disk_full_errno(RuntimeError("Error while serializing: I/O error: No space left on device "
                                             "(os error 28)")) == errno.ENOSPC  # safetensors' message
    assert ckpt.disk_full_errno(OSError(errno.EDQUOT, "Disk quota exceeded")) == errno.EDQUOT
    assert ckpt.disk_full_errno(RuntimeError("unexpected pos 704 vs 598")) is None


def test_stale_temporaries_are_removed_and_an_interrupted_replacement_put_back(tmp_path):
    _save(tmp_path, 2)
    root = tmp_path / "checkpoints"
    (root / ".step_00000004.tmp-4242").mkdir()
    (root / ".step_00000004.tmp-4242" / "weights.safetensors").write_bytes(b"x" * 3000)
    (root / ".step_00000006.tmp-sharded" / "dcp").mkdir(parents=True)
    # killed between moving step 8 aside and renaming its replacement into place
    os.replace(_save(tmp_path, 8), root / ".step_00000008.old-4242")
    done = ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000008"]
    assert any("removed .step_00000004.tmp-4242 (2.9 KB)" in d for d in done)
    assert any("restored step_00000008" in d for d in done)
    assert ckpt.load_checkpoint(root / "step_00000008")["step"] == 8


# ------------------------------------------------------------------------------------------------
# the metrics log and the report on resume
# ------------------------------------------------------------------------------------------------

def test_a_torn_last_line_and_lines_past_the_checkpoint_are_dropped_with_a_warning(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    warned = []
    with report.MetricsLog(tmp_path, tensorboard=False, resume_step=4, warn=warned.append) as m:
        m.log(5, {"loss": 9.0})
    assert [(r["step"], r["loss"]) for r in report.read_metrics(log)] == [(1, .1), (2, .2), (3, .3), (4, .4), (5, 9.)]
    assert any("its last line is torn" in w for w in warned)
    assert any("dropped 1 record(s) past the checkpoint (steps 5..5)" in w for w in warned)
    # a deleted log is recreated, saying what was lost
    log.unlink()
    warned.clear()
    with report.MetricsLog(tmp_path, tensorboard=False, resume_step=4, warn=warned.append) as m:
        m.log(5, {"loss": 1.0})
    assert [r["step"] for r in report.read_metrics(log)] == [5]
    assert warned == [f"{log} is missing: the records of steps 0..4 are lost (TensorBoard's tb/ may still hold their "
                      f"scalars); the log restarts at step 5"]
    # a log that ends before the checkpoint says which steps are lost
    warned.clear()
    with report.MetricsLog(tmp_path, tensorboard=False, resume_step=7, warn=warned.append):
        pass
    assert warned == [f"{log}: ends at step 5 but the checkpoint is at step 7: the records of steps 6..7 are lost"]


def test_report_files_of_the_abandoned_steps_are_discarded(tmp_path):
    for name in ("eval/step_000000.json", "eval/step_000004.json", "eval/step_000006.json", "clips/step_000006_00.gif",
                 "credit_step_000004.png", "credit_step_000008.png", "rewards.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    removed = report.discard_report_files_after(tmp_path, 4)
    assert sorted(p.name for p in removed) == ["credit_step_000008.png", "step_000006.json", "step_000006_00.gif"]
    assert (tmp_path / "eval" / "step_000004.json").is_file() and (tmp_path / "rewards.png").is_file()


# ------------------------------------------------------------------------------------------------
# the run lock
# ------------------------------------------------------------------------------------------------

def test_the_run_lock_names_its_holder_and_is_released(tmp_path):
    with runlock.acquire(tmp_path) as lock:
        assert lock.held and runlock.holder(tmp_path)["pid"] == os.getpid()
        with pytest.raises(runlock.RunLockError) as info:
            runlock.acquire(tmp_path)
        msg = str(info.value)
        assert f"in use by another run (pid {os.getpid()} on host {socket.gethostname()}, started " in msg
        assert str(tmp_path / runlock.LOCK_NAME) in msg
    assert not (tmp_path / runlock.LOCK_NAME).exists()  # released: the file is gone
    runlock.acquire(tmp_path).release()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    code = ("import sys, time; from otca_fast import runlock; runlock.acquire(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(runlock.RunLockError, match=f"pid {holder.pid} on host"):
            runlock.acquire(tmp_path)
    finally:
        holder.kill()  # kill -9: no clean-up ran, the lock file stays behind
        holder.wait(timeout=60)
    assert runlock.holder(tmp_path)["pid"] == holder.pid
    warned = []
    with runlock.acquire(tmp_path, warn=warned.append):
        assert runlock.holder(tmp_path)["pid"] == os.getpid()
    assert len(warned) == 1 and f"took over the lock of a run that is no longer running (pid {holder.pid}" in warned[0]


def test_the_run_lock_without_flock_judges_the_holder_by_its_process(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    lock_file = tmp_path / runlock.LOCK_NAME
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    for pid, host, taken in [(os.getppid(), socket.gethostname(), False), (dead.pid, socket.gethostname(), True),
                             (1234, "another-host", False)]:
        lock_file.write_text(json.dumps({"pid": pid, "host": host, "started": "2025-01-01T00:00:00"}))
        if taken:
            runlock.acquire(tmp_path).release()
        else:
            with pytest.raises(runlock.RunLockError, match=f"pid {pid} on host {host}"):
                runlock.acquire(tmp_path)


# ------------------------------------------------------------------------------------------------
# the reward worker and the stop signals
# ------------------------------------------------------------------------------------------------

def test_the_reward_worker_abandons_a_running_call():
    worker, started, release = RewardWorker(), threading.Event(), threading.Event()
    running = worker.submit(lambda: started.set() or release.wait(120))
    assert started.wait(60)
    queued = worker.submit(lambda: "never")
    worker.shutdown(wait=False, cancel_futures=True)  # returns at once: the running call is not waited for
    assert queued.cancelled() and not running.done()
    assert worker._thread.daemon  # the interpreter does not wait for it at exit either
    release.set()
    assert running.result(timeout=60) is True


def test_an_idle_reward_worker_is_joined_on_shutdown():
    """After a run that ended normally no daemon thread may outlive the trainer: one still alive at
    interpreter finalisation is killed where it stands and can abort a successful process."""
    worker = RewardWorker()
    assert worker.submit(lambda: 7).result(timeout=60) == 7
    thread = worker._thread
    worker.shutdown(wait=False, cancel_futures=True)  # the trainer's close()
    assert not thread.is_alive()


def test_a_run_that_ends_normally_exits_0_with_no_thread_left(tmp_path):
    """The main job's own exit: every thread it started is gone before the interpreter finalises."""
    code = ("import sys, threading; from otca_fast import train; rc = train.main(sys.argv[1:]); "
            "left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]; "
            "print('threads left:', left); sys.exit(rc or (3 if left else 0))")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code, str(root / "configs" / "tiny_video.yaml"), "--set",
                           f"run.output_dir={tmp_path / 'run'}", "--set", "train.max_steps=1", "--set",
                           "eval.enabled=false", "--set", "run.progress=plain"],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "threads left: []" in proc.stdout


def test_stop_signals_record_the_first_signal_and_restore_the_handlers():
    said = []
    stop = StopSignals(announce=said.append)
    before = signal.getsignal(signal.SIGTERM)
    with stop.installed():
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handlers run in this (main) thread between bytecodes
            if len(said) == 2:
                break
            time.sleep(0.01)
    assert stop.requested == "SIGUSR1"
    assert said == ["got SIGUSR1: stopping at the next safe point, then checkpointing",
                    "got SIGTERM again: already stopping (the checkpoint is on its way)"]
    assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------------------------------------------
# the trainer: a damaged newest checkpoint, a torn or deleted log
# ------------------------------------------------------------------------------------------------

RUN = {"train.max_steps": 3, "train.checkpoint_every": 1, "eval.every": 0, "train.ema.update_every": 1}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """3 steps with a checkpoint after each, evaluations at the start and the end: what every damaged copy is
    compared with."""
    out = tmp_path_factory.mktemp("faults") / "full"
    assert main([str(TINY), *small(out, **RUN)]) == 0
    return out


def _copy_until(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst / "checkpoints" / "step_00000003"


@pytest.mark.parametrize("damage", ["truncated weights + torn log", "zero-filled optimizer + deleted log",
                                    "NaN-poisoned weights"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(uninterrupted, tmp_path, capsys, damage):
    out = tmp_path / "run"
    newest = _copy_until(uninterrupted, out)
    log = out / "metrics.jsonl"
    if damage.startswith("truncated"):
        _truncate(newest / "weights.safetensors")
        log.write_text(log.read_text() + '{"step": 4, "reward/to')
    elif damage.startswith("zero-filled"):
        _zero_fill(newest / "optimizer.pt")
        log.unlink()
    else:
        _poison(newest / "weights.safetensors")
    assert main([str(TINY), *small(out, **RUN), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint step_00000003 is damaged, skipped" in err
    assert {"truncated": "weights.safetensors", "zero-filled": "optimizer.pt: unreadable",
            "NaN-poisoned": "holds 1 NaN"}[damage.split()[0]] in err
    assert "moved the damaged checkpoint step_00000003 aside to step_00000003.damaged" in err
    assert (out / "checkpoints" / "step_00000003.damaged").is_dir()
    assert "resumed from" in err and "step_00000002 (step 2)" in err
    # the evaluation of the abandoned step 3 was discarded, then written again by the resumed run
    removed = err[err.index("file(s) of the steps after the checkpoint (step 2): "):].splitlines()[0]
    assert all(name in removed for name in ("step_000003.json", "step_000003_00.gif", "credit_step_000003.png"))
    assert_same_state(ckpt.load_checkpoint(uninterrupted / "checkpoints" / "step_00000003"),
                      ckpt.load_checkpoint(out / "checkpoints" / "step_00000003"))
    for name in ("step_000000.json", "step_000003.json"):
        assert (json.loads((out / "report" / "eval" / name).read_text())
                == json.loads((uninterrupted / "report" / "eval" / name).read_text()))
    if damage.startswith("zero-filled"):  # the history before the checkpoint is gone, and the run said so
        assert "metrics.jsonl is missing: the records of steps 0..2 are lost" in err
        assert _comparable(records(out)) == _comparable([r for r in records(uninterrupted) if r["step"] == 3])
    else:
        assert _comparable(records(out)) == _comparable(records(uninterrupted))
        assert ("its last line is torn" in err) == damage.startswith("truncated")


def test_resume_with_no_valid_checkpoint_is_one_line_naming_the_files(uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    _copy_until(uninterrupted, out)
    for step, f in [(1, "state.pt"), (2, "weights.safetensors"), (3, "optimizer.pt")]:
        _truncate(out / "checkpoints" / f"step_{step:08d}" / f)
    assert main([str(TINY), *small(out, **RUN), "--resume"]) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("otca-train: ")][-1]
    assert line.startswith(f"otca-train: --resume: no valid checkpoint in {out / 'checkpoints'}: step_00000003: ")
    assert all(f in line for f in ("step_00000001/state.pt", "step_00000002/weights.safetensors",
                                   "step_00000003/optimizer.pt"))
    assert not list((out / "checkpoints").glob("*.damaged"))  # nothing is moved when nothing loads


# ------------------------------------------------------------------------------------------------
# the trainer: non-finite weights, a full disk, two runs in one directory, leftovers
# ------------------------------------------------------------------------------------------------

def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch, capsys):
    out = tmp_path / "nan"
    # leftovers of an earlier, killed run: a stale lock and the temporary directory of a write
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    (out / runlock.LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    (out / "checkpoints" / ".step_00000007.tmp-99999").mkdir(parents=True)
    real = Trainer.update

    def poisoning(self, step, *args, **kwargs):
        stats = real(self, step, *args, **kwargs)
        if step == 2:
            with torch.no_grad():
                next(iter(self.named_trainable.values())).view(-1)[0] = float("nan")
        return stats

    monkeypatch.setattr(Trainer, "update", poisoning)
    assert main([str(TINY), *small(out, **{"eval.enabled": False})]) == 1
    err = capsys.readouterr().err
    assert f"took over the lock of a run that is no longer running (pid {dead.pid}" in err
    assert "removed .step_00000007.tmp-99999" in err
    assert "training stopped: step 2: checkpoint" in err and "not written: weights[" in err and "holds 1 NaN" in err
    assert "latest checkpoint: " in err and "step_00000001" in err
    assert [s for s, _ in ckpt.checkpoint_dirs(out)] == [1]
    assert not (out / runlock.LOCK_NAME).exists()


def test_a_full_disk_stops_training_naming_the_path_and_the_space_needed(tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    real = ckpt.save_file

    def filling(tensors, filename, metadata=None):
        if "step_00000002" in filename:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", filling)
    assert main([str(TINY), *small(out, **{"eval.enabled": False})]) == 1
    err = " ".join(capsys.readouterr().err.split())  # unwrapped
    assert f"no space left on device writing checkpoint {out / 'checkpoints' / 'step_00000002'}: it needs about" in err
    assert "is free there" in err and "step_00000001" in err and "continue with --resume" in err
    assert [s for s, _ in ckpt.checkpoint_dirs(out)] == [1]
    assert not list((out / "checkpoints").glob(".*"))


def test_a_second_run_into_a_busy_directory_fails_at_once_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "busy"
    cfg_args = small(out, **{"train.max_steps": 1, "eval.enabled": False})
    assert main([str(TINY), *cfg_args]) == 0
    from test_trainer import cfg_of

    with Trainer(cfg_of(out, **{"train.max_steps": 2, "eval.enabled": False}), resume=True):
        for extra in ([], ["--overwrite"], ["--resume"]):
            assert main([str(TINY), *cfg_args, *extra]) == 2
            err = capsys.readouterr().err
            assert f"is in use by another run (pid {os.getpid()} on host {socket.gethostname()}, started" in err
        assert [s for s, _ in ckpt.checkpoint_dirs(out)] == [1]  # --overwrite deleted nothing
    assert main([str(TINY), *cfg_args, "--overwrite"]) == 0  # released with the trainer


def test_ctrl_c_advice_is_true_without_a_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "early"

    def interrupted(self, step, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "update", interrupted)
    assert main([str(TINY), *small(out, **{"eval.enabled": False})]) == 130
    err = capsys.readouterr().err
    assert "interrupted during step 1; no checkpoint was written yet" in err and "continue with --resume" not in err
    monkeypatch.undo()
    # the advice works; --auto-resume (one command for a requeued job) starts a new run here, there is no checkpoint
    assert main([str(TINY), *small(out, **{"eval.enabled": False, "train.max_steps": 1}), "--auto-resume"]) == 0
    assert [s for s, _ in ckpt.checkpoint_dirs(out)] == [1] and "resumed from" not in capsys.readouterr().err
    assert main([str(TINY), *small(out, **{"eval.enabled": False, "train.max_steps": 1}), "--auto-resume",
                 "--overwrite"]) == 2


def _sigint_as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_a_slow_reward_exits_within_seconds(tmp_path):
    """A reward that never returns: Ctrl-C must still end the process (the call is abandoned)."""
    out, marker = tmp_path / "slow", tmp_path / "in_reward"
    reward = [{"name": "test_faults:StuckReward", "weight": 1.0, "options": {"marker": str(marker)}}]
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    # Ctrl-C as a terminal delivers it: a suite started in the background (`nohup .ci/run &`) runs with SIGINT
    # ignored, and a child inherits that, so Python would never install its KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, "-m", "otca_fast.train", str(TINY),
                             *small(out, **{"rewards": reward, "eval.enabled": False})],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_from_a_terminal)
    try:
        for _ in range(600):  # bounded: until the reward is running (or the process died)
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.5)
        assert marker.exists(), proc.communicate(timeout=60)[1][-3000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)  # a generous bound: the reward itself never returns
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted during step 1; no checkpoint was written yet" in err and "Traceback" not in err


def test_a_second_ctrl_c_during_the_clean_up_exits_at_once_without_a_traceback():
    code = ("import os, signal, time; from otca_fast import train; train._exit_on_a_second_interrupt(); "
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(60)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 130 and proc.stderr == "otca-train: interrupted again: exiting now\n"


class StuckReward:
    """A reward that signals it has started (a marker file), then never returns."""

    def __init__(self, marker: str):
        self.marker = Path(marker)

    def __call__(self, frames, prompts):
        self.marker.write_text("scoring")
        threading.Event().wait()


# ------------------------------------------------------------------------------------------------
# the trainer: SIGTERM / SIGUSR1 (preemption) at each kind of stop point, then resume bit for bit
# ------------------------------------------------------------------------------------------------

# 3 steps of 2 optimizer updates each (4 samples in 2 chunks), evaluations at the start and the end, and
# no checkpoint before the end: whatever a stop saves is more than the schedule would have
STOP_RUN = {"train.max_steps": 3, "train.checkpoint_every": 100, "eval.every": 0, "train.updates_per_step": 2,
            "sample.batch_size": 2, "train.ema.update_every": 1}


@pytest.fixture(scope="module")
def never_stopped(tmp_path_factory):
    out = tmp_path_factory.mktemp("stops") / "full"
    assert main([str(TINY), *small(out, **STOP_RUN)]) == 0
    return out


def _signal_self(name: str) -> None:
    os.kill(os.getpid(), getattr(signal, name))


def _stop_in_rollout(monkeypatch, sig="SIGTERM"):
    real = Trainer.rollout

    def rollout(self, step, prompts):
        if step == 1:
            _signal_self(sig)  # handled at once (this thread); the first denoising step is a stop point
        return real(self, step, prompts)

    monkeypatch.setattr(Trainer, "rollout", rollout)


_ABANDONED = threading.Event()
_OUTCOME: list[bool] = []


def _stop_while_waiting_for_rewards(monkeypatch, sig="SIGUSR1"):
    real, calls = Trainer._score, []

    def score(self, frames, prompts, *, step):
        calls.append(step)
        if calls.count(2) == 2:  # the last chunk of step 2: the rollout waits for it
            _signal_self(sig)
            _OUTCOME.append(_ABANDONED.wait(120))  # set by the test once main() returned
        return real(self, frames, prompts, step=step)

    monkeypatch.setattr(Trainer, "_score", score)


def _stop_after_the_first_update(monkeypatch, sig="SIGTERM"):
    real_build, steps = trainer_module.build_optimizer, []

    def build(params, config):
        opt = real_build(params, config)
        real_step = opt.step

        def step(*args, **kwargs):
            out = real_step(*args, **kwargs)
            steps.append(1)
            if len(steps) == 3:  # step 2's first update: the step is finished, then checkpointed
                _signal_self(sig)
            return out

        opt.step = step
        return opt

    monkeypatch.setattr(trainer_module, "build_optimizer", build)


def _stop_in_evaluation(monkeypatch, sig="SIGTERM"):
    real = Trainer.evaluate

    def evaluate(self, step):
        if step == 3:
            _signal_self(sig)
        return real(self, step)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)


@pytest.mark.parametrize("where, arrange, expected, saved", [
    ("rollout", _stop_in_rollout, "stopped by SIGTERM during step 1 (abandoned", 0),
    ("reward wait", _stop_while_waiting_for_rewards, "stopped by SIGUSR1 during step 2 (abandoned", 1),
    ("update", _stop_after_the_first_update, "stopped by SIGTERM after step 2", 2),
    ("evaluation", _stop_in_evaluation, "stopped by SIGTERM during the evaluation at step 3 (abandoned", 3),
])
def test_a_stop_signal_checkpoints_and_resume_is_bitwise_identical(never_stopped, tmp_path, monkeypatch, capsys,
                                                                   where, arrange, expected, saved):
    out = tmp_path / "stopped"
    arrange(monkeypatch)
    before = signal.getsignal(signal.SIGTERM)
    code = main([str(TINY), *small(out, **STOP_RUN)])
    if where == "reward wait":  # the stop did not wait for the reward call it interrupted
        _ABANDONED.set()
        for _ in range(600):
            if _OUTCOME:
                break
            time.sleep(0.1)
        assert _OUTCOME == [True]
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == EXIT_STOPPED, err[-3000:]
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are the caller's again
    assert expected in err and f"the state after step {saved} is checkpointed in" in err
    assert "continue with --resume" in err
    assert ckpt.latest_checkpoint(out).name == f"step_{saved:08d}"
    # the command of a requeued job: --auto-resume finds the checkpoint and resumes from it
    assert main([str(TINY), *small(out, **STOP_RUN), "--auto-resume"]) == 0
    assert f"resumed from {out / 'checkpoints' / f'step_{saved:08d}'}" in capsys.readouterr().err
    assert_same_state(ckpt.load_checkpoint(never_stopped / "checkpoints" / "step_00000003"),
                      ckpt.load_checkpoint(out / "checkpoints" / "step_00000003"))
    assert _comparable(records(out)) == _comparable(records(never_stopped))  # the evaluations included, once each
    for name in ("step_000000.json", "step_000003.json"):
        assert (json.loads((out / "report" / "eval" / name).read_text())
                == json.loads((never_stopped / "report" / "eval" / name).read_text()))
