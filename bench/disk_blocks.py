#!/usr/bin/env python3
"""How much of a profile disk one session changes, by block size.

Makes an ext4 image (mkfs.ext4 as the agent makes it), fills it with a
user's files through debugfs (no mount needed), takes a copy, then runs a
session's worth of changes (edits, appends, new small files, deletions)
and counts, for fixed-size blocks of 64 KiB to 1 MiB, the blocks that
differ between the two images: the bytes a logout would upload and the
manifest entries a version lists. Usage: bench/disk_blocks.py [WORKDIR]
"""
import hashlib, os, random, subprocess, sys

work = sys.argv[1] if len(sys.argv) > 1 else "/tmp/uve-disk-blocks"
os.makedirs(work, exist_ok=True)
img = os.path.join(work, "disk.img")
size = 1 << 30
rng = random.Random(7)

def sh(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def debugfs(cmds):
    script = os.path.join(work, "cmds")
    with open(script, "w") as f:
        f.write("\n".join(cmds) + "\n")
    sh("debugfs", "-w", "-f", script, img)

def blob(n):
    path = os.path.join(work, "blob")
    with open(path, "wb") as f:
        f.write(rng.randbytes(n))
    return path

if os.path.exists(img):
    os.remove(img)
with open(img, "wb") as f:
    f.truncate(size)
sh("mkfs.ext4", "-F", "-q", "-b", "4096", "-m", "0", "-E",
   "lazy_itable_init=0,lazy_journal_init=0,assume_storage_prezeroed=1", img)

# A user's home: 600 files, most small, a few large (documents, caches, mail).
names = []
debugfs(["mkdir docs", "mkdir cache", "mkdir mail"])
for i in range(600):
    d = ("docs", "cache", "mail")[i % 3]
    n = rng.choice([2_000, 8_000, 30_000, 120_000, 600_000, 3_000_000])
    name = f"{d}/f{i}"
    debugfs([f"write {blob(n)} {name}"])
    names.append((name, n))
before = open(img, "rb").read()

# One session: 40 files rewritten, 30 new small files, 20 deleted, 10
# appended to (debugfs rewrites a file whole: rm then write).
for name, n in rng.sample(names, 40):
    debugfs([f"rm {name}", f"write {blob(n)} {name}"])
for i in range(30):
    debugfs([f"write {blob(rng.choice([1_000, 5_000, 20_000]))} docs/new{i}"])
for name, _ in rng.sample(names, 20):
    debugfs([f"rm {name}"])
for name, n in rng.sample(names, 10):
    debugfs([f"rm {name}", f"write {blob(n + 50_000)} {name}"])
after = open(img, "rb").read()
sh("e2fsck", "-n", "-f", img)

used = sum(1 for o in range(0, size, 4096) if after[o:o + 4096].count(0) != 4096) * 4096
print(f"image {size >> 20} MiB, {used >> 20} MiB in non-zero 4 KiB blocks")
print(f"{'block':>8} {'changed':>8} {'upload MiB':>11} {'x changed 4K':>13} {'entries':>8}")
changed4k = sum(1 for o in range(0, size, 4096) if before[o:o + 4096] != after[o:o + 4096]) * 4096
for b in (4096, 65536, 131072, 262144, 524288, 1 << 20):
    changed = sum(1 for o in range(0, size, b) if before[o:o + b] != after[o:o + b])
    print(f"{b >> 10:>6} K {changed:>8} {changed * b / 2**20:>11.1f} {changed * b / changed4k:>13.2f} {size // b:>8}")
