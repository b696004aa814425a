"""Moved: this is `sclslt shard` now (sclslt/data/sharding.py), with the same options. This shim runs it and
says so; it goes away in the next release."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sclslt.data.sharding import main  # noqa: E402

if __name__ == "__main__":
    print(
        "tools/shard_videos.py is now `sclslt shard` (the same options); this script goes in the next release",
        file=sys.stderr,
    )
    sys.exit(main())
