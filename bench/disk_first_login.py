#!/usr/bin/env python3
"""A new user's profile disk: mkfs.ext4 at the first login, or a template?

Makes the disks of several new users as the agent makes them (a sparse
file of SIZE, mkfs.ext4 with the agent's options and each user's
root_owner), times mkfs, and counts the 256 KiB blocks that hold data
(what a first logout uploads; zero blocks never cross the link) and how
many of them every user shares (identical content at the same index: the
store keeps them once). A template disk made once on the host would share
every block until the user's first write, and cost a fetch of all its
data blocks at each first login. Usage: bench/disk_first_login.py
[WORKDIR] [SIZE_GIB] [USERS]
"""
import hashlib, os, subprocess, sys, time

work = sys.argv[1] if len(sys.argv) > 1 else "/tmp/uve-first-login"
size = (int(sys.argv[2]) if len(sys.argv) > 2 else 8) << 30
users = int(sys.argv[3]) if len(sys.argv) > 3 else 4
block = 256 << 10
os.makedirs(work, exist_ok=True)
version = subprocess.run(["mkfs.ext4", "-V"], capture_output=True, text=True).stderr.split("\n")[0]


def data_blocks(path):
    """Index -> digest of every block that holds a non-zero byte (holes
    skipped with SEEK_DATA)."""
    found = {}
    fd = os.open(path, os.O_RDONLY)
    end = os.fstat(fd).st_size
    off = 0
    try:
        while off < end:
            try:
                off = os.lseek(fd, off, os.SEEK_DATA) // block * block
            except OSError:
                break
            b = os.pread(fd, block, off)
            if any(b):
                found[off // block] = hashlib.blake2b(b).digest()
            off += block
    finally:
        os.close(fd)
    return found


disks, times = [], []
for u in range(users):
    img = os.path.join(work, f"user{u}.disk")
    if os.path.exists(img):
        os.remove(img)
    with open(img, "wb") as f:
        f.truncate(size)
    t = time.monotonic()
    subprocess.run(["mkfs.ext4", "-F", "-q", "-b", "4096", "-m", "0", "-E",
                    f"root_owner={1000 + u}:{1000 + u},lazy_itable_init=0,"
                    "lazy_journal_init=0,assume_storage_prezeroed=1", img], check=True)
    times.append(time.monotonic() - t)
    held = os.stat(img).st_blocks * 512
    disks.append((data_blocks(img), held))
    os.remove(img)

first = disks[0][0]
shared = sum(1 for i, h in first.items() if all(d[0].get(i) == h for d in disks))
print(f"{version}; {size >> 30} GiB disks, {users} users")
print(f"mkfs.ext4: {min(times) * 1000:.0f}-{max(times) * 1000:.0f} ms")
print(f"held on the backing filesystem: {disks[0][1] >> 20} MiB")
print(f"data blocks per disk: {len(first)} ({len(first) * block >> 20} MiB)")
print(f"shared by every user: {shared}; unique per user: {len(first) - shared} "
      f"({(len(first) - shared) * block / (1 << 20):.1f} MiB)")
