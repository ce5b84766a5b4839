//! The `spool` binary.

fn main() {
    std::process::exit(spool_cli::run());
}

mod spool_cli {
    pub fn run() -> i32 {
        0
    }
}
