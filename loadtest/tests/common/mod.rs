//! Running a scenario of this crate's load generator as its user would: from the repository, with
//! the debug build's node beside it.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

/// What a scenario run left: its standard output, and `--out`, where it wrote its files.
pub struct Run {
    pub stdout: Vec<u8>,
    pub out: PathBuf,
}

/// Runs `shardcast-loadtest ARGS --node-bin NODE --out OUT` from the repository, ARGS `line` split
/// at spaces and OUT a scratch folder named for `name` and this process; asserts it succeeded,
/// with its standard error if not.
pub fn scenario(name: &str, line: &str) -> Run {
    let me = PathBuf::from(env!("CARGO_BIN_EXE_shardcast-loadtest"));
    let node = me.with_file_name("shardcast");
    assert!(node.exists(), "build the node first: cargo build ({})", node.display());
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::env::temp_dir().join(format!("shardcast-{name}-{}", std::process::id()));
    let run: Output = Command::new(&me)
        .current_dir(&repo)
        .args(line.split_whitespace())
        .arg("--node-bin")
        .arg(&node)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "the run failed: {stderr}");
    Run {
        stdout: run.stdout,
        out,
    }
}
