"""Moved: this is `sclslt reference` now (sclslt/selection/reference.py), with the same options; under several
ranks `deepspeed --module sclslt.cli reference ...`. This shim runs it and says so; it goes away in the next
release."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sclslt.selection.reference import main  # noqa: E402

if __name__ == "__main__":
    print(
        "tools/export_reference.py is now `sclslt reference` (the same options); this script goes in the next release",
        file=sys.stderr,
    )
    sys.exit(main())
