//! Crash safety of the commands that write models: `quarry import`, `quarry quantize` and `quarry pull` (from the
//! local stand-in server of tests/pull_server) are each killed with SIGKILL at 20 moments spread over the command's
//! own duration (measured first with one uninterrupted run; stratified, with a seeded xorshift placing each moment
//! inside its twentieth). After every kill, `quarry list` shows no half-installed model (the model is absent, or
//! complete and `quarry info` loads it) and no broken one; the same command run again succeeds; and after that rerun
//! nothing but the finished model is left: no staging folder, partial download, `*.part` file or lock file.

mod pull_server;
mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use pull_server::Server;
use support::{XorShift, files_under, fixture_dir, hub_command, temp_dir};

const KILLS: usize = 20;
const NAME: &str = "crashy";
const REPO: &str = "example-org/crashy";

/// `KILLS` moments in [0, duration): the i-th falls at a pseudo-random point of the i-th twentieth.
fn kill_moments(duration: Duration, seed: u64) -> Vec<Duration> {
    let mut rng = XorShift(seed);
    (0..KILLS)
        .map(|i| duration.mul_f64((i as f64 + rng.unit()) / KILLS as f64))
        .collect()
}

fn run(home: &Path, endpoint: &str, args: &[&str]) -> Output {
    hub_command(home, endpoint, args)
        .stdin(Stdio::null())
        .output()
        .expect("quarry runs")
}

fn ok(what: &str, o: Output) -> String {
    assert!(
        o.status.success(),
        "{what}: quarry failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs the command and kills it `after` its start. Returns whether the kill hit it while it was running.
fn kill_after(home: &Path, endpoint: &str, args: &[&str], after: Duration) -> bool {
    let start = Instant::now();
    let mut child = hub_command(home, endpoint, args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("quarry starts");
    if let Some(rest) = after.checked_sub(start.elapsed()) {
        std::thread::sleep(rest);
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    if status.signal() == Some(9) {
        true
    } else {
        assert!(
            status.success(),
            "{args:?} failed on its own before the kill: {status}"
        );
        false
    }
}

/// What `list` shows is only ever a complete model: absent, or loadable by `info`; and nothing is broken.
fn list_shows_no_half_model(home: &Path, endpoint: &str, context: &str) -> bool {
    let text = ok(context, run(home, endpoint, &["list", "--format", "json"]));
    let list: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        list["broken"].as_array().map(Vec::len),
        Some(0),
        "{context}: {list}"
    );
    let installed = list["installed"].as_array().unwrap();
    assert!(installed.len() <= 1, "{context}: {list}");
    let Some(model) = installed.first() else {
        return false;
    };
    assert_eq!(model["name"], NAME, "{context}: {list}");
    ok(context, run(home, endpoint, &["info", NAME]));
    true
}

/// After a successful run, the store holds the model's two files and nothing else.
fn store_is_clean(home: &Path, context: &str) {
    let files = files_under(home);
    let expected = [
        format!("models/{NAME}/manifest.json"),
        format!("models/{NAME}/model.gguf"),
    ];
    assert_eq!(files, expected, "{context}: the store holds leftovers");
}

/// Kills `args` at each moment and checks the store after the kill and after the rerun. Even kills start from a
/// fresh store (the model not installed yet), odd ones from the previous store (replacing the installed model);
/// `before(i)` runs first. Returns the number of kills that hit the running command and the number that left a
/// file other than a finished model in `watch` (default: the store) for the rerun to clean up.
#[allow(clippy::too_many_arguments)]
fn kill_and_rerun(
    what: &str,
    endpoint: &str,
    args: &[&str],
    moments: &[Duration],
    watch: Option<&Path>,
    before: impl Fn(usize),
    check_after_kill: impl Fn(&Path, &str),
    check_after_rerun: impl Fn(&Path, &str),
) -> (usize, usize) {
    let mut hits = 0;
    let mut leftovers = 0;
    let mut home = temp_dir(&format!("crash-{what}"));
    for (i, &moment) in moments.iter().enumerate() {
        if i > 0 && i % 2 == 0 {
            home = temp_dir(&format!("crash-{what}"));
        }
        before(i);
        let context = format!("{what}, kill {i} at {moment:?}");
        let hit = kill_after(&home, endpoint, args, moment);
        hits += usize::from(hit);
        check_after_kill(&home, &context);
        let finished = |f: &String| f.starts_with("models/") || f == "out.gguf";
        if hit && !files_under(watch.unwrap_or(&home)).iter().all(finished) {
            leftovers += 1;
        }
        ok(&context, run(&home, endpoint, args));
        check_after_rerun(&home, &context);
    }
    eprintln!(
        "{what}: {KILLS} kills at {moments:?}: {hits} hit the running command, {leftovers} left files for the rerun"
    );
    (hits, leftovers)
}

/// The tests run one at a time: the durations measured must be those of the kills' runs, not of three commands
/// competing for the cores.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long one uninterrupted run takes in a fresh store: the median of three.
fn measure(what: &str, endpoint: &str, args: &[&str], out: Option<&Path>) -> Duration {
    let mut times = Vec::new();
    for _ in 0..3 {
        let home = temp_dir(&format!("crash-{what}-measure"));
        if let Some(o) = out {
            let _ = std::fs::remove_file(o);
        }
        let start = Instant::now();
        ok(what, run(&home, endpoint, args));
        times.push(start.elapsed());
    }
    times.sort();
    eprintln!(
        "{what}: one uninterrupted run takes {:?} ({times:?})",
        times[1]
    );
    times[1]
}

fn assert_enough(what: &str, (hits, leftovers): (usize, usize)) {
    // The moments fall inside the measured duration; on a loaded machine some runs finish early (the shared cores
    // make durations vary by half), but a quarter of the kills must land, and some of them in the middle of writing.
    assert!(
        hits >= KILLS / 4,
        "{what}: only {hits} of {KILLS} kills hit a running command"
    );
    assert!(leftovers >= 1, "{what}: no kill left anything to clean up");
}

fn fixture() -> PathBuf {
    fixture_dir("granitemoe-kquant-dev").expect("committed fixture")
}

#[test]
fn a_killed_import_never_shows_half_a_model_and_its_rerun_cleans_up() {
    let _serial = one_at_a_time();
    let dir = fixture();
    // --force: odd kills start from a store where the model is installed, and replace it.
    let args = [
        "import",
        dir.to_str().unwrap(),
        "--name",
        NAME,
        "-t",
        "1",
        "--force",
    ];
    let endpoint = "http://127.0.0.1:9";
    let moments = kill_moments(
        measure("import", endpoint, &args, None),
        0x9e37_79b9_7f4a_7c15,
    );
    let counts = kill_and_rerun(
        "import",
        endpoint,
        &args,
        &moments,
        None,
        |_| {},
        |home, context| {
            list_shows_no_half_model(home, endpoint, context);
        },
        |home, context| {
            assert!(
                list_shows_no_half_model(home, endpoint, context),
                "{context}"
            );
            store_is_clean(home, context);
        },
    );
    assert_enough("import", counts);
}

#[test]
fn a_killed_quantize_leaves_no_half_file_and_its_rerun_cleans_up() {
    let _serial = one_at_a_time();
    let dir = fixture();
    let out_dir = temp_dir("crash-quantize-out");
    let out = out_dir.join("out.gguf");
    let args = [
        "quantize",
        dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-t",
        "1",
    ];
    let endpoint = "http://127.0.0.1:9";
    let moments = kill_moments(
        measure("quantize", endpoint, &args, Some(&out)),
        0x2545_f491_4f6c_dd1d,
    );
    let counts = kill_and_rerun(
        "quantize",
        endpoint,
        &args,
        &moments,
        Some(&out_dir),
        // Even kills write a new file, odd ones replace the previous run's.
        |i| {
            if i % 2 == 0 {
                let _ = std::fs::remove_file(&out);
            }
        },
        |home, context| {
            // The output is absent or complete; only its `.part` may be beside it.
            let beside = files_under(&out_dir);
            assert!(
                beside
                    .iter()
                    .all(|f| f == "out.gguf" || f == "out.gguf.part"),
                "{context}: {beside:?}"
            );
            if out.exists() {
                ok(
                    context,
                    run(home, endpoint, &["info", out.to_str().unwrap()]),
                );
            }
        },
        |home, context| {
            ok(
                context,
                run(home, endpoint, &["info", out.to_str().unwrap()]),
            );
            assert_eq!(
                files_under(&out_dir),
                ["out.gguf"],
                "{context}: leftovers beside the output"
            );
            assert!(
                files_under(home).is_empty(),
                "{context}: {:?}",
                files_under(home)
            );
        },
    );
    assert_enough("quantize", counts);
}

#[test]
fn a_killed_pull_never_shows_half_a_model_and_its_rerun_resumes_and_cleans_up() {
    let _serial = one_at_a_time();
    let server = Server::start(&fixture(), REPO);
    // --force: odd kills start from a store where the model is installed, and replace it.
    let args = ["pull", REPO, "-t", "1", "--force"];
    let moments = kill_moments(
        measure("pull", &server.url, &args, None),
        0xd1b5_4a32_d192_ed03,
    );
    // A partial download a kill left is resumed by the rerun, from its length.
    let size = server.file_len("model.safetensors");
    let partial = std::cell::Cell::new(None);
    let resumed = std::cell::Cell::new(0);
    let counts = kill_and_rerun(
        "pull",
        &server.url,
        &args,
        &moments,
        None,
        |_| {},
        |home, context| {
            list_shows_no_half_model(home, &server.url, context);
            let kept = files_under(&home.join("downloads"))
                .into_iter()
                .find(|f| f.ends_with("model.safetensors.partial"))
                .map(|f| {
                    std::fs::metadata(home.join("downloads").join(f))
                        .unwrap()
                        .len()
                });
            partial.set(kept.filter(|&l| l > 0 && (l as usize) < size));
            server.clear_log();
        },
        |home, context| {
            assert!(
                list_shows_no_half_model(home, &server.url, context),
                "{context}"
            );
            store_is_clean(home, context);
            if let Some(have) = partial.get() {
                let gets = server.gets_of("model.safetensors");
                assert_eq!(gets.len(), 1, "{context}: {gets:?}");
                assert_eq!(
                    gets[0].range.as_deref(),
                    Some(format!("bytes={have}-").as_str()),
                    "{context}: the rerun does not resume the partial download"
                );
                resumed.set(resumed.get() + 1);
            }
        },
    );
    eprintln!("pull: {} reruns resumed a partial download", resumed.get());
    assert_enough("pull", counts);
}
