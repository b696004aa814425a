"""Moved: this is `sclslt export --encoders` now (sclslt/eval/export.py, `export_encoders`), with the same
--run, --out, --stage and --tag. This shim runs it and says so; it goes away in the next release."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sclslt.cli import main  # noqa: E402

if __name__ == "__main__":
    print(
        "tools/export_pretrained.py is now `sclslt export --encoders`; this script goes in the next release",
        file=sys.stderr,
    )
    sys.exit(main(["export", "--encoders", *sys.argv[1:]]))
