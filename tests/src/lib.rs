//! End-to-end suites for uve: real binaries, real QEMU guests (filled by the QEMU e2e issue).
