"""A fit interrupted after any epoch continues from its checkpoint exactly as if it had never
stopped (CPU: bit for bit), and a loss that explodes stops the run with its reason."""

import math

import pytest
import torch

from maskcls.checkpoint import CheckpointFile
from maskcls.train import Course, Diverged, fit, load_data

# Every random stream a fit draws from: sample order (oversampling), device augmentation,
# CutMix/Mixup decisions, dropout; and every stateful part: AdamW, a warm-up + plateau schedule.
RECIPE = {
    "train.epochs": 4,
    "optim.name": "adamw",
    "sampler.name": "oversample",
    "augment.policy": "medium",
    "augment.cutmix_p": 0.5,
    "augment.mixup_p": 0.3,
    "model.dropout": 0.3,
    "schedule.name": "plateau",
    "schedule.warmup_epochs": 1,
    "schedule.patience": 0,
}


class Interrupted(Exception):
    pass


def stop_after(epoch_to_stop):
    def on_epoch(epoch, metrics):
        if epoch == epoch_to_stop:
            raise Interrupted  # as a kill would, once the checkpoint of this epoch is written

    return on_epoch


@pytest.fixture
def one_thread():
    """One CPU thread for the test, the process's own count again after it (no leak into others)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("stopped_at", [1, 2, 4])
def test_a_resumed_fit_ends_exactly_where_an_uninterrupted_one_does(
    tiny_cfg, tmp_path, stopped_at, one_thread
):
    cfg = tiny_cfg.override(RECIPE)
    data = load_data(cfg, progress=False)
    straight = fit(cfg, data, "cpu")

    first = CheckpointFile(tmp_path / "trial-0.pt")
    with pytest.raises(Interrupted):
        fit(cfg, data, "cpu", on_epoch=stop_after(stopped_at), checkpoint=first)
    assert torch.load(first.path, weights_only=True)["course"]["epoch"] == stopped_at

    retry = CheckpointFile(tmp_path / "trial-1.pt", resume_from=first.path)
    trained = []
    resumed = fit(cfg, data, "cpu", on_epoch=lambda e, m: trained.append(e), checkpoint=retry)
    assert trained == list(range(stopped_at + 1, cfg.train.epochs + 1))  # only the epochs left
    assert [h.val_macro_f1 for h in resumed.history] == [h.val_macro_f1 for h in straight.history]
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in straight.history]
    assert resumed.best_epoch == straight.best_epoch
    assert (resumed.val_probs == straight.val_probs).all()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    if trained:  # the retry's own file replaced its predecessor's: one file per chain of retries
        assert not first.path.exists() and retry.path.exists()
    retry.discard()
    assert not retry.path.exists() and not first.path.exists()


@pytest.mark.slow
def test_a_checkpoint_loads_with_weights_only(tiny_cfg, tmp_path):
    cfg = tiny_cfg.override({"train.epochs": 1})
    checkpoint = CheckpointFile(tmp_path / "c.pt", key="study t, recipe 1, cpu")
    fit(cfg, load_data(cfg, progress=False), "cpu", checkpoint=checkpoint)
    state = torch.load(checkpoint.path, weights_only=True)
    assert set(state) == {"course", "model", "optimizer", "schedule", "scaler", "rng", "key"}


@pytest.mark.slow
def test_only_a_predecessor_with_the_same_key_is_resumed(tiny_cfg, tmp_path):
    """A file left by another study, recipe or device type is never continued from; nor is a
    run's own file, which only an older study with the same trial numbers could have left."""
    cfg = tiny_cfg.override({"train.epochs": 2})
    data = load_data(cfg, progress=False)
    old = CheckpointFile(tmp_path / "trial-0.pt", key="recipe A")
    with pytest.raises(Interrupted):
        fit(cfg, data, "cpu", on_epoch=stop_after(1), checkpoint=old)
    assert CheckpointFile(tmp_path / "trial-1.pt", old.path, key="recipe A").peek() is not None
    assert CheckpointFile(tmp_path / "trial-1.pt", old.path, key="recipe B").peek() is None
    assert CheckpointFile(old.path, key="recipe A").peek() is None
    trained = []
    fit(cfg, data, "cpu", lambda e, m: trained.append(e), checkpoint=CheckpointFile(old.path, key="recipe A"))
    assert trained == [1, 2]


@pytest.mark.slow
def test_a_run_that_ran_out_of_patience_before_it_was_killed_stops_on_resume(tiny_cfg, tmp_path):
    cfg = tiny_cfg.override({"train.epochs": 8, "train.patience": 1, "optim.lr": 1e-2})
    data = load_data(cfg, progress=False)
    straight = fit(cfg, data, "cpu")
    assert straight.stop_reason.startswith("early stop")  # this recipe on this data stops early
    first = CheckpointFile(tmp_path / "trial-0.pt")
    with pytest.raises(Interrupted):  # killed after its last epoch's checkpoint
        fit(cfg, data, "cpu", on_epoch=stop_after(len(straight.history)), checkpoint=first)
    trained = []
    retry = CheckpointFile(tmp_path / "trial-1.pt", first.path)
    resumed = fit(cfg, data, "cpu", lambda e, m: trained.append(e), checkpoint=retry)
    assert trained == [] and resumed.stop_reason == straight.stop_reason
    assert len(resumed.history) == len(straight.history)


def test_an_exploding_loss_fails_even_while_finite():
    course = Course()
    course.check_loss(2.9, epoch=1, step=20)
    course.check_loss(250.0, epoch=1, step=40)  # 86x: bad, not yet diverged
    exploded = r"loss became 9e\+12 at epoch 2, step 20, over 100x its start \(2.9\)"
    with pytest.raises(Diverged, match=exploded):
        course.check_loss(9e12, epoch=2, step=20)
    with pytest.raises(Diverged, match=r"loss became nan at epoch 1, step 20; lower optim.lr"):
        Course().check_loss(math.nan, epoch=1, step=20)


@pytest.mark.slow
def test_adamw_at_a_huge_rate_with_clipping_stops_as_diverged(tiny_cfg):
    """The issue's case: clipping keeps the loss finite (9e12) while the run learns nothing."""
    cfg = tiny_cfg.override(
        {"train.epochs": 3, "optim.name": "adamw", "optim.lr": 1e4, "train.clip_grad": 1.0}
    )
    cfg = cfg.override({"schedule.warmup_epochs": 0})
    with pytest.raises(Diverged, match="loss became"):
        fit(cfg, load_data(cfg, progress=False), "cpu")
