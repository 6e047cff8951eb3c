"""Start ``train.py`` runs as forks of this process, which has imported what they import.

Each run is a process of its own, in a session of its own (a real SIGKILL of its process group
ends it and any DDP rank it started), that skips the seconds of importing torch and Lightning.
Nothing but imports happens here before a fork, so every run starts from the state a fresh
``python train.py`` has.

Protocol: one JSON request per line on stdin, ``{"args": [...], "log": path}``; the reply is the
run's pid on a line of stdout. When the run ends, its exit status (negative: the signal that
ended it) is written to ``<log>.status``. The server exits when stdin closes.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tasks.app.runner  # noqa: E402, F401
import tasks.classification  # noqa: E402, F401
import tasks.matching  # noqa: E402, F401
import train  # noqa: E402

_logs: dict[int, str] = {}
_lock = threading.Lock()


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:  # no run going
            time.sleep(0.05)
            continue
        with _lock:  # the pid is recorded by the time the lock is free
            log = _logs.pop(pid)
        Path(f"{log}.status").write_text(str(os.waitstatus_to_exitcode(status)))


def _run(args: list[str], log: str) -> None:
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    # Lightning's ddp launcher starts the other ranks by re-running sys.argv.
    sys.argv = [str(ROOT / "train.py"), *args]
    try:
        code = train.main(args)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    os.chdir(ROOT)
    threading.Thread(target=_reap, daemon=True).start()
    for line in sys.stdin:
        request = json.loads(line)
        with _lock:
            pid = os.fork()
            if pid == 0:
                _run(request["args"], request["log"])
            _logs[pid] = request["log"]
        print(pid, flush=True)


if __name__ == "__main__":
    main()
