"""DistributedDataParallel under torchrun: two Gloo processes on CPU, one MLflow run, one bundle."""

from __future__ import annotations

import pytest

from tests.helpers import TINY_ARGS, run_torchrun


@pytest.mark.slow
def test_torchrun_two_gloo_processes(tiny_dataset, tmp_path):
    proc = run_torchrun(
        "train", "--data", str(tiny_dataset), "--out", "run", "--epochs", "2", *TINY_ARGS,
        *("--set", "train.device=cpu"), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("bundle:") == 1, "only rank 0 reports"
    run_dir = tmp_path / "run"
    assert (run_dir / "bundle" / "model.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]

    import mlflow
    import torch

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("medseg").experiment_id])
    assert len(runs) == 1, "one MLflow run for all ranks"
    run = runs[0]
    assert run.data.params["world_size"] == "2"
    # 3 training cases over 2 ranks: each caches 2 (one repeated so both step together)
    assert run.data.params["train_cases_per_rank"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert len(client.get_metric_history(run.info.run_id, "val_dice")) == 2
    # the checkpoint holds both ranks' random streams, so a resume replays each rank exactly
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["world_size"] == 2
    assert len(state["ranks"]) == 2
    assert state["run_id"] == run.info.run_id
