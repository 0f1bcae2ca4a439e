"""The `contentv-parity` command as `python tools/parity.py` (its code: contentv_common/cli/parity.py)."""

from contentv_common.cli.parity import entry

if __name__ == "__main__":
    entry()
