//! The Python example (examples/python) against the real `spool` binary:
//! runs its pytest file with the Python of the virtual environment `.ci/run`
//! prepares (`SPOOL_PYTHON`, else `target/python-venv/bin/python`). Without
//! that environment the test says so and passes, so `cargo test` works on a
//! machine without Python; CI always has it. No network: the packages are
//! already installed and the stubs are generated from proto/spool.proto
//! into a temporary directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The whole pytest run may take this long before it is killed.
const TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn the_python_example_passes_its_tests_against_the_broker() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = match std::env::var_os("SPOOL_PYTHON") {
        // Named explicitly: it must be there.
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.exists(),
                "SPOOL_PYTHON={} does not exist",
                path.display()
            );
            path
        }
        None => {
            let path = root.join("target/python-venv/bin/python");
            if !path.exists() {
                // Straight to stderr, past the harness's capture, so the
                // skip shows in a plain `cargo test`.
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED the Python example: no {} (run .ci/run, or create it: \
                     python3 -m venv target/python-venv && \
                     target/python-venv/bin/pip install -r examples/python/requirements.txt; \
                     or set SPOOL_PYTHON)",
                    path.display()
                );
                return;
            }
            path
        }
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    // pytest's output goes to a file, printed below through the test
    // harness: shown when the test fails, quiet when it passes.
    let log_path = tmp.path().join("pytest.log");
    let log = std::fs::File::create(&log_path).expect("create pytest.log");
    let mut child = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp"])
        .arg(tmp.path().join("pytest"))
        .arg(root.join("examples/python"))
        .current_dir(root)
        .env("SPOOL_BIN", env!("CARGO_BIN_EXE_spool"))
        // Keep the source tree clean: no __pycache__ next to the example.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone pytest.log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", python.display()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for pytest") {
            break status;
        }
        if started.elapsed() > TIMEOUT {
            // SIGINT first: pytest then runs its fixtures' teardown, which
            // stops the brokers it started.
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let grace = Instant::now();
            while grace.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            println!("{}", std::fs::read_to_string(&log_path).unwrap_or_default());
            panic!("pytest on examples/python ran longer than {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("{}", std::fs::read_to_string(&log_path).unwrap_or_default());
    assert!(
        status.success(),
        "pytest on examples/python failed ({status}); its output is above"
    );
}
