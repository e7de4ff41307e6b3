"""JetLoader against h5py reads of the same jets: every layout, order and lifecycle case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jetfast.data.loader import JetLoader, chunk_aware_order
from jetfast.data.transforms import IntensityTransform, pad_to_model
from tests.jetfiles import write_jet_file


def reference(images, index, transform):
    ref = torch.from_numpy(np.ascontiguousarray(images[index]))
    return transform.to_model(ref) if transform is not None else pad_to_model(ref)


@pytest.mark.parametrize("backend", ["h5py"])
@pytest.mark.parametrize("layout", [dict(compression="lzf"), dict(compression="gzip", shuffle=True), dict(chunk=None)])
def test_matches_h5py(tmp_path, backend, layout):
    path = tmp_path / "jets.h5"
    images, labels = write_jet_file(path, n=101, seed=np.random.randint(1 << 30), **{"chunk": 7, **layout})
    transform = IntensityTransform.fit(images[:50])
    for t in (None, transform):
        loader = JetLoader(path, 16, transform=t, backend=backend)
        seen = []
        for batch in loader:
            index = batch["index"].numpy()
            seen.append(index)
            if t is None:
                assert torch.equal(batch["X_jets"], reference(images, index, None))
            else:
                torch.testing.assert_close(batch["X_jets"], reference(images, index, t), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(batch["y"].numpy(), labels[index])
        assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(101))


def test_order_is_a_permutation_and_deterministic():
    indices = np.arange(0, 1000, 3)
    a = chunk_aware_order(indices, 7, seed=5, epoch=2)
    assert np.array_equal(np.sort(a), indices)
    assert np.array_equal(a, chunk_aware_order(indices, 7, seed=5, epoch=2))
    assert not np.array_equal(a, chunk_aware_order(indices, 7, seed=5, epoch=3))
