"""The `contentv-sample` command as `python tools/sample.py` (its code: contentv_common/cli/sample.py)."""

from contentv_common.cli.sample import entry

if __name__ == "__main__":
    entry()
