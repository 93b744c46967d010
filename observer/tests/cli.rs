//! Bad input gets a clear error and a non-zero exit, never a panic or a hang.

use std::process::{Command, Output};
use std::time::Duration;

fn observer(args: &[&str]) -> Output {
    observer_under(&[], args)
}

fn observer_under(wrapper: &[&str], args: &[&str]) -> Output {
    let bin = env!("CARGO_BIN_EXE_observer");
    let mut cmd = match wrapper {
        [] => Command::new(bin),
        [w, rest @ ..] => {
            let mut c = Command::new(w);
            c.args(rest).arg(bin);
            c
        }
    };
    let mut child = cmd
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running the observer");
    // Every refusal here happens before anything is attached: it must be quick.
    for _ in 0..200 {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("observer {args:?} hung");
}

fn refused(args: &[&str], want: &[&str]) {
    refused_under(&[], args, want)
}

/// As `refused`, the observer started through `wrapper` (e.g. `setpriv` with its options).
fn refused_under(wrapper: &[&str], args: &[&str], want: &[&str]) {
    let out = observer_under(wrapper, args);
    let stderr =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?} must fail with exit 1:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    for w in want {
        assert!(stderr.contains(w), "{args:?}: want {w:?} in:\n{stderr}");
    }
}

/// A file or directory of a test, removed when the test ends.
struct Temp(String);

impl Drop for Temp {
    fn drop(&mut self) {
        let p = std::path::Path::new(&self.0);
        let _ = std::fs::remove_file(p).or_else(|_| std::fs::remove_dir_all(p));
    }
}

fn temp_path(name: &str) -> Temp {
    let p = std::env::temp_dir().join(format!("observer-cli-{}-{name}", std::process::id()));
    Temp(p.display().to_string())
}

fn write_temp(name: &str, text: &str) -> Temp {
    let t = temp_path(name);
    std::fs::write(&t.0, text).expect("temp file");
    t
}

#[test]
fn a_pid_that_does_not_exist() {
    refused(
        &["--pid", "2147483646"],
        &["no process with PID 2147483646", "pgrep"],
    );
    refused(
        &["probes", "--pid", "2147483646"],
        &["no process with PID 2147483646"],
    );
}

/// The observer's binary where any user can run it (the build directory may not be).
fn world_runnable_observer() -> (Temp, String) {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_path("bin");
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let bin = format!("{}/observer", dir.0);
    std::fs::copy(env!("CARGO_BIN_EXE_observer"), &bin).expect("copying the observer");
    (dir, bin)
}

#[test]
fn without_root_or_its_capabilities() {
    // Not root (nobody), no capabilities.
    let (_dir, bin) = world_runnable_observer();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args([&bin, "--pid", "1"])
        .output()
        .expect("running setpriv");
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "as nobody:\n{text}");
    for want in [
        "not root",
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_SYS_PTRACE",
        "sudo",
    ] {
        assert!(text.contains(want), "as nobody: want {want:?} in:\n{text}");
    }
    // Root in a container that was not given them: dropped from the bounding set, they are
    // not regained when the observer is executed.
    refused_under(
        &[
            "setpriv",
            "--bounding-set=-bpf,-perfmon,-sys_admin",
            "--inh-caps=-bpf,-perfmon,-sys_admin",
        ],
        &["--pid", "1"],
        &["root, but without CAP_BPF, CAP_PERFMON:", "--privileged"],
    );
    // CAP_SYS_ADMIN stands in for both (the older kernels' rule, still honoured): past the
    // check, the observer goes on to the PID.
    refused_under(
        &[
            "setpriv",
            "--bounding-set=-bpf,-perfmon",
            "--inh-caps=-bpf,-perfmon",
        ],
        &["--pid", "2147483646"],
        &["no process with PID 2147483646"],
    );
}

/// A kernel without a feature the observer needs, as seen from a mount namespace in which its
/// sysfs entry is hidden under an empty tmpfs.
#[test]
fn a_kernel_without_a_needed_feature_is_named() {
    for (hide, want) in [
        (
            "/sys/kernel/btf",
            &["no BTF", "CONFIG_DEBUG_INFO_BTF=y"][..],
        ),
        (
            "/sys/bus/event_source/devices",
            &["no uprobe perf PMU", "CONFIG_UPROBE_EVENTS=y"][..],
        ),
    ] {
        let script = format!("mount -t tmpfs none {hide} && exec \"$0\" \"$@\"");
        refused_under(
            &["unshare", "--mount", "sh", "-c", &script],
            &["--pid", "1"],
            want,
        );
    }
}

#[test]
fn no_pid_at_all() {
    refused(&[], &["missing --pid"]);
}

#[test]
fn a_process_that_is_not_rusty_workers() {
    let mut sleeper = Command::new("sleep").arg("30").spawn().expect("sleep");
    let pid = sleeper.id().to_string();
    // sleep is stripped on Debian: that is what the observer must say.
    let out = observer(&["--pid", &pid]);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stripped") || stderr.contains("not a rusty-workers proxy"),
        "{stderr}"
    );
}

#[test]
fn a_binary_that_is_not_rusty_workers() {
    // The observer itself has a symbol table but none of the proxy's functions.
    refused(
        &["probes", "--binary", env!("CARGO_BIN_EXE_observer")],
        &["UNRESOLVED", "is not a rusty-workers proxy"],
    );
}

#[test]
fn a_stripped_binary() {
    let stripped = temp_path("stripped");
    std::fs::copy(env!("CARGO_BIN_EXE_observer"), &stripped.0).expect("copy");
    let ok = Command::new("strip")
        .arg(&stripped.0)
        .status()
        .expect("strip (binutils)");
    assert!(ok.success());
    refused(
        &["probes", "--binary", &stripped.0],
        &[
            "is stripped (no .symtab)",
            "socket bytes",
            "unstripped build",
        ],
    );
}

#[test]
fn a_file_that_is_not_elf() {
    let p = write_temp("not-elf", "hello\n");
    refused(&["probes", "--binary", &p.0], &["is not an ELF executable"]);
    refused(
        &["probes", "--binary", "/nonexistent/proxy"],
        &["cannot read /nonexistent/proxy"],
    );
}

#[test]
fn a_bad_catalog_names_line_and_field() {
    let p = write_temp(
        "catalog.toml",
        "[[probe]]\nname = \"x\"\nprogram = \"no_such_program\"\nsymbol = \"f\"\n",
    );
    refused(
        &[
            "probes",
            "--binary",
            env!("CARGO_BIN_EXE_observer"),
            "--catalog",
            &p.0,
        ],
        &[":3: field `program`", "no_such_program", "rpc_call"],
    );
    let p = write_temp("catalog2.toml", "[[probe]\n");
    refused(
        &[
            "probes",
            "--binary",
            env!("CARGO_BIN_EXE_observer"),
            "--catalog",
            &p.0,
        ],
        &["catalog2.toml", "line 1"],
    );
}

#[test]
fn a_bad_symbol_dump_names_the_line() {
    let p = write_temp(
        "dump.tsv",
        "# address\tsize\n0000000000002000\tzz\tt\t_ZN1fE\tf\n",
    );
    refused(&["probes", "--symbols", &p.0], &["line 2", "size"]);
}
