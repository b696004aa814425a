#!/usr/bin/env bash
# Wheels for a GPU machine without network (the lent H200: Python 3.12, torch + triton present; missing
# deepspeed, webdataset, PyAV, zstandard, nvImageCodec + nvJPEG): downloads cp312 manylinux x86-64 wheels of
# what it lacks, at
# the versions of constraints.txt, into .whl/ (git-ignored through .git/info/exclude), and builds
# deepspeed's wheel from its sdist (its ops compile JIT on the device). Then, on the device:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#   PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
pin() { sed -n "s/^$1==//Ip" constraints.txt | head -1; }
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for name in webdataset braceexpand av zstandard hjson ninja py-cpuinfo msgpack nvidia-nvimgcodec-cu12 nvidia-nvjpeg-cu12; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${plat[@]}" -d .whl "$name==$(pin "$name")"
done
# nvImageCodec's wheel (32 MB) holds its module for seven Pythons and codecs we do not use: keep the
# cp312 module and the JPEG extensions (nvJPEG, libjpeg-turbo), so everything fits the 64 MiB carry
"$PY" - <<'EOF'
import glob, zipfile
for path in glob.glob(".whl/nvidia_nvimgcodec_cu12-*.whl"):
    keep = lambda n: not (("nvimgcodec_impl.cpython-" in n and "cpython-312-" not in n)
                          or any(x in n for x in ("opencv_ext", "tiff_ext", "nvjpeg2k_ext", "nvpnm_ext", "nvbmp_ext")))
    with zipfile.ZipFile(path) as src:
        items = [(i, src.read(i)) for i in src.infolist() if keep(i.filename)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info, data in items:
            dst.writestr(info, data)
EOF
"$PY" -m pip wheel --quiet --no-deps -w .whl "deepspeed==$(pin deepspeed)"
ls -1 .whl
