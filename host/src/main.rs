//! `uve-host`: the host bridge daemon (skeleton; filled by the host issue).

fn main() {
    println!("uve-host {}", env!("CARGO_PKG_VERSION"));
}
