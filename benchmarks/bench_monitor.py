"""asv benchmarks of fastsgdstab.torch.StabilityMonitor (issue 22): the docs' training loop
(digits MLP, torch.optim.SGD, B = 32; benchmarks/make_tracking_figure.py) without the monitor
(the baseline), with it at the default cadence (a record due every 100 steps, taken only when
the monitor's time plus the record's expected cost fits in 5% of the loop's: on these short
loops none is, and the first record's estimate is all it spends), and one record on its own.
``track_overhead_ratio``: the median with/without ratio of alternating runs (the issue's
target: at most 1.05). Quick mode (``FASTSGDSTAB_ASV_QUICK=1``): 300 steps, 8
probe samples, the ratio only.
"""

try:
    import torch
except ImportError:  # the torch extra is not installed: asv skips a class whose setup raises
    torch = None

try:
    from baselines import QUICK
    from make_tracking_figure import train
except ImportError:  # asv imports benchmark modules as a package
    from .baselines import QUICK
    from .make_tracking_figure import train

STEPS = 300 if QUICK else 2000
PROBE = 8 if QUICK else 32


class MonitorOverhead:
    timeout = 1200
    number, repeat = 1, 3

    def setup(self):
        if torch is None:
            raise NotImplementedError("torch is not installed")
        torch.set_num_threads(1)
        train(50, probe=PROBE, monitor_options={"every": 25})   # torch.func, Numba's cache

    if not QUICK:  # quick mode keeps the target's ratio only (each method is a process with torch)
        def time_loop_without_monitor(self):
            train(STEPS, probe=PROBE)

        def time_loop_with_monitor(self):
            train(STEPS, probe=PROBE, monitor_options={})

        def time_one_record(self):
            train(1, probe=PROBE, monitor_options={"every": 1})

    def track_overhead_ratio(self):
        import statistics

        without, with_ = [], []
        for _ in range(3):
            without.append(train(STEPS, probe=PROBE)[2])
            with_.append(train(STEPS, probe=PROBE, monitor_options={})[2])
        return statistics.median(with_) / statistics.median(without)

    track_overhead_ratio.unit = "ratio"
