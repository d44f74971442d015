"""Issue 10's targets for ``fastsgdstab.torch.family_from_model``, beside the obvious alternative.

    python benchmarks/run_torch_targets.py                 # both targets and their baselines
    python benchmarks/run_torch_targets.py --case mlp1e5   # one case

Cases (each in its own child process, so that its peak memory is the child's ``ru_maxrss``):

* ``mlp1e5``: a tanh MLP 64-280-280-10 (99,690 parameters), n = 1,000, C = 10, MSELoss, at an
  exact minimum (targets = the network's outputs); ``family_from_model`` with its defaults
  (the factors would take 8 GB, so it takes the Gram route: the Linear layers' Gram matrix,
  10,000 x 10,000, factored in place by Cholesky, the sharpness by Lanczos; issue 19 item 5).
  Target: < 60 s, < 2 GB.
* ``mlp1e6``: a tanh MLP 256-1024-720-10 (1,008,378 parameters), n = 200, C = 10 (n C = 2,000),
  ``reduce=True, memory_bytes=2e9``. Target: < 5 minutes, < 4 GB.
* ``*-baseline``: ``torch.func.vmap(jacrev)`` over all samples at once, then numpy
  (``HessianFamily.from_jacobians`` on the (n, C, d) Jacobians times sqrt(2/C)), with the
  child's address space capped at ``--baseline-cap`` GB so that it fails instead of exhausting
  the machine.

Prints wall time, the child's CPU time (user + system, all threads: ``cpu_seconds`` for the
timed part, which is what a shared machine does not distort), the load average, peak resident
memory and the family's sharpness (both routes must agree).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CASES = {"mlp1e5": (64, 280, 280, 10, 1000), "mlp1e6": (256, 1024, 720, 10, 200),
         "small": (16, 64, 64, 10, 100)}


def child(case: str, baseline: bool) -> None:
    import numpy as np
    import torch

    from fastsgdstab.family import HessianFamily
    from fastsgdstab.torch import family_from_model

    p, h1, h2, C, n = CASES[case]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(p, h1), torch.nn.Tanh(), torch.nn.Linear(h1, h2),
                                torch.nn.Tanh(), torch.nn.Linear(h2, C))
    X = torch.randn(n, p)
    with torch.no_grad():
        Y = model(X)
    d = sum(q.numel() for q in model.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = before.ru_utime + before.ru_stime
    start = time.perf_counter()
    if baseline:
        params = {k: v.detach() for k, v in model.named_parameters()}

        def f(params, x):
            return torch.func.functional_call(model, params, (x[None],))[0]

        jac = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, X)
        J = torch.cat([jac[k].reshape(n, C, -1) for k in params], dim=2).numpy()
        del jac
        family = HessianFamily.from_jacobians(J * np.sqrt(2.0 / C))
        route = "baseline"
    else:
        big = case == "mlp1e6"  # reduce=True and 2 GB for the rows: the target allows 4 GB
        result = family_from_model(model, X, Y, torch.nn.MSELoss(), reduce=True if big else None,
                                   memory_bytes=2e9 if big else None)
        family, route = result.family, result.route
    sharpness = family.sharpness()
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all of the child's threads, since its start
    print(json.dumps({"case": case, "route": route, "d": d, "n": n, "C": C, "seconds": seconds,
                      "cpu_seconds_since_start": usage.ru_utime + usage.ru_stime,
                      "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu_before,
                      "load_average": os.getloadavg()[0],
                      "sharpness": sharpness, "family_d": family.d}))


def run(case: str, baseline: bool, cap_gb: float) -> dict:
    command = [sys.executable, __file__, "--child", case] + (["--baseline"] if baseline else [])

    def limit():
        if baseline:
            cap = int(cap_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=limit)
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    # Peak resident memory of the child (ru_maxrss, KiB on Linux): RUSAGE_CHILDREN is the
    # maximum over this process's children, so every measurement runs from a fresh parent.
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"case": case, "route": "baseline" if baseline else "ours", "failed": tail[:200],
                "wall": wall, "peak_gb": peak_gb}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out.update(wall=wall, peak_gb=peak_gb)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    parser.add_argument("--child")
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--baseline-cap", type=float, default=12.0)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.baseline)
        return
    if args.case and len(args.case) == 1 and (args.no_baseline or args.baseline):
        print(json.dumps(run(args.case[0], args.baseline, args.baseline_cap)), flush=True)
        return
    for case in args.case or ["mlp1e5", "mlp1e6"]:  # each measurement from a fresh parent
        for baseline in ([False] if args.no_baseline else [False, True]):
            flag = "--baseline" if baseline else "--no-baseline"
            subprocess.run([sys.executable, __file__, "--case", case, flag,
                            "--baseline-cap", str(args.baseline_cap)], check=False)


if __name__ == "__main__":
    main()
