//! The `spool` binary: parses the command line and hands over to [`cli`].

mod cli;

/// mimalloc keeps freed memory for reuse: a connection's megabyte read and
/// write buffers come back from it without the kernel mapping and zeroing
/// fresh pages each time, as glibc's allocator does for blocks that large.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::run()
}
