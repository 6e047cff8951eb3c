r"""Train a task with deep declarative layers:
``.venv/bin/python train.py [-c FILE ...] [key=value ...]``.

Run from the repository root; ``make train`` creates .venv the first time. The commands below
run as written from a fresh shell; after ``source .venv/bin/activate`` the ``.venv/bin/`` can be
dropped.

CPU, the default (classification of scikit-learn's digits with robust pooling; offline):
    .venv/bin/python train.py

One GPU:
    .venv/bin/python train.py -c configs/gpu.yaml

DDP on N GPUs of one machine (here 4), BatchNorm statistics shared across them:
    .venv/bin/python train.py -c configs/gpu.yaml -c configs/ddp.yaml trainer.devices=4 \
        trainer.sync_batchnorm=true

DDP on the CPU with 2 processes (gloo):
    .venv/bin/python train.py -c configs/ddp.yaml trainer.devices=2

Several nodes with torchrun (the same command on every node; here 2 nodes of 4 GPUs; every
process must agree on the run directory: give name=, or --rdzv-id to name it after):
    .venv/bin/torchrun --nnodes=2 --nproc-per-node=4 --node-rank=$NODE_RANK --rdzv-backend=c10d \
        --rdzv-endpoint=$HEAD_NODE:29500 train.py -c configs/gpu.yaml -c configs/ddp.yaml \
        trainer.devices=4 trainer.num_nodes=2 name=digits-2x4

Two node ranks on one host, one CPU process each (run it with --node-rank=0 and with 1):
    .venv/bin/torchrun --nnodes=2 --nproc-per-node=1 --node-rank=0 --master-addr=127.0.0.1 \
        --master-port=29500 train.py trainer.num_nodes=2 trainer.devices=1 \
        trainer.strategy=ddp name=two-nodes

Several nodes with SLURM (one task per GPU; the run is named after the job id):
    srun --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 .venv/bin/python train.py \
        -c configs/gpu.yaml -c configs/ddp.yaml trainer.devices=4 trainer.num_nodes=2

Swap the backward mode of every declarative layer (implicit, full, approx, unroll):
    .venv/bin/python train.py ddn.backward_mode=unroll

Checkpoint every 50 optimiser steps as well as every epoch, so that a kill loses little:
    .venv/bin/python train.py checkpoint.every_n_steps=50

Resume the newest run from its last checkpoint, with its saved config (after a kill, it ends
exactly where the uninterrupted run would have: see "Resuming" below; a run that had finished
its budget says so and is left as it is):
    .venv/bin/python train.py ckpt=last

Resume a given run, training it for longer (the learning rate carries on from where it was and
decays to zero at the new end):
    .venv/bin/python train.py ckpt=last name=classification-implicit-20250101-120000 \
        trainer.max_epochs=20

Robust against average pooling with 30% of each test image corrupted:
    .venv/bin/python train.py -c configs/corrupted.yaml model.pool=avg

W&B online instead of offline (offline runs upload later with the printed `wandb sync`):
    .venv/bin/python train.py logger.online=true logger.project=my-project

Show the resolved config without training:
    .venv/bin/python train.py --print-config ddn.backward_mode=full

Keys: task, seed, name, runs_dir, ckpt, test, ddn.*, trainer.* (Lightning Trainer arguments),
data.*, model.*, optim.*, logger.*, checkpoint.*; see tasks/app/config.py and each task's
config.py. A bad key or value stops the run before it starts, with exit status 2.

What a run reports: at its end, a table of each declarative layer's forward and backward time
and memory (median, quartiles and how many timed steps they rest on: a warm-up batch, then 5
consecutive steps every ddn.profile_every_n_steps), also in runs/<name>/summary.json and in the
W&B run's summary; then the run directory, the best checkpoint and the command that uploads an
offline W&B run, each on a line of its own.

Resuming: every checkpoint holds what decides the rest of the run: weights, optimiser and
schedule (with the budget it was planned for), the random generators of every process, the
position in the data (the next batch, mid-epoch too) and the loggers' step. A resumed run with
the same config therefore ends as the uninterrupted one (bit for bit on the CPU with
trainer.deterministic=true, DDP included). last.ckpt is rewritten every checkpoint.every_n_epochs
epochs and, with checkpoint.every_n_steps=N, every N optimiser steps; files are written whole
(a temporary file renamed over the old one), and ckpt=last passes over a damaged last.ckpt,
saying so, for the newest good checkpoint (last.prev.ckpt keeps the one before). A resume with
another budget (trainer.max_epochs, trainer.max_steps) continues the learning rate from its
value at the checkpoint along a cosine to zero at the new end.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from omegaconf import OmegaConf


def main(argv: Sequence[str] | None = None) -> int:
    # Imported here so that `--help` answers without loading torch.
    from tasks.app.cli import build_parser, load_config
    from tasks.app.config import ConfigError

    args = build_parser(__doc__).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        return 0

    from tasks.app.runner import run

    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
