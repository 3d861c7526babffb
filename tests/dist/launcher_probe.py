"""What a worker sees of its launcher, for tests/test_forkserver.py: prints one JSON line per rank
(``PROBE <json>``) with torchrun's worker variables, argv, cwd and sys.path[0]; with
``--fail-rank R`` rank R exits 3 and the other ranks wait for a signal (torchrun stops them)."""

import json
import os
import sys
import time

KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
        "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_MAX_RESTARTS", "OMP_NUM_THREADS", "PROBE_EXTRA")


def main() -> None:
    seen = {k: os.environ.get(k) for k in KEYS}
    seen.update(argv=sys.argv[1:], cwd=os.getcwd(), path0=sys.path[0],
                has_port=bool(os.environ.get("MASTER_PORT")),
                has_run_id=bool(os.environ.get("TORCHELASTIC_RUN_ID")))
    if "--fail-rank" in sys.argv:
        bad = int(sys.argv[sys.argv.index("--fail-rank") + 1])
        if int(os.environ["RANK"]) == bad:
            print("rank failing on purpose", file=sys.stderr, flush=True)
            sys.exit(3)
        time.sleep(600)  # stopped by the launcher well before this
    # One write: torchrun runs its workers unbuffered (-u), where print's text and newline are
    # two writes that another rank's line can fall between on the shared pipe.
    os.write(1, ("PROBE " + json.dumps(seen) + "\n").encode())


if __name__ == "__main__":
    main()
