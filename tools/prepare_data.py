"""`contentv-prepare-data` as `python tools/prepare_data.py` (its code: contentv_common/cli/prepare_data.py)."""

from contentv_common.cli.prepare_data import entry

if __name__ == "__main__":
    entry()
