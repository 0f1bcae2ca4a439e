"""The `contentv-plan` command as `python tools/plan.py` (its code: contentv_common/cli/plan.py)."""

from contentv_common.cli.plan import entry

if __name__ == "__main__":
    entry()
