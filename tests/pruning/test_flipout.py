import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_compress import PruneCallback
from lightning_compress.pruning import CriterionContext, FlipCounter, get_criterion
from lightning_compress.pruning.masks import unstructured_masks

from ..helpers import TinyMLP, make_trainer


def test_score_is_magnitude_power_over_flips_plus_one():
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    flips = torch.tensor([0, 3, 0, 8], dtype=torch.int32)
    score = get_criterion("flipout")(w, CriterionContext("w", 0, state={"flips": flips}))
    assert torch.allclose(score, torch.tensor([1.0, 1.0, 0.25, 1.0]))
    cubed = get_criterion("flipout")(w, CriterionContext("w", 0, state={"flips": flips, "p": 3}))
    assert torch.allclose(cubed, torch.tensor([1.0, 2.0, 0.125, 3.0]))


def test_score_needs_flip_counts():
    with pytest.raises(ValueError, match="needs flip counts for 'w'"):
        get_criterion("flipout")(torch.ones(3), CriterionContext("w", 0))


def test_counts_sign_changes_across_steps_and_never_zeros():
    p = nn.Parameter(torch.tensor([1.0, -1.0, 0.0, -0.0, 2.0]))
    counter = FlipCounter({"w": p}, noise=0.0)
    for new in ([-1.0, -1.0, 0.0, -0.0, 2.0], [1.0, 1.0, 0.0, -0.0, 2.0]):
        with torch.no_grad():
            p.copy_(torch.tensor(new))
        counter.after_step()
    assert counter.flips["w"].tolist() == [2, 1, 0, 0, 0]


def test_noise_is_scaled_to_the_layer_seeded_by_step_and_masked():
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(200, 500))
    counter = FlipCounter({"w": p}, noise=1.0, seed=5)
    keep = torch.ones(200, 500)
    keep[:, :100] = 0

    def noisy(step):
        p.grad = torch.full((200, 500), 0.01) * keep
        norm = float(p.grad.norm())
        counter.add_noise(step, {"w": keep})
        return p.grad - 0.01 * keep, norm

    a, norm = noisy(3)
    b, _ = noisy(3)
    c, _ = noisy(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all(a[:, :100] == 0)
    assert a[:, 100:].std().item() == pytest.approx(norm / math.sqrt(p.numel()), rel=0.02)
    off = FlipCounter({"w": p}, noise=0.0)
    p.grad = torch.ones(200, 500)
    off.add_noise(3)
    assert torch.equal(p.grad, torch.ones(200, 500))


def test_reset_and_state_round_trip():
    p = nn.Parameter(torch.ones(2, 3))
    counter = FlipCounter({"w": p})
    counter.flips["w"] += 4
    counter.reset({"w": torch.tensor([[True, False, True], [False, True, True]])})
    assert counter.flips["w"].tolist() == [[4, 0, 4], [0, 4, 4]]
    other = FlipCounter({"w": p})
    other.load_state_dict(counter.state_dict())
    assert torch.equal(other.flips["w"], counter.flips["w"])
    with pytest.raises(ValueError, match="not tracked"):
        other.load_state_dict({"v": torch.zeros(2, 3, dtype=torch.int32)})
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({"w": torch.zeros(3, 2, dtype=torch.int32)})


class EventSpy:
    """A PruneCallback listener keeping the weights and flip counts each event scored."""

    def __init__(self):
        self.seen = []

    def on_prune_ready(self, trainer, pl_module, prune):
        pass

    def before_prune(self, trainer, pl_module, prune, step):
        self.seen.append(
            (
                {n: p.detach().clone() for n, p in prune.masks.params.items()},
                {n: f.clone() for n, f in prune.flips.flips.items()},
                {n: prune.masks.keep_mask(n) for n in prune.targets},
            )
        )

    def after_prune(self, trainer, pl_module, prune, step):
        pass


def test_callback_halves_the_survivors_by_flip_scores(tmp_path):
    pl.seed_everything(0)
    prune = PruneCallback(
        sparsity=0.875,
        schedule="iterative",
        rate=0.5,
        start="1ep",
        every="1ep",
        criterion="flipout",
    )
    spy = EventSpy()

    class Spying(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            prune.add_listener(spy)

    trainer = make_trainer(tmp_path, [prune, Spying()], max_epochs=4)
    trainer.fit(TinyMLP())
    assert len(spy.seen) == 3
    assert sum(int(f.sum()) for f in spy.seen[0][1].values()) > 0  # flips were counted
    totals = []
    for k, (weights, flips, current) in enumerate(spy.seen):
        scores = {n: weights[n].abs() ** 2 / (flips[n] + 1.0) for n in weights}
        target = 1 - 0.5 ** (k + 1)
        expected = unstructured_masks(
            scores, current, dict.fromkeys(weights, target), [list(weights)]
        )
        following = spy.seen[k + 1][2] if k + 1 < len(spy.seen) else prune.masks.keep_masks()
        for n in weights:
            assert torch.equal(following[n], expected[n]), (k, n)
        totals.append(sum(int(m.sum()) for m in following.values()))
    assert totals == [800, 400, 200]
    # Flip counts of pruned weights were reset; the checkpoint holds them.
    for n, f in prune.flips.flips.items():
        assert torch.all(f[~prune.masks.keep_mask(n)] == 0)
    trainer.save_checkpoint(tmp_path / "f.ckpt")
    state = torch.load(tmp_path / "f.ckpt", weights_only=True)["callbacks"][prune.state_key]
    assert torch.equal(state["flips"]["fc1.weight"], prune.flips.flips["fc1.weight"].cpu())
