#!/usr/bin/env python3
"""Pack root filesystem folders into an image tar in the `docker save` layout (manifest.json, an image config,
one uncompressed layer tar per folder), which `ctr images import` reads. No Docker, no registry, no network.

    oci-pack.py --out IMAGE.tar --tag NAME:TAG [--dockerfile Dockerfile] [--user U] [--entrypoint JSON]
                [--cmd JSON] [--env K=V ...] [--workdir DIR] [--label K=V ...] ROOTFS [ROOTFS ...]

With --dockerfile, the image config (USER, ENTRYPOINT, CMD, EXPOSE, ENV, WORKDIR, LABEL) is read from the
Dockerfile's final stage, so the image built here and `docker build .` cannot drift apart in what they declare.
Layers are reproducible: entries sorted, owned by root unless the folder says otherwise, mtimes cleared.
"""
import argparse
import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile


def final_stage(dockerfile):
    """The instructions of the Dockerfile's last FROM stage as (INSTRUCTION, argument) pairs."""
    text = open(dockerfile).read()
    text = re.sub(r"\\\n", " ", text)  # line continuations
    stage = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stage = []
        stage.append((word, rest.strip()))
    return stage


def exec_form(arg):
    arg = arg.strip()
    if arg.startswith("["):
        return json.loads(arg)
    return ["/bin/sh", "-c", arg]


def labels_of(arg):
    out = {}
    for tok in shlex.split(arg):
        k, _, v = tok.partition("=")
        out[k] = v
    return out


def config_from_dockerfile(path):
    cfg = {}
    for word, arg in final_stage(path):
        if word == "USER":
            cfg["User"] = arg
        elif word == "ENTRYPOINT":
            cfg["Entrypoint"] = exec_form(arg)
        elif word == "CMD":
            cfg["Cmd"] = exec_form(arg)
        elif word == "WORKDIR":
            cfg["WorkingDir"] = arg
        elif word == "EXPOSE":
            cfg.setdefault("ExposedPorts", {}).update({(p if "/" in p else p + "/tcp"): {} for p in arg.split()})
        elif word == "ENV":
            cfg.setdefault("Env", []).extend(f"{k}={v}" for k, v in (t.partition("=")[::2] for t in shlex.split(arg)))
        elif word == "LABEL":
            cfg.setdefault("Labels", {}).update(labels_of(arg))
    return cfg


def layer_tar(rootfs, out_path):
    """A reproducible tar of rootfs (GNU tar: sorted names, numeric owners as on disk, mtime 0)."""
    subprocess.run(
        ["tar", "--sort=name", "--numeric-owner", "--mtime=@0", "--xattrs", "--format=posix",
         "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
         "-C", rootfs, "-cf", out_path, "."],
        check=True,
    )
    h = hashlib.sha256()
    with open(out_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--dockerfile")
    ap.add_argument("--user")
    ap.add_argument("--entrypoint")
    ap.add_argument("--cmd")
    ap.add_argument("--workdir")
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--label", action="append", default=[])
    ap.add_argument("rootfs", nargs="+")
    a = ap.parse_args()

    cfg = config_from_dockerfile(a.dockerfile) if a.dockerfile else {}
    if a.user:
        cfg["User"] = a.user
    if a.entrypoint:
        cfg["Entrypoint"] = json.loads(a.entrypoint)
    if a.cmd:
        cfg["Cmd"] = json.loads(a.cmd)
    if a.workdir:
        cfg["WorkingDir"] = a.workdir
    if a.env:
        cfg.setdefault("Env", []).extend(a.env)
    if a.label:
        cfg.setdefault("Labels", {}).update(dict(l.partition("=")[::2] for l in a.label))
    if not any(e.startswith("PATH=") for e in cfg.get("Env", [])):
        cfg.setdefault("Env", []).insert(0, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")

    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(a.out))) as tmp:
        layers, diff_ids = [], []
        for i, rootfs in enumerate(a.rootfs):
            name = f"layer{i}.tar"
            digest = layer_tar(rootfs, os.path.join(tmp, name))
            final = f"{digest}/layer.tar"
            os.makedirs(os.path.join(tmp, digest), exist_ok=True)
            os.replace(os.path.join(tmp, name), os.path.join(tmp, final))
            layers.append(final)
            diff_ids.append("sha256:" + digest)
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": f"hack/images/oci-pack.py layer {i}"} for i in range(len(layers))],
        }
        raw = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        config_name = hashlib.sha256(raw).hexdigest() + ".json"
        with open(os.path.join(tmp, config_name), "wb") as f:
            f.write(raw)
        manifest = [{"Config": config_name, "RepoTags": [a.tag], "Layers": layers}]
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f)
        partial = a.out + ".partial"
        with tarfile.open(partial, "w") as t:
            for entry in ["manifest.json", config_name] + [os.path.dirname(l) for l in layers]:
                t.add(os.path.join(tmp, entry), arcname=entry)
        os.replace(partial, a.out)
    print(a.out)


if __name__ == "__main__":
    sys.exit(main())
