"""The `contentv-train` command as `python tools/train.py` (its code: contentv_common/cli/train.py)."""

from contentv_common.cli.train import entry

if __name__ == "__main__":
    entry()
