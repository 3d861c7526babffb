"""``python -m moerl.launch_info CONFIG [--set ...]``: what launch/local.sh needs to know.

Prints ``<processes> <model.hf_path> <task.max_operand>`` for a config, validating it first (so a
bad config, or a megatron-core release moerl does not support, fails here, before any process
starts). The process count is the smallest world the parallel layout fits: lcm(tp, ep * etp).
"""

from __future__ import annotations

import argparse
import math
import sys

from moerl.config import ConfigError, add_cli_arguments, config_from_args
from moerl.trainer.megatron_version import UnsupportedMegatronError, check_megatron_version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moerl.launch_info")
    add_cli_arguments(parser)
    args, _ = parser.parse_known_args(argv)
    try:
        cfg = config_from_args(args)
        check_megatron_version()
    except (ConfigError, UnsupportedMegatronError) as err:
        print(f"moerl: {err}", file=sys.stderr)
        return 2
    p = cfg.parallel
    print(math.lcm(p.tp, p.ep * p.etp), cfg.model.hf_path, cfg.task.max_operand)
    return 0


if __name__ == "__main__":
    sys.exit(main())
