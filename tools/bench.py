"""The `contentv-bench` command as `python tools/bench.py` (its code: contentv_common/cli/bench.py)."""

from contentv_common.cli.bench import entry

if __name__ == "__main__":
    entry()
