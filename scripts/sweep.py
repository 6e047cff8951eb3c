"""Train a task once per backward mode (and, for classification, per final pool) and compare.

    python scripts/sweep.py --task classification      # or: make sweep TASK=classification
    python scripts/sweep.py --task matching
    python scripts/sweep.py --task matching --modes implicit unroll trainer.max_epochs=2

Every run is ``python train.py -c configs/sweep_<task>.yaml task=<task>
ddn.backward_mode=<mode> [model.pool=<pool>] seed=<seed> ...`` in its own process (so runs
share nothing: no allocator state, no W&B run, no warm caches), with the same seed and budget.
Classification runs ``avg`` and ``max`` once each (they have no declarative layer, hence no
backward mode) and ``robust`` once per mode. Extra ``key=value`` arguments reach every run.

From each run's CSV log (``<run>/csv/version_0/metrics.csv``) the sweep reads the test
metric (``test/acc`` or ``test/f1``), the time per training step (``time/train_step_ms``,
logged every epoch) and every declarative layer's ``ddn/<layer>/fwd_ms``, ``bwd_ms``,
``bwd_peak_mib``, ``saved_mib`` and ``iters_mean`` (medians over the timed steps, from the run's
``summary.json`` where it wrote one, else over the CSV's logged values with the first dropped; a
model with several declarative layers gets their times and saved memory summed and the largest
peak). It writes, to ``--out`` (default ``docs/benchmarks/sweeps/<task>/``):
``sweep.csv`` + ``sweep.meta.json`` (the command, the machine, whether other jobs shared it),
``sweep.png`` and ``README.md`` (``plot_sweep.py`` redraws both from the CSV alone).

W&B: every run logs (offline unless ``--online``) to group ``<task>-<mode>`` (``<task>-<pool>``
for the pools without a mode), tagged ``sweep`` and the sweep's id; a last run,
``<sweep id>-summary`` (job type ``sweep-summary``), holds the table as a ``wandb.Table`` and
the figure as a ``wandb.Image``. Offline runs print the ``wandb sync`` command that uploads
them all.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import plot_sweep
from benchutil import machine_info, write_csv
from plot_sweep import LAYER_STATS

from tasks.app.loggers import shell_path, wandb_command

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("classification", "matching")
MODES = ("implicit", "full", "approx", "unroll")
POOLS = ("avg", "max", "robust")
METRIC = {"classification": "test/acc", "matching": "test/f1"}
VAL_METRIC = {"classification": "best/val/acc", "matching": "best/val/f1"}
# Other jobs whose presence makes the machine "shared" (the timings then are upper bounds).
BUSY_PATTERN = "train.py|bench_|pytest"


def grid(task: str, modes: list[str], pools: list[str]) -> list[tuple[str, str]]:
    """(pool, mode) of every run; pool '' for tasks without one, mode 'none' for a pool that
    has no declarative layer."""
    if task != "classification":
        return [("", m) for m in modes]
    runs = []
    for pool in pools:
        if pool == "robust":
            runs += [(pool, m) for m in modes]
        else:
            runs.append((pool, "none"))
    return runs


def other_jobs(own: set[int]) -> list[str]:
    """Command lines of training or benchmark processes that are not this sweep's."""
    try:
        out = subprocess.run(
            ["pgrep", "-af", BUSY_PATTERN], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    jobs = []
    for line in out.splitlines():
        pid, _, cmd = line.partition(" ")
        if not pid.isdigit() or int(pid) in own or "pgrep" in cmd or "scripts/sweep.py" in cmd:
            continue
        jobs.append(cmd.strip()[:120])
    return jobs


def wait_until_idle(minutes: float, max_load: float = 1.5) -> None:
    """Poll every minute (up to ``minutes``) until no other job runs and the load is low."""
    deadline = time.monotonic() + 60 * minutes
    while True:
        jobs, load = other_jobs({os.getpid()}), os.getloadavg()[0]
        if not jobs and load < max_load:
            return
        if time.monotonic() >= deadline:
            print(f"sweep: machine still busy (load {load:.2f}; {jobs}); starting anyway")
            return
        print(f"sweep: waiting for the machine (load {load:.2f}; other jobs: {jobs})", flush=True)
        time.sleep(60)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def read_run(run_dir: Path, task: str) -> dict[str, Any]:
    """What the sweep keeps of one run, from its CSV log."""
    logs = sorted((run_dir / "csv").glob("version_*/metrics.csv"))
    if not logs:
        raise FileNotFoundError(f"no CSV log under {run_dir / 'csv'} (did the run fail?)")
    with open(logs[-1], newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))

    def column(key: str) -> list[float]:
        return [float(r[key]) for r in records if r.get(key, "") != ""]

    out: dict[str, Any] = {}
    metric = column(METRIC[task])
    out["test_metric"] = metric[-1] if metric else math.nan
    val = column(VAL_METRIC[task].removeprefix("best/"))
    out["best_val_metric"] = max(val) if val else math.nan
    out["train_step_ms"] = _median(column("time/train_step_ms"))
    out["epochs"] = len(column("time/train_step_ms"))  # logged once per training epoch
    steps = column("step")
    out["steps"] = int(max(steps)) if steps else 0

    layers = sorted(
        {k.split("/")[1] for k in records[0] if k.startswith("ddn/")} if records else ()
    )
    stats: dict[str, list[float]] = {s: [] for s in LAYER_STATS}
    for layer in layers:
        for s in LAYER_STATS:
            values = column(f"ddn/{layer}/{s}")
            values = values[1:] if len(values) > 1 else values  # first: warm-up
            if values:
                stats[s].append(_median(values))
    out["layers"] = "+".join(layers)
    _medians_from_summary(run_dir, layers, stats, out)
    for s in LAYER_STATS:
        if not stats[s]:
            out[s] = math.nan
        elif s in ("bwd_peak_mib", "iters_mean"):
            out[s] = max(stats[s])
        else:
            out[s] = sum(stats[s])
    return out


def _medians_from_summary(
    run_dir: Path, layers: list[str], stats: dict[str, list[float]], out: dict[str, Any]
) -> None:
    """Replace the CSV-derived medians with the run's ``summary.json`` (the median over every
    timed step, not over the logged per-burst medians), where the run wrote one."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return
    summary = json.loads(path.read_text())
    step = summary.get("time/train_step_ms")
    if isinstance(step, dict):
        out["train_step_ms"] = step["median"]
    for s in LAYER_STATS:
        values = [summary.get(f"ddn/{layer}/{s}") for layer in layers]
        values = [v["median"] for v in values if isinstance(v, dict)]
        if layers and len(values) == len(layers):
            stats[s] = values


def train_args(args: argparse.Namespace, pool: str, mode: str, name: str) -> list[str]:
    cmd = ["-c", str(args.config)] if args.config else []
    cmd += [
        f"task={args.task}",
        f"ddn.backward_mode={'implicit' if mode == 'none' else mode}",
        f"seed={args.seed}",
        f"name={name}",
        f"runs_dir={args.runs_dir}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    if pool:
        cmd.append(f"model.pool={pool}")
    if args.no_wandb:
        cmd.append("logger.wandb=false")
    else:
        group = f"{args.task}-{pool if mode == 'none' else mode}"
        cmd += [
            f"logger.group={group}",
            f"logger.tags=[sweep,{args.sweep_id}]",
            f"logger.online={'true' if args.online else 'false'}",
            f"logger.project={args.project}",
        ]
    return cmd + list(args.overrides)


def run_one(
    cmd: list[str],
    log_path: Path,
    env: dict[str, str],
    own: set[int],
    seen: set[str],
    loads: list[float],
) -> tuple[int, float]:
    """Run one training process, its output to ``log_path``; sample other jobs and the load
    every few seconds while it runs. Returns (exit status, wall seconds)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        own.add(proc.pid)
        while True:
            try:
                rc = proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                seen.update(other_jobs(own))
                loads.append(os.getloadavg()[0])
    return rc, time.perf_counter() - start


def log_summary_to_wandb(args, rows, png: Path, sweep_dir: Path) -> str | None:
    """One W&B run holding the sweep's table and figure; returns its ``wandb sync`` command."""
    import wandb

    run = wandb.init(
        project=args.project,
        name=f"{args.sweep_id}-summary",
        group=f"{args.task}-sweep",
        job_type="sweep-summary",
        tags=["sweep", args.sweep_id],
        dir=str(sweep_dir),
        mode="online" if args.online else "offline",
        config={"task": args.task, "seed": args.seed, "config": str(args.config)},
        settings=wandb.Settings(quiet=True),
    )
    columns = list(rows[0])
    table = wandb.Table(
        columns=["run", *columns],
        data=[[plot_sweep.label(r), *[r[c] for c in columns]] for r in rows],
    )
    run.log({"sweep/table": table, "sweep/figure": wandb.Image(str(png))})
    for r in rows:
        run.summary[f"{plot_sweep.label(r)}/{METRIC[args.task]}"] = r["test_metric"]
    offline = run.settings.mode == "offline"
    sync_dir = run.settings.sync_dir
    run.finish()
    return f"{wandb_command()} sync {shell_path(Path(sync_dir))}" if offline else None


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Any key=value argument is passed to every train.py run.",
    )
    ap.add_argument("--task", choices=TASKS, required=True)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--pools", nargs="+", choices=POOLS, default=list(POOLS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--config",
        default=None,
        help="budget overlay for every run (default configs/sweep_<task>.yaml; 'none': none)",
    )
    ap.add_argument("--out", type=Path, default=None, help="default docs/benchmarks/sweeps/<task>")
    ap.add_argument("--runs-dir", default="runs/sweeps", help="where the runs' directories go")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads of each run (OMP_NUM_THREADS; 0: torch's default). One "
        "keeps a run's timings steady when other jobs share the cores",
    )
    ap.add_argument("--project", default="ddn-layers", help="W&B project")
    ap.add_argument("--online", action="store_true", help="W&B online (default: offline)")
    ap.add_argument("--no-wandb", action="store_true", help="no W&B at all (CSV logs only)")
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="MIN",
        help="first wait up to MIN minutes for no other train.py/bench_/pytest job and load < 1.5",
    )
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    # key=value arguments may come anywhere, also right after a list option (--modes a b k=v)
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = ap.parse_args([a for a in argv if a not in overrides])
    for item in args.overrides:
        ap.error(f"{item!r}: expected key=value")
    args.overrides = overrides
    if args.config is None:
        args.config = Path("configs") / f"sweep_{args.task}.yaml"
    elif args.config == "none":
        args.config = None
    args.out = args.out or Path("docs/benchmarks/sweeps") / args.task
    args.sweep_id = f"sweep-{args.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def main(argv=None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.wait_idle > 0:
        wait_until_idle(args.wait_idle)
    meta = machine_info()
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_absolute():
        runs_dir = ROOT / runs_dir
    sweep_dir = runs_dir / args.sweep_id
    own = {os.getpid()}
    seen: set[str] = set(other_jobs(own))
    loads = [os.getloadavg()[0]]
    rows = []
    start = time.perf_counter()
    plan = grid(args.task, args.modes, args.pools)
    env = dict(os.environ)
    if args.threads > 0:
        env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        meta["torch_threads"] = args.threads
    for k, (pool, mode) in enumerate(plan, 1):
        name = f"{args.sweep_id}-{pool + '-' if pool else ''}{mode}"
        cmd = [sys.executable, "train.py", *train_args(args, pool, mode, name)]
        print(f"[{k}/{len(plan)}] {' '.join(cmd[1:])}", flush=True)
        rc, wall = run_one(cmd, sweep_dir / f"{name}.log", env, own, seen, loads)
        if rc != 0:
            tail = (sweep_dir / f"{name}.log").read_text(errors="replace")[-3000:]
            raise SystemExit(f"sweep: run {name} failed (exit {rc}); its log ends:\n{tail}")
        row = {"task": args.task, "pool": pool, "mode": mode, "seed": args.seed}
        row["metric"] = METRIC[args.task]
        row |= read_run(runs_dir / name, args.task)
        row |= {"wall_s": wall, "load_max": max(loads), "run": name}
        rows.append(row)
        print(
            f"    {plot_sweep.label(row)}: {row['metric']} {row['test_metric']:.4f}, "
            f"step {row['train_step_ms']:.1f} ms, layer bwd {row['bwd_ms']:.3g} ms, "
            f"peak {row['bwd_peak_mib']:.3g} MiB ({wall:.0f} s)",
            flush=True,
        )
    total = time.perf_counter() - start
    meta |= {
        "task": args.task,
        "sweep_id": args.sweep_id,
        "config": str(args.config) if args.config else None,
        "train_args": [
            a for a in train_args(args, "", "<mode>", "<name>") if a not in ("-c", str(args.config))
        ],
        "sweep_seconds": total,
        "load_max": max(loads),
        "other_processes": sorted(seen),
        "shared": bool(seen),
        "runs_dir": str(sweep_dir),
        # how train.py chose the layer's timed steps (see tasks/app/callbacks/ddn_profiler.py)
        "profiler": "bursts",
    }
    csv_path = write_csv(args.out / "sweep.csv", rows, meta)
    png, readme = plot_sweep.regenerate(csv_path)
    print(plot_sweep.markdown_table(plot_sweep.load_rows(csv_path)))
    print(f"wrote {csv_path}, {png}, {readme} ({total / 60:.1f} min)")
    if not args.no_wandb:
        sync = log_summary_to_wandb(args, rows, png, sweep_dir)
        if sync:
            runs = f"{shell_path(sweep_dir)}*/wandb/offline-run-*"
            print(f"upload the sweep's runs: {wandb_command()} sync {runs}")
            print(f"the summary alone: {sync}")
    return rows


if __name__ == "__main__":
    main()
