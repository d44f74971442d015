"""issue 22 item 1: fastsgdstab.torch.StabilityMonitor. Its records equal direct library calls on
the same parameters, training's numbers are the same with and without it (bit for bit, with
dropout: the RNG is restored), and it warns once past the edge."""

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fastsgdstab import critical_batch_size, critical_lr  # noqa: E402
from fastsgdstab.torch import (  # noqa: E402
    MONITOR_FIELDS,
    EdgeOfStabilityWarning,
    StabilityMonitor,
    family_from_model,
)

D = torch.float64


pytestmark = pytest.mark.filterwarnings("ignore::fastsgdstab.torch.GaussNewtonWarning")


def _setup(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    X = torch.randn(12, 3, dtype=D)
    y = torch.sin(X.sum(1, keepdim=True))
    layers = [torch.nn.Linear(3, 8), torch.nn.Tanh()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    model = torch.nn.Sequential(*layers, torch.nn.Linear(8, 1)).to(D)
    return model, X, y


def _train(model, X, y, optimizer, steps, monitor=None, snapshots=None):
    mse = torch.nn.MSELoss()
    losses = []
    torch.manual_seed(123)
    for step in range(steps):
        index = torch.randperm(12)[:4]
        optimizer.zero_grad()
        value = mse(model(X[index]), y[index])
        value.backward()
        optimizer.step()
        losses.append(value.item())
        if monitor is not None:
            if snapshots is not None and step % monitor.every == 0:
                snapshots.append(copy.deepcopy(model))
            monitor.step(step)
    return losses


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, True)])
def test_monitor_records_equal_direct_calls(momentum, nesterov):
    model, X, y = _setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum, nesterov=nesterov)
    monitor = StabilityMonitor(model, X, y, torch.nn.MSELoss(), every=4, batch_size=4,
                               optimizer=optimizer)
    snapshots = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EdgeOfStabilityWarning)
        _train(model, X, y, optimizer, 9, monitor, snapshots)
    assert [row["step"] for row in monitor.rows] == [0, 4, 8]
    for row, snapshot in zip(monitor.rows, snapshots):
        result = family_from_model(snapshot, X, y, torch.nn.MSELoss(), check_gauss_newton=False)
        options = {"sampling": "without_replacement", "momentum": momentum, "nesterov": nesterov}
        eta = critical_lr(result.family, 4, **options)
        assert row["critical_lr"] == pytest.approx(eta, rel=1e-12)
        assert row["lr_over_critical"] == pytest.approx(0.05 / eta, rel=1e-12)
        assert row["critical_batch_size"] == pytest.approx(
            critical_batch_size(result.family, 0.05, **options), rel=1e-12)
        assert row["sharpness"] == pytest.approx(result.family.sharpness(), rel=1e-12)
        assert row["gradient_norm"] == pytest.approx(result.gradient_norm, rel=1e-12)
        assert row["loss"] == pytest.approx(result.loss, rel=1e-12)
        assert (row["lr"], row["momentum"], row["nesterov"]) == (0.05, momentum, nesterov)
    table = monitor.history
    assert list(table.columns) == list(MONITOR_FIELDS) and len(table) == 3


def test_monitor_does_not_change_training():
    """Dropout in training mode draws from the global RNG: with the monitor in the loop the
    losses and final parameters are bit-identical, and the model is left in training mode."""
    runs = []
    for with_monitor in (False, True):
        model, X, y = _setup(dropout=0.3)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
        monitor = StabilityMonitor(model, X, y, torch.nn.MSELoss(), every=2, batch_size=4,
                                   optimizer=optimizer) if with_monitor else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EdgeOfStabilityWarning)
            losses = _train(model, X, y, optimizer, 7, monitor)
        assert model.training
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_monitor_warns_once_past_the_edge_and_plots():
    model, X, y = _setup()
    result = family_from_model(model, X, y, torch.nn.MSELoss(), check_gauss_newton=False)
    eta = critical_lr(result.family, 4, sampling="without_replacement")
    monitor = StabilityMonitor(model, X, y, torch.nn.MSELoss(), every=1, batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.step(0, lr=0.5 * eta)
        monitor.step(1, lr=2.0 * eta)
        monitor.step(2, lr=2.0 * eta)
    edge = [w for w in caught if issubclass(w.category, EdgeOfStabilityWarning)]
    assert len(edge) == 1 and "exceeds the exact critical learning rate" in str(edge[0].message)
    assert monitor.rows[1]["lr_over_critical"] == pytest.approx(2.0, rel=1e-9)
    assert monitor.rows[0]["critical_batch_size"] == pytest.approx(
        critical_batch_size(result.family, 0.5 * eta, sampling="without_replacement"), rel=1e-12)
    assert monitor.step(3, lr=eta) is not None and StabilityMonitor(
        model, X, y, torch.nn.MSELoss(), every=5, batch_size=4).step(3, lr=eta) is None
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    ax = monitor.plot()
    assert len(ax.lines) == 3


@pytest.mark.parametrize("kwargs, error, message", [
    ({"every": 0}, ValueError, "every"),
    ({"batch_size": 13}, ValueError, "batch_size"),
    ({"sampling": "reshuffle"}, ValueError, "sampling"),
    ({"optimizer": "adam"}, TypeError, "torch.optim.SGD"),
    ({"chunk": 3}, TypeError, "unknown option"),
])
def test_monitor_bad_input(kwargs, error, message):
    model, X, y = _setup()
    arguments = {"every": 1, "batch_size": 4, **kwargs}
    with pytest.raises(error, match=message):
        StabilityMonitor(model, X, y, torch.nn.MSELoss(), **arguments)


def test_monitor_needs_an_lr_without_an_optimizer():
    model, X, y = _setup()
    monitor = StabilityMonitor(model, X, y, torch.nn.MSELoss(), every=1, batch_size=4)
    with pytest.raises(ValueError, match="lr="):
        monitor.step(0)


class _DrawsRandomNumbers(torch.nn.Module):
    """Adds 0 * uniform noise: the same numbers, but the global RNG advances on every forward."""

    def forward(self, x):
        return x + 0.0 * torch.rand(x.shape, dtype=x.dtype)


def test_monitor_restores_the_global_rng():
    """A model whose forward draws from the global RNG (on the Gram route its forward passes run
    outside vmap): the monitor's passes must not shift the training run's later draws."""
    runs = []
    for with_monitor in (False, True):
        torch.manual_seed(0)
        X = torch.randn(12, 3, dtype=D)
        y = torch.sin(X.sum(1, keepdim=True))
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), _DrawsRandomNumbers(), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 1)).to(D)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        monitor = StabilityMonitor(model, X, y, torch.nn.MSELoss(), every=2, batch_size=4,
                                   optimizer=optimizer, reduce=True) if with_monitor else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EdgeOfStabilityWarning)
            losses = _train(model, X, y, optimizer, 5, monitor)
        runs.append((losses, torch.rand(3)))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
