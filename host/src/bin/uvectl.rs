//! `uvectl`: operator CLI for the uve-host management API (in progress).

fn main() {}
