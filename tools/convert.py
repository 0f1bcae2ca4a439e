"""The `contentv-convert` command as `python tools/convert.py` (its code: contentv_common/cli/convert.py)."""

from contentv_common.cli.convert import entry

if __name__ == "__main__":
    entry()
