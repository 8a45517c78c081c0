"""Training: a run killed mid-way resumes from its last epoch's checkpoint to exactly the weights of an unbroken run."""
from __future__ import annotations

import pytest
import torch

from prune2edge import models, train


class Killed(Exception):
    pass


def test_killed_training_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 3, 16, 16, generator=gen), torch.randint(0, 4, (300,), generator=gen)
    s = train.TrainSettings(epochs=3.5, batch_size=64, lr=0.05, schedule="onecycle")

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return models.build("small_cnn", (16, 16, 3), 4, width=8, depth=2)

    whole = fresh()
    expected = train.fit(whole, x, y, s, seed=1, augment="crop_flip", progress=False)

    def die_in_epoch_3(step: int, total: int) -> None:
        if step == 12:  # 5 steps an epoch: epochs 1 and 2 are checkpointed
            raise Killed

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Killed):
        train.fit(fresh(), x, y, s, seed=1, augment="crop_flip", after_step=die_in_epoch_3, checkpoint=ckpt, progress=False)
    assert ckpt.exists()
    resumed, ran = fresh(), []
    history = train.fit(resumed, x, y, s, seed=1, augment="crop_flip", checkpoint=ckpt, progress=False,
                        after_step=lambda step, total: ran.append(step))
    assert ran == list(range(11, 19))  # only what the checkpoint lacked: epoch 3 and the half epoch 4
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert [h["steps"] for h in history] == [h["steps"] for h in expected] == [5, 10, 15, 18]
    assert [h["train_loss"] for h in history] == pytest.approx([h["train_loss"] for h in expected])
    assert history[-1]["seconds"] >= history[1]["seconds"]


@pytest.mark.parametrize("kind", ["crop", "crop_flip"])
def test_batched_augmentation_equals_the_per_image_crop_and_flip(kind):
    x = torch.randn(40, 3, 20, 12, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(5)
    p = 20 // 8
    padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
    dy, dx = torch.randint(0, 2 * p + 1, (2, len(x)), generator=gen).tolist()
    flip = torch.rand(len(x), generator=gen) < 0.5 if kind == "crop_flip" else torch.zeros(len(x), dtype=torch.bool)
    expected = torch.stack([padded[i, :, dy[i]:dy[i] + 20, dx[i]:dx[i] + 12] for i in range(len(x))])
    expected = torch.where(flip[:, None, None, None], expected.flip(3), expected)
    got = train.augment_batch(x, kind, torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)
    assert not torch.equal(got, x)
