"""The loss floor on a real network that cannot interpolate (docs/loss-floor.md): the figure's
script, run in its quick mode, and its agreement with torch.optim.SGD's measured floor.

Slow (trains the network, then 10,000 SGD steps): run with --runslow."""

import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


@pytest.mark.slow
def test_loss_floor_figure_script_and_agreement(tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "make_loss_floor_figure.py"
    spec = importlib.util.spec_from_file_location("make_loss_floor_figure", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    image = tmp_path / "loss_floor.png"
    result = module.main(["--quick", str(image)])
    assert image.stat().st_size > 10_000
    for row in result["rows"]:
        if row["fraction"] <= 0.5:
            # the target (10%), widened to 4 standard errors of the short quick run;
            # both schemes: independent batches against the exact floor, DataLoader(shuffle=True)
            # against the reshuffled estimate
            error = math.hypot(row["standard_error"], row["predicted_error"])
            tolerance = max(0.10 * row["predicted"], 4 * error)
            assert abs(row["measured"] - row["predicted"]) <= tolerance, row
    inverse = result["inverse"]
    assert inverse["lower"] <= inverse["upper"] <= inverse["lower"] * (1 + 1e-9)
    assert math.isfinite(result["minimum"]) and result["minimum"] > 0.05  # cannot interpolate
