"""wandb beside TensorBoard (``run.wandb``), in offline mode: the same scalars as metrics.jsonl, the report
images and the evaluation clips, one wandb run continued by ``--resume``. The offline run file is read back
record by record (wandb's transaction log: LevelDB-style 32 KiB blocks of framed protobuf ``Record``s)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from test_trainer import TINY, records, small

from otca_fast.train import main

wandb = pytest.importorskip("wandb")


def offline_records(path: Path):
    """The protobuf records of an offline run file (``run-<id>.wandb``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    block, pos, pending = 32768, 7, b""   # a 7-byte file header, then records framed as in LevelDB's log
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:   # too little room left for a frame header: the block is padded
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:   # zero padding up to the next block
            pos += (block - pos % block) % block
            continue
        pending = chunk if kind in (1, 2) else pending + chunk   # FULL / FIRST start, MIDDLE / LAST continue
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def history(path: Path) -> tuple[dict, dict[int, dict]]:
    """The run record (project, tags, id) and the logged values by step."""
    run, steps = {}, {}
    for record in offline_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"project": record.run.project, "tags": list(record.run.tags), "id": record.run.run_id}
        elif kind == "history":
            values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                      for item in record.history.item}
            steps.setdefault(record.history.step.num, {}).update(values)
    return run, steps


def test_offline_wandb_logs_the_scalars_images_and_clips_and_resume_continues_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    extra = {"run.wandb.mode": "offline", "run.wandb.project": "otca-test", "run.wandb.tags": ["ci", "tiny"],
             "train.max_steps": 1, "eval.every": 1, "eval.max_clips": 1}
    assert main([str(TINY), *small(out, **extra)]) == 0
    assert main([str(TINY), *small(out, **{**extra, "train.max_steps": 2}), "--resume"]) == 0

    run_id = (out / "wandb_id").read_text().strip()
    files = sorted((tmp_path / "wandb_dir" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2   # the first run and its resumption: one wandb run id
    logged: dict[int, dict] = {}
    for f in files:
        run, steps = history(f)
        assert run == {"project": "otca-test", "tags": ["ci", "tiny"], "id": run_id}
        for step, values in steps.items():
            logged.setdefault(step, {}).update(values)
    # the same scalars as metrics.jsonl, step for step (lists, like credit/step_profile, stay in the jsonl)
    for record in records(out):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert logged[record["step"]][key] == pytest.approx(value, rel=1e-12), (record["step"], key)
    assert {"loss", "reward/shapes_quality", "eval/reward/total", "eval/metric/shapes_exam/all_correct"} <= \
        set(logged[1]) | set(logged[2])
    # the report images (written at the end of each run) and the evaluation clips (MP4)
    for step in (1, 2):
        for tag in ("report/rewards", "report/training", "report/credit"):
            assert logged[step][f"{tag}/_type"] == "image-file", (step, tag)
    for step in (0, 1, 2):
        assert logged[step]["eval/clip_00/_type"] == "video-file"
        assert logged[step]["eval/clip_00/path"].endswith(".mp4")
    # the media files themselves are in the offline runs, ready for `wandb sync`
    for step, tag in ((2, "eval/clip_00"), (2, "report/rewards")):
        copies = [f.parent / "files" / logged[step][f"{tag}/path"] for f in files]
        assert any(c.is_file() and c.stat().st_size > 0 for c in copies), copies

