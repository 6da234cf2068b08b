"""Trainer-free weight sharing: 1-D k-means, nearest centroids, index packing, SharedWeight."""

import pytest
import torch

from lightning_compress.quantization import QATConfig, SharedLayer
from lightning_compress.quantization import kmeans as km
from lightning_compress.quantization.kmeans import (
    SharedWeight,
    kmeans_1d,
    nearest,
    pack_indices,
    unpack_indices,
)


def _lloyd_reference(values, k, iters=km.KMEANS_ITERS):
    """Textbook Lloyd on every value (assignment matrix and all), linear initialisation."""
    c = torch.linspace(float(values.min()), float(values.max()), k, dtype=torch.float64)
    v = values.double()
    for _ in range(iters):
        assign = (v[:, None] - c[None, :]).abs().argmin(1)
        new = c.clone()
        for i in range(k):
            if (assign == i).any():
                new[i] = v[assign == i].mean()
        if torch.allclose(new, c, atol=0, rtol=0):
            break
        c = new
    return c.float()


@pytest.mark.parametrize("k", [2, 4, 16])
def test_kmeans_1d_is_lloyd_with_linear_initialisation(k):
    values = torch.randn(500, generator=torch.Generator().manual_seed(k)) ** 3
    centroids = kmeans_1d(values, k)
    assert torch.allclose(centroids, _lloyd_reference(values, k), atol=1e-5)
    assert torch.equal(centroids, centroids.sort().values)
    assert torch.equal(kmeans_1d(values, k), centroids)  # deterministic


def test_kmeans_1d_keeps_an_empty_centroid_and_refuses_too_few_values():
    centroids = kmeans_1d(torch.tensor([-1.0, -0.9, 0.9, 1.0]), 3)
    assert centroids.tolist() == pytest.approx([-0.95, 0.0, 0.95])  # the middle one stays
    with pytest.raises(ValueError, match="4 centroids need at least 4 values, got 3"):
        kmeans_1d(torch.ones(3), 4)


def test_nearest_handles_unsorted_centroids():
    centroids = torch.tensor([0.5, -1.0, 0.0])
    values = torch.tensor([-2.0, -0.6, -0.4, 0.2, 0.3, 9.0])
    assert nearest(values, centroids).tolist() == [1, 1, 2, 2, 0, 0]


@pytest.mark.parametrize("bits", range(1, 9))
def test_indices_pack_at_bits_per_index_and_round_trip(bits, monkeypatch):
    monkeypatch.setattr(km, "CHUNK", 64)  # several chunks, as a large layer has
    shape = (7, 37)
    indices = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits))
    packed = pack_indices(indices.to(torch.uint8), bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (7 * 37 * bits + 7) // 8
    assert torch.equal(unpack_indices(packed, bits, shape), indices.to(torch.uint8))


def test_packing_refuses_indices_wider_than_bits_and_a_wrong_size():
    with pytest.raises(ValueError, match="an index needs more than 2 bits"):
        pack_indices(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match=r"need 2 uint8 bytes for \(4,\) at 3 bits"):
        unpack_indices(torch.zeros(3, dtype=torch.uint8), 3, (4,))


@pytest.mark.parametrize(("groups", "bits"), [(1, 2), (2, 2), (6, 1)])
def test_chunked_gather_and_refresh_equal_the_whole_tensor_ones(groups, bits, monkeypatch):
    monkeypatch.setattr(km, "CHUNK", 10)  # chunks of one row, groups of several rows
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=g) * (torch.rand(6, 5, generator=g) > 0.3)
    shared = SharedWeight.cluster(weight, bits=bits, groups=groups)
    per_row = shared.codebook.detach().repeat_interleave(6 // groups, dim=0)
    expected = per_row.gather(1, shared.indices.long()) * (weight != 0)
    assert torch.equal(shared(weight).detach(), expected)
    for r in range(6):  # every non-zero weight at its group's nearest centroid
        book = per_row[r]
        for c in range(5):
            if weight[r, c] != 0:
                best = (book - weight[r, c]).abs().min()
                assert (book[int(shared.indices[r, c])] - weight[r, c]).abs() == best
    assert torch.all(shared.indices[weight == 0] == 0)


def test_refresh_counts_the_weights_that_changed_cluster_and_drops_new_zeros():
    weight = torch.tensor([[-1.0, -0.8, 0.7, 1.0]])
    shared = SharedWeight.cluster(weight, bits=1)
    assert shared.indices.tolist() == [[0, 0, 1, 1]]
    moved = torch.tensor([[-1.0, 0.95, 0.0, 1.0]])  # one crossed over, one was pruned
    assert shared.refresh(moved) == pytest.approx(1 / 3)
    assert shared.indices.tolist() == [[0, 1, 0, 1]]


def test_state_round_trips_and_the_record_dequantizes_to_the_forward(tmp_path):
    weight = torch.randn(8, 3, 2, 2) * (torch.rand(8, 3, 2, 2) > 0.5)
    shared = SharedWeight.cluster(weight, bits=3, groups=4)
    state = shared.state_dict()
    assert state["indices"].numel() == (96 * 3 + 7) // 8
    torch.save(state, tmp_path / "s.pt")
    again = SharedWeight.from_state(torch.load(tmp_path / "s.pt", weights_only=True), weight.shape)
    assert torch.equal(again.codebook, shared.codebook) and again.codebook.requires_grad
    assert torch.equal(again.indices, shared.indices)
    record = shared.record("conv.weight", weight)
    assert isinstance(record, SharedLayer) and record.groups == 4 and record.bits == 3
    assert torch.equal(record.dequantize(), shared(weight).detach())
    assert torch.equal(record.mask, weight != 0)


def test_cluster_names_the_group_without_enough_survivors():
    weight = torch.ones(4, 4)
    weight[2:, 1:] = 0  # the second group keeps 2 weights
    with pytest.raises(ValueError, match=r"w: 4 centroids \(2 bits\) need at least 4 .* group 1"):
        SharedWeight.cluster(weight, bits=2, groups=2, name="w")
    with pytest.raises(ValueError, match=r"`groups`=3 must divide the output channels of w \(4\)"):
        SharedWeight.cluster(weight, bits=1, groups=3, name="w")


def test_config_of_the_kmeans_scheme():
    config = QATConfig(scheme="kmeans", bits=1, groups=2, refresh="2ep", overrides={"fc3": 8})
    assert config.refresh.value == 2 and config.refresh.unit == "ep"
    assert config.state_key_fields()["scheme"] == "kmeans"
    assert "scheme" not in QATConfig().state_key_fields()
    with pytest.raises(ValueError, match=r"`overrides\['fc3'\]` must be an integer in \[1, 8\]"):
        QATConfig(scheme="kmeans", overrides={"fc3": 9})


def test_an_expanded_incoming_gradient_is_copied_not_written_into():
    weight = torch.nn.Parameter(torch.tensor([[0.0, -1.0, -0.9, 1.0], [1.1, 0.0, -1.0, 1.0]]))
    shared = SharedWeight.cluster(weight, bits=1)
    shared(weight).sum().backward()  # the gradient arrives as an expanded (stride-0) tensor
    assert shared.codebook.grad.tolist() == [[3.0, 3.0]]  # each centroid: the count of its weights
    assert weight.grad.tolist() == [[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0]]
