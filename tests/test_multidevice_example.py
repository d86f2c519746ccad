"""examples/data_parallel.py on 8 simulated devices matches a 1-device run of the same batch."""

import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.multidevice

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def test_data_parallel_loss_curve_matches_one_device():
    import data_parallel

    many = data_parallel.run(steps=12, seed=0, batch_size=32)
    one = data_parallel.run(steps=12, seed=0, n_devices=1, batch_size=32)
    assert many["devices"] == 8 and one["devices"] == 1
    np.testing.assert_allclose(many["losses"], one["losses"], rtol=1e-4)
    np.testing.assert_allclose(many["grad_norms"], one["grad_norms"], rtol=1e-4)
    assert many["losses"][-1] < many["losses"][0]  # it trains
    assert np.isfinite(many["grad_norms"]).all()
