"""issue 22 item 2: the Lightning and Hugging Face callbacks over StabilityMonitor. A tiny
``Trainer.fit`` / ``Trainer.train`` (CPU, no download, nothing written outside tmp_path) gives
the same losses and parameters with and without the callback; the logged values equal direct
library calls on the model as it was at the record; ``import fastsgdstab`` never imports the
layers (nor torch, lightning, transformers); a missing package names the extra to install."""

import copy
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")

from fastsgdstab import critical_batch_size, critical_lr, stationary  # noqa: E402
from fastsgdstab.torch import family_from_model  # noqa: E402

D = torch.float64
LR, MOMENTUM, BATCH = 0.05, 0.5, 4

pytestmark = [pytest.mark.filterwarnings("ignore::fastsgdstab.torch.GaussNewtonWarning"),
              pytest.mark.filterwarnings("ignore::fastsgdstab.NotAMinimumWarning"),
              pytest.mark.filterwarnings("ignore::fastsgdstab.torch.EdgeOfStabilityWarning")]


def _data():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(32, 3, dtype=D, generator=generator)   # n = 32 > d = 21: a loss floor > 0
    return X, torch.sin(X.sum(1, keepdim=True))


def _network():
    torch.manual_seed(0)
    # Dropout draws from torch's RNG in training mode: a monitor that moved the RNG would show.
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(4, 1)).to(D)


def _check_rows_against_direct_calls(monitor, snapshots, logged, X, y, batch=BATCH):
    """Each record equals the library's own functions on the model as it was (``batch``: the
    samples of one optimiser step); the logged metrics are the record's numbers."""
    assert len(monitor.rows) >= 2 and len(snapshots) == len(monitor.rows) == len(logged)
    assert monitor.batch_size == batch
    options = {"sampling": "without_replacement", "momentum": MOMENTUM, "nesterov": False}
    for row, snapshot, metrics in zip(monitor.rows, snapshots, logged):
        result = family_from_model(snapshot, X, y, torch.nn.MSELoss(), check_gauss_newton=False)
        eta = critical_lr(result.family, batch, **options)
        assert row["lr"] == LR and row["momentum"] == MOMENTUM
        assert row["critical_lr"] == pytest.approx(eta, rel=1e-10)
        assert row["sharpness"] == pytest.approx(result.family.sharpness(), rel=1e-10)
        assert row["critical_batch_size"] == pytest.approx(
            critical_batch_size(result.family, LR, **options), rel=1e-10)
        assert row["gradient_norm"] == pytest.approx(result.gradient_norm, rel=1e-10)
        assert row["loss"] == pytest.approx(result.loss, rel=1e-10)
        assert row["excess_loss"] > 1e-6 and row["excess_loss"] == pytest.approx(
            stationary(result.family, LR, batch, **options).excess_loss, rel=1e-8)
        assert metrics["stability/critical_lr"] == row["critical_lr"]
        assert metrics["stability/lr_over_critical"] == pytest.approx(LR / eta, rel=1e-10)
        assert metrics["stability/excess_loss"] == row["excess_loss"]
        assert metrics["stability/sharpness"] == row["sharpness"]


# ----------------------------------------------------------------------------- Lightning
def _lightning_fit(tmp_path, with_callback, accumulate=1, every=5):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import Logger

    from fastsgdstab.lightning import StabilityCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _network()
            self.losses, self.stepped, self.batches = [], [], 0

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            value = torch.nn.functional.mse_loss(self(x), y)
            self.losses.append(value.item())
            return value

        def optimizer_step(self, *args, **kwargs):   # which batches end with an optimiser step
            self.stepped.append(self.batches)
            return super().optimizer_step(*args, **kwargs)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.batches += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    class MemoryLogger(Logger):
        def __init__(self):
            super().__init__()
            self.metrics = []

        name, version = "memory", 0

        def log_metrics(self, metrics, step=None):
            if any(k.startswith("stability/") for k in metrics):
                self.metrics.append((step, dict(metrics)))

        def log_hyperparams(self, *args, **kwargs):
            pass

    X, y = _data()
    module, logger = Module(), MemoryLogger()
    callbacks, snapshots, recorded = [], [], []
    if with_callback:
        stability = StabilityCallback(X, y, torch.nn.MSELoss(), batch_size=BATCH * accumulate,
                                      every=every)

        class Snapshot(pl.Callback):  # runs after StabilityCallback: the model of each record
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if len(snapshots) < len(stability.monitor.rows):
                    snapshots.append(copy.deepcopy(pl_module.net))
                    recorded.append(pl_module.batches)   # the batches seen before this one

        callbacks = [stability, Snapshot()]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=BATCH,
                                         shuffle=True)
    torch.manual_seed(1)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=logger,
                         callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         log_every_n_steps=1, accumulate_grad_batches=accumulate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # Lightning's advice (workers, etc.)
        trainer.fit(module, loader)
    parameters = [p.detach().clone() for p in module.parameters()]
    if not with_callback:
        return module.losses, parameters, None, snapshots, logger
    # the batches (indices over the run) at which records were taken / the optimiser stepped
    stability.recorded_batches, stability.stepped_batches = recorded, module.stepped
    return module.losses, parameters, stability, snapshots, logger


def test_lightning_callback_same_losses_and_direct_values(tmp_path):
    losses, parameters, _, _, _ = _lightning_fit(tmp_path, False)
    losses2, parameters2, stability, snapshots, logger = _lightning_fit(tmp_path, True)
    assert len(losses) == 16 and losses == losses2
    assert all(torch.equal(a, b) for a, b in zip(parameters, parameters2))
    monitor = stability.monitor
    assert [row["step"] for row in monitor.rows] == [0, 5, 10, 15]
    assert [step for step, _ in logger.metrics] == [1, 6, 11, 16]   # the Trainer's global step
    X, y = _data()
    _check_rows_against_direct_calls(monitor, snapshots, [m for _, m in logger.metrics], X, y)
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # no checkpoint, no log file


def test_lightning_callback_with_gradient_accumulation(tmp_path):
    """accumulate_grad_batches = 2: records on optimiser steps only (every 3 of them, the batch
    that ends with the step), B = 2 x 4 samples per step, values equal direct calls, the same
    losses and parameters with and without the callback."""
    losses, parameters, _, _, _ = _lightning_fit(tmp_path, False, accumulate=2, every=3)
    losses2, parameters2, stability, snapshots, logger = _lightning_fit(tmp_path, True,
                                                                      accumulate=2, every=3)
    assert len(losses) == 16 and losses == losses2
    assert all(torch.equal(a, b) for a, b in zip(parameters, parameters2))
    monitor = stability.monitor
    assert [row["step"] for row in monitor.rows] == [0, 3, 6]   # 8 optimiser steps in 16 batches
    assert [step for step, _ in logger.metrics] == [1, 4, 7]
    # the optimiser stepped in batches 1, 3, ..., 15 (from 0), and the records were taken at
    # the end of batches 1, 7, 13: after optimiser steps 0, 3, 6
    assert stability.stepped_batches == list(range(1, 16, 2))
    assert stability.recorded_batches == [1, 7, 13]
    X, y = _data()
    _check_rows_against_direct_calls(monitor, snapshots, [m for _, m in logger.metrics], X, y,
                                     batch=2 * BATCH)


def test_lightning_callback_needs_sgd(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from fastsgdstab.lightning import StabilityCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _network()

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())

    X, y = _data()
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path,
                         callbacks=[StabilityCallback(X, y, torch.nn.MSELoss(), batch_size=BATCH)])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=BATCH)
    with pytest.raises(TypeError, match="torch.optim.SGD"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(), loader)
    with pytest.raises(ValueError, match="batch_size"):
        StabilityCallback(X, y, torch.nn.MSELoss(), batch_size=33, model=_network())


# ----------------------------------------------------------------------------- Hugging Face
class _HFNet(torch.nn.Module):
    """A plain module the Trainer accepts: forward(x, labels) returns the loss in a dict, and
    forward(x) the outputs (what the monitor calls)."""

    def __init__(self):
        super().__init__()
        self.net = _network()
        self.losses = []

    def forward(self, x, labels=None):
        out = self.net(x)
        if labels is None:
            return out
        value = torch.nn.functional.mse_loss(out, labels)
        self.losses.append(value.item())
        return {"loss": value, "logits": out}


def _hf_train(tmp_path, with_callback, accumulate=1, every=5):
    transformers = pytest.importorskip("transformers")
    from fastsgdstab.transformers import StabilityCallback

    X, y = _data()
    dataset = [{"x": X[i], "labels": y[i]} for i in range(len(X))]
    model = _HFNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, num_train_epochs=2,
        report_to=[], save_strategy="no", logging_steps=2, use_cpu=True, seed=0,
        disable_tqdm=True, lr_scheduler_type="constant", dataloader_num_workers=0,
        gradient_accumulation_steps=accumulate)
    callbacks, snapshots, seen_logs = [], [], []
    if with_callback:
        stability = StabilityCallback(X, y, torch.nn.MSELoss(), every=every)

        class Snapshot(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if len(snapshots) < len(stability.monitor.rows):
                    snapshots.append(copy.deepcopy(model.net))
                    stability.recorded_after.append(len(model.losses))   # forward passes so far

            def on_log(self, args, state, control, logs=None, **kwargs):
                seen_logs.append((state.global_step, dict(logs)))

        stability.recorded_after = []
        callbacks = [stability, Snapshot()]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                   optimizers=(optimizer, None), callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    parameters = [p.detach().clone() for p in model.parameters()]
    return (model.losses, parameters, trainer.state.log_history,
            stability if with_callback else None, snapshots, seen_logs)


def test_transformers_callback_same_losses_and_direct_values(tmp_path):
    losses, parameters, history, _, _, _ = _hf_train(tmp_path, False)
    losses2, parameters2, history2, stability, snapshots, seen_logs = _hf_train(tmp_path, True)
    assert len(losses) == 16 and losses == losses2
    assert all(torch.equal(a, b) for a, b in zip(parameters, parameters2))
    # The Trainer's own logs (loss averages) are unchanged; the records are extra entries.
    plain = [entry for entry in history2 if not any(k.startswith("stability/") for k in entry)]
    strip = [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k} for e in history]
    assert [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k
             and not k.startswith("stability/")} for e in plain] == strip
    records = [e for e in history2 if "stability/critical_lr" in e and "loss" not in e]
    assert [e["step"] for e in records] == [1, 6, 11, 16]
    monitor = stability.monitor
    assert [row["step"] for row in monitor.rows] == [0, 5, 10, 15] and monitor.batch_size == BATCH
    X, y = _data()
    _check_rows_against_direct_calls(monitor, snapshots, records, X, y)
    # on_log: the latest record joins the logs of the Trainer's next log (logging_steps = 2):
    # global steps 2, 6, 12, 16 after records at global steps 1, 6, 11, 16
    joined = [(step, logs["stability/critical_lr"]) for step, logs in seen_logs
              if "stability/critical_lr" in logs]
    assert joined == [(2, monitor.rows[0]["critical_lr"]), (6, monitor.rows[1]["critical_lr"]),
                      (12, monitor.rows[2]["critical_lr"]), (16, monitor.rows[3]["critical_lr"])]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


def test_transformers_callback_with_gradient_accumulation(tmp_path):
    """gradient_accumulation_steps = 2: records on optimiser steps only (on_step_end; every 3),
    the default B = 4 x 2 samples per step, values equal direct calls, the same losses and
    parameters with and without the callback."""
    losses, parameters, _, _, _, _ = _hf_train(tmp_path, False, accumulate=2, every=3)
    losses2, parameters2, history2, stability, snapshots, _ = _hf_train(tmp_path, True,
                                                                        accumulate=2, every=3)
    assert len(losses) == 16 and losses == losses2
    assert all(torch.equal(a, b) for a, b in zip(parameters, parameters2))
    monitor = stability.monitor
    assert [row["step"] for row in monitor.rows] == [0, 3, 6]   # 8 optimiser steps in 16 batches
    assert stability.recorded_after == [2, 8, 14]   # after both micro-batches of steps 0, 3, 6
    records = [e for e in history2 if "stability/critical_lr" in e and "loss" not in e]
    assert [e["step"] for e in records] == [1, 4, 7]
    X, y = _data()
    _check_rows_against_direct_calls(monitor, snapshots, records, X, y, batch=2 * BATCH)


# ----------------------------------------------------------------------------- imports
def test_import_fastsgdstab_imports_no_adapter():
    code = ("import sys, fastsgdstab\n"
            "heavy = [m for m in ('torch', 'lightning', 'transformers', 'jax', 'fastsgdstab.torch', "
            "'fastsgdstab.lightning', 'fastsgdstab.transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("module, package", [("lightning", "lightning"),
                                             ("transformers", "transformers")])
def test_missing_package_names_the_extra(module, package):
    """With the package absent (None in sys.modules), the layer's ImportError names the extra;
    the layer's own name does not shadow the real package."""
    code = (f"import sys\nsys.modules[{package!r}] = None\n"
            f"try:\n    import fastsgdstab.{module}\nexcept ImportError as error:\n"
            f"    print(error)\nelse:\n    raise SystemExit('imported without {package}')\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert f'pip install "fastsgdstab[{module}]"' in out.stdout
    import importlib

    pytest.importorskip(package)
    importlib.import_module(f"fastsgdstab.{module}")
    real = importlib.import_module(package)   # the real package, not the layer of that name
    assert "fastsgdstab" not in real.__file__ and hasattr(real, "__version__")


# ----------------------------------------------------------------------------- docs
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _snippet(marker):
    import re

    text = (ROOT / "docs" / "tracking.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if marker in b]
    assert len(blocks) == 1, marker
    return blocks[0]


def test_docs_lightning_snippet_runs(tmp_path, monkeypatch):
    pytest.importorskip("lightning.pytorch")
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "tracking_snippet"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(_snippet("fastsgdstab.lightning"), "docs/tracking.md", "exec"), namespace)
    rows = namespace["callback"].monitor.rows
    assert [r["step"] for r in rows] == [0, 10] and all(r["lr"] == 0.5 for r in rows)
    logged = list(tmp_path.glob("runs/**/metrics.csv"))
    assert len(logged) == 1 and "stability/critical_lr" in logged[0].read_text()


def test_docs_transformers_snippet_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "tracking_snippet"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(_snippet("fastsgdstab.transformers"), "docs/tracking.md", "exec"), namespace)
    monitor = namespace["callback"].monitor
    assert [r["step"] for r in monitor.rows] == [0, 10] and monitor.batch_size == 32
    records = [e for e in namespace["trainer"].state.log_history if "stability/critical_lr" in e]
    assert [e["stability/critical_lr"] for e in records] == [r["critical_lr"] for r in monitor.rows]


def test_tracking_figure_script(tmp_path):
    """The docs' figure comes from benchmarks/make_tracking_figure.py (small settings here)."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    import importlib.util

    path = ROOT / "benchmarks" / "make_tracking_figure.py"
    spec = importlib.util.spec_from_file_location("make_tracking_figure", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monitor = script.main(["--quick", str(tmp_path / "tracking.png")])
    assert (tmp_path / "tracking.png").stat().st_size > 10_000
    assert [r["step"] for r in monitor.rows] == [0, 20]
    assert monitor.population_size == 1797 and monitor.batch_size == 32
    assert script.table(monitor).count("\n") == 3
