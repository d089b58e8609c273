//! `uve-agent`: the guest agent (skeleton; filled by the agent issue).

fn main() {
    println!("uve-agent {}", env!("CARGO_PKG_VERSION"));
}
