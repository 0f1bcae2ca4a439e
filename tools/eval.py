"""The `contentv-eval` command as `python tools/eval.py` (its code: contentv_common/cli/eval.py)."""

from contentv_common.cli.eval import entry

if __name__ == "__main__":
    entry()
