"""Prototype memory: refresh determinism, FAISS vs torch K-Means, kNN values, bank bounds."""

from __future__ import annotations

import pytest
import torch

from conftest import fill_memory, tiny_model
from modeling_fsgr_pma.modeling_fsgr_pma import faiss, kmeans, nearest_neighbours


def _blobs(num_clusters: int = 5, per_cluster: int = 60, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_clusters, dim, generator=generator) * 10
    points = centres.repeat_interleave(per_cluster, 0) + 0.1 * torch.randn(num_clusters * per_cluster, dim, generator=generator)
    return points, centres


def _match(found: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Each true centre's distance to its nearest found centroid."""
    return torch.cdist(truth, found).min(1).values


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=pytest.mark.skipif(faiss is None, reason="faiss"))])
def test_kmeans_finds_separated_clusters(backend):
    points, centres = _blobs()
    found = kmeans(points, 5, iters=30, seed=3, backend=backend)
    assert found.shape == (5, 8) and torch.isfinite(found).all()
    assert _match(found, centres).max() < 0.5


@pytest.mark.skipif(faiss is None, reason="faiss-cpu is a default dependency; this runs wherever it is installed")
def test_faiss_and_torch_kmeans_agree():
    points, _ = _blobs(seed=1)
    by_torch = kmeans(points, 5, iters=30, seed=0, backend="torch")
    by_faiss = kmeans(points, 5, iters=30, seed=0, backend="faiss")
    assert _match(by_torch, by_faiss).max() < 0.1
    knn_torch = nearest_neighbours(points, by_faiss, 4, backend="torch").sort(1).values
    knn_faiss = nearest_neighbours(points, by_faiss, 4, backend="faiss").sort(1).values
    assert torch.equal(knn_torch, knn_faiss)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_refresh_is_deterministic_for_a_seed(backend):
    prototypes = []
    for _ in range(2):
        model = tiny_model()
        fill_memory(model, seed=5)
        model.refresh_memory(seed=11, backend=backend)
        prototypes.append([(l.prototype_keys.clone(), l.prototype_values.clone()) for l in model.memory_layers()])
    for (k1, v1), (k2, v2) in zip(*prototypes):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_refresh_gives_m_finite_prototypes_and_knn_mean_values(model_with_memory):
    config = model_with_memory.config
    for layer in model_with_memory.memory_layers():
        assert layer.prototype_ready.item()
        assert layer.prototype_keys.shape == (config.num_prototypes, config.hidden_size)
        assert torch.isfinite(layer.prototype_keys).all() and torch.isfinite(layer.prototype_values).all()
        keys, values = layer.bank_contents()
        neighbours = torch.cdist(layer.prototype_keys.float(), keys.float()).topk(config.memory_knn, largest=False).indices
        torch.testing.assert_close(layer.prototype_values.float(), values.float()[neighbours].mean(1))


def test_different_seeds_give_different_first_prototypes():
    first, second = tiny_model(), tiny_model()
    fill_memory(first, seed=0)
    first_keys = first.memory_layers()[0].prototype_keys.clone()
    fill_memory(second, seed=0)  # the same banks...
    second.memory_layers()[0].prototype_ready.fill_(False)
    second.refresh_memory(seed=99, backend="torch")  # ...clustered from another k-means++ draw
    assert not torch.equal(first_keys, second.memory_layers()[0].prototype_keys)


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=pytest.mark.skipif(faiss is None, reason="faiss"))])
def test_later_refreshes_start_from_the_current_prototypes(backend):
    """A warm start: K-Means begins at the current keys, so the seed no longer matters and prototype j stays put."""
    model = tiny_model()
    fill_memory(model)
    layer = model.memory_layers()[0]
    keys, values = layer.bank_contents()
    layer.refresh_prototypes(keys, values, seed=1, backend=backend)
    settled = layer.prototype_keys.clone()
    expected = kmeans(keys, len(settled), model.config.memory_kmeans_iters, seed=0, backend=backend, init=settled)
    layer.refresh_prototypes(keys, values, seed=123, backend=backend)
    torch.testing.assert_close(layer.prototype_keys, expected)
    # Each prototype is still nearest to the centroid it came from: no relabelling between refreshes.
    assert torch.equal(torch.cdist(layer.prototype_keys, settled).argmin(1), torch.arange(len(settled)))


def test_kmeans_init_of_the_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="init must have shape"):
        kmeans(torch.randn(20, 4), 3, iters=2, seed=0, backend="torch", init=torch.zeros(2, 4))


def test_layers_are_seeded_apart():
    model = tiny_model()
    fill_memory(model)
    first, second = model.memory_layers()
    keys, values = first.bank_contents()
    second.refresh_prototypes(keys, values, seed=0, backend="torch")
    first.refresh_prototypes(keys, values, seed=0, backend="torch")
    assert not torch.equal(first.prototype_keys, second.prototype_keys)  # same data, seeds 0 and 1


def test_half_precision_bank_storage_with_prototypes_in_the_model_dtype():
    model = tiny_model(prototype_dtype="float16")
    fill_memory(model)
    layer = model.memory_layers()[0]
    assert layer.bank_keys.dtype == torch.float16 and layer.prototype_keys.dtype == torch.float32  # read every step
    assert layer.bank_nbytes() == 2 * model.config.memory_bank_size * model.config.hidden_size * 2


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown K-Means backend 'sklearn'"):
        kmeans(torch.randn(20, 4), 3, iters=2, seed=0, backend="sklearn")
