"""A whole run on `jpg` shards decoded on the device (data.decode=device, sclslt.data.devdecode) is the run
that decoding in the loader gives: the same losses, hypotheses and scores."""

from sclslt.data.shards import read_manifest, write_split
from tests.helpers import ROOT, TRAIN_ENV


def test_training_on_jpg_shards_is_the_same_decoded_on_the_device(tiny_cfg_dict, tiny_shards, tmp_path):
    """The whole run (both stages, dev/test decoding, retrieval) with data.decode=device gives the
    run that decoding in the loader gives: the same losses, hypotheses and scores. Mutation caught (checked): the
    device path's frames with their colour channels reversed (`EncodedFrames.decode`)."""
    import json
    import subprocess
    import sys

    import yaml

    from sclslt.data.shards import iter_shard

    jpg = tmp_path / "jpg"
    for split in ("train", "dev", "test"):
        man = read_manifest(tiny_shards, split)
        samples = (
            {
                "key": s["key"],
                "frames": s["frames"],
                "text": s["meta"]["original_text"],
                "signer": s["meta"].get("signer", ""),
                "source": s["meta"].get("source", ""),
            }
            for sh in man["shards"]
            for s in iter_shard(tiny_shards / sh["name"])
        )
        write_split(samples, jpg, split, samples_per_shard=20, frame_format="jpg")
    cfg = yaml.safe_load(yaml.safe_dump(tiny_cfg_dict))
    cfg["data"].update(corpus="shards", shards_dir=str(jpg), max_frames=6, num_workers=1)
    cfg["train"]["max_steps"] = 3
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = {}
    for where in ("cpu", "device"):
        run = tmp_path / where
        proc = subprocess.run(
            [
                sys.executable,
                "launch/train.py",
                "--config",
                str(cfg_path),
                "--train.run_dir",
                str(run),
                "--data.decode",
                where,
            ],
            cwd=ROOT,
            env=TRAIN_ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert ("jpg frames decoded on cpu (nvImageCodec)" in proc.stdout) == (where == "device")
        losses = [line.split(" loss ")[1].split()[0] for line in proc.stdout.splitlines() if " loss " in line]
        res = json.loads((run / "results.json").read_text())
        out[where] = (
            losses,
            (run / "hypotheses.test.jsonl").read_text(),
            res["model"],
            res["retrieval"],
            res["selected_checkpoint"].get("history"),
        )
    assert len(out["cpu"][0]) >= 6
    assert out["cpu"] == out["device"]
