"""Print `name==version` for each named distribution that is installed (torch, triton: what tools/setup_env.sh and
tools/newest_lane.sh keep of a machine's own build instead of the lock's or the newest)."""

import importlib.metadata as md
import sys

for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
