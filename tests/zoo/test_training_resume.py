"""A killed PRM training run resumes from its checkpoint to exactly the weights of an
uninterrupted run (every batch is a function of the seed and the step)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from itscale import zoo  # noqa: E402
from itscale.zoo import training  # noqa: E402
from itscale.zoo.recipes import PRMArgs  # noqa: E402

TINY = dict(n_problems=6, samples_per_problem=1, steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2,
            val_problems=3, threads=1, log_every=1)


class Killed(Exception):
    pass


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    whole = training.train_prm(zoo.policy_path(), tmp_path / "whole", PRMArgs(**TINY), log_file=open("/dev/null", "w"),
                               checkpoint_dir=tmp_path / "ckpt-whole")

    save = training.Checkpoint.save

    def save_then_die(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == 2:
            raise Killed

    monkeypatch.setattr(training.Checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        training.train_prm(zoo.policy_path(), tmp_path / "resumed", PRMArgs(**TINY), log_file=open("/dev/null", "w"),
                           checkpoint_dir=tmp_path / "ckpt")
    monkeypatch.setattr(training.Checkpoint, "save", save)
    assert not (tmp_path / "resumed").exists()
    with pytest.raises(training.TrainingSetupError, match="pass --resume"):
        training.train_prm(zoo.policy_path(), tmp_path / "resumed", PRMArgs(**TINY), checkpoint_dir=tmp_path / "ckpt")
    resumed = training.train_prm(zoo.policy_path(), tmp_path / "resumed", PRMArgs(**TINY),
                                 log_file=open("/dev/null", "w"), checkpoint_dir=tmp_path / "ckpt", resume=True)

    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in whole["history"]] == [h["loss"] for h in resumed["history"]]
    assert [v["step"] for v in resumed["val_history"]] == [0, 2, 4]
    recorded = json.loads((tmp_path / "resumed" / "training_args.json").read_text())
    assert recorded["environment"]["device"] == "cpu" and recorded["wall_time_s"] > 0
    assert recorded["args"]["steps"] == 4 and recorded["data"]["training_sequences"] == 16
    # the untrained start differs: training did change the weights
    start = load_file(zoo.policy_path() / "model.safetensors")
    assert not all(torch.equal(a[k], start[k]) for k in a)


@pytest.mark.slow
def test_stop_at_ends_a_run_early_and_resume_finishes_the_same_run(tmp_path):
    quiet = open("/dev/null", "w")
    whole = training.train_prm(zoo.policy_path(), tmp_path / "whole", PRMArgs(**TINY), log_file=quiet)
    stopped = training.train_prm(zoo.policy_path(), tmp_path / "stopped", PRMArgs(**TINY, stop_at=2), log_file=quiet,
                                 checkpoint_dir=tmp_path / "ckpt")
    assert len(stopped["history"]) == 2 and stopped["data"]["training_sequences"] == 8
    # the schedule spans all 4 steps: the stopped run's lr is the whole run's, step for step
    assert [h["lr"] for h in stopped["history"]] == [h["lr"] for h in whole["history"][:2]]
    with pytest.raises(training.TrainingSetupError, match="--stop-at 0"):
        training.train_prm(zoo.policy_path(), tmp_path / "x", PRMArgs(**TINY, stop_at=0), log_file=quiet)
    finished = training.train_prm(zoo.policy_path(), tmp_path / "finished", PRMArgs(**TINY), log_file=quiet,
                                  checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert finished["resumed"] == [{"step": 2, "stop_at": [2, None]}]

    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "finished"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in load_file(tmp_path / "stopped" / "model.safetensors").items())
