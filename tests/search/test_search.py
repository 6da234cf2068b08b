"""SearchCallback, Choice and the estimator: behaviour on tiny models and small Trainers."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress.export import load_into, pack
from lightning_compress.export.latency import LatencyTable
from lightning_compress.search import Candidate, Choice, SearchCallback, estimator
from tests.callbacks.test_prune_ddp import run_two_ranks
from tests.helpers import EpochSeededSampler, TinyMLP, digest, make_trainer, random_classification

CANDIDATES = ["fp32", "int8", "int4", "s50-int8", "s75-int4"]


def search(**kwargs) -> SearchCallback:
    args = dict(
        candidates=CANDIDATES, budget=1e3, start="1ep", end="3ep", latency=LatencyTable(None, 1)
    )
    args.update(kwargs)
    return SearchCallback(**args)


# -- candidates and arguments ----------------------------------------------------------------


def test_candidate_weight_masks_then_quantizes_per_channel():
    w = torch.randn(6, 10)
    c = Candidate.parse("s75-int4")
    q = c.weight(w)
    assert (q != 0).sum() <= 15 and (q != 0).sum() >= 12  # 25% kept (rounding to zero may drop)
    kept = c.mask(w)
    assert torch.equal(kept, w.abs() >= w.abs().flatten().topk(15).values.min())
    # at most 15 levels (4 bits, symmetric) per row
    assert all(len(torch.unique(row)) <= 15 for row in q)
    assert Candidate.parse("fp32").weight(w) is w


@pytest.mark.parametrize(
    "names, match",
    [
        (["fp32", "int3"], "unknown candidate 'int3'"),
        (["fp32", "s90-fp32"], "sparse candidate is quantized"),
        (["int8"], "at least two candidates"),
        ("int8", "at least two candidates"),
        (["int8", "int8"], "listed twice"),
    ],
)
def test_bad_candidates_fail_in_init(names, match):
    with pytest.raises(ValueError, match=match):
        SearchCallback(candidates=names)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget": "half"}, "`budget` must be milliseconds"),
        ({"budget": -1.0}, "`budget` must be > 0"),
        ({"method": "random"}, "`method` must be one of"),
        ({"batch_size": 0}, "`batch_size` must be >= 1"),
        ({"arch_lr": 0.0}, "`arch_lr` must be > 0"),
        ({"overrides": {"fc1": ["fp32", "int9"]}}, "unknown candidate 'int9'"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchCallback(**kwargs)


def test_budget_below_the_fastest_configuration_fails_before_the_first_step(tmp_path):
    model = TinyMLP()
    before = digest(model.state_dict())
    trainer = make_trainer(tmp_path, [search(budget=1e-6)], max_epochs=1)
    with pytest.raises(ValueError, match=r"below the fastest configuration .* \(\d+\.\d+ ms"):
        trainer.fit(model)
    assert trainer.global_step == 0
    assert digest(model.state_dict()) == before


def test_budget_relative_to_a_missing_candidate_fails(tmp_path):
    cb = search(budget="0.5xint4", overrides={"fc3": ["fp32", "int8"]})
    with pytest.raises(ValueError, match=r"relative to 'int4', which is not a candidate of \['fc3"):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(TinyMLP())


def test_overrides_matching_nothing_fail(tmp_path):
    cb = search(overrides={"nothing": ["fp32", "int8"]})
    with pytest.raises(ValueError, match="nothing"):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(TinyMLP())


def test_end_before_start_fails(tmp_path):
    with pytest.raises(ValueError, match="must be after `start`"):
        make_trainer(tmp_path, [search(start="2ep", end="1ep")], max_epochs=3).fit(TinyMLP())


# -- the estimator -----------------------------------------------------------------------------


def test_gate_gradient_from_the_weight_gradient_equals_autograd_through_the_gates():
    torch.manual_seed(0)
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    w = torch.randn(3, 8)
    cands = [Candidate.parse(n) for n in ["fp32", "int4", "s50-int8"]]
    weights = [c.weight(w).detach() for c in cands]
    active = 1
    gates = torch.zeros(3, requires_grad=True)
    with torch.no_grad():
        gates[active] = 1.0
    # the mixed op of the paper: sum_j g_j o_j, with the one-hot gates
    out = sum(g * (x @ wj.T) for g, wj in zip(gates, weights, strict=True))
    F.cross_entropy(out, y).backward()
    # the callback's route: one backward through the sampled weight, then <dL/dW, W_j>
    wa = weights[active].clone().requires_grad_(True)
    F.cross_entropy(x @ wa.T, y).backward()
    ours = torch.stack([(wa.grad * wj).sum() for wj in weights])
    torch.testing.assert_close(ours, gates.grad)


def test_alpha_gradient_is_the_binary_gate_estimator():
    p = torch.softmax(torch.tensor([0.1, -0.3, 0.7], dtype=torch.float64), 0)
    g = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    want = torch.tensor(
        [sum(g[j] * p[j] * (float(i == j) - p[i]) for j in range(3)) for i in range(3)]
    )
    torch.testing.assert_close(estimator.alpha_grad(p, g), want)
    # the latency term: the gradient of sum_j p_j t_j in the logits
    alpha = torch.tensor([0.1, -0.3, 0.7], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    (torch.softmax(alpha, 0) * t).sum().backward()
    torch.testing.assert_close(estimator.latency_grad(p, t), alpha.grad)


def test_sampling_is_a_function_of_seed_and_step():
    probs = {"a": torch.tensor([0.2, 0.3, 0.5]), "b": torch.tensor([0.9, 0.1])}
    assert estimator.sample_paths(probs, 0, 7) == estimator.sample_paths(probs, 0, 7)
    draws = [tuple(estimator.sample_paths(probs, 0, s).values()) for s in range(400)]
    share = sum(d[0] == 2 for d in draws) / len(draws)
    assert 0.4 < share < 0.6  # follows the probabilities


def test_knapsack_is_optimal_against_brute_force():
    g = torch.Generator().manual_seed(3)
    loss = {n: torch.rand(4, generator=g).tolist() for n in "abc"}
    lat = {n: (torch.rand(4, generator=g) * 3).tolist() for n in "abc"}
    capacity = 4.0
    found = estimator.knapsack(loss, lat, capacity)
    assert sum(lat[n][i] for n, i in found.items()) <= capacity
    best = min(
        (sum(loss[n][i] for n, i in zip("abc", c, strict=True)), c)
        for c in itertools.product(range(4), repeat=3)
        if sum(lat[n][i] for n, i in zip("abc", c, strict=True)) <= capacity
    )
    assert sum(loss[n][i] for n, i in found.items()) <= best[0] + 0.02  # rounding to bins


def test_fit_budget_moves_the_most_probable_path_onto_the_budget():
    probs = {"a": torch.tensor([0.6, 0.4]), "b": torch.tensor([0.5, 0.5])}
    lat = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([3.0, 2.9])}
    chosen = estimator.fit_budget({"a": 0, "b": 0}, probs, lat, 0.0, 4.5)
    # b's switch costs no probability but saves too little; a's fits
    assert estimator.configuration_latency(chosen, lat, 0.0) <= 4.5


# -- training ----------------------------------------------------------------------------------


def test_search_chooses_within_budget_and_packs_the_trained_model(tmp_path):
    pl.seed_everything(0)
    model = TinyMLP()
    cb = search()
    probe = search(budget=1e3)
    # a budget between the fastest and the slowest configuration forces a compromise
    trainer = make_trainer(tmp_path, [probe], max_epochs=1)
    trainer.fit(TinyMLP())
    fastest = estimator.configuration_latency(
        {n: int(t.argmin()) for n, t in probe.latency.items()}, probe.latency, probe.overhead
    )
    slowest = estimator.configuration_latency(
        {n: int(t.argmax()) for n, t in probe.latency.items()}, probe.latency, probe.overhead
    )
    budget = (fastest + slowest) / 2
    cb = search(budget=budget, latency=probe.table_arg)
    make_trainer(tmp_path, [cb], max_epochs=5).fit(model)
    assert cb.choices is not None and set(cb.chosen()) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert cb.predicted_ms() <= budget + 1e-9
    # the architecture parameters moved during the search
    assert any(float(a.detach().abs().max()) > 1e-3 for a in cb.alpha.values())
    for name, label in cb.chosen().items():
        c = Candidate.parse(label)
        w = model.get_parameter(name)
        assert float((w == 0).float().mean()) >= c.sparsity - 1e-6  # held zeros
    x = torch.randn(7, 32)
    with torch.no_grad():
        trained = model(x)  # hooks on: what was trained
    cb.remove()
    if len(cb.record or ()):
        path = pack(model, tmp_path / "m.safetensors", qat=cb)
    else:
        path = pack(model, tmp_path / "m.safetensors", bits=None)
    load_into(model, path)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained, rtol=1e-4, atol=1e-4)


def test_the_latency_term_pushes_probability_to_faster_candidates(tmp_path):
    pl.seed_everything(0)
    table = LatencyTable(None, 1)
    cb = search(candidates=["fp32", "int8", "s75-int8"], budget=1e3, latency=table)
    make_trainer(tmp_path, [cb], max_epochs=1).fit(TinyMLP())
    # fake latencies: s75 far faster, budget tight; lambda rises and probability follows
    fast = SearchCallback(
        candidates=["fp32", "int8", "s75-int8"],
        budget=1e3,
        start=0,
        end="6ep",
        latency=table,
        arch_lr=0.05,
        dual_lr=0.5,
    )
    trainer = make_trainer(tmp_path, [fast], max_epochs=5)
    original = SearchCallback._measure

    def fake(self, trainer, pl_module):
        original(self, trainer, pl_module)
        self.latency = {
            n: torch.tensor([10.0, 9.0, 1.0], dtype=torch.float64) for n in self.latency
        }
        self.overhead = 0.0
        self.budget_arg = 5.0

    SearchCallback._measure = fake
    try:
        trainer.fit(TinyMLP())
    finally:
        SearchCallback._measure = original
    probs = fast.probabilities()
    assert fast.lam > 0
    assert all(float(p[2]) > 0.5 for p in probs.values()), probs


def test_resume_mid_search_reproduces_the_uninterrupted_run(tmp_path):
    def run(max_epochs, ckpt=None, root="a"):
        pl.seed_everything(0)
        cb = search(start="1ep", end="4ep")
        saver = ModelCheckpoint(dirpath=tmp_path / root, save_last=True, every_n_epochs=1)
        trainer = make_trainer(
            tmp_path / root, [cb, saver], max_epochs=max_epochs, enable_checkpointing=True
        )
        model = TinyMLP()
        trainer.fit(model, ckpt_path=ckpt)
        return cb, model

    full, full_model = run(6)
    run(2, root="b")
    resumed, resumed_model = run(6, ckpt=tmp_path / "b" / "last.ckpt", root="b")
    assert resumed.chosen() == full.chosen()
    assert digest(resumed.alpha) == digest(full.alpha)
    assert resumed.lam == full.lam
    torch.testing.assert_close(
        dict(resumed_model.named_parameters()), dict(full_model.named_parameters())
    )


def test_ddp_samples_the_same_paths_and_chooses_the_same_on_both_ranks(tmp_path):
    script = Path(__file__).with_name("ddp_search_script.py")
    records = run_two_ranks(tmp_path, "search", script)
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["paths"] == records[1]["paths"] and len(records[0]["paths"]) > 0
    assert records[0]["alpha"] == records[1]["alpha"]
    assert records[0]["latency"] == records[1]["latency"]
    assert records[0]["chosen"] == records[1]["chosen"]
    assert records[0]["weights"] == records[1]["weights"]


def test_greedy_measures_sensitivity_and_solves_the_knapsack(tmp_path):
    pl.seed_everything(0)
    model = TinyMLP()
    cb = search(method="greedy", end="2ep")
    make_trainer(tmp_path, [cb], max_epochs=3, limit_val_batches=2).fit(model)
    assert set(cb.sensitivity) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert all(s[0] == 0.0 for s in cb.sensitivity.values())  # fp32 loses nothing
    assert cb.predicted_ms() <= cb.budget + 1e-9


# -- architecture choices -------------------------------------------------------------------


class ChoiceNet(pl.LightningModule):
    def __init__(self, mismatched: bool = False) -> None:
        super().__init__()
        width = 6 if mismatched else 4
        self.conv = Choice(
            {
                "k3": nn.Conv2d(1, 4, 3, padding=1),
                "k5": nn.Conv2d(1, 4, 5, padding=2),
                "k3w": nn.Conv2d(1, width, 3, padding=1),
            }
        )
        self.head = nn.Linear(4 * 8 * 8, 4)
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x.view(-1, 1, 8, 8)[:, :, :, :]), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        data = random_classification(features=64)
        return DataLoader(data, batch_size=8, sampler=EpochSeededSampler(len(data)))


def test_choice_search_keeps_one_operation_loadable_into_the_plain_model(tmp_path):
    pl.seed_everything(0)
    model = ChoiceNet()
    cb = SearchCallback(
        candidates=None, budget=1e3, start=0, end="2ep", latency=LatencyTable(None, 1)
    )
    make_trainer(tmp_path, [cb], max_epochs=3).fit(model)
    label = model.conv.label
    assert label in {"k3", "k5", "k3w"} and cb.chosen() == {"conv": label}
    # the state dict is the plain architecture's
    plain = nn.Module()
    plain.conv = {
        "k3": nn.Conv2d(1, 4, 3, padding=1),
        "k5": nn.Conv2d(1, 4, 5, padding=2),
        "k3w": nn.Conv2d(1, 4, 3, padding=1),
    }[label]
    plain.head = nn.Linear(64 * 4, 4)
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain.head(torch.relu(plain.conv(x)).flatten(1)), model(x))


def test_choice_candidates_with_different_output_shapes_fail_before_the_first_step(tmp_path):
    cb = SearchCallback(candidates=None, budget=1e3, latency=LatencyTable(None, 1))
    with pytest.raises(ValueError, match="disagree in output shape"):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(ChoiceNet(mismatched=True))


def test_choice_needs_two_modules_and_known_labels():
    with pytest.raises(ValueError, match="at least two"):
        Choice([nn.Linear(2, 2)])
    c = Choice({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="unknown candidate 'z'"):
        c.choose("z")
